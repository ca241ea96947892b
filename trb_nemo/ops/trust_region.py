"""TRB behavior policy: the most teacher-like distribution inside a KL trust region (paper Eq. 1-2).

At every prefix, with p = pi_S and q = pi_T (after EOS canonicalization):

    mu_beta ∝ p^(1-beta) q^beta,   beta* = max{beta in [0, 1] : KL(mu_beta || p) <= eps}

With r = log q - log p on the common support and A(beta) = log sum p exp(beta r),
KL(mu_beta || p) = beta A'(beta) - A(beta) and d/dbeta KL = beta Var_mu[r] >= 0 (monotone).
Any constant shift of r leaves this invariant; the solver centers it, d = r - E_p[r], and takes
KL = E_mu[u] - log E_p[e^u] with u = beta d - c(beta), c a lower bound of log E_p[e^(beta d)]
(_log_z_model), in whichever of two fp32 forms has the smaller rounding bound (_kl_at): the
terms stay O(KL) both for small budgets and where mu has settled on one token (where KL is flat
in beta and only an accurate KL keeps beta maximal). Support edge cases are exact: for 0 < beta < 1,
mu_beta lives on supp(p) ∩ supp(q); beta = 0 gives p; beta = 1 gives q, and KL(q || p) = inf
when q puts mass where p has none.

The solve is a fixed schedule with no host sync (it runs inside a decode step and under CUDA
graph capture): one preparation pass over the logits, a root of a small per-row model on
[rows, atoms] (_model_root), then exactly two evaluations of the tilt over the logits, each with
its own rounding bound; no branch depends on the data, and input checks go through
:mod:`trb_nemo.ops.checks` (raised at once, or deferred by the decoder).

Shape legend: ``R`` rows (leading dims flattened), ``V`` local vocab shard, ``P`` ranks of
``vocab_group`` (None = the whole vocabulary is local), ``B`` head blocks per shard, ``A`` atoms
of the model (2 P B). ``vocab_size`` = true vocabulary size; padded columns carry no
probability. Inputs are never modified; all math on the logits is fp32: fp64 logits are rounded
to fp32 first, and the guarantees (feasibility, maximality) hold for the rounded logits (the
rounding of |z| ~ 1e3 moves the KL by about 1e-5 relative).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trb_nemo.ops import checks
from trb_nemo.ops.fused import SMALL, is_fused, kernel
from trb_nemo.ops.shards import (
    NEG_INF,
    flat_pair,
    group_size,
    row_chunks,
    valid_columns,
    valid_count,
)
from trb_nemo.ops.vocab_parallel import (
    all_gather_rows,
    as_fp32_masked,
    gather_pair_sums,
    own_max_shift,
    rows_lse,
)

FEASIBILITY_MARGIN = 1e-6
"""Relative slack of the budget: the returned beta has KL(mu_beta || pi_S) <= eps (1 + margin),
the exact (float64) KL of the fp32-rounded logits. Each evaluated beta's fp32 KL comes with a
bound err on its rounding error (_kl_at); it counts as feasible when its KL is at most
min(eps, eps (1 + margin) - err), i.e. eps itself whenever err <= margin * eps, so beta is the
largest feasible one up to about err / (d KL / d beta) (the margin keeps maximality where KL is
flat in beta)."""
_U = 2.0**-24
"""fp32 unit roundoff: every error bound here is a multiple of it."""
_EXP_ERROR = 2.0
"""Relative error of fp32 exp / expm1 in units of _U (one ulp)."""
_TINY = torch.finfo(torch.float32).tiny
_OVERFLOW = 40.0
"""Upper clamp of the exponent of a tilted weight (never reached: see _SHIFT_AT)."""
_SHIFT_AT = 36.0
"""A shard row whose largest log p + u (u the shifted tilt, see _tilt_sums) exceeds this takes
its tilted weights divided by e^(excess) in the kernel (the sums are rescaled when the ranks'
sums are combined), so exp never overflows: always computed, no branch. With the shift c the
weights are about mu / p, so this needs c (_log_z_model) off by more than 36."""
HEAD_BLOCKS = 256
"""Blocks of the vocabulary (over the whole group) whose student and teacher argmax become exact
atoms of the per-row model (_head_sums, _model_root): a vocabulary of up to this many columns
is modelled exactly; for larger ones the atoms are the peaks and a smooth tail stands for the
rest."""
MODEL_STEPS = 16
"""Safeguarded Newton steps on the per-row model (each halves the bracket at worst)."""
MODEL_MARGIN = 0.0
"""The first evaluation is this far below the model's root (relative, times the share of the
model's tail there): from below, the Halley step of the second one is accurate."""


def _sum_rounding(padded_vocab: int) -> float:
    """Rounding of a fp32 sum over the vocabulary relative to the sum of the magnitudes of its
    terms (pairwise summation, plus the combination of ranks and the division after it)."""
    return (3 + math.log2(max(2, padded_vocab))) * _U


# ------------------------------------------------------------------------------- row kernels
# Notation inside the kernels, per row: m_s, m_t the maxima of the student and teacher logits
# (the shard's own in _support_sums, the global ones in _tilt_sums); a = z_S - m_s and
# b = z_T - m_t (<= 0); the common support is where both are finite; g = b - a there, so
# log q - log p = r = g - (log_t - log_s) with log_s = log sum e^a (global maxima).


@kernel
def _support_sums(zs_RV, zt_RV):
    """[R, 16] of one shard, in one read of it (the maxima, then sums while the row is cached):
    m_s, m_t, then with the shard's own maxima: sums of e^a, e^b; over the common support e^a g^k
    (k = 0..4) and e^b g; e^b outside supp p; e^a outside supp q; over the common support where
    a = 0 (the shard's student argmax): b and the count, where b = 0: a and the count."""
    m_s, a = own_max_shift(zs_RV)
    m_t, b = own_max_shift(zt_RV)
    in_s, in_t = a > NEG_INF, b > NEG_INF
    common = in_s & in_t
    es, et = torch.exp(a), torch.exp(b)
    g = torch.where(common, b - a, 0.0)
    pc = torch.where(common, es, 0.0)
    pg = pc * g
    pg2 = pg * g
    pg3 = pg2 * g
    return torch.stack([
        m_s[:, 0], m_t[:, 0],
        es.sum(-1), et.sum(-1), pc.sum(-1), pg.sum(-1), pg2.sum(-1), pg3.sum(-1), (pg3 * g).sum(-1),
        torch.where(common, et * g, 0.0).sum(-1),
        torch.where(in_t & ~in_s, et, 0.0).sum(-1),
        torch.where(in_s & ~in_t, es, 0.0).sum(-1),
        torch.where(common & (a == 0), b, 0.0).sum(-1), (common & (a == 0)).float().sum(-1),
        torch.where(common & (b == 0), a, 0.0).sum(-1), (common & (b == 0)).float().sum(-1),
    ], dim=-1)


def _phi2_small(u):
    """(e^u - 1 - u) / u^2 for |u| < SMALL (Taylor to u^7, truncation < 1e-9 relative), so
    p (e^u - 1 - u) and p (e^u - 1) = p u (1 + u phi2) keep full relative precision however
    small u is; multiplies and adds only (see fused.expm1_small)."""
    u = u.clamp(-SMALL, SMALL)
    poly = 1.0 / 362880.0 + 0.0 * u
    for c in (1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5):
        poly = c + u * poly
    return poly


def _tilt_terms(zs_RV, zt_RV, row_R5, beta_R2):
    """Per element of the tilt at (beta, c) = beta_R2[:, :2] (plain torch, for the kernels): p,
    u = beta d - c, log w = log p + u on the common support, and bounds on the rounding of
    log p (m_lp) and of u (m_u) in units of _U: each operation that made them is off by at most
    _U times its result, and exp by _EXP_ERROR units (counted as an error of its argument).
    With |lp| <= |a| + log_s, |t| <= |u| + |c|, |d| <= |g| + |E_p g| and |g| <= |a| + |b| they
    take a few operations per element: m_lp = 2|a| + log_s + _EXP_ERROR and
    m_u = 3|u| + (1 + 3 beta)|a| + 3 beta |b| + |c| + log_s + beta |E_p g| + _EXP_ERROR (both
    meaningful on the common support only, where p and w are not 0)."""
    a = zs_RV.float() - row_R5[:, 0:1]
    b = zt_RV.float() - row_R5[:, 1:2]
    common = (a > NEG_INF) & (b > NEG_INF)
    a = torch.where(common, a, 0.0)
    b = torch.where(common, b, 0.0)
    lp = a - row_R5[:, 2:3]
    g = b - a
    d = torch.where(common, g - row_R5[:, 3:4], 0.0)
    p = torch.where(common, torch.exp(lp), 0.0)
    beta, shift = beta_R2[:, 0:1], beta_R2[:, 1:2]
    u = beta * d - shift
    log_w = torch.where(common, lp + u, NEG_INF)
    log_s = row_R5[:, 2:3]
    abs_a = a.abs()
    m_lp = 2 * abs_a + (log_s + _EXP_ERROR)
    m_u = (3 * u.abs() + (1 + 3 * beta) * abs_a + 3 * beta * b.abs()
           + (shift.abs() + log_s + beta * row_R5[:, 3:4].abs() + _EXP_ERROR))
    return p, u, log_w, m_lp, m_u


_TILT_COLUMNS = 14
_W_FROM = 6
"""Columns _W_FROM..12 of _tilt_sums are sums of the (shifted) tilted weights w."""


@kernel
def _tilt_sums(zs_RV, zt_RV, row_R5, beta_R4):
    """[R, 14] local sums of the tilt at (beta, c, m, l) = beta_R4 on the common support: with
    d = g - E_p[g], u = beta d - c (c ~ log E_p[e^(beta d)], _log_z_model), w = p e^u, and
    guesses m of E_mu[u] and l of log E_p[e^u] (the rounding bound is tightest when they are
    right; v = e^-l w is then about mu times the mass of the common support):

    0 p, 1 p (e^u - 1 - u), 2 u p (e^u - 1), 3 p (e^u - 1), 4 |p (e^u - 1)|,
    5 |v (u - m - 1) + p| m_lp (rounding sensitivity to log p, see _tilt_terms), then sums of
    w / e^s: 6 w, 7 w u, 8 w |u| (the KL two ways and their rounding, see _kl_at),
    9 w (u - m)^2, 10 w (u - m)^3 (the derivatives), 11 w |u - m| m_u, 12 w m_u (rounding
    sensitivity to u), and 13 the shift s = max(0, max log w - _SHIFT_AT) of this shard's row.

    Two loops over the row: its largest log w, then the sums with w / e^s, which cannot
    overflow (u alone can exceed 88 on peaked rows: a token with p = 1e-80 that the teacher
    likes). Where s = 0 (every row whose c is within _SHIFT_AT of log Z) w is not shifted and
    p (e^u - 1) is p u (1 + u phi2(u)) for |u| < 0.5 (full relative precision for small
    budgets), e^(log p + u) - p beyond; where s > 0 columns 1-4 are not used."""
    p, u, log_w, m_lp, m_u = _tilt_terms(zs_RV, zt_RV, row_R5, beta_R4)
    shift = (log_w.amax(-1, keepdim=True) - _SHIFT_AT).clamp_min(0.0)
    small = (u.abs() < SMALL) & (shift <= 0)
    big_w = torch.exp((log_w - shift).clamp(max=_OVERFLOW))
    pu = p * u
    pu_phi2 = pu * u * _phi2_small(u)
    pe = torch.where(small, pu + pu_phi2, big_w - p)
    w = torch.where(small, p + pe, big_w)
    p_phi2 = torch.where(small, pu_phi2, pe - pu)
    u_m = u - beta_R4[:, 2:3]
    wu2 = w * u_m * u_m
    v = w * torch.exp((shift - beta_R4[:, 3:4]).clamp(max=80.0))
    return torch.stack([
        p.sum(-1), p_phi2.sum(-1), (u * pe).sum(-1), pe.sum(-1), pe.abs().sum(-1),
        ((v * (u_m - 1) + p).abs() * m_lp).sum(-1),
        w.sum(-1), (w * u).sum(-1), (w * u.abs()).sum(-1), wu2.sum(-1), (wu2 * u_m).sum(-1),
        (w * u_m.abs() * m_u).sum(-1), (w * m_u).sum(-1), shift[:, 0],
    ], dim=-1)


def _combine_tilt(gathered_PR14):
    """Every rank's _tilt_sums [P, R, 14] -> (the sums over the group [R, 13], shift s [R]):
    the w columns of each rank rescaled from its own shift to the largest."""
    s_PR = gathered_PR14[..., 13]
    s_R = s_PR.amax(0)
    scale = torch.exp(s_PR - s_R).unsqueeze(-1)
    return torch.cat([gathered_PR14[..., :_W_FROM].sum(0),
                      (gathered_PR14[..., _W_FROM:13] * scale).sum(0)], dim=-1), s_R


@kernel
def _head_sums(zs_RBW, zt_RBW):
    """[R, 6 B] of a shard cut into B blocks of W columns (padding -inf): per block the largest
    student logit, the sum of the teacher logits where it is attained and how many columns
    attain it; then the same with the roles swapped. The argmax pairs of every block are the
    exact atoms of the per-row model (_head_atoms)."""
    a, b = zs_RBW.float(), zt_RBW.float()
    ma, mb = a.amax(-1, keepdim=True), b.amax(-1, keepdim=True)
    at_a, at_b = a == ma, b == mb
    return torch.cat([ma[..., 0], torch.where(at_a, b, 0.0).sum(-1), at_a.float().sum(-1),
                      mb[..., 0], torch.where(at_b, a, 0.0).sum(-1), at_b.float().sum(-1)],
                     dim=-1)


def _head_blocks(width: int, group) -> tuple[int, int]:
    """(blocks B, columns per block W) of a shard of ``width`` padded columns: the same on every
    rank (every rank makes the same collectives); one column per block for narrow shards."""
    blocks = max(1, min(width, -(-HEAD_BLOCKS // group_size(group))))
    return blocks, -(-width // blocks)


def _blocked(z_RV, blocks: int, cols: int):
    """[R, B, W] view (or padded copy, padding -inf) of the real columns of a shard."""
    missing = blocks * cols - z_RV.shape[-1]
    if missing:
        z_RV = F.pad(z_RV, (0, missing), value=NEG_INF)
    return z_RV.reshape(z_RV.shape[0], blocks, cols)


def _tail_log(tail_R7, x):
    """log T(x) of the model's tail and its first two derivatives: the larger of its quartic
    expansion at 0 (log-mass and cumulants of d) and its tangent at 1 (log-mass and mean; log T
    is convex, so this is a lower bound), capped by the chord (1 - x) log T(0) + x log T(1)
    (Hoelder: log T lies below it). A side the preparation cannot resolve has log-mass -1e4."""
    t0, m0, v0, k3, k4, t1, m1 = (tail_R7[:, i:i + 1] for i in range(7))
    q0 = t0 + x * (m0 + x * (0.5 * v0 + x * (k3 / 6 + x * k4 / 24)))
    q0_1 = m0 + x * (v0 + x * (0.5 * k3 + x * k4 / 6))
    q0_2 = v0 + x * (k3 + 0.5 * x * k4)
    q1 = t1 + (x - 1) * m1
    at_0 = q0 >= q1
    q = torch.where(at_0, q0, q1)
    chord = torch.where((t0 > -1e3) & (t1 > -1e3), t0 + x * (t1 - t0), math.inf)
    below = q < chord
    return (torch.where(below, q, chord),
            torch.where(below, torch.where(at_0, q0_1, m1), t1 - t0),
            torch.where(below & at_0, q0_2, 0.0))


def _model_at(lpn_RA, d_RA, tail_R7, x):
    """(A, A', A'', the tail's share) [R, 1] of the model A(x) = log(sum_atoms p e^(x d) + T(x))
    (p renormalized on the common support, so A is log E_p[e^(x d)] where the model is
    exact)."""
    lt, lt1, lt2 = _tail_log(tail_R7, x)
    la = lpn_RA + x * d_RA
    top = torch.maximum(la.amax(-1, keepdim=True), lt)
    top = torch.where(top > NEG_INF, top, 0.0)
    ea, et = torch.exp(la - top), torch.exp(lt - top)
    z = ea.sum(-1, keepdim=True) + et
    wa, wt = ea / z, et / z
    m = (wa * d_RA).sum(-1, keepdim=True) + wt * lt1
    dm = d_RA - m
    var = (wa * dm * dm).sum(-1, keepdim=True) + wt * ((lt1 - m) ** 2 + lt2)
    return top + torch.log(z), m, var, wt


@kernel
def _model_root(lpn_RA, d_RA, tail_R7, row_R3):
    """[R, 4] (x, A(x), A'(x), the tail's share of the model at x) at the root x of the model's KL(x) = x A'(x) - A(x) - log p(common)
    = eps, with (eps, start, log p(common)) = row_R3: MODEL_STEPS Newton steps from the start
    (on log KL where KL > eps), a bisection step of the bracket [0, 1] where a step leaves it
    (float64, [R, A] values)."""
    eps, x, log_mass = row_R3[:, 0:1], row_R3[:, 1:2], row_R3[:, 2:3]
    lo, hi = torch.zeros_like(x), torch.ones_like(x)
    for _ in range(MODEL_STEPS):
        a, m, var, _ = _model_at(lpn_RA, d_RA, tail_R7, x)
        kl = x * m - a - log_mass
        f = kl - eps
        lo = torch.where(f <= 0, x, lo)
        hi = torch.where(f > 0, x, hi)
        # Newton on KL from below, on log KL from above (a token taking over: KL ~ e^(k x))
        step = x - torch.where(f > 0, kl * torch.log(kl / eps), f) / (x * var)
        x = torch.where((step >= lo) & (step <= hi), step, 0.5 * (lo + hi))
    a, m, _, share = _model_at(lpn_RA, d_RA, tail_R7, x)
    return torch.cat([x, a, m, share], dim=-1)


# ------------------------------------------------------------------------------ row statistics


class _RowStats:
    """Per-row quantities of one chunk that every TP rank agrees on (combined over the group).

    kernel_rows: [R, 5] (m_s, m_t, log_s, E_p[g | common], log_t - log_s) for _tilt_sums;
    var_p, k3, k4: cumulants of g under p restricted to the common support (the first guess);
    log_mass_common: log p(common support) [R]; kl_teacher: KL(q || p) [R] (inf when supp q
    is not inside supp p), a difference of O(log V) terms: its rounding is bounded in
    _solve_chunk from kl_teacher_scale = KL(q || p) + |log_t| + |log_s| + 2 [R] and
    E_q[|a| + |b|] <= 2 log V + KL(q || p); log_z1, mean_q_d: log E_p[e^d] and E_q[d] on the
    common support [R]; line_s, line_t: (log p, d) of the student's and the teacher's argmax
    [R] each (_log_z_model); mean_abs: |E_p[g]| + sqrt(var_p) + KL(p || q) [R]
    (common support), the scale of the rounding of E_p[g] (E_p[|a| + |b|] <= 2 log V + it).
    With the head (solve only): atom_lp, atom_d (log p renormalized on the common support, d)
    [R, A] float64 and tail [R, 7] float64 (_head_atoms), the per-row model of _model_root.
    """


def _prep_kernel(head):
    """The preparation's row kernel: _support_sums, and _head_sums of (B, W) blocks."""
    if head is None:
        return _support_sums

    def both(zs_RV, zt_RV):
        return torch.cat([_support_sums(zs_RV, zt_RV),
                          _head_sums(_blocked(zs_RV, *head), _blocked(zt_RV, *head))], dim=-1)
    return both


def _prepare(zs_RV, zt_RV, group, head=None):
    """Row statistics of one chunk of real columns: one pass over the logits (with ``head`` =
    (B, W) blocks, the model's atoms too, from a second loop of the same kernel call).
    Collectives: 1 all-gather of [P, R, 16] (+ 6 B with the head)."""
    extra = 0 if head is None else 6 * head[0]
    ps = gather_pair_sums(_prep_kernel(head), zs_RV, zt_RV, 14 + extra, group)
    m_s, m_t, sc_s, sc_t = ps.m_s, ps.m_t, ps.scale_s, ps.scale_t
    checks.fail_if(torch.isnan(m_s) | torch.isnan(m_t),
                   "trust region: NaN in student or teacher logits")
    checks.fail_if(~torch.isfinite(m_s) | ~torch.isfinite(m_t),
                   "trust region: a row has no finite student or teacher logit, or a +inf logit")
    (es, et, pc_P, p1, p2, p3, p4, qg, q_out, p_out,
     b_at_s, n_at_s, a_at_t, n_at_t) = ps.sums[..., :14].unbind(-1)  # each [P, R]
    qc = et - q_out  # e^b on the common support

    def total(x, scale):
        return (x * scale).sum(0)

    # each rank's g is b - a with its own maxima: g_global = g_local + delta (binomial moments)
    d1, d2, d3, d4 = ps.delta, ps.delta**2, ps.delta**3, ps.delta**4
    s_s, s_t, pc = total(es, sc_s), total(et, sc_t), total(pc_P, sc_s)
    pc_safe = pc.clamp_min(_TINY)
    mean = total(p1 + d1 * pc_P, sc_s) / pc_safe  # E_p[g_global | common]
    m2 = total(p2 + 2 * d1 * p1 + d2 * pc_P, sc_s) / pc_safe
    m3 = total(p3 + 3 * d1 * p2 + 3 * d2 * p1 + d3 * pc_P, sc_s) / pc_safe
    m4 = total(p4 + 4 * d1 * p3 + 6 * d2 * p2 + 4 * d3 * p1 + d4 * pc_P, sc_s) / pc_safe
    q_common_g = total(qg + d1 * qc, sc_t)
    q_outside, p_outside = total(q_out, sc_t), total(p_out, sc_s)
    log_s, log_t = torch.log(s_s), torch.log(s_t)
    st = _RowStats()
    var_p = (m2 - mean**2).clamp_min(0.0)
    st.var_p = var_p.float()
    st.k3 = (m3 - 3 * mean * m2 + 2 * mean**3).float()
    st.k4 = (m4 - 4 * mean * m3 + 6 * mean**2 * m2 - 3 * mean**4 - 3 * (m2 - mean**2) ** 2).float()
    st.kernel_rows = torch.stack([m_s, m_t, log_s, mean, log_t - log_s], dim=-1).float()
    mass_common = torch.log1p(-p_outside / s_s)
    st.log_mass_common = torch.where(pc > 0, mass_common,
                                     torch.full_like(mass_common, NEG_INF)).float()
    kl_teacher = q_common_g / s_t - (log_t - log_s)
    st.kl_teacher = torch.where(q_outside > 0, torch.full_like(kl_teacher, math.inf),
                                kl_teacher.clamp_min(0.0)).float()
    st.kl_teacher_scale = (st.kl_teacher + log_t.abs() + log_s.abs() + 2.0).float()
    # convexity anchors of log E_p[e^(beta d)] at beta = 1 (only steer the shift: any value is
    # exact, a good one avoids cancellation)
    q_common = s_t - q_outside
    ok = (pc > 0) & (q_common > 0)
    log_z1 = torch.log(q_common.clamp_min(_TINY) / pc_safe) - mean
    mean_q_d = q_common_g / q_common.clamp_min(_TINY) - mean
    st.log_z1 = torch.where(ok, log_z1, torch.zeros_like(log_z1)).clamp_min(0.0).float()
    st.mean_q_d = torch.where(ok, mean_q_d, torch.zeros_like(mean_q_d)).clamp_min(0.0).float()
    st.mean_abs = (mean.abs() + st.var_p.double().sqrt()
                   + (mean - (log_t - log_s)).abs()).float()
    # log p + beta d of the student's and the teacher's argmax on the common support (the
    # average over ties), lower bounds of log E_p[e^(beta d)] where mu has settled on them
    log_mass = torch.log1p(-p_outside / s_s)

    def argmax_line(held, other_at, count, scale_other, own_first):
        take = held & (count > 0)  # the ranks holding the row's global maximum
        other = torch.where(take, other_at / count.clamp_min(1) + torch.log(scale_other.clamp_min(
            _TINY)), torch.zeros_like(other_at)).sum(0) / take.sum(0).clamp_min(1)
        a, b = (torch.zeros_like(other), other) if own_first else (other, torch.zeros_like(other))
        found = take.any(0) & (pc > 0)
        lp = torch.where(found, a - log_s - log_mass, torch.full_like(a, NEG_INF))
        d = torch.where(found, b - a - mean, torch.zeros_like(a))
        return lp.float(), d.float()

    st.line_s = argmax_line(sc_s >= 1, b_at_s, n_at_s, sc_t, True)
    st.line_t = argmax_line(sc_t >= 1, a_at_t, n_at_t, sc_s, False)
    if head is not None:
        central = (var_p, m3 - 3 * mean * m2 + 2 * mean**3,
                   m4 - 4 * mean * m3 + 6 * mean**2 * m2 - 3 * mean**4)
        st.atom_lp, st.atom_d, st.tail = _head_atoms(ps, head[0], m_s, m_t, log_s, log_mass, mean,
                                                     central,
                                        torch.where(ok, log_z1, torch.zeros_like(log_z1)),
                                        torch.where(ok, mean_q_d, torch.zeros_like(mean_q_d)))
    return st


def _head_atoms(ps, blocks, m_s, m_t, log_s, log_mass, mean, moments, log_z1, mean_q_d):
    """The per-row model's atoms and tail, float64 from the gathered _head_sums.

    Atoms: each block's student argmax with the teacher's logit there, and the teacher's argmax
    with the student's (dropped where both are the same column; a tie of n columns counts as n
    copies of their mean): (log p / p(common), d) [R, 2 P B], (-inf, 0) off the common support.
    Tail: the common support without the atoms, (log T(0), its cumulants 1-4 of d, log T(1),
    E'[d]) [R, 7] with T(x) = sum_tail p e^(x d) / p(common) and E' the mean under the tilt at
    1: the totals of the preparation (``moments``: central moments 2-4 of d) less the atoms';
    everything scaled so that the model's mass at 0 is 1."""
    head = ps.sums[..., 14:].reshape(ps.sums.shape[0], ps.sums.shape[1], 6, blocks)
    ma, b_at_a, n_a, mb, a_at_b, n_b = head.unbind(2)  # each [P, R, B]
    rank_ok = ((ps.scale_s > 0) & (ps.scale_t > 0)).unsqueeze(-1)
    ms, mt = m_s[None, :, None], m_t[None, :, None]
    same = (n_a == 1) & (n_b == 1) & (a_at_b == ma) & (b_at_a == mb)
    a = torch.cat([ma, a_at_b / n_b.clamp_min(1)], dim=-1) - ms
    b = torch.cat([b_at_a / n_a.clamp_min(1), mb], dim=-1) - mt
    n = torch.cat([n_a, n_b], dim=-1)
    keep = (rank_ok & (n > 0) & torch.isfinite(a) & torch.isfinite(b)
            & torch.cat([torch.ones_like(same), ~same], dim=-1))
    rows = ps.sums.shape[1]
    lpn = torch.where(keep, a - (log_s + log_mass)[None, :, None] + torch.log(n.clamp_min(1)),
                      NEG_INF).permute(1, 0, 2).reshape(rows, -1)
    d = torch.where(keep, b - a - mean[None, :, None], 0.0).permute(1, 0, 2).reshape(rows, -1)
    pw = torch.exp(lpn)
    p_tail = 1 - pw.sum(-1)
    qw = torch.exp(lpn + d - log_z1.unsqueeze(-1))
    q_tail = 1 - qw.sum(-1)
    # the totals are fp32 sums (relative rounding ~1e-6): a side of the tail lighter than that
    # is noise (log-mass -1e4); its higher cumulants only where it carries 1e-3
    low = 1e-6
    p_t, q_t = p_tail.clamp_min(low), q_tail.clamp_min(low)
    r1 = -(pw * d).sum(-1) / p_t
    r2 = (moments[0] - (pw * d**2).sum(-1)) / p_t
    r3 = (moments[1] - (pw * d**3).sum(-1)) / p_t
    r4 = (moments[2] - (pw * d**4).sum(-1)) / p_t
    c2 = r2 - r1 * r1
    k3 = torch.where(p_tail > 1e-3, r3 - 3 * r1 * r2 + 2 * r1**3, 0.0)
    k4 = torch.where(p_tail > 1e-3, r4 - 4 * r1 * r3 + 6 * r1 * r1 * r2 - 3 * r1**4 - 3 * c2 * c2,
                     0.0)
    p_ok, q_ok = p_tail > low, q_tail > low
    m1 = (mean_q_d - (qw * d).sum(-1)) / q_t
    tail = torch.stack([torch.where(p_ok, torch.log(p_t), -1e4), torch.where(p_ok, r1, 0.0),
                        torch.where(p_ok, c2.clamp_min(0.0), 0.0), k3, k4,
                        torch.where(q_ok, log_z1 + torch.log(q_t), -1e4),
                        torch.where(q_ok, m1, 0.0)], dim=-1)
    tail = torch.nan_to_num(tail, nan=0.0, posinf=1e4, neginf=-1e4)
    # the model's mass at beta = 0 is 1 up to that rounding: make it 1 exactly (A(0) = 0)
    z0 = torch.logaddexp(torch.logsumexp(lpn, dim=-1), tail[:, 0])
    z0 = torch.where(torch.isfinite(z0), z0, 0.0)
    lpn = lpn - z0.unsqueeze(-1)
    shift = torch.zeros_like(tail)
    shift[:, 0], shift[:, 5] = z0, z0
    tail = tail - shift
    return lpn, torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0), tail


def _log_z_model(beta_R, st):
    """The shift c(beta) of the tilt [R]: the largest of four lower bounds of the convex
    log Z(beta) = log E_p[e^(beta d)] (common support): its tangents at beta = 0 and 1 and the
    lines log p + beta d of the student's and the teacher's argmax. So 0 <= log Z - c, small
    where beta is small (c = 0, log Z = O(KL)) and where mu has nearly settled on one of those
    tokens (where KL is flat in beta). Any c gives the exact KL; one near log Z keeps the terms
    of _kl_at's forms O(KL), and as a function of beta alone it lets kl_to_student reproduce
    the solver's KL bit for bit."""
    lines = torch.maximum(st.line_s[0] + beta_R * st.line_s[1],
                          st.line_t[0] + beta_R * st.line_t[1])
    return torch.maximum((st.log_z1 + (beta_R - 1) * st.mean_q_d).clamp_min(0.0), lines)


def _kl_at(beta_R, st, zs_RV, zt_RV, group, rounding, log_vocab, guess_R2=None):
    """Interior (0 < beta < 1) KL(mu_beta || p), Var_mu[u], kappa_3,mu[u] (u = beta d - c), a
    bound on the KL's fp32 rounding error and the part of it due to the guesses' misses,
    E_mu[u] and log Z, all [R], from one pass.

    With p restricted to the common support (mass pc, as summed here), c = _log_z_model(beta)
    and Z = E_p[e^u]: KL = E_mu[u] - log Z - log p(common), computed two ways:

    * A (small tilts): E_p[u] = -c exactly (E_p[d] = 0), so Z = 1 - c + E_p[e^u - 1 - u] and
      E_mu[u] = (-c + E_p[u (e^u - 1)]) / Z come from sums of O(u^2) terms: full relative
      precision down to tiny budgets, with no O(beta) terms cancelling;
    * B (large tilts): Z = 1 + E_p[e^u - 1] and E_mu[u] = sum w u / sum w directly, both O(KL)
      when c is near log Z, where A would cancel O(c) terms (e.g. mu nearly settled on one
      token, where KL is flat in beta).

    Each row takes the form with the smaller bound: the sums' rounding (``rounding`` times the
    magnitudes summed) plus the first-order effect of each element's rounding of log p and of u
    (_U times the magnitudes of _tilt_terms, weighted by |d KL / d log p_j| =
    p_j |e^u (u - E_mu u - 1) / Z + 1| and |d KL / d u_j| = mu_j |u_j - E_mu u|, summed with
    guesses ``guess_R2`` = (E_mu[u], log Z) in place of the two plus the first-order
    corrections for their misses; None: (0, 0)).
    Rows where some log p + u > _SHIFT_AT (c off by that much) have their weights shifted in
    the kernel: they take form B with Z = e^s sum w / pc and the shift's rounding in the bound
    (no branch: the same pass, the same collective).
    Collectives: 1 all-gather of [P, R, 14].
    """
    shift = _log_z_model(beta_R, st)
    if guess_R2 is None:
        guess_R2 = torch.zeros((beta_R.shape[0], 2), dtype=beta_R.dtype, device=beta_R.device)
    guess, log_z_guess = guess_R2.unbind(-1)
    constants = torch.stack([beta_R, shift, guess, log_z_guess], dim=-1)
    local = (_tilt_sums(zs_RV, zt_RV, st.kernel_rows, constants)
             if zs_RV.shape[-1] > 0 else beta_R.new_zeros((beta_R.shape[0], _TILT_COLUMNS)))
    sums, big = _combine_tilt(all_gather_rows(local, group))
    pc, s2, s3, pe, pe_abs, a1, w, wu, wu_abs, wu2, wu3, b1, b2 = sums.unbind(-1)
    shifted = big > 0
    pc = pc.clamp_min(_TINY)
    w = w.clamp_min(_TINY)
    # A
    x = s2 / pc - shift
    z_a = (1 + x).clamp_min(_TINY)
    log_z_a = torch.where(x > -0.5, torch.log1p(x), torch.log(z_a))
    mean_a = (s3 / pc - shift) / z_a
    kl_a = mean_a - log_z_a
    mean_error = (rounding + 2 * _U) * (st.mean_abs + 2 * log_vocab)  # of E_p[d] = 0
    err_a = ((rounding * (s2 + s3) / pc + 2 * _U * shift.abs()) * (1 + mean_a.abs()) / z_a
             + _U * (log_z_a.abs() + mean_a.abs()) + beta_R * mean_error * mean_a.abs() / z_a)
    err_a = torch.where(shifted, math.inf, err_a)
    # B
    mean_b = wu / w
    second = wu2 / w  # E_mu[(u - guess)^2]
    y = pe / pc
    near = (y > -0.5) & ~shifted
    log_z_b = torch.where(near, torch.log1p(y), torch.log(w / pc) + big)
    kl_b = mean_b - log_z_b
    relative_z = torch.where(shifted, 2 * torch.exp(-log_z_b.clamp(min=-80.0)),
                             torch.where(near, pe_abs / pc, 2.0) / (1 + y).clamp_min(_TINY))
    err_b = (rounding * (wu_abs / w + mean_b.abs() + relative_z)
             + _U * (log_z_b.abs() + mean_b.abs()))
    use_a = err_a <= err_b
    kl = torch.where(use_a, kl_a, kl_b) - st.log_mass_common
    # central moments from the ones about the guess; none (a bisection step follows) where
    # they would be rounding noise (a guess far off, e.g. after a long step)
    dm = mean_b - guess
    var = second - dm * dm
    third = wu3 / w - 3 * dm * second + 2 * dm**3
    known = var > 8 * rounding * second
    var = torch.where(known, var, torch.zeros_like(var))
    third = torch.where(known, third, torch.zeros_like(third))
    ratio = torch.exp((log_z_guess - log_z_b).clamp(max=30.0))  # the guess's 1/Z over the true one
    miss = (mean_b - guess).abs()
    # v |u - m - 1| m_lp <= 2 v (|u - m| + 1) m_u, as m_lp <= 2 m_u (_tilt_terms); the w sums
    # are of w / e^s
    scale = torch.exp((big - log_z_guess).clamp(max=80.0))
    misses = _U * (2 * scale * ((ratio - 1).abs() * (b1 + b2) + miss * ratio * b2) / pc
                   + miss * b2 / w)
    # shifted rows: log w - s rounded once more, |d KL / d log w_j| <= mu_j (|u_j - E u| + 1)
    shift_error = torch.where(shifted, 2 * _U * (big + _SHIFT_AT + log_vocab + 10)
                              * (second.clamp_min(0.0).sqrt() + miss + 1), 0.0)
    err = (torch.minimum(err_a, err_b) + _U * (a1 / pc + b1 / w) + misses + shift_error
           + 2 * _U * (kl.abs() + st.log_mass_common.abs()))
    return kl.clamp_min(0.0), var, third, err, misses, mean_b, log_z_b


def _edge_kl(beta_R, st, interior_kl):
    """KL at the exact ends: 0 at beta = 0, KL(q || p) at beta = 1, interior otherwise."""
    kl = torch.where(beta_R <= 0, torch.zeros_like(interior_kl), interior_kl)
    return torch.where(beta_R >= 1, st.kl_teacher, kl)


def _first_guess(st, eps_R):
    """Root of the cumulant expansion KL(b) ~ k2 b^2/2 + k3 b^3/3 + k4 b^4/8 = eps (a few Newton
    steps on [R] values from sqrt(2 eps / k2)); sqrt(2 eps / k2) where that model has no root."""
    k2 = st.var_p.clamp_min(1e-30)
    quadratic = torch.sqrt(2.0 * eps_R / k2)
    x = quadratic
    for _ in range(4):
        f = x * x * (k2 / 2 + x * (st.k3 / 3 + x * st.k4 / 8)) - eps_R
        f1 = x * (k2 + x * (st.k3 + x * st.k4 / 2))
        x = torch.where(f1 > 0, x - f / f1, x)
    model_ok = torch.isfinite(x) & (x > 0) & (x < 2 * quadratic)
    x = torch.where(model_ok, x, quadratic)
    return torch.where(torch.isfinite(x), x, torch.full_like(x, 0.5)).clamp(1e-7, 1 - 1e-7)


def _inputs(student_logits, teacher_logits, per_row, name, vocab_size, group):
    """([R, V'] real columns of each shard (views), [R] fp32 per-row values, leading shape)."""
    zs_RV, zt_RV, lead = flat_pair(student_logits, teacher_logits)
    values_R = _per_row(per_row, lead, student_logits.device, name)
    n = valid_count(zs_RV.shape[-1], vocab_size, group)
    return zs_RV[:, :n], zt_RV[:, :n], values_R, lead


def _per_row(value, lead, device, name) -> torch.Tensor:
    """``value`` (a number or a tensor broadcastable to ``lead``) as fp32 [R] on ``device``; a
    number is filled on the device (no host-to-device copy of Python data)."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=torch.float32)
    elif isinstance(value, (int, float)):
        t = torch.full((), float(value), dtype=torch.float32, device=device)
    else:
        t = torch.as_tensor(value, dtype=torch.float32, device=device)
    checks.fail_if(torch.isnan(t), f"{name} contains NaN")
    return torch.broadcast_to(t, lead).reshape(-1)


def solve_beta(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    eps,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
    tolerance: float = 1e-5,
    max_iterations: int = 40,
) -> torch.Tensor:
    """Largest beta in [0, 1] with KL(mu_beta || pi_S) <= eps, per row: [...] fp32.

    ``eps``: float or tensor broadcastable to the leading dims, >= 0. beta = 0 where eps = 0;
    beta = 1 where KL(pi_T || pi_S) <= eps; otherwise a fixed schedule, the same for every row
    and every input (no host sync, no data-dependent exit; CUDA-graph capturable):

    1. prepare (one pass): the row statistics, and per block of the vocabulary (HEAD_BLOCKS
       over the group) the student's and the teacher's argmax with the other's logit there;
    2. a per-row model of A(beta) = log E_p[e^(beta d)]: those argmax columns as exact atoms and
       a smooth tail (the rest, from the preparation's totals less the atoms'), solved for
       KL = eps by MODEL_STEPS safeguarded Newton steps on [R, A] values (_model_root; exact
       where the vocabulary has at most HEAD_BLOCKS columns);
    3. evaluate the tilt at beta_1 = that root less half a tolerance (or at 1 where KL(pi_T ||
       pi_S) is within its rounding bound of eps), with its rounding bound err (_kl_at);
    4. one Halley step from beta_1 on f = KL - target, f' = beta Var_mu[r], f'' = Var_mu[r] +
       beta kappa_3,mu[r], aimed half a tolerance below the target (bisection of the bracket
       where it leaves it; beta_1 again where it failed only for its guesses' misses), and
       evaluate the tilt there (beta_2);
    5. return the larger of beta_1, beta_2 that is feasible by its own bound (0 if neither).

    Contract, for the exact (float64) KL of the logits rounded to fp32 and beta* the largest
    beta with KL <= eps: the returned beta has KL(mu_beta || pi_S) <= eps (1 + FEASIBILITY_MARGIN),
    always (an evaluated beta counts as feasible when its fp32 KL is at most
    min(eps, eps (1 + margin) - err)); and |beta - beta*| <~ tolerance * beta* +
    (err + max(0, err - margin * eps)) / (d KL / d beta) wherever the model's root is within
    the reach of one Halley step (the step's error is cubic in the model's). beta = 1 is taken
    from KL(pi_T || pi_S) of the preparation only where that value plus its rounding bound is
    <= eps. Measured on random rows (vocabularies 5 to 1000, logits N(0, s^2) with s in
    [0.1, 10], eps in [1e-3, 5], and peaked rows with logit scales up to 100):
    KL <= eps (1 + 1e-6) and |beta - beta*| < 1e-4 (tests/unit/test_trust_region_budget.py,
    tests/unit/test_ops.py); ``max_iterations`` is accepted for callers and not used.

    Passes over the logits per row chunk: 3 (prepare, beta_1, beta_2), whatever the data.
    Collectives per chunk: all-gather [P, R, 16 + 6 B] to prepare (B = min(V, HEAD_BLOCKS / P)
    blocks per shard), all-gather [P, R, 14] per evaluation (2).
    Memory: fused (:mod:`trb_nemo.ops.fused`), [P, R, 16 + 6 B] and float64 [R, 2 P B] beyond
    the inputs (plus a padded copy of the shards when V is not a multiple of B); eagerly,
    about 30 fp32 [rows_chunk, V] temporaries (rows_chunk from ROW_CHUNK_BYTES).
    """
    return _solve(student_logits, teacher_logits, eps, vocab_group, vocab_size, tolerance)[0]


def solve_beta_and_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    eps,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
    tolerance: float = 1e-5,
    max_iterations: int = 40,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(solve_beta(...), kl_to_student(..., beta)) from one solve: the decoding hot path needs
    both, and the returned beta is one the solver evaluated, so its KL comes with no extra pass
    or collective (fp32, within its rounding bound of the exact KL; at beta = 1 it is
    KL(pi_T || pi_S) of the preparation, as kl_to_student gives it). No host sync: run it
    under :func:`trb_nemo.ops.checks.deferred` to defer the input checks too."""
    return _solve(student_logits, teacher_logits, eps, vocab_group, vocab_size, tolerance)


def _solve(student_logits, teacher_logits, eps, group, vocab_size, tolerance):
    zs_RV, zt_RV, eps_R, lead = _inputs(student_logits, teacher_logits, eps, "eps", vocab_size,
                                        group)
    checks.fail_if(eps_R < 0, "eps must be >= 0")
    beta = torch.zeros(zs_RV.shape[0], dtype=torch.float32, device=zs_RV.device)
    kl = torch.zeros_like(beta)
    # rounding of the KL terms' sums over the vocabulary (the same on every rank)
    padded_vocab = student_logits.shape[-1] * group_size(group)
    head = _head_blocks(student_logits.shape[-1], group)
    # chunks from the padded width: every rank must make the same collectives
    for c in row_chunks(zs_RV.shape[0], student_logits.shape[-1], is_fused(zs_RV.device),
                        zs_RV.device):
        st = _prepare(zs_RV[c], zt_RV[c], group, head)
        beta[c], kl[c] = _solve_chunk(st, zs_RV[c], zt_RV[c], eps_R[c], group, tolerance,
                                      padded_vocab)
    return beta.reshape(lead), kl.reshape(lead)


def _kl_of(beta_R, st, zs_RV, zt_RV, group, padded_vocab):
    """KL(mu_beta || p) of prepared rows, exact at the ends of [0, 1]."""
    interior = beta_R.clamp(1e-12, 1 - 1e-12)
    kl = _kl_at(interior, st, zs_RV, zt_RV, group, _sum_rounding(padded_vocab),
                math.log(max(2, padded_vocab)))[0]
    return _edge_kl(beta_R, st, kl)


def _solve_chunk(st, zs_RV, zt_RV, eps_R, group, tolerance, padded_vocab):
    """(beta [R], KL(mu_beta || p) [R]) of one prepared chunk (solve_beta's schedule)."""
    rounding = _sum_rounding(padded_vocab)
    log_vocab = math.log(max(2, padded_vocab))
    budget = eps_R * (1 + FEASIBILITY_MARGIN)
    # KL(q || p) of the preparation is a difference of O(log V) terms: trusted only clear of eps
    teacher_error = 2 * (rounding + 3 * _U) * (2 * log_vocab + st.kl_teacher_scale)
    to_one = (eps_R > 0) & (st.kl_teacher + teacher_error <= eps_R)
    # KL jumps to -log p(common) just above beta = 0 when supp p is not inside supp q
    jump = -st.log_mass_common
    active = (eps_R > 0) & ~to_one & (jump < eps_R)
    near_one = active & (st.kl_teacher - teacher_error <= budget)  # checked precisely at 1
    ones, zeros = torch.ones_like(eps_R), torch.zeros_like(eps_R)
    # the model's root, and from it the first beta with guesses of E_mu[u] = beta A' - c and
    # log Z = A - c (A = log E_p[e^(beta d)]) for its rounding bound
    start = _first_guess(st, eps_R)
    root = _model_root(st.atom_lp, st.atom_d, st.tail,
                       torch.stack([eps_R, start, st.log_mass_common], dim=-1).double())
    x_hat = torch.where(torch.isfinite(root[:, 0]), root[:, 0], start.double())
    # below the root by half a tolerance where the model is exact (its atoms carry all the
    # mass), by up to MODEL_MARGIN where its tail does: the second step starts from below
    margin = 0.5 * tolerance + MODEL_MARGIN * root[:, 3].clamp(0.0, 1.0).nan_to_num(1.0)
    x = (x_hat * (1 - margin)).clamp(1e-7, 1 - 1e-7).float()
    x = torch.where(active, torch.where(near_one, ones, x), torch.full_like(x, 0.5))
    shift = _log_z_model(x, st)
    log_z = (root[:, 1] + (x.double() - x_hat) * root[:, 2]).float() - shift
    mean_u = x * root[:, 2].float() - shift
    log_z = torch.where(near_one, zeros, log_z.clamp_min(0.0))
    mean_u = torch.where(near_one, st.kl_teacher + st.log_mass_common, mean_u)
    guess = torch.stack([mean_u, log_z], dim=-1)
    guess = torch.where(torch.isfinite(guess), guess, torch.zeros_like(guess))
    # first evaluation
    kl, var, third, err, misses, mean_u, log_z = _kl_at(x, st, zs_RV, zt_RV, group, rounding,
                                                         log_vocab, guess)
    target = torch.minimum(eps_R, budget - err)
    feasible = active & (kl <= target)
    # infeasible only for the guesses' misses (they add at most about 2 misses to err):
    # evaluate the same beta again with this pass's E_mu[u] and log Z
    retry = active & ~feasible & (kl <= torch.minimum(eps_R, budget - err + 2 * misses))
    lo = torch.where(feasible, x, zeros)
    hi = torch.where(active & ~feasible & ~retry, x, ones)
    # d KL / d beta = beta Var_mu[d] = Var_mu[u] / beta, and the second derivative. The Halley
    # step to half a tolerance below the target: on KL from a feasible beta, on log KL from an
    # infeasible one (KL grows like a power or an exponential of beta, a new token taking
    # over, so log KL is the straighter); Newton where Halley's correction is large, and short
    # of the root by the size of that correction (its error estimate), so it lands feasible
    slope = (var / x).clamp_min(1e-30)
    curve = (var + third) / (x * x)
    aim = target - 0.5 * tolerance * x * slope
    kl_pos = kl.clamp_min(_TINY)
    up = feasible | (aim <= 0)
    f = torch.where(up, kl - aim, torch.log(kl_pos / aim.clamp_min(_TINY)))
    f1 = torch.where(up, slope, slope / kl_pos)
    f2 = torch.where(up, curve, curve / kl_pos - f1 * f1)
    newton = f / f1
    denominator = 1 - f * f2 / (2 * f1 * f1)
    step = torch.where((denominator > 0.5) & (denominator < 2), newton / denominator, newton)
    step = step + (step - newton).abs()
    nxt = x - step
    inside = (nxt > lo) & (nxt < hi) & torch.isfinite(nxt)
    x2 = torch.where(retry, x, torch.where(inside, nxt, 0.5 * (lo + hi)))
    # d log Z / d beta = E_mu[d] - dc / dbeta, E_mu[d] = (E_mu[u] + c) / beta
    shift2 = _log_z_model(x2, st)
    log_z2 = (log_z + (x2 - x) * (mean_u + shift) / x - (shift2 - shift)).clamp_min(0.0)
    kl_guess = (kl + slope * (x2 - x)).clamp_min(0.0)
    guess = torch.stack([kl_guess + log_z2 + st.log_mass_common, log_z2], dim=-1)
    guess = torch.where(torch.isfinite(guess), guess, torch.zeros_like(guess))
    # second evaluation; the larger feasible beta of the two
    kl2, _, _, err2, _, _, _ = _kl_at(x2, st, zs_RV, zt_RV, group, rounding, log_vocab, guess)
    feasible2 = active & (kl2 <= torch.minimum(eps_R, budget - err2))
    take2 = feasible2 & (~feasible | (x2 > x))
    beta = torch.where(take2, x2, torch.where(feasible, x, zeros))
    kl = torch.where(take2, kl2, torch.where(feasible, kl, zeros))
    # at beta = 1 the KL reported is the preparation's KL(q || p), as kl_to_student gives it
    kl = torch.where(beta >= 1, st.kl_teacher, kl)
    return (torch.where(active, beta, torch.where(to_one, ones, zeros)),
            torch.where(active, kl, torch.where(to_one, st.kl_teacher, zeros)))


def behavior_logprobs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Local shard of log mu_beta = log softmax((1-beta) z_S + beta z_T): [..., V] fp32.

    Normalized over the full vocabulary (padding -inf). beta = 0 gives log pi_S exactly, beta = 1
    log pi_T; for 0 < beta < 1 only the common support carries mass.
    Collectives: 1 all-gather of [P, R, 2]. Memory: the fp32 output plus one temporary.
    """
    zs_RV, zt_RV, lead = flat_pair(student_logits, teacher_logits)
    beta_R1 = _per_row(beta, lead, student_logits.device, "beta").unsqueeze(-1)
    valid = valid_columns(zs_RV.shape[-1], vocab_size, vocab_group, zs_RV.device)
    zs, zt = as_fp32_masked(zs_RV, valid), as_fp32_masked(zt_RV, valid)
    common = torch.isfinite(zs) & torch.isfinite(zt)
    mixed = torch.where(common, zs + beta_R1 * (zt - zs), torch.full_like(zs, NEG_INF))
    x = torch.where(beta_R1 <= 0, zs, torch.where(beta_R1 >= 1, zt, mixed))
    lse = rows_lse(x, None, vocab_group)
    return (x - lse.unsqueeze(-1)).reshape(student_logits.shape)


def kl_to_student(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """KL(mu_beta || pi_S) per row: [...] fp32 (0 at beta = 0, KL(pi_T || pi_S) at beta = 1),
    the value solve_beta_and_kl reports for the beta it returns, bit for bit.

    Passes per row chunk: 2. Collectives per chunk: 1 all-gather [P, R, 16] (the preparation,
    without the head) + 1 all-gather of [P, R, 14]. No host sync.
    """
    zs_RV, zt_RV, beta_R, lead = _inputs(student_logits, teacher_logits, beta, "beta",
                                         vocab_size, vocab_group)
    out = torch.zeros(zs_RV.shape[0], dtype=torch.float32, device=zs_RV.device)
    padded_vocab = student_logits.shape[-1] * group_size(vocab_group)
    for c in row_chunks(zs_RV.shape[0], student_logits.shape[-1], is_fused(zs_RV.device),
                        zs_RV.device):
        st = _prepare(zs_RV[c], zt_RV[c], vocab_group)
        out[c] = _kl_of(beta_R[c], st, zs_RV[c], zt_RV[c], vocab_group, padded_vocab)
    return out.reshape(lead)
