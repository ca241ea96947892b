"""The vocab-parallel ops with their row kernels compiled (torch.compile, C++ on this CPU) pass
the same float64-reference and invariant checks as eagerly: the checks are imported from
test_ops.py and run here with ``trb_nemo.ops.fused`` set to ``on``.

The first test in this module pays for compiling the kernels (tens of seconds on 2 cores).
Run: .venv/bin/python -m pytest tests/unit/test_ops_fused.py
"""

import warnings

import pytest
import torch
from test_ops import (  # noqa: F401  (collected here, run fused)
    _logits,
    stop_ids_against_canonical_copies,
    test_behavior_logprobs_and_kl_match_reference,
    test_bf16_inputs_are_solved_in_fp32,
    test_edge_cases_of_the_budget,
    test_full_reverse_kl_finite_differences,
    test_full_reverse_kl_values_and_gradients,
    test_inputs_are_not_modified,
    test_nan_and_negative_eps_raise,
    test_padded_vocabulary_is_ignored,
    test_peaked_and_infinite_logits,
    test_reverse_kl_of_a_distribution_with_itself_is_zero,
    test_solve_beta_and_kl_equals_the_two_calls,
    test_solve_beta_hypothesis,
    test_solve_beta_is_feasible_and_maximal,
    test_solve_beta_per_row_eps_tensor,
    test_very_peaked_rows_with_huge_tilts,
)

from trb_nemo.ops import fused, losses, trust_region


@pytest.fixture(autouse=True)
def compiled_kernels():
    fused.set_mode("on")
    yield
    fused.set_mode("auto")


def test_kernels_really_run_compiled():
    assert fused.is_fused(torch.device("cpu"))
    tell = fused.kernel(lambda x: x + float(torch.compiler.is_compiling()))
    assert torch.equal(tell(torch.zeros(3, 4)), torch.ones(3, 4))
    fused.set_mode("off")
    assert torch.equal(tell(torch.zeros(3, 4)), torch.zeros(3, 4))


def test_a_kernel_that_cannot_compile_warns_and_runs_eagerly():
    def data_dependent(x):  # .item() in a branch: Dynamo cannot capture it as one graph
        return x.sum(-1) if x.sum().item() > 0 else -x.sum(-1)

    from trb_nemo.ops.shards import row_chunks

    k = fused.kernel(data_dependent)
    x = torch.randn(4, 5)
    cpu = torch.device("cpu")
    assert len(list(row_chunks(4096, 151936, fused.is_fused(cpu)))) == 1  # fused: all rows
    with pytest.warns(UserWarning, match="data_dependent failed to compile"):
        assert torch.equal(k(x), data_dependent(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stays eager: no second warning
        assert torch.equal(k(-x), data_dependent(-x))
    # every caller now chunks rows for the eager kernels, not the all-rows fused chunk
    assert not fused.is_fused(cpu)
    assert len(list(row_chunks(4096, 151936, fused.is_fused(cpu)))) > 1


def test_fused_equals_eager():
    zs, zt = _logits(64, 300, scale=3.0, seed=5)
    zs, zt = zs.float(), zt.float()
    eps = torch.logspace(-5, 0.5, 64)
    beta_f, kl_f = trust_region.solve_beta_and_kl(zs, zt, eps, vocab_size=290)
    x = zs.clone().requires_grad_(True)
    w = torch.arange(64.0)
    (losses.reverse_kl(x, zt, vocab_size=290) * w).sum().backward()
    fused.set_mode("off")
    beta_e, kl_e = trust_region.solve_beta_and_kl(zs, zt, eps, vocab_size=290)
    y = zs.clone().requires_grad_(True)
    (losses.reverse_kl(y, zt, vocab_size=290) * w).sum().backward()
    assert (beta_f - beta_e).abs().max() <= 1e-5
    assert torch.allclose(kl_f, kl_e, rtol=1e-4, atol=1e-9)
    assert (x.grad - y.grad).abs().max() <= 1e-5 * y.grad.abs().max(), (x.grad - y.grad).abs().max()
    assert torch.all(x.grad[:, 290:] == 0)


def test_stop_ids_equal_the_losses_of_canonical_copies_compiled():
    """Compiled kernels apply the EOS merge by index arithmetic in registers; the gradient's keep
    column is recomputed from [R] values outside the kernel (an eager exp, not the kernel's):
    values equal, gradients to 1e-6 (padded vocabulary, stop ids on both sides)."""
    for name, (value, grad), (want_value, want_grad) in stop_ids_against_canonical_copies(
            torch.float64, 6, 20):
        assert torch.equal(torch.isfinite(value), torch.isfinite(want_value)), name
        assert torch.allclose(value, want_value, rtol=0, atol=1e-6, equal_nan=True), name
        assert torch.allclose(grad, want_grad, rtol=0, atol=1e-6, equal_nan=True), name
        if name in ("full", "veto0", "veto", "veto_rev"):  # padding: the kernels' masked columns
            assert torch.all(grad[:, 18:] == 0), name
