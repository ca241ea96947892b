"""Per-decode-step sampling cost: ``sample`` (counter-based noise + Gumbel-max, TP = 1) with its
row kernel eager and fused, as a ratio against one fp32 ``torch.log_softmax`` of the same rows
in the same run.

Shapes: rows 32 and 256 (decode batches) x a 152k vocabulary (Qwen3, 151936 columns of which
151665 real: the padded case the engine runs), fp32 logits ~ 2 N(0, 1), keyed by
:class:`~trb_nemo.ops.sampling.RowNoise` as the rollout engine keys them. Each measurement is
the fastest of the repeats (interference only adds time); the first call compiles and is not
counted. Also checks that eager and fused draws are equal.

Run: .venv/bin/python benchmarks/sampling.py [--rows 32,256] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from trb_nemo.ops import fused
from trb_nemo.ops.sampling import RowNoise, sample

VOCAB, TRUE_VOCAB = 151936, 151665


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


def run_case(rows, repeats, device, modes):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(rows, VOCAB, generator=g) * 2).to(device)
    noise = RowNoise(1234, torch.arange(rows, device=device),
                     torch.full((rows,), 17, dtype=torch.long, device=device))
    out = {"rows": rows, "vocab": VOCAB, "device": str(device)}
    out["log_softmax_ms"] = 1e3 * timed(lambda: torch.log_softmax(z, dim=-1), device, repeats)
    ids = {}
    for mode in modes:
        fused.set_mode(mode)
        ids[mode] = sample(z, noise=noise, vocab_size=TRUE_VOCAB)
        ms = 1e3 * timed(lambda: sample(z, noise=noise, vocab_size=TRUE_VOCAB), device, repeats)
        name = "fused" if mode == "on" else "eager"
        out[f"sample_{name}_ms"] = ms
        out[f"sample_{name}_vs_log_softmax"] = ms / out["log_softmax_ms"]
    fused.set_mode("auto")
    if len(ids) == 2:
        out["eager_equals_fused"] = bool(torch.equal(*ids.values()))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,256", help="comma-separated row counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="off,on", help="fused modes to measure: off, on")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch threads: {torch.get_num_threads()}")
    for rows in (int(r) for r in args.rows.split(",")):
        print(json.dumps(run_case(rows, args.repeats, device, args.modes.split(","))))


if __name__ == "__main__":
    main()
