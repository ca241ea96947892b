"""Unsharded float64 references for the vocab-parallel ops (written for clarity, not speed)."""

import math

import torch

NEG_INF = float("-inf")


def masked(z, vocab_size=None):
    z = z.double().clone()
    if vocab_size is not None:
        z[..., vocab_size:] = NEG_INF
    return z


def log_softmax(z, vocab_size=None):
    return torch.log_softmax(masked(z, vocab_size), dim=-1)


def behavior_logprobs(zs, zt, beta, vocab_size=None):
    """log mu_beta with the exact support rules (beta=0 -> p, beta=1 -> q, else common support)."""
    lp, lq = log_softmax(zs, vocab_size), log_softmax(zt, vocab_size)
    beta = torch.as_tensor(beta, dtype=torch.float64, device=lp.device).expand(lp.shape[:-1]).unsqueeze(-1)
    common = torch.isfinite(lp) & torch.isfinite(lq)
    mixed = torch.where(common, (1 - beta) * torch.where(common, lp, 0) + beta * torch.where(common, lq, 0),
                        torch.full_like(lp, NEG_INF))
    x = torch.where(beta <= 0, lp, torch.where(beta >= 1, lq, mixed))
    return torch.log_softmax(x, dim=-1)


def kl(la, lb):
    """KL(a || b) per row from log-probs; inf where a has mass b lacks."""
    pa = la.exp()
    support = pa > 0
    # fill before multiplying so the unselected branch carries no inf/NaN into the gradient
    diff = torch.where(support, la, torch.zeros_like(la)) - torch.where(support, lb, torch.zeros_like(lb))
    return torch.where(support, pa * diff, torch.zeros_like(pa)).sum(-1)


def kl_to_student(zs, zt, beta, vocab_size=None):
    return kl(behavior_logprobs(zs, zt, beta, vocab_size), log_softmax(zs, vocab_size))


def bisect_beta(zs, zt, eps, vocab_size=None, halvings=60):
    """Largest feasible beta per row by bisection on [0, 1] (60 halvings), float64."""
    lead = zs.shape[:-1]
    eps = torch.as_tensor(eps, dtype=torch.float64, device=zs.device).expand(lead)
    lo = torch.zeros(lead, dtype=torch.float64, device=zs.device)
    hi = torch.ones(lead, dtype=torch.float64, device=zs.device)
    full = kl_to_student(zs, zt, 1.0, vocab_size)
    for _ in range(halvings):
        mid = (lo + hi) / 2
        ok = kl_to_student(zs, zt, mid, vocab_size) <= eps
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    beta = torch.where(full <= eps, torch.ones_like(lo), lo)
    return torch.where(eps <= 0, torch.zeros_like(beta), beta)


def reverse_kl_full(zs, zt, vocab_size=None):
    return kl(log_softmax(zs, vocab_size), log_softmax(zt, vocab_size))


def veto_kl(zs, zt, b, direction, vocab_size=None):
    """Veto's loss in float64: Q = softmax(z_T + b sg(z_S)); forward KL(Q || p) or reverse
    KL(p || Q), differentiable through p only."""
    zt_m = masked(zt, vocab_size)
    x = zt_m if b == 0 else zt_m + b * masked(zs, vocab_size).detach()
    lq, lp = torch.log_softmax(x, dim=-1), log_softmax(zs, vocab_size)
    return kl(lq, lp) if direction == "forward" else kl(lp, lq)


def reverse_kl_support(zs, zt, ids, vocab_size=None, gradient="support"):
    """Value sum_j w_j (lp_j - lq_j) and a surrogate with the chosen gradient: ``support`` =
    autograd of KL(w || q) with w the student renormalized on the ids (no gradient outside
    them); ``policy`` = the policy-gradient form sum_j w_j d_j grad lp_j."""
    lp, lq = log_softmax(zs, vocab_size), log_softmax(zt, vocab_size)
    lp_k, lq_k = lp.gather(-1, ids), lq.gather(-1, ids)
    w = torch.softmax(lp_k, dim=-1)
    coef = w * (lp_k - lq_k)
    value = coef.sum(-1)
    if gradient == "support":
        surrogate = (w * (torch.log_softmax(lp_k, dim=-1) - lq_k)).sum(-1)
    else:
        surrogate = (coef.detach() * lp_k).sum(-1)
    return value, surrogate


def chi_square_pvalue(counts, probs):
    """Pearson chi-square goodness of fit; bins with expected < 5 are merged."""
    from scipy.stats import chisquare

    n = counts.sum()
    expected = probs * n
    order = torch.argsort(expected, descending=True)
    counts, expected = counts[order].double(), expected[order]
    keep = expected >= 5
    c = torch.cat([counts[keep], counts[~keep].sum().unsqueeze(0)])
    e = torch.cat([expected[keep], expected[~keep].sum().unsqueeze(0)])
    if e[-1] < 5:
        c, e = c[:-1].clone(), e[:-1].clone()
        c[-1] += counts[~keep].sum()
        e[-1] += expected[~keep].sum()
    return float(chisquare(c.numpy(), e.numpy() * (c.sum() / e.sum()).item()).pvalue)


assert math.isinf(NEG_INF)
