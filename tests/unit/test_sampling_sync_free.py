"""The per-token ops of a decode step make no host sync (TP = 1, eager kernels): every policy's
``choose``, speculative ``draft``/``verify``, the recorder's ``logprobs_and_topk`` and
``logprobs_at``, ``log_softmax`` and ``sample`` with ``noise``, run inside
``torch.inference_mode()`` and :func:`trb_nemo.ops.checks.deferred` under
:class:`sync_counter.SyncCounter`, record no event. Their input checks are deferred: a NaN or
all -inf row raises the same ``ValueError`` from ``DeferredChecks.raise_first()``.

(Compiled kernels are not counted here: Dynamo does not trace under the counter's modes.)

Run: .venv/bin/python -m pytest tests/unit/test_sampling_sync_free.py
"""

import contextlib
import math

import pytest
import torch
from sync_counter import SyncCounter

from trb_nemo.methods import policies
from trb_nemo.methods.policies import (
    InjectionPolicy,
    StudentPolicy,
    TeacherPolicy,
    TrustRegionPolicy,
)
from trb_nemo.ops import checks, fused, speculative
from trb_nemo.ops.sampling import RowNoise, sample
from trb_nemo.ops.vocab_parallel import log_softmax, logprobs_and_topk, logprobs_at

ROWS, V_PAD, V_TRUE = 6, 64, 60
MESSAGE = "sample: a row has no finite log-probability"
TRUST_REGION_SYNCS = pytest.mark.xfail(
    reason="the trust-region solve (ops/trust_region.py) still has data-dependent exits and "
           "input checks that read the device: issue 25 item 3, open", strict=True)


@pytest.fixture(autouse=True)
def eager_kernels():
    fused.set_mode("off")
    yield
    fused.set_mode("auto")


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    zs = (torch.randn(ROWS, V_PAD, generator=g) * 2).to(dtype)
    zt = (torch.randn(ROWS, V_PAD, generator=g) * 2).to(dtype)
    noise = RowNoise(2024, torch.arange(ROWS) * 7, torch.full((ROWS,), 3))
    return zs, zt, noise


def _events(fn, *, drop_from=()):
    """(result, sync events) of ``fn()`` while decoding; events made inside the functions named
    in ``drop_from`` ((module, name) pairs, patched for the call) are not counted."""
    found = checks.DeferredChecks()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(checks.deferred(found))
        counter = stack.enter_context(SyncCounter())
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        for module, name in drop_from:
            mp.setattr(module, name, _uncounted(getattr(module, name), counter))
        result = fn()
    return result, counter.events, found


def _uncounted(fn, counter):
    def run(*args, **kwargs):
        with counter.paused():
            return fn(*args, **kwargs)
    return run


TRUST_REGION = [(module, name) for module in (policies, speculative)
                for name in ("solve_beta_and_kl", "behavior_logprobs")]

SYNC_FREE = [StudentPolicy(), StudentPolicy(0.7), TeacherPolicy(0.8),
             TrustRegionPolicy("trb", 0.0), InjectionPolicy(4, 0.8)]
SOLVING = [TrustRegionPolicy("trb", 0.05), TrustRegionPolicy("fixed", 0.3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy", SYNC_FREE + [pytest.param(p, marks=TRUST_REGION_SYNCS)
                                                for p in SOLVING],
                         ids=["student", "student-T0.7", "teacher", "trb-eps0", "skd", "trb",
                              "fixed"])
def test_choose_makes_no_host_sync(policy, dtype):
    zs, zt, noise = _inputs(dtype)
    choice, events, found = _events(lambda: policy.choose(zs, zt, noise, None, V_TRUE))
    assert events == []
    assert torch.all(choice.ids < V_TRUE)
    found.raise_first()  # finite rows: no check failed


@pytest.mark.parametrize("policy", SOLVING, ids=["trb", "fixed"])
def test_choose_outside_the_trust_region_solver_makes_no_host_sync(policy):
    zs, zt, noise = _inputs()
    choice, events, _ = _events(lambda: policy.choose(zs, zt, noise, None, V_TRUE),
                                drop_from=TRUST_REGION)
    assert events == []
    assert torch.equal(choice.ids, policy.choose(zs, zt, noise, None, V_TRUE).ids)


def test_draft_makes_no_host_sync():
    zs, _, noise = _inputs()
    ids, events, _ = _events(lambda: speculative.draft(zs, noise, vocab_size=V_TRUE))
    assert events == [] and torch.all(ids < V_TRUE)


@pytest.mark.parametrize("drop_from", [pytest.param((), marks=TRUST_REGION_SYNCS), TRUST_REGION],
                         ids=["all", "outside-the-solver"])
def test_verify_makes_no_host_sync(drop_from):
    zs, zt, noise = _inputs()
    drafts = speculative.draft(zs, noise, vocab_size=V_TRUE)
    out, events, _ = _events(lambda: speculative.verify(zs, zt, drafts, 0.05, noise,
                                                        vocab_size=V_TRUE), drop_from=drop_from)
    assert events == []
    assert torch.equal(out.ids, speculative.verify(zs, zt, drafts, 0.05, noise,
                                                   vocab_size=V_TRUE).ids)


@pytest.mark.parametrize("stop_ids", [None, (1, 5)], ids=["plain", "eos-merge"])
def test_recorder_ops_make_no_host_sync(stop_ids):
    zs, zt, noise = _inputs(torch.bfloat16)
    ids = sample(zs, noise=noise, vocab_size=V_TRUE)
    (at, top), events, _ = _events(lambda: logprobs_and_topk(zs, ids[:, None], 4,
                                                             vocab_size=V_TRUE))
    assert events == [] and at.shape == (ROWS, 1) and top.shape == (ROWS, 4)
    _, events, _ = _events(lambda: logprobs_at(zt, top, vocab_size=V_TRUE, stop_ids=stop_ids))
    assert events == []
    _, events, _ = _events(lambda: log_softmax(zs, vocab_size=V_TRUE))
    assert events == []


def test_sample_with_generator_costs_one_sync_only():
    zs, _, _ = _inputs()
    _, events, _ = _events(lambda: sample(zs, generator=torch.Generator().manual_seed(1)))
    assert len(events) == 1  # the generator's key; the engine always passes noise


def _bad_rows():
    zs, zt, noise = _inputs()
    zs[1, 7] = math.nan  # a NaN: the row has no well-defined distribution
    zs[3] = -math.inf  # all -inf: nothing to draw
    zt[4, :V_TRUE] = -math.inf  # only padding is finite: nothing to draw either
    return zs, zt, noise


@pytest.mark.parametrize("policy", [StudentPolicy(), TeacherPolicy(), InjectionPolicy(4, 0.8)],
                         ids=["student", "teacher", "skd"])
def test_bad_rows_raise_through_the_deferred_checks(policy):
    zs, zt, noise = _bad_rows()
    _, events, found = _events(lambda: policy.choose(zs, zt, noise, None, V_TRUE))
    assert events == []
    with pytest.raises(ValueError, match=MESSAGE):
        found.raise_first()
    with pytest.raises(ValueError, match=MESSAGE):  # not deferred: at once, the same message
        policy.choose(zs, zt, noise, None, V_TRUE)


@pytest.mark.parametrize("row", [1, 3], ids=["nan", "all-inf"])
def test_sample_defers_each_bad_row(row):
    zs, _, noise = _bad_rows()
    good = torch.ones(ROWS, dtype=torch.bool)
    good[[1, 3]] = False
    keep = torch.cat([torch.arange(ROWS)[good], torch.tensor([row])])
    rows = RowNoise(noise.key, noise.ids_R[keep], noise.counter_R[keep])
    ids, _, found = _events(lambda: sample(zs[keep], noise=rows, vocab_size=V_TRUE))
    assert torch.all(ids < V_PAD)  # a draw is returned, the check fails later
    with pytest.raises(ValueError, match=MESSAGE):
        found.raise_first()
    _, _, found = _events(lambda: sample(zs[keep[:-1]], noise=RowNoise(
        noise.key, noise.ids_R[keep[:-1]], noise.counter_R[keep[:-1]]), vocab_size=V_TRUE))
    found.raise_first()  # the good rows alone pass
