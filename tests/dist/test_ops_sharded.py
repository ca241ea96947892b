"""Vocab-parallel ops at TP = 2 and 4 (gloo) equal their unsharded float64 references.

Vocabulary: 45 true tokens padded to 48 (Megatron-style), the two stop ids on different shards
(keep 3 on the first rank, drop 40 on the last). Values and gradients are compared, also with
the op kernels compiled at TP = 2 (``tp2-fused``).
Run: .venv/bin/python -m pytest tests/dist/test_ops_sharded.py
"""

import math

import ops_reference as ref
import pytest
import torch
import torch.distributed as dist
from harness import spawn

from trb_nemo.ops import eos, fused, losses, sampling, trust_region, vocab_parallel

pytestmark = pytest.mark.dist

ROWS, V_PAD, V_TRUE, KEEP, DROP, K = 6, 48, 45, 3, 40, 5
EPS = torch.tensor([0.0, 1e-4, 1e-3, 0.01, 0.1, 1e3])
SAMPLE_ROWS = 200_000
VETO_CASES = [(0.0, "forward"), (0.4, "forward"), (0.8, "forward"), (0.0, "reverse"),
              (0.4, "reverse")]
RECORD_IDS = torch.tensor([[0, 23, 44], [7, KEEP, 46], [DROP, 12, 30], [0, 1, 2],
                           [44, 24, 23], [KEEP, DROP, 11]])
"""Ids whose log-probs a decode step records: on every shard, the merged stop id, the masked
drop id and a padding id (-inf), a -inf logit (row 1, id 7)."""


def _full_logits():
    g = torch.Generator().manual_seed(11)
    zs = torch.randn(ROWS, V_PAD, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(ROWS, V_PAD, generator=g, dtype=torch.float64) * 3
    zs[:, V_TRUE:] = 50.0  # padding: must never matter
    zt[:, V_TRUE:] = 50.0
    zs[1, 7] = -math.inf
    zt[2, 9] = -math.inf
    zs[3, 0] += 40.0  # a peaked row
    return zs, zt


def _shard(x, world, rank):
    v = x.shape[-1] // world
    return x[..., rank * v:(rank + 1) * v].clone()


def _gather_cols(local):
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)


def _sharded_ops():
    world, rank, grp = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    zs_full, zt_full = _full_logits()
    zs, zt = _shard(zs_full, world, rank), _shard(zt_full, world, rank)
    zs = eos.canonicalize(zs, keep_id=KEEP, drop_id=DROP, vocab_group=grp)
    zt = eos.canonicalize(zt, keep_id=KEEP, drop_id=DROP, vocab_group=grp)
    kw = dict(vocab_group=grp, vocab_size=V_TRUE)
    out = {"zs_canon": _gather_cols(zs), "zt_canon": _gather_cols(zt)}
    out["beta"] = trust_region.solve_beta(zs, zt, EPS, **kw)
    out["mu"] = _gather_cols(trust_region.behavior_logprobs(zs, zt, out["beta"], **kw))
    out["kl"] = trust_region.kl_to_student(zs, zt, out["beta"], **kw)
    out["topk_vals"], out["topk_ids"] = vocab_parallel.topk(zs, K, **kw)
    out["records_logprob"], out["records_topk"] = vocab_parallel.logprobs_and_topk(
        zs, RECORD_IDS, K, **kw)
    for kind in ("full", "topk"):
        x = zs.clone().requires_grad_(True)
        value = losses.reverse_kl(x, zt, kind=kind, topk=K, **kw)
        (value * torch.arange(1.0, ROWS + 1, dtype=torch.float64)).sum().backward()
        out[f"{kind}_value"], out[f"{kind}_grad"] = value, _gather_cols(x.grad)
    for b, direction in VETO_CASES:
        x = zs.clone().requires_grad_(True)
        value = losses.veto_kl(x, zt, b, direction=direction, **kw)
        finite = torch.isfinite(value)
        (value[finite] * torch.arange(1.0, ROWS + 1, dtype=torch.float64)[finite]).sum().backward()
        out[f"veto_{b}_{direction}"] = (value, _gather_cols(x.grad))
    x = zs.clone().requires_grad_(True)
    value = losses.cross_entropy(x, RECORD_IDS[:, 1], **kw)
    (value * torch.arange(1.0, ROWS + 1, dtype=torch.float64)).sum().backward()
    out["ce"] = (value, _gather_cols(x.grad))
    # the gradient flows back through canonicalization to both stop ids on their own shards
    raw = _shard(zs_full, world, rank).requires_grad_(True)
    merged = eos.canonicalize(raw, keep_id=KEEP, drop_id=DROP, vocab_group=grp)
    value = losses.reverse_kl(merged, zt, kind="full", **kw)
    finite = torch.isfinite(value)
    (value[finite] * torch.arange(1.0, ROWS + 1, dtype=torch.float64)[finite]).sum().backward()
    out["canon_grad"] = _gather_cols(raw.grad)
    lq = vocab_parallel.logprobs_at(zt, out["topk_ids"], **kw)
    out["at_ids_value"] = losses.reverse_kl_at_ids(zs, out["topk_ids"], lq, **kw)
    out["stop_ids"] = _stop_ids_against_copies(zs_full, zt_full, out["topk_ids"], kw)
    out["fused"] = fused.is_fused(torch.device("cpu"))
    out["samples"] = sampling.sample(zs, generator=torch.Generator().manual_seed(3), **kw)
    lm_row = trust_region.behavior_logprobs(zs[4:5], zt[4:5], out["beta"][4:5], **kw)
    many = lm_row.expand(SAMPLE_ROWS, -1)
    out["many"] = torch.bincount(sampling.sample(many, generator=torch.Generator().manual_seed(9), **kw),
                                 minlength=V_PAD)
    return out


def _stop_ids_against_copies(zs_full, zt_full, ids, kw):
    """Each loss on this rank's raw shards with ``stop_ids`` and on canonicalize()'d copies
    without: {name: ((value, gathered gradient) raw, (value, gathered gradient) copies)}."""
    world, rank, grp = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    raw_s, raw_t = _shard(zs_full, world, rank), _shard(zt_full, world, rank)
    lq = vocab_parallel.logprobs_at(raw_t, ids, stop_ids=(KEEP, DROP), **kw)
    calls = {
        "full": lambda a, b, k: losses.reverse_kl(a, b, kind="full", **k),
        "topk": lambda a, b, k: losses.reverse_kl(a, b, kind="topk", topk=K, **k),
        "at_ids": lambda a, b, k: losses.reverse_kl_at_ids(a, ids, lq, **k),
        "veto": lambda a, b, k: losses.veto_kl(a, b, 0.4, **k),
        "veto_rev": lambda a, b, k: losses.veto_kl(a, b, 0.4, direction="reverse", **k),
        "ce": lambda a, b, k: losses.cross_entropy(a, RECORD_IDS[:, 2], **k),
    }
    weights = torch.arange(1.0, ROWS + 1, dtype=torch.float64)

    def run(call, copies):
        x = raw_s.clone().requires_grad_(True)
        if copies:
            value = call(eos.canonicalize(x, keep_id=KEEP, drop_id=DROP, vocab_group=grp),
                         eos.canonicalize(raw_t, keep_id=KEEP, drop_id=DROP, vocab_group=grp), kw)
        else:
            value = call(x, raw_t, dict(kw, stop_ids=(KEEP, DROP)))
        finite = torch.isfinite(value)
        (value[finite] * weights[finite]).sum().backward()
        return value.detach(), _gather_cols(x.grad)

    return {name: (run(call, False), run(call, True)) for name, call in calls.items()}


def _reference():
    zs, zt = _full_logits()
    for z in (zs, zt):
        z[:, KEEP] = torch.logaddexp(z[:, KEEP], z[:, DROP])
        z[:, DROP] = -math.inf
    return zs, zt


def _sharded_ops_fused():
    fused.set_mode("on")  # the row kernels compiled (the CUDA default), collectives between them
    return _sharded_ops()


@pytest.fixture(scope="module", params=[(2, False), (4, False), (2, True)],
                ids=["tp2", "tp4", "tp2-fused"])
def sharded(request):
    world, compiled = request.param
    return spawn(_sharded_ops_fused if compiled else _sharded_ops, world, timeout_s=600)


@pytest.fixture(scope="module")
def unsharded():
    return spawn(_sharded_ops, 1)[0]


def test_every_rank_agrees(sharded):
    for other in sharded[1:]:
        for key in ("beta", "kl", "topk_ids", "full_value", "topk_value", "samples"):
            assert torch.equal(sharded[0][key], other[key]), key


def test_canonicalization_across_shards(sharded):
    zs, zt = _reference()
    got = sharded[0]
    for key, want in (("zs_canon", zs), ("zt_canon", zt)):
        finite = torch.isfinite(want[:, :V_TRUE])
        assert torch.equal(torch.isfinite(got[key][:, :V_TRUE]), finite)
        assert torch.allclose(got[key][:, :V_TRUE][finite], want[:, :V_TRUE][finite])


def test_gradient_through_canonicalization(sharded):
    """d loss / d raw logits, with the keep and drop ids on different shards."""
    zs_raw, _ = _full_logits()
    _, zt = _reference()
    x = zs_raw.clone().requires_grad_(True)
    merged = x.clone()
    merged[:, KEEP] = torch.logaddexp(x[:, KEEP], x[:, DROP])
    merged[:, DROP] = -math.inf
    want = ref.reverse_kl_full(merged, zt, V_TRUE)
    weights = torch.arange(1.0, ROWS + 1, dtype=torch.float64)
    finite = torch.isfinite(want)  # row 2: KL = inf (see test_losses_match_reference)
    (want[finite] * weights[finite]).sum().backward()
    got = sharded[0]["canon_grad"][finite]
    assert x.grad[finite][:, DROP].abs().max() > 1e-3  # the drop id does receive gradient
    assert torch.allclose(got[:, :V_TRUE], x.grad[finite][:, :V_TRUE], atol=1e-5)


def test_stop_ids_equal_the_losses_of_canonical_copies(sharded, unsharded):
    """Losses reading raw shards with ``stop_ids`` (the merge as index arithmetic, the drop
    column's gradient sent to its shard by the merge's backward) equal the losses of canonical
    copies at TP = 1, 2, 4: bit for bit with eager kernels, to 1e-6 compiled (the keep column's
    gradient is recomputed outside the kernel)."""
    for got in (sharded[0], unsharded):
        tol = 1e-6 if got["fused"] else 0
        for name, ((value, grad), (want_value, want_grad)) in got["stop_ids"].items():
            assert torch.equal(torch.isfinite(value), torch.isfinite(want_value)), name
            assert torch.allclose(value, want_value, rtol=0, atol=tol, equal_nan=True), name
            assert torch.allclose(grad, want_grad, rtol=0, atol=tol, equal_nan=True), name
    # the full loss's gradient reaches the drop id's shard (the last rank)
    assert sharded[0]["stop_ids"]["full"][0][1][:, DROP].nan_to_num().abs().max() > 1e-3


def test_trust_region_matches_reference(sharded):
    zs, zt = _reference()
    got = sharded[0]
    want_beta = ref.bisect_beta(zs, zt, EPS.double(), V_TRUE)
    assert (got["beta"].double() - want_beta).abs().max() <= 1e-4
    realized = ref.kl_to_student(zs, zt, got["beta"].double(), V_TRUE)
    assert torch.all(realized <= EPS.double() * (1 + 1e-6) + 1e-12)
    assert torch.allclose(got["kl"].double(), realized, atol=1e-5, rtol=1e-5)
    want_mu = ref.behavior_logprobs(zs, zt, got["beta"].double(), V_TRUE)
    finite = torch.isfinite(want_mu)
    assert torch.equal(torch.isfinite(got["mu"]), finite)
    assert (got["mu"].double()[finite] - want_mu[finite]).abs().max() <= 1e-5
    assert got["beta"][0] == 0 and got["beta"][-1] == 1


def test_losses_match_reference(sharded):
    zs, zt = _reference()
    got = sharded[0]
    weights = torch.arange(1.0, ROWS + 1, dtype=torch.float64)
    x = zs.clone().requires_grad_(True)
    want = ref.reverse_kl_full(x, zt, V_TRUE)
    # row 2: the teacher has no mass where the student has some, so KL = inf in both
    finite = torch.isfinite(want)
    assert finite.tolist() == [True, True, False, True, True, True]
    assert torch.isinf(got["full_value"][2])
    (want[finite] * weights[finite]).sum().backward()
    assert torch.allclose(got["full_value"].double()[finite], want.detach()[finite], atol=1e-5)
    assert torch.allclose(got["full_grad"][finite][:, :V_TRUE], x.grad[finite][:, :V_TRUE], atol=1e-5)
    assert torch.all(got["full_grad"][finite][:, V_TRUE:] == 0)
    ids = ref.masked(zs, V_TRUE).topk(K, dim=-1).indices
    assert torch.equal(got["topk_ids"], ids)
    y = zs.clone().requires_grad_(True)
    value, surrogate = ref.reverse_kl_support(y, zt, ids, V_TRUE)
    assert torch.equal(torch.isfinite(value), finite) and torch.isinf(got["topk_value"][2])
    (surrogate[finite] * weights[finite]).sum().backward()
    assert torch.allclose(got["topk_value"].double()[finite], value.detach()[finite], atol=1e-5)
    assert torch.allclose(got["topk_grad"][finite][:, :V_TRUE], y.grad[finite][:, :V_TRUE], atol=1e-5)
    assert torch.allclose(got["at_ids_value"][finite], got["topk_value"][finite], atol=1e-6)


def test_decode_records_in_one_collective(sharded, unsharded):
    """logprobs_and_topk equals log_softmax at the ids and topk's ids (same ties)."""
    zs, _ = _reference()
    want = torch.log_softmax(ref.masked(zs, V_TRUE), dim=-1).gather(-1, RECORD_IDS)
    for got in (sharded[0], unsharded):
        lp = got["records_logprob"].double()
        finite = torch.isfinite(want)
        assert not finite.all() and torch.equal(torch.isfinite(lp), finite)
        assert (lp[finite] - want[finite]).abs().max() <= 1e-5
        assert torch.equal(got["records_topk"], got["topk_ids"])
    assert torch.equal(sharded[0]["records_topk"], unsharded["records_topk"])


@pytest.mark.parametrize("b,direction", VETO_CASES)
def test_veto_loss_matches_reference(sharded, unsharded, b, direction):
    """Veto's target Q ∝ pi_T pi_S^b (student detached): values and gradients against float64
    at TP = 1, 2, 4 (stop ids on different shards, padded vocabulary)."""
    zs, zt = _reference()
    weights = torch.arange(1.0, ROWS + 1, dtype=torch.float64)
    x = zs.clone().requires_grad_(True)
    want = ref.veto_kl(x, zt, b, direction, V_TRUE)
    finite = torch.isfinite(want)
    assert finite.sum() >= 4
    (want[finite] * weights[finite]).sum().backward()
    for got in (sharded[0], unsharded):
        value, grad = got[f"veto_{b}_{direction}"]
        assert torch.equal(torch.isfinite(value), finite)
        assert torch.allclose(value.double()[finite], want.detach()[finite], atol=1e-5)
        assert torch.allclose(grad[finite][:, :V_TRUE], x.grad[finite][:, :V_TRUE], atol=1e-5)
        assert torch.all(grad[:, V_TRUE:] == 0)
    if b == 0 and direction == "forward":  # the plain forward KL to the teacher
        plain = ref.kl(ref.log_softmax(zt, V_TRUE), ref.log_softmax(zs, V_TRUE))
        assert torch.allclose(want[finite], plain[finite])
        assert not finite.all()  # the student lacks a token the teacher has: KL = inf


def test_cross_entropy_matches_reference(sharded, unsharded):
    """-log p(x) (the SFT warmup's loss): values and gradients against float64."""
    zs, _ = _reference()
    x = zs.clone().requires_grad_(True)
    ids = RECORD_IDS[:, 1]  # on both shards, the merged stop id
    want = -ref.log_softmax(x, V_TRUE).gather(-1, ids[:, None])[:, 0]
    (want * torch.arange(1.0, ROWS + 1, dtype=torch.float64)).sum().backward()
    for got in (sharded[0], unsharded):
        value, grad = got["ce"]
        assert torch.allclose(value.double(), want.detach(), atol=1e-5)
        assert torch.allclose(grad[:, :V_TRUE], x.grad[:, :V_TRUE], atol=1e-5)
        assert torch.all(grad[:, V_TRUE:] == 0)


def test_sampling_does_not_depend_on_tp(sharded, unsharded):
    assert torch.equal(sharded[0]["samples"], unsharded["samples"])
    assert torch.all(sharded[0]["samples"] < V_TRUE)


def test_sampling_chi_square_against_mu(sharded):
    zs, zt = _reference()
    got = sharded[0]
    mu = ref.behavior_logprobs(zs[4:5], zt[4:5], got["beta"][4:5].double(), V_TRUE)[0].exp()
    counts = got["many"]
    assert counts.sum() == SAMPLE_ROWS
    assert torch.all(counts[mu == 0] == 0)
    assert ref.chi_square_pvalue(counts, mu) > 1e-3


SMALL_VOCAB = 30  # at TP = 4 over 48 padded columns, the last rank holds only padding


def _ops_with_an_all_padding_rank(compiled):
    fused.set_mode("on" if compiled else "off")
    world, rank, grp = dist.get_world_size(), dist.get_rank(), dist.group.WORLD
    zs_full, zt_full = _full_logits()
    zs, zt = _shard(zs_full, world, rank), _shard(zt_full, world, rank)
    kw = dict(vocab_group=grp, vocab_size=SMALL_VOCAB)
    beta, kl = trust_region.solve_beta_and_kl(zs, zt, EPS, **kw)
    x = zs.clone().requires_grad_(True)
    value = losses.reverse_kl(x, zt, **kw)
    (value * torch.arange(1.0, ROWS + 1, dtype=torch.float64)).sum().backward()
    return beta, kl, value, _gather_cols(x.grad)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "fused"])
def test_a_rank_with_only_padding(compiled):
    out = spawn(_ops_with_an_all_padding_rank, 4, compiled, timeout_s=600)
    zs, zt = _full_logits()
    beta, kl, value, grad = out[0]
    for other in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[0], other, strict=True))
    want = ref.bisect_beta(zs, zt, EPS, SMALL_VOCAB)
    assert (beta.double() - want).abs().max() <= 1e-4
    realized = ref.kl_to_student(zs, zt, beta.double(), SMALL_VOCAB)
    assert torch.all(realized <= EPS.double() * (1 + 1e-6) + 1e-12)
    assert torch.allclose(kl.double(), realized, rtol=1e-4, atol=1e-8)
    x = zs.clone().requires_grad_(True)
    want_value = ref.reverse_kl_full(x, zt, SMALL_VOCAB)
    finite = torch.isfinite(want_value)
    (want_value[finite] * torch.arange(1.0, ROWS + 1, dtype=torch.float64)[finite]).sum().backward()
    assert torch.equal(torch.isfinite(value), finite)
    assert torch.allclose(value.double()[finite], want_value.detach()[finite], atol=1e-5)
    assert torch.allclose(grad[finite][:, :SMALL_VOCAB], x.grad[finite][:, :SMALL_VOCAB], atol=1e-5)
    assert torch.all(grad[:, SMALL_VOCAB:] == 0)
