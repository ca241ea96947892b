"""A tiny Megatron-Core GPTModel on CPU/gloo: TP=2 gives the TP=1 loss and gradients.

Run: .venv/bin/python -m pytest tests/dist/test_megatron_tp.py
"""

import pytest
import torch
import torch.distributed as dist
from harness import spawn_bare

from trb_nemo.config.schema import ModelConfig, ModelSpec, ParallelConfig

pytestmark = pytest.mark.dist

# vocab 256 pads to 256 at TP=1 and TP=2, so both layouts hold the same weights
SPEC = ModelSpec(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, vocab_size=256, max_sequence_length=32, qk_layernorm=True)


def _loss_and_full_grads(tp: int):
    from trb_nemo.models.gpt import build_gpt
    from trb_nemo.parallel import groups

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    pg = groups.initialize(parallel, seed=1234)
    model = build_gpt(SPEC, ModelConfig(precision="fp32"), parallel, pg)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, SPEC.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, SPEC.vocab_size, (2, 16), generator=gen)
    positions = torch.arange(16).expand(2, 16)
    loss_bs = model(tokens, positions, attention_mask=None, labels=labels)  # [b, s] per-token CE
    loss = loss_bs.float().mean()
    loss.backward()

    tp_group = pg.tensor
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if tp > 1 and ("q_layernorm" in name or "k_layernorm" in name):
            # replicated norms see only this rank's heads; Megatron's finalize_model_grads
            # sums these grads over TP (_allreduce_non_tensor_model_parallel_grads)
            dist.all_reduce(g, group=tp_group)
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=tp_group)
            if name.endswith("mlp.linear_fc1.weight"):
                # SwiGLU: each rank holds [gate_i; up_i]; the TP=1 layout is [gate; up]
                parts = [c for i in range(2) for c in (part.chunk(2, dim=0)[i] for part in parts)]
            g = torch.cat(parts, dim=p.partition_dim)
        grads[name] = g.clone()
    groups.destroy()
    return loss.item(), grads


def test_tp2_matches_tp1_loss_and_grads():
    [(loss1, grads1)] = spawn_bare(_loss_and_full_grads, 1, 1)
    (loss2a, grads2), (loss2b, _) = spawn_bare(_loss_and_full_grads, 2, 2)
    assert loss2a == loss2b, "TP ranks disagree on the loss"
    assert abs(loss2a - loss1) <= 1e-6, (loss1, loss2a)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        assert grads1[name].shape == grads2[name].shape, name
        diff = (grads1[name] - grads2[name]).abs().max().item()
        assert diff <= 1e-6, f"{name}: max |grad TP1 - grad TP2| = {diff}"
    assert any(g.abs().sum() > 0 for g in grads1.values())
