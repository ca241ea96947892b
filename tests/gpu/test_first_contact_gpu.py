"""GPU only: the paths a first run on H100s takes that no CPU test can run (skipped without
CUDA; the Transformer Engine ones without TE; the two-GPU one with fewer than two GPUs).

* Qwen3-shaped grouped-query attention (16 query heads over 8 KV heads, head dim 128, QK norm)
  decodes through the per-sequence KV cache like a full forward, with the local and the TE spec;
* FP8 (TE, delayed and tensorwise scaling): decode, then a training step, in one process (a
  decode under inference mode used to leave TE's FP8 caches unusable for backward), then an FP8
  decode once the scales are calibrated;
* the CUDA offload round trip (pinned host buffers, storages resized to 0) with and without the
  distributed optimizer, bit-exact;
* PP = 2 decoding on two GPUs gives the tokens of PP = 1;
* save and resume with Transformer Engine's FusedAdam: the next step equals the uninterrupted one.

Run on a GPU machine: python -m pytest tests/gpu (scripts/gpu_check.sh runs it).
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from harness import spawn_bare

from trb_nemo.config.schema import LossConfig, ModelConfig, ModelSpec, OptimConfig, ParallelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.dist,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="needs Transformer Engine")

QWEN3_GQA = ModelSpec(name="qwen3-gqa", num_layers=2, hidden_size=2048, ffn_hidden_size=6144,
                      num_attention_heads=16, num_query_groups=8, kv_channels=128,
                      vocab_size=4096, max_sequence_length=256, qk_layernorm=True,
                      tie_embeddings=True, rotary_base=1_000_000.0, eos_token_id=1)
"""Qwen3-1.7B's attention and width, two layers, a small vocabulary."""


def _cached_vs_full(impl: str) -> float:
    """max |cached decode logits - full forward logits| over a 40-token prefill and 24 steps."""
    from trb_nemo.models.networks import build_network
    from trb_nemo.models.pipeline import run_schedule
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.kv_cache import SequenceCache

    parallel = ParallelConfig()
    pg = groups.initialize(parallel, seed=0)
    cfg = ModelConfig(student=QWEN3_GQA, teacher=None, transformer_impl=impl, precision="bf16")
    model = build_network(QWEN3_GQA, cfg, parallel, pg).eval()
    tokens = torch.randint(2, 4096, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        cache = SequenceCache(model, 4, 64, pg)
        steps = [cache.feed(0, tokens[:, :40], [40] * 4)]
        steps += [cache.feed(0, tokens[:, t:t + 1], [1] * 4) for t in range(40, 63)]
        cached = torch.stack(steps, 1).float()  # logits at positions 39..62
        full = run_schedule(model, [{"tokens": tokens}], lambda i, mb, z: z.float(), pg,
                            forward_only=True)[0][:, 39:63]
    groups.destroy()
    return float((cached - full).abs().max())


@pytest.mark.parametrize("impl", ["local", pytest.param("transformer_engine", marks=needs_te)])
def test_qwen3_gqa_decoding_matches_the_full_forward(impl):
    [diff] = spawn_bare(_cached_vs_full, 1, impl)
    assert diff <= 0.1, diff  # bf16 kernels differ; a GQA mapping or mask error is O(1)


def _fp8_decode_then_train(recipe: str) -> dict:
    from trb_nemo.methods.policies import StudentPolicy
    from trb_nemo.models.gpt import fp8_scales_ready
    from trb_nemo.models.networks import build_student
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings
    from trb_nemo.scoring.teacher import LossBatch, next_token_ids
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parallel = ParallelConfig()
    pg = groups.initialize(parallel, seed=0)
    spec = QWEN3_GQA
    cfg = ModelConfig(student=spec, teacher=spec, transformer_impl="transformer_engine",
                      fp8="hybrid", fp8_recipe=recipe, precision="bf16")
    training = wrap_student(build_student(cfg, parallel, pg), OptimConfig(lr=1e-5), parallel)
    student = training.model.module
    vocab = SharedVocab(spec.vocab_size, 1, 1)
    prompts = [list(range(2, 2 + n)) for n in (5, 9, 13, 17)] * 4

    def decode(seed):
        return generate(student, None, prompts, StudentPolicy(),
                        DecodeSettings(max_new_tokens=24, topk_k=4), vocab=vocab,
                        generator=torch.Generator().manual_seed(seed), pg=pg)

    out = {"ready_before": fp8_scales_ready(student)}
    rollout = decode(0)  # the first forward ever: TE builds its FP8 caches here
    batch = LossBatch(rollout.tokens, rollout.loss_mask, target="sft",
                      target_ids=next_token_ids(rollout.tokens))
    metrics = train_step(training, batch, 0, LossConfig(), vocab, 16, pg)
    from trb_nemo.models.gpt import mark_fp8_scales_ready

    mark_fp8_scales_ready(student)
    again = decode(1)  # now in FP8 under delayed scaling too
    metrics2 = train_step(training, LossBatch(again.tokens, again.loss_mask, target="sft",
                                              target_ids=next_token_ids(again.tokens)),
                          1, LossConfig(), vocab, 16, pg)
    out.update(loss=[metrics["loss"], metrics2["loss"]],
               ok=[metrics["update_ok"], metrics2["update_ok"]],
               lengths=again.response_lengths.tolist(),
               records_finite=bool(torch.isfinite(again.records["student_logprob"][
                   again.loss_mask]).all()))
    groups.destroy()
    return out


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_decode_then_fp8_training_in_one_process(recipe):
    [out] = spawn_bare(_fp8_decode_then_train, 1, recipe)
    assert out["ready_before"] is False  # delayed: decoded in bf16 until the first step
    assert all(out["ok"]) and all(map(lambda v: torch.isfinite(torch.tensor(v)), out["loss"]))
    assert out["records_finite"] and min(out["lengths"]) >= 1


def _offload_round_trips() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
    from test_offload import round_trips  # the CPU test's checks, on CUDA here

    from trb_nemo.parallel import groups

    pg = groups.initialize(ParallelConfig(), seed=0)
    parked = round_trips(pg)  # asserts bit-exact restores and released storages on this rank
    groups.destroy()
    return parked


def test_cuda_offload_round_trip_with_the_distributed_optimizer():
    [parked] = spawn_bare(_offload_round_trips, 1)
    assert set(parked) == {"distopt-bf16", "ddp-bf16", "distopt-fp32"}
    assert all(v > 0 for v in parked.values()), parked


def _layout(tp, pp):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
    from test_rollout import run_layout  # the CPU test's rollouts, on NCCL here

    return run_layout(tp, pp, False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_pp2_decoding_on_two_gpus_gives_the_tokens_of_pp1():
    [pp1] = spawn_bare(_layout, 1, 1, 1)
    pp2 = spawn_bare(_layout, 2, 1, 2)
    for key in ("trb", "trb_budget2"):
        assert torch.equal(pp1[key]["tokens"].cpu(), pp2[0][key]["tokens"].cpu()), key
        assert torch.equal(pp2[0][key]["tokens"].cpu(), pp2[1][key]["tokens"].cpu()), key


def _save_resume_fused_adam(root: str) -> dict:
    from trb_nemo.models.networks import build_student
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.scoring.teacher import LossBatch
    from trb_nemo.train.checkpoint import load_training, save_training
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parallel = ParallelConfig(use_distributed_optimizer=True)
    pg = groups.initialize(parallel, seed=0)
    cfg = ModelConfig(student=QWEN3_GQA, teacher=None, transformer_impl="transformer_engine",
                      precision="bf16")
    vocab = SharedVocab(QWEN3_GQA.vocab_size, 1, 1)
    tokens = torch.randint(2, 4096, (8, 48), generator=torch.Generator().manual_seed(2)).cuda()
    batch = LossBatch(tokens, torch.ones_like(tokens, dtype=torch.bool), target="sft",
                      target_ids=tokens.roll(-1, 1).unsqueeze(-1))

    def fresh():
        return wrap_student(build_student(cfg, parallel, pg), OptimConfig(lr=1e-4), parallel)

    a = fresh()
    kind = type(a.optimizer.chained_optimizers[0].optimizer).__module__ \
        if hasattr(a.optimizer, "chained_optimizers") else type(a.optimizer).__module__
    train_step(a, batch, 0, LossConfig(), vocab, 8, pg)
    save_training(root, 1, a, QWEN3_GQA, {"step": 1}, keep_last=2, pg=pg)
    straight = train_step(a, batch, 1, LossConfig(), vocab, 8, pg)
    b = fresh()
    resumed = load_training(Path(root) / "step_0000001", b, pg)
    again = train_step(b, batch, 1, LossConfig(), vocab, 8, pg)
    same = all(torch.equal(p, q) for p, q in zip(a.model.module.parameters(),
                                                  b.model.module.parameters(), strict=True))
    groups.destroy()
    return {"optimizer": kind, "restored": resumed.optimizer_restored,
            "loss": (straight["loss"], again["loss"]), "same_weights": same}


@needs_te
def test_save_and_resume_with_fused_adam(tmp_path):
    [out] = spawn_bare(_save_resume_fused_adam, 1, str(tmp_path / "ck"))
    assert out["restored"], out
    assert out["loss"][0] == out["loss"][1] and out["same_weights"], out
