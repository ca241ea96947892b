"""The collective helpers of ``trb_nemo.parallel.comm``: each hands torch.distributed a tensor
on the group's communication device and gives the result back on the caller's device.

The spy wraps the real torch.distributed functions (they still run) and records the device of
every tensor they were given. On CPU (gloo) the communication device is the CPU; the GPU
variants (NCCL with a CPU tensor, gloo with a CUDA tensor) run where CUDA exists.
"""

import pytest
import torch
from harness import spawn

pytestmark = pytest.mark.dist


def _exercise(backend_device: str, data_device: str):
    import torch.distributed as dist

    from trb_nemo.parallel import comm

    seen = []

    def spy(name):
        real = getattr(dist, name)

        def wrapped(t, *a, **k):
            tensors = t if isinstance(t, list) else [t]
            seen.extend((name, x.device.type) for x in tensors)
            if name == "all_gather":  # (output list, input)
                seen.append((name, a[0].device.type))
            return real(t, *a, **k)
        return wrapped

    rank = dist.get_rank()
    originals = {n: getattr(dist, n) for n in ("all_reduce", "broadcast", "all_gather", "send",
                                                "recv")}
    for n in originals:
        setattr(dist, n, spy(n))
    try:
        x = torch.full((3,), float(rank + 1), device=data_device)
        summed = comm.all_reduce(x)
        biggest = comm.all_reduce(x, op="max")
        b = comm.broadcast(torch.full((2,), float(rank), device=data_device), src=1)
        parts = comm.all_gather(torch.tensor([rank], device=data_device))
        if rank == 0:
            comm.send(torch.arange(4.0, device=data_device), 1, None)
            got = None
        else:
            got = comm.recv((4,), torch.float32, 0, None, device=torch.device(data_device))
        comm.barrier()
    finally:
        for n, f in originals.items():
            setattr(dist, n, f)
    return {"comm_device": comm.comm_device().type, "seen": sorted(set(seen)),
            "x_unchanged": x.tolist() == [float(rank + 1)] * 3,
            "results": [(t.device.type, t.tolist()) for t in (summed, biggest, b, *parts)],
            "recv": None if got is None else (got.device.type, got.tolist())}


def _check(out, comm_dev, data_dev):
    for rank, r in enumerate(out):
        assert r["comm_device"] == comm_dev
        assert {d for _, d in r["seen"]} == {comm_dev}, r["seen"]  # torch.distributed saw only these
        assert r["x_unchanged"]
        (d1, s), (d2, m), (d3, b), (d4, p0), (d5, p1) = r["results"]
        assert {d1, d2, d3, d4, d5} == {data_dev}  # results back on the caller's device
        assert s == [3.0] * 3 and m == [2.0] * 3 and b == [1.0, 1.0] and (p0, p1) == ([0], [1])
        if rank == 1:
            assert r["recv"] == (data_dev, [0.0, 1.0, 2.0, 3.0])


def test_gloo_cpu_tensors():
    _check(spawn(_exercise, 2, "cpu", "cpu"), "cpu", "cpu")


@pytest.mark.gpu
def test_nccl_with_cpu_tensors():
    _check(spawn(_exercise, 2, "cuda", "cpu", backend="nccl"), "cuda", "cpu")


@pytest.mark.gpu
def test_gloo_with_cuda_tensors():
    _check(spawn(_exercise, 2, "cpu", "cuda"), "cpu", "cuda")
