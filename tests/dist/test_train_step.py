"""One training step at TP=2, PP=2 and DP=2 (distributed optimizer) equals the TP=1/PP=1/DP=1
step: loss, gradient norm and every updated weight. The teacher stays frozen.

Run: .venv/bin/python -m pytest tests/dist/test_train_step.py
"""

import pytest
import torch
from harness import spawn_bare

from trb_nemo.config.schema import LossConfig, ModelConfig, ModelSpec, OptimConfig, ParallelConfig

pytestmark = pytest.mark.dist

# vocab 200 pads to 256 at TP=1 and TP=2: padded columns must stay out of the loss; the stop
# ids (student 1, teacher 150) sit on different TP=2 shards and are merged before the loss
STUDENT = ModelSpec(name="s", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, vocab_size=200,
                    max_sequence_length=32, qk_layernorm=True)
TEACHER = ModelSpec(name="t", num_layers=2, hidden_size=96, ffn_hidden_size=192,
                    num_attention_heads=4, vocab_size=200, max_sequence_length=32, eos_token_id=150)
# Adam's first update is g / (|g| + eps) * lr: for a gradient entry near 0 it turns an fp32
# summation-order difference d into up to lr * d / eps. eps = 1e-6 keeps that below 1e-7 while
# the update of every entry still follows its gradient (a wrong gradient moves weights by ~lr).
OPTIM = OptimConfig(lr=1e-3, lr_warmup_steps=0, clip_grad=0.05, max_steps=10, adam_eps=1e-6)
GLOBAL_BATCH, SEQ, MICRO = 8, 12, 2


def global_batch(seed: int = 0) -> dict:
    """8 sequences with prompts of 3-5 tokens and responses of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, STUDENT.vocab_size, (GLOBAL_BATCH, SEQ), generator=gen)
    prompt = torch.randint(3, 6, (GLOBAL_BATCH,), generator=gen)
    end = torch.randint(7, SEQ + 1, (GLOBAL_BATCH,), generator=gen)
    pos = torch.arange(SEQ)
    # position t is trained when token t+1 is a response token: prompt-1 <= t < end-1
    loss_mask = (pos >= prompt[:, None] - 1) & (pos < end[:, None] - 1)
    return {"tokens": tokens, "loss_mask": loss_mask}


def one_step(tp: int, pp: int, distopt: bool, kind: str, trimmed: bool = False):
    import torch.distributed as dist

    from trb_nemo.models.hf_weights import hf_tensors
    from trb_nemo.models.networks import build_student, build_teacher, is_frozen
    from trb_nemo.models.pipeline import plan_microbatches
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.scoring.teacher import LossBatch, score_with_teacher
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              use_distributed_optimizer=distopt)
    pg = groups.initialize(parallel, seed=5)
    model_cfg = ModelConfig(student=STUDENT, teacher=TEACHER, precision="fp32")
    vocab = SharedVocab.of(model_cfg)
    student = build_student(model_cfg, parallel, pg)
    teacher = build_teacher(model_cfg, parallel, pg)
    training = wrap_student(student, OPTIM, parallel)
    batch = global_batch()
    share = GLOBAL_BATCH // pg.dp_size
    batch = {k: v[pg.dp_rank * share:(pg.dp_rank + 1) * share] for k, v in batch.items()}
    # trimmed: microbatches of similar lengths, each cut to its longest row rounded up to 4
    plan = (plan_microbatches(batch["loss_mask"], MICRO, multiple=4, group_by_length=True)
            if trimmed else MICRO)
    batch["teacher_logits"] = score_with_teacher(teacher, batch["tokens"], plan, vocab=vocab,
                                                 pg=pg)
    metrics = train_step(training, LossBatch(**batch), 0, LossConfig(kind=kind, topk=8), vocab,
                         plan, pg)
    if trimmed:
        metrics["fed"] = plan.fed_positions / plan.full_positions
    optimizer_params = {id(p) for g in training.optimizer.param_groups for p in g["params"]}
    teacher_checks = {
        "frozen": is_frozen(teacher),
        "in_optimizer": any(id(p) in optimizer_params for p in teacher.parameters()),
        "training_mode": teacher.training,
    }
    weights = {}
    if pg.dp_rank == 0:
        weights = hf_tensors(student, STUDENT, pg.tensor)
        if pg.tp_rank != 0:
            weights = {}
    dist.barrier()
    groups.destroy()
    return metrics, weights, teacher_checks


def _merged(results):
    metrics = [r[0] for r in results]
    weights = {}
    for _, w, _ in results:
        weights.update(w)
    return metrics, weights, [r[2] for r in results]


@pytest.fixture(scope="module")
def reference():
    return {kind: _merged(spawn_bare(one_step, 1, 1, 1, False, kind)) for kind in ("full",)}


@pytest.mark.parametrize("tp,pp,distopt,trimmed",
                         [(2, 1, False, False), (1, 2, False, False), (1, 1, True, False),
                          (1, 2, False, True)],
                         ids=["tp2", "pp2", "dp2-distopt", "pp2-trimmed-grouped"])
def test_step_matches_single_rank(reference, tp, pp, distopt, trimmed):
    """Trimmed: microbatches grouped by length and cut to their longest row, of different
    lengths under PP=2 (Megatron's variable_seq_lengths p2p): the same step as the full-length
    reference, while fewer positions run."""
    ref_metrics, ref_weights, _ = reference["full"]
    metrics, weights, teacher_checks = _merged(spawn_bare(one_step, 2, tp, pp, distopt, "full",
                                                          trimmed))
    if trimmed:
        assert all(m["fed"] < 0.85 for m in metrics), metrics
    for m in metrics:  # every rank reports the same global numbers
        assert m["tokens"] == ref_metrics[0]["tokens"]
        assert abs(m["loss"] - ref_metrics[0]["loss"]) <= 1e-5, (m, ref_metrics[0])
        assert abs(m["grad_norm"] - ref_metrics[0]["grad_norm"]) <= 1e-5 * ref_metrics[0]["grad_norm"]
        assert m["update_ok"]
    assert ref_metrics[0]["grad_norm"] > OPTIM.clip_grad  # clipping was exercised
    assert weights.keys() == ref_weights.keys()
    for name, w in ref_weights.items():
        diff = (weights[name] - w).abs().max().item()
        assert diff <= 1e-5, f"{name}: max |w - w_ref| = {diff}"
    for checks in teacher_checks:
        assert checks == {"frozen": True, "in_optimizer": False, "training_mode": False}


def test_reference_step_counts_prefixes_and_moves_every_weight(reference):
    """The reference is a real step: the loss covers every response prefix, and each trained
    matrix moved by about lr (Adam) from the layout-independent initialization."""
    from trb_nemo.models.hf_weights import hf_shapes, random_hf_tensor

    ref_metrics, ref_weights, _ = reference["full"]
    assert ref_metrics[0]["loss"] > 0
    assert ref_metrics[0]["tokens"] == int(global_batch()["loss_mask"].sum())
    shapes = hf_shapes(STUDENT)
    assert ref_weights.keys() == shapes.keys()
    init_seed = ModelConfig().init_seed
    for name, w in ref_weights.items():
        moved = (w - random_hf_tensor(name, shapes[name], init_seed)).abs().max().item()
        assert 0.5 * OPTIM.lr < moved < 1.5 * OPTIM.lr, f"{name} moved {moved}"


def trimmed_versus_full():
    """On one rank: the same step with full-length contiguous microbatches and with microbatches
    grouped by length and trimmed; returns (metrics, fp32 gradients, fed fraction) of both."""
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.pipeline import plan_microbatches
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.scoring.teacher import LossBatch, score_with_teacher
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parallel = ParallelConfig(use_distributed_optimizer=False)
    pg = groups.initialize(parallel, seed=5)
    model_cfg = ModelConfig(student=STUDENT, teacher=TEACHER, precision="fp32")
    vocab = SharedVocab.of(model_cfg)
    teacher = build_teacher(model_cfg, parallel, pg)
    out = {}
    for name in ("full", "trimmed"):
        training = wrap_student(build_student(model_cfg, parallel, pg), OPTIM, parallel)
        batch = global_batch(seed=1)
        plan = (plan_microbatches(batch["loss_mask"], MICRO, multiple=4, group_by_length=True)
                if name == "trimmed" else MICRO)
        batch["teacher_logits"] = score_with_teacher(teacher, batch["tokens"], plan, vocab=vocab,
                                                     pg=pg)
        metrics = train_step(training, LossBatch(**batch), 0, LossConfig(kind="full"), vocab,
                             plan, pg)
        grads = torch.cat([b.grad_data.clone() for b in training.model.buffers])
        fed = plan.fed_positions / plan.full_positions if name == "trimmed" else 1.0
        out[name] = (metrics, grads, fed)
    groups.destroy()
    return out


def test_trimmed_and_grouped_microbatches_leave_the_step_unchanged():
    """Same layout, same weights: the loss and every gradient entry agree to 1e-6 while about
    a fifth fewer positions run (the only difference is the order of float sums)."""
    [out] = spawn_bare(trimmed_versus_full, 1)
    (m_full, g_full, _), (m_trim, g_trim, fed) = out["full"], out["trimmed"]
    assert m_full["tokens"] == m_trim["tokens"] > 0
    assert abs(m_full["loss"] - m_trim["loss"]) <= 1e-6 * abs(m_full["loss"])
    assert (g_full - g_trim).abs().max().item() <= 1e-6 * g_full.abs().max().item()
    assert g_full.abs().max() > 0
    assert fed < 0.85


def streamed_versus_scored(target: str):
    """On one rank, trimmed microbatches: the step with the teacher's logits scored for the
    whole batch first, and with them streamed per microbatch (TeacherStream, PP = 1)."""
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.pipeline import plan_microbatches
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.scoring.teacher import LossBatch, TeacherStream, score_with_teacher
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parallel = ParallelConfig(use_distributed_optimizer=False)
    pg = groups.initialize(parallel, seed=5)
    model_cfg = ModelConfig(student=STUDENT, teacher=TEACHER, precision="fp32")
    vocab = SharedVocab.of(model_cfg)
    teacher = build_teacher(model_cfg, parallel, pg)
    veto_b = 0.3 if target == "veto" else None
    out = {}
    for name in ("scored", "streamed"):
        training = wrap_student(build_student(model_cfg, parallel, pg), OPTIM, parallel)
        batch = global_batch(seed=2)
        plan = plan_microbatches(batch["loss_mask"], MICRO, multiple=4, group_by_length=True)
        stream = None
        if name == "scored":
            batch["teacher_logits"] = score_with_teacher(teacher, batch["tokens"], plan,
                                                         vocab=vocab, pg=pg)
        else:
            stream = TeacherStream(teacher)
        metrics = train_step(training, LossBatch(**batch, target=target, veto_b=veto_b,
                                                 teacher_stream=stream),
                             0, LossConfig(kind="full"), vocab, plan, pg)
        grads = torch.cat([b.grad_data.clone() for b in training.model.buffers])
        out[name] = (metrics, grads, stream.calls if stream else len(plan.rows))
    groups.destroy()
    return out


@pytest.mark.parametrize("target", ["teacher", "veto"], ids=["full-kl", "veto"])
def test_streamed_teacher_equals_the_scored_batch(target):
    """loss.kind=full / Veto at PP = 1: the teacher's logits computed per microbatch inside
    the step give the step of the batch scored first (one teacher call per microbatch)."""
    [out] = spawn_bare(streamed_versus_scored, 1, target)
    (m_s, g_s, n_mb), (m_t, g_t, calls) = out["scored"], out["streamed"]
    assert calls == n_mb
    assert m_s["tokens"] == m_t["tokens"] and m_s["loss"] != 0
    assert abs(m_s["loss"] - m_t["loss"]) <= 1e-6 * abs(m_s["loss"])
    assert (g_s - g_t).abs().max().item() <= 1e-6 * g_s.abs().max().item()
