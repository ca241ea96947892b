"""Per-prefix reverse KL(pi_S || pi_T) on vocabulary-sharded logits, with analytic backward.

The OPD objective (paper Sec. 1): L = E_h [ KL(pi_theta(.|h) || pi_T(.|h)) ] at the prefixes the
behavior policy visited; TRB leaves it unchanged and uses no importance weights.

* ``kind="full"``: exact, sum_v p_v (log p_v - log q_v). Backward dL/dz_v = p_v (log p_v -
  log q_v - L): exact, local, no collective.
* ``kind="topk"`` (paper default, k = 16): on the student's global top-k ids a_1..a_k with
  w_j = p(a_j) / sum_i p(a_i) (student probabilities renormalized on the set),
  L = sum_j w_j (log p(a_j) - log q(a_j)) with full-vocabulary log-probs (the paper's value).
  **Gradient used** (``gradient="support"``): the exact reverse-KL gradient of the renormalized
  student on the set, dL/dz_v = w_v (d_v - L) for v in K with d_v = log p_v - log q_v, and 0
  outside K. Why: differentiating the paper's value itself (or its policy-gradient form
  sum_j w_j d_j grad log p(a_j), what verl-style recipes compute) also gives every token outside
  K the gradient -p_v sum_j w_j d_j, which pushes mass *out* of the set wherever the student
  differs from the teacher; Adam's per-parameter normalization amplifies that into growing
  mass on tokens the teacher never emits (we measured the toy run's loss rising from 3 to 9
  nats with it). The support gradient moves mass only among the k candidates, towards the
  teacher, and equals the exact full-vocabulary gradient when K holds the whole vocabulary.
* :func:`reverse_kl_at_ids`: the same estimator at given global ids with precomputed teacher
  log-probs (what a rollout hands over), e.g. the top-k recorded while decoding. With the
  sampled token alone (k = 1, ``loss.kind=sampled``) the support gradient vanishes, so that
  form uses ``gradient="policy"``: the single-sample policy gradient d_x grad log p(x) (the
  per-token OPD reward of thunlp/OPD and verl), dL/dz_v = d_x ([v = x] - p_v).

Shape legend: ``R`` rows, ``V`` local vocab shard, ``K`` support size, ``P`` ranks of
``vocab_group``. Inputs are never modified; the math is fp32; gradients come back in the
student logits' dtype.
"""

from __future__ import annotations

import torch

from trb_nemo.ops.vocab_parallel import (
    all_gather_rows,
    all_reduce_sum,
    as_fp32_masked,
    combine_lse,
    gather_at_ids,
    local_lse_stats,
    row_chunks,
    rows_lse,
    shard_start,
    valid_columns,
)
from trb_nemo.ops.vocab_parallel import (
    topk as global_topk,
)


def _both_lse(zs_RV, zt_RV, valid, group):
    """Global log-normalizers of student and teacher rows: ([R], [R]). 1 all-gather [P, R, 4]."""
    chunks = [torch.cat([local_lse_stats(as_fp32_masked(zs_RV[c], valid)),
                         local_lse_stats(as_fp32_masked(zt_RV[c], valid))], dim=-1)
              for c in row_chunks(zs_RV.shape[0], zs_RV.shape[-1])]
    g = all_gather_rows(torch.cat(chunks), group)
    return combine_lse(g[..., 0:2]), combine_lse(g[..., 2:4])


def _kl_terms(zs, zt, lse_s, lse_t):
    """p [R, V] and p (log p - log q) [R, V] with 0 where p = 0 (padding, -inf student logits)."""
    lp = zs - lse_s.unsqueeze(-1)
    p = torch.exp(lp)
    diff = lp - (zt - lse_t.unsqueeze(-1))
    return p, torch.where(p > 0, p * diff, torch.zeros_like(p)), diff


class _FullReverseKL(torch.autograd.Function):
    """Exact reverse KL. Forward: 1 all-gather [P, R, 4] + 1 all-reduce(SUM) [R]. Backward: none.

    Saves only the inputs and [R] statistics; recomputes p chunk by chunk in backward, so the
    peak is the gradient [R, V] plus one chunk of fp32 temporaries.
    """

    @staticmethod
    def forward(ctx, zs_RV, zt_RV, valid, group):
        lse_s, lse_t = _both_lse(zs_RV, zt_RV, valid, group)
        kl = torch.empty(zs_RV.shape[0], dtype=torch.float32, device=zs_RV.device)
        for c in row_chunks(zs_RV.shape[0], zs_RV.shape[-1]):
            zs, zt = as_fp32_masked(zs_RV[c], valid), as_fp32_masked(zt_RV[c], valid)
            kl[c] = _kl_terms(zs, zt, lse_s[c], lse_t[c])[1].sum(-1)
        kl = all_reduce_sum(kl, group)
        ctx.save_for_backward(zs_RV, zt_RV, lse_s, lse_t, kl)
        ctx.valid = valid
        return kl

    @staticmethod
    def backward(ctx, grad_R):
        zs_RV, zt_RV, lse_s, lse_t, kl = ctx.saved_tensors
        grad = torch.empty_like(zs_RV)
        for c in row_chunks(zs_RV.shape[0], zs_RV.shape[-1]):
            zs, zt = as_fp32_masked(zs_RV[c], ctx.valid), as_fp32_masked(zt_RV[c], ctx.valid)
            p, _, diff = _kl_terms(zs, zt, lse_s[c], lse_t[c])
            g = p * (diff - kl[c].unsqueeze(-1))
            grad[c] = torch.where(p > 0, g, torch.zeros_like(g)) * grad_R[c].float().unsqueeze(-1)
        return grad, None, None, None


class _SupportReverseKL(torch.autograd.Function):
    """Reverse KL on a support of global ids with renormalized student weights (module docstring).

    Forward: 1 all-gather [P, R, 2] (student normalizer) + 1 all-reduce(SUM) [R, K] (student
    logits at the ids). Backward: local, no collective.
    """

    @staticmethod
    def forward(ctx, zs_RV, ids_RK, teacher_logprobs_RK, valid, group, gradient):
        lse_s = rows_lse(zs_RV, valid, group)
        lp_RK = gather_at_ids(zs_RV.detach(), ids_RK, vocab_group=group) - lse_s.unsqueeze(-1)
        w_RK = torch.softmax(lp_RK, dim=-1)
        diff_RK = lp_RK - teacher_logprobs_RK.float()
        value_R = (w_RK * diff_RK).sum(-1)
        if gradient == "support":  # w_v (d_v - L) on the ids, nothing elsewhere
            coef_RK, spread_R = w_RK * (diff_RK - value_R.unsqueeze(-1)), None
        else:  # policy: sum_j w_j d_j ([v = a_j] - p_v)
            coef_RK = w_RK * diff_RK
            spread_R = coef_RK.sum(-1)
        ctx.save_for_backward(zs_RV, ids_RK, lse_s, coef_RK,
                              spread_R if spread_R is not None else lse_s.new_zeros(0))
        ctx.valid, ctx.group, ctx.spread = valid, group, spread_R is not None
        return value_R

    @staticmethod
    def backward(ctx, grad_R):
        zs_RV, ids_RK, lse_s, coef_RK, spread_R = ctx.saved_tensors
        v_local = zs_RV.shape[-1]
        local_ids = ids_RK - shard_start(v_local, ctx.group)
        mine = (local_ids >= 0) & (local_ids < v_local)
        grad = torch.empty_like(zs_RV)
        for c in row_chunks(zs_RV.shape[0], v_local):
            if ctx.spread:
                zs = as_fp32_masked(zs_RV[c], ctx.valid)
                g = -torch.exp(zs - lse_s[c].unsqueeze(-1)) * spread_R[c].unsqueeze(-1)
            else:
                g = torch.zeros(zs_RV[c].shape, dtype=torch.float32, device=zs_RV.device)
            src = torch.where(mine[c], coef_RK[c], torch.zeros_like(coef_RK[c]))
            g.scatter_add_(-1, local_ids[c].clamp(0, v_local - 1), src)
            grad[c] = g * grad_R[c].float().unsqueeze(-1)
        return grad, None, None, None, None, None


def _flat_pair(student_logits, teacher_logits):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    v = student_logits.shape[-1]
    return student_logits.reshape(-1, v), teacher_logits.reshape(-1, v)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "full",
    topk: int = 16,
    vocab_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-prefix KL(pi_S || pi_T): [...] fp32, differentiable w.r.t. ``student_logits``.

    ``kind="full"`` is exact; ``kind="topk"`` is the paper's estimator on the student's global
    top-``topk`` support (gradient: module docstring). The teacher gets no gradient.
    ``kind="sampled"`` needs the sampled token: use :func:`reverse_kl_at_ids` with it.
    """
    zs_RV, zt_RV = _flat_pair(student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    valid = valid_columns(zs_RV.shape[-1], vocab_size, vocab_group, zs_RV.device)
    if kind == "full":
        return _FullReverseKL.apply(zs_RV, zt_RV.detach(), valid, vocab_group).reshape(lead)
    if kind == "topk":
        _, ids_RK = global_topk(zs_RV.detach(), topk, vocab_group=vocab_group, vocab_size=vocab_size)
        teacher_lp = teacher_logprobs_at(zt_RV.detach(), ids_RK, vocab_group=vocab_group,
                                         vocab_size=vocab_size)
        return _SupportReverseKL.apply(zs_RV, ids_RK, teacher_lp, valid, vocab_group,
                                       "support").reshape(lead)
    if kind == "sampled":
        raise ValueError("reverse_kl(kind='sampled') needs the sampled token ids: call "
                         "reverse_kl_at_ids(student_logits, ids[..., None], teacher_logprobs)")
    raise ValueError(f"kind must be full|topk|sampled, got {kind!r}")


def teacher_logprobs_at(
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log pi_T at global ids: [..., K] fp32 (full-vocabulary normalization), no gradient.

    The compact teacher statistic a rollout hands to the loss. Collectives: 1 all-gather
    [P, R, 2] + 1 all-reduce(SUM) [R, K].
    """
    v = teacher_logits.shape[-1]
    zt_RV = teacher_logits.detach().reshape(-1, v)
    lse_t = rows_lse(zt_RV, valid_columns(v, vocab_size, vocab_group, zt_RV.device), vocab_group)
    ids_RK = ids.reshape(zt_RV.shape[0], -1)
    out = gather_at_ids(zt_RV, ids_RK, vocab_group=vocab_group) - lse_t.unsqueeze(-1)
    return out.reshape(ids.shape)


def reverse_kl_at_ids(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
    gradient: str = "support",
) -> torch.Tensor:
    """Reverse-KL estimate on given global ids with precomputed teacher log-probs: [...] fp32.

    ``ids`` [..., K] int64 global token ids (e.g. the student's top-k recorded while decoding, or
    the sampled token with K = 1); ``teacher_logprobs`` [..., K] = log pi_T at those ids
    (full-vocabulary normalized). Weights are the student's probabilities renormalized on the
    ids. ``gradient``: ``support`` (as ``kind="topk"``) or ``policy`` (for a sampled token;
    module docstring).
    """
    v = student_logits.shape[-1]
    zs_RV = student_logits.reshape(-1, v)
    if ids.shape != teacher_logprobs.shape or ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"ids {tuple(ids.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must both be [..., K] over the "
                         f"student rows {tuple(student_logits.shape[:-1])}")
    if gradient not in ("support", "policy"):
        raise ValueError(f"gradient must be support|policy, got {gradient!r}")
    k = ids.shape[-1]
    valid = valid_columns(v, vocab_size, vocab_group, zs_RV.device)
    out = _SupportReverseKL.apply(zs_RV, ids.reshape(-1, k), teacher_logprobs.reshape(-1, k),
                                  valid, vocab_group, gradient)
    return out.reshape(student_logits.shape[:-1])
