"""The CPU support patches: applied only without CUDA, and each one does its job.

Runs in a spawned process because the patches are process-global.
Run: .venv/bin/python -m pytest tests/dist/test_cpu_support.py
"""

import pytest
import torch
from harness import spawn_bare

pytestmark = pytest.mark.dist


def _probe_patches():
    from trb_nemo.parallel.cpu_support import apply_cpu_support, cpu_support_active

    if torch.cuda.is_available():
        return {"applied": apply_cpu_support(), "active": cpu_support_active()}
    applied = apply_cpu_support()
    again = apply_cpu_support()
    x = torch.zeros(2, device="cuda")
    y = torch.ones(2).to("cuda")
    torch.cuda.manual_seed(5)
    state = torch.cuda.get_rng_state()
    a = torch.rand(3)
    torch.cuda.set_rng_state(state)
    b = torch.rand(3)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    end.record()
    return {
        "applied": applied,
        "idempotent": again,
        "devices": (x.device.type, y.device.type, torch.cuda.current_device()),
        "rng_replays": torch.equal(a, b),
        "type_name": torch.zeros(1).type(),
        "type_cast": torch.zeros(1).type(torch.float64).dtype,
        "elapsed_ms": end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end),
        "stream": torch.cuda.current_stream().wait_stream(None) is None,
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_patches_map_cuda_to_cpu():
    [r] = spawn_bare(_probe_patches, 1)
    assert r["applied"] and r["idempotent"]
    assert r["devices"] == ("cpu", "cpu", "cpu")
    assert r["rng_replays"]
    assert r["type_name"] == "torch.cuda.FloatTensor"
    assert r["type_cast"] == torch.float64
    assert r["elapsed_ms"] and r["stream"]


@pytest.mark.gpu
def test_nothing_is_patched_on_gpu():
    [r] = spawn_bare(_probe_patches, 1)
    assert r == {"applied": False, "active": False}
