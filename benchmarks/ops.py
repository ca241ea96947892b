"""Vocab-parallel op cost as ratios against named baselines on the same logits, in one run.

* solve_beta (eps = 0.02)                     vs one fp32 torch.log_softmax       (goal <= 4)
* reverse_kl(kind="full") forward+backward    vs F.cross_entropy forward+backward (goal <= 1.5)
  and its peak memory vs cross-entropy's peak                                     (goal <= 1.0)

Shapes: rows 2048 x V 32768, and a 152k-vocabulary (Qwen3) case. TP = 1 (the whole vocabulary
local). Timings are the median of repeats; peak memory is measured on CUDA with
torch.cuda.max_memory_allocated on CUDA; on CPU it is not reported (torch's CPU allocator has no
peak counter, and tracking tensors from Python missed the backward's allocations).

Run: .venv/bin/python benchmarks/ops.py [--rows 2048] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from trb_nemo.ops import losses, trust_region


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn, device):
    """Peak bytes allocated by fn on CUDA; None on CPU (no trustworthy peak counter there)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_case(rows, vocab, repeats, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    zs = (torch.randn(rows, vocab, generator=g) * 2).to(device)
    zt = (zs + torch.randn(rows, vocab, generator=g)).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)

    t_lsm = timed(lambda: torch.log_softmax(zs, dim=-1), device, repeats)
    t_beta = timed(lambda: trust_region.solve_beta(zs, zt, 0.02), device, repeats)

    def kl_fwd_bwd():
        x = zs.detach().requires_grad_(True)
        losses.reverse_kl(x, zt, kind="full").sum().backward()

    def ce_fwd_bwd():
        x = zs.detach().requires_grad_(True)
        F.cross_entropy(x, labels, reduction="sum").backward()

    t_kl = timed(kl_fwd_bwd, device, repeats)
    t_ce = timed(ce_fwd_bwd, device, repeats)
    m_kl = peak_bytes(kl_fwd_bwd, device)
    m_ce = peak_bytes(ce_fwd_bwd, device)
    return {
        "shape": f"{rows}x{vocab}",
        "solve_beta / log_softmax": t_beta / t_lsm,
        "reverse_kl / cross_entropy time": t_kl / t_ce,
        "reverse_kl / cross_entropy peak mem": None if m_ce is None else m_kl / m_ce,
        "ms": (t_lsm * 1e3, t_beta * 1e3, t_kl * 1e3, t_ce * 1e3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'shape':>14} | {'beta/lsm':>8} (goal<=4) | {'KL/CE time':>10} (goal<=1.5) | "
          f"{'KL/CE mem':>9} (goal<=1.0) | ms: lsm, beta, kl, ce")
    for vocab in (32768, 151936):
        r = run_case(args.rows, vocab, args.repeats, device)
        ms = ", ".join(f"{x:.1f}" for x in r["ms"])
        mem = r["reverse_kl / cross_entropy peak mem"]
        mem = "n/a (CPU)" if mem is None else f"{mem:9.2f}"
        print(f"{r['shape']:>14} | {r['solve_beta / log_softmax']:8.2f}           | "
              f"{r['reverse_kl / cross_entropy time']:10.2f}              | "
              f"{mem:>9}             | {ms}")


if __name__ == "__main__":
    main()
