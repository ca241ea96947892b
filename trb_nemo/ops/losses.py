"""Per-prefix reverse KL(pi_S || pi_T) on vocabulary-sharded logits, with analytic backward.

The OPD objective (paper Sec. 1): L = E_h [ KL(pi_theta(.|h) || pi_T(.|h)) ] at the prefixes the
behavior policy visited; TRB leaves it unchanged and uses no importance weights.

* ``kind="full"``: exact, sum_v p_v (log p_v - log q_v). Backward dL/dz_v = p_v (log p_v -
  log q_v - L): exact, local, no collective. Two row kernels (:mod:`trb_nemo.ops.fused`):
  forward reads the logits once, backward once and writes the gradient.
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

EOS canonicalization (``stop_ids=(keep_id, drop_id)`` of every loss, :mod:`trb_nemo.ops.eos`):
the loss reads its logits (student and teacher) as :func:`~trb_nemo.ops.eos.canonicalize` would
make them, with the same values and gradient, without the copy: the merge is index arithmetic on
the two columns inside the row passes (in a chunk copy eagerly, in registers fused), and its
backward rewrites two columns of the gradient in place. Collectives: 1 all-reduce(MAX) of [R]
per logits operand forward, 1 all-reduce(SUM) of [R] backward.

Memory (forward + backward, beyond the inputs): the gradient [R, V] (student dtype, written
once), [R]-sized statistics, and fp32 temporaries of one row chunk
(:data:`~trb_nemo.ops.shards.ROW_CHUNK_BYTES` each, a few alive at once; fused kernels
hold none). No fp32 or canonical copy of the logits; Veto's target logits x are one [R, V]
tensor. tests/unit/test_loss_memory.py measures it.

Shape legend: ``R`` rows, ``V`` local vocab shard, ``K`` support size, ``P`` ranks of
``vocab_group``. Inputs are never modified; the math is fp32; gradients come back in the
student logits' dtype.
"""

from __future__ import annotations

import math

import torch

from trb_nemo.ops.eos import StopMerge, kernel_operand, read_fp32, stop_merge
from trb_nemo.ops.fused import is_fused, kernel
from trb_nemo.ops.shards import flat_pair, row_chunks, shard_start, valid_columns, valid_count
from trb_nemo.ops.vocab_parallel import (
    _logprobs_at,
    fp32_rows,
    gather_at_ids,
    gather_pair_sums,
    own_max_shift,
    rows_lse,
)
from trb_nemo.ops.vocab_parallel import topk as global_topk

# a = z_S - m_s, b = z_T - m_t with the global row maxima (as in trust_region); over supp p,
# log p - log q = (a - b) - (log_s - log_t) with log_s = log sum e^a, log_t = log sum e^b.
# The forward kernels read each logits operand as (z, stops, keep): eos.kernel_operand/read_fp32
# apply the EOS merge. The gradient kernels read the raw logits: the merge changes only the keep
# and drop columns, which _gradient then rewrites from [R] values.


def _wants_grad(z: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and z.requires_grad


def _operands(zs_RV, s_merge, zt_RV, t_merge):
    """``read(rows)``: the row kernels' arguments (zs, stops, keep, zt, stops, keep)."""
    fused = is_fused(zs_RV.device)

    def read(rows):
        return (*kernel_operand(zs_RV, rows, s_merge, fused),
                *kernel_operand(zt_RV, rows, t_merge, fused))

    return read


@kernel
def _kl_sums(zs_RV, s_stops, s_keep, zt_RV, t_stops, t_keep):
    """[R, 5] of one shard, in one read of it: m_s, m_t (the shard's maxima), then with them
    sums of e^a, e^b and e^a (a - b) over supp p."""
    m_s, a = own_max_shift(read_fp32(zs_RV, s_stops, s_keep))
    m_t, b = own_max_shift(read_fp32(zt_RV, t_stops, t_keep))
    es = torch.exp(a)
    # off supp p: 0 * (-inf or NaN) = NaN -> 0; where q = 0 < p: +inf stays (KL = inf)
    term = torch.nan_to_num(es * (a - b), nan=0.0, posinf=math.inf, neginf=-math.inf)
    return torch.stack([m_s[:, 0], m_t[:, 0], es.sum(-1), torch.exp(b).sum(-1), term.sum(-1)],
                       dim=-1)


@kernel
def _kl_grad(zs_RV, zt_RV, row_R4, grad_R1, n_valid_1=None):
    """dL/dz_S = g p (log p - log q - L), 0 off supp p, in the student logits' dtype.
    row: (m_s, m_t, log_s, log_s - log_t + L). ``n_valid_1`` [1]: columns from it on are
    padding (gradient 0)."""
    a = zs_RV.float() - row_R4[:, 0:1]
    b = zt_RV.float() - row_R4[:, 1:2]
    p = torch.exp(a - row_R4[:, 2:3])
    # off supp p: 0 * (-inf or NaN) = NaN -> 0 (arithmetic: a bool-mask where is slower on CPU)
    g = torch.nan_to_num(p * ((a - b) - row_R4[:, 3:4]), nan=0.0, posinf=math.inf,
                         neginf=-math.inf) * grad_R1
    return _valid_only(g, n_valid_1).to(zs_RV.dtype)


def _valid_only(g_RV, n_valid_1):
    """g with the columns from ``n_valid_1`` on set to 0 (None: all columns are real)."""
    if n_valid_1 is None:
        return g_RV
    return torch.where(torch.arange(g_RV.shape[-1], device=g_RV.device) < n_valid_1, g_RV, 0.0)


def _kl_of_shards(zp_RV, zq_RV, n_valid, group, p_merge=None, q_merge=None):
    """KL(softmax(z_p) || softmax(z_q)) per row [R] (fp64) from vocab-parallel shards (read
    EOS-merged with ``p_merge``/``q_merge``), with the global maxima M_p, M_q and
    log sum e^(z - M) of both: (kl, M_p, M_q, log_s_p, log_s_q).
    One pass (:func:`_kl_sums`), 1 all-gather of [P, R, 5]."""
    zp_RV, zq_RV = zp_RV[:, :n_valid], zq_RV[:, :n_valid]
    ps = gather_pair_sums(_kl_sums, zp_RV, zq_RV, 3, group,
                          _operands(zp_RV, p_merge, zq_RV, q_merge))
    s_p, s_q, a_minus_b = (ps.sums[..., k] for k in range(3))
    # each rank's a - b used its own maxima: (a - b)_global = (a - b)_local - delta
    a_minus_b = ((a_minus_b - ps.delta * s_p) * ps.scale_s).sum(0)
    s_p, s_q = (s_p * ps.scale_s).sum(0), (s_q * ps.scale_t).sum(0)
    log_p, log_q = torch.log(s_p), torch.log(s_q)
    return a_minus_b / s_p - log_p + log_q, ps.m_s, ps.m_t, log_p, log_q


def _gradient(row_kernel, zs_RV, s_merge, zt_RV, t_merge, n, rows_R4, grad_R1):
    """The gradient [R, V] (student dtype) of a loss whose ``row_kernel(zs, zt, rows_R4,
    grad_R1, n_valid_1)`` gives it elementwise from the canonical logits and per-row
    statistics, on the first ``n`` columns (0 beyond), written once: fused, the kernel's output
    over all rows and columns is the buffer; eagerly, row chunks into one buffer.

    The kernel reads the raw logits (no copy), which equal the canonical ones except in the
    merge's two columns: the keep column is then recomputed from [R] canonical values, and the
    merge's backward rewrites both in place.
    """
    rows, width = zs_RV.shape
    chunks = list(row_chunks(rows, n, is_fused(zs_RV.device), zs_RV.device))
    if is_fused(zs_RV.device) or (n == width and len(chunks) == 1):
        pad = None if n == width else torch.full((1,), n, device=zs_RV.device)
        grad = row_kernel(zs_RV, zt_RV, rows_R4, grad_R1, pad)
    else:
        grad = torch.empty_like(zs_RV)
        grad[:, n:] = 0
        for c in chunks if n > 0 else ():
            grad[c, :n] = row_kernel(zs_RV[c, :n], zt_RV[c, :n], rows_R4[c], grad_R1[c])
    if s_merge is None:
        return grad
    keep = s_merge.keep
    if keep is not None and keep < n:
        canonical = [(z[:, keep] if m is None else m.keep_lead).unsqueeze(-1)
                     for z, m in ((zs_RV, s_merge), (zt_RV, t_merge))]
        grad[:, keep] = row_kernel.__wrapped__(*canonical, rows_R4, grad_R1)[:, 0]
    return s_merge.backward_(grad)


class _FullReverseKL(torch.autograd.Function):
    """Exact reverse KL (of the EOS-merged shards with ``s_merge``/``t_merge``). Forward:
    1 pass, 1 all-gather of [P, R, 5]. Backward: 1 pass, no collective (with a merge, its
    1 all-reduce(SUM) of [R]).

    Saves only the inputs and [R] statistics. Peak memory: fused, the gradient [R, V] alone;
    eagerly, the gradient plus about 6 fp32 [rows_chunk, V] temporaries.
    """

    @staticmethod
    def forward(ctx, zs_RV, zt_RV, n_valid, group, s_merge, t_merge):
        kl, m_s, m_t, log_s, log_t = _kl_of_shards(zs_RV, zt_RV, n_valid, group, s_merge,
                                                   t_merge)
        ctx.save_for_backward(zs_RV, zt_RV, torch.stack(
            [m_s, m_t, log_s, log_s - log_t + kl], dim=-1).float())
        ctx.n_valid, ctx.merges = n_valid, (s_merge, t_merge)
        return kl.float()

    @staticmethod
    def backward(ctx, grad_R):
        zs_RV, zt_RV, rows_R4 = ctx.saved_tensors
        (s_merge, t_merge), n = ctx.merges, ctx.n_valid
        grad = _gradient(_kl_grad, zs_RV, s_merge, zt_RV, t_merge, n, rows_R4,
                         grad_R.float().unsqueeze(-1))
        return grad, None, None, None, None, None


class _SupportReverseKL(torch.autograd.Function):
    """Reverse KL on a support of global ids with renormalized student weights (module docstring).

    Forward: 1 all-gather [P, R, 2] (student normalizer) + 1 all-reduce(SUM) [R, K] (student
    logits at the ids). Backward: local, no collective (with a merge, its 1 all-reduce(SUM) of
    [R]).
    """

    @staticmethod
    def forward(ctx, zs_RV, ids_RK, teacher_logprobs_RK, valid, group, gradient, merge):
        lse_s = rows_lse(zs_RV, valid, group, merge)
        lp_RK = (gather_at_ids(zs_RV.detach(), ids_RK, vocab_group=group, merge=merge)
                 - lse_s.unsqueeze(-1))
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
        ctx.merge = merge
        return value_R

    @staticmethod
    def backward(ctx, grad_R):
        zs_RV, ids_RK, lse_s, coef_RK, spread_R = ctx.saved_tensors
        v_local = zs_RV.shape[-1]
        local_ids = ids_RK - shard_start(v_local, ctx.group)
        mine = (local_ids >= 0) & (local_ids < v_local)
        grad = torch.empty_like(zs_RV)
        for c in row_chunks(zs_RV.shape[0], v_local, device=zs_RV.device):
            if ctx.spread:
                zs = fp32_rows(zs_RV, c, ctx.valid, ctx.merge)
                g = -torch.exp(zs - lse_s[c].unsqueeze(-1)) * spread_R[c].unsqueeze(-1)
            else:
                g = torch.zeros(zs_RV[c].shape, dtype=torch.float32, device=zs_RV.device)
            src = torch.where(mine[c], coef_RK[c], torch.zeros_like(coef_RK[c]))
            g.scatter_add_(-1, local_ids[c].clamp(0, v_local - 1), src)
            grad[c] = g * grad_R[c].float().unsqueeze(-1)
        if ctx.merge is not None:
            ctx.merge.backward_(grad)
        return grad, None, None, None, None, None, None


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: str = "full",
    topk: int = 16,
    vocab_group=None,
    vocab_size: int | None = None,
    stop_ids: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-prefix KL(pi_S || pi_T): [...] fp32, differentiable w.r.t. ``student_logits``.

    ``kind="full"`` is exact; ``kind="topk"`` is the paper's estimator on the student's global
    top-``topk`` support (gradient: module docstring). The teacher gets no gradient.
    ``kind="sampled"`` needs the sampled token: use :func:`reverse_kl_at_ids` with it.
    ``stop_ids``: EOS canonicalization (module docstring).
    """
    if kind not in ("full", "topk"):
        if kind == "sampled":
            raise ValueError("reverse_kl(kind='sampled') needs the sampled token ids: call "
                             "reverse_kl_at_ids(student_logits, ids[..., None], teacher_logprobs)")
        raise ValueError(f"kind must be full|topk|sampled, got {kind!r}")
    zs_RV, zt_RV, _ = flat_pair(student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    s_merge = stop_merge(zs_RV, stop_ids, vocab_group, weight=_wants_grad(zs_RV))
    t_merge = stop_merge(zt_RV, stop_ids, vocab_group, weight=False)
    if kind == "full":
        return _full_reverse_kl(zs_RV, zt_RV.detach(), vocab_group, vocab_size, s_merge,
                                t_merge).reshape(lead)
    valid = valid_columns(zs_RV.shape[-1], vocab_size, vocab_group, zs_RV.device)
    _, ids_RK = global_topk(zs_RV.detach(), topk, vocab_group=vocab_group, vocab_size=vocab_size,
                            merge=s_merge)
    teacher_lp = _logprobs_at(zt_RV.detach(), ids_RK, vocab_group, vocab_size, t_merge)
    return _SupportReverseKL.apply(zs_RV, ids_RK, teacher_lp, valid, vocab_group, "support",
                                   s_merge).reshape(lead)


def _full_reverse_kl(zs_RV, zt_RV, group, vocab_size, s_merge, t_merge) -> torch.Tensor:
    n_valid = valid_count(zs_RV.shape[-1], vocab_size, group)
    return _FullReverseKL.apply(zs_RV, zt_RV, n_valid, group, s_merge, t_merge)


def reverse_kl_at_ids(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
    gradient: str = "support",
    stop_ids: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Reverse-KL estimate on given global ids with precomputed teacher log-probs: [...] fp32.

    ``ids`` [..., K] int64 global token ids (e.g. the student's top-k recorded while decoding, or
    the sampled token with K = 1); ``teacher_logprobs`` [..., K] = log pi_T at those ids
    (full-vocabulary normalized). Weights are the student's probabilities renormalized on the
    ids. ``gradient``: ``support`` (as ``kind="topk"``) or ``policy`` (for a sampled token;
    module docstring). ``stop_ids``: EOS canonicalization of the student logits (module
    docstring).
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
    merge = stop_merge(zs_RV, stop_ids, vocab_group, weight=_wants_grad(zs_RV))
    out = _SupportReverseKL.apply(zs_RV, ids.reshape(-1, k), teacher_logprobs.reshape(-1, k),
                                  valid, vocab_group, gradient, merge)
    return out.reshape(student_logits.shape[:-1])


# ------------------------------------------------------------------------------ Veto target
# Veto (Jang et al., arXiv 2601.07155): the loss target is Q ∝ pi_T pi_S^b with the student
# term detached, i.e. Q = softmax(x) with x = z_T + b sg(z_S) (the normalizers cancel). With
# a = z_S - M_s and c = x - M_x (global maxima), s_s = sum e^a, s_x = sum e^c:
#   KL(Q || p) = sum e^c (c - a) / s_x - log s_x + log s_s,    dKL/dz_S = p - Q
# (Q carries no gradient): the full KL's forward with the arguments swapped (_kl_of_shards). Reverse direction: KL(p || Q) is the reverse KL with teacher
# logits x (:class:`_FullReverseKL`).


def veto_target_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       b: float) -> torch.Tensor:
    """x = z_T + b sg(z_S), the logits of Veto's target Q (b = 0: the teacher's; a -inf student
    logit stays -inf in x for b > 0)."""
    zt = teacher_logits.detach()
    if b == 0:
        return zt
    return zt + b * student_logits.detach()


def _merged_target(zs_RV, zt_RV, b, s_merge: StopMerge | None, t_merge: StopMerge | None):
    """(x, x's merge) of the EOS-merged logits: x of the raw ones (one [R, V] tensor), its two
    stop columns then written as x of the merged ones (x'_keep = z'_T,keep + b z'_S,keep,
    x'_drop = -inf), so x equals veto_target_logits of canonical logits."""
    x_RV = veto_target_logits(zs_RV, zt_RV, b)
    if b == 0 or t_merge is None:
        return x_RV, t_merge
    keep = None if s_merge.keep is None else t_merge.keep_lead + b * s_merge.keep_lead
    StopMerge(t_merge.keep, t_merge.drop, keep, None, t_merge.group).patch_(x_RV, slice(None))
    return x_RV, None


@kernel
def _veto_grad(zs_RV, x_RV, row_R4, grad_R1, n_valid_1=None):
    """dKL(Q || p)/dz_S = g (p - Q) in the student logits' dtype. row: (M_s, M_x, log s_s,
    log s_x). ``n_valid_1``: as :func:`_kl_grad`'s."""
    p = torch.exp(zs_RV.float() - row_R4[:, 0:1] - row_R4[:, 2:3])
    q = torch.exp(x_RV.float() - row_R4[:, 1:2] - row_R4[:, 3:4])
    return _valid_only((p - q) * grad_R1, n_valid_1).to(zs_RV.dtype)


class _ForwardKLToTarget(torch.autograd.Function):
    """KL(Q || pi_S) with Q = softmax(x) fixed. Forward: 1 pass (:func:`_kl_sums` on (x, z_S)),
    1 all-gather of [P, R, 5].
    Backward: 1 pass, no collective (with a merge, its 1 all-reduce(SUM) of [R]). Saves the
    inputs and [R, 4] statistics."""

    @staticmethod
    def forward(ctx, zs_RV, x_RV, n_valid, group, s_merge, x_merge):
        kl, m_x, m_s, log_x, log_s = _kl_of_shards(x_RV, zs_RV, n_valid, group, x_merge,
                                                   s_merge)  # KL(Q || p)
        ctx.save_for_backward(zs_RV, x_RV, torch.stack([m_s, m_x, log_s, log_x], dim=-1).float())
        ctx.n_valid, ctx.merges = n_valid, (s_merge, x_merge)
        return kl.float()

    @staticmethod
    def backward(ctx, grad_R):
        zs_RV, x_RV, rows_R4 = ctx.saved_tensors
        (s_merge, x_merge), n = ctx.merges, ctx.n_valid
        grad = _gradient(_veto_grad, zs_RV, s_merge, x_RV, x_merge, n, rows_R4,
                         grad_R.float().unsqueeze(-1))
        return grad, None, None, None, None, None


VETO_DIRECTIONS = ("forward", "reverse")


def veto_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    b: float,
    *,
    direction: str = "forward",
    vocab_group=None,
    vocab_size: int | None = None,
    stop_ids: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Veto's per-prefix loss over the full vocabulary: [...] fp32, differentiable w.r.t.
    ``student_logits`` only.

    Target Q ∝ pi_T pi_S^b, the student term detached (Jang et al., arXiv 2601.07155);
    ``direction="forward"``: KL(Q || pi_theta), gradient p - Q (exact, local); ``"reverse"``:
    KL(pi_theta || Q), the reverse KL to Q. b = 0 gives the plain forward (or reverse) KL to
    the teacher. Collectives: 1 all-gather of [P, R, 5] forward, none backward. ``stop_ids``:
    EOS canonicalization (module docstring), x of the canonical logits.
    """
    if direction not in VETO_DIRECTIONS:
        raise ValueError(f"direction must be {'|'.join(VETO_DIRECTIONS)}, got {direction!r}")
    if not 0 <= b:
        raise ValueError(f"Veto's b must be >= 0, got {b}")
    zs_RV, zt_RV, _ = flat_pair(student_logits, teacher_logits)
    lead = student_logits.shape[:-1]
    s_merge = stop_merge(zs_RV, stop_ids, vocab_group, weight=_wants_grad(zs_RV))
    t_merge = stop_merge(zt_RV, stop_ids, vocab_group, weight=False)
    x_RV, x_merge = _merged_target(zs_RV, zt_RV, b, s_merge, t_merge)
    if direction == "reverse":
        return _full_reverse_kl(zs_RV, x_RV, vocab_group, vocab_size, s_merge,
                                x_merge).reshape(lead)
    n_valid = valid_count(zs_RV.shape[-1], vocab_size, vocab_group)
    return _ForwardKLToTarget.apply(zs_RV, x_RV, n_valid, vocab_group, s_merge,
                                    x_merge).reshape(lead)


# ----------------------------------------------------------------------------- cross-entropy


class _CrossEntropy(torch.autograd.Function):
    """-log p(x) per row with analytic backward p - onehot(x) (local). Forward: 1 all-gather
    [P, R, 2] (normalizer) + 1 all-reduce(SUM) [R, 1] (the logit at x). Backward: no collective
    (with a merge, its 1 all-reduce(SUM) of [R]), one fp32 [rows_chunk, V] temporary."""

    @staticmethod
    def forward(ctx, zs_RV, ids_R, valid, group, merge):
        lse = rows_lse(zs_RV, valid, group, merge)
        z_x = gather_at_ids(zs_RV.detach(), ids_R[:, None], vocab_group=group, merge=merge)[:, 0]
        ctx.save_for_backward(zs_RV, ids_R, lse)
        ctx.valid, ctx.group, ctx.merge = valid, group, merge
        return lse - z_x

    @staticmethod
    def backward(ctx, grad_R):
        zs_RV, ids_R, lse = ctx.saved_tensors
        v_local = zs_RV.shape[-1]
        local = ids_R - shard_start(v_local, ctx.group)
        mine = (local >= 0) & (local < v_local)
        grad = torch.empty_like(zs_RV)
        for c in row_chunks(zs_RV.shape[0], v_local, device=zs_RV.device):
            p = torch.exp(fp32_rows(zs_RV, c, ctx.valid, ctx.merge) - lse[c].unsqueeze(-1))
            p.scatter_add_(-1, local[c].clamp(0, v_local - 1).unsqueeze(-1),
                           -mine[c].to(p.dtype).unsqueeze(-1))
            grad[c] = (p * grad_R[c].float().unsqueeze(-1)).to(grad.dtype)
        if ctx.merge is not None:
            ctx.merge.backward_(grad)
        return grad, None, None, None, None


def cross_entropy(student_logits: torch.Tensor, ids: torch.Tensor, *, vocab_group=None,
                  vocab_size: int | None = None,
                  stop_ids: tuple[int, int] | None = None) -> torch.Tensor:
    """-log pi_S(ids) per row over the true vocabulary: [...] fp32, differentiable w.r.t.
    ``student_logits`` (gradient p - onehot). The SFT-warmup baseline's loss on the teacher's
    tokens. ``stop_ids``: EOS canonicalization (module docstring)."""
    v = student_logits.shape[-1]
    if ids.shape != student_logits.shape[:-1]:
        raise ValueError(f"ids {tuple(ids.shape)} must be the rows {tuple(student_logits.shape[:-1])}")
    valid = valid_columns(v, vocab_size, vocab_group, student_logits.device)
    zs_RV = student_logits.reshape(-1, v)
    merge = stop_merge(zs_RV, stop_ids, vocab_group, weight=_wants_grad(zs_RV))
    return _CrossEntropy.apply(zs_RV, ids.reshape(-1), valid, vocab_group,
                               merge).reshape(ids.shape)
