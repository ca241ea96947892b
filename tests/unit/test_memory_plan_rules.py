"""The memory planner's rules (trb_nemo.plan.memory), pure arithmetic on the paper's recipe.

Its bytes against measured tensors: tests/dist/test_memory_plan.py."""

import pytest

from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ConfigError
from trb_nemo.models.resolve import resolve_models
from trb_nemo.plan.memory import check_fits, plan_memory


def phases(*overrides, world=8):
    cfg = resolve_models(load_config(["recipe=paper_qwen3_1.7b", *overrides]), absent=[])
    return {p.name: p for p in plan_memory(cfg, world)}


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
