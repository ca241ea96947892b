"""HF tensors <-> this rank's Megatron-Core parameters, for any TP/PP layout.

One table maps each Megatron parameter (local or Transformer Engine layer spec) to the HF
tensors it is made of. Import builds the full (TP=1) Megatron tensor from the HF tensors and
keeps this rank's TP slice; export all-gathers the slices over the TP group and splits the full
tensor back into HF tensors. Layers are numbered globally (``layer_number - 1``), so a pipeline
stage reads and writes only its own layers.

Full Megatron layouts (TP=1), with nq query heads, ng query groups, d head dim, h hidden:
* ``linear_qkv``: per group g, [q heads of g (nq/ng x d rows); k_g (d); v_g (d)]: [(nq+2ng) d, h].
  TP ranks hold contiguous groups, so a plain dim-0 chunk is the TP slice (biases likewise).
* ``linear_fc1``: [gate; up] at TP=1, but TP rank r holds [gate_r; up_r].
* embedding and output layer: rows padded to the padded vocabulary (padding rows are zero).
* ``linear_proj`` / ``linear_fc2``: row-parallel, sliced along dim 1.

Collectives (export): one all-gather over the TP group per TP-sharded parameter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from trb_nemo import seeds
from trb_nemo.config.schema import ConfigError, ModelSpec
from trb_nemo.models.shapes import _L, _heads, hf_shapes  # noqa: F401 - hf_shapes re-exported
from trb_nemo.parallel import comm


def _qkv_join(spec, q, k, v):
    nq, ng, d = _heads(spec)
    rest = q.shape[1:]
    parts = [q.reshape(ng, nq // ng * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _qkv_split(spec, w):
    nq, ng, d = _heads(spec)
    rest = w.shape[1:]
    g = w.reshape(ng, (nq // ng + 2) * d, *rest)
    q, k, v = torch.split(g, [nq // ng * d, d, d], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def _pad_rows(w, padded):
    return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])]) if padded > w.shape[0] else w


# (Megatron name suffix pattern within a layer or the model, HF names, join, split)
_LAYER_RULES = [
    (r"input_layernorm\.weight|self_attention\.linear_qkv\.layer_norm_weight",
     ["input_layernorm.weight"], None, None),
    (r"self_attention\.linear_qkv\.weight",
     ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
     _qkv_join, _qkv_split),
    (r"self_attention\.linear_qkv\.bias",
     ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
     _qkv_join, _qkv_split),
    (r"self_attention\.q_layernorm\.weight", ["self_attn.q_norm.weight"], None, None),
    (r"self_attention\.k_layernorm\.weight", ["self_attn.k_norm.weight"], None, None),
    (r"self_attention\.linear_proj\.weight", ["self_attn.o_proj.weight"], None, None),
    (r"pre_mlp_layernorm\.weight|mlp\.linear_fc1\.layer_norm_weight",
     ["post_attention_layernorm.weight"], None, None),
    (r"mlp\.linear_fc1\.weight", ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
     lambda spec, g, u: torch.cat([g, u]), lambda spec, w: list(w.chunk(2))),
    (r"mlp\.linear_fc2\.weight", ["mlp.down_proj.weight"], None, None),
]
_LAYER_RE = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


def hf_names(name: str, spec: ModelSpec, layer_offset: int):
    """(HF tensor names, join, split) of one Megatron parameter name; KeyError when unknown."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"], None, None
    if name == "output_layer.weight":
        return ["model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"], None, None
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"], None, None
    m = _LAYER_RE.fullmatch(name)
    if m:
        prefix = _L.format(layer_offset + int(m.group(1)))
        for pattern, names, join, split in _LAYER_RULES:
            if re.fullmatch(pattern, m.group(2)):
                return [prefix + n for n in names], join, split
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def layer_offset(model) -> int:
    """Global index of this stage's first layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _tp(group):
    return comm.group_size(group), comm.group_rank(group)


def _local_slice(name, param, full, group):
    """This rank's TP slice of a full (TP=1 layout) Megatron tensor."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    size, rank = _tp(group)
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return full.chunk(size, dim=param.partition_dim)[rank]


def _full_tensor(name, param, group):
    """The full (TP=1 layout) tensor of a parameter: all-gather over TP when it is sharded."""
    local = param.detach()
    if not getattr(param, "tensor_model_parallel", False):
        return local.clone()
    parts = comm.all_gather(local, group)
    if name.endswith("mlp.linear_fc1.weight"):
        halves = [p.chunk(2) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim=param.partition_dim)


@torch.no_grad()
def load_hf_tensors(model, spec: ModelSpec, get, tp_group) -> None:
    """Fill every parameter of this rank's stage from ``get(hf_name) -> full fp32 tensor``."""
    offset = layer_offset(model)
    for name, param in model.named_parameters():
        names, join, _ = hf_names(name, spec, offset)
        tensors = [get(n) for n in names]
        full = join(spec, *tensors) if join else tensors[0]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            padded = param.shape[0] * (_tp(tp_group)[0])
            full = _pad_rows(full, padded)
        local = _local_slice(name, param, full, tp_group)
        if local.shape != param.shape:
            raise ValueError(f"{name}: HF tensors {names} give {tuple(local.shape)} on this rank, "
                             f"the model expects {tuple(param.shape)}")
        param.copy_(local.to(param.dtype))


def hf_tensors(model, spec: ModelSpec, tp_group) -> dict[str, torch.Tensor]:
    """This stage's parameters as full HF tensors (fp32, vocab padding removed). Collective over
    the TP group: every TP rank calls it; all get the same dict. A tied output layer is skipped."""
    offset = layer_offset(model)
    out = {}
    for name, param in model.named_parameters():
        names, _, split = hf_names(name, spec, offset)
        full = _full_tensor(name, param, tp_group).float()
        if name == "output_layer.weight" and spec.tie_embeddings:
            continue
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            full = full[: spec.vocab_size]
        for n, t in zip(names, split(spec, full) if split else [full], strict=True):
            out[n] = t.contiguous()
    return out


def random_hf_tensor(name: str, shape, seed: int) -> torch.Tensor:
    """Layout-independent random init of one HF tensor: N(0, 0.02) weights, unit norms, small
    biases; its own generator keyed by (seed, name), so every TP/PP layout gets the same model."""
    gen = torch.Generator().manual_seed(seeds.init_tensor(seed, name))
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen) * 0.01
    return torch.randn(shape, generator=gen) * 0.02


class SafetensorsReader:
    """Lazy reader of an HF checkpoint folder (one file or an index of shards)."""

    def __init__(self, folder: str, key: str = "hf_path"):
        from safetensors import safe_open

        root = Path(folder)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(root.glob("*.safetensors"))
            if not files:
                raise ConfigError(key, f"no *.safetensors in {folder!r} (PyTorch .bin checkpoints "
                                  "are not read: re-save with safe_serialization=True)")
            weight_map = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self._root, self._map, self._open = root, weight_map, safe_open

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._map:
            raise KeyError(f"HF checkpoint {self._root} has no tensor {name!r}")
        with self._open(self._root / self._map[name], framework="pt") as h:
            return h.get_tensor(name).float()
