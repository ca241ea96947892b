"""Typed configuration: one dataclass per component, validated at construction.

Every YAML under ``conf/`` is composed by Hydra against these dataclasses (registered in the
ConfigStore by :mod:`trb_nemo.config.compose`), so an unknown key or a value of the wrong type
fails at composition. Value ranges and cross-field rules live in ``__post_init__`` and raise
:class:`ConfigError` naming the field; the composer prefixes the dotted path
(``trb.eps0: must be >= 0, got -1.0``). Each field's docstring is the one description of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trb_nemo.methods.schedules import SCHEDULES
from trb_nemo.methods.table import METHOD_NAMES, METHODS


class ConfigError(ValueError):
    """A config value a user must change. ``key`` is the dotted path, ``reason`` what is allowed."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _check(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(key, reason)


def _one_of(value, allowed: tuple, key: str) -> None:
    _check(value in allowed, key, f"must be one of {'|'.join(map(str, allowed))}, got {value!r}")


def _positive(value, key: str) -> None:
    _check(value > 0, key, f"must be > 0, got {value}")


def _non_negative(value, key: str) -> None:
    _check(value >= 0, key, f"must be >= 0, got {value}")


# --------------------------------------------------------------------------------------- model


INLINE_MAX_SEQUENCE_LENGTH = 256
INLINE_EOS_TOKEN_ID = 1
"""What an inline network (no hf_path, no checkpoint) uses where its spec says None."""


@dataclass
class ModelSpec:
    """One network (student or teacher): an HF checkpoint, or the architecture given inline."""

    name: str = "tiny"
    """Label used in logs and checkpoint metadata."""
    hf_path: str | None = None
    """HF checkpoint folder (config.json + *.safetensors). When set, its config.json decides the
    architecture and the inline fields below are ignored."""
    checkpoint: str | None = None
    """Megatron (dist_checkpointing) checkpoint to load weights from; None = hf_path or random init."""
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    """Grouped-query attention: number of KV heads; None = num_attention_heads (MHA)."""
    kv_channels: int | None = None
    """Per-head dimension; None = hidden_size / num_attention_heads."""
    vocab_size: int = 128
    """True vocabulary size (Megatron pads the embedding to a multiple of 128 x TP)."""
    max_sequence_length: int | None = None
    """Context in tokens. None = the model's own: ``max_position_embeddings`` of the HF
    config.json, the value a checkpoint recorded, 256 for an inline network. Set, it caps the
    model's (never raises it) and is not written into an exported config.json."""
    rotary_base: float = 10000.0
    qk_layernorm: bool = False
    """Qwen3-style RMSNorm on queries and keys."""
    qkv_bias: bool = False
    """Qwen2-style biases on the query, key and value projections (no other linear biases)."""
    rope_scaling_factor: float | None = None
    """Llama-3.1-style RoPE frequency scaling factor (low/high frequency factors 1 and 4,
    original context 8192); None = plain RoPE."""
    tie_embeddings: bool = False
    """Share the input embedding and output layer weights."""
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-6
    eos_token_id: int | None = None
    """The model's stop id (a Base student and an Instruct teacher may differ). None = the
    model's own: ``eos_token_id`` of the HF folder's generation_config.json, else of its
    config.json (the first of a list), the id a checkpoint recorded, 1 for an inline network."""

    def __post_init__(self):
        _one_of(self.normalization, ("RMSNorm", "LayerNorm"), "normalization")
        if self.hf_path is None and self.checkpoint is None:  # inline: nothing to read them from
            if self.max_sequence_length is None:
                self.max_sequence_length = INLINE_MAX_SEQUENCE_LENGTH
            if self.eos_token_id is None:
                self.eos_token_id = INLINE_EOS_TOKEN_ID
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "vocab_size", "max_sequence_length"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), name)
        _check(self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
               "hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads} "
               "(or set kv_channels)")
        groups = self.num_query_groups or self.num_attention_heads
        _check(self.num_attention_heads % groups == 0, "num_query_groups",
               f"must divide num_attention_heads={self.num_attention_heads}, got {groups}")
        if self.eos_token_id is not None:  # a file-backed network: checked once resolved
            vocab = self.vocab_size if self.hf_path is None and self.checkpoint is None else None
            check_eos(self.eos_token_id, vocab, "eos_token_id")


def check_eos(eos: int, vocab_size: int | None, key: str, of: str = "") -> None:
    """ConfigError(key) unless 0 <= eos < vocab_size (vocab_size None: only eos >= 0)."""
    _check(eos >= 0 and (vocab_size is None or eos < vocab_size), key,
           f"must be in [0, vocab_size={vocab_size}{of}), got {eos}" if vocab_size is not None
           else f"must be >= 0, got {eos}")


FP8_RECIPES = ("delayed", "tensorwise")
"""model.fp8_recipe values: the FP8 recipes of Hopper (Megatron-Core's names)."""
@dataclass
class ModelConfig:
    """Student and teacher networks and how they run."""

    student: ModelSpec = field(default_factory=ModelSpec)
    teacher: ModelSpec | None = field(default_factory=lambda: ModelSpec(name="tiny-teacher", num_layers=4))
    """None only for runs that never need a teacher (none of the training behaviors)."""
    transformer_impl: str = "local"
    """``local`` (torch layers; CPU and GPU) or ``transformer_engine`` (GPU only, needed for FP8)."""
    fp8: str | None = None
    """``hybrid`` (e4m3 forward, e5m2 gradients) or ``e4m3`` through Transformer Engine on a
    Hopper (or newer) GPU; None = no FP8. The student's linear layers run in FP8 (the teacher's
    per ``teacher_precision``); norms, attention, softmax and the output layer stay in bf16.
    Sequences are right-padded to a multiple of 16 tokens for TE's FP8 GEMMs."""
    fp8_recipe: str = "delayed"
    """How FP8 scales are chosen. ``delayed``: from the amax history of earlier iterations
    (``fp8_amax_*``, ``fp8_margin``); ``tensorwise``: current scaling, each tensor's own amax at
    every cast (Transformer Engine >= 2.2). Blackwell-only ``mxfp8`` and the block-scaling
    recipes are not offered."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: iterations of amax kept per tensor."""
    fp8_amax_compute_algo: str = "max"
    """Delayed scaling: the amax a scale is computed from, ``max`` over the history or
    ``most_recent``."""
    fp8_margin: int = 0
    """Delayed scaling: the scale is reduced by 2**margin (headroom against overflow)."""
    fp8_first_last_layers_bf16: bool = False
    """Keep the first ``fp8_layers_at_start_in_bf16`` and the last ``fp8_layers_at_end_in_bf16``
    transformer layers in bf16 (the rest in FP8). Needs ``fp8_recipe=tensorwise``: Megatron-Core
    refuses it under delayed scaling."""
    fp8_layers_at_start_in_bf16: int = 1
    """With ``fp8_first_last_layers_bf16``: leading layers kept in bf16 (at most the layers of
    one pipeline stage)."""
    fp8_layers_at_end_in_bf16: int = 1
    """With ``fp8_first_last_layers_bf16``: trailing layers kept in bf16 (at most the layers of
    one pipeline stage)."""
    teacher_precision: str = "bf16"
    """The frozen teacher's precision, set apart from the student's: ``bf16`` (no FP8: the
    teacher computes in ``precision``'s dtype whatever ``fp8`` says) or ``fp8`` (under ``fp8``
    and ``fp8_recipe`` like the student). ``fp8`` needs ``fp8_recipe=tensorwise``: a frozen
    teacher under delayed scaling would never update its scales, since Transformer Engine
    updates them only when an FP8 region exits with grad enabled and the teacher runs under
    no_grad."""
    precision: str = "auto"
    """Parameter/compute dtype: ``fp32``, ``bf16``, or ``auto`` (bf16 on GPU, fp32 on CPU).
    With ``fp8``: ``bf16`` or ``auto``."""
    init_seed: int = 1234
    """Seed of the random initialization (when no checkpoint is loaded)."""
    recompute_granularity: str | None = None
    """Activation recomputation of the student in training (Megatron's): None (keep every
    activation), ``selective`` (recompute the attention core: its [b, heads, s, s] memory),
    ``full`` (keep only each recomputed layer's input, recompute the layer in backward)."""
    recompute_method: str | None = None
    """With ``full``: ``uniform`` (every ``recompute_num_layers`` layers one checkpoint) or
    ``block`` (the first ``recompute_num_layers`` layers of each stage recomputed)."""
    recompute_num_layers: int | None = None
    """With ``full``: see ``recompute_method``."""
    offload_teacher_during_training: bool = False
    """Park the teacher's weights in host memory (pinned on CUDA) from the end of the scoring
    pass until the teacher runs again (the next rollout that runs it, or the next scoring
    pass), so the student's training step has the teacher's memory. Bit-exact; costs one copy
    of the teacher's weights each way per step."""

    def __post_init__(self):
        _one_of(self.transformer_impl, ("local", "transformer_engine"), "transformer_impl")
        _one_of(self.recompute_granularity, (None, "selective", "full"), "recompute_granularity")
        _one_of(self.recompute_method, (None, "uniform", "block"), "recompute_method")
        _check((self.recompute_granularity == "full") == (self.recompute_method is not None),
               "recompute_method", "set it (uniform|block) exactly when "
               "model.recompute_granularity=full")
        _check((self.recompute_method is None) == (self.recompute_num_layers is None),
               "recompute_num_layers", "set it (>= 1) exactly when model.recompute_method is set")
        _check(self.recompute_num_layers is None or self.recompute_num_layers >= 1,
               "recompute_num_layers", f"must be >= 1, got {self.recompute_num_layers}")
        _one_of(self.fp8, (None, "hybrid", "e4m3"), "fp8")
        _one_of(self.precision, ("auto", "fp32", "bf16"), "precision")
        _check(self.fp8 is None or self.transformer_impl == "transformer_engine", "fp8",
               f"fp8={self.fp8} needs model.transformer_impl=transformer_engine (Transformer Engine "
               "on a GPU); set model.fp8=null to run without FP8")
        _check(self.fp8_recipe in FP8_RECIPES, "fp8_recipe",
               f"must be one of {'|'.join(FP8_RECIPES)} (the Hopper FP8 recipes; mxfp8 is "
               f"Blackwell-only), got {self.fp8_recipe!r}")
        _positive(self.fp8_amax_history_len, "fp8_amax_history_len")
        _one_of(self.fp8_amax_compute_algo, ("max", "most_recent"), "fp8_amax_compute_algo")
        _non_negative(self.fp8_margin, "fp8_margin")
        _non_negative(self.fp8_layers_at_start_in_bf16, "fp8_layers_at_start_in_bf16")
        _non_negative(self.fp8_layers_at_end_in_bf16, "fp8_layers_at_end_in_bf16")
        _one_of(self.teacher_precision, ("bf16", "fp8"), "teacher_precision")
        _check(self.teacher_precision == "bf16" or self.fp8 is not None, "teacher_precision",
               "fp8 runs the teacher under model.fp8, which is null; set model.fp8=hybrid "
               "(or e4m3) or model.teacher_precision=bf16")
        if self.fp8 is None:
            return  # the fp8_* fields only apply with model.fp8 set
        _check(self.precision != "fp32", "precision",
               f"fp32 with fp8={self.fp8}: FP8 runs beside bf16 weights and activations; use "
               "model.precision=bf16 (or auto) or model.fp8=null")
        _check(not (self.teacher_precision == "fp8" and self.fp8_recipe == "delayed"),
               "teacher_precision", "fp8 with fp8_recipe=delayed: a frozen teacher never updates "
               "delayed-scaling FP8 scales (TE updates them only when an FP8 region exits with "
               "grad enabled); use model.fp8_recipe=tensorwise or model.teacher_precision=bf16")
        _check(not (self.fp8_first_last_layers_bf16 and self.fp8_recipe == "delayed"),
               "fp8_first_last_layers_bf16", "Megatron-Core does not support first/last layers "
               "in bf16 under delayed scaling; use model.fp8_recipe=tensorwise or "
               "model.fp8_first_last_layers_bf16=false")

    def for_teacher(self) -> ModelConfig:
        """This config as the teacher is built from it: ``fp8`` cleared unless
        ``teacher_precision=fp8`` (everything else, ``precision`` included, unchanged)."""
        if self.teacher_precision == "fp8" or self.fp8 is None:
            return self
        import dataclasses

        return dataclasses.replace(self, fp8=None)


# ------------------------------------------------------------------------------------ parallel


@dataclass
class ParallelConfig:
    """How ranks are laid out. Data parallelism is what remains: world / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_local_ranks: int | None = None
    """Ranks ``trb-nemo train`` starts by itself when not under torchrun or srun;
    None = tensor_model_parallel_size x pipeline_model_parallel_size."""
    backend: str = "auto"
    """``auto`` (nccl with CUDA, gloo without), ``nccl`` or ``gloo``."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron DistributedOptimizer)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs Transformer Engine or Apex norms; not on CPU)."""
    timeout_minutes: float = 10
    """Collective timeout (NCCL's watchdog on GPU): a rank stuck longer than this in one
    collective fails the job instead of hanging. It must cover the longest *balanced* phase a
    collective waits through (a training step's, a checkpoint save's); phases whose length
    differs across data-parallel ranks (rollout, evaluation) end in a barrier of their own
    (``uneven_phase_timeout_minutes``) before the next collective."""
    uneven_phase_timeout_minutes: float = 720
    """How long a rank that finished an uneven phase (rollout, evaluation, the SFT stage's
    teacher decoding: data-parallel ranks decode different prompts for different lengths) waits
    for the others, in a barrier on a gloo group of its own, before the job fails. Must cover the
    longest evaluation; the default is 12 hours."""
    gpu_memory_gb: float | None = None
    """Memory of one GPU in GiB (2**30 bytes) that every phase's planned per-GPU peak
    (``trb-nemo plan``) must fit: the pre-flight of ``trb-nemo train`` (on CUDA) and of
    ``trb-nemo launch slurm`` refuses a run over it, naming the phase and the overrides most
    likely to fix it. None: the total memory of the GPU the process sees (what
    ``torch.cuda.mem_get_info()`` reports as total; an H100 "80GB" has 79.2 GiB, not 80), or,
    with no GPU visible (a login node), 79.2 GiB, an H100's. Set it to plan for another card
    (e.g. 139 for an H200 "141GB") or to keep headroom on a shared one."""
    fused_ops: str = "auto"
    """Row kernels of the vocab-parallel ops (trust region, reverse KL) compiled by
    torch.compile into one fused pass each: ``auto`` (on CUDA), ``on`` (CPU too; needs a C++
    compiler, compiles for tens of seconds; the pre-flight checks one is on PATH) or ``off``
    (eager torch)."""

    def __post_init__(self):
        _positive(self.tensor_model_parallel_size, "tensor_model_parallel_size")
        _one_of(self.fused_ops, ("auto", "on", "off"), "fused_ops")
        _positive(self.pipeline_model_parallel_size, "pipeline_model_parallel_size")
        _one_of(self.backend, ("auto", "nccl", "gloo"), "backend")
        _positive(self.timeout_minutes, "timeout_minutes")
        _positive(self.uneven_phase_timeout_minutes, "uneven_phase_timeout_minutes")
        if self.gpu_memory_gb is not None:
            _positive(self.gpu_memory_gb, "gpu_memory_gb")
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        if self.num_local_ranks is not None:
            _check(self.num_local_ranks > 0 and self.num_local_ranks % model_parallel == 0,
                   "num_local_ranks", f"must be a positive multiple of TP x PP = {model_parallel}, "
                   f"got {self.num_local_ranks}")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def local_world_size(self) -> int:
        return self.num_local_ranks or self.model_parallel_size


# ------------------------------------------------------------------------------------- method




@dataclass
class TRBConfig:
    """The trust-region budget eps_k (paper Eq. 3) and its solver."""

    eps0: float = 0.02
    """Initial per-prefix KL budget eps_0 (paper sweep: 0.001 ... 0.05)."""
    warmup_steps: int = 50
    """K: steps over which eps_k anneals to 0; pure OPD on student rollouts afterwards."""
    schedule: str = "linear"
    """``linear`` eps0 (1 - k/K); ``cosine``; ``constant`` (eps0 forever, the fixed-eps baseline);
    ``none`` (eps = 0: vanilla OPD)."""
    solver_tolerance: float = 1e-6
    """Relative tolerance on beta of the trust-region solve."""
    solver_max_iterations: int = 40
    """Upper bound on safeguarded-Newton/bisection iterations per solve."""

    def __post_init__(self):
        _non_negative(self.eps0, "eps0")
        _non_negative(self.warmup_steps, "warmup_steps")
        _one_of(self.schedule, SCHEDULES, "schedule")
        _check(0 < self.solver_tolerance < 1, "solver_tolerance",
               f"must be in (0, 1), got {self.solver_tolerance}")
        _positive(self.solver_max_iterations, "solver_max_iterations")
        _check(not (self.schedule in ("linear", "cosine") and self.eps0 > 0 and self.warmup_steps == 0),
               "warmup_steps", f"must be > 0 for schedule={self.schedule} with eps0 > 0")


@dataclass
class LossConfig:
    """Per-prefix reverse KL(pi_S || pi_T) on the visited prefixes (unchanged by TRB)."""

    kind: str = "topk"
    """``topk`` (paper default: student top-k support), ``full`` (exact over the vocabulary),
    ``sampled`` (single-sample estimate at the generated token)."""
    topk: int = 16
    """k of the student top-k support for kind=topk."""
    veto_b_start: float = 0.4
    """behavior=veto: b of the target Q ∝ pi_T pi_S^b at step 0, annealed linearly to 0 at the
    last step (the paper sweeps 0.2, 0.4, 0.6, 0.8). Veto's loss is over the full vocabulary
    (the teacher's logits are scored, whatever ``kind`` says)."""
    veto_direction: str = "forward"
    """behavior=veto: ``forward`` KL(Q || pi_theta) (Veto's) or ``reverse`` KL(pi_theta || Q)."""

    def __post_init__(self):
        _one_of(self.kind, ("topk", "full", "sampled"), "kind")
        _positive(self.topk, "topk")
        _non_negative(self.veto_b_start, "veto_b_start")
        _one_of(self.veto_direction, ("forward", "reverse"), "veto_direction")


MAX_DRAFT_TOKENS = 32
"""Longest speculative draft: acceptance decays geometrically, so longer drafts waste student
forwards (about 1 / (1 - acceptance) tokens are kept per round)."""


@dataclass
class RolloutConfig:
    """Behavior policy that generates the training prefixes, and decoding limits."""

    behavior: str = "trb"
    """The method (:mod:`trb_nemo.methods`: its behavior policy and loss target): ``trb`` (the
    paper), ``student`` (vanilla OPD), ``fixed`` (constant eps), ``skd`` (interleaved teacher
    injection), ``temperature`` (student temperature warmup), ``veto`` (student rollouts, Veto's
    target)."""
    max_new_tokens: int = 64
    num_rollouts_per_prompt: int = 4
    temperature: float = 1.0
    """Sampling temperature of the behavior policy after any warmup."""
    fixed_eps: float = 0.01
    """Budget of behavior=fixed."""
    skd_topk: int = 15
    """behavior=skd: a student token outside the teacher's top-K is replaced."""
    skd_teacher_temperature: float = 0.2
    """behavior=skd: temperature tau_T of the replacing teacher sample."""
    temperature_start: float = 0.9
    """behavior=temperature: tau_0, annealed linearly back to ``temperature``."""
    temperature_warmup_steps: int = 15
    """behavior=temperature: steps of that anneal."""
    seed: int = 0
    """Base seed of the sampling noise (combined with the step; each sequence's noise is keyed
    by its global index and position, so it does not depend on batching or layout)."""
    max_sequences_in_flight: int = 64
    """Continuous batching: sequences decoded at once per data-parallel rank; a finished one
    frees its slot for a waiting one. Each network's KV cache is this many sequences x (longest
    prompt + max_new_tokens), whatever the number of prompts."""
    prefill_chunk_tokens: int = 8192
    """Prompt prefill feeds an admitted group's prompts in one forward of up to this many token
    positions (rows x positions); longer groups are split by rows, then long prompts by
    positions."""
    draft_tokens: int = 0
    """Speculative TRB (behavior trb or fixed, while eps > 0): the student drafts this many
    tokens and the teacher verifies them in one forward; the samples are exact draws from the
    same mu. 0 decodes one token per step with both networks in lockstep."""
    cuda_graphs: bool = True
    """On CUDA, capture each decode-step shape (live sequences padded up to a bucket: 1, 2, 4,
    8, 16, 24, ...) in a CUDA graph once and replay it: a step then costs one launch instead of
    ~50 per layer. A capture that fails falls back to eager decoding with one warning, on every
    rank of the model-parallel group alike. No effect on CPU (the same step runs eagerly); false
    decodes eagerly on CUDA too (e.g. to profile kernels one by one)."""

    def __post_init__(self):
        _check(self.behavior in METHODS, "behavior",  # the internal stages are not offered
               f"must be one of {'|'.join(METHOD_NAMES)}, got {self.behavior!r}")
        _positive(self.max_sequences_in_flight, "max_sequences_in_flight")
        _positive(self.prefill_chunk_tokens, "prefill_chunk_tokens")
        _check(0 <= self.draft_tokens <= MAX_DRAFT_TOKENS, "draft_tokens",
               f"must be in [0, {MAX_DRAFT_TOKENS}], got {self.draft_tokens}")
        _check(self.draft_tokens == 0 or METHODS[self.behavior].speculative, "draft_tokens",
               f"speculative decoding verifies drafts against the trust-region policy; "
               f"behavior={self.behavior} needs rollout.draft_tokens=0")
        _positive(self.max_new_tokens, "max_new_tokens")
        _positive(self.num_rollouts_per_prompt, "num_rollouts_per_prompt")
        _positive(self.temperature, "temperature")
        _non_negative(self.fixed_eps, "fixed_eps")
        _positive(self.skd_topk, "skd_topk")
        _positive(self.skd_teacher_temperature, "skd_teacher_temperature")
        _positive(self.temperature_start, "temperature_start")
        _non_negative(self.temperature_warmup_steps, "temperature_warmup_steps")


# ------------------------------------------------------------------------------ training loop


@dataclass
class SFTConfig:
    """behavior=sft_warmup (paper appendix "Baseline Setup Details"): before OPD, the teacher
    answers (at temperature 1.0, ``rollout.num_rollouts_per_prompt`` responses each) exactly
    the prompts of the first ``prompt_steps`` OPD steps, and the student is fine-tuned on those
    responses for ``updates`` optimizer updates (update u on the responses to OPD step u's
    prompts, cycling when ``updates`` > ``prompt_steps``); OPD then starts from the fine-tuned
    weights with a fresh optimizer. The stage runs as its own resumable run,
    ``<run_name>-sft``."""

    prompt_steps: int = 50
    updates: int = 25
    """S: the paper sweeps 15, 25 and 50."""
    lr: float = 1e-5
    lr_warmup_steps: int = 15
    """Linear warmup, then constant (the paper's SFT schedule)."""

    def __post_init__(self):
        _positive(self.prompt_steps, "prompt_steps")
        _positive(self.updates, "updates")
        _positive(self.lr, "lr")
        _non_negative(self.lr_warmup_steps, "lr_warmup_steps")


@dataclass
class OptimConfig:
    """AdamW on the student, LR warmup then constant (the paper's Table 2)."""

    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_steps: int = 15
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global grad-norm clip; 0 disables."""
    max_steps: int = 400
    prompts_per_step: int = 64
    """Global batch in prompts; sequences per step = prompts x rollout.num_rollouts_per_prompt."""
    micro_batch_size: int = 4
    """Sequences per microbatch in the pipeline schedule."""
    offload_during_rollout: bool = False
    """Park the student's optimizer state (Adam moments, and the fp32 main weights where they
    are a copy of bf16 weights) and its fp32 gradient buffers in host memory (pinned on CUDA)
    while the student decodes (rollout and evaluation); they come back for the optimizer step
    and before a checkpoint save. Bit-exact; costs one copy of them each way per step."""
    pad_to_multiple: int = 64
    """A training or teacher-scoring microbatch runs only up to its longest sequence's last
    response prefix, rounded up to a multiple of this many positions (64 keeps shapes few and
    FP8-aligned); 0 runs every microbatch at the rollout's full length."""
    group_by_length: bool = True
    """Put sequences of similar length in the same microbatch (sorted within this data-parallel
    rank's share), so short responses are not padded to long ones. The loss (a token mean over
    the global batch) and its gradient are unchanged."""

    def __post_init__(self):
        _positive(self.lr, "lr")
        _non_negative(self.min_lr, "min_lr")
        _non_negative(self.lr_warmup_steps, "lr_warmup_steps")
        _non_negative(self.weight_decay, "weight_decay")
        _check(0 <= self.adam_beta1 < 1, "adam_beta1", f"must be in [0, 1), got {self.adam_beta1}")
        _check(0 <= self.adam_beta2 < 1, "adam_beta2", f"must be in [0, 1), got {self.adam_beta2}")
        _positive(self.adam_eps, "adam_eps")
        _non_negative(self.clip_grad, "clip_grad")
        _positive(self.max_steps, "max_steps")
        _positive(self.prompts_per_step, "prompts_per_step")
        _positive(self.micro_batch_size, "micro_batch_size")
        _non_negative(self.pad_to_multiple, "pad_to_multiple")


@dataclass
class DataConfig:
    """Where the training prompts come from, and how a prompt becomes token ids.

    A file's rows are read by :mod:`trb_nemo.data.prompts`; a key names a field of a row: a
    column, or a dotted path into nested records (``reward_model.ground_truth``; a number
    indexes a list: ``conversations.1.value``), or several such paths separated by ``|``, the
    first one the row has (``problem|question``)."""

    source: str = "toy_math"
    """``toy_math`` (the built-in arithmetic task), or a ``.jsonl`` (one JSON object per line;
    ``.json`` is read the same way) or ``.parquet`` file of prompts with reference answers. With
    ``eval.source`` null its first tenth (at most ``eval.num_problems``) is held out for pass@1;
    with ``eval.source`` set all of it trains."""
    prompt_key: str = "prompt"
    """The prompt's field: a string, or a list of chat messages (``{"role", "content"}`` as in
    verl's Parquet, or ``{"from", "value"}`` as in OpenThoughts3's ``conversations``), of which
    the text of the first user turn (role/from ``user`` or ``human``) is the prompt; the other
    turns (a dataset's own system message, the assistant's answer) are not used."""
    answer_key: str | None = "answer"
    """The reference answer's field (a string or a number): rollout rewards and pass@1 are
    checked against it (:mod:`trb_nemo.data.answers`: ``\\boxed{}``, GSM8K's ``#### 72`` or a
    bare expression; with the toy tokenizer an integer). None: the training prompts have no
    answers (OpenThoughts3 ships none); the loss needs none, rollouts are not scored
    (``rollout/reward`` is not logged), and pass@1 needs ``eval.source``."""
    system_prompt: str = ""
    """With ``chat_template`` false: text put before every prompt; with it true: the system
    message (none when empty)."""
    chat_template: bool = False
    """Render each prompt with the student tokenizer's chat template (``system_prompt`` as the
    system message, the prompt as the user message, ``add_generation_prompt=True``) and
    tokenize the result as it is. Student and teacher share one tokenizer, so both score the
    same ids. Needs ``model.student.hf_path`` with a tokenizer that has a chat template."""
    max_prompt_length: int = 64
    """Tokens; a longer prompt (training or evaluation) is an error before any model loads,
    unless ``skip_long_prompts``."""
    skip_long_prompts: bool = False
    """Leave out the training prompts longer than ``max_prompt_length`` (one line says how
    many) instead of stopping; evaluation sets are never filtered."""
    seed: int = 0
    """Shuffling seed of the prompt order."""

    fingerprint: str | None = None
    """Set by the pre-flight, not by hand: a digest of the bytes of ``data.source`` and the
    ``eval.source`` files, saved with each checkpoint's config, so a data file edited in place
    under the same path is a changed setting on resume (stopped, or with
    ``checkpoint.allow_config_change`` recorded) instead of other prompts and held-out problems
    without a word. None for the toy task."""

    def __post_init__(self):
        _check(bool(self.source), "source", "must name toy_math or a .jsonl/.parquet file")
        _check(bool(self.prompt_key.strip("|")), "prompt_key", "must name a field")
        _check(self.answer_key is None or bool(self.answer_key.strip("|")), "answer_key",
               "must name a field, or be null for prompts without answers")
        _positive(self.max_prompt_length, "max_prompt_length")
        _check(not (self.chat_template and self.source == "toy_math"), "chat_template",
               "is true, but the toy task (data.source=toy_math) is written in the toy models' "
               "character ids, with no chat template; set data.chat_template=false, or "
               "data.source=FILE for prompts your tokenizer's chat template wraps")


@dataclass
class EvalConfig:
    """pass@1 = c/n over n samples per problem at ``temperature``, per evaluation set."""

    interval: int = 20
    """Steps between evaluations; 0 disables periodic evaluation."""
    source: list[str] | None = None
    """The evaluation sets, each reported on its own (``eval/<name>/pass@1``) and as the
    unweighted mean over sets (``eval/pass@1``, the paper's "Avg"): ``toy_math`` (the toy task's
    held-out problems) or a ``.jsonl``/``.parquet`` file, named after its file stem, or
    ``NAME:PATH`` to name it. Read with ``data``'s keys unless ``prompt_key``/``answer_key``
    are set, tokenized like the training prompts. None = the held-out part of ``data.source``
    (the toy task's held-out stream for toy_math)."""
    prompt_key: str | None = None
    """The evaluation files' prompt field (see ``data.prompt_key``); None = data.prompt_key."""
    answer_key: str | None = None
    """The evaluation files' answer field (see ``data.answer_key``); None = data.answer_key."""
    num_problems: int = 64
    """Problems evaluated per set: the first ``num_problems`` of each file (at most the
    held-out part of ``data.source`` when ``source`` is None); 0 = all of each file (needs
    ``source`` with files only: the toy task has no end)."""
    num_samples: int = 4
    """Samples per problem (of every set not in ``samples_per_set``)."""
    samples_per_set: dict[str, int] = field(default_factory=dict)
    """Samples per problem of named sets, e.g. ``{gsm8k: 32, math500: 64, aime24: 512}`` (the
    paper's n); the others take ``num_samples``. A name that is not a set is an error."""
    temperature: float = 1.0
    max_new_tokens: int | None = None
    """None = rollout.max_new_tokens."""
    max_sequences_in_flight: int | None = None
    """Decoding budget of evaluation (sequences at once per data-parallel rank); None =
    rollout.max_sequences_in_flight."""

    def __post_init__(self):
        _non_negative(self.interval, "interval")
        _check(self.max_sequences_in_flight is None or self.max_sequences_in_flight > 0,
               "max_sequences_in_flight", f"must be > 0 or null, got {self.max_sequences_in_flight}")
        _non_negative(self.num_problems, "num_problems")
        if self.source is not None:
            _check(len(self.source) > 0 and all(isinstance(s, str) and s for s in self.source),
                   "source", "must be null or a non-empty list of toy_math / .jsonl / .parquet "
                   f"entries, got {self.source!r}")
        _check(self.num_problems > 0 or (self.source is not None and "toy_math" not in self.source),
               "num_problems", "0 (all problems) needs eval.source to list files only; set a "
               "number of problems")
        for key in ("prompt_key", "answer_key"):
            value = getattr(self, key)
            _check(value is None or bool(value.strip("|")), key, "must name a field or be null")
        _positive(self.num_samples, "num_samples")
        for name, n in self.samples_per_set.items():
            _check(isinstance(n, int) and n > 0, "samples_per_set",
                   f"{name}: must be a positive number of samples, got {n!r}")
        _positive(self.temperature, "temperature")

    def samples_of(self, set_name: str) -> int:
        """Samples per problem of the set named ``set_name``."""
        return self.samples_per_set.get(set_name, self.num_samples)


@dataclass
class CheckpointConfig:
    """dist_checkpointing saves of the student, optimizer, RNG, schedule and data position."""

    dir: str | None = None
    """None = <logging.output_dir>/<logging.run_name>/checkpoints."""
    interval: int = 50
    """Steps between saves; 0 = only at the end and on a stop signal."""
    resume: bool = True
    """Continue from the newest complete checkpoint in ``dir`` when there is one."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a successful save."""
    allow_config_change: bool = False
    """Resume even though settings that change what the run is (models, precision, data, loss,
    behavior and its schedule, optimizer, evaluation protocol, seeds) differ from the config saved
    in the checkpoint; the differences are appended to ``<run folder>/config_changes.jsonl``.
    False: such a resume stops with one line listing them. Logging, eval.interval,
    optim.max_steps, optim.micro_batch_size, the parallel layout and checkpoint.* may always
    change."""

    def __post_init__(self):
        _non_negative(self.interval, "interval")
        _positive(self.keep_last, "keep_last")


@dataclass
class LoggingConfig:
    """What the user sees and what is written."""

    run_name: str | None = None
    """The run folder's name under ``output_dir``. None: ``<rollout.behavior>-<student
    name>-from-<teacher name>`` (:func:`default_run_name`; the toy demo's is
    ``trb-toy-student-from-toy-teacher``), so runs of other models or methods never share a
    folder."""
    output_dir: str = "outputs"
    log_interval: int = 1
    tensorboard: bool = True
    jsonl: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        _check(self.run_name is None or bool(self.run_name.strip()), "run_name",
               "must not be empty (null: named after the method and the models)")
        _check(self.run_name is None or not (self.run_name.startswith("/") or ".." in
                                             self.run_name.split("/")), "run_name",
               f"must name a folder inside logging.output_dir, got {self.run_name!r}; set "
               "logging.output_dir for where runs go")
        _positive(self.log_interval, "log_interval")


@dataclass
class LauncherConfig:
    """Slurm submission (``trb-nemo launch slurm``)."""

    nodes: int = 1
    gpus_per_node: int = 8
    """GPUs requested per node (``--gpus-per-node``); 0 = a CPU job."""
    tasks_per_node: int | None = None
    """Ranks per node in ``srun`` mode; None = gpus_per_node (1 for a CPU job)."""
    launch_mode: str = "srun"
    """``srun``: one Slurm task per rank (srun forwards the warning signal to every rank);
    ``torchrun``: one task per node running torchrun with a c10d rendezvous on the first node."""
    partition: str | None = None
    account: str | None = None
    time_limit: str = "04:00:00"
    job_name: str = "trb-nemo"
    container_image: str | None = None
    """pyxis/enroot image (e.g. an .sqsh made from the Dockerfile); None = run in the submitting
    environment's Python."""
    container_mounts: list[str] = field(default_factory=list)
    container_workdir: str | None = None
    """Working directory inside the container (the project checkout there)."""
    env_passthrough: list[str] = field(default_factory=list)
    """Environment variables the job needs, by name (e.g. HF_TOKEN): checked at submission and
    passed from the submitting environment; their values are never written anywhere."""
    signal_seconds_before_end: int = 300
    """Slurm sends the warning signal this long before the time limit: the trainer checkpoints,
    the job requeues itself and resumes. 0 disables. It must cover what follows the signal: the
    rest of a training step (a rollout or an evaluation stops within seconds; scoring and the
    update do not) and a save; the paper's recipes set 900. Not with ``launch_mode=torchrun``
    (torchrun has no handler for it: it would die, and take its ranks down mid-save)."""
    stages: str = "one_job"
    """``one_job``: TRB warmup and pure OPD in one job; ``chained``: a warmup job of
    trb.warmup_steps steps, then an OPD job (``--dependency=afterok``) resuming its checkpoint."""
    stage2_overrides: list[str] = field(default_factory=list)
    """Extra a.b=c overrides of the OPD stage when chained (e.g. another parallel layout)."""
    stage2_nodes: int | None = None
    """Nodes of the OPD stage when chained; None = nodes."""
    exclusive: bool = True
    """Whole nodes (``--exclusive``): no other job shares their GPUs, CPUs, memory or network."""
    cpus_per_task: int | None = None
    """CPUs of each Slurm task (``--cpus-per-task``, also given to srun): of each rank in ``srun``
    mode, of each node's torchrun in ``torchrun`` mode. None = the node's allocated CPUs split
    evenly over its tasks at run time (with ``exclusive``, every CPU of the node)."""
    mem: str | None = "0"
    """Memory per node (``--mem``): ``0`` = all of the node's memory (right with ``exclusive``),
    or a size such as ``500G``; None = the cluster's default."""
    gpu_bind: str | None = "none"
    """``--gpu-bind`` of a GPU job: ``none`` = every rank sees all of its node's GPUs and uses
    ``cuda:LOCAL_RANK``, so NCCL keeps peer-to-peer (NVLink) paths between the ranks; None =
    leave it to the cluster. Per-task bindings (``closest``, ``single:1``, ``map_gpu:...``) hide
    the other GPUs from each rank and are refused."""
    env: dict[str, str] = field(default_factory=lambda: {
        "NCCL_DEBUG": "WARN", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    """Variables exported by the job script before srun (``export K=V``, values single-quoted:
    written literally, never expanded); add one with ``++launcher.env.NCCL_SOCKET_IFNAME=ib0``.
    ``OMP_NUM_THREADS`` set here replaces its default (one thread per CPU of a rank). Not for
    secrets: see env_passthrough. ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (as for
    the ranks ``trb-nemo train`` starts itself) lets the CUDA caching allocator grow segments
    instead of fragmenting while each step allocates and frees tens of GB of KV cache; give
    your own with ``launcher.env.PYTORCH_CUDA_ALLOC_CONF=...`` or drop it with
    ``~launcher.env.PYTORCH_CUDA_ALLOC_CONF``."""

    def __post_init__(self):
        _positive(self.nodes, "nodes")
        _non_negative(self.gpus_per_node, "gpus_per_node")
        if self.tasks_per_node is not None:
            _positive(self.tasks_per_node, "tasks_per_node")
        _one_of(self.launch_mode, ("srun", "torchrun"), "launch_mode")
        _one_of(self.stages, ("one_job", "chained"), "stages")
        _check(bool(self.job_name), "job_name", "must not be empty")
        _non_negative(self.signal_seconds_before_end, "signal_seconds_before_end")
        _check(not (self.launch_mode == "torchrun" and self.signal_seconds_before_end > 0),
               "signal_seconds_before_end", "the warning signal would reach torchrun, which has "
               "no handler for it and dies with its ranks mid-save; use launcher.launch_mode=srun "
               "(every rank gets the signal) or set launcher.signal_seconds_before_end=0")
        for name in self.env_passthrough:
            _check(name.isascii() and name.isidentifier(), "env_passthrough",
                   f"must list variable names, got {name!r}")
        if self.stage2_nodes is not None:
            _positive(self.stage2_nodes, "stage2_nodes")
        if self.cpus_per_task is not None:
            _positive(self.cpus_per_task, "cpus_per_task")
        if self.mem is not None:
            digits = self.mem[:-1] if self.mem[-1:] in tuple("KMGTkmgt") else self.mem
            _check(digits.isascii() and digits.isdigit(), "mem",
                   f"must be 0 (all of the node's memory) or a size such as 500G, got {self.mem!r}")
        if self.gpu_bind is not None:
            _check(self.gpu_bind in ("none", "verbose,none"), "gpu_bind", "must be none (every "
                   "rank sees its node's GPUs and uses cuda:LOCAL_RANK) or null (the cluster's "
                   f"default), got {self.gpu_bind!r}")
        for key in self.env:
            _check(key.isascii() and key.isidentifier(), "env",
                   f"keys must be shell variable names ([A-Za-z_][A-Za-z0-9_]*), got {key!r}")
            _check(not key.startswith("SLURM_"), "env", f"{key}: SLURM_* variables are Slurm's")
            _check(key not in self.env_passthrough, "env", f"{key} is in env_passthrough: a "
                   "secret is passed by name, its value never written")

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


# -------------------------------------------------------------------------------------- root


def check_same_vocab(student: ModelSpec, teacher: ModelSpec) -> None:
    """The reverse KL compares distributions id by id: both networks need one vocabulary."""
    _check(student.vocab_size == teacher.vocab_size, "model.teacher.vocab_size",
           f"teacher vocabulary {teacher.vocab_size} differs from the student's "
           f"{student.vocab_size}: student and teacher must share one tokenizer")


def default_run_name(cfg: TrainConfig) -> str:
    """``<rollout.behavior>-<student name>-from-<teacher name>``, made a folder name (the model
    names are their folders' names for HF models)."""
    import re

    teacher = cfg.model.teacher.name if cfg.model.teacher is not None else "none"
    name = f"{cfg.rollout.behavior}-{cfg.model.student.name}-from-{teacher}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


@dataclass
class TrainConfig:
    """``trb-nemo train``: the whole job. Cross-component rules are checked here."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trb: TRBConfig = field(default_factory=TRBConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    seed: int = 1234
    """Seed of everything not seeded above (Megatron's model-parallel RNG tracker included)."""

    def __post_init__(self):
        if self.logging.run_name is None:
            self.logging.run_name = default_run_name(self)
        for role in ("student", "teacher"):
            spec = getattr(self.model, role)
            if spec is not None and spec.hf_path is None and spec.checkpoint is None:
                self.check_model_fits(role, spec)  # the others once their architecture is read
        if self.model.teacher is not None and self.model.teacher.hf_path is None \
                and self.model.teacher.checkpoint is None and self.model.student.hf_path is None \
                and self.model.student.checkpoint is None:
            check_same_vocab(self.model.student, self.model.teacher)
        _check(self.model.teacher is not None, "model.teacher",
               f"rollout.behavior={self.rollout.behavior} distills from a teacher: set model.teacher")
        _check(not (self.parallel.sequence_parallel and self.parallel.tensor_model_parallel_size == 1), "parallel.sequence_parallel",
               "needs parallel.tensor_model_parallel_size > 1")
        _check(self.eval.max_new_tokens is None or self.eval.max_new_tokens > 0,
               "eval.max_new_tokens", f"must be > 0 or null, got {self.eval.max_new_tokens}")

    def check_model_fits(self, role: str, spec: ModelSpec) -> None:
        """ConfigError unless model.<role> fits the parallel layout, the context and the loss."""
        tp = self.parallel.tensor_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        groups = spec.num_query_groups or spec.num_attention_heads
        _check(spec.num_attention_heads % tp == 0 and groups % tp == 0,
               "parallel.tensor_model_parallel_size",
               f"TP={tp} must divide model.{role}.num_attention_heads="
               f"{spec.num_attention_heads} and its {groups} query groups")
        _check(spec.num_layers % pp == 0, "parallel.pipeline_model_parallel_size",
               f"PP={pp} must divide model.{role}.num_layers={spec.num_layers}")
        needed = self.data.max_prompt_length + self.rollout.max_new_tokens
        _check(needed <= spec.max_sequence_length, f"model.{role}.max_sequence_length",
               f"must be >= data.max_prompt_length + rollout.max_new_tokens = {needed}, "
               f"got {spec.max_sequence_length}")
        _check(self.loss.topk <= spec.vocab_size, "loss.topk",
               f"must be <= model.{role}.vocab_size={spec.vocab_size}, got {self.loss.topk}")
        m = self.model
        in_fp8 = m.fp8 is not None and (role == "student" or m.teacher_precision == "fp8")
        if in_fp8 and m.fp8_first_last_layers_bf16:
            per_stage = spec.num_layers // pp
            for name in ("fp8_layers_at_start_in_bf16", "fp8_layers_at_end_in_bf16"):
                _check(getattr(m, name) <= per_stage, f"model.{name}",
                       f"must be <= the {per_stage} layers per pipeline stage of model.{role} "
                       f"(num_layers={spec.num_layers}, PP={pp}), got {getattr(m, name)}")
