"""Save at step N, kill, resume: steps N+1.. equal an uninterrupted run bit for bit (CPU, DP=2
with the distributed optimizer); a half-written checkpoint is never loaded; the weights reload
at another TP layout.

Run: .venv/bin/python -m pytest tests/dist/test_checkpoint_resume.py
"""

import os
import signal

import pytest
import torch
from harness import spawn_bare

from trb_nemo.config.schema import LossConfig, ModelConfig, ModelSpec, OptimConfig, ParallelConfig
from trb_nemo.parallel.spawn import RankFailure

pytestmark = pytest.mark.dist

STUDENT = ModelSpec(name="s", num_layers=2, hidden_size=32, ffn_hidden_size=64,
                    num_attention_heads=4, vocab_size=96, max_sequence_length=16)
TEACHER = ModelSpec(name="t", num_layers=2, hidden_size=48, ffn_hidden_size=96,
                    num_attention_heads=4, vocab_size=96, max_sequence_length=16)
OPTIM = OptimConfig(lr=3e-3, lr_warmup_steps=2, clip_grad=1.0, max_steps=6)
BATCH, SEQ, MICRO, SAVE_AT, TOTAL = 4, 10, 1, 3, 6


def run(root: str, tp: int, dp: int, stop_after: int | None, resume: bool, kill_after: int | None):
    """Train steps [start, stop_after) saving at SAVE_AT and TOTAL; SIGKILL after a step if asked."""
    import torch.distributed as dist

    from trb_nemo.models.folders import latest_checkpoint
    from trb_nemo.models.hf_weights import hf_tensors
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups
    from trb_nemo.scoring.teacher import LossBatch, score_with_teacher
    from trb_nemo.train.checkpoint import load_training, save_training
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parallel = ParallelConfig(tensor_model_parallel_size=tp, use_distributed_optimizer=True)
    pg = groups.initialize(parallel, seed=11)
    model_cfg = ModelConfig(student=STUDENT, teacher=TEACHER, precision="fp32")
    vocab = SharedVocab.of(model_cfg)
    training = wrap_student(build_student(model_cfg, parallel, pg), OPTIM, parallel)
    teacher = build_teacher(model_cfg, parallel, pg)
    start, resumed = 0, None
    if resume:
        resumed = load_training(latest_checkpoint(root), training, pg)
        start = resumed.step
    losses = {}
    for step in range(start, stop_after or TOTAL):
        # the batch draws from the global RNG, so a resume must restore it to match
        tokens = torch.randint(3, STUDENT.vocab_size, (BATCH, SEQ))
        mask = torch.rand(BATCH, SEQ) < 0.7
        share = BATCH // pg.dp_size
        sl = slice(pg.dp_rank * share, (pg.dp_rank + 1) * share)
        batch = {"tokens": tokens[sl], "loss_mask": mask[sl]}
        batch["teacher_logits"] = score_with_teacher(teacher, batch["tokens"], MICRO, vocab=vocab,
                                                 pg=pg)
        losses[step] = train_step(training, LossBatch(**batch), step, LossConfig(kind="full"),
                                  vocab, MICRO, pg)["loss"]
        if step + 1 in (SAVE_AT, TOTAL):
            save_training(root, step + 1, training, STUDENT, {"data_position": step + 1},
                          keep_last=3, pg=pg)
        if kill_after is not None and step + 1 == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    weights = hf_tensors(training.model.module, STUDENT, pg.tensor)
    dist.barrier()
    groups.destroy()
    return {"losses": losses, "weights": weights, "resumed": resumed and vars(resumed)}


def test_kill_and_resume_is_bit_exact(tmp_path):
    straight = spawn_bare(run, 2, str(tmp_path / "a"), 1, 2, None, False, None)[0]
    with pytest.raises(RankFailure):
        spawn_bare(run, 2, str(tmp_path / "b"), 1, 2, None, False, SAVE_AT + 1)
    root = tmp_path / "b"
    assert sorted(p.name for p in root.iterdir()) == [f"step_{SAVE_AT:07d}"]
    # the folder can move: it does not record where it was written
    assert str(tmp_path).encode() not in (root / f"step_{SAVE_AT:07d}" / ".metadata").read_bytes()
    # what a crash in the middle of a later save leaves behind: never loaded
    (root / f"step_{SAVE_AT + 2:07d}.tmp").mkdir()
    (root / f"step_{SAVE_AT + 2:07d}.tmp" / "garbage.distcp").write_bytes(b"\0" * 64)
    resumed = spawn_bare(run, 2, str(root), 1, 2, None, True, None)[0]
    assert resumed["resumed"] == {"step": SAVE_AT, "progress": {"data_position": SAVE_AT},
                                  "rng_restored": True, "optimizer_restored": True}
    assert sorted(resumed["losses"]) == list(range(SAVE_AT, TOTAL))
    for step, loss in resumed["losses"].items():
        assert loss == straight["losses"][step], (step, loss, straight["losses"][step])
    for name, w in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], w), name
    assert len(set(straight["losses"].values())) == TOTAL  # the steps did change the model


def test_weights_reload_at_another_layout(tmp_path):
    """A DP=2 checkpoint loads at TP=2: weights resharded exactly; the optimizer's DP-sharded
    state cannot follow a TP change, so Adam restarts (and says so)."""
    dp2 = spawn_bare(run, 2, str(tmp_path), 1, 2, SAVE_AT, False, None)[0]
    tp2 = spawn_bare(run, 2, str(tmp_path), 2, 1, SAVE_AT, True, None)[0]
    assert tp2["resumed"]["rng_restored"] is True  # same world size
    assert tp2["resumed"]["optimizer_restored"] is False
    assert tp2["losses"] == {}
    for name, w in dp2["weights"].items():
        assert torch.allclose(tp2["weights"][name], w, atol=0, rtol=0), name
