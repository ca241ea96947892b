"""The tensors of a network, from its :class:`~trb_nemo.config.schema.ModelSpec` alone (no torch:
the memory planner and the pre-flight use it before any rank starts)."""

from __future__ import annotations

from trb_nemo.config.schema import ModelSpec

_L = "model.layers.{}."

VOCAB_PAD_MULTIPLE = 128
"""Megatron pads the embedding rows to a multiple of this times TP."""


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int) -> int:
    """Smallest multiple of 128 x TP that is >= vocab_size (Megatron's make-vocab-divisible rule)."""
    multiple = VOCAB_PAD_MULTIPLE * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def _heads(spec: ModelSpec) -> tuple[int, int, int]:
    nq = spec.num_attention_heads
    return nq, spec.num_query_groups or nq, spec.kv_channels or spec.hidden_size // nq


def hf_shapes(spec: ModelSpec) -> dict[str, tuple]:
    """Shape of every HF tensor of a spec (the HF checkpoint's state dict)."""
    nq, ng, d = _heads(spec)
    h, f, v = spec.hidden_size, spec.ffn_hidden_size, spec.vocab_size
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(spec.num_layers):
        p = _L.format(i)
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq * d, h), p + "self_attn.k_proj.weight": (ng * d, h),
            p + "self_attn.v_proj.weight": (ng * d, h), p + "self_attn.o_proj.weight": (h, nq * d),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if spec.qk_layernorm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        if spec.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (nq * d,),
                           p + "self_attn.k_proj.bias": (ng * d,),
                           p + "self_attn.v_proj.bias": (ng * d,)})
    return shapes
