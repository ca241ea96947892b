"""TRB behavior policy: the most teacher-like distribution inside a KL trust region (paper Eq. 1-2).

At every prefix, with p = pi_S and q = pi_T (after EOS canonicalization):

    mu_beta ∝ p^(1-beta) q^beta,   beta* = max{beta in [0, 1] : KL(mu_beta || p) <= eps}

With r = log q - log p on the common support and A(beta) = log sum p exp(beta r),
KL(mu_beta || p) = beta A'(beta) - A(beta) and d/dbeta KL = beta Var_mu[r] >= 0 (monotone).
Any constant shift c of r leaves this invariant; the solver uses c = E_p[r], which keeps both
terms O(beta^2) and avoids cancellation in fp32. Support edge cases are exact: for 0 < beta < 1,
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

from trb_nemo.ops.fused import SMALL, expm1_small, is_fused, kernel
from trb_nemo.ops.vocab_parallel import (
    NEG_INF,
    all_gather_rows,
    all_reduce_sum,
    as_fp32_masked,
    gather_pair_sums,
    group_size,
    max_shift,
    own_max_shift,
    row_chunks,
    rows_lse,
    valid_columns,
    valid_count,
)

FEASIBILITY_MARGIN = 1e-6
"""The solver aims at KL <= eps (1 - margin) - (fp32 rounding of the KL terms), so the returned
beta is feasible for the exact (float64) KL as well; the cost in beta is ~margin * beta / 2."""
_F32_EPS = 2.0**-23
_TINY = torch.finfo(torch.float32).tiny
_OVERFLOW = 40.0
"""A row where some log p + beta d exceeds this takes the max-shifted form (then Z > e^40 while
E_p[beta d] = 0: mu is far from p and its KL needs no fp32 subtlety); below it, V e^40 |d|^3
stays far inside fp32."""


# ------------------------------------------------------------------------------- row kernels
# Notation inside the kernels, per row: m_s, m_t the maxima of the student and teacher logits
# (the shard's own in _support_sums, the global ones in _tilt_sums); a = z_S - m_s and
# b = z_T - m_t (<= 0); the common support is where both are finite; g = b - a there, so
# log q - log p = r = g - (log_t - log_s) with log_s = log sum e^a (global maxima).


@kernel
def _support_sums(zs_RV, zt_RV):
    """[R, 12] of one shard, in one read of it (the maxima, then sums while the row is cached):
    m_s, m_t, then with the shard's own maxima: sums of e^a, e^b; over the common support e^a g^k
    (k = 0..4) and e^b g; e^b outside supp p; e^a outside supp q."""
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
    ], dim=-1)


@kernel
def _tilt_sums(zs_RV, zt_RV, row_R5, beta_R1):
    """[R, 8] local sums of the tilt w = p e^t, t = beta d, on the common support, d = g - E_p[g]:
    p, p (e^t - 1), w d, w d^2, w d^3, w |d|, w (|log p| + |r|) and the count of log p + t > 40
    (where the sums could overflow fp32).

    p (e^t - 1) is p expm1(t) for |t| < 0.5 (full relative precision for small budgets) and
    e^(log p + t) - p beyond, which cannot overflow where p e^t is representable (t alone can
    exceed 88 on peaked rows: a token with p = 1e-80 that the teacher likes)."""
    a = zs_RV.float() - row_R5[:, 0:1]
    b = zt_RV.float() - row_R5[:, 1:2]
    common = (a > NEG_INF) & (b > NEG_INF)
    lp = a - row_R5[:, 2:3]
    g = torch.where(common, b - a, 0.0)
    d = torch.where(common, g - row_R5[:, 3:4], 0.0)
    p = torch.where(common, torch.exp(lp), 0.0)
    t = beta_R1 * d
    log_w = torch.where(common, lp + t, NEG_INF)
    pe = torch.where(t.abs() < SMALL, p * expm1_small(t), torch.exp(log_w.clamp(max=_OVERFLOW)) - p)
    w = p + pe
    wd = w * d
    wd2 = wd * d
    abs_logs = torch.where(common, lp.abs() + (g - row_R5[:, 4:5]).abs(), 0.0)
    return torch.stack([
        p.sum(-1), pe.sum(-1), wd.sum(-1), wd2.sum(-1), (wd2 * d).sum(-1), (w * d.abs()).sum(-1),
        (w * abs_logs).sum(-1), (log_w > _OVERFLOW).float().sum(-1),
    ], dim=-1)


# ------------------------------------------------------------------------------ row statistics


class _RowStats:
    """Per-row quantities of one chunk that every TP rank agrees on (combined over the group).

    kernel_rows: [R, 5] (m_s, m_t, log_s, E_p[g | common], log_t - log_s) for _tilt_sums;
    var_p, k3, k4: cumulants of g under p restricted to the common support (the first guess);
    log_mass_common: log p(common support) [R]; kl_teacher: KL(q || p) [R] (inf when supp q
    is not inside supp p); mean_r_abs: |E_p[r]| [R].
    """


def _prepare(zs_RV, zt_RV, group):
    """Row statistics of one chunk of real columns: one pass over the logits.
    Collectives: 1 all-gather of [P, R, 12]."""
    ps = gather_pair_sums(_support_sums, zs_RV, zt_RV, 10, group)
    m_s, m_t, sc_s, sc_t = ps.m_s, ps.m_t, ps.scale_s, ps.scale_t
    if bool(torch.isnan(m_s).any() | torch.isnan(m_t).any()):
        raise ValueError("trust region: NaN in student or teacher logits")
    if bool((~torch.isfinite(m_s) | ~torch.isfinite(m_t)).any()):
        raise ValueError("trust region: a row has no finite student or teacher logit, or a +inf logit")
    es, et, pc_P, p1, p2, p3, p4, qg, q_out, p_out = ps.sums.unbind(-1)  # each [P, R]
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
    st.mean_r_abs = (mean - (log_t - log_s)).abs().float()
    return st


def _kl_at(beta_R, st, zs_RV, zt_RV, group):
    """Interior (0 < beta < 1) KL(mu_beta || p), Var_mu[d], E_mu[(d - E_mu d)^3] and the scale
    of their rounding error.

    With t = beta d and p restricted to the common support (mass pc, as summed here):
    Z = sum p e^t = pc + E, E = sum p (e^t - 1) computed directly (see _tilt_sums), so
    log Z = log pc + log1p(E/pc) and KL = beta E_mu[d] - log Z keep full fp32 relative precision
    down to tiny budgets (the two terms are O(beta^2) because E_p[d] = 0). Rows where some
    log p + t > 40 take the max-shifted log-sum-exp form instead.
    Collectives: 1 all-reduce(SUM) of [R, 8] (+ 1 all-gather [P, R, 4] only if a row overflows).
    """
    local = (_tilt_sums(zs_RV, zt_RV, st.kernel_rows, beta_R.unsqueeze(-1))
             if zs_RV.shape[-1] > 0 else beta_R.new_zeros((beta_R.shape[0], 8)))
    sums = all_reduce_sum(local, group)
    pc = sums[:, 0].clamp_min(_TINY)
    z = (pc + sums[:, 1]).clamp_min(_TINY)
    mean_d = sums[:, 2] / z
    second = sums[:, 3] / z
    var = (second - mean_d * mean_d).clamp_min(0.0)
    third = sums[:, 4] / z - 3 * mean_d * second + 2 * mean_d**3
    log_z = st.log_mass_common + torch.log1p(sums[:, 1] / pc)
    if bool(sums[:, 7].any()):
        lse_mean, lse_var, lse_log_z = _tilted_lse(beta_R, st, zs_RV, zt_RV, group)
        big = sums[:, 7] > 0
        mean_d = torch.where(big, lse_mean, mean_d)
        var = torch.where(big, lse_var, var)
        third = torch.where(big, torch.zeros_like(third), third)
        log_z = torch.where(big, lse_log_z, log_z)
    kl = beta_R * mean_d - log_z
    # rounding scales: absolute (the cancelling terms) and relative (log p, r and t are rounded
    # to their magnitude * 2^-24, e.g. for peaked rows; |t| <= |r| + |E_p r|)
    scale = beta_R * sums[:, 5] / z + st.log_mass_common.abs()
    relative = 4 * _F32_EPS * (sums[:, 6] / z + st.mean_r_abs)
    return kl.clamp_min(0.0), var, third, scale, relative


def _tilted_lse(beta_R, st, zs_RV, zt_RV, group):
    """Max-shifted (overflow-safe) mean, variance and log Z of the tilt (eager; only called when
    some row has log p + beta d > 40). Collectives: 1 all-gather [P, R, 4]."""
    k = st.kernel_rows
    a = zs_RV.float() - k[:, 0:1]
    b = zt_RV.float() - k[:, 1:2]
    common = (a > NEG_INF) & (b > NEG_INF)
    d = torch.where(common, (b - a) - k[:, 3:4], torch.zeros_like(a))
    u = torch.where(common, a - k[:, 2:3] + beta_R.unsqueeze(-1) * d, torch.full_like(a, NEG_INF))
    m_R = u.amax(-1) if u.shape[-1] > 0 else beta_R.new_full(beta_R.shape, NEG_INF)
    safe = torch.where(torch.isfinite(m_R), m_R, torch.zeros_like(m_R))
    w = torch.exp(u - safe.unsqueeze(-1))
    g = all_gather_rows(torch.stack([m_R, w.sum(-1), (w * d).sum(-1), (w * d * d).sum(-1)], -1), group)
    big, scale = max_shift(g[..., 0])
    s0, s1, s2 = ((g[..., i] * scale).sum(0) for i in (1, 2, 3))
    s0 = s0.clamp_min(_TINY)
    mean_d = s1 / s0
    log_z = torch.where(torch.isfinite(big), big, torch.zeros_like(big)) + torch.log(s0)
    return mean_d, (s2 / s0 - mean_d * mean_d).clamp_min(0.0), log_z


def _edge_kl(beta_R, st, interior_kl):
    """KL at the exact ends: 0 at beta = 0, KL(q || p) at beta = 1, interior otherwise."""
    kl = torch.where(beta_R <= 0, torch.zeros_like(interior_kl), interior_kl)
    return torch.where(beta_R >= 1, st.kl_teacher, kl)


def _flat(student_logits, teacher_logits):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same vocab shard)")
    v = student_logits.shape[-1]
    return student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), student_logits.shape[:-1]


def _inputs(student_logits, teacher_logits, per_row, name, vocab_size, group):
    """([R, V'] real columns of each shard (views), [R] fp32 per-row values, leading shape)."""
    zs_RV, zt_RV, lead = _flat(student_logits, teacher_logits)
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
    bisection when a step leaves the bracket. The returned beta is the feasible end of the
    bracket (KL <= eps, see FEASIBILITY_MARGIN), within ``tolerance`` (relative) of the largest
    feasible beta. All rows of a chunk iterate together; every rank takes identical branches.

    Passes over the logits per row chunk: 1 to prepare + 1 per iteration (2 on random
    32k-vocabulary rows at eps = 0.02). Collectives per chunk: all-gather [P, R, 12] to
    prepare, all-reduce(SUM) [R, 8] per iteration, plus an
    all-gather [P, R, 4] in an iteration where some row's tilt would overflow exp.
    Memory: fused (:mod:`trb_nemo.ops.fused`), [P, R, 12] beyond the inputs; eagerly, about 14
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
    both, and the solver's last iterate is the returned beta, so its KL comes with no extra pass
    or collective."""
    return _solve(student_logits, teacher_logits, eps, vocab_group, vocab_size, tolerance,
                  max_iterations)


def _solve(student_logits, teacher_logits, eps, group, vocab_size, tolerance, max_iterations):
    zs_RV, zt_RV, eps_R, lead = _inputs(student_logits, teacher_logits, eps, "eps", vocab_size,
                                        group)
    if bool((eps_R < 0).any()):
        raise ValueError("eps must be >= 0")
    beta = torch.zeros(zs_RV.shape[0], dtype=torch.float32, device=zs_RV.device)
    kl = torch.zeros_like(beta)
    # pairwise-summation rounding of the KL terms over the vocabulary (the same on every rank)
    padded_vocab = student_logits.shape[-1] * group_size(group)
    rounding = (2 + math.log2(max(2, padded_vocab))) * _F32_EPS
    # chunks from the padded width: every rank must make the same collectives
    for c in row_chunks(zs_RV.shape[0], student_logits.shape[-1], is_fused(zs_RV.device)):
        st = _prepare(zs_RV[c], zt_RV[c], group)
        beta[c], kl[c] = _solve_chunk(st, zs_RV[c], zt_RV[c], eps_R[c], group, tolerance,
                                      max_iterations, rounding)
    return beta.reshape(lead), kl.reshape(lead)


def _kl_of(beta_R, st, zs_RV, zt_RV, group):
    """KL(mu_beta || p) of prepared rows, exact at the ends of [0, 1]."""
    interior = beta_R.clamp(1e-12, 1 - 1e-12)
    return _edge_kl(beta_R, st, _kl_at(interior, st, zs_RV, zt_RV, group)[0])


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


def _solve_chunk(st, zs_RV, zt_RV, eps_R, group, tolerance, max_iterations, rounding):
    """(beta [R], KL(mu_beta || p) [R]) of one prepared chunk (solve_beta's docstring)."""
    to_one = (eps_R > 0) & (st.kl_teacher <= eps_R)
    beta = torch.where(to_one, torch.ones_like(eps_R), torch.zeros_like(eps_R))
    kl_end = torch.where(to_one, st.kl_teacher, torch.zeros_like(eps_R))
    # KL jumps to -log p(common) just above beta = 0 when supp p is not inside supp q
    jump = -st.log_mass_common
    active = (eps_R > 0) & ~to_one & (jump < eps_R)
    if not bool(active.any()):
        return beta, kl_end
    lo, hi = torch.zeros_like(eps_R), torch.ones_like(eps_R)
    kl_lo = torch.zeros_like(eps_R)
    x = _first_guess(st, eps_R)
    done = ~active
    for _ in range(max_iterations):
        kl, var, third, magnitude, relative = _kl_at(x, st, zs_RV, zt_RV, group)
        target = eps_R * (1 - FEASIBILITY_MARGIN - relative) - rounding * magnitude
        feasible = kl <= target
        lo = torch.where(~done & feasible, x, lo)
        kl_lo = torch.where(~done & feasible, kl, kl_lo)
        hi = torch.where(~done & ~feasible, x, hi)
        slope = (x * var).clamp_min(1e-30)
        curve = var + x * third
        # the step to the target (convergence test) and the Halley step to half a tolerance
        # below it (the next iterate), Newton where the Halley denominator is unsafe
        to_target = (kl - target) / slope
        aim = kl - target + 0.5 * tolerance * x * slope
        newton = aim / slope
        denominator = 1 - aim * curve / (2 * slope * slope)
        step = torch.where((denominator > 0.5) & torch.isfinite(denominator),
                           newton / denominator, newton)
        nxt = x - step
        converged = feasible & (to_target.abs() <= tolerance * x.clamp_min(1e-3))
        converged |= (hi - lo) <= tolerance * lo.clamp_min(1e-3)
        done = done | converged
        if bool(done.all()):
            break
        inside = (nxt > lo) & (nxt < hi) & torch.isfinite(nxt)
        x = torch.where(inside, nxt, 0.5 * (lo + hi))
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
    zs_RV, zt_RV, lead = _flat(student_logits, teacher_logits)
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
    all-reduce(SUM) of [R, 8].
    """
    zs_RV, zt_RV, beta_R, lead = _inputs(student_logits, teacher_logits, beta, "beta",
                                         vocab_size, vocab_group)
    out = torch.zeros(zs_RV.shape[0], dtype=torch.float32, device=zs_RV.device)
    for c in row_chunks(zs_RV.shape[0], student_logits.shape[-1], is_fused(zs_RV.device)):
        st = _prepare(zs_RV[c], zt_RV[c], vocab_group)
        out[c] = _kl_of(beta_R[c], st, zs_RV[c], zt_RV[c], vocab_group)
    return out.reshape(lead)
