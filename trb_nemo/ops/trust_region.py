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

Shape legend: ``R`` rows (leading dims flattened), ``V`` local vocab shard, ``P`` ranks of
``vocab_group`` (None = the whole vocabulary is local). ``vocab_size`` = true vocabulary size;
padded columns carry no probability. Inputs are never modified; all math is fp32: fp64 logits
are rounded to fp32 first, and the guarantees (feasibility, maximality) hold for the rounded
logits (the rounding of |z| ~ 1e3 moves the KL by about 1e-5 relative).
"""

from __future__ import annotations

import math

import torch

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
    all_reduce_sum,
    as_fp32_masked,
    gather_pair_sums,
    max_shift,
    own_max_shift,
    rows_lse,
)

FEASIBILITY_MARGIN = 1e-6
"""Relative slack of the budget: the returned beta has KL(mu_beta || pi_S) <= eps (1 + margin),
the exact (float64) KL of the fp32-rounded logits. Each iterate's fp32 KL comes with a bound
err on its rounding error (_kl_at); the solver aims at min(eps, eps (1 + margin) - err), i.e.
at eps itself whenever err <= margin * eps, so beta is the largest feasible one up to
about err / (d KL / d beta) (the margin keeps maximality where KL is flat in beta)."""
_U = 2.0**-24
"""fp32 unit roundoff: every error bound here is a multiple of it."""
_EXP_ERROR = 2.0
"""Relative error of fp32 exp / expm1 in units of _U (one ulp)."""
_TINY = torch.finfo(torch.float32).tiny
_OVERFLOW = 40.0
"""A row where some log p + u exceeds this (u the shifted tilt, see _tilt_sums) takes the
max-shifted form; below it, V e^40 |u|^3 stays far inside fp32. With the shift the tilted
weights are about mu / p, so this needs a shift (_log_z_model) off by more than 40."""


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


@kernel
def _tilt_sums(zs_RV, zt_RV, row_R5, beta_R4):
    """[R, 14] local sums of the tilt at (beta, c, m, s) = beta_R4 on the common support: with
    d = g - E_p[g], u = beta d - c (c ~ log E_p[e^(beta d)], _log_z_model), w = p e^u, and
    guesses m of E_mu[u] and s of 1 / E_p[e^u] (the rounding bound is tightest when they are
    right; v = s w is then about mu times the mass of the common support):

    0 p, 1 p (e^u - 1 - u), 2 u p (e^u - 1), 3 p (e^u - 1), 4 |p (e^u - 1)|, 5 w, 6 w u,
    7 w |u| (the KL two ways and their rounding, see _kl_at), 8 w (u - m)^2, 9 w (u - m)^3
    (Halley's derivatives), 10 |v (u - m - 1) + p| m_lp, 11 w |u - m| m_u, 12 w m_u
    (rounding sensitivity, _tilt_terms), 13 count of log w > 40.

    p (e^u - 1) is p u (1 + u phi2(u)) for |u| < 0.5 (full relative precision for small
    budgets) and e^(log p + u) - p beyond, which cannot overflow where w is representable (u
    alone can exceed 88 on peaked rows: a token with p = 1e-80 that the teacher likes)."""
    p, u, log_w, m_lp, m_u = _tilt_terms(zs_RV, zt_RV, row_R5, beta_R4)
    small = u.abs() < SMALL
    big_w = torch.exp(log_w.clamp(max=_OVERFLOW))
    pu = p * u
    pu_phi2 = pu * u * _phi2_small(u)
    pe = torch.where(small, pu + pu_phi2, big_w - p)
    w = torch.where(small, p + pe, big_w)
    p_phi2 = torch.where(small, pu_phi2, pe - pu)
    u_m = u - beta_R4[:, 2:3]
    wu2 = w * u_m * u_m
    v = w * beta_R4[:, 3:4]
    return torch.stack([
        p.sum(-1), p_phi2.sum(-1), (u * pe).sum(-1), pe.sum(-1), pe.abs().sum(-1), w.sum(-1),
        (w * u).sum(-1), (w * u.abs()).sum(-1), wu2.sum(-1), (wu2 * u_m).sum(-1),
        ((v * (u_m - 1) + p).abs() * m_lp).sum(-1), (w * u_m.abs() * m_u).sum(-1),
        (w * m_u).sum(-1),
        (log_w > _OVERFLOW).float().sum(-1),
    ], dim=-1)


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
    """


def _prepare(zs_RV, zt_RV, group):
    """Row statistics of one chunk of real columns: one pass over the logits.
    Collectives: 1 all-gather of [P, R, 16]."""
    ps = gather_pair_sums(_support_sums, zs_RV, zt_RV, 14, group)
    m_s, m_t, sc_s, sc_t = ps.m_s, ps.m_t, ps.scale_s, ps.scale_t
    if bool(torch.isnan(m_s).any() | torch.isnan(m_t).any()):
        raise ValueError("trust region: NaN in student or teacher logits")
    if bool((~torch.isfinite(m_s) | ~torch.isfinite(m_t)).any()):
        raise ValueError("trust region: a row has no finite student or teacher logit, or a +inf logit")
    (es, et, pc_P, p1, p2, p3, p4, qg, q_out, p_out,
     b_at_s, n_at_s, a_at_t, n_at_t) = ps.sums.unbind(-1)  # each [P, R]
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
    st.var_p = (m2 - mean**2).clamp_min(0.0).float()
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
    return st


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
    Rows where some log p + u > 40 take the max-shifted form (_tilted_lse) instead.
    Collectives: 1 all-reduce(SUM) of [R, 14] (+ 1 all-gather [P, R, 8] only if a row overflows).
    """
    shift = _log_z_model(beta_R, st)
    if guess_R2 is None:
        guess_R2 = torch.zeros((beta_R.shape[0], 2), dtype=beta_R.dtype, device=beta_R.device)
    guess, log_z_guess = guess_R2.unbind(-1)
    constants = torch.stack([beta_R, shift, guess, torch.exp(-log_z_guess)], dim=-1)
    local = (_tilt_sums(zs_RV, zt_RV, st.kernel_rows, constants)
             if zs_RV.shape[-1] > 0 else beta_R.new_zeros((beta_R.shape[0], _TILT_COLUMNS)))
    sums = all_reduce_sum(local, group)
    pc, s2, s3, pe, pe_abs, w, wu, wu_abs, wu2, wu3, a1, b1, b2, over = sums.unbind(-1)
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
    # B
    mean_b = wu / w
    second = wu2 / w  # E_mu[(u - guess)^2]
    y = pe / pc
    log_z_b = torch.where(y > -0.5, torch.log1p(y), torch.log(w / pc))
    kl_b = mean_b - log_z_b
    err_b = (rounding * (wu_abs / w + mean_b.abs() + torch.where(y > -0.5, pe_abs / pc, 2.0)
                         / (1 + y).clamp_min(_TINY)) + _U * (log_z_b.abs() + mean_b.abs()))
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
    # v |u - m - 1| m_lp <= 2 v (|u - m| + 1) m_u, as m_lp <= 2 m_u (_tilt_terms)
    scale = constants[:, 3]
    misses = _U * (2 * scale * ((ratio - 1).abs() * (b1 + b2) + miss * ratio * b2) / pc
                   + miss * b2 / w)
    err = (torch.minimum(err_a, err_b) + _U * (a1 / pc + b1 / w) + misses
           + 2 * _U * (kl.abs() + st.log_mass_common.abs()))
    if bool(over.any()):
        big_kl, big_mean, big_var, big_err, big_log_z = _tilted_lse(
            beta_R, shift, st, zs_RV, zt_RV, group, pc, rounding)
        big = over > 0
        kl = torch.where(big, big_kl, kl)
        mean_b = torch.where(big, big_mean, mean_b)
        var = torch.where(big, big_var, var)
        third = torch.where(big, torch.zeros_like(third), third)
        err = torch.where(big, big_err, err)
        misses = torch.where(big, torch.zeros_like(misses), misses)
        log_z_b = torch.where(big, big_log_z, log_z_b)
    return kl.clamp_min(0.0), var, third, err, misses, mean_b, log_z_b


def _tilted_lse(beta_R, shift_R, st, zs_RV, zt_RV, group, pc_R, rounding):
    """Max-shifted (overflow-safe) KL, E_mu[u], Var_mu[u], error bound and log Z of the tilt:
    form B of _kl_at with a cruder element bound (eager; only called when some row has
    log p + u > 40). Collectives: 1 all-gather [P, R, 8]."""
    p, u, log_w, m_lp, m_u = _tilt_terms(zs_RV, zt_RV, st.kernel_rows,
                                         torch.stack([beta_R, shift_R], dim=-1))
    m_R = log_w.amax(-1) if log_w.shape[-1] > 0 else beta_R.new_full(beta_R.shape, NEG_INF)
    safe = torch.where(torch.isfinite(m_R), m_R, torch.zeros_like(m_R))
    e = torch.exp(log_w - safe.unsqueeze(-1))
    eu = e * u
    local = torch.stack([m_R, e.sum(-1), eu.sum(-1), (eu * u).sum(-1), (e * m_lp).sum(-1),
                         (e * m_lp * m_lp).sum(-1), (e * m_u * m_u).sum(-1),
                         (p * m_lp).sum(-1)], dim=-1)
    gathered = all_gather_rows(local, group)
    big, scale = max_shift(gathered[..., 0])
    s0, s1, s2, l1, l2, t2 = ((gathered[..., i] * scale).sum(0) for i in range(1, 7))
    p_mlp = gathered[..., 7].sum(0)
    s0 = s0.clamp_min(_TINY)
    mean = s1 / s0
    second = s2 / s0
    var = (second - mean * mean).clamp_min(0.0)
    log_z = torch.where(torch.isfinite(big), big, torch.zeros_like(big)) + torch.log(s0 / pc_R)
    kl = mean - log_z - st.log_mass_common
    # |d KL / d log p_j| <= mu_j |u_j - E_mu u| + mu_j + p_j
    element = ((var * l2 / s0).sqrt() + l1 / s0 + p_mlp / pc_R + (var * t2 / s0).sqrt())
    err = (rounding * (second.sqrt() + mean.abs() + 2) + 2 * _U * (log_z.abs() + mean.abs())
           + _U * element + 2 * _U * (kl.abs() + st.log_mass_common.abs()))
    return kl, mean, var, err, log_z


def _edge_kl(beta_R, st, interior_kl):
    """KL at the exact ends: 0 at beta = 0, KL(q || p) at beta = 1, interior otherwise."""
    kl = torch.where(beta_R <= 0, torch.zeros_like(interior_kl), interior_kl)
    return torch.where(beta_R >= 1, st.kl_teacher, kl)


def _inputs(student_logits, teacher_logits, per_row, name, vocab_size, group):
    """([R, V'] real columns of each shard (views), [R] fp32 per-row values, leading shape)."""
    zs_RV, zt_RV, lead = flat_pair(student_logits, teacher_logits)
    values_R = _per_row(per_row, lead, student_logits.device, name)
    n = valid_count(zs_RV.shape[-1], vocab_size, group)
    return zs_RV[:, :n], zt_RV[:, :n], values_R, lead


def _per_row(value, lead, device, name) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")
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
    beta = 1 where KL(pi_T || pi_S) <= eps; otherwise a safeguarded Halley solve on
    f(beta) = KL - eps with f' = beta Var_mu[r] and f'' = Var_mu[r] + beta kappa_3,mu[r], from
    the root of the small-budget expansion KL ~ k2 b^2/2 + k3 b^3/3 + k4 b^4/8 (cumulants of r
    under pi_S), aiming half a tolerance below the root so that the last iterate is feasible;
    bisection when a step leaves the bracket. All rows of a chunk iterate together; every rank
    takes identical branches.

    Contract, for the exact (float64) KL of the logits rounded to fp32 and beta* the largest
    beta with KL <= eps: the returned beta has KL(mu_beta || pi_S) <= eps (1 + FEASIBILITY_MARGIN)
    and |beta - beta*| <~ tolerance * beta* + (err + max(0, err - margin * eps)) / (d KL / d beta),
    err the bound on the fp32 KL's rounding at beta (_kl_at); beta exceeds beta* only by what
    the margin allows. Every iterate is checked with its own bound: it is feasible when its fp32
    KL is at most min(eps, eps (1 + margin) - err), and the returned beta is the last feasible
    one (the feasible end of the bracket); an iterate that fails only for the slack in its
    bound from the guesses of E_mu[u] and log Z it was summed with (after a long step) is
    evaluated again with this pass's values (one more pass) rather than closing the bracket.
    beta = 1 is taken from KL(pi_T || pi_S) of the preparation only where that value plus its
    rounding bound is <= eps; rows within that bound of eps start the iteration at beta = 1,
    which checks it with the tilt's KL. Measured on random rows (vocabularies 5 to 1000, logits
    N(0, s^2) with s in [0.1, 10], eps in [1e-3, 5]): KL <= eps (1 + 1e-6) and
    |beta - beta*| < 1e-4 (tests/unit/test_trust_region_budget.py).

    Passes over the logits per row chunk: 1 to prepare + 1 per iteration (2 on random
    32k-vocabulary rows at eps = 0.02). Collectives per chunk: all-gather [P, R, 16] to
    prepare, all-reduce(SUM) [R, 14] per iteration, plus an
    all-gather [P, R, 8] in an iteration where some row's tilt would overflow exp.
    Memory: fused (:mod:`trb_nemo.ops.fused`), [P, R, 16] beyond the inputs; eagerly, about 30
    fp32 [rows_chunk, V] temporaries (rows_chunk from ROW_CHUNK_BYTES).
    """
    return _solve(student_logits, teacher_logits, eps, vocab_group, vocab_size, tolerance,
                  max_iterations)[0]


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
    both, and the solver's last feasible iterate is the returned beta, so its KL comes with no
    extra pass or collective (fp32, within its rounding bound of the exact KL; at beta = 1 it is
    KL(pi_T || pi_S) of the preparation, as kl_to_student gives it)."""
    return _solve(student_logits, teacher_logits, eps, vocab_group, vocab_size, tolerance,
                  max_iterations)


def _solve(student_logits, teacher_logits, eps, group, vocab_size, tolerance, max_iterations):
    zs_RV, zt_RV, eps_R, lead = _inputs(student_logits, teacher_logits, eps, "eps", vocab_size,
                                        group)
    if bool((eps_R < 0).any()):
        raise ValueError("eps must be >= 0")
    beta = torch.zeros(zs_RV.shape[0], dtype=torch.float32, device=zs_RV.device)
    kl = torch.zeros_like(beta)
    # rounding of the KL terms' sums over the vocabulary (the same on every rank)
    padded_vocab = student_logits.shape[-1] * group_size(group)
    # chunks from the padded width: every rank must make the same collectives
    for c in row_chunks(zs_RV.shape[0], student_logits.shape[-1], is_fused(zs_RV.device),
                        zs_RV.device):
        st = _prepare(zs_RV[c], zt_RV[c], group)
        beta[c], kl[c] = _solve_chunk(st, zs_RV[c], zt_RV[c], eps_R[c], group, tolerance,
                                      max_iterations, padded_vocab)
    return beta.reshape(lead), kl.reshape(lead)


def _kl_of(beta_R, st, zs_RV, zt_RV, group, padded_vocab):
    """KL(mu_beta || p) of prepared rows, exact at the ends of [0, 1]."""
    interior = beta_R.clamp(1e-12, 1 - 1e-12)
    kl = _kl_at(interior, st, zs_RV, zt_RV, group, _sum_rounding(padded_vocab),
                math.log(max(2, padded_vocab)))[0]
    return _edge_kl(beta_R, st, kl)


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


def _solve_chunk(st, zs_RV, zt_RV, eps_R, group, tolerance, max_iterations, padded_vocab):
    """(beta [R], KL(mu_beta || p) [R]) of one prepared chunk (solve_beta's docstring)."""
    rounding = _sum_rounding(padded_vocab)
    log_vocab = math.log(max(2, padded_vocab))
    budget = eps_R * (1 + FEASIBILITY_MARGIN)
    # KL(q || p) of the preparation is a difference of O(log V) terms: trusted only clear of eps
    teacher_error = 2 * (rounding + 3 * _U) * (2 * log_vocab + st.kl_teacher_scale)
    to_one = (eps_R > 0) & (st.kl_teacher + teacher_error <= eps_R)
    beta = torch.where(to_one, torch.ones_like(eps_R), torch.zeros_like(eps_R))
    kl_end = torch.where(to_one, st.kl_teacher, torch.zeros_like(eps_R))
    # KL jumps to -log p(common) just above beta = 0 when supp p is not inside supp q
    jump = -st.log_mass_common
    active = (eps_R > 0) & ~to_one & (jump < eps_R)
    if not bool(active.any()):
        return beta, kl_end
    near_one = active & (st.kl_teacher - teacher_error <= budget)  # checked precisely at 1
    lo, hi = torch.zeros_like(eps_R), torch.ones_like(eps_R)
    kl_lo = torch.zeros_like(eps_R)
    x = torch.where(near_one, torch.ones_like(eps_R), _first_guess(st, eps_R))
    # guesses of E_mu[u] = KL + log Z + log p(common) and of log Z = log E_p[e^u] (common
    # support) for the rounding bound: the budget and the cumulant model at first, then
    # extrapolated from the last iterate
    log_z = torch.where(near_one, torch.zeros_like(eps_R),
                        (0.5 * x * x * st.var_p - _log_z_model(x, st)).clamp_min(0.0))
    kl_guess = torch.where(near_one, st.kl_teacher, eps_R)
    guess = torch.stack([kl_guess + log_z + st.log_mass_common, log_z], dim=-1)
    done = ~active
    for _ in range(max_iterations):
        kl, var, third, err, misses, mean_u, log_z = _kl_at(x, st, zs_RV, zt_RV, group,
                                                             rounding, log_vocab, guess)
        target = torch.minimum(eps_R, budget - err)
        feasible = kl <= target
        # infeasible only for the guesses' misses (after a long step; they add at most about
        # 2 misses to err): evaluate the same beta again with this pass's E_mu[u] and log Z
        retry = ~done & ~feasible & (kl <= torch.minimum(eps_R, budget - err + 2 * misses))
        lo = torch.where(~done & feasible, x, lo)
        kl_lo = torch.where(~done & feasible, kl, kl_lo)
        hi = torch.where(~done & ~feasible & ~retry, x, hi)
        # d KL / d beta = beta Var_mu[d] = Var_mu[u] / beta, and the second derivative
        slope = (var / x).clamp_min(1e-30)
        curve = (var + third) / (x * x)
        # the step to the target (convergence test) and the Halley step to half a tolerance
        # below it (the next iterate), Newton where Halley's correction is large (the local
        # quadratic model is off)
        to_target = (kl - target) / slope
        aim = kl - target + 0.5 * tolerance * x * slope
        newton = aim / slope
        denominator = 1 - aim * curve / (2 * slope * slope)
        step = torch.where((denominator > 0.5) & (denominator < 2), newton / denominator, newton)
        nxt = x - step
        converged = feasible & (to_target.abs() <= tolerance * x.clamp_min(1e-3))
        converged |= ((hi - lo) <= tolerance * lo.clamp_min(1e-3)) & ~retry
        done = done | converged
        if bool(done.all()):
            break
        inside = (nxt > lo) & (nxt < hi) & torch.isfinite(nxt)
        x_new = torch.where(retry, x, torch.where(inside, nxt, 0.5 * (lo + hi)))
        # d log Z / d beta = E_mu[d] - dc / dbeta, E_mu[d] = (E_mu[u] + c) / beta
        shift, shift_new = _log_z_model(x, st), _log_z_model(x_new, st)
        log_z_new = log_z + (x_new - x) * (mean_u + shift) / x - (shift_new - shift)
        log_z_new = log_z_new.clamp_min(0.0)
        kl_new = (kl + slope * (x_new - x)).clamp_min(0.0)
        guess = torch.stack([kl_new + log_z_new + st.log_mass_common, log_z_new], dim=-1)
        guess = torch.where(torch.isfinite(guess), guess, torch.zeros_like(guess))
        x = x_new
    # at beta = 1 the KL reported is the preparation's KL(q || p), as kl_to_student gives it
    kl_lo = torch.where(lo >= 1, st.kl_teacher, kl_lo)
    return torch.where(active, lo, beta), torch.where(active, kl_lo, kl_end)


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
    """KL(mu_beta || pi_S) per row: [...] fp32 (0 at beta = 0, KL(pi_T || pi_S) at beta = 1).

    Passes per row chunk: 2. Collectives per chunk: solve_beta's preparation + 1
    all-reduce(SUM) of [R, 14].
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
