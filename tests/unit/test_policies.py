"""Every behavior policy samples the distribution it declares: 100k draws of ``choose`` on one
prefix pass a chi-square test against ``exp(log_mu)`` (student at two temperatures, TRB, SKD
injection), padding never drawn; log_mu is normalized over the true vocabulary.

Run: .venv/bin/python -m pytest tests/unit/test_policies.py
"""

import ops_reference as ref
import pytest
import torch

from trb_nemo.methods.policies import InjectionPolicy, StudentPolicy, TrustRegionPolicy
from trb_nemo.ops.sampling import RowNoise

V_PAD, V_TRUE, ROWS = 16, 12, 100_000


def _logits():
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(1, V_PAD, generator=g) * 2
    zt = torch.randn(1, V_PAD, generator=g) * 2
    zs[:, V_TRUE:] = 30.0  # padding: must never be drawn
    zt[:, V_TRUE:] = 30.0
    return zs, zt


@pytest.mark.parametrize("policy", [StudentPolicy(1.0), StudentPolicy(0.5),
                                    TrustRegionPolicy("trb", 0.05), InjectionPolicy(3, 0.5)],
                         ids=["student", "student-T0.5", "trb", "skd"])
def test_choose_samples_log_mu(policy):
    zs, zt = _logits()
    mu = policy.log_mu(zs, zt, None, V_TRUE).double().exp()[0]
    assert abs(float(mu.sum()) - 1) < 1e-5 and torch.all(mu[V_TRUE:] == 0)
    noise = RowNoise(123, torch.arange(ROWS), torch.zeros(ROWS, dtype=torch.long))
    ids = policy.choose(zs.expand(ROWS, -1), zt.expand(ROWS, -1), noise, None, V_TRUE).ids
    counts = torch.bincount(ids, minlength=V_PAD)
    assert torch.all(counts[V_TRUE:] == 0)
    assert ref.chi_square_pvalue(counts, mu) > 1e-3


def test_declared_fields():
    assert TrustRegionPolicy("trb", 0.02).eps == 0.02
    assert StudentPolicy(0.7).temperature == 0.7
    assert InjectionPolicy(15, 0.2).tau == 0.2
    assert TrustRegionPolicy("trb", 0).needs_teacher() is False
