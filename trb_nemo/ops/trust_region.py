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
padded columns carry no probability. Inputs are never modified; all math is fp32.
"""

from __future__ import annotations

import math

import torch

from trb_nemo.ops.vocab_parallel import (
    NEG_INF,
    all_gather_rows,
    all_reduce_sum,
    as_fp32_masked,
    combine_lse,
    group_size,
    local_lse_stats,
    row_chunks,
    rows_lse,
    valid_columns,
)

FEASIBILITY_MARGIN = 1e-6
"""The solver aims at KL <= eps (1 - margin) - (fp32 rounding of the KL terms), so the returned
beta is feasible for the exact (float64) KL as well; the cost in beta is ~margin * beta / 2."""
_F32_EPS = 2.0**-23


class _RowStats:
    """Per-row quantities of one chunk that every TP rank agrees on (combined over the group).

    lse_s, lse_t: global log-normalizers [R]; c: E_p[r | common support] [R];
    p_common: sum of p over the common support as computed [R];
    var_p: Var_p[r | common support] [R]; log_mass_common: log p(common support) [R];
    kl_teacher: KL(q || p) [R] (inf when supp q is not inside supp p).
    """


def _prepare(zs_RV, zt_RV, valid_V, group):
    """fp32 masked logits and the chunk's row statistics. Collectives: 2 (gather, sum)."""
    zs = as_fp32_masked(zs_RV, valid_V)
    zt = as_fp32_masked(zt_RV, valid_V)
    nan_R = (torch.isnan(zs).any(-1) | torch.isnan(zt).any(-1)).float()
    local = torch.cat([local_lse_stats(zs), local_lse_stats(zt), nan_R.unsqueeze(-1)], dim=-1)
    gathered = all_gather_rows(local, group)  # [P, R, 5]
    if bool(gathered[..., 4].any()):
        raise ValueError("trust region: NaN in student or teacher logits")
    st = _RowStats()
    st.lse_s = combine_lse(gathered[..., 0:2])
    st.lse_t = combine_lse(gathered[..., 2:4])
    if bool((~torch.isfinite(st.lse_s) | ~torch.isfinite(st.lse_t)).any()):
        raise ValueError("trust region: a row has no finite student or teacher logit")
    lp = zs - st.lse_s.unsqueeze(-1)
    lq = zt - st.lse_t.unsqueeze(-1)
    in_s, in_t = torch.isfinite(lp), torch.isfinite(lq)
    common = in_s & in_t
    r = torch.where(common, lq - lp, torch.zeros_like(lp))
    p = torch.exp(lp)  # 0 off supp p
    q = torch.exp(lq)
    p_common = torch.where(common, p, torch.zeros_like(p))
    sums = torch.stack([
        p_common.sum(-1),                                        # p(common)
        (p_common * r).sum(-1),                                  # sum p r
        (p_common * r * r).sum(-1),                              # sum p r^2
        torch.where(in_t & ~in_s, q, torch.zeros_like(q)).sum(-1),  # q mass outside supp p
        torch.where(common, q * r, torch.zeros_like(q)).sum(-1),    # KL(q || p) on common
        torch.where(in_s & ~in_t, p, torch.zeros_like(p)).sum(-1),  # p mass outside supp q
    ], dim=-1)
    sums = all_reduce_sum(sums, group)
    mass = sums[:, 0].clamp_min(torch.finfo(torch.float32).tiny)
    st.c = sums[:, 1] / mass
    st.var_p = (sums[:, 2] / mass - st.c * st.c).clamp_min(0.0)
    # normalize by the computed total, so a rounding of lse_s (|z| large) cancels out
    st.p_common = sums[:, 0]
    st.log_mass_common = torch.log1p(-sums[:, 5] / (sums[:, 0] + sums[:, 5]).clamp_min(1e-30))
    st.log_mass_common = torch.where(sums[:, 0] > 0, st.log_mass_common,
                                     torch.full_like(mass, NEG_INF))
    st.kl_teacher = torch.where(sums[:, 3] > 0, torch.full_like(mass, math.inf), sums[:, 4])
    d = torch.where(common, r - st.c.unsqueeze(-1), torch.zeros_like(r))
    lp_common = torch.where(common, lp, torch.full_like(lp, NEG_INF))
    return st, lp_common, d


def _kl_at(beta_R, st, lp_common, d, group):
    """Interior (0 < beta < 1) KL(mu_beta || p), Var_mu[r] and the scale of its rounding error.

    With t = beta d and p restricted to the common support (mass pc):
    Z = sum p e^t = pc + E, E = sum p expm1(t) computed directly, so log Z = log pc + log1p(E/pc)
    and KL = beta E_mu[d] - log Z keep full fp32 relative precision down to tiny budgets (the two
    terms are O(beta^2) because E_p[d] = 0). Rows where some t > 80 (e^t would overflow) take
    the max-shifted log-sum-exp form instead.
    Collectives: 1 all-reduce(SUM) of [R, 6] (+ 1 all-gather [P, R, 4] only if a row overflows).
    Temporaries: two fp32 [R, V].
    """
    t = beta_R.unsqueeze(-1) * d
    p = torch.exp(lp_common)
    overflow = (t > 80.0).any(-1).float()
    pe = p * torch.expm1(t.clamp(max=80.0))  # p (e^t - 1)
    w = p + pe  # p e^t: unnormalized mu on the common support
    common = torch.isfinite(lp_common)
    abs_logs = torch.where(common, lp_common.abs() + (d + st.c.unsqueeze(-1)).abs(),
                           torch.zeros_like(lp_common))  # |log p| + |log q - log p|
    sums = torch.stack([pe.sum(-1), (w * d).sum(-1), (w * d * d).sum(-1), (w * d.abs()).sum(-1),
                        overflow, (w * abs_logs).sum(-1)], dim=-1)
    sums = all_reduce_sum(sums, group)
    pc = st.p_common  # the same (rounded) p that E was summed with
    z = (pc + sums[:, 0]).clamp_min(torch.finfo(torch.float32).tiny)
    mean_d = sums[:, 1] / z
    var = (sums[:, 2] / z - mean_d * mean_d).clamp_min(0.0)
    log_z = st.log_mass_common + torch.log1p(sums[:, 0] / pc.clamp_min(torch.finfo(torch.float32).tiny))
    if bool(sums[:, 4].any()):
        lse_mean, lse_var, lse_log_z = _tilted_lse(beta_R, lp_common, d, group)
        big = sums[:, 4] > 0
        mean_d = torch.where(big, lse_mean, mean_d)
        var = torch.where(big, lse_var, var)
        log_z = torch.where(big, lse_log_z, log_z)
    kl = beta_R * mean_d - log_z
    # rounding scales: absolute (the cancelling terms) and relative (log p itself is rounded
    # to |log p| * 2^-24, e.g. for peaked rows with large logits)
    scale = beta_R * sums[:, 3] / z + st.log_mass_common.abs()
    relative = 4 * _F32_EPS * sums[:, 5] / z
    return kl.clamp_min(0.0), var, scale, relative


def _tilted_lse(beta_R, lp_common, d, group):
    """Max-shifted (overflow-safe) mean, variance and log Z of the tilt. 1 all-gather [P, R, 4]."""
    u = lp_common + beta_R.unsqueeze(-1) * d
    m_R = u.amax(-1)
    safe = torch.where(torch.isfinite(m_R), m_R, torch.zeros_like(m_R))
    w = torch.exp(u - safe.unsqueeze(-1))
    g = all_gather_rows(torch.stack([m_R, w.sum(-1), (w * d).sum(-1), (w * d * d).sum(-1)], -1), group)
    big = g[..., 0].amax(0)
    safe_big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    scale = torch.where(torch.isfinite(g[..., 0]), torch.exp(g[..., 0] - safe_big), torch.zeros_like(big))
    s0, s1, s2 = ((g[..., i] * scale).sum(0) for i in (1, 2, 3))
    s0 = s0.clamp_min(torch.finfo(torch.float32).tiny)
    mean_d = s1 / s0
    return mean_d, (s2 / s0 - mean_d * mean_d).clamp_min(0.0), safe_big + torch.log(s0)


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
    """([R, V], [R, V], [R] fp32 per-row values, valid columns, leading shape)."""
    zs_RV, zt_RV, lead = _flat(student_logits, teacher_logits)
    values_R = _per_row(per_row, lead, student_logits.device, name)
    valid = valid_columns(zs_RV.shape[-1], vocab_size, group, zs_RV.device)
    return zs_RV, zt_RV, values_R, valid, lead


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
    tolerance: float = 1e-6,
    max_iterations: int = 40,
) -> torch.Tensor:
    """Largest beta in [0, 1] with KL(mu_beta || pi_S) <= eps, per row: [...] fp32.

    ``eps``: float or tensor broadcastable to the leading dims, >= 0. beta = 0 where eps = 0;
    beta = 1 where KL(pi_T || pi_S) <= eps; otherwise a safeguarded Newton solve (f' = beta
    Var_mu[r]) from the small-budget guess sqrt(2 eps / Var_p[r]), bisection when a step leaves
    the bracket. The returned beta is the feasible end of the bracket (KL <= eps, see
    FEASIBILITY_MARGIN) and within ``tolerance`` (relative) of the largest feasible beta.
    All rows of a chunk iterate together and every rank takes identical branches.

    Collectives per row chunk: 2 to prepare (all-gather [P, R, 5], all-reduce [R, 6]) + 1
    all-reduce(SUM) of [R, 6] per iteration (7 on random 32k-vocab rows at eps = 0.02), plus an
    all-gather [P, R, 4] in an iteration where some row's tilt would overflow exp. Peak memory per chunk: four fp32
    [rows_chunk, V] temporaries (masked logits as needed, log p, r - c, the tilted weights).
    """
    return _solve(student_logits, teacher_logits, eps, vocab_group, vocab_size, tolerance,
                  max_iterations, with_kl=False)[0]


def solve_beta_and_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    eps,
    *,
    vocab_group=None,
    vocab_size: int | None = None,
    tolerance: float = 1e-6,
    max_iterations: int = 40,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(solve_beta(...), kl_to_student(..., beta)) from one preparation of each row chunk: the
    decoding hot path needs both. Collectives: solve_beta's + 1 all-reduce(SUM) [R, 6] per chunk."""
    return _solve(student_logits, teacher_logits, eps, vocab_group, vocab_size, tolerance,
                  max_iterations, with_kl=True)


def _solve(student_logits, teacher_logits, eps, group, vocab_size, tolerance, max_iterations,
           with_kl):
    zs_RV, zt_RV, eps_R, valid, lead = _inputs(student_logits, teacher_logits, eps, "eps",
                                               vocab_size, group)
    if bool((eps_R < 0).any()):
        raise ValueError("eps must be >= 0")
    beta = torch.zeros(zs_RV.shape[0], dtype=torch.float32, device=zs_RV.device)
    kl = torch.zeros_like(beta) if with_kl else None
    for c in row_chunks(zs_RV.shape[0], zs_RV.shape[-1]):
        st, lp_common, d = _prepare(zs_RV[c], zt_RV[c], valid, group)
        beta[c] = _solve_chunk(st, lp_common, d, eps_R[c], group, tolerance, max_iterations)
        if with_kl:
            kl[c] = _kl_of(beta[c], st, lp_common, d, group)
    return beta.reshape(lead), (kl.reshape(lead) if with_kl else None)


def _kl_of(beta_R, st, lp_common, d, group):
    """KL(mu_beta || p) of prepared rows, exact at the ends of [0, 1]."""
    interior = beta_R.clamp(1e-12, 1 - 1e-12)
    return _edge_kl(beta_R, st, _kl_at(interior, st, lp_common, d, group)[0])


def _solve_chunk(st, lp_common, d, eps_R, group, tolerance, max_iterations):
    beta = torch.zeros_like(eps_R)
    to_one = (eps_R > 0) & (st.kl_teacher <= eps_R)
    beta = torch.where(to_one, torch.ones_like(beta), beta)
    # KL jumps to -log p(common) just above beta = 0 when supp p is not inside supp q
    jump = -st.log_mass_common
    active = (eps_R > 0) & ~to_one & (jump < eps_R)
    if not bool(active.any()):
        return beta
    lo = torch.zeros_like(eps_R)
    hi = torch.ones_like(eps_R)
    guess = torch.sqrt(2.0 * eps_R / st.var_p.clamp_min(1e-30))
    x = torch.where(torch.isfinite(guess), guess, torch.full_like(guess, 0.5)).clamp(1e-7, 1 - 1e-7)
    done = ~active
    # pairwise-summation rounding of the KL terms over the vocabulary
    rounding = (2 + math.log2(max(2, d.shape[-1] * group_size(group)))) * _F32_EPS
    for _ in range(max_iterations):
        kl, var, magnitude, relative = _kl_at(x, st, lp_common, d, group)
        target = eps_R * (1 - FEASIBILITY_MARGIN - relative) - rounding * magnitude
        feasible = kl <= target
        lo = torch.where(~done & feasible, x, lo)
        hi = torch.where(~done & ~feasible, x, hi)
        slope = x * var
        newton = x - (kl - target) / slope.clamp_min(1e-30)
        # from an infeasible point, aim as far below the root as the step is long: the next
        # iterate lands feasible, so the bracket closes from the feasible side too
        newton = torch.where(feasible, newton, newton - (x - newton).abs())
        gap = torch.where(feasible, newton - x, hi - lo)
        converged = feasible & (gap.abs() <= tolerance * x.clamp_min(1e-3))
        converged |= (hi - lo) <= tolerance * lo.clamp_min(1e-3)
        done = done | converged
        if bool(done.all()):
            break
        inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        x = torch.where(inside, newton, 0.5 * (lo + hi))
    return torch.where(active, lo, beta)


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
    zs_RV, zt_RV, beta_R, valid, _ = _inputs(student_logits, teacher_logits, beta, "beta",
                                             vocab_size, vocab_group)
    beta_R1 = beta_R.unsqueeze(-1)
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

    Collectives per row chunk: 2 to prepare + 1 all-reduce(SUM) of [R, 6].
    """
    zs_RV, zt_RV, beta_R, valid, lead = _inputs(student_logits, teacher_logits, beta, "beta",
                                                vocab_size, vocab_group)
    out = torch.zeros(zs_RV.shape[0], dtype=torch.float32, device=zs_RV.device)
    for c in row_chunks(zs_RV.shape[0], zs_RV.shape[-1]):
        st, lp_common, d = _prepare(zs_RV[c], zt_RV[c], valid, vocab_group)
        out[c] = _kl_of(beta_R[c], st, lp_common, d, vocab_group)
    return out.reshape(lead)
