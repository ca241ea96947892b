"""First contact with a cluster, the parts a CPU can run (gloo ranks spawned inside pytest):

* data-parallel ranks that decode for very different lengths meet in the uneven-phase barrier
  (its own gloo group, ``parallel.uneven_phase_timeout_minutes``), so the next collective, under
  a collective timeout much shorter than the imbalance, waits for no one; without the barrier
  the first rank to finish waits inside that collective past its timeout (NCCL's watchdog
  would abort the job there);
* the compiled-or-eager choice of the fused op kernels is the world's: when one rank cannot
  compile, every rank runs them eagerly and a sharded trust-region solve still completes and
  equals the unsharded one.

Run: .venv/bin/python -m pytest tests/dist/test_first_contact.py
"""

import os
import time

import pytest
import torch
from harness import spawn_bare

pytestmark = pytest.mark.dist

SHORT_TIMEOUT_MIN = 0.05  # 3 s: the collective timeout (NCCL's watchdog on a GPU)
IMBALANCE_S = 8.0  # rank 1 decodes this much longer than rank 0


def _uneven_then_collective(use_barrier: bool) -> dict:
    """Seconds each rank spends in the uneven-phase barrier and in the next data-parallel
    collective. gloo does not abort a collective that waits past its timeout, NCCL's watchdog
    does: what must hold is that no rank waits inside the collective itself."""
    from trb_nemo.config.schema import ParallelConfig
    from trb_nemo.parallel import comm, groups

    pg = groups.initialize(ParallelConfig(timeout_minutes=SHORT_TIMEOUT_MIN,
                                          uneven_phase_timeout_minutes=1.0), seed=0)
    assert pg.dp_size == 2
    if pg.dp_rank == 1:
        time.sleep(IMBALANCE_S)  # a long decode (different prompts, longer responses)
    t0 = time.monotonic()
    if use_barrier:
        groups.wait_after_uneven_phase()
    t1 = time.monotonic()
    total = comm.all_reduce(torch.tensor([pg.dp_rank + 1.0]), group=pg.data)
    t2 = time.monotonic()
    groups.destroy()
    return {"sum": float(total), "barrier_s": t1 - t0, "collective_s": t2 - t1}


def test_uneven_decoding_waits_in_the_barrier_not_in_the_next_collective():
    limit = SHORT_TIMEOUT_MIN * 60
    results = spawn_bare(_uneven_then_collective, 2, True, timeout_s=120)
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert results[0]["barrier_s"] > IMBALANCE_S - 2  # rank 0 waited out the imbalance there
    assert all(r["collective_s"] < limit / 3 for r in results), results  # far under 3 s
    # the control: straight into the collective, rank 0 waits there past the timeout (NCCL
    # would abort the job; gloo only waits)
    results = spawn_bare(_uneven_then_collective, 2, False, timeout_s=120)
    assert results[0]["collective_s"] > limit, results


def _solve_with_one_rank_unable_to_compile() -> dict:
    import warnings

    from trb_nemo.config.schema import ParallelConfig
    from trb_nemo.ops import fused, trust_region
    from trb_nemo.parallel import groups

    rank = int(os.environ["RANK"])
    if rank == 1:  # this rank's compiler is broken (a cache race, a full disk, no compiler)
        def broken(fn, **kwargs):
            def run(*args):
                raise RuntimeError("inductor: no C++ compiler here")
            return run
        torch.compile = broken
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pg = groups.initialize(ParallelConfig(tensor_model_parallel_size=2, fused_ops="on"),
                               seed=0)
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)
    half = slice(pg.tp_rank * 32, (pg.tp_rank + 1) * 32)
    beta = trust_region.solve_beta(zs[:, half], zt[:, half], 0.05, vocab_group=pg.tensor,
                                   vocab_size=64)
    out = {"fused_after_start": fused.is_fused(torch.device("cpu")), "beta": beta,
           "reference": trust_region.solve_beta(zs, zt, 0.05)}
    groups.destroy()
    return out


def test_one_rank_that_cannot_compile_turns_the_kernels_off_everywhere():
    results = spawn_bare(_solve_with_one_rank_unable_to_compile, 2, timeout_s=300)
    assert [r["fused_after_start"] for r in results] == [False, False]  # agreed: eager on both
    for r in results:
        assert torch.allclose(r["beta"], r["reference"], atol=1e-5)
    assert torch.equal(results[0]["beta"], results[1]["beta"])
