"""Megatron-Core GPTModel builders for the student and the teacher.

``local`` layer spec (plain torch modules) on CPU and wherever Transformer Engine is absent; the
Transformer Engine spec when ``model.transformer_impl=transformer_engine`` (GPU, FP8).
Architecture: pre-norm decoder, RoPE, SwiGLU MLP, no linear biases (the Qwen3/Llama shape).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from trb_nemo.config.schema import ConfigError, ModelConfig, ModelSpec, ParallelConfig
from trb_nemo.models.cached_attention import (
    CachedSelfAttention,
    DecodeColumnParallelLinear,
    DecodeRowParallelLinear,
)
from trb_nemo.models.shapes import VOCAB_PAD_MULTIPLE, padded_vocab_size  # noqa: F401 - re-exported
from trb_nemo.parallel.groups import ParallelGroups


def compute_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """fp32 or bf16; ``auto`` is bf16 on GPU and fp32 on CPU."""
    if model_cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[model_cfg.precision]


FP8_TOKEN_MULTIPLE = 16
"""Under FP8 the token dimension is padded to a multiple of this: Transformer Engine's FP8 GEMMs
need the token count divisible by 8 (forward) and by 16 (the weight-gradient GEMM, where it is
the reduction dimension); S a multiple of 16 makes b x S one for any micro batch size b."""


def fp8_padded_length(length: int, fp8: str | None, tensor_shards: int = 1) -> int:
    """The sequence length a network runs ``length`` tokens at: ``length`` without FP8 (``fp8``
    None), else rounded up to a multiple of 16 x ``tensor_shards`` (TP under sequence
    parallelism, where each rank holds S / TP positions)."""
    if fp8 is None:
        return length
    multiple = FP8_TOKEN_MULTIPLE * tensor_shards
    return -(-length // multiple) * multiple


def fp8_kwargs(model_cfg: ModelConfig) -> dict:
    """TransformerConfig's FP8 fields for ``model_cfg`` (``{"fp8": None}`` without FP8). Build
    the teacher from ``model_cfg.for_teacher()``, which clears ``fp8`` under
    ``teacher_precision=bf16``."""
    if model_cfg.fp8 is None:
        return {"fp8": None}
    return {
        "fp8": model_cfg.fp8,
        "fp8_recipe": model_cfg.fp8_recipe,
        "fp8_amax_history_len": model_cfg.fp8_amax_history_len,
        "fp8_amax_compute_algo": model_cfg.fp8_amax_compute_algo,
        "fp8_margin": model_cfg.fp8_margin,
        "first_last_layers_bf16": model_cfg.fp8_first_last_layers_bf16,
        "num_layers_at_start_in_bf16": model_cfg.fp8_layers_at_start_in_bf16,
        "num_layers_at_end_in_bf16": model_cfg.fp8_layers_at_end_in_bf16,
    }


def transformer_config(spec: ModelSpec, model_cfg: ModelConfig, parallel: ParallelConfig,
                       *, initialize: bool = True) -> TransformerConfig:
    """TransformerConfig for one network on the run's TP/PP layout.

    On CPU the fused kernels are off. ``initialize=False`` skips Megatron's random init (the
    caller fills the weights). ``calculate_per_token_loss``: the schedule sums the loss over
    microbatches and finalize_model_grads divides gradients by the global token count, which
    gives the token mean over the global batch on any DP/PP layout. FP8 settings come from
    :func:`fp8_kwargs` (pass ``model_cfg.for_teacher()`` for the teacher).
    """
    dtype = compute_dtype(model_cfg)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        normalization=spec.normalization,
        layernorm_epsilon=spec.norm_epsilon,
        qk_layernorm=spec.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=initialize,
        calculate_per_token_loss=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        attention_backend=AttnBackend.local if model_cfg.transformer_impl == "local" else AttnBackend.auto,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method=model_cfg.recompute_method,
        recompute_num_layers=model_cfg.recompute_num_layers,
        **fp8_kwargs(model_cfg),
    )


def layer_spec(spec: ModelSpec, model_cfg: ModelConfig):
    """Megatron's local or Transformer Engine layer spec, with the self-attention that can also
    decode from the rollout engine's per-sequence KV cache (:mod:`.cached_attention`; same
    parameters and checkpoints as Megatron's SelfAttention) and, in the local spec, the parallel
    linears with a lean decode forward (same parameters)."""
    if model_cfg.transformer_impl == "transformer_engine":
        try:
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )

            layer = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_layernorm)
        except ImportError as e:  # pragma: no cover - depends on the image
            raise ConfigError("model.transformer_impl", f"transformer_engine is not importable "
                              f"({e}); use model.transformer_impl=local") from None
    else:
        layer = get_gpt_layer_local_spec(qk_layernorm=spec.qk_layernorm,
                                         normalization=spec.normalization)
        attention = layer.submodules.self_attention.submodules
        attention.linear_qkv, attention.linear_proj = (DecodeColumnParallelLinear,
                                                       DecodeRowParallelLinear)
        mlp = layer.submodules.mlp  # functools.partial(MLP.as_mlp_submodule, submodules=...)
        layer.submodules.mlp = functools.partial(mlp.func, *mlp.args, **{
            **mlp.keywords, "submodules": dataclasses.replace(
                mlp.keywords["submodules"], linear_fc1=DecodeColumnParallelLinear,
                linear_fc2=DecodeRowParallelLinear)})
    layer.submodules.self_attention.module = CachedSelfAttention
    return layer


def build_gpt(spec: ModelSpec, model_cfg: ModelConfig, parallel: ParallelConfig,
              pg: ParallelGroups, *, initialize: bool = True) -> GPTModel:
    """This rank's stage of ``spec`` as a GPTModel on the layout ``pg`` (its groups are given to
    Megatron as the model's ``pg_collection``).

    Output logits are vocab-parallel: ``[s, b, V_pad / TP]`` on the last pipeline stage, where
    V_pad = padded_vocab_size(spec.vocab_size, TP); columns >= spec.vocab_size are padding.
    """
    model = GPTModel(
        config=transformer_config(spec, model_cfg, parallel, initialize=initialize),
        transformer_layer_spec=layer_spec(spec, model_cfg),
        vocab_size=padded_vocab_size(spec.vocab_size, parallel.tensor_model_parallel_size),
        max_sequence_length=spec.max_sequence_length,
        pre_process=pg.is_first_stage,
        post_process=pg.is_last_stage,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(spec.rotary_base),
        rope_scaling=spec.rope_scaling_factor is not None,
        rope_scaling_factor=spec.rope_scaling_factor or 8.0,
        parallel_output=True,
        pg_collection=pg.megatron,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def uses_transformer_engine(model) -> bool:
    """Whether any module of ``model`` is a Transformer Engine module (TE's FP8 weight caches and
    fp8_meta are then built by its first forward)."""
    return any(c.__module__.startswith("transformer_engine")
               for m in model.modules() for c in type(m).__mro__)


def fp8_scales_ready(model) -> bool:
    """Whether ``model`` may decode in FP8 under delayed scaling. Transformer Engine updates
    delayed-scaling scales only when an FP8 region exits with grad enabled (a training step),
    so before the first one (the step-0 evaluation and rollout of a run that starts from HF or
    converted weights) the scales are 1 and small weights fall into E4M3's subnormals: such a
    model decodes in bf16 until :func:`mark_fp8_scales_ready` (after its first training step,
    or after loading a training checkpoint, whose TE extra state holds the scales)."""
    return bool(getattr(model, "_trb_fp8_scales_ready", False))


def mark_fp8_scales_ready(model) -> None:
    """``model``'s delayed-scaling FP8 scales are calibrated (:func:`fp8_scales_ready`)."""
    model._trb_fp8_scales_ready = True
