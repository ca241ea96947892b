"""Vocab-parallel op cost as ratios against named baselines on the same logits, in one run.

* solve_beta (eps = 0.02)                     vs one fp32 torch.log_softmax       (goal <= 4)
* reverse_kl(kind="full") forward+backward    vs F.cross_entropy forward+backward (goal <= 1.5)
  and its peak memory vs cross-entropy's peak                                     (goal <= 1.0)
  (as training calls it: two stop ids merged, read in place with ``stop_ids``)

Each op is measured with its row kernels eager and fused (``trb_nemo.ops.fused``: compiled by
torch.compile; the first call compiles and is excluded). Shapes: rows 2048 x V 32768, and a
152k-vocabulary (Qwen3) case; TP = 1 (the whole vocabulary local); logits z_S ~ 2 N(0, 1),
z_T = z_S + N(0, 1). Timings are the fastest of the repeats: on a shared or throttled machine
(this project's CPU runners) interference only ever adds time, and the median moved by 2x
between runs there while the minimum held. Peak memory is the extra memory the
op needs beyond its inputs: torch.cuda.max_memory_allocated on CUDA; on CPU the growth of the
peak resident set (VmHWM) of a fresh process that holds only the inputs (the kernels are
compiled there on a small shape first, so compiling is not counted).

Run: .venv/bin/python benchmarks/ops.py [--rows 2048] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from trb_nemo.ops import fused, losses, trust_region

EPS = 0.02
STOP_IDS = (7, 11)
"""(kept, dropped) stop id: the loss reads the logits EOS-canonicalized, as prefix_kl does."""


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def make_logits(rows, vocab, device):
    """z_S, z_T [rows, vocab] fp32 and labels, filled in row blocks (no full-size temporary)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    zs = torch.empty(rows, vocab, device=device)
    zt = torch.empty(rows, vocab, device=device)
    for start in range(0, rows, 64):
        block = torch.randn(min(64, rows - start), vocab, generator=g) * 2
        zs[start:start + 64] = block.to(device)
        zt[start:start + 64] = (block + torch.randn(block.shape, generator=g)).to(device)
    labels = torch.randint(0, vocab, (rows,), generator=g).to(device)
    return zs, zt, labels


def operations(zs, zt, labels):
    def beta():
        trust_region.solve_beta(zs, zt, EPS)

    def lsm():
        torch.log_softmax(zs, dim=-1)

    def kl():
        x = zs.detach().requires_grad_(True)
        losses.reverse_kl(x, zt, kind="full", stop_ids=STOP_IDS).sum().backward()

    def ce():
        x = zs.detach().requires_grad_(True)
        F.cross_entropy(x, labels, reduction="sum").backward()

    return {"solve_beta": beta, "log_softmax": lsm, "reverse_kl": kl, "cross_entropy": ce}


def peak_bytes(name, ops, rows, vocab, mode, device):
    """Extra peak memory of one call of operation ``name`` beyond its inputs (module docstring);
    ``ops`` are the run's operations (used on CUDA; a CPU measurement makes its own process)."""
    if device.type == "cuda":
        fused.set_mode(mode)
        fn = ops[name]
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run([sys.executable, __file__, "--peak-of", name, "--rows", str(rows),
                          "--vocab", str(vocab), "--mode", mode],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _peak_in_this_process(name, rows, vocab, mode):
    fused.set_mode(mode)
    small = make_logits(4, 256, torch.device("cpu"))
    operations(*small)[name]()  # compile on a small shape (the kernels are shape-dynamic)
    zs, zt, labels = make_logits(rows, vocab, torch.device("cpu"))
    before = _peak_rss()
    operations(zs, zt, labels)[name]()
    print(_peak_rss() - before)


def _peak_rss() -> int:
    """Peak resident set of this process image in bytes (VmHWM; ru_maxrss would carry the
    parent's peak over fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory needs Linux)")


def run_case(rows, vocab, repeats, device, modes):
    zs, zt, labels = make_logits(rows, vocab, device)
    ops = operations(zs, zt, labels)
    t_lsm = timed(ops["log_softmax"], device, repeats)
    t_ce = timed(ops["cross_entropy"], device, repeats)
    m_ce = peak_bytes("cross_entropy", ops, rows, vocab, "off", device)
    result = {"shape": f"{rows}x{vocab}", "ms log_softmax": t_lsm * 1e3,
              "ms cross_entropy": t_ce * 1e3, "MiB cross_entropy": m_ce / 2**20}
    for mode in modes:
        fused.set_mode(mode)
        t_beta = timed(ops["solve_beta"], device, repeats)
        t_kl = timed(ops["reverse_kl"], device, repeats)
        m_kl = peak_bytes("reverse_kl", ops, rows, vocab, mode, device)
        result[mode] = {
            "solve_beta / log_softmax": t_beta / t_lsm,
            "reverse_kl / cross_entropy time": t_kl / t_ce,
            "reverse_kl / cross_entropy peak mem": m_kl / m_ce,
            "ms solve_beta": t_beta * 1e3, "ms reverse_kl": t_kl * 1e3,
            "MiB reverse_kl": m_kl / 2**20,
        }
    fused.set_mode("auto")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="off,on", help="fused modes to measure: off, on")
    parser.add_argument("--vocab", type=int, default=None, help="one vocabulary size only")
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        _peak_in_this_process(args.peak_of, args.rows, args.vocab, args.mode)
        return
    device = torch.device(args.device)
    modes = args.modes.split(",")
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'shape':>12} {'kernels':>7} | {'beta/lsm':>8} (<=4) | {'KL/CE time':>10} (<=1.5) | "
          f"{'KL/CE mem':>9} (<=1.0) | ms: lsm, beta, ce, kl | MiB: ce, kl")
    for vocab in [args.vocab] if args.vocab else [32768, 151936]:
        r = run_case(args.rows, vocab, args.repeats, device, modes)
        for mode in modes:
            m = r[mode]
            label = {"off": "eager", "on": "fused"}[mode]
            print(f"{r['shape']:>12} {label:>7} | {m['solve_beta / log_softmax']:8.2f}       | "
                  f"{m['reverse_kl / cross_entropy time']:10.2f}         | "
                  f"{m['reverse_kl / cross_entropy peak mem']:9.2f}       | "
                  f"{r['ms log_softmax']:.0f}, {m['ms solve_beta']:.0f}, "
                  f"{r['ms cross_entropy']:.0f}, {m['ms reverse_kl']:.0f} | "
                  f"{r['MiB cross_entropy']:.0f}, {m['MiB reverse_kl']:.0f}")
        print(json.dumps(r))


if __name__ == "__main__":
    main()
