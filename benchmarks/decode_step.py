"""Decode-step benchmarks of the rollout engine, each a ratio against a baseline of the same run.

(f) long tail: the attention cost of a decode step must follow the sum of the live lengths,
    not the number of live sequences times the longest. One step over one 6000-token and
    fifteen 400-token sequences (12,000 keys in all) against one step over sixteen sequences
    of 750 tokens (the same 12,000), on a model whose attention dominates the step (hidden 64,
    4 heads of 64, 2 layers, vocabulary 128); goal: long-tail / even <= 1.3. Baseline: the same
    two steps with every row in one run over the longest keys (the engine before runs:
    :func:`trb_nemo.models.cached_attention.segments` disabled), which pays 16 x 6000.
(g) host syncs and kernel launches per decode step, for student-only decoding, TRB (student
    and teacher in lockstep, the trust-region solve each step) and speculative TRB (per round,
    3 drafts): on CPU counted at the dispatcher (tests/sync_counter.py for syncs; every aten op
    dispatched for launches, an upper bound of what a GPU launches: views launch nothing), on
    CUDA by the profiler (cudaLaunchKernel / cudaGraphLaunch, and synchronizing calls). The
    toy preset's networks, 8 prompts, 24 new tokens, admission (prefill) excluded.
(h) CUDA only: tokens/s of a decode step at batch 32 with 1k and 4k context on a 2-layer
    Qwen3-1.7B-shaped student (bf16, its full vocabulary), CUDA graphs against eager decoding,
    and which attention kernel ran (flash-attn's KV-cache kernel or SDPA).

Run: .venv/bin/python benchmarks/decode_step.py [--parts fgh] [--repeats 15] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONG_TAIL = [6000] + [400] * 15
EVEN = [750] * 16


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _long_tail(repeats: int, device_name: str):
    """(f): median seconds of one decode step at each set of lengths, with and without runs."""
    import torch

    import trb_nemo.rollout.kv_cache as cached
    from trb_nemo.config.schema import ModelConfig, ModelSpec, ParallelConfig
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.models.networks import build_student
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.kv_cache import SequenceCache

    quiet_third_party()
    torch.set_num_threads(1)
    spec = ModelSpec(name="attention-bound", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                     num_attention_heads=4, num_query_groups=4, kv_channels=64, vocab_size=128,
                     max_sequence_length=8192)
    parallel = ParallelConfig()
    pg = groups.initialize(parallel, seed=0)
    model = build_student(ModelConfig(student=spec, teacher=None, precision="fp32"), parallel, pg)
    model.eval()
    device = next(model.parameters()).device
    cache = SequenceCache(model, 16, 6100, pg, cuda_graphs=False)
    gen = torch.Generator().manual_seed(0)
    for t in (*cache.keys.values(), *cache.values.values()):
        t.copy_(torch.randn(t.shape, generator=gen))
    tokens = torch.randint(3, 128, (16, 1), generator=gen).to(device)
    one_run = cached.segments

    def step(lengths):
        cache.lengths = list(lengths) + [0] * (cache.slots - len(lengths))
        cache.lengths_S.copy_(torch.tensor(cache.lengths))
        _sync(device)
        t0 = time.perf_counter()
        cache.step(len(lengths), tokens)
        _sync(device)
        return time.perf_counter() - t0

    out = {}
    for mode in ("runs", "one run"):
        cached.segments = one_run if mode == "runs" else (
            lambda key_lens, length: ((0, len(key_lens), max(key_lens), True),))
        try:
            for name, lengths in (("long_tail", LONG_TAIL), ("even", EVEN)):
                step(lengths)  # warm-up
                out[(mode, name)] = statistics.median(step(lengths) for _ in range(repeats))
        finally:
            cached.segments = one_run
    groups.destroy()
    return {f"{mode}/{name}": s for (mode, name), s in out.items()}


def _counts(device_name: str):
    """(g): per decode step (admission excluded): host syncs and launches of each decoder."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from sync_counter import SyncCounter

    from trb_nemo.config.compose import load_config
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.methods.policies import StudentPolicy, TrustRegionPolicy
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.decoder import Decoder
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.speculative import SpeculativeDecoder
    from trb_nemo.rollout.types import DecodeSettings

    quiet_third_party()
    torch.set_num_threads(1)
    cfg = load_config(["parallel=cpu_tp1" if device_name == "cpu" else "parallel=gpu_tp1"])
    pg = groups.initialize(cfg.parallel, seed=0)
    student = build_student(cfg.model, cfg.parallel, pg)
    teacher = build_teacher(cfg.model, cfg.parallel, pg)
    vocab = SharedVocab.of(cfg.model)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab.size, (int(k),), generator=gen).tolist()
               for k in torch.randint(4, 12, (8,), generator=gen)]

    out = {}
    for name, policy, draft in (("student", StudentPolicy(), 0),
                                ("trb", TrustRegionPolicy("trb", 0.05), 0),
                                ("speculative", TrustRegionPolicy("trb", 0.05), 3)):
        settings = DecodeSettings(max_new_tokens=24, topk_k=cfg.loss.topk, draft_tokens=draft)
        out[name] = _count_one(lambda p=policy, s=settings: generate(
            student, teacher, prompts, p, s, vocab=vocab, generator=gen, pg=pg), device_name,
            SyncCounter(), (Decoder, SpeculativeDecoder))
    groups.destroy()
    return out


def _count_one(run, device_name, syncs, decoders):
    """Syncs and launches per decode step of ``run()`` (a generate call), admission excluded."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Launches(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n, self.counting = 0, True

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.counting and func._schema.name not in _VIEWS:
                self.n += 1
            return func(*args, **(kwargs or {}))

    from trb_nemo.ops.checks import DeferredChecks

    launches, saved = Launches(), {}

    def counted(on: bool):
        def wrap(fn):
            def wrapped(*a, **k):
                was = syncs.counting, launches.counting
                syncs.counting = launches.counting = on
                try:
                    return fn(*a, **k)
                finally:
                    syncs.counting, launches.counting = was
            return wrapped
        return wrap

    # count inside the decoding loop only: not the set-up, the admissions (prefill), the one
    # read of the deferred checks, nor the hand-over of the outputs
    patches = [(cls, "_admit", False) for cls in decoders] + [
        (decoders[0], "run", True), (DeferredChecks, "raise_first", False)]
    for cls, name, on in patches:
        saved[(cls, name)] = cls.__dict__[name]
        setattr(cls, name, counted(on)(saved[(cls, name)]))
    syncs.counting = launches.counting = False
    try:
        if device_name == "cuda":
            counts = _profiled(run)
            rollout = counts.pop("rollout")
        else:
            with torch.inference_mode(), syncs, launches:
                rollout = run()
    finally:
        for (cls, name), fn in saved.items():
            setattr(cls, name, fn)
    steps = rollout.forwards["decode_steps"]
    if device_name == "cuda":
        out = {k: v / steps for k, v in counts.items()}
    else:
        out = {"host syncs": len(syncs) / steps, "launches": launches.n / steps}
    out["steps"] = steps
    return out


_VIEWS = {"aten::view", "aten::_unsafe_view", "aten::as_strided", "aten::expand",
          "aten::permute", "aten::transpose", "aten::t", "aten::slice", "aten::select",
          "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach", "aten::unbind",
          "aten::split", "aten::reshape", "aten::lift_fresh", "aten::empty", "aten::empty_like",
          "aten::empty_strided"}


def _profiled(fn):
    """CUDA: kernel and graph launches and synchronizing runtime calls of ``fn()`` (whole
    rollout, admission included: an upper bound per step)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        rollout = fn()
        torch.cuda.synchronize()
    counts = {"launches": 0, "host syncs": 0}
    for e in prof.key_averages():
        if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch"):
            counts["launches"] += e.count
        if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            counts["host syncs"] += e.count
    counts["rollout"] = rollout
    return counts


def _graph_speed(repeats: int):
    """(h): per context, median seconds of one decode step (32 rows), graphs and eager."""
    import torch

    from trb_nemo.config.schema import ModelConfig, ModelSpec, ParallelConfig
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.models.networks import build_network
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.kv_cache import SequenceCache

    quiet_third_party()
    spec = ModelSpec(name="qwen3-1.7b-2l", num_layers=2, hidden_size=2048, ffn_hidden_size=6144,
                     num_attention_heads=16, num_query_groups=8, kv_channels=128,
                     vocab_size=151936, max_sequence_length=8192, qk_layernorm=True,
                     tie_embeddings=True, rotary_base=1_000_000.0)
    parallel = ParallelConfig()
    pg = groups.initialize(parallel, seed=0)
    model = build_network(spec, ModelConfig(student=spec, teacher=None, precision="bf16"),
                          parallel, pg).eval()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for context in (1024, 4096):
        for graphs in (True, False):
            cache = SequenceCache(model, 32, context + repeats + 8, pg, cuda_graphs=graphs)
            with torch.no_grad():
                for t in (*cache.keys.values(), *cache.values.values()):
                    t.normal_(generator=None)
                cache.lengths = [context - 1 - b for b in range(32)]  # unequal rows
                cache.lengths_S.copy_(torch.tensor(cache.lengths))
                tokens = torch.randint(3, 1000, (32, 1), generator=gen).cuda()
                for _ in range(3):
                    cache.step(32, tokens)  # warm-up (and captures)
                times = []
                for _ in range(repeats):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    cache.step(32, tokens)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
            out[(context, graphs)] = statistics.median(times)
            out["flash"] = cache.flash
            cache.release()
    groups.destroy()
    return {f"{k[0]}/{'graphs' if k[1] else 'eager'}" if isinstance(k, tuple) else k: v
            for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="fg")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from trb_nemo.parallel.spawn import run_local_ranks

    env = None
    if "f" in args.parts:
        r = run_local_ranks(_long_tail, 1, (args.repeats, args.device), env=env)[0]
        print(f"(f) one decode step, median of {args.repeats} (ms): long tail 1x6000 + 15x400 "
              "vs even 16x750 (12,000 keys each)")
        for mode in ("runs", "one run"):
            lt, ev = r[f"{mode}/long_tail"], r[f"{mode}/even"]
            goal = " (goal <= 1.3)" if mode == "runs" else " (baseline: every row reads 6000)"
            print(f"    {mode:>8}: long tail {lt * 1e3:7.2f}  even {ev * 1e3:7.2f}  "
                  f"ratio {lt / ev:5.2f}{goal}")
        print(json.dumps({"f": r}))
    if "g" in args.parts:
        r = run_local_ranks(_counts, 1, (args.device,), env=env)[0]
        print(f"(g) per decode step ({args.device}; a speculative step is a round of 3 drafts)")
        for name, c in r.items():
            print(f"    {name:>12}: host syncs {c['host syncs']:5.2f}  launches "
                  f"{c['launches']:7.1f}  ({c['steps']} steps)")
        print(json.dumps({"g": r}))
    if "h" in args.parts and args.device == "cuda":
        r = run_local_ranks(_graph_speed, 1, (args.repeats,), env=env)[0]
        kernel = "flash-attn KV cache" if r.pop("flash") else "SDPA (fused, masked)"
        print(f"(h) decode step, 32 rows, 2-layer Qwen3-1.7B shape, bf16, attention: {kernel}")
        for context in (1024, 4096):
            g, e = r[f"{context}/graphs"], r[f"{context}/eager"]
            print(f"    context {context}: graphs {32 / g:8.0f} tok/s  eager {32 / e:8.0f} tok/s  "
                  f"graphs / eager speed {e / g:5.2f}")
        print(json.dumps({"h": r}))


if __name__ == "__main__":
    main()
