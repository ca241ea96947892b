"""Self-attention that can decode from a per-sequence KV cache (the rollout engine's).

Megatron's static inference context keeps one sequence offset for the whole batch, and its
dynamic context needs flash-attn; neither lets a finished sequence leave and a new one join at
its own length on CPU and GPU alike. :class:`CachedSelfAttention` is Megatron's
``SelfAttention`` (same parameters, same checkpoints, local or Transformer Engine linears) with
one more path: while a :class:`CacheStep` is active (:func:`active`), it takes each fed token's
(slot, position) from the step, rotates q and k by the token's own position, writes k and v
into the step's cache and attends over the slot's prefix with a causal mask. Outside a step
it is exactly ``SelfAttention`` (training, scoring, teacher-forced recomputation).

Layout of a step (``L`` positions of ``B`` rows, Megatron's [s, b, ...] order): row ``b``
holds slot ``slot_lo + b``; its token ``l`` sits at position ``positions_LB[l, b]``; padding
tokens sit at the cache's scratch position (its last), so every write is one index_put with
no boolean mask (no device sync), and their outputs are ignored. Attention (:func:`attend`)
reads each row's own keys: PyTorch's SDPA with grouped-query heads folded into the query length
(its fused kernels on CPU and CUDA, never the math fallback) over runs of rows of similar
lengths (:func:`segments`), or flash-attn's KV-cache kernel with per-row lengths where a CUDA
decode step can use it; everything else is one code path on CPU and GPU.

:class:`DecodeColumnParallelLinear` and :class:`DecodeRowParallelLinear` are Megatron's local
(non-Transformer-Engine) parallel linears with a lean forward while a step is active: the
same matmul (``x @ W^T``), the same TP all-reduce of the row-parallel output (through
:mod:`trb_nemo.parallel.comm`), the same bias handling, without the training machinery
(autograd function, gradient-accumulation and async-communication checks) that costs more than
the matmul at decode sizes. Transformer Engine's linears (GPU, FP8) are used as they are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention

from trb_nemo.parallel import comm

SEGMENT_COST = 256
"""What one more attention call costs, in key positions x rows read (launch and loop overhead):
:func:`segments` splits rows only where that saves more than this."""


def segments(key_lens: list[int], length: int) -> tuple[tuple[int, int, int, bool], ...]:
    """Split rows [0, B) into contiguous runs (lo, hi, keys, masked) that each attend over their
    longest
    row's keys, so that the keys read follow the sum of the rows' own lengths and not B x the
    longest: a row joins the current run unless reading its run at the run's new length costs
    more than a run of its own plus :data:`SEGMENT_COST`. ``key_lens[b]``: keys row b reads
    (host ints: its position after this step + 1); ``length``: tokens fed per row. One run when
    the lengths are alike. ``masked``: the run needs the causal mask (several tokens per row, or
    rows of different lengths); a run of equal lengths fed one token each sees all its keys."""
    runs, lo, longest = [], 0, key_lens[0]
    for b in range(1, len(key_lens)):
        n, k = b - lo, key_lens[b]
        joined = (n + 1) * max(longest, k)
        apart = n * longest + k + SEGMENT_COST
        if joined > apart:
            runs.append((lo, b, longest))
            lo, longest = b, k
        else:
            longest = max(longest, k)
    runs.append((lo, len(key_lens), longest))
    return tuple((lo, hi, k, length > 1 or any(n != k for n in key_lens[lo:hi]))
                 for lo, hi, k in runs)


@dataclass
class CacheStep:
    """One forward of a network through its KV cache (see the module docstring).

    ``keys``/``values``: layer number -> [slots, max_len + 1, kv_heads / TP, head_dim] of this
    stage's layers (allocated by the cache); ``cos_LB1D``/``sin_LB1D``: cos and sign x sin of
    each fed token's RoPE angles in the model's dtype, the sign -1 on the first half of the
    rotary channels (computed once per forward, for every layer); ``rope_swap`` [D]: the
    rotary channels' halves swapped (D/2 .. D-1, 0 .. D/2-1);
    ``mask_B1LK``: key j visible to token l of row b (j <= its position), K the longest run's
    keys; ``runs``: (lo, hi, keys, masked) row runs (:func:`segments`), each attending over its
    own keys; ``slots_LB``: the slot of each fed token (``slot_lo + b``); ``seqlens_B`` [B] int32:
    when set, every row feeds all L tokens and attention is flash-attn's KV-cache kernel over
    each row's first ``seqlens_B[b]`` keys (the runs are ignored).
    """

    keys: dict
    values: dict
    slot_lo: int
    positions_LB: torch.Tensor
    cos_LB1D: torch.Tensor
    sin_LB1D: torch.Tensor
    mask_B1LK: torch.Tensor
    runs: tuple
    slots_LB: torch.Tensor
    rope_swap: torch.Tensor
    seqlens_B: torch.Tensor | None = None


_ACTIVE: list[CacheStep] = []


@contextlib.contextmanager
def active(step: CacheStep):
    """Within this block every CachedSelfAttention decodes through ``step``."""
    _ACTIVE.append(step)
    try:
        yield step
    finally:
        _ACTIVE.pop()


def _rotate(t: torch.Tensor, step: CacheStep) -> torch.Tensor:
    """RoPE as Megatron applies it unfused (non-interleaved halves): t cos + rotate_half(t) sin
    on the first rot_dim channels, each token at its own position. rotate_half(x) =
    (-x2, x1) is written x[swap] * sign, the sign folded into the step's ``sin_LB1D``."""
    rot = step.cos_LB1D.shape[-1]
    if rot == t.shape[-1]:
        return t * step.cos_LB1D + t[..., step.rope_swap] * step.sin_LB1D
    x, rest = t[..., :rot], t[..., rot:]
    return torch.cat((x * step.cos_LB1D + x[..., step.rope_swap] * step.sin_LB1D, rest), dim=-1)


def flash_kv_kernel():
    """flash-attn's ``flash_attn_with_kvcache`` where it is installed (CUDA builds), else None."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_with_kvcache


def attend(query_LBhd, cache_k, cache_v, step: CacheStep, scale: float) -> torch.Tensor:
    """Attention of the fed queries [L, B, np, hn] over their slots' cached keys and values
    ([slots, max_len + 1, ng, hn] each, the fed tokens already written): [L, B, np * hn].

    Grouped-query heads are never repeated: query head h = g * (np / ng) + r belongs to KV
    group g (Megatron's grouping), so each group's np / ng query heads are folded into the
    query length, [B, ng, (np / ng) L, hn] against [B, ng, K, hn]; PyTorch's SDPA then needs
    neither ``enable_gqa`` nor a repeat, and picks its fused kernels (flash or memory-efficient
    on CUDA, flash on CPU) instead of the math fallback. Each run of rows reads only its own
    keys (views of the cache, no gather); a run of equal lengths decoding one token needs no
    mask. With ``step.seqlens_B``: flash-attn's KV-cache kernel, which reads each row's own
    prefix (no padding to the longest)."""
    length, rows, heads, dim = query_LBhd.shape
    groups = cache_k.shape[2]
    rep = heads // groups
    lo_slot = step.slot_lo
    if step.seqlens_B is not None:
        kernel = flash_kv_kernel()
        out = kernel(query_LBhd.transpose(0, 1), cache_k[lo_slot: lo_slot + rows],
                     cache_v[lo_slot: lo_slot + rows], cache_seqlens=step.seqlens_B,
                     softmax_scale=scale, causal=True)  # [B, L, np, hn]
        return out.transpose(0, 1).reshape(length, rows, heads * dim)
    # [L, B, ng, rep, hn] -> [B, ng, rep, L, hn] -> [B, ng, rep L, hn]
    q = query_LBhd.view(length, rows, groups, rep, dim).permute(1, 2, 3, 0, 4)
    parts = []
    for lo, hi, keys, masked in step.runs:
        n = hi - lo
        k = cache_k[lo_slot + lo: lo_slot + hi, :keys].transpose(1, 2)  # [n, ng, K, hn] (view)
        v = cache_v[lo_slot + lo: lo_slot + hi, :keys].transpose(1, 2)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        mask = None
        if masked:
            m = step.mask_B1LK[lo:hi, :, :, :keys]  # [n, 1, L, K]
            mask = m[:, :, None].expand(n, 1, rep, length, keys).reshape(
                n, 1, rep * length, keys)
        o = F.scaled_dot_product_attention(q[lo:hi].reshape(n, groups, rep * length, dim), k, v,
                                           attn_mask=mask, scale=scale)
        parts.append(o)
    out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [B, ng, rep L, hn]
    # -> [L, B, ng, rep, hn] -> [L, B, np hn]
    return out.view(rows, groups, rep, length, dim).permute(3, 0, 1, 2, 4).reshape(
        length, rows, heads * dim)


class CachedSelfAttention(SelfAttention):
    """``SelfAttention`` plus the per-sequence cache path (module docstring)."""

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        if not _ACTIVE:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        step = _ACTIVE[-1]
        if self.config.rotary_interleaved or self.config.multi_latent_attention:
            raise NotImplementedError("the cached decode path rotates non-interleaved RoPE halves")
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        # query [L, B, np, hn]; key, value [L, B, ng, hn]: this rank's heads
        query, key = _rotate(query, step), _rotate(key, step)
        cache_k, cache_v = step.keys[self.layer_number], step.values[self.layer_number]
        if key.dtype != cache_k.dtype:  # the cache is in the model's dtype
            key, value = key.to(cache_k.dtype), value.to(cache_v.dtype)
        cache_k[step.slots_LB, step.positions_LB] = key
        cache_v[step.slots_LB, step.positions_LB] = value
        scale = self.config.softmax_scale or self.hidden_size_per_attention_head ** -0.5
        return self.linear_proj(attend(query, cache_k, cache_v, step, scale))


class DecodeColumnParallelLinear(ColumnParallelLinear):
    """Megatron's ColumnParallelLinear; lean inside a cache step (module docstring): returns
    (x @ W^T [+ bias], bias if ``skip_bias_add`` else None), this rank's output columns."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        return column_linear(self, input_, weight, runtime_gather_output)


def column_linear(module: ColumnParallelLinear, input_, weight=None, runtime_gather_output=None):
    """``module(input_, weight, runtime_gather_output)`` for a Megatron ColumnParallelLinear
    (GPTModel's output layer included), lean inside a cache step (module docstring)."""
    if type(module) not in (ColumnParallelLinear, DecodeColumnParallelLinear):  # e.g. TE's
        return module(input_, weight=weight, runtime_gather_output=runtime_gather_output)
    gather = module.gather_output if runtime_gather_output is None else runtime_gather_output
    if not _ACTIVE or torch.is_grad_enabled() or module.sequence_parallel or gather:
        return ColumnParallelLinear.forward(module, input_, weight, runtime_gather_output)
    out = torch.matmul(input_, (module.weight if weight is None else weight).t())
    if module.bias is not None and not module.skip_bias_add:
        return out + module.bias, None
    return out, module.bias if module.skip_bias_add else None


class DecodeRowParallelLinear(RowParallelLinear):
    """Megatron's RowParallelLinear; lean inside a cache step (module docstring): the partial
    products x_i @ W_i^T summed over TP (1 all-reduce of the output when TP > 1), then the
    bias as Megatron adds it."""

    def forward(self, input_):
        if (not _ACTIVE or torch.is_grad_enabled() or self.sequence_parallel
                or not self.input_is_parallel or self.explicit_expert_comm):
            return super().forward(input_)
        out = torch.matmul(input_, self.weight.t())
        if self.config.tensor_model_parallel_size > 1:
            out = comm.all_reduce(out, self.tp_group)
        if not self.skip_bias_add:
            return (out + self.bias if self.bias is not None else out), None
        return out, self.bias
