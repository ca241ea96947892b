"""Vocab-parallel ops on one process (vocab_group=None) against float64 references and invariants.

The sharded (TP=2, 4) versions of the same checks are in tests/dist/test_ops_sharded.py.
Run: .venv/bin/python -m pytest tests/unit/test_ops.py
"""

import math

import ops_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trb_nemo.methods import schedules
from trb_nemo.ops import eos, losses, sampling, trust_region, vocab_parallel

EPS_LIST = [1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.5, 3.0]


def _logits(rows, vocab, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale,
            torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale)


def _check_beta(zs, zt, eps, vocab_size=None, slack=1e-6):
    beta = trust_region.solve_beta(zs, zt, eps, vocab_size=vocab_size)
    want = ref.bisect_beta(zs, zt, eps, vocab_size)
    assert beta.dtype == torch.float32 and beta.shape == zs.shape[:-1]
    assert torch.all(torch.isfinite(beta))
    assert (beta.double() - want).abs().max().item() <= 1e-4, (beta, want)
    realized = ref.kl_to_student(zs, zt, beta.double(), vocab_size)
    eps_t = torch.as_tensor(eps, dtype=torch.float64)
    assert torch.all(realized <= eps_t * (1 + slack) + 1e-12), (realized, eps)
    return beta


@pytest.mark.parametrize("eps", EPS_LIST)
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_solve_beta_is_feasible_and_maximal(eps, scale):
    zs, zt = _logits(16, 50, scale, seed=int(scale * 10))
    _check_beta(zs, zt, eps)


def test_solve_beta_per_row_eps_tensor():
    zs, zt = _logits(6, 40)
    eps = torch.tensor([0.0, 1e-4, 1e-3, 1e-2, 0.1, 100.0])
    beta = _check_beta(zs, zt, eps)
    assert beta[0] == 0 and beta[-1] == 1


def test_edge_cases_of_the_budget():
    zs, zt = _logits(4, 30)
    assert torch.all(trust_region.solve_beta(zs, zt, 0.0) == 0)
    assert torch.all(trust_region.solve_beta(zs, zs.clone(), 1e-3) == 1)  # identical models
    kl_t = ref.kl(ref.log_softmax(zt), ref.log_softmax(zs))
    assert torch.all(trust_region.solve_beta(zs, zt, kl_t * 1.001) == 1)  # teacher inside
    assert torch.all(trust_region.solve_beta(zs, zt, 1e6) == 1)


def test_peaked_and_infinite_logits():
    zs, zt = _logits(8, 40, scale=1.0)
    zs[:, 0] += 80.0  # student nearly one-hot on 0
    zt[:, 1] += 80.0  # teacher nearly one-hot on 1
    zs[0, 5:10] = -math.inf  # student has no mass there; the teacher does
    zt[1, 10:20] = -math.inf  # teacher has no mass there; the student does
    zs[2, 3], zt[2, 3] = -math.inf, -math.inf
    for eps in [1e-4, 0.01, 1.0, 50.0]:
        _check_beta(zs, zt, eps)


@pytest.mark.parametrize("seed", range(12))
def test_very_peaked_rows_with_huge_tilts(seed):
    """Logit scales 30..100 (near one-hot rows): beta d exceeds 88 on tokens the student gives
    e^-200 and the teacher likes, yet the tilted weights p e^(beta d) stay small; the budget
    still holds to 1e-6 relative. Inputs are fp32 values (fp64 ones are rounded first)."""
    g = torch.Generator().manual_seed(seed)
    scale = 30.0 + 70.0 * torch.rand(1, generator=g).item()
    vocab = int(torch.randint(50, 300, (1,), generator=g))
    zs = (torch.randn(8, vocab, generator=g, dtype=torch.float64) * scale).float().double()
    zt = (torch.randn(8, vocab, generator=g, dtype=torch.float64) * scale).float().double()
    eps = 10 ** (torch.rand(8, generator=g, dtype=torch.float64) * 7 - 6)
    _check_beta(zs, zt, eps)


def test_bf16_inputs_are_solved_in_fp32():
    zs, zt = _logits(8, 64)
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    _check_beta(zs16.double(), zt16.double(), 0.01)
    beta = trust_region.solve_beta(zs16, zt16, 0.01)
    want = ref.bisect_beta(zs16.double(), zt16.double(), 0.01)
    assert (beta.double() - want).abs().max() <= 1e-4


def test_nan_and_negative_eps_raise():
    zs, zt = _logits(2, 10)
    zs_nan = zs.clone()
    zs_nan[1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        trust_region.solve_beta(zs_nan, zt, 0.01)
    with pytest.raises(ValueError, match="eps"):
        trust_region.solve_beta(zs, zt, -0.1)


def test_inputs_are_not_modified():
    zs, zt = _logits(3, 20)
    zs32, zt32 = zs.float(), zt.float()
    before = (zs32.clone(), zt32.clone())
    beta = trust_region.solve_beta(zs32, zt32, 0.01)
    trust_region.behavior_logprobs(zs32, zt32, beta)
    losses.reverse_kl(zs32, zt32)
    assert torch.equal(zs32, before[0]) and torch.equal(zt32, before[1])


@given(
    rows=st.integers(1, 4), vocab=st.integers(2, 40), scale=st.floats(0.01, 30.0),
    eps=st.floats(1e-5, 5.0), seed=st.integers(0, 10_000),
)
@settings(max_examples=40, deadline=None, derandomize=True)
def test_solve_beta_hypothesis(rows, vocab, scale, eps, seed):
    zs, zt = _logits(rows, vocab, scale, seed)
    _check_beta(zs, zt, eps)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_behavior_logprobs_and_kl_match_reference(beta):
    zs, zt = _logits(5, 33)
    zs[0, 2] = -math.inf
    got = trust_region.behavior_logprobs(zs, zt, beta)
    want = ref.behavior_logprobs(zs, zt, beta)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert (got.double()[finite] - want[finite]).abs().max() <= 1e-5
    kl = trust_region.kl_to_student(zs, zt, beta)
    assert torch.allclose(kl.double(), ref.kl_to_student(zs, zt, beta), atol=1e-5, rtol=1e-5)


def test_beta_zero_gives_the_student():
    zs, zt = _logits(3, 17)
    assert torch.allclose(trust_region.behavior_logprobs(zs, zt, 0.0).double(), ref.log_softmax(zs), atol=1e-6)
    assert torch.all(trust_region.kl_to_student(zs, zt, 0.0) == 0)


# ------------------------------------------------------------------------------------ losses


def test_full_reverse_kl_values_and_gradients():
    zs, zt = _logits(6, 37)
    zs.requires_grad_(True)
    got = losses.reverse_kl(zs, zt, kind="full")
    weights = torch.arange(1.0, 7.0, dtype=torch.float64)
    (got * weights).sum().backward()
    zs_ref = zs.detach().clone().requires_grad_(True)
    want = ref.reverse_kl_full(zs_ref, zt)
    (want * weights).sum().backward()
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(zs.grad, zs_ref.grad, atol=1e-5)
    assert zs.grad.dtype == zs.dtype


def test_full_reverse_kl_finite_differences():
    zs, zt = _logits(2, 9, scale=1.0)
    zs.requires_grad_(True)
    losses.reverse_kl(zs, zt).sum().backward()
    h = 1e-2
    for i, j in [(0, 0), (0, 4), (1, 8)]:
        plus, minus = zs.detach().clone(), zs.detach().clone()
        plus[i, j] += h
        minus[i, j] -= h
        fd = (losses.reverse_kl(plus, zt).sum() - losses.reverse_kl(minus, zt).sum()) / (2 * h)
        assert abs(fd.item() - zs.grad[i, j].item()) <= 1e-3, (i, j)


def test_reverse_kl_of_a_distribution_with_itself_is_zero():
    zs, _ = _logits(4, 25)
    for kind in ("full", "topk"):
        out = losses.reverse_kl(zs, zs.clone(), kind=kind, topk=5)
        assert out.abs().max() <= 1e-6


@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_reverse_kl_values_and_gradients(k):
    zs, zt = _logits(5, 40)
    zs.requires_grad_(True)
    got = losses.reverse_kl(zs, zt, kind="topk", topk=k)
    got.sum().backward()
    ids = zs.detach().topk(k, dim=-1).indices
    zs_ref = zs.detach().clone().requires_grad_(True)
    value, surrogate = ref.reverse_kl_support(zs_ref, zt, ids)
    surrogate.sum().backward()
    assert torch.allclose(got.double(), value, atol=1e-5)
    assert torch.allclose(zs.grad, zs_ref.grad, atol=1e-5)


def test_sampled_token_policy_gradient():
    """k = 1 with gradient="policy": d_x (onehot(x) - p); the support gradient vanishes there."""
    zs, zt = _logits(5, 30)
    ids = torch.randint(0, 30, (5, 1), generator=torch.Generator().manual_seed(1))
    lq = vocab_parallel.logprobs_at(zt, ids)
    a = zs.clone().requires_grad_(True)
    losses.reverse_kl_at_ids(a, ids, lq, gradient="policy").sum().backward()
    ref_z = zs.detach().clone().double().requires_grad_(True)
    _, surrogate = ref.reverse_kl_support(ref_z, zt.double(), ids, gradient="policy")
    surrogate.sum().backward()
    assert torch.allclose(a.grad.double(), ref_z.grad, atol=1e-5)
    b = zs.clone().requires_grad_(True)
    losses.reverse_kl_at_ids(b, ids, lq).sum().backward()
    assert b.grad.abs().max() == 0


def test_support_gradient_leaves_other_tokens_alone():
    zs, zt = _logits(4, 30)
    a = zs.clone().requires_grad_(True)
    losses.reverse_kl(a, zt, kind="topk", topk=5).sum().backward()
    outside = torch.ones_like(a, dtype=torch.bool).scatter(-1, zs.topk(5, dim=-1).indices, False)
    assert torch.all(a.grad[outside] == 0) and a.grad.abs().max() > 0


def test_topk_with_all_ids_has_the_exact_gradient():
    zs, zt = _logits(3, 12)
    a = zs.clone().requires_grad_(True)
    b = zs.clone().requires_grad_(True)
    losses.reverse_kl(a, zt, kind="topk", topk=12).sum().backward()
    losses.reverse_kl(b, zt, kind="full").sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_precomputed_teacher_logprobs_equal_the_topk_kind():
    zs, zt = _logits(4, 30)
    ids = zs.topk(6, dim=-1).indices
    lq = vocab_parallel.logprobs_at(zt, ids)
    assert torch.allclose(lq.double(), ref.log_softmax(zt).gather(-1, ids), atol=1e-6)
    a = losses.reverse_kl_at_ids(zs, ids, lq)
    b = losses.reverse_kl(zs, zt, kind="topk", topk=6)
    assert torch.allclose(a, b, atol=1e-6)


def test_padded_vocabulary_is_ignored():
    zs, zt = _logits(4, 48)
    zs[:, 40:] = 100.0  # padding with huge logits must not matter
    zt[:, 40:] = -50.0
    true_s, true_t = zs[:, :40], zt[:, :40]
    beta = trust_region.solve_beta(zs, zt, 0.01, vocab_size=40)
    assert torch.allclose(beta, trust_region.solve_beta(true_s, true_t, 0.01))
    lm = trust_region.behavior_logprobs(zs, zt, beta, vocab_size=40)
    assert torch.all(lm[:, 40:] == -math.inf)
    assert torch.allclose(losses.reverse_kl(zs, zt, vocab_size=40), losses.reverse_kl(true_s, true_t))
    assert torch.allclose(losses.reverse_kl(zs, zt, kind="topk", vocab_size=40),
                          losses.reverse_kl(true_s, true_t, kind="topk"))
    g = torch.Generator().manual_seed(0)
    ids = sampling.sample(zs, generator=g, vocab_size=40)
    assert torch.all(ids < 40)


def test_eos_canonicalization_merges_and_masks():
    zs, _ = _logits(3, 20)
    out = eos.canonicalize(zs, keep_id=3, drop_id=11)
    p, q = torch.softmax(zs, -1), torch.softmax(out.double(), -1)
    assert torch.allclose(q[:, 3], p[:, 3] + p[:, 11])
    assert torch.all(q[:, 11] == 0)
    others = [i for i in range(20) if i not in (3, 11)]
    assert torch.allclose(q[:, others], p[:, others])
    assert torch.equal(eos.canonicalize(zs, keep_id=4, drop_id=4), zs)


STOP_IDS = (3, 11)


def stop_ids_against_canonical_copies(dtype, rows, vocab):
    """Each loss with ``stop_ids`` on raw logits and on canonicalize()'d copies without: a list
    of (name, (value, gradient) raw, (value, gradient) copies). Two stop-id-peaked rows, a -inf
    logit, recorded ids on both stop ids, padding (vocab_size = vocab - 2)."""
    zs, zt = (z.to(dtype) for z in _logits(rows, vocab, seed=3))
    zs[1, STOP_IDS[1]] += 30.0  # the student ends on the teacher's stop id
    zt[2, STOP_IDS[0]] += 30.0
    zs[3, 5] = -math.inf
    ids = zs.float().topk(4, dim=-1).indices
    ids[0, 0], ids[4, 1] = STOP_IDS
    size = vocab - 2
    lq = vocab_parallel.logprobs_at(eos.canonicalize(zt, keep_id=3, drop_id=11), ids,
                                    vocab_size=size)
    calls = {
        "full": lambda a, b, k: losses.reverse_kl(a, b, kind="full", vocab_size=size, **k),
        "topk": lambda a, b, k: losses.reverse_kl(a, b, kind="topk", topk=5, vocab_size=size, **k),
        "at_ids": lambda a, b, k: losses.reverse_kl_at_ids(a, ids, lq, vocab_size=size, **k),
        "policy": lambda a, b, k: losses.reverse_kl_at_ids(a, ids[:, 1:2], lq[:, 1:2],
                                                           gradient="policy", vocab_size=size, **k),
        "veto0": lambda a, b, k: losses.veto_kl(a, b, 0.0, vocab_size=size, **k),
        "veto": lambda a, b, k: losses.veto_kl(a, b, 0.4, vocab_size=size, **k),
        "veto_rev": lambda a, b, k: losses.veto_kl(a, b, 0.4, direction="reverse",
                                                   vocab_size=size, **k),
        "ce": lambda a, b, k: losses.cross_entropy(a, ids[:, 0], vocab_size=size, **k),
        "teacher_lp": lambda a, b, k: (vocab_parallel.logprobs_at(b, ids, vocab_size=size, **k)
                                       .sum(-1) + a[:, 0]),
    }
    weights = torch.arange(1.0, rows + 1)

    def run(call, copies):
        x = zs.clone().requires_grad_(True)
        if copies:
            value = call(eos.canonicalize(x, keep_id=3, drop_id=11),
                         eos.canonicalize(zt, keep_id=3, drop_id=11), {})
        else:
            value = call(x, zt, {"stop_ids": STOP_IDS})
        finite = torch.isfinite(value)
        (value[finite] * weights[finite]).sum().backward()
        return value.detach(), x.grad

    return [(name, run(call, False), run(call, True)) for name, call in calls.items()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(6, 20), (40, 20000)], ids=["one-chunk", "chunks"])
def test_stop_ids_equal_the_losses_of_canonical_copies(dtype, rows, vocab):
    """Reading the logits canonically in place gives the canonical copy's values and gradient
    bit for bit (eager kernels; compiled: test_ops_fused.py)."""
    for name, (value, grad), (want_value, want_grad) in stop_ids_against_canonical_copies(
            dtype, rows, vocab):
        assert torch.equal(torch.isfinite(value), torch.isfinite(want_value)), name
        assert torch.allclose(value, want_value, rtol=0, atol=0, equal_nan=True), name
        # (a recorded drop id has log-prob -inf for both models: its row's value is NaN)
        assert torch.allclose(grad, want_grad, rtol=0, atol=0, equal_nan=True), name
        assert grad.dtype == dtype, name
        if name in ("full", "veto", "veto_rev", "ce"):  # the drop id learns through the merge
            assert grad[:, 11].abs().max() > 0, name


def test_sampling_is_exact_chi_square():
    zs, _ = _logits(1, 12, scale=1.5)
    lp = torch.log_softmax(zs.float(), -1).expand(200_000, 12)
    ids = sampling.sample(lp, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(ids, minlength=12)
    assert ref.chi_square_pvalue(counts, lp[0].double().exp()) > 1e-3


def test_sampling_is_reproducible_and_consumes_the_generator():
    zs, _ = _logits(50, 30)
    a = sampling.sample(zs, generator=torch.Generator().manual_seed(5))
    b = sampling.sample(zs, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sampling.sample(zs, generator=g)
    c = sampling.sample(zs, generator=g)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_topk_and_gather_match_torch():
    zs, _ = _logits(4, 30)
    vals, ids = vocab_parallel.topk(zs, 5)
    want = zs.float().topk(5, dim=-1)
    assert torch.equal(ids, want.indices) and torch.allclose(vals, want.values)
    assert torch.equal(vocab_parallel.gather_at_ids(zs, ids), zs.float().gather(-1, ids))


def test_schedules():
    lin = [schedules.eps_at(k, schedule="linear", eps0=0.02, warmup_steps=4) for k in range(6)]
    assert lin == pytest.approx([0.02, 0.015, 0.01, 0.005, 0.0, 0.0])
    cos = [schedules.eps_at(k, schedule="cosine", eps0=0.02, warmup_steps=4) for k in range(6)]
    assert cos[0] == pytest.approx(0.02) and cos[2] == pytest.approx(0.01) and cos[4:] == [0.0, 0.0]
    assert all(a >= b for a, b in zip(cos, cos[1:], strict=False))
    assert schedules.eps_at(1000, schedule="constant", eps0=0.01, warmup_steps=4) == 0.01
    assert schedules.eps_at(0, schedule="none", eps0=0.01, warmup_steps=4) == 0.0
    with pytest.raises(ValueError):
        schedules.eps_at(0, schedule="exp", eps0=0.01, warmup_steps=4)


def test_veto_b_schedule():
    b = [schedules.veto_b_at(k, b_start=0.6, total_steps=5) for k in range(5)]
    assert b == pytest.approx([0.6, 0.45, 0.3, 0.15, 0.0])
    assert schedules.veto_b_at(9, b_start=0.6, total_steps=5) == 0.0
    assert schedules.veto_b_at(0, b_start=0.4, total_steps=1) == 0.0
    with pytest.raises(ValueError):
        schedules.veto_b_at(0, b_start=-0.1, total_steps=5)


def test_solve_beta_and_kl_equals_the_two_calls():
    zs, zt = _logits(6, 40)
    eps = torch.tensor([0.0, 1e-4, 1e-3, 0.01, 0.1, 1e3])
    beta, kl = trust_region.solve_beta_and_kl(zs, zt, eps)
    assert torch.equal(beta, trust_region.solve_beta(zs, zt, eps))
    assert torch.equal(kl, trust_region.kl_to_student(zs, zt, beta))


def test_row_chunks_are_sized_by_the_device():
    """Cache-sized chunks on a CPU; on a GPU as large as CUDA_ROW_CHUNK_BYTES (a chunk costs
    kernel launches there): a 32-row decode step at V/TP = 76032 is one chunk, not six rows."""
    from trb_nemo.ops import shards

    v = 76032
    cpu = list(shards.row_chunks(32, v))
    gpu = list(shards.row_chunks(32, v, device=torch.device("cuda")))
    assert len(gpu) == 1 and gpu[0] == slice(0, 32)
    assert cpu[0].stop - cpu[0].start == shards.ROW_CHUNK_BYTES // (4 * v) == 6
    rows = list(shards.row_chunks(8192, v, device=torch.device("cuda")))
    per = rows[0].stop - rows[0].start
    assert per == shards.CUDA_ROW_CHUNK_BYTES // (4 * v) and 4 * v * per <= 256 * 2**20
    assert sum(c.stop - c.start for c in rows) == 8192
