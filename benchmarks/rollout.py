"""Rollout engine benchmarks, each a ratio against a baseline measured in the same run.

(a) fed positions: token positions each network computed per (prompt + generated) token, for
    the continuous-batching engine (prefill in one forward per length-sorted sub-batch) and
    for the engine it replaced (``benchmarks/legacy_rollout.py``: a static batch, prompts past
    the shortest fed one token per step, finished rows computed to the end);
(b) tokens/s of the new engine / the replaced one on a long-tail workload: per-sequence response
    lengths drawn from a heavy-tailed (log-normal) distribution, student-only and TRB warmup
    (eps0), same prompts, models and lengths for both (a benchmark policy forces each
    sequence's stop at its drawn length and never before);
(c) peak memory of the rollout phase (growth of the process's peak RSS over the models, CPU)
    at 16, 64 and 256 sequences under the same budget (sequences in flight and prefill
    positions per forward), with the KV cache bytes and the bytes of the returned rollout
    (tokens, records, top-k ids: they grow with the sequences by definition), on a
    Qwen3-0.6B-shaped 2-layer student (KV per position as in the real model) and on the toy;
(d) student-only tokens/s of three engines on one tiny Qwen3: this engine, HF ``transformers``
    ``generate`` (KV cache) and vLLM's CPU build (``LLM.generate``, engine start-up not timed;
    skipped, with one line saying why, when ``.venv-vllm`` is missing or does not import), at
    16 x 48, 64 x 48, 16 x 256 and 64 x 256 (sequences x new tokens), median of 15 runs
    (``--repeats`` sets it) after a warm-up run, each timed around its generate call; the
    ratio engine / best of (HF, vLLM). The model: the toy student's shape with head_dim 32
    (vLLM's CPU attention takes no 16) and QK norm, random init, saved as a Megatron
    checkpoint and exported with ``trb-nemo convert megatron-to-hf`` (Qwen3ForCausalLM,
    fp32): the engine loads the checkpoint, HF and vLLM the export. Same token-id prompts
    (4..16 tokens), sampling at temperature 1 with top-k/top-p off, exactly N new tokens per
    sequence (stop suppressed: a forced-length policy here, ``min_new_tokens`` in HF,
    ``ignore_eos`` + ``min_tokens`` in vLLM), one thread each (``torch.set_num_threads(1)``;
    vLLM: ``OMP_NUM_THREADS=1``, ``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set,
    ``VLLM_CPU_KVCACHE_SPACE=1``, Intel OpenMP and tcmalloc preloaded where found; its
    frontend and engine-core processes run beside the compute thread, as they always do).
    vLLM pins another torch than ours, so it runs as ``.venv-vllm/bin/python
    benchmarks/vllm_runner.py``; ``benchmarks/vllm_venv.sh`` builds that venv (once; quick
    afterwards). ``--vllm-eager``: vLLM without torch.compile.
(e) speculative TRB warmup (``rollout.draft_tokens`` 0, 2, 4, 8) against student-only decoding
    on the same prompts: tokens/s, teacher forwards and positions per generated token, the
    draft acceptance (also at eps 0.005 / 0.02 / 0.05, against Pinsker's 1 - sqrt(eps / 2)),
    and one TRB-warmup step against one OPD step (student rollout + teacher scoring pass).

Models: the toy preset (conf/model/toy.yaml; (d) overrides it, see above). Ranks are local
processes (gloo on CPU).

Run: .venv/bin/python benchmarks/rollout.py [--tp 1] [--repeats N] [--parts abcde]
     (for (d)'s vLLM column, first: benchmarks/vllm_venv.sh)
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ForcedLengths:
    """Benchmark policy: ``inner``'s draws, except that sequence i (``noise.ids_R``) never
    draws the stop id before position ``stop_at[i]`` and draws it there."""

    def __init__(self, inner, stop_at: list[int], stop_id: int):
        self.inner, self.stop_id, self._stop_at = inner, stop_id, stop_at
        self.name = inner.name
        self.eps = getattr(inner, "eps", None)

    def needs_teacher(self):
        return self.inner.needs_teacher()

    def choose(self, zs, zt, noise, group, vocab_size):
        import torch

        from trb_nemo.ops.shards import shard_start

        stop_at = torch.tensor(self._stop_at, device=zs.device)[noise.ids_R]
        early = noise.counter_R < stop_at
        col = self.stop_id - shard_start(zs.shape[-1], group)
        if 0 <= col < zs.shape[-1]:
            zs, zt = zs.clone(), None if zt is None else zt.clone()
            for z in (zs, zt):
                if z is not None:
                    z[:, col] = torch.where(early, float("-inf"), z[:, col].float()).to(z.dtype)
        choice = self.inner.choose(zs, zt, noise, group, vocab_size)
        choice.ids = torch.where(noise.counter_R >= stop_at, self.stop_id, choice.ids)
        return choice


def _workload(n: int, max_new: int, vocab: int, seed: int, long_tail: bool):
    """Prompts of 4..16 random tokens and each sequence's response length: fixed at max_new,
    or log-normal (median max_new / 6, sigma 1) clipped to [2, max_new]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(k),), generator=g).tolist()
               for k in torch.randint(4, 17, (n,), generator=g)]
    if not long_tail:
        return prompts, [max_new] * n
    z = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = (math.log(max_new / 6) + z).exp().round().clamp(2, max_new).long().tolist()
    return prompts, lengths


def _policy(name: str, eps0: float, lengths, prompts, stop_id):
    from trb_nemo.methods.policies import StudentPolicy, TrustRegionPolicy

    inner = StudentPolicy() if name == "student" else TrustRegionPolicy("trb", eps0)
    # the position whose logits draw response token k is len(prompt) + k - 1: the last is n - 1
    stop_at = [len(p) + n - 2 for p, n in zip(prompts, lengths, strict=True)]
    return ForcedLengths(inner, stop_at, stop_id)


def _engines(tp: int, n: int, max_new: int, repeats: int, eps0: float, budget: int, seed: int):
    """(a) and (b) on one layout: per (engine, behavior): tok/s (median), fed positions."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from legacy_rollout import generate as legacy_generate

    from trb_nemo.config.compose import load_config
    from trb_nemo.config.schema import ParallelConfig
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings

    quiet_third_party()
    torch.set_num_threads(1)
    cfg = load_config(["parallel=cpu_tp1"])
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    pg = groups.initialize(parallel, seed=0)
    student, teacher = build_student(cfg.model, parallel, pg), build_teacher(cfg.model, parallel, pg)
    vocab = SharedVocab.of(cfg.model)
    out = {}
    for workload in ("long_tail", "uniform"):
        prompts, lengths = _workload(n, max_new, vocab.size, seed, workload == "long_tail")
        tokens_in = sum(len(p) for p in prompts) + sum(lengths)
        for behavior in ("student", "trb_warmup"):
            policy = _policy("student" if behavior == "student" else "trb", eps0, lengths,
                             prompts, vocab.stop_id)
            for engine in ("new", "legacy"):
                rates, fed = [], None
                for r in range(repeats + 1):
                    kw = dict(vocab=vocab, max_new_tokens=max_new, topk_k=cfg.loss.topk,
                              generator=torch.Generator().manual_seed(r), pg=pg)
                    if engine == "new":
                        ro = generate(student, teacher, prompts, policy,
                                      DecodeSettings(max_new_tokens=max_new, topk_k=cfg.loss.topk,
                                                     max_in_flight=budget),
                                      vocab=vocab, generator=kw["generator"], pg=pg)
                    else:
                        ro = legacy_generate(student, teacher, prompts, policy, **kw)
                    got = ro.response_lengths.tolist()
                    assert got == lengths, "the forced lengths did not hold"
                    if r > 0:  # the first run warms up
                        rates.append(sum(got) / ro.seconds)
                    fed = {"student": ro.forwards["student_positions"] / tokens_in,
                           "teacher": ro.forwards["teacher_positions"] / tokens_in}
                out[(workload, behavior, engine)] = (statistics.median(rates), fed)
    groups.destroy()
    return out


def _memory(n: int, budget: int, max_new: int, shape: str, prefill_tokens: int):
    """(c) in a fresh process: peak-RSS growth of one student-only rollout of n sequences under
    the budget (``budget`` sequences in flight, ``prefill_tokens`` positions per prefill
    forward: the two knobs that bound the rollout's memory)."""
    import torch

    from trb_nemo.config.compose import load_config
    from trb_nemo.config.schema import ModelConfig, ModelSpec, ParallelConfig
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.models.networks import build_student
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings

    quiet_third_party()
    torch.set_num_threads(1)
    parallel = ParallelConfig(tensor_model_parallel_size=1)
    pg = groups.initialize(parallel, seed=0)
    if shape == "toy":
        model_cfg = load_config(["parallel=cpu_tp1"]).model
    else:  # Qwen3-0.6B's attention and width, 2 layers, a 4096-token vocabulary
        spec = ModelSpec(name="qwen3-0.6b-shaped", num_layers=2, hidden_size=1024,
                         ffn_hidden_size=3072, num_attention_heads=16, num_query_groups=8,
                         kv_channels=128, vocab_size=4096, max_sequence_length=512,
                         qk_layernorm=True, eos_token_id=1)
        model_cfg = ModelConfig(student=spec, teacher=None, precision="fp32")
    student = build_student(model_cfg, parallel, pg)
    vocab = SharedVocab.of(model_cfg)
    prompts, lengths = _workload(n, max_new, vocab.size, 0, long_tail=True)
    policy = _policy("student", 0.0, lengths, prompts, vocab.stop_id)
    rss = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current RSS
    ro = generate(student, None, prompts, policy,
                  DecodeSettings(max_new_tokens=max_new, topk_k=16, max_in_flight=budget, prefill_tokens=prefill_tokens),
                  vocab=vocab, generator=torch.Generator().manual_seed(0), pg=pg)
    peak = _status_kb("VmHWM")
    groups.destroy()
    tensors = [ro.tokens, ro.prompt_lengths, ro.response_lengths, ro.loss_mask, ro.topk_ids,
               ro.stopped] + list({id(v.untyped_storage()): v for v in ro.records.values()}.values())
    outputs = sum(t.untyped_storage().nbytes() for t in tensors)
    return {"growth_bytes": (peak - rss) * 1024, "kv_bytes": ro.forwards["kv_cache_bytes"],
            "output_bytes": outputs}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


D_SHAPES = ((16, 48), (64, 48), (16, 256), (64, 256))
"""(d)'s (sequences, new tokens per sequence)."""
D_STUDENT = ("model.student.checkpoint=null", "model.student.kv_channels=32",
             "model.student.qk_layernorm=true", "model.student.max_sequence_length=512")
"""(d)'s student: the toy student's shape with head_dim 32 (vLLM's CPU attention takes 32, 64,
80, ...; the toy has 16) and Qwen3's QK norm (so it exports as Qwen3ForCausalLM), random init,
room for 16 + 256 positions."""
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def _d_config(checkpoint: str | None = None):
    from trb_nemo.config.compose import load_config

    extra = [] if checkpoint is None else [f"model.student.checkpoint={checkpoint}"]
    return load_config(["parallel=cpu_tp1", *D_STUDENT, *extra])


def _d_save_student(folder: str) -> None:
    """(d) rank: the benchmark student (:data:`D_STUDENT`, random init) saved as a Megatron
    checkpoint in ``folder``."""
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.models.megatron_io import save_model
    from trb_nemo.models.networks import build_student
    from trb_nemo.parallel import groups

    quiet_third_party()
    cfg = _d_config()
    pg = groups.initialize(cfg.parallel, seed=0)
    save_model(folder, build_student(cfg.model, cfg.parallel, pg), cfg.model.student)
    groups.destroy()


def _d_prompts(n: int, max_new: int) -> list[list[int]]:
    from trb_nemo.models.vocab import SharedVocab

    return _workload(n, max_new, SharedVocab.of(_d_config().model).size, 1, long_tail=False)[0]


def _hf_vs_engine(megatron: str, hf_dir: str, n: int, max_new: int, repeats: int):
    """(d) rank, one shape: student-only tokens/s of each timed run of HF generate and of the
    engine (``{"engine": [...], "hf": [...]}``) on the same weights (the Megatron checkpoint
    and its HF export), same prompts and lengths, 1 thread, each timed around its ``generate``
    call; the two alternate run by run."""
    import torch
    from transformers import AutoModelForCausalLM

    from trb_nemo.logs import quiet_third_party
    from trb_nemo.models.networks import build_student
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings

    quiet_third_party()
    torch.set_num_threads(1)
    cfg = _d_config(megatron)
    vocab = SharedVocab.of(cfg.model)
    prompts = _d_prompts(n, max_new)
    lengths = [max_new] * n
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    ids = torch.zeros(n, width, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as HF generate wants for decoder-only models
        ids[i, width - len(p):], attn[i, width - len(p):] = torch.tensor(p), 1
    pg = groups.initialize(cfg.parallel, seed=0)
    student = build_student(cfg.model, cfg.parallel, pg)
    policy = _policy("student", 0.0, lengths, prompts, vocab.stop_id)

    def run_hf(r):
        torch.manual_seed(r)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, max_new_tokens=max_new, min_new_tokens=max_new,
                              pad_token_id=0, eos_token_id=vocab.stop_id)
        assert out.shape[1] - width == max_new

    def run_engine(r):
        ro = generate(student, None, prompts, policy,
                      DecodeSettings(max_new_tokens=max_new, topk_k=1, max_in_flight=n),
                      vocab=vocab, generator=torch.Generator().manual_seed(r), pg=pg)
        assert ro.response_lengths.tolist() == lengths

    rates = {"engine": [], "hf": []}
    for r in range(repeats + 1):  # alternating, so that a noisy neighbour slows both alike
        for name, run in (("hf", run_hf), ("engine", run_engine)):
            t0 = time.perf_counter()
            run(r)
            seconds = time.perf_counter() - t0
            if r > 0:  # the first run warms up
                rates[name].append(n * max_new / seconds)
    groups.destroy()
    return rates


def _vllm(hf_dir: str, shapes, repeats: int, eager: bool) -> tuple[dict | None, str]:
    """(d)'s vLLM column: ``benchmarks/vllm_runner.py`` under ``.venv-vllm``'s python (another
    torch than ours) on every shape in one engine. (its JSON, "") or (None, why it was
    skipped). Threads: ``OMP_NUM_THREADS=1`` and ``VLLM_CPU_OMP_THREADS_BIND=nobind`` (one
    unpinned compute thread, as ours and HF's) unless the environment sets them."""
    if not VLLM_PYTHON.exists():
        return None, "no .venv-vllm (build it with benchmarks/vllm_venv.sh)"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"OMP_NUM_THREADS": "1",
                "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    # vLLM's CPU guide preloads tcmalloc (when the system has it) and Intel OpenMP (vllm-cpu
    # installs it into the venv)
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    iomp = VLLM_PYTHON.parents[1] / "lib" / "libiomp5.so"
    preload = [lib for lib in (tcmalloc, str(iomp) if iomp.exists() else None) if lib]
    env["LD_PRELOAD"] = " ".join(preload + [os.environ.get("LD_PRELOAD", "")]).strip()
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm"], env=env, capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return None, f"`import vllm` fails in .venv-vllm: {_last_error(probe.stderr)}"
    with tempfile.TemporaryDirectory() as tmp:
        job = {"model": hf_dir, "repeats": repeats, "dtype": "float32", "eager": eager,
               "out": f"{tmp}/result.json",
               "shapes": [{"prompts": _d_prompts(n, m), "max_new": m} for n, m in shapes]}
        Path(f"{tmp}/job.json").write_text(json.dumps(job))
        run = subprocess.run([str(VLLM_PYTHON), str(ROOT / "benchmarks" / "vllm_runner.py"),
                              f"{tmp}/job.json"], env=env, capture_output=True, text=True)
        if run.returncode != 0 or not Path(job["out"]).exists():
            return None, (f"vllm_runner.py failed (exit {run.returncode}): "
                          f"{_last_error(run.stderr + run.stdout)}")
        return json.loads(Path(job["out"]).read_text()), ""


def _last_error(text: str) -> str:
    """The line of a failed run's output that says the most: the last naming an error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def _part_d(repeats: int, eager: bool) -> dict:
    """(d): the benchmark student saved, exported to HF (``trb-nemo convert megatron-to-hf``),
    then per shape the engine and HF generate (one rank each), then vLLM on every shape."""
    from trb_nemo.parallel.spawn import run_local_ranks

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        megatron, hf_dir = f"{tmp}/megatron", f"{tmp}/hf"
        run_local_ranks(_d_save_student, 1, (megatron,))
        subprocess.run([sys.executable, "-m", "trb_nemo.cli", "convert", "megatron-to-hf",
                        "--checkpoint", megatron, "--out", hf_dir], check=True,
                       capture_output=True)
        arch = json.loads(Path(hf_dir, "config.json").read_text())["architectures"][0]
        rates = {f"{n}x{m}": run_local_ranks(_hf_vs_engine, 1, (megatron, hf_dir, n, m,
                                                               repeats))[0]
                 for n, m in D_SHAPES}
        vllm, why = _vllm(hf_dir, D_SHAPES, repeats, eager)
    load.append(os.getloadavg()[0])
    for shape in (vllm or {}).get("shapes", []):
        rates[f"{shape['n']}x{shape['max_new']}"]["vllm"] = [
            shape["n"] * shape["max_new"] / sec for sec in shape["seconds"]]
    rows = {}
    for shape, per_engine in rates.items():
        row = {f"{k}_tok_s": statistics.median(v) for k, v in per_engine.items()}
        row["engine_over_best"] = row["engine_tok_s"] / max(row["hf_tok_s"],
                                                             row.get("vllm_tok_s", 0.0))
        # the fastest run of each: the least disturbed by other work on the machine
        fastest = {k: max(v) for k, v in per_engine.items()}
        row["fastest_run_tok_s"] = fastest
        row["fastest_engine_over_best"] = fastest["engine"] / max(fastest["hf"],
                                                                 fastest.get("vllm", 0.0))
        rows[shape] = row
    return {"architecture": arch, "repeats": repeats, "shapes": rows,
            "vllm": None if vllm is None else {k: v for k, v in vllm.items() if k != "shapes"},
            "vllm_skipped": why or None, "vllm_eager": eager,
            "load_average_1min": {"start": load[0], "end": load[1], "cores": os.cpu_count()}}


def _speculative(n: int, max_new: int, repeats: int, eps0: float, budget: int):
    """(e) toy models, TP=1, natural stops: per draft length (0 = lockstep TRB) the TRB-warmup
    rollout's tokens/s, teacher forwards and positions per generated token and the draft
    acceptance; the student-only rate on the same prompts; the acceptance at several eps; one
    TRB-warmup step (rollout; the teacher's statistics come with it) against one OPD step
    (student rollout + teacher scoring pass), both up to the loss batch."""
    import torch

    from trb_nemo.config.compose import load_config
    from trb_nemo.logs import quiet_third_party
    from trb_nemo.methods.policies import StudentPolicy, TrustRegionPolicy
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings
    from trb_nemo.scoring.teacher import loss_batch

    quiet_third_party()
    torch.set_num_threads(1)
    cfg = load_config(["parallel=cpu_tp1"])
    pg = groups.initialize(cfg.parallel, seed=0)
    student, teacher = build_student(cfg.model, cfg.parallel, pg), build_teacher(cfg.model,
                                                                                 cfg.parallel, pg)
    vocab = SharedVocab.of(cfg.model)
    prompts, _ = _workload(n, max_new, vocab.size, 2, long_tail=False)

    def run(policy, draft, r):
        t0 = time.perf_counter()
        ro = generate(student, teacher, prompts, policy,
                      DecodeSettings(max_new_tokens=max_new, topk_k=cfg.loss.topk, max_in_flight=budget, draft_tokens=draft),
                      vocab=vocab, generator=torch.Generator().manual_seed(r), pg=pg)
        loss_batch(ro, cfg.loss, teacher, cfg.optim.micro_batch_size, vocab=vocab, pg=pg)
        return ro, ro.seconds, time.perf_counter() - t0

    def median_of(policy, draft):
        rates, steps, last = [], [], None
        for r in range(repeats + 1):
            ro, seconds, step = run(policy, draft, r)
            if r > 0:  # the first run warms up
                rates.append(int(ro.response_lengths.sum()) / seconds)
                steps.append(step)
            last = ro
        f = last.forwards
        tokens = int(last.response_lengths.sum())
        drafts = f.get("drafts_accepted", 0) + f.get("drafts_rejected", 0)
        return {"tok_s": statistics.median(rates), "step_s": statistics.median(steps),
                "teacher_forwards_per_token": f["teacher"] / tokens,
                "teacher_positions_per_token": f["teacher_positions"] / tokens,
                "acceptance": f["drafts_accepted"] / drafts if drafts else None}

    out = {"student": median_of(StudentPolicy(), 0)}
    for g in (0, 2, 4, 8):
        out[f"trb_g{g}"] = median_of(TrustRegionPolicy("trb", eps0), g)
    for eps in (0.005, 0.02, 0.05):
        ro, _, _ = run(TrustRegionPolicy("trb", eps), 4, 0)
        f = ro.forwards
        out[f"accept_eps{eps}"] = f["drafts_accepted"] / (f["drafts_accepted"]
                                                         + f["drafts_rejected"])
    groups.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=64, help="sequences of (a)/(b)")
    parser.add_argument("--budget", type=int, default=16, help="sequences in flight, (a)-(c)")
    parser.add_argument("--prefill-tokens", type=int, default=128,
                        help="positions per prefill forward, (c): with the sequence budget it "
                             "bounds the rollout's memory (the longest prompts of a larger "
                             "workload otherwise make a larger first prefill)")
    parser.add_argument("--max-new", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement (median; one warm-up run more): "
                             "default 3, and 15 for (d)")
    parser.add_argument("--eps0", type=float, default=0.02)
    parser.add_argument("--vllm-eager", action="store_true",
                        help="(d): run vLLM with enforce_eager (no torch.compile step)")
    parser.add_argument("--parts", default="abcde")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    d_repeats = 15 if args.repeats is None else args.repeats
    args.repeats = 3 if args.repeats is None else args.repeats
    from trb_nemo.parallel.spawn import run_local_ranks

    report = {}
    if set("ab") & set(args.parts):
        res = run_local_ranks(_engines, args.tp, (args.tp, args.prompts, args.max_new,
                                                  args.repeats, args.eps0, args.budget, 0))[0]
        print(f"(a, b) toy models, TP={args.tp}, {args.prompts} sequences, budget {args.budget}, "
              f"up to {args.max_new} new tokens, median of {args.repeats}")
        print(f"{'workload':<10}{'behavior':<12}{'new tok/s':>10}{'old tok/s':>10}{'new/old':>9}"
              f"{'fed/token S new':>17}{'T new':>7}{'S old':>7}{'T old':>7}")
        for (workload, behavior, engine), (rate, fed) in res.items():
            if engine != "new":
                continue
            old_rate, old_fed = res[(workload, behavior, "legacy")]
            print(f"{workload:<10}{behavior:<12}{rate:>10.0f}{old_rate:>10.0f}"
                  f"{rate / old_rate:>9.2f}{fed['student']:>17.3f}{fed['teacher']:>7.3f}"
                  f"{old_fed['student']:>7.3f}{old_fed['teacher']:>7.3f}")
            report[f"{workload}/{behavior}"] = {"new_tok_s": rate, "old_tok_s": old_rate,
                                                "fed_new": fed, "fed_old": old_fed}
    if "c" in args.parts:
        # glibc serves every block over 16 KiB by mmap and unmaps it when freed, so the peak RSS
        # follows the live tensors instead of the allocator's cached heap (read at the ranks'
        # start: they are fresh processes)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "16384"
        print(f"(c) rollout peak memory (peak-RSS growth over the models), budget {args.budget} "
              f"sequences and {args.prefill_tokens} prefill positions per forward")
        for shape in ("qwen3-0.6b-shaped", "toy"):
            rows = {n: run_local_ranks(_memory, 1, (n, args.budget, 64, shape,
                                                    args.prefill_tokens))[0]
                    for n in (16, 64, 256)}
            base = rows[16]["growth_bytes"]
            work = rows[16]["growth_bytes"] - rows[16]["output_bytes"]
            for n, r in rows.items():
                print(f"  {shape:<18} {n:>4} sequences: {r['growth_bytes'] / 2**20:8.1f} MiB "
                      f"({r['growth_bytes'] / base:.2f}x of 16), KV cache "
                      f"{r['kv_bytes'] / 2**20:.1f} MiB, returned rollout "
                      f"{r['output_bytes'] / 2**20:.1f} MiB, peak without it "
                      f"{(r['growth_bytes'] - r['output_bytes']) / work:.2f}x of 16")
            report[f"memory/{shape}"] = {str(n): r for n, r in rows.items()}
    if "d" in args.parts:
        res = _part_d(d_repeats, args.vllm_eager)
        print(f"(d) student-only tokens/s, engine vs HF generate vs vLLM (CPU build), 1 thread, "
              f"median of {d_repeats}, same prompts and new tokens (stop suppressed); the "
              f"toy student's shape with head_dim 32 and QK norm, exported as {res['architecture']}"
              f" (fp32)")
        print(f"  {'shape':<9}{'engine':>10}{'HF':>10}{'vLLM':>10}{'engine/best':>13}"
              f"{'fastest runs: engine/best':>27}")
        for shape, row in res["shapes"].items():
            vllm = f"{row['vllm_tok_s']:>10.0f}" if "vllm_tok_s" in row else f"{'-':>10}"
            print(f"  {shape.replace('x', ' x '):<9}{row['engine_tok_s']:>10.0f}"
                  f"{row['hf_tok_s']:>10.0f}{vllm}{row['engine_over_best']:>13.2f}"
                  f"{row['fastest_engine_over_best']:>27.2f}")
        load = res["load_average_1min"]
        print(f"  load average (1 min) {load['start']:.1f} at the start, {load['end']:.1f} at the "
              f"end, on {load['cores']} cores (other work on the machine slows some runs)")
        if res["vllm"] is None:
            print(f"  vLLM skipped: {res['vllm_skipped']}")
        else:
            v = res["vllm"]
            print(f"  vLLM {v['vllm_version']} (torch {v['torch_version']}, "
                  f"{'eager' if args.vllm_eager else 'default compilation'}): "
                  + ", ".join(f"{k}={val}" for k, val in v["threads"].items())
                  + f", LD_PRELOAD={' '.join(v['preloaded']) or '-'}"
                  + f"; engine start-up {v['startup_s']:.0f} s, not timed")
        print(json.dumps({"part": "d", **res}))
        report["d"] = res
    if "e" in args.parts:
        res = run_local_ranks(_speculative, 1, (args.prompts, args.max_new, args.repeats,
                                                args.eps0, args.budget))[0]
        print(f"(e) speculative TRB warmup (eps = {args.eps0}), toy models, TP=1, "
              f"{args.prompts} sequences, budget {args.budget}, up to {args.max_new} new tokens, "
              f"natural stops, median of {args.repeats}")
        base = res["student"]["tok_s"]
        print(f"{'decoding':<22}{'tok/s':>8}{'/student':>10}{'teacher fwd/token':>19}"
              f"{'T positions/token':>19}{'acceptance':>12}{'step s':>8}")
        for name, r in res.items():
            if name.startswith("accept_"):
                continue
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
            print(f"{name:<22}{r['tok_s']:>8.0f}{r['tok_s'] / base:>10.2f}"
                  f"{r['teacher_forwards_per_token']:>19.3f}{r['teacher_positions_per_token']:>19.3f}"
                  f"{acc:>12}{r['step_s']:>8.2f}")
        best = min((k for k in res if k.startswith("trb_g")), key=lambda k: res[k]["step_s"])
        print(f"  one TRB-warmup step ({best}) / one OPD step (student rollout + teacher scoring "
              f"pass), up to the loss batch: {res[best]['step_s'] / res['student']['step_s']:.2f}"
              f"; lockstep TRB: {res['trb_g0']['step_s'] / res['student']['step_s']:.2f}")
        for eps in (0.005, 0.02, 0.05):
            print(f"  acceptance at eps {eps}: {res[f'accept_eps{eps}']:.3f} "
                  f"(Pinsker's bound 1 - sqrt(eps/2) = {1 - math.sqrt(eps / 2):.3f})")
        report["speculative"] = res
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
