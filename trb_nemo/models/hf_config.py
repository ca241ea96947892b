"""HF ``config.json`` <-> :class:`ModelSpec` for the decoder families we convert.

Supported: Qwen3 (QK RMSNorm), Qwen2 (QKV biases) and Llama (optionally Llama-3.1 RoPE
scaling). All three are pre-norm RMSNorm decoders with RoPE, grouped-query attention and a
SwiGLU MLP, which is exactly what :func:`trb_nemo.models.gpt.build_gpt` builds. Anything else
(another architecture, a non-SiLU activation, sliding windows, other RoPE scalings, extra
biases) is refused with a :class:`ConfigError` naming what is supported. No torch import here:
this runs in the pre-flight, before any rank starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from trb_nemo.config.schema import ConfigError, ModelSpec

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
_MODEL_TYPE = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
# the only Llama-3 RoPE scaling Megatron-Core implements (rotary_pos_embedding._apply_scaling)
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def read_config_json(folder: str, key: str) -> dict:
    """The parsed ``folder/config.json``; ConfigError(key) when it is missing or not JSON."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(key, f"no config.json in {folder!r}; point it at an HF checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def first_id(value) -> int | None:
    """An HF ``eos_token_id`` (an int, a list of ints, or null) as one id: the first of a list
    (Qwen3 Instruct lists ``[151645, 151643]``: ``<|im_end|>``, its chat stop, comes first).
    trb-nemo stops each network on one id."""
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if value is not None else None


def model_eos_token_id(folder: str, hf: dict) -> tuple[int | None, str]:
    """(the model's own stop id, the file it came from): ``eos_token_id`` of
    ``folder/generation_config.json`` (what ``generate`` stops on), else of ``config.json``;
    None where neither names one."""
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        try:
            eos = first_id(json.loads(gen.read_text()).get("eos_token_id"))
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            eos = None
        if eos is not None:
            return eos, str(gen)
    return first_id(hf.get("eos_token_id")), str(Path(folder) / "config.json")


def architecture_of(hf: dict, key: str) -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(key, f"architecture {arch!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _rope(hf: dict, key: str) -> tuple[float, float | None]:
    """(rope_theta, llama3 scaling factor or None) from the v4 or v5 transformers layout."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    merged = {**scaling, **params}
    if rope_type == "llama3" and all(float(merged.get(k, -1)) == v for k, v in _LLAMA3_FIXED.items()):
        return float(theta), float(merged["factor"])
    raise ConfigError(key, f"RoPE scaling {rope_type!r} with {merged} is not supported; supported: "
                      f"none, or llama3 with {_LLAMA3_FIXED}")


def spec_from_hf_config(hf: dict, base: ModelSpec, key: str) -> ModelSpec:
    """``base`` with the architecture fields taken from an HF config (name, paths kept). Its
    ``eos_token_id`` is kept when set, else config.json's (see :func:`model_eos_token_id` for
    generation_config.json); ``max_sequence_length`` is ``max_position_embeddings``, capped by
    base's when set."""
    arch = architecture_of(hf, key)
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(key, f"hidden_act={hf['hidden_act']!r} is not supported; supported: silu")
    if hf.get("use_sliding_window"):
        raise ConfigError(key, "sliding-window attention is not supported; use a checkpoint with "
                          "use_sliding_window=false")
    if hf.get("mlp_bias") or (arch != "Qwen2ForCausalLM" and hf.get("attention_bias")):
        raise ConfigError(key, f"{arch} with attention_bias/mlp_bias is not supported")
    theta, factor = _rope(hf, key)
    heads = int(hf["num_attention_heads"])
    context = hf.get("max_position_embeddings")
    if context is None and base.max_sequence_length is None:
        raise ConfigError(key, "config.json has no max_position_embeddings; set the network's "
                          "max_sequence_length")
    if context is not None and base.max_sequence_length is not None:
        context = min(int(context), base.max_sequence_length)
    eos = base.eos_token_id if base.eos_token_id is not None else first_id(hf.get("eos_token_id"))
    try:
        return dataclasses.replace(
            base,
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=int(hf["hidden_size"]),
            ffn_hidden_size=int(hf["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            kv_channels=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            vocab_size=int(hf["vocab_size"]),
            max_sequence_length=int(context if context is not None else base.max_sequence_length),
            eos_token_id=eos,
            rotary_base=theta,
            rope_scaling_factor=factor,
            qk_layernorm=arch == "Qwen3ForCausalLM",
            qkv_bias=arch == "Qwen2ForCausalLM",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            normalization="RMSNorm",
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        )
    except ConfigError as e:
        raise ConfigError(f"{key}: {e.key}", e.reason) from None


def hf_architecture(spec: ModelSpec) -> str:
    """The HF class a spec exports as: Qwen3 (QK norm), Qwen2 (QKV bias), else Llama."""
    if spec.qk_layernorm and spec.qkv_bias:
        raise ValueError("no supported HF family has both QK norm and QKV biases")
    if spec.qk_layernorm:
        return "Qwen3ForCausalLM"
    return "Qwen2ForCausalLM" if spec.qkv_bias else "LlamaForCausalLM"


SOURCE_KEEPS = ("max_position_embeddings", "eos_token_id", "bos_token_id", "pad_token_id")
"""Keys of a source config.json that export writes as the source said (the spec's
max_sequence_length may be a training cap, its eos_token_id the first of a list)."""


def hf_config_from_spec(spec: ModelSpec, source: dict | None = None) -> dict:
    """A ``config.json`` that ``transformers`` loads as the same network. With ``source`` (the
    config.json the network came from): every key of it kept (``max_position_embeddings``,
    ``pad_token_id``, ``eos_token_id`` lists, ...), the architecture written from ``spec``."""
    arch = hf_architecture(spec)
    rope = {"rope_type": "default", "rope_theta": spec.rotary_base}
    if spec.rope_scaling_factor is not None:
        rope = {"rope_type": "llama3", "rope_theta": spec.rotary_base,
                "factor": spec.rope_scaling_factor, **_LLAMA3_FIXED}
    heads = spec.num_attention_heads
    config = {
        "architectures": [arch],
        "model_type": _MODEL_TYPE[arch],
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": spec.num_query_groups or heads,
        "head_dim": spec.kv_channels or spec.hidden_size // heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.max_sequence_length,
        "rms_norm_eps": spec.norm_epsilon,
        "rope_theta": spec.rotary_base,
        "rope_parameters": rope,
        "tie_word_embeddings": spec.tie_embeddings,
        "attention_bias": spec.qkv_bias,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": "float32",
    }
    if source is None:
        return config
    architecture = {k: v for k, v in config.items() if k not in (*SOURCE_KEEPS, "torch_dtype")}
    return {**source, **architecture}


def tokenizer_vocab(folder: str) -> dict | None:
    """token -> id of ``folder/tokenizer.json`` (added tokens included); None without one."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocab = dict(data.get("model", {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab


def check_hf_weights(folder: str, key: str) -> None:
    """``folder`` holds the weights of an HF checkpoint: ``*.safetensors`` files, or an index
    whose shards are all there; ConfigError(key) otherwise (read before any rank starts: no
    weights are loaded here)."""
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(key, f"{str(index)!r} is not a safetensors index (no weight_map)"
                              ) from None
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise ConfigError(key, f"{folder!r} misses {len(missing)} weight file(s) its index "
                              f"names (e.g. {missing[0]}); finish the download")
        return
    if not any(root.glob("*.safetensors")):
        found = sorted(p.name for p in root.glob("*.bin"))[:1]
        hint = (f" (it has PyTorch {found[0]}: re-save with safe_serialization=True)" if found
                else " (download the model's *.safetensors files into it)")
        raise ConfigError(key, f"{folder!r} has no *.safetensors weights{hint}")
