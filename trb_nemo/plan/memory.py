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

Terms of the decoding phases and of the machine (their arithmetic in the functions' docstrings):

* ``evaluation records`` (:func:`evaluation_record_bytes`): pass@1 decodes each set in one call
  whose outputs stay on the GPU for all n sequences of the set at once (tokens, records, top-k
  ids, the loss mask): n x S x 37 bytes for the largest set, n = this rank's problems x samples.
* ``student/teacher FP8 weight caches`` (:func:`fp8_cache_bytes`): under ``model.fp8``
  Transformer Engine keeps an FP8 copy of each linear weight and its transpose, 2 bytes per
  parameter, from the first forward on and in every phase (offloading a network moves its
  parameters, not these caches).
* ``attention temporaries`` (:func:`attention_temporary_bytes`): the decode path's attention
  (grouped-query heads folded into the query length, a fused SDPA kernel with the causal mask)
  over one layer at the decoding budget's longest keys or over a prefill chunk.
* ``CUDA graphs`` (:func:`cuda_graph_bytes`, ``rollout.cuda_graphs`` on a GPU): the captured
  decode steps' memory pool and static logits buffers.
* ``CUDA context, NCCL, allocator slack`` (:func:`runtime_reserve`): a base plus an amount per
  NCCL communicator of the layout (:func:`nccl_communicators`), at least 4 GiB.

The limit is the GPU's capacity (:func:`gpu_capacity`): ``parallel.gpu_memory_gb`` when set,
else the total memory of the GPU this process sees (CUDA), else an H100's 79.2 GiB.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

from trb_nemo.config.schema import ConfigError, ModelConfig, ModelSpec, TrainConfig
from trb_nemo.methods.table import method_of, needs_full_teacher_logits, policy_for
from trb_nemo.models.shapes import _L, hf_shapes, padded_vocab_size

GIB = 1024**3
H100_GIB = 79.2
"""The planning figure without a visible GPU (a login node): the total memory CUDA reports for
an H100 "80GB" (``torch.cuda.mem_get_info()``'s total, about 85.0e9 bytes), not 80 GiB."""
RESERVE_FLOOR = 4 * GIB
"""The runtime reserve is never planned below this (one GPU, no communicator)."""
RESERVE_BASE = 2 * GIB
"""Per GPU, on CUDA, whatever the layout: the CUDA context with the kernels torch, cuBLAS and
Transformer Engine load (0.5-1 GiB on H100), their workspaces and the caching allocator's
slack (with ``expandable_segments``, which the launchers set)."""
RESERVE_PER_COMMUNICATOR = GIB // 2
"""Per NCCL communicator: its channels' buffers (NCCL_BUFFSIZE 4 MiB per channel and peer, up to
32 channels on NVLink) and, on NVSwitch systems, NVLS buffers: 0.3-0.7 GiB each as measured on
8-GPU nodes (NVIDIA/nccl#864, #964). ``NCCL_NVLS_ENABLE=0`` or fewer channels need less."""
ADAM_BYTES = 12
"""fp32 main weight + two fp32 Adam moments per parameter (bf16 training; fp32 training keeps
no separate main weight: 8)."""
FP8_CACHE_BYTES = 2
"""Transformer Engine's cached FP8 copy of a linear weight (1 byte per parameter) and its
transpose (1 byte; Hopper's FP8 GEMMs need both layouts for forward and backward)."""
EVAL_TOPK = 1
"""The top-k ids pass@1's decoding records (``topk_k`` in :mod:`trb_nemo.eval.pass_at_1`)."""
RECORD_FIELDS = 5
"""fp32 records per position (``len(RECORDS)`` of :mod:`trb_nemo.rollout.types`)."""
PAPER_SET_PROBLEMS = {"gsm8k": 1319, "math500": 500, "olympiad": 675, "amc": 83, "aime24": 30,
                      "aime25": 30}
"""Problems of the recipes' evaluation sets (as the verl-style Parquet files ship), for a plan
made where a set's file is not (a login node before the data are copied)."""


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    detail: str = ""
    """How the bytes were counted (printed beside the term by :func:`format_plan`)."""


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


def attention_temporary_bytes(spec: ModelSpec, layout: Layout, queries: int,
                              scores: int) -> int:
    """Peak bytes of one layer's attention in the decode path
    (:func:`~trb_nemo.models.cached_attention.attend`, local and Transformer Engine spec alike):
    the grouped-query heads folded into the query length and a fused SDPA kernel (flash or
    memory-efficient on CUDA, flash on CPU) with the causal mask, so nothing of size keys x
    heads is copied (the keys and values are views of the cache) and no scores are
    materialized. ``queries`` = rows x fed positions (BL), ``scores`` = B L K; ``a``/``g`` the
    query/key-value heads per TP rank, ``d`` the head size, ``e`` the model's bytes per element,
    ``r = a / g``. Held during the kernel:

    * with grouped-query heads (r > 1), the folded queries (a copy of the permuted view) and
      the boolean mask expanded to each KV group's r query heads: a d BL e + r B L K bytes
      (with r = 1 both are views);
    * the kernel's additive form of the mask in the queries' dtype: e r B L K;
    * the output a d BL e and the per-row log-sum-exp, fp32: 4 a BL.

    (The output's copy into Megatron's [L, B, heads] layout comes after the folded queries are
    freed, and is no larger.) A decode step of rows of equal length needs no mask (flash-attn's
    KV-cache kernel never does): an upper bound there. tests/dist/test_memory_plan.py measures
    the CPU kernel (whose per-thread scratch, a few blocks, is not counted)."""
    a, g, d = _heads(spec, layout.tp)
    e = layout.dtype_bytes
    r = a // g
    folded = (a * d * queries * e + r * scores) if r > 1 else 0
    return int(folded + e * r * scores + a * d * queries * e + 4 * a * queries)


def decode_attention_bytes(spec: ModelSpec, layout: Layout, slots: int, keys: int,
                           queries_per_row: int, prefill_tokens: int,
                           prompt: int) -> tuple[int, int]:
    """:func:`attention_temporary_bytes` (at a decode step, at the largest prefill chunk). A
    decode step: ``slots`` rows of ``queries_per_row`` positions each over ``keys`` keys. A
    prefill chunk: at most ``prefill_tokens`` (``rollout.prefill_chunk_tokens``) positions of
    prompts of at most ``prompt`` tokens (``data.max_prompt_length``), each row reading at most
    ``prompt`` keys: BL = min(T, slots P), BK = min(slots P, max(T, P)), BLK = BL P."""
    decode = attention_temporary_bytes(spec, layout, slots * queries_per_row,
                                       slots * queries_per_row * keys)
    fed = min(prefill_tokens, slots * prompt)
    prefill = attention_temporary_bytes(spec, layout, fed, fed * prompt)
    return decode, prefill


def cuda_graph_bytes(nets: list[ModelSpec], layout: Layout, slots: int,
                     queries_per_row: int, vocab_shard: int) -> int:
    """Memory the captured decode steps hold while decoding (:mod:`trb_nemo.rollout.graphs`):
    all graphs of a network share one pool, sized by its largest step (``slots`` rows of
    ``queries_per_row`` positions): one layer's working set (:func:`_working_set`; the
    attention temporaries are their own term) and the output layer's logits, [rows, V / TP]
    in the compute dtype; plus the static buffer the step copies the logits into (the same
    size again). Freed with the caches at the end of the decoding."""
    tokens = slots * queries_per_row
    return sum(_working_set(spec, layout, tokens) + 2 * tokens * vocab_shard * layout.dtype_bytes
               for spec in nets)


def fp8_linear_parameters(spec: ModelSpec, layout: Layout, model: ModelConfig) -> int:
    """Parameters of the linear layers this rank runs in FP8 on the pipeline stage with the most
    of them: each layer's 2-D weights (QKV, the attention projection, fc1, fc2) over TP, for
    the layers not kept in bf16 (``model.fp8_first_last_layers_bf16``). The embedding and the
    output layer do not run in FP8."""
    tp, pp, n = layout.tp, layout.pp, spec.num_layers
    prefix = _L.format(0)
    per_layer = sum(math.prod(shape) // tp
                    for name, shape in hf_shapes(dataclasses.replace(spec, num_layers=1)).items()
                    if name.startswith(prefix) and len(shape) == 2)
    first, last = ((model.fp8_layers_at_start_in_bf16, model.fp8_layers_at_end_in_bf16)
                   if model.fp8_first_last_layers_bf16 else (0, 0))
    per_stage = -(-n // pp)
    fp8_layers = max(sum(1 for j in range(i * per_stage, min(n, (i + 1) * per_stage))
                         if first <= j < n - last) for i in range(pp))
    return fp8_layers * per_layer


def fp8_cache_bytes(spec: ModelSpec | None, layout: Layout, model: ModelConfig) -> int:
    """Transformer Engine's FP8 weight caches of one network on this rank: FP8_CACHE_BYTES (the
    FP8 copy and its transpose) x :func:`fp8_linear_parameters`; 0 without FP8 (``model`` is
    the network's own config: the teacher's is ``model.for_teacher()``, FP8 only with
    ``teacher_precision=fp8``). TE builds them at the network's first forward under FP8 and
    keeps them as module attributes, not parameters or buffers: they stay on the GPU in every
    phase, also while :mod:`trb_nemo.train.offload` has the weights in host memory."""
    if spec is None or model.fp8 is None or model.transformer_impl != "transformer_engine":
        return 0
    return FP8_CACHE_BYTES * fp8_linear_parameters(spec, layout, model)


def evaluation_record_bytes(sequences: int, positions: int) -> int:
    """What pass@1's decoding of one set keeps on the GPU until the set is scored
    (:class:`~trb_nemo.rollout.decoder.Decoder`, :func:`~trb_nemo.eval.pass_at_1.evaluate`),
    for all ``sequences`` n of the set on this rank at once, over S = ``positions`` (the
    longest prompt + the new tokens): tokens [n, S] int64 (8 B), records [n, S, 5] fp32 (20 B),
    top-k ids [n, S, K] int64 with K = EVAL_TOPK (8 B) and the loss mask [n, S] bool (1 B):
    n S 37 bytes. The paper's sets at DP = 4 (n = 8000-10816, S = 9216): 2.5-3.4 GiB."""
    return sequences * positions * (8 + 4 * RECORD_FIELDS + 8 * EVAL_TOPK + 1)


def evaluation_set_problems(cfg: TrainConfig) -> list[tuple[str, int | None, str]]:
    """(name, problems, how they were counted) of each evaluation set (as
    :func:`~trb_nemo.data.prompts.build_eval_sets` reads them, counting rows only): a file's
    rows (at most ``eval.num_problems`` when it is > 0); a file not on this machine is planned at
    ``eval.num_problems`` when > 0, else at :data:`PAPER_SET_PROBLEMS` of its name, else not
    at all (None)."""
    from trb_nemo.data.files import count_rows
    from trb_nemo.data.prompts import eval_entries, held_out

    e = cfg.eval
    if e.source is None:  # the held-out part of data.source
        n = None if cfg.data.source == "toy_math" else count_rows(cfg.data.source)
        if n is None:
            return [("held-out", e.num_problems, "" if cfg.data.source == "toy_math" else
                     "data.source not here: at most eval.num_problems")]
        return [("held-out", held_out(n, e.num_problems), "")]
    out: list[tuple[str, int | None, str]] = []
    for name, path in eval_entries(cfg):
        n = e.num_problems if path == "toy_math" else count_rows(path)
        if n is not None:
            out.append((name, min(n, e.num_problems) if e.num_problems else n, ""))
        elif e.num_problems:
            out.append((name, e.num_problems, "file not here: at most eval.num_problems"))
        elif name in PAPER_SET_PROBLEMS:
            out.append((name, PAPER_SET_PROBLEMS[name], "file not here: the recipe's set size"))
        else:
            out.append((name, None, "file not here: not counted"))
    return out


def nccl_communicators(layout: Layout) -> int:
    """NCCL communicators one rank may hold: one per NCCL process group of more than one rank
    it belongs to. Megatron-Core 0.19's ``initialize_model_parallel`` (no context or expert
    parallelism in use) puts each rank in TP, PP, DP, DP with CP (the same ranks as DP, a group
    of its own: the gradient reduce), MP (TP x PP), TP x CP (= TP), TP x DP and TP x DP with
    CP, the distributed optimizer's instance (the world) and, under PP, the embedding group
    (first and last stage); to which torch adds its default group (the world) and, under PP,
    one 2-rank communicator per neighbour stage for the decoder's send/recv (1 on an end stage,
    2 in the middle). Not counted: groups of one rank, Megatron's expert groups (torch creates a
    communicator at a group's first collective, and a dense model runs none there) and the
    gloo side groups (Megatron's ``*_GLOO``, the barrier after uneven phases). Groups that
    never run a collective cost nothing either, so the count is an upper bound.

    >>> nccl_communicators(Layout(2, 1, 4, 2, True, True))  # the 1.7B recipe: TP=2 DP=4
    9
    """
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    world = tp * pp * dp
    groups = [tp, pp, dp, dp, tp * pp, tp, tp * dp, tp * dp, world, 2 if pp > 1 else 1, world]
    return sum(size > 1 for size in groups) + min(2, pp - 1)


def runtime_reserve(cfg: TrainConfig, layout: Layout) -> Term:
    """What the terms do not count, per GPU and phase, on CUDA (none on gloo):
    max(RESERVE_FLOOR, RESERVE_BASE + RESERVE_PER_COMMUNICATOR x :func:`nccl_communicators`);
    2 GiB + 9 x 0.5 GiB = 6.5 GiB for the 1.7B recipe (TP=2 DP=4)."""
    if cfg.parallel.backend == "gloo":
        return Term("CUDA context, NCCL, allocator slack", 0)
    n = nccl_communicators(layout)
    return Term("CUDA context, NCCL, allocator slack",
                max(RESERVE_FLOOR, RESERVE_BASE + n * RESERVE_PER_COMMUNICATOR),
                f"{RESERVE_BASE / GIB:g} GiB + {n} NCCL communicators x "
                f"{RESERVE_PER_COMMUNICATOR / GIB:g} GiB, at least {RESERVE_FLOOR / GIB:g} GiB")


def gpu_capacity(limit_gb: float | None) -> tuple[float, str]:
    """(GiB a phase must fit, where the figure comes from): ``limit_gb``
    (``parallel.gpu_memory_gb``) when set; else, where torch is already imported and sees a
    GPU, that GPU's total memory (the total of ``torch.cuda.mem_get_info()``, read from the
    device's properties, which creates no CUDA context: the pre-flight runs in every rank
    before it picks its device); else :data:`H100_GIB`."""
    if limit_gb is not None:
        return float(limit_gb), "parallel.gpu_memory_gb"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory / GIB, f"{props.name}; parallel.gpu_memory_gb overrides"
    return H100_GIB, "no GPU visible: an H100 80GB; parallel.gpu_memory_gb overrides"


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
    fp8_caches: tuple[Term, ...]
    """Transformer Engine's FP8 weight caches of the student and the teacher: every phase."""
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
        fp8_caches=(_fp8_term("student", student, layout, cfg.model),
                    _fp8_term("teacher", teacher, layout, cfg.model.for_teacher())),
        prefill=Term("prefill working set",
                     _working_set(student, layout, ro.prefill_chunk_tokens)),
        full_logits=full_logits,
        streamed=full_logits and layout.pp == 1 and teacher is not None)


def _fp8_term(which: str, spec: ModelSpec | None, layout: Layout, model: ModelConfig) -> Term:
    n = fp8_cache_bytes(spec, layout, model)
    return Term(f"{which} FP8 weight caches", n,
                f"{FP8_CACHE_BYTES} B x {n // FP8_CACHE_BYTES:,} FP8 linear parameters" if n else "")


def _attention_term(nets: list[ModelSpec], layout: Layout, slots: int, keys: int,
                    queries_per_row: int, cfg: TrainConfig) -> Term:
    """:func:`decode_attention_bytes` of the network and the step that need most (the networks
    run one after the other, a layer at a time)."""
    decode, prefill = (max(x) for x in zip(*(
        decode_attention_bytes(spec, layout, slots, keys, queries_per_row,
                               cfg.rollout.prefill_chunk_tokens, cfg.data.max_prompt_length)
        for spec in nets), strict=True))
    what = (f"decode step, {slots} rows x {keys} keys" if decode >= prefill else
            f"prefill chunk of {min(cfg.rollout.prefill_chunk_tokens, slots * cfg.data.max_prompt_length)} positions")
    return Term("attention temporaries", max(decode, prefill),
                f"one layer's SDPA math kernel, fp32: {what}")


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
    nets = [student, teacher] if lockstep else [student]
    attention = _attention_term(nets, layout, slots, seq + ro.draft_tokens, 1 + ro.draft_tokens,
                                cfg)
    graphs = ([Term("CUDA graphs", cuda_graph_bytes(nets, layout, slots, 1 + ro.draft_tokens,
                                                     p.vocab_shard))] if ro.cuda_graphs else [])
    return terms + [p.teacher_weights, *p.fp8_caches, Term("KV caches", caches),
                    Term("decode logits", decode_logits), p.prefill, attention, *graphs, records]


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
    return [p.student_weights, *state, p.teacher_weights, *p.fp8_caches,
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
    terms += [*p.fp8_caches, Term("activations", acts),
              Term("logits, their gradient and the loss buffer", 3 * logits)]
    if p.streamed:  # PP = 1: each microbatch's teacher logits computed inside the step
        working = _working_set(cfg.model.teacher, layout, b * seq)
        terms += [Term("teacher activations (one microbatch)", working),
                  Term("teacher logits (one microbatch, streamed)", logits)]
    else:
        terms.append(p.targets)
    return terms


def _evaluation_phase(p: _Inputs) -> list[Term]:
    """The student decodes alone at the evaluation budget; the largest set's outputs stay on the
    GPU until it is scored (:func:`evaluation_record_bytes`)."""
    cfg, layout = p.cfg, p.layout
    ev, ro = cfg.eval, cfg.rollout
    eval_slots = ev.max_sequences_in_flight or ro.max_sequences_in_flight
    counted = evaluation_set_problems(cfg)
    sets = [(name, -(-problems // layout.dp) * ev.samples_of(name), note)
            for name, problems, note in counted if problems is not None]
    largest = max(sets, key=lambda s: s[1], default=None)
    if largest is not None and len(sets) == len(counted):  # else the budget bounds the cache
        eval_slots = min(eval_slots, largest[1])
    eval_seq = cfg.data.max_prompt_length + (ev.max_new_tokens or ro.max_new_tokens)
    terms = [p.student_weights]
    if not cfg.optim.offload_during_rollout:
        terms += [p.grads, p.optimizer]
    if not cfg.model.offload_teacher_during_training:  # else still on the host from training
        terms.append(p.teacher_weights)
    kv = kv_cache_bytes(cfg.model.student, layout, eval_slots, eval_seq)
    terms += [*p.fp8_caches, Term("KV cache", kv),
              Term("decode logits", eval_slots * p.vocab_shard * 4 * 2), p.prefill,
              _attention_term([cfg.model.student], layout, eval_slots, eval_seq, 1, cfg)]
    if ro.cuda_graphs:
        terms.append(Term("CUDA graphs", cuda_graph_bytes([cfg.model.student], layout,
                                                          eval_slots, 1, p.vocab_shard)))
    if largest is not None:
        name, n, note = largest
        terms.append(Term("evaluation records", evaluation_record_bytes(n, eval_seq),
                          f"largest set {name}: {n:,} sequences x {eval_seq} positions"
                          + (f" ({note})" if note else "")))
    return terms


def plan_memory(cfg: TrainConfig, world_size: int) -> list[Phase]:
    """The phases of ``cfg`` on ``world_size`` ranks (module docstring); ``cfg``'s models
    resolved (inline shapes, config.json or checkpoint metadata)."""
    p = _inputs(cfg, world_size)
    reserve = [runtime_reserve(cfg, p.layout)]
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


def format_plan(phases: list[Phase], limit_gb: float | None, layout: Layout) -> str:
    """The table ``trb-nemo plan`` prints; ``limit_gb`` None: :func:`gpu_capacity`."""
    limit_gb, source = gpu_capacity(limit_gb)
    lines = [f"per-GPU memory plan: TP={layout.tp} PP={layout.pp} DP={layout.dp}, "
             f"{'bf16' if layout.dtype_bytes == 2 else 'fp32'}, limit {limit_gb:.4g} GiB "
             f"({source})"]
    for phase in phases:
        ok = "ok" if phase.total <= limit_gb * GIB else "OVER"
        lines.append(f"{phase.name:<10} {phase.total / GIB:8.2f} GiB  {ok:<4}  dominant: "
                     f"{phase.dominant.name} ({phase.dominant.bytes / GIB:.2f} GiB)")
        for t in phase.terms:
            lines.append(f"    {t.name:<46} {t.bytes / GIB:8.3f} GiB"
                         + (f"  ({t.detail})" if t.detail else ""))
    return "\n".join(lines)


def check_fits(phases: list[Phase], limit_gb: float | None) -> None:
    """ConfigError naming every phase over ``limit_gb`` (None: :func:`gpu_capacity`; the
    largest first) and the overrides most likely to fix the largest."""
    limit_gb = gpu_capacity(limit_gb)[0]
    over = sorted((p for p in phases if p.total > limit_gb * GIB), key=lambda p: -p.total)
    if not over:
        return
    worst = over[0]
    also = "".join(f"; {p.name} {p.total / GIB:.1f} GiB" for p in over[1:])
    raise ConfigError("parallel.gpu_memory_gb", f"the {worst.name} phase needs "
                      f"{worst.total / GIB:.1f} GiB per GPU (mostly {worst.dominant.name}: "
                      f"{worst.dominant.bytes / GIB:.1f} GiB), over {limit_gb:.4g} GiB{also}; "
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

