"""Ops on vocabulary-sharded logits: normalizers, global top-k, gather and log-probs at ids.
The shard layout is :mod:`trb_nemo.ops.shards`; sampling is :mod:`trb_nemo.ops.sampling`.

Shape legend: ``R`` rows (all leading dims flattened), ``V`` local vocab shard (= V_pad / TP),
``K`` top-k, ``P`` ranks in ``vocab_group``. Layout: rank i of ``vocab_group`` holds global
columns ``[i*V, (i+1)*V)``; ``vocab_group=None`` means the shard is the whole vocabulary.
``vocab_size`` is the true global vocabulary: columns at or beyond it are Megatron's padding
and are treated as probability zero everywhere. Inputs are never modified; math is fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from trb_nemo.ops.eos import StopMerge, stop_merge
from trb_nemo.ops.fused import is_fused
from trb_nemo.ops.shards import NEG_INF, group_size, row_chunks, shard_start, valid_columns


def as_fp32_masked(logits_RV: torch.Tensor, valid_V: torch.Tensor | None) -> torch.Tensor:
    """fp32 copy (or view for fp32 input without padding) with padded columns at -inf."""
    x = logits_RV.float()
    if valid_V is not None:
        x = x.masked_fill(~valid_V, NEG_INF)
    return x


def fp32_rows(z_RV: torch.Tensor, rows: slice, valid_V: torch.Tensor | None,
              merge: StopMerge | None = None) -> torch.Tensor:
    """Rows ``rows`` of a shard as an fp32 chunk with the EOS merge applied
    (:class:`~trb_nemo.ops.eos.StopMerge`) and padded columns at -inf: :func:`as_fp32_masked`
    of the canonical rows, one chunk-sized copy (a view for fp32 input that needs neither)."""
    if merge is None:
        return as_fp32_masked(z_RV[rows], valid_V)
    x = merge.patch_(z_RV[rows].to(torch.float32, copy=True), rows)
    return x if valid_V is None else x.masked_fill_(~valid_V, NEG_INF)


def all_gather_rows(local_RM: torch.Tensor, group) -> torch.Tensor:
    """[R, M] on each rank -> [P, R, M] on every rank (1 all-gather; identity without a group
    or with a group of one rank)."""
    if group is None or group_size(group) == 1:
        return local_RM.unsqueeze(0)
    p = group_size(group)
    out = local_RM.new_empty((p * local_RM.shape[0],) + tuple(local_RM.shape[1:]))
    dist.all_gather_into_tensor(out, local_RM.contiguous(), group=group)
    return out.view((p,) + tuple(local_RM.shape))


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, out of place (identity without a group or with one rank)."""
    if group is None or group_size(group) == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


# ------------------------------------------------------------------------- log-sum-exp stats


def local_lse_stats(x_RV: torch.Tensor) -> torch.Tensor:
    """[R, 2] (local max, sum exp(x - max)) of an fp32 shard; rows of all -inf give (-inf, 0)."""
    m_R = x_RV.amax(dim=-1)
    safe_R = torch.where(torch.isfinite(m_R), m_R, torch.zeros_like(m_R))
    s_R = torch.exp(x_RV - safe_R.unsqueeze(-1)).sum(dim=-1)
    return torch.stack([m_R, s_R], dim=-1)


def max_shift(m_PR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For sums each rank took relative to its own row maximum m: (global maximum M [R], scale
    exp(m - M) [P, R], 0 for a rank whose row is all -inf). NaN in m propagates to M."""
    big_R = m_PR.amax(dim=0)
    safe_R = torch.where(torch.isfinite(big_R), big_R, torch.zeros_like(big_R))
    scale_PR = torch.where(m_PR > NEG_INF, torch.exp(m_PR - safe_R), torch.zeros_like(m_PR))
    return big_R, scale_PR


def own_max_shift(z_RV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m [R, 1], z - m) in fp32 with the row's own maximum (no shift for an all -inf row). Plain
    torch, for use inside a row kernel."""
    z = z_RV.float()
    m = z.amax(-1, keepdim=True)
    return m, z - torch.where(torch.isfinite(m), m, 0.0)


class PairSums(NamedTuple):
    """Every rank's sums of one [R, V] student/teacher shard pair, taken relative to that rank's
    own row maxima, with what rescales them to the global maxima."""

    sums: torch.Tensor
    """[P, R, K] fp64, each rank's sums as its kernel returned them."""
    m_s: torch.Tensor
    """[R] global row maximum of z_S (NaN if a row holds NaN)."""
    scale_s: torch.Tensor
    """[P, R] exp(rank maximum - global maximum) for sums weighted by e^(z_S - max)."""
    m_t: torch.Tensor
    scale_t: torch.Tensor
    delta: torch.Tensor
    """[P, R] (b - a) with the global maxima minus (b - a) with the rank's own, where
    a = z_S - max, b = z_T - max; 0 on a rank without finite logits in the row."""


def gather_pair_sums(row_kernel, zs_RV, zt_RV, num_sums: int, group, read=None) -> PairSums:
    """Run ``row_kernel(zs, zt) -> [R, 2 + K]`` (the shard's own maxima of z_S and z_T, then K
    sums taken relative to them) over row chunks and gather it. ``read(rows)``: the kernel's
    arguments for rows ``rows`` instead of ``(zs_RV[rows], zt_RV[rows])`` (e.g. with the EOS
    merge, :func:`trb_nemo.ops.eos.kernel_operand`). A rank holding only padding contributes
    maxima -inf and zero sums. Collectives: 1 all-gather of [P, R, 2 + K]."""
    rows, width = zs_RV.shape
    if read is None:
        def read(c):
            return zs_RV[c], zt_RV[c]
    if width > 0 and rows > 0:
        local = torch.cat([row_kernel(*read(c))
                           for c in row_chunks(rows, width, is_fused(zs_RV.device),
                                               zs_RV.device)])
    else:
        local = torch.cat([torch.full((rows, 2), NEG_INF, device=zs_RV.device),
                           torch.zeros((rows, num_sums), device=zs_RV.device)], dim=-1)
    gathered = all_gather_rows(local, group).double()  # [R]-sized math in fp64
    m_s, scale_s = max_shift(gathered[..., 0])
    m_t, scale_t = max_shift(gathered[..., 1])
    delta = (gathered[..., 1] - m_t) - (gathered[..., 0] - m_s)
    delta = torch.where((scale_s > 0) & (scale_t > 0), delta, torch.zeros_like(delta))
    return PairSums(gathered[..., 2:], m_s, scale_s, m_t, scale_t, delta)


def combine_lse(stats_PR2: torch.Tensor) -> torch.Tensor:
    """Global log-sum-exp [R] from every rank's (max, sumexp); identical on every rank."""
    if stats_PR2.shape[0] == 1:  # one shard: its own maximum is the global one
        m_R = stats_PR2[0, :, 0]
        return torch.where(torch.isfinite(m_R), m_R, 0.0) + torch.log(stats_PR2[0, :, 1])
    big_R, scale_PR = max_shift(stats_PR2[..., 0])
    safe_R = torch.where(torch.isfinite(big_R), big_R, torch.zeros_like(big_R))
    return safe_R + torch.log((stats_PR2[..., 1] * scale_PR).sum(dim=0))


def logsumexp(logits: torch.Tensor, *, vocab_group=None, vocab_size: int | None = None) -> torch.Tensor:
    """log sum_v exp(z_v) over the full (true) vocabulary: [...] fp32.

    Collectives: 1 all-gather of [P, R, 2]. Peak memory: one fp32 [rows_chunk, V] temporary.
    """
    lead, v_local = logits.shape[:-1], logits.shape[-1]
    z_RV = logits.reshape(-1, v_local)
    valid = valid_columns(v_local, vocab_size, vocab_group, logits.device)
    return rows_lse(z_RV, valid, vocab_group).reshape(lead)


def rows_lse(z_RV: torch.Tensor, valid_V: torch.Tensor | None, group,
             merge: StopMerge | None = None) -> torch.Tensor:
    """Global log-sum-exp [R] of [R, V] shards (read EOS-merged with ``merge``), chunk by
    chunk. 1 all-gather of [P, R, 2]."""
    if z_RV.shape[0] == 0:
        return z_RV.new_zeros((0,), dtype=torch.float32)
    stats = torch.cat([local_lse_stats(fp32_rows(z_RV, c, valid_V, merge))
                       for c in row_chunks(z_RV.shape[0], z_RV.shape[-1], device=z_RV.device)])
    return combine_lse(all_gather_rows(stats, group))


def log_softmax(logits: torch.Tensor, *, vocab_group=None, vocab_size: int | None = None) -> torch.Tensor:
    """Local shard of log softmax over the full vocabulary: [..., V] fp32; padding is -inf.

    Collectives: 1 all-gather of [P, R, 2]. Memory: the fp32 output plus one chunk temporary.
    """
    lse = logsumexp(logits, vocab_group=vocab_group, vocab_size=vocab_size)
    valid = valid_columns(logits.shape[-1], vocab_size, vocab_group, logits.device)
    return as_fp32_masked(logits, valid) - lse.unsqueeze(-1)


# ----------------------------------------------------------------------- top-k and gathering


def topk(values: torch.Tensor, k: int, *, vocab_group=None, vocab_size: int | None = None,
         merge: StopMerge | None = None):
    """Global top-k over the vocabulary: (values [..., K] fp32, global ids [..., K] int64).

    Identical on every rank; sorted descending; ties go to the lower global id. ``merge``: of
    the EOS-canonical values (:func:`trb_nemo.ops.eos.stop_merge` of ``values`` as [R, V]).
    Collectives: 1 all-gather of [P, R, 2K] (values and ids, fp64 so ids stay exact). Memory:
    one fp32 [rows_chunk, V] temporary (rows in chunks), never an fp32 copy of the input.
    """
    lead, v_local = values.shape[:-1], values.shape[-1]
    true_vocab = vocab_size if vocab_size is not None else v_local * group_size(vocab_group)
    if not 0 < k <= true_vocab:
        raise ValueError(f"top-k needs 0 < k <= vocabulary size {true_vocab}, got k={k}")
    z_RV = values.reshape(-1, v_local)
    valid = valid_columns(v_local, vocab_size, vocab_group, values.device)
    parts = [_local_topk(fp32_rows(z_RV, c, valid, merge), k, vocab_group)
             for c in row_chunks(z_RV.shape[0], v_local, device=z_RV.device)]
    local = (torch.cat(parts) if parts else
             z_RV.new_zeros((0, 2 * min(k, v_local)), dtype=torch.float64))
    gathered_PRK2 = all_gather_rows(local, vocab_group)
    top_vals, top_ids = _merge_topk(gathered_PRK2, k)
    return top_vals.reshape(*lead, k), top_ids.reshape(*lead, k)


def _local_topk(x_RV: torch.Tensor, k: int, group) -> torch.Tensor:
    """This shard's top-min(k, V) as fp64 [R, 2K'] (values, then global ids: exact in fp64)."""
    val_RK, idx_RK = x_RV.topk(min(k, x_RV.shape[-1]), dim=-1, sorted=True)
    return torch.cat([val_RK.double(), (idx_RK + shard_start(x_RV.shape[-1], group)).double()],
                     dim=-1)


def _merge_topk(gathered_PRK2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's :func:`_local_topk` [P, R, 2K'] -> global (values [R, K] fp32, ids [R, K]
    int64), sorted descending, ties to the lower global id."""
    k_local = gathered_PRK2.shape[-1] // 2
    rows = gathered_PRK2.shape[1]
    vals_RN = gathered_PRK2[..., :k_local].permute(1, 0, 2).reshape(rows, -1)
    ids_RN = gathered_PRK2[..., k_local:].permute(1, 0, 2).reshape(rows, -1)
    # ties -> lower global id: sort by id first, then a stable sort by value
    order = ids_RN.argsort(dim=-1)
    vals_RN, ids_RN = vals_RN.gather(-1, order), ids_RN.gather(-1, order)
    order = vals_RN.argsort(dim=-1, descending=True, stable=True)[..., :k]
    return vals_RN.gather(-1, order).float(), ids_RN.gather(-1, order).long()


def logprobs_and_topk(logits_RV: torch.Tensor, ids_RJ: torch.Tensor, k: int, *, vocab_group=None,
                      vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's records in one collective: (log p at global ``ids_RJ`` [R, J] fp32,
    global top-k ids [R, K] int64), p the softmax over the true vocabulary. Equal to
    ``gather_at_ids(z, ids) - logsumexp(z)`` and ``topk(z, k)[1]`` (same ties), without
    gradient.

    Each rank packs its (max, sum exp(z - max)), its local top-k and its values at the ids it
    owns (-inf at the others) into one fp64 row. Collectives: 1 all-gather of
    [P, R, 2 + 2K' + J] (K' = min(k, V)).
    """
    rows, v_local = logits_RV.shape
    true_vocab = vocab_size if vocab_size is not None else v_local * group_size(vocab_group)
    if not 0 < k <= true_vocab:
        raise ValueError(f"top-k needs 0 < k <= vocabulary size {true_vocab}, got k={k}")
    x_RV = as_fp32_masked(logits_RV, valid_columns(v_local, vocab_size, vocab_group,
                                                   logits_RV.device))
    local_ids = ids_RJ - shard_start(v_local, vocab_group)
    mine = (local_ids >= 0) & (local_ids < v_local)
    at_ids = torch.where(mine, x_RV.gather(-1, local_ids.clamp(0, v_local - 1)), NEG_INF)
    packed = torch.cat([local_lse_stats(x_RV).double(), at_ids.double(),
                        _local_topk(x_RV, k, vocab_group)], dim=-1)
    gathered = all_gather_rows(packed, vocab_group)  # [P, R, 2 + J + 2K']
    j = ids_RJ.shape[-1]
    lse_R = combine_lse(gathered[..., :2])
    logprob_RJ = gathered[..., 2: 2 + j].amax(dim=0) - lse_R.unsqueeze(-1)
    return logprob_RJ.float(), _merge_topk(gathered[..., 2 + j:], k)[1]


def gather_at_ids(values: torch.Tensor, ids: torch.Tensor, *, vocab_group=None,
                  merge: StopMerge | None = None) -> torch.Tensor:
    """values[..., ids] at global ids: [..., K] fp32, identical on every rank. ``merge``: of
    the EOS-canonical values (:func:`trb_nemo.ops.eos.stop_merge` of ``values``).

    Each rank fills the ids it owns; 1 all-reduce(SUM) of [R, K]. Differentiable locally (the
    gradient lands on the owning rank's column; not through ``merge``'s columns).
    """
    v_local = values.shape[-1]
    local_ids = ids - shard_start(v_local, vocab_group)
    mine = (local_ids >= 0) & (local_ids < v_local)
    # gather, then widen: no fp32 copy of a bf16 [R, V] shard
    picked = values.gather(-1, local_ids.clamp(0, v_local - 1))
    if merge is not None:
        picked = merge.at_ids(picked, local_ids)
    picked = picked.float()
    picked = torch.where(mine, picked, torch.zeros_like(picked))
    if vocab_group is None:
        return picked
    return _AllReduceSum.apply(picked, vocab_group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group forward; the gradient passes through unchanged (each rank owns its part)."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None




def logprobs_at(
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
    stop_ids: tuple[int, int] | None = None,
) -> torch.Tensor:
    """log softmax of ``teacher_logits`` at global ``ids``: [..., K] fp32 (full-vocabulary
    normalization), no gradient: log pi_T at the student's top-k (the compact teacher
    statistic a rollout hands to the loss), or a network's log-prob of a drawn token. Collectives: 1 all-gather
    [P, R, 2] + 1 all-reduce(SUM) [R, K]. ``stop_ids``: EOS canonicalization (module
    docstring).
    """
    v = teacher_logits.shape[-1]
    zt_RV = teacher_logits.detach().reshape(-1, v)
    merge = stop_merge(zt_RV, stop_ids, vocab_group, weight=False)
    out = _logprobs_at(zt_RV, ids.reshape(zt_RV.shape[0], -1), vocab_group, vocab_size, merge)
    return out.reshape(ids.shape)


def _logprobs_at(z_RV, ids_RK, group, vocab_size, merge) -> torch.Tensor:
    """log softmax of the (EOS-merged) shards at global ids [R, K], fp32."""
    lse = rows_lse(z_RV, valid_columns(z_RV.shape[-1], vocab_size, group, z_RV.device), group,
                   merge)
    return gather_at_ids(z_RV, ids_RK, vocab_group=group, merge=merge) - lse.unsqueeze(-1)
