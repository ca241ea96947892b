"""The memory planner's rules (trb_nemo.plan.memory), pure arithmetic on the paper's recipe.

Its bytes against measured tensors: tests/dist/test_memory_plan.py."""

import sys
import types

import pytest

from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ConfigError
from trb_nemo.models.resolve import resolve_models
from trb_nemo.plan.memory import (
    GIB,
    H100_GIB,
    RESERVE_FLOOR,
    Layout,
    Phase,
    Term,
    check_fits,
    gpu_capacity,
    nccl_communicators,
    plan_memory,
)

S_EVAL = 1024 + 8192
"""The recipe's evaluation positions: prompt + eval.max_new_tokens."""


def config(*overrides):
    return resolve_models(load_config(["recipe=paper_qwen3_1.7b", *overrides]), absent=[])


def phases(*overrides, world=8):
    return {p.name: p for p in plan_memory(config(*overrides), world)}


def test_recomputation_and_microbatch_scale_the_activations():
    base = phases("model.recompute_granularity=null", "model.recompute_method=null",
                  "model.recompute_num_layers=null")["training"].term("activations")
    full = phases()["training"].term("activations")
    assert full < base / 5  # full recomputation keeps each layer's input, one layer's worth more
    double = phases("optim.micro_batch_size=8")["training"].term("activations")
    assert double == pytest.approx(2 * full, rel=0.01)


def test_offload_flags_drop_their_terms_from_their_phase_only():
    base, off = phases(), phases("optim.offload_during_rollout=true",
                                 "model.offload_teacher_during_training=true")
    assert base["rollout"].term("optimizer (main weights, Adam)") > 0
    assert off["rollout"].term("optimizer (main weights, Adam)") == 0
    assert off["rollout"].term("student grads (fp32)") == 0
    assert off["training"].term("teacher weights") == 0
    assert off["scoring"].term("teacher weights") == base["scoring"].term("teacher weights") > 0
    assert off["training"].term("optimizer (main weights, Adam)") == \
        base["training"].term("optimizer (main weights, Adam)")


def test_layout_divides_what_it_shards():
    tp2 = phases()["training"]
    tp4 = phases("parallel=gpu_tp4_pp2", world=8)["training"]  # TP=4 PP=2 DP=1
    # a stage of TP=4 x PP=2 holds about 1/4 of TP=2's weights (embedding or output on it)
    ratio = tp4.term("student weights") / tp2.term("student weights")
    assert 0.2 < ratio < 0.35
    # the distributed optimizer shards over DP: DP=1 holds all of it
    assert tp4.term("optimizer (main weights, Adam)") > tp2.term("optimizer (main weights, Adam)")
    kv2 = phases()["rollout"].term("KV caches")
    kv_half = phases("rollout.max_sequences_in_flight=16")["rollout"].term("KV caches")
    assert kv_half == pytest.approx(kv2 / 2, rel=1e-6)


def test_full_logits_are_streamed_at_pp1_and_held_for_the_batch_under_pp():
    streamed = phases("rollout.behavior=veto")
    assert "scoring" not in streamed  # the teacher runs inside the training step
    training = streamed["training"]
    assert training.term("teacher logits (one microbatch, streamed)") > 0
    assert training.term("teacher weights") > 0
    held = phases("rollout.behavior=veto", "parallel=gpu_tp4_pp2")["training"]
    assert held.term("teacher logits of the batch (loss.kind=full / veto)") > 10 * \
        training.term("teacher logits (one microbatch, streamed)")


def test_over_the_limit_names_the_phase_and_a_fix():
    with pytest.raises(ConfigError, match="the rollout phase needs .* rollout.max_sequences_in"):
        check_fits(list(phases("rollout.max_sequences_in_flight=64").values()), 80)
    with pytest.raises(ConfigError, match="use loss.kind=topk, or pipeline_model_parallel_size"):
        check_fits(list(phases("loss.kind=full", "parallel=gpu_tp4_pp2").values()), 80)
    check_fits(list(phases().values()), 80)
    with pytest.raises(ConfigError, match="parallel.gpu_memory_gb"):
        check_fits(list(phases().values()), 40)


def test_evaluation_records_are_those_of_the_largest_set_on_this_rank(tmp_path, monkeypatch):
    # no eval file here: the recipe's sets at their sizes; olympiad is the largest at DP=4
    # (ceil(675 / 4) = 169 problems x 64 samples; amc 21 x 512, math500 125 x 64, aime 8 x 512):
    # tokens 8 + records 5 x 4 + top-1 ids 8 + loss mask 1 = 37 bytes per position
    records = phases()["evaluation"].term("evaluation records")
    assert records == 169 * 64 * S_EVAL * 37 and 3.3 * GIB < records < 3.6 * GIB
    assert all(phases()[p].term("evaluation records") == 0 for p in ("rollout", "training"))
    # DP=8: amc's 11 x 512 = 5632 sequences beat olympiad's 85 x 64 = 5440
    assert phases(world=16)["evaluation"].term("evaluation records") == 11 * 512 * S_EVAL * 37
    # eval.num_problems bounds every set: 3 problems per rank x 512 samples (amc, aime)
    capped = phases("eval.num_problems=10")["evaluation"]
    assert capped.term("evaluation records") == 3 * 512 * S_EVAL * 37
    # a file that is here is counted by its rows, with its own samples
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text("".join(f'{{"problem": "{i}", "answer": "1"}}\n'
                                                 for i in range(41)))
    mine = phases("eval.source=[mine:mine.jsonl]", "eval.samples_per_set={mine: 16}")
    assert mine["evaluation"].term("evaluation records") == 11 * 16 * S_EVAL * 37
    # ...and the evaluation's KV cache holds only as many sequences as the set has (176 > 64)
    unknown = phases("eval.source=[other:absent.jsonl]")["evaluation"]
    assert unknown.term("evaluation records") == 0  # not here, not a recipe set: not counted


def test_fp8_weight_caches_are_2_bytes_per_fp8_linear_parameter_in_every_phase():
    # the student's linear weights per layer (q, k, v, o, gate, up, down) over TP=2, 28 layers
    per_layer = 2048 * 2048 * 2 + 2048 * 1024 * 2 + 2048 * 6144 * 3
    student = 2 * 28 * per_layer // 2
    base = phases()  # model.fp8=hybrid through Transformer Engine
    assert {p.name: p.term("student FP8 weight caches") for p in base.values()} == {
        name: student for name in base}
    assert all(p.term("teacher FP8 weight caches") == 0 for p in base.values())  # bf16 teacher
    bf16 = phases("model.fp8=null")
    for name, phase in bf16.items():
        assert phase.term("student FP8 weight caches") == 0
        assert base[name].total - phase.total == student
    # the teacher in FP8: its caches stay on the GPU while its weights are offloaded
    teacher = phases("model.fp8_recipe=tensorwise", "model.teacher_precision=fp8",
                     "model.offload_teacher_during_training=true")
    t_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 4096 * 12288 * 3
    assert teacher["training"].term("teacher weights") == 0
    assert all(p.term("teacher FP8 weight caches") == 2 * 36 * t_layer // 2
               for p in teacher.values())
    # the first and last layers kept in bf16 have no FP8 copy
    ends = phases("model.fp8_recipe=tensorwise", "model.fp8_first_last_layers_bf16=true")
    assert ends["training"].term("student FP8 weight caches") == student * 26 // 28


def _fused(a, g, d, queries, scores):
    """The decode path's attention in a bf16 model, in bytes: with grouped-query heads (g < a)
    the folded queries and the boolean mask expanded to a / g query heads per KV group, the
    kernel's additive mask in bf16, the output and its fp32 log-sum-exp;
    tests/dist/test_memory_plan.py measures it."""
    r = a // g
    folded = a * d * queries * 2 + r * scores if r > 1 else 0
    return folded + 2 * r * scores + a * d * queries * 2 + 4 * a * queries


def test_attention_temporaries_of_the_decode_step_and_the_prefill_chunk():
    base = phases()
    # the rollout runs the teacher in lockstep (TRB warmup): 16 query and 4 key-value heads
    # per TP rank; a decode step of 32 rows x 8192 keys holds a few MB (nothing of size keys x
    # heads is copied), so the prefill chunk (8192 positions of 1024-token prompts) is the peak
    rollout = base["rollout"].term("attention temporaries")
    decode = _fused(16, 4, 128, 32, 32 * 8192)
    prefill = _fused(16, 4, 128, 8192, 8192 * 1024)
    assert decode < 4 * 2**20 < prefill
    assert rollout == prefill
    assert rollout < 0.25 * GIB  # the math kernel's fp32 copies held 7 GiB here
    # evaluation: the student (8 and 4 heads), its prefill chunk; its decode step at 64 rows x
    # 9216 keys is smaller, so half the budget leaves the term as it is
    evaluation = base["evaluation"].term("attention temporaries")
    assert evaluation == _fused(8, 4, 128, 8192, 8192 * 1024)
    assert _fused(8, 4, 128, 64, 64 * S_EVAL) < evaluation
    half = phases("eval.max_sequences_in_flight=32")["evaluation"]
    assert half.term("attention temporaries") == evaluation
    # a student-only rollout: the student's prefill
    student = phases("rollout.behavior=student")["rollout"].term("attention temporaries")
    assert student == _fused(8, 4, 128, 8192, 8192 * 1024)
    # a small prefill chunk: the decode step is the peak
    small = phases("rollout.prefill_chunk_tokens=16")["rollout"].term("attention temporaries")
    assert small == max(decode, _fused(16, 4, 128, 16, 16 * 1024))
    assert all(base[p].term("attention temporaries") == 0 for p in ("scoring", "training"))


def test_cuda_graphs_pool_is_counted_while_decoding_only():
    base, off = phases(), phases("rollout.cuda_graphs=false")
    for p in ("rollout", "evaluation"):
        assert base[p].term("CUDA graphs") > 0
        assert off[p].term("CUDA graphs") == 0
        assert base[p].total > off[p].total
    assert all(base[p].term("CUDA graphs") == 0 for p in ("scoring", "training"))


def test_reserve_grows_with_the_nccl_communicators_of_the_layout():
    # TP=2 DP=4: TP, DP, DP with CP, MP, TP x CP, TP x DP (twice), the optimizer instance, world
    assert nccl_communicators(Layout(2, 1, 4, 2, True, True)) == 9
    # TP=4 PP=2: no DP groups; PP, the embedding group and one send/recv neighbour more
    assert nccl_communicators(Layout(4, 2, 1, 2, True, True)) == 10
    assert nccl_communicators(Layout(2, 4, 1, 2, True, True)) == 11  # a middle stage: 2
    assert nccl_communicators(Layout(1, 1, 1, 2, True, True)) == 0
    reserve = "CUDA context, NCCL, allocator slack"
    assert phases()["rollout"].term(reserve) == 2 * GIB + 9 * GIB // 2
    one = phases("parallel.tensor_model_parallel_size=1", world=1)  # one GPU: the floor
    assert all(p.term(reserve) == RESERVE_FLOOR for p in one.values())
    gloo = phases("parallel=cpu_tp2", world=2)
    assert all(p.term(reserve) == 0 for p in gloo.values())


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 8), (4, 2, 8), (2, 4, 8), (1, 1, 8), (8, 1, 8)])
def test_communicator_count_matches_the_groups_megatron_creates(tp, pp, world, monkeypatch):
    """Megatron-Core's own initialize_model_parallel, its new_group calls recorded: on the
    busiest rank (first stage), the NCCL groups of more than one rank that are not expert or
    gloo groups, plus torch's world group and the send/recv neighbours, are what the planner
    counts."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    made = []
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or object())
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: world)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    monkeypatch.setattr(parallel_state, "_global_process_group_list", None)
    parallel_state.destroy_model_parallel()
    mine = [kw for kw in made if 0 in kw["ranks"] and len(kw["ranks"]) > 1
            and kw.get("backend") != "gloo" and "EXPERT" not in (kw.get("group_desc") or "")]
    expected = len(mine) + (world > 1) + min(2, pp - 1)
    assert nccl_communicators(Layout(tp, pp, world // (tp * pp), 2, True, True)) == expected


def test_capacity_is_the_override_else_the_visible_gpu_else_an_h100(monkeypatch):
    assert gpu_capacity(80) == (80.0, "parallel.gpu_memory_gb")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not loaded (the plan command)
    assert gpu_capacity(None)[0] == H100_GIB == 79.2
    props = types.SimpleNamespace(total_memory=int(139.8 * GIB), name="NVIDIA H200")
    cuda = types.SimpleNamespace(is_available=lambda: True, current_device=lambda: 0,
                                 get_device_properties=lambda i: props)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    limit, source = gpu_capacity(None)
    assert limit == pytest.approx(139.8) and "NVIDIA H200" in source
    assert config().parallel.gpu_memory_gb is None
    # the default limit without a GPU: 79.2 GiB, so 79.5 GiB no longer fits (it did under 80)
    monkeypatch.setitem(sys.modules, "torch", None)
    check_fits(plan_memory(config(), 8), None)  # the recipe does
    tight = [Phase("training", (Term("activations", int(79.5 * GIB)),))]
    check_fits(tight, 80)
    with pytest.raises(ConfigError, match="over 79.2 GiB"):
        check_fits(tight, None)
