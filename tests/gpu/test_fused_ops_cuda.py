"""GPU-only: the op kernels compiled by Triton (``parallel.fused_ops=auto`` on CUDA) equal the
float64 references, for fp32 and bf16 logits with a padded vocabulary. Skipped without CUDA.

Run on a GPU machine: .venv/bin/python -m pytest tests/gpu/test_fused_ops_cuda.py
"""

import ops_reference as ref
import pytest
import torch

from trb_nemo.ops import fused, losses, trust_region

pytestmark = pytest.mark.gpu
ROWS, VOCAB, TRUE_VOCAB = 64, 4096, 4000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_match_the_reference(dtype):
    assert fused.is_fused(torch.device("cuda"))
    g = torch.Generator().manual_seed(3)
    zs = (torch.randn(ROWS, VOCAB, generator=g) * 3).to(dtype)
    zt = (zs.float() + torch.randn(ROWS, VOCAB, generator=g) * 2).to(dtype)
    eps = torch.logspace(-5, 0, ROWS)
    beta, kl = trust_region.solve_beta_and_kl(zs.cuda(), zt.cuda(), eps.cuda(), vocab_size=TRUE_VOCAB)
    assert fused.is_fused(torch.device("cuda"))  # still compiled after the solve
    zs64, zt64 = zs.double(), zt.double()
    want = ref.bisect_beta(zs64, zt64, eps.double(), TRUE_VOCAB)
    assert (beta.cpu().double() - want).abs().max() <= 1e-4
    realized = ref.kl_to_student(zs64, zt64, beta.cpu().double(), TRUE_VOCAB)
    assert torch.all(realized <= eps.double() * (1 + 1e-6) + 1e-12)
    assert torch.allclose(kl.cpu().double(), realized, rtol=1e-4, atol=1e-8)

    x = zs.cuda().requires_grad_(True)
    value = losses.reverse_kl(x, zt.cuda(), vocab_size=TRUE_VOCAB)
    value.sum().backward()
    assert fused.is_fused(torch.device("cuda"))  # and after the loss's forward and backward
    y = zs64.clone().requires_grad_(True)
    want_value = ref.reverse_kl_full(y, zt64, TRUE_VOCAB)
    want_value.sum().backward()
    assert torch.allclose(value.cpu().double(), want_value, atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradient output rounds to 2^-8
    assert torch.allclose(x.grad.cpu().double(), y.grad, atol=tol, rtol=tol)
