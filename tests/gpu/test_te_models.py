"""GPU only: the Transformer Engine layer spec loads converted HF weights (same logits as the
local spec) and an FP8 training step runs. Skipped without CUDA (and without TE).

Run on a GPU machine: .venv/bin/python -m pytest tests/gpu/test_te_models.py
"""

import importlib.util

import pytest
import torch
from harness import spawn_bare

from trb_nemo.config.schema import LossConfig, ModelConfig, ModelSpec, OptimConfig, ParallelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.dist,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                                 reason="needs Transformer Engine")]

SPEC = ModelSpec(name="s", num_layers=2, hidden_size=128, ffn_hidden_size=256,
                 num_attention_heads=4, num_query_groups=2, vocab_size=256,
                 max_sequence_length=64, qk_layernorm=True)


def _logits(impl: str, fp8):
    from trb_nemo.models.networks import build_network
    from trb_nemo.models.pipeline import run_schedule
    from trb_nemo.parallel import groups

    parallel = ParallelConfig(tensor_model_parallel_size=1)
    pg = groups.initialize(parallel, seed=0)
    cfg = ModelConfig(student=SPEC, teacher=None, transformer_impl=impl, fp8=fp8, precision="bf16")
    model = build_network(SPEC, cfg, parallel, pg).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        out = run_schedule(model, [{"tokens": tokens}], lambda i, mb, z: z.float().cpu(), pg,
                           forward_only=True)[0]
    groups.destroy()
    return out


def _decoded(impl: str):
    """Cached decode logits [B, steps, V]: a 12-token prefill, then 8 one-token steps (eval mode)."""
    from trb_nemo.models.networks import build_network
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.kv_cache import SequenceCache

    parallel = ParallelConfig(tensor_model_parallel_size=1)
    pg = groups.initialize(parallel, seed=0)
    cfg = ModelConfig(student=SPEC, teacher=None, transformer_impl=impl, precision="bf16")
    model = build_network(SPEC, cfg, parallel, pg).eval()
    tokens = torch.randint(0, 256, (4, 20), generator=torch.Generator().manual_seed(1)).cuda()
    cache = SequenceCache(model, 4, 32, pg)
    outs = [cache.feed(0, tokens[:, :12], [12] * 4)]
    outs += [cache.feed(0, tokens[:, t:t + 1], [1] * 4) for t in range(12, 20)]
    groups.destroy()
    return torch.stack(outs, 1).float().cpu()


def test_te_spec_decodes_like_local_spec():
    [local] = spawn_bare(_decoded, 1, "local")
    [te] = spawn_bare(_decoded, 1, "transformer_engine")
    assert (local - te).abs().max() <= 5e-2  # a kept causal mask or mapping error is O(1)


def test_te_spec_matches_local_spec():
    [local] = spawn_bare(_logits, 1, "local", None)
    [te] = spawn_bare(_logits, 1, "transformer_engine", None)
    assert (local - te).abs().max() <= 5e-2  # bf16 kernels differ; a mapping error is O(1)


def _fp8_step():
    from trb_nemo.models.networks import build_student
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.scoring.teacher import LossBatch
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parallel = ParallelConfig(tensor_model_parallel_size=1)
    pg = groups.initialize(parallel, seed=0)
    cfg = ModelConfig(student=SPEC, teacher=None, transformer_impl="transformer_engine",
                      fp8="hybrid", precision="bf16")
    training = wrap_student(build_student(cfg, parallel, pg), OptimConfig(lr=1e-4), parallel)
    # 30 positions: not a multiple of 16, so the FP8 token padding is exercised; the student
    # and teacher stop on different ids (1 and 2), as a Base student and an Instruct teacher do
    tokens = torch.randint(0, 256, (16, 30), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"tokens": tokens, "loss_mask": torch.ones_like(tokens, dtype=torch.bool),
             "target_ids": tokens.unsqueeze(-1),
             "teacher_logprobs": torch.full(tokens.shape + (1,), -1.0, device="cuda")}
    metrics = train_step(training, LossBatch(**batch), 0, LossConfig(kind="sampled"),
                         SharedVocab(256, 1, 2), micro_batch_size=16, pg=pg)
    groups.destroy()
    return metrics


def test_fp8_step_is_finite():
    [m] = spawn_bare(_fp8_step, 1)
    assert m["update_ok"] and torch.isfinite(torch.tensor(m["loss"]))
