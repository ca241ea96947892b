"""GPU only: the decode path at the hardware's pace (skipped without CUDA).

* CUDA graphs change no token: a rollout with ``rollout.cuda_graphs`` on (each step shape
  captured once, replayed after) equals the eager one token for token, student-only and TRB,
  on the toy preset and on a 2-layer Qwen3-1.7B-shaped student and teacher (bf16), and graphs
  were really captured;
* the attention kernel a Qwen3-shaped decode step runs (16 query heads over 8 KV heads, head dim
  128, bf16) is a fused one (flash-attn's KV-cache kernel, or SDPA's flash / memory-efficient
  kernel), never SDPA's math fallback (profiler names);
* a decode step makes one host sync (the profiler's synchronizing CUDA calls, per step).

The FP8 decode-then-train test (tests/gpu/test_first_contact_gpu.py) decodes with graphs on,
the default. Run on a GPU machine: python -m pytest tests/gpu (scripts/gpu_check.sh runs it).
"""

import pytest
import torch
from harness import spawn_bare

from trb_nemo.config.schema import ModelConfig, ModelSpec, ParallelConfig

pytestmark = [pytest.mark.gpu, pytest.mark.dist,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QWEN3_17B_2L = ModelSpec(name="qwen3-1.7b-2l", num_layers=2, hidden_size=2048,
                         ffn_hidden_size=6144, num_attention_heads=16, num_query_groups=8,
                         kv_channels=128, vocab_size=151936, max_sequence_length=4096,
                         qk_layernorm=True, tie_embeddings=True, rotary_base=1_000_000.0,
                         eos_token_id=151645)
"""Qwen3-1.7B's layer shapes and vocabulary, two layers."""
TEACHER_2L = ModelSpec(name="qwen3-teacher-2l", num_layers=2, hidden_size=2560,
                       ffn_hidden_size=9728, num_attention_heads=32, num_query_groups=8,
                       kv_channels=128, vocab_size=151936, max_sequence_length=4096,
                       qk_layernorm=True, rotary_base=1_000_000.0, eos_token_id=151645)


def _models(which):
    from trb_nemo.config.compose import load_config

    parallel = ParallelConfig()
    if which == "toy":
        cfg = load_config(["parallel=gpu_tp1"]).model
    else:
        cfg = ModelConfig(student=QWEN3_17B_2L, teacher=TEACHER_2L, precision="bf16")
    return cfg, parallel


def _graphs_vs_eager(which: str) -> dict:
    from trb_nemo.methods.policies import StudentPolicy, TrustRegionPolicy
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.engine import generate
    from trb_nemo.rollout.types import DecodeSettings

    cfg, parallel = _models(which)
    pg = groups.initialize(parallel, seed=0)
    student, teacher = build_student(cfg, parallel, pg), build_teacher(cfg, parallel, pg)
    vocab = SharedVocab.of(cfg)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, min(vocab.size, 1000), (int(n),), generator=gen).tolist()
               for n in torch.randint(4, 40, (24,), generator=gen)]
    out = {}
    for name, policy in (("student", StudentPolicy()), ("trb", TrustRegionPolicy("trb", 0.05))):
        for graphs in (True, False):
            r = generate(student, teacher, prompts, policy,
                         DecodeSettings(max_new_tokens=32, topk_k=4, max_in_flight=16,
                                        cuda_graphs=graphs),
                         vocab=vocab, generator=torch.Generator().manual_seed(1), pg=pg)
            out[(name, graphs)] = {"tokens": r.tokens.cpu(), "graphs": r.forwards["cuda_graphs"],
                                   "beta": r.records["beta"].cpu()}
    groups.destroy()
    return out


@pytest.mark.parametrize("which", ["toy", "qwen3-1.7b-2l"])
def test_cuda_graphs_decode_the_tokens_of_eager_decoding(which):
    [out] = spawn_bare(_graphs_vs_eager, 1, which, timeout_s=600)
    for name in ("student", "trb"):
        graphs, eager = out[(name, True)], out[(name, False)]
        assert graphs["graphs"] > 0 and eager["graphs"] == 0
        assert torch.equal(graphs["tokens"], eager["tokens"]), name
        assert torch.allclose(graphs["beta"], eager["beta"], equal_nan=True, atol=1e-5), name


def _attention_kernels_and_syncs() -> dict:
    from trb_nemo.models.networks import build_network
    from trb_nemo.parallel import groups
    from trb_nemo.rollout.kv_cache import SequenceCache

    parallel = ParallelConfig()
    pg = groups.initialize(parallel, seed=0)
    cfg = ModelConfig(student=QWEN3_17B_2L, teacher=None, precision="bf16")
    model = build_network(QWEN3_17B_2L, cfg, parallel, pg).eval()
    cache = SequenceCache(model, 32, 1024, pg, cuda_graphs=False)
    tokens = torch.randint(2, 1000, (32, 512), generator=torch.Generator().manual_seed(0)).cuda()
    lengths = [256 + 8 * b for b in range(32)]  # rows of different lengths: the masked case
    with torch.no_grad():
        for b, n in enumerate(lengths):
            cache.feed(b, tokens[b:b + 1, :n], [n])
        cache.step(32, tokens[:, -1:])  # warm-up
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for t in range(4):
                cache.step(32, tokens[:, t:t + 1])
            torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    syncs = sum(e.count for e in prof.key_averages()
                if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                             "cudaEventSynchronize", "cudaMemcpy"))
    groups.destroy()
    return {"names": names, "syncs": syncs, "flash": cache.flash}


def test_qwen3_decode_attention_runs_a_fused_kernel_without_host_syncs():
    [out] = spawn_bare(_attention_kernels_and_syncs, 1, timeout_s=600)
    names = out["names"]
    attention = [n for n in names if "attention" in n.lower() or "flash" in n.lower()
                 or "fmha" in n.lower()]
    print("attention kernels:", attention)
    assert not any("math" in n for n in attention), attention
    fused = ("flash", "efficient", "fmha", "cutlass")
    assert any(any(f in n.lower() for f in fused) for n in attention), attention
    assert out["syncs"] <= 1, out["syncs"]  # four steps; the synchronize we asked for
