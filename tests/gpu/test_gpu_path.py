"""What a GPU run does, on one GPU (skipped without CUDA): the collectives' device placement
under NCCL, decoding in eval mode, a TRB rollout and trainer steps of the toy in bf16, and the
Triton op kernels at the real vocabulary width, past 2^31 elements (int64 indexing).

Run on a GPU machine: python -m pytest tests/gpu (scripts/gpu_check.sh runs it).
"""

import json
import math
import subprocess
import sys

import ops_reference as ref
import pytest
import torch
from decode_modes import check_modes, modes_seen
from harness import spawn_bare

from trb_nemo.ops import fused, losses, trust_region

pytestmark = [pytest.mark.gpu]

QWEN_VOCAB, PADDED = 151936, 152064
"""Qwen3's vocabulary and its Megatron padding at TP=1 (a multiple of 128)."""


def _logits(rows: int, dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    zs = torch.randn(rows, PADDED, generator=g, device="cuda", dtype=torch.float32).mul_(2)
    zt = zs + torch.randn(rows, PADDED, generator=g, device="cuda", dtype=torch.float32)
    return zs.to(dtype), zt.to(dtype)


def _check_rows(zs, zt, eps, beta, kl, value, rows):
    """Float64 references on the given rows (in chunks: an fp64 [R, V] is 1.2 GB per 1k rows)."""
    for start in range(rows.start, rows.stop, 256):
        c = slice(start, min(start + 256, rows.stop))
        s64, t64 = zs[c].double(), zt[c].double()
        want = ref.bisect_beta(s64, t64, eps[c].double(), QWEN_VOCAB)
        assert (beta[c].double() - want).abs().max() <= 1e-4, c
        realized = ref.kl_to_student(s64, t64, beta[c].double(), QWEN_VOCAB)
        assert torch.all(realized <= eps[c].double() * (1 + 1e-6) + 1e-12), c
        assert torch.allclose(kl[c].double(), realized, rtol=1e-4, atol=1e-8), c
        want_value = ref.reverse_kl_full(s64, t64, QWEN_VOCAB)
        assert torch.allclose(value[c].double(), want_value, rtol=1e-4, atol=1e-5), c


@pytest.mark.parametrize("rows,dtype", [(4096, torch.float32), (4096, torch.bfloat16),
                                        (16384, torch.bfloat16)])
def test_triton_kernels_at_the_real_vocabulary(rows, dtype):
    """4096 x 152064 against float64 on every row; 16384 x 152064 = 2.49e9 elements (> 2^31):
    rows past the int32 range of a flat index are checked too."""
    fused.set_mode("auto")
    assert fused.is_fused(torch.device("cuda"))
    zs, zt = _logits(rows, dtype, seed=rows)
    eps = torch.logspace(-4, 0, rows, device="cuda")
    beta, kl = trust_region.solve_beta_and_kl(zs, zt, eps, vocab_size=QWEN_VOCAB)
    assert fused.is_fused(torch.device("cuda"))  # still compiled: no silent eager fallback
    x = zs.detach().requires_grad_(True)
    value = losses.reverse_kl(x, zt, vocab_size=QWEN_VOCAB)
    value.sum().backward()
    assert fused.is_fused(torch.device("cuda"))
    assert torch.isfinite(x.grad).all() and bool((x.grad[:, QWEN_VOCAB:] == 0).all())
    first_big_row = math.ceil(2**31 / PADDED)
    checked = [slice(0, rows)] if rows * PADDED < 2**31 else [
        slice(0, 256), slice(first_big_row - 128, first_big_row + 128), slice(rows - 256, rows)]
    for c in checked:
        _check_rows(zs, zt, eps, beta, kl, value.detach(), c)
    # gradient rows against float64 autograd, where an int32 offset would land elsewhere
    c = checked[-1]
    y = zs[c].double().requires_grad_(True)
    ref.reverse_kl_full(y, zt[c].double(), QWEN_VOCAB).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(x.grad[c].double(), y.grad, atol=tol, rtol=tol)


def test_decoding_runs_in_eval_mode_under_nccl():
    check_modes(spawn_bare(modes_seen, 1, "gpu_tp1")[0])


def test_toy_trb_run_in_bf16(tmp_path):
    """`trb-nemo train` on the GPU: 3 steps, 2 of TRB warmup, bf16; finite losses and records."""
    cmd = [sys.executable, "-m", "trb_nemo.cli", "train", "parallel=gpu_tp1", "model.precision=bf16",
           "optim.max_steps=3", "trb.warmup_steps=2", "optim.prompts_per_step=8",
           "rollout.num_rollouts_per_prompt=2", "optim.micro_batch_size=8",
           "rollout.max_new_tokens=32", "eval.interval=0", "eval.num_problems=8",
           "eval.num_samples=2", "logging.progress_bar=false", "checkpoint.interval=0",
           f"logging.output_dir={tmp_path}", "logging.run_name=gpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [0, 1, 2]
    for r in train:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"])
        assert r["train/update_ok"]
    warm = train[:2]
    assert warm[0]["rollout/eps"] > 0 and all(0 < r["rollout/beta_mean"] <= 1 for r in warm)
    assert all(r["rollout/kl_max"] <= r["rollout/eps"] * (1 + 1e-3) for r in warm if r["rollout/eps"])
    assert train[2]["rollout/teacher_forwards"] == 0
    evals = [r["eval/pass@1"] for r in rows if "eval/pass@1" in r]
    assert evals and all(0 <= e <= 1 for e in evals)


@pytest.mark.slow
def test_activation_recomputation_leaves_the_run_unchanged(tmp_path):
    """`model.recompute_granularity=full` (and selective): the same losses and gradient norms
    as without, step for step (recomputation repeats the same forward). Three short runs: marked
    slow, outside `make gpu-check`'s time cap (``pytest tests/gpu -m slow`` runs it)."""
    base = [sys.executable, "-m", "trb_nemo.cli", "train", "parallel=gpu_tp1",
            "model.precision=fp32", "optim.max_steps=2", "trb.warmup_steps=1",
            "optim.prompts_per_step=4", "rollout.num_rollouts_per_prompt=2",
            "optim.micro_batch_size=4", "rollout.max_new_tokens=16", "eval.interval=0",
            "eval.num_problems=4", "eval.num_samples=1", "logging.progress_bar=false",
            "checkpoint.interval=0", f"logging.output_dir={tmp_path}"]
    runs = {"none": [], "full": ["model.recompute_granularity=full",
                                 "model.recompute_method=uniform", "model.recompute_num_layers=1"],
            "selective": ["model.recompute_granularity=selective"]}
    losses = {}
    for name, extra in runs.items():
        done = subprocess.run([*base, *extra, f"logging.run_name={name}"], capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [(r["train/loss"], r["train/grad_norm"]) for r in rows if "train/loss" in r]
    for name in ("full", "selective"):
        for (a, ga), (b, gb) in zip(losses[name], losses["none"], strict=True):
            assert math.isclose(a, b, rel_tol=1e-5) and math.isclose(ga, gb, rel_tol=1e-4), name
