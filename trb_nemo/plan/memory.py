"""Per-GPU peak memory of each phase of a step, from the config and the models' shapes alone.

No GPU, no model: ``trb-nemo plan`` prints it, and the pre-flight of ``trb-nemo train`` and
``trb-nemo launch slurm`` refuses a plan over ``parallel.gpu_memory_gb`` before a job waits in
a queue or a model loads. Bytes are those of one rank of the busiest pipeline stage (the first
stage holds the embedding and up to PP microbatches of activations; the last the output layer
and the logits): the plan takes, per term, the larger of the two.

Phases (what is resident at each one's peak):

* ``rollout``: both networks' weights (the teacher's while it runs in lockstep: TRB warmup,
  fixed eps, SKD), the student's gradient buffers and optimizer state unless
  ``optim.offload_during_rollout``, each network's KV cache at the decoding budget
  (``rollout.max_sequences_in_flight`` sequences x (``data.max_prompt_length`` +
  ``rollout.max_new_tokens``) positions), a decode step's logits and the rollout's records.
* ``scoring``: a teacher pass over one microbatch (forward only; when decoding did not record
  the loss's targets; ``loss.kind=full`` and Veto under PP = 1 stream the teacher inside the
  training step instead, one microbatch of its logits at a time): the teacher's weights, the student's state, one microbatch of teacher
  activations and logits, the scored targets.
* ``evaluation``: pass@1's decoding, the student alone, at ``eval.max_sequences_in_flight``
  sequences of (``data.max_prompt_length`` + ``eval.max_new_tokens``) positions; the
  optimizer state and the teacher where the offload options leave them.
* ``training``: the student's weights, fp32 gradient buffers, fp32 main weights and Adam
  moments (sharded over DP with ``parallel.use_distributed_optimizer``), the teacher's weights
  unless ``model.offload_teacher_during_training``, the activations Megatron keeps for backward
  at ``optim.micro_batch_size`` sequences of the full length (a microbatch is cut to its
  longest row, and the planner takes the worst case) under ``model.recompute_granularity``,
  and the loss's logits, their gradient and one logits-sized working buffer.

Activations per layer (elements per token, ``a``/``g`` the query/key-value heads per TP rank,
``d`` the head size, ``f`` the FFN width per rank, ``s`` the sequence length), as Megatron's
local layers save them for backward (checked against the saved tensors by
tests/dist/test_memory_plan.py): 6h (block input, norm outputs, the parallel-region copies,
the mid-block residual) + (a + 2g) d (the fused QKV output) + 2 a d (the rotated query, the
attention context) + 2 a d (keys and values repeated to a heads) + a s (the softmax
probabilities) + 5 f (SwiGLU's fc1 output, gate, activation and product), and with QK norms
2 a d + g d more (the query before and after its norm, the normed keys). Transformer Engine's fused attention keeps no [s, s] term (``a s`` and the repeated
keys/values drop out). Norm statistics are fp32, the rest in the compute dtype. ``selective``
recomputation drops the attention core's terms (the softmax and the repeated keys/values),
``full`` keeps only the input of each recomputed layer (plus one layer's activations while it
is recomputed).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from trb_nemo.config.schema import ConfigError, ModelSpec, TrainConfig
from trb_nemo.methods.table import method_of, needs_full_teacher_logits, policy_for
from trb_nemo.models.shapes import _L, hf_shapes, padded_vocab_size

GIB = 1024**3
RUNTIME_RESERVE = 4 * GIB
"""Per GPU and phase, on CUDA: the CUDA context, NCCL's buffers and the caching allocator's
fragmentation (not counted by the terms; measured runs on H100 lose 2-5 GiB to them)."""
ADAM_BYTES = 12
"""fp32 main weight + two fp32 Adam moments per parameter (bf16 training; fp32 training keeps
no separate main weight: 8)."""


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int


@dataclass(frozen=True)
class Phase:
    name: str
    terms: tuple[Term, ...]

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def dominant(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def term(self, name: str) -> int:
        return sum(t.bytes for t in self.terms if t.name == name)


@dataclass(frozen=True)
class Layout:
    """One rank's share: TP, PP, DP and the dtypes."""

    tp: int
    pp: int
    dp: int
    dtype_bytes: int
    """Compute/weight dtype: 2 (bf16) or 4 (fp32)."""
    distributed_optimizer: bool
    flash_attention: bool
    """Transformer Engine's fused attention (no [s, s] buffers saved)."""


def layout_of(cfg: TrainConfig, world_size: int) -> Layout:
    """``cfg``'s layout on ``world_size`` ranks. ``precision: auto`` plans bf16 unless the run
    is on gloo (a CPU run computes in fp32)."""
    par, model = cfg.parallel, cfg.model
    mp = par.model_parallel_size
    if world_size % mp:
        raise ConfigError("parallel.tensor_model_parallel_size", f"{world_size} ranks are not a "
                          f"multiple of TP x PP = {mp}")
    precision = model.precision
    if precision == "auto":
        precision = "fp32" if par.backend == "gloo" else "bf16"
    return Layout(tp=par.tensor_model_parallel_size, pp=par.pipeline_model_parallel_size,
                  dp=world_size // mp, dtype_bytes=2 if precision == "bf16" else 4,
                  distributed_optimizer=par.use_distributed_optimizer,
                  flash_attention=model.transformer_impl == "transformer_engine")


def _heads(spec: ModelSpec, tp: int) -> tuple[int, int, int]:
    """Query heads, key-value heads (per TP rank) and the head size."""
    nq = spec.num_attention_heads
    ng = spec.num_query_groups or nq
    d = spec.kv_channels or spec.hidden_size // nq
    return nq // tp, max(1, ng // tp), d


def stage_parameters(spec: ModelSpec, layout: Layout) -> int:
    """Parameters one rank holds on the largest pipeline stage: its layers (the 2-D weights and
    biases split over TP, norms replicated) and the vocabulary-parallel embedding and/or
    output layer (padded to Megatron's multiple; a tied output layer is a second copy on the
    last stage when PP > 1)."""
    tp, pp = layout.tp, layout.pp
    prefix = _L.format(0)
    per_layer = sum(math.prod(shape) // (tp if len(shape) == 2 or name.endswith("proj.bias")
                                         else 1)
                    for name, shape in hf_shapes(dataclasses.replace(spec, num_layers=1)).items()
                    if name.startswith(prefix))
    layers = -(-spec.num_layers // pp)
    vocab_rows = padded_vocab_size(spec.vocab_size, tp) // tp
    table = vocab_rows * spec.hidden_size
    first = table
    last = spec.hidden_size + (table if (not spec.tie_embeddings or pp > 1) else 0)
    if pp == 1:
        return layers * per_layer + first + last
    return layers * per_layer + max(first, last)


def activation_elements_per_token(spec: ModelSpec, layout: Layout, seq: int,
                                  recompute: str | None) -> tuple[float, float]:
    """(elements in the compute dtype, fp32 elements) one layer keeps per token for backward
    (module docstring)."""
    a, g, d = _heads(spec, layout.tp)
    h, f = spec.hidden_size, spec.ffn_hidden_size // layout.tp
    attention_core = 0 if layout.flash_attention else a * seq + 2 * a * d
    if recompute == "selective":
        attention_core = 0
    qk_norm = 2 * a * d + g * d if spec.qk_layernorm else 0  # q before/after its norm, k after
    dense = 6 * h + (a + 2 * g) * d + 2 * a * d + qk_norm + 5 * f + attention_core
    stats = 2 + (a + g if spec.qk_layernorm else 0)  # rstd of the norms, fp32
    return dense, stats


def activation_bytes(spec: ModelSpec, cfg: TrainConfig, layout: Layout, tokens: int, seq: int,
                     in_flight: int) -> int:
    """Bytes of activations one stage keeps for backward: ``in_flight`` microbatches of
    ``tokens`` = b x s positions each (1F1B keeps up to PP in flight on the first stage)."""
    model = cfg.model
    layers = -(-spec.num_layers // layout.pp)
    dense, stats = activation_elements_per_token(spec, layout, seq, model.recompute_granularity)
    per_layer = tokens * (dense * layout.dtype_bytes + stats * 4)
    layer_input = tokens * spec.hidden_size * layout.dtype_bytes
    if model.recompute_granularity == "full":
        n = model.recompute_num_layers or 1
        if model.recompute_method == "uniform":
            kept = -(-layers // n) * layer_input + min(n, layers) * per_layer
        else:  # block: the first n layers of the stage recomputed, the rest kept
            recomputed = min(n, layers)
            kept = recomputed * layer_input + (layers - recomputed) * per_layer + per_layer
    else:
        kept = layers * per_layer
    # around the layers: the embedding output and, on the last stage, the final norm's input,
    # statistics and output (and its parallel-region copy)
    ends = tokens * (3 * spec.hidden_size * layout.dtype_bytes + 4)
    return in_flight * kept + ends


def kv_cache_bytes(spec: ModelSpec, layout: Layout, sequences: int, positions: int) -> int:
    """Keys and values of every layer of a stage for ``sequences`` x ``positions``
    (:class:`~trb_nemo.rollout.kv_cache.SequenceCache`: one scratch position more)."""
    _, g, d = _heads(spec, layout.tp)
    layers = -(-spec.num_layers // layout.pp)
    return 2 * layers * sequences * (positions + 1) * g * d * layout.dtype_bytes


@dataclass(frozen=True)
class _Inputs:
    """What the phases of one plan share: the config, the layout, the step's shapes and the
    terms more than one phase holds."""

    cfg: TrainConfig
    layout: Layout
    sequences: int
    """Sequences of a step on one DP rank."""
    seq: int
    """Positions of a sequence: prompt + new tokens."""
    vocab_shard: int
    student_weights: Term
    grads: Term
    optimizer: Term
    teacher_weights: Term
    prefill: Term
    full_logits: bool
    """The loss needs the teacher's full logits (loss.kind=full, Veto)."""
    streamed: bool
    """Those logits are computed per microbatch inside the training step (PP = 1, a teacher)."""

    @property
    def targets(self) -> Term:
        """What the loss reads of the teacher, held from scoring through the step."""
        cfg, seq = self.cfg, self.seq
        if self.full_logits and not self.streamed:
            # the teacher's logits of every sequence, scored before the step and kept through it
            return Term("teacher logits of the batch (loss.kind=full / veto)",
                        self.sequences * seq * self.vocab_shard * self.layout.dtype_bytes)
        return Term("loss targets", self.sequences * seq * cfg.loss.topk * (8 + 4))


def _working_set(spec: ModelSpec, layout: Layout, tokens: int) -> int:
    """Bytes of a forward's working set over ``tokens`` positions: max(4 h, 3 f) elements per
    token (``f`` the FFN width per TP rank), in the compute dtype."""
    return (tokens * max(spec.hidden_size * 4, spec.ffn_hidden_size // layout.tp * 3)
            * layout.dtype_bytes)


def _inputs(cfg: TrainConfig, world_size: int) -> _Inputs:
    layout = layout_of(cfg, world_size)
    student, teacher = cfg.model.student, cfg.model.teacher
    e = layout.dtype_bytes
    ro, opt = cfg.rollout, cfg.optim
    p_student = stage_parameters(student, layout)
    optimizer_bytes = p_student * (ADAM_BYTES if e == 2 else 8)
    if layout.distributed_optimizer:
        optimizer_bytes //= layout.dp
    full_logits = needs_full_teacher_logits(cfg.loss.kind, method_of(ro.behavior).target)
    return _Inputs(
        cfg=cfg, layout=layout,
        sequences=opt.prompts_per_step * ro.num_rollouts_per_prompt // layout.dp,
        seq=cfg.data.max_prompt_length + ro.max_new_tokens,
        vocab_shard=padded_vocab_size(student.vocab_size, layout.tp) // layout.tp,
        student_weights=Term("student weights", p_student * e),
        grads=Term("student grads (fp32)", p_student * 4),
        optimizer=Term("optimizer (main weights, Adam)", optimizer_bytes),
        teacher_weights=Term("teacher weights", stage_parameters(teacher, layout) * e
                             if teacher is not None else 0),
        prefill=Term("prefill working set",
                     _working_set(student, layout, ro.prefill_chunk_tokens)),
        full_logits=full_logits,
        streamed=full_logits and layout.pp == 1 and teacher is not None)


def _rollout_phase(p: _Inputs) -> list[Term]:
    """Decoding at the rollout budget, the teacher in lockstep where the method needs it."""
    cfg, layout, seq = p.cfg, p.layout, p.seq
    student, teacher = cfg.model.student, cfg.model.teacher
    ro, k = cfg.rollout, cfg.loss.topk
    slots = min(ro.max_sequences_in_flight, p.sequences)
    # the step-0 policy: the TRB warmup's (the teacher in lockstep) is the costliest
    lockstep = teacher is not None and policy_for(0, ro, cfg.trb).needs_teacher()
    caches = kv_cache_bytes(student, layout, slots, seq + ro.draft_tokens)
    if lockstep:
        caches += kv_cache_bytes(teacher, layout, slots, seq + ro.draft_tokens)
    rows = slots * (1 + ro.draft_tokens)
    decode_logits = rows * p.vocab_shard * 4 * (4 if lockstep else 2)
    terms = [p.student_weights]
    if not cfg.optim.offload_during_rollout:
        terms += [p.grads, p.optimizer]
    # the returned rollout: tokens, records (5 fp32), top-k ids (int64) and teacher log-probs
    records = Term("rollout records", p.sequences * seq * (8 + 5 * 4 + k * (8 + 4)))
    return terms + [p.teacher_weights, Term("KV caches", caches),
                    Term("decode logits", decode_logits), p.prefill, records]


def _scoring_phase(p: _Inputs) -> list[Term] | None:
    """Teacher scoring before the step (forward only: one microbatch's activations live at a
    time); None when there is no teacher or its logits are streamed inside the step."""
    cfg, layout, seq = p.cfg, p.layout, p.seq
    teacher, b = cfg.model.teacher, cfg.optim.micro_batch_size
    if teacher is None or p.streamed:
        return None
    t_shard = padded_vocab_size(teacher.vocab_size, layout.tp) // layout.tp
    working = _working_set(teacher, layout, b * seq)
    state = () if cfg.optim.offload_during_rollout else (p.grads, p.optimizer)  # on the host
    return [p.student_weights, *state, p.teacher_weights,
            Term("teacher activations (one microbatch)", working),
            Term("teacher logits and the loss buffer", 2 * b * seq * t_shard * layout.dtype_bytes),
            p.targets]


def _training_phase(p: _Inputs) -> list[Term]:
    """The training step: the student's state, its activations and the loss's logits."""
    cfg, layout, seq = p.cfg, p.layout, p.seq
    b = cfg.optim.micro_batch_size
    in_flight = min(layout.pp, max(1, p.sequences // b))
    acts = activation_bytes(cfg.model.student, cfg, layout, b * seq, seq, in_flight)
    logits = b * seq * p.vocab_shard * layout.dtype_bytes
    terms = [p.student_weights, p.grads, p.optimizer]
    if p.streamed or not cfg.model.offload_teacher_during_training:
        terms.append(p.teacher_weights)
    terms += [Term("activations", acts),
              Term("logits, their gradient and the loss buffer", 3 * logits)]
    if p.streamed:  # PP = 1: each microbatch's teacher logits computed inside the step
        working = _working_set(cfg.model.teacher, layout, b * seq)
        terms += [Term("teacher activations (one microbatch)", working),
                  Term("teacher logits (one microbatch, streamed)", logits)]
    else:
        terms.append(p.targets)
    return terms


def _evaluation_phase(p: _Inputs) -> list[Term]:
    """The student decodes alone at the evaluation budget."""
    cfg, layout = p.cfg, p.layout
    ev, ro = cfg.eval, cfg.rollout
    eval_slots = ev.max_sequences_in_flight or ro.max_sequences_in_flight
    if ev.num_problems:  # else every problem of the files: the budget bounds it
        eval_rows = -(-ev.num_problems // layout.dp) * max(
            [ev.num_samples, *ev.samples_per_set.values()])
        eval_slots = min(eval_slots, eval_rows)
    eval_seq = cfg.data.max_prompt_length + (ev.max_new_tokens or ro.max_new_tokens)
    terms = [p.student_weights]
    if not cfg.optim.offload_during_rollout:
        terms += [p.grads, p.optimizer]
    if not cfg.model.offload_teacher_during_training:  # else still on the host from training
        terms.append(p.teacher_weights)
    kv = kv_cache_bytes(cfg.model.student, layout, eval_slots, eval_seq)
    return terms + [Term("KV cache", kv),
                    Term("decode logits", eval_slots * p.vocab_shard * 4 * 2), p.prefill]


def plan_memory(cfg: TrainConfig, world_size: int) -> list[Phase]:
    """The phases of ``cfg`` on ``world_size`` ranks (module docstring); ``cfg``'s models
    resolved (inline shapes, config.json or checkpoint metadata)."""
    p = _inputs(cfg, world_size)
    reserve = [Term("CUDA context, NCCL, allocator slack",
                    RUNTIME_RESERVE if cfg.parallel.backend != "gloo" else 0)]
    scoring = _scoring_phase(p)
    phases = [("rollout", _rollout_phase(p))]
    if scoring is not None:
        phases.append(("scoring", scoring))
    phases += [("training", _training_phase(p)), ("evaluation", _evaluation_phase(p))]
    return [Phase(name, tuple(t for t in terms + reserve if t.bytes)) for name, terms in phases]


FIXES = {
    "rollout": "lower rollout.max_sequences_in_flight (the KV caches) or set "
               "optim.offload_during_rollout=true",
    "scoring": "lower optim.micro_batch_size or raise parallel.tensor_model_parallel_size",
    "training": "lower optim.micro_batch_size or set model.recompute_granularity=full "
                "model.recompute_method=uniform model.recompute_num_layers=1",
    "evaluation": "lower eval.max_sequences_in_flight (the KV cache) or set "
                  "optim.offload_during_rollout=true",
    "batch logits": "use loss.kind=topk, or pipeline_model_parallel_size=1 (under PP, "
                    "loss.kind=full and behavior=veto hold the teacher's logits of every "
                    "sequence; at PP = 1 they are streamed per microbatch)",
}
"""What most often brings a phase under the limit, per phase (named in the refusal)."""


def format_plan(phases: list[Phase], limit_gb: float, layout: Layout) -> str:
    """The table ``trb-nemo plan`` prints."""
    lines = [f"per-GPU memory plan: TP={layout.tp} PP={layout.pp} DP={layout.dp}, "
             f"{'bf16' if layout.dtype_bytes == 2 else 'fp32'}, limit {limit_gb:g} GiB "
             "(parallel.gpu_memory_gb)"]
    for phase in phases:
        ok = "ok" if phase.total <= limit_gb * GIB else "OVER"
        lines.append(f"{phase.name:<10} {phase.total / GIB:8.2f} GiB  {ok:<4}  dominant: "
                     f"{phase.dominant.name} ({phase.dominant.bytes / GIB:.2f} GiB)")
        for t in phase.terms:
            lines.append(f"    {t.name:<46} {t.bytes / GIB:8.3f} GiB")
    return "\n".join(lines)


def check_fits(phases: list[Phase], limit_gb: float) -> None:
    """ConfigError naming every phase over ``limit_gb`` (the largest first) and the overrides
    most likely to fix the largest."""
    over = sorted((p for p in phases if p.total > limit_gb * GIB), key=lambda p: -p.total)
    if not over:
        return
    worst = over[0]
    also = "".join(f"; {p.name} {p.total / GIB:.1f} GiB" for p in over[1:])
    raise ConfigError("parallel.gpu_memory_gb", f"the {worst.name} phase needs "
                      f"{worst.total / GIB:.1f} GiB per GPU (mostly {worst.dominant.name}: "
                      f"{worst.dominant.bytes / GIB:.1f} GiB), over {limit_gb:g} GiB{also}; "
                      f"{FIXES[_fix_of(worst)]} (see `trb-nemo plan`)")


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """:func:`check_fits` of ``cfg``'s plan on ``world_size`` ranks against
    ``parallel.gpu_memory_gb`` (the pre-flights of ``trb-nemo train`` and ``launch slurm``)."""
    check_fits(plan_memory(cfg, world_size), cfg.parallel.gpu_memory_gb)


def _fix_of(phase: Phase) -> str:
    if phase.dominant.name.startswith("teacher logits of the batch"):
        return "batch logits"
    return phase.name


def planned_world_size(cfg: TrainConfig) -> int:
    """Ranks a launched job of ``cfg`` has: launcher.nodes x tasks per node on nccl, else the
    local ranks ``trb-nemo train`` starts."""
    if cfg.parallel.backend == "gloo":
        return cfg.parallel.local_world_size
    la = cfg.launcher
    return la.nodes * (la.tasks_per_node or la.gpus_per_node)

