"""Phase memory (``optim.offload_during_rollout``, ``model.offload_teacher_during_training``):

* a round trip of the student's optimizer state and gradient buffers, and of the teacher's
  weights, gives back the same bits, and while they are offloaded their storages are released
  (0 bytes) and a use of them is one clear error, with and without the distributed optimizer
  (DP=2 over 2 gloo ranks), bf16 weights (separate fp32 main params) and fp32 (the main params
  are the weights, which stay);
* a second offload of a set reuses its one host buffer (same data pointer, no new allocation)
  and round-trips exactly again;
* two Trainer steps (a TRB warmup step, then an OPD step; pass@1 before and after, a checkpoint
  save at the end) with both options on equal the same steps without them: metrics, weights
  and Adam state exactly; over the run the optimizer state's host buffer is allocated twice
  (before and after its first step creates Adam's moments), the teacher's once.

Both run in one spawn of 2 ranks (the imports and Megatron's first-call costs are paid once).
:func:`test_host_buffer_is_allocated_once_and_reused` checks the buffer on plain tensors, no
spawn.

Run: .venv/bin/python -m pytest tests/dist/test_offload.py
"""

import json

import pytest
import torch
from harness import free_port, spawn_bare

from trb_nemo.config.schema import LossConfig, ModelConfig, ModelSpec, OptimConfig, ParallelConfig

pytestmark = pytest.mark.dist

STUDENT = ModelSpec(name="s", num_layers=2, hidden_size=32, ffn_hidden_size=64,
                    num_attention_heads=4, vocab_size=96, max_sequence_length=16)
TEACHER = ModelSpec(name="t", num_layers=2, hidden_size=48, ffn_hidden_size=96,
                    num_attention_heads=4, vocab_size=96, max_sequence_length=16)
OPTIM = OptimConfig(lr=1e-3, lr_warmup_steps=0, offload_during_rollout=True)
BATCH, SEQ, MICRO = 4, 10, 1


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8).clone()


def _snapshot(named: dict) -> dict:
    return {k: _bits(t) for k, t in named.items()}


def _differing(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def round_trips(pg) -> dict:
    """Per layout: one real train step, then the PhaseMemory calls of a step; checks on this
    rank, returns the bytes parked per layout."""
    from trb_nemo.models.networks import build_student, build_teacher
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.scoring.teacher import LossBatch, score_with_teacher
    from trb_nemo.train.offload import PhaseMemory, module_tensors
    from trb_nemo.train.optimizer import wrap_student
    from trb_nemo.train.step import train_step

    parked = {}
    for distopt, precision in ((True, "bf16"), (False, "bf16"), (True, "fp32")):
        name = f"{'distopt' if distopt else 'ddp'}-{precision}"
        parallel = ParallelConfig(use_distributed_optimizer=distopt)
        model_cfg = ModelConfig(student=STUDENT, teacher=TEACHER, precision=precision)
        vocab = SharedVocab.of(model_cfg)
        training = wrap_student(build_student(model_cfg, parallel, pg), OPTIM, parallel)
        teacher = build_teacher(model_cfg, parallel, pg)
        memory = PhaseMemory(training, teacher, teacher_offload=True)
        gen = torch.Generator().manual_seed(pg.dp_rank)
        batch = {"tokens": torch.randint(3, STUDENT.vocab_size, (BATCH, SEQ), generator=gen),
                 "loss_mask": torch.rand(BATCH, SEQ, generator=gen) < 0.7}
        batch["teacher_logits"] = score_with_teacher(teacher, batch["tokens"], MICRO, vocab=vocab,
                                                     pg=pg)
        train_step(training, LossBatch(**batch), 0, LossConfig(kind="full"), vocab, MICRO, pg)

        ddp, opt = training.model, training.optimizer
        inner = [o.optimizer for o in opt.chained_optimizers]
        main = {f"main{i}.{j}": p for i, o in enumerate(inner)
                for j, p in enumerate(p for g in o.param_groups for p in g["params"])}
        adam = {f"adam{i}.{j}.{key}": v for i, o in enumerate(inner)
                for j, s in enumerate(o.state.values()) for key, v in s.items()}
        grads = {f"grad{i}": b.grad_data for i, b in enumerate(ddp.buffers)}
        weights = dict(ddp.module.named_parameters())
        teacher_w = {f"teacher.{k}": v for k, v in teacher.named_parameters()}
        assert {k.rsplit(".", 1)[1] for k in adam} == {"exp_avg", "exp_avg_sq", "step"}, name
        assert all(g.abs().sum() > 0 for g in grads.values()), name  # a real step's gradients
        before = _snapshot({**main, **adam, **grads, **weights, **teacher_w})
        weight_ptrs = {t.untyped_storage().data_ptr() for t in [*weights.values()]
                       + [b.param_data for b in ddp.buffers if b.param_data is not None]}
        separate_main = {k: p for k, p in main.items()
                         if p.untyped_storage().data_ptr() not in weight_ptrs}
        # bf16 weights: fp32 main copies (the norms' fp32 weights are their own main params)
        assert bool(separate_main) == (precision == "bf16"), name

        memory.before_decoding(needs_teacher=False)  # the rollout: optimizer state out
        assert training.state_memory.offloaded and not memory.teacher_memory.offloaded
        for k, t in {**adam, **grads, **separate_main}.items():
            assert t.untyped_storage().nbytes() == 0, (name, k)
        for k, t in {**weights, **teacher_w}.items():  # the student decodes with its weights
            assert t.untyped_storage().nbytes() > 0, (name, k)
        with pytest.raises(RuntimeError, match="optim.offload_during_rollout"):
            training.set_lr(1)  # train_step's first call
        parked[name] = training.state_memory.parked_bytes

        memory.before_scoring()
        memory.before_training()  # teacher out, optimizer state in
        assert not training.state_memory.offloaded and memory.teacher_memory.offloaded
        assert all(t.untyped_storage().nbytes() == 0 for t in module_tensors(teacher)), name
        with pytest.raises(RuntimeError, match="model.offload_teacher_during_training"):
            score_with_teacher(teacher, batch["tokens"], MICRO, vocab=vocab, pg=pg)
        after = _snapshot({**main, **adam, **grads, **weights})
        assert not _differing(after, before), (name, _differing(after, before))

        memory.before_saving()  # no-op: resident
        memory.restore_all()
        after = _snapshot({**main, **adam, **grads, **weights, **teacher_w})
        assert not _differing(after, before), (name, _differing(after, before))

        # the next step's offloads: the same host buffers, no new allocation, exact again
        sets = (training.state_memory, memory.teacher_memory)
        ptrs = [m.buffer.tensor.data_ptr() for m in sets]
        memory.before_decoding(needs_teacher=False)
        memory.before_scoring()
        memory.before_training()
        assert [m.buffer.tensor.data_ptr() for m in sets] == ptrs, name
        assert [m.allocations for m in sets] == [1, 1], name
        memory.restore_all()
        after = _snapshot({**main, **adam, **grads, **weights, **teacher_w})
        assert not _differing(after, before), (name, _differing(after, before))
    return parked


TWO_STEPS = ["optim.max_steps=2", "trb.warmup_steps=1", "optim.prompts_per_step=2",
             "rollout.num_rollouts_per_prompt=2", "optim.micro_batch_size=2",
             "rollout.max_new_tokens=8", "eval.interval=0", "eval.num_problems=2",
             "eval.num_samples=1", "checkpoint.interval=0", "logging.progress_bar=false",
             "logging.tensorboard=false", "parallel=cpu_tp1", "parallel.num_local_ranks=2"]
TIMING_KEYS = ("seconds", "per_second", "time/")


def two_steps(out: str, on: bool):
    """2 Trainer steps (DP=2, distributed optimizer) with both offloads ``on`` or off: this
    rank's metrics rows (no timings), the bits of its student and teacher weights and Adam state
    at the end, and where the tensors were while the stages ran."""
    from trb_nemo.config.compose import load_config
    from trb_nemo.train.offload import module_tensors
    from trb_nemo.train.trainer import Trainer

    class Watched(Trainer):
        """The real Trainer, noting (stage, gradients on the device, teacher on the device)."""

        seen: list = []

        def where(self, stage):
            grads = self.training.model.buffers[0].grad_data.untyped_storage().nbytes()
            teacher = min(t.untyped_storage().nbytes() for t in module_tensors(self.teacher))
            self.seen.append((stage, grads > 0, teacher > 0))

        def rollout(self, prompts, policy, k):
            self.where(f"rollout{k}-teacher" if policy.needs_teacher() else f"rollout{k}")
            return super().rollout(prompts, policy, k)

        def step(self):
            metrics = super().step()
            self.where("after-step")
            return metrics

        def evaluate(self):
            metrics = super().evaluate()
            self.where("evaluated")
            return metrics

        def save(self):
            super().save()
            self.where("saved")

    flags = [f"optim.offload_during_rollout={on}", f"model.offload_teacher_during_training={on}"]
    cfg = load_config([*TWO_STEPS, *flags, f"logging.output_dir={out}",
                       f"logging.run_name=offload_{on}"])
    trainer = Watched(cfg)
    trainer.fit()  # ends with groups.destroy()
    inner = [o.optimizer for o in trainer.training.optimizer.chained_optimizers]
    tensors = {**dict(trainer.student.named_parameters()),
               **{f"teacher.{k}": v for k, v in trainer.teacher.named_parameters()},
               **{f"adam{i}.{j}.{key}": v for i, o in enumerate(inner)
                  for j, s in enumerate(o.state.values()) for key, v in s.items()}}
    rows = [json.loads(line) for line in trainer.run.metrics.open()]
    rows = [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)} for r in rows]
    allocations = (trainer.training.state_memory.allocations,
                   trainer.memory.teacher_memory.allocations)
    return rows, _snapshot(tensors), trainer.seen, allocations


def rank_body(out: str, second_port: int):
    """Round trips, then the Trainer without and with offload (each fit leaves the process
    group; the second joins a new one on ``second_port``)."""
    import os

    from trb_nemo.parallel import groups

    parked = round_trips(groups.initialize(ParallelConfig(), seed=3))  # DP=2: the Trainer's too
    off = two_steps(out, False)
    os.environ["MASTER_PORT"] = str(second_port)
    on = two_steps(out, True)
    return parked, off, on


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_bare(rank_body, 2, str(tmp_path_factory.mktemp("runs")), free_port())


def test_round_trips_are_exact_and_release_storage(ranks):
    for parked, _, _ in ranks:  # (the checks of each layout ran on the ranks)
        # the distributed optimizer shards Adam and the main params over DP=2: fewer bytes
        assert 0 < parked["distopt-bf16"] < parked["ddp-bf16"]
        assert parked["distopt-fp32"] > 0  # moments and gradients (the weights stay)


def test_two_steps_with_offload_equal_two_without(ranks):
    for _, (rows_off, bits_off, seen_off, allocs_off), (rows_on, bits_on, seen_on,
                                                         allocs_on) in ranks:
        assert rows_on == rows_off
        assert bits_on.keys() == bits_off.keys() and any("adam" in k for k in bits_on)
        assert not _differing(bits_on, bits_off), _differing(bits_on, bits_off)
        train = [r for r in rows_on if "train/loss" in r]
        assert [r["step"] for r in train] == [0, 1]
        assert all(r["train/grad_norm"] > 0 for r in train)
        assert [r["scoring/teacher_passes"] for r in train] == [0, 1]  # TRB warmup, then OPD
        assert sum("eval/pass@1" in r for r in rows_on) == 2
        assert all(grads and teacher for _, grads, teacher in seen_off)  # always on the device
        # (stage, gradients on the device, teacher on the device): decoding runs without the
        # optimizer state, a step ends without the teacher, a save has the optimizer state
        assert seen_on == [("evaluated", False, True), ("rollout0-teacher", False, True),
                           ("after-step", True, False), ("rollout1", False, False),
                           ("after-step", True, False), ("evaluated", False, False),
                           ("saved", True, False)]
        # 4 offloads of the optimizer state: one buffer before the first optimizer step, one
        # after (Adam's moments are new), reused otherwise; 2 of the teacher: one buffer
        assert allocs_on == (2, 1) and allocs_off == (0, 0)


def test_host_buffer_is_allocated_once_and_reused():
    """Plain CPU tensors (a shared storage, a view, a kept tensor, an empty one): every offload
    parks them in one buffer, each storage at an aligned offset; the second offload reuses the
    buffer (same data pointer, no allocation) and both round trips are bit-exact; a set that
    grows gets one larger buffer."""
    from trb_nemo.train.offload import HOST_ALIGNMENT, HostOffload

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=gen)
    b = torch.randint(-5, 5, (3, 7), generator=gen, dtype=torch.int64)
    view = a[10:20]  # the same storage as a
    kept = torch.randn(5, generator=gen)
    tensors = [a, b, view, kept, torch.empty(0)]
    before = _snapshot({"a": a, "b": b, "view": view, "kept": kept})
    mem = HostOffload("test tensors", "test.key")
    ptrs = []
    for _ in range(2):
        mem.offload(tensors, keep=[kept])
        assert mem.offloaded and mem.allocations == 1
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes() == 0
        assert kept.untyped_storage().nbytes() == 20
        assert mem.parked_bytes == 4000 + 8 * 21
        assert mem.buffer.nbytes == 4096 + 512 and not mem.buffer.pinned  # aligned, CPU
        assert all((host.data_ptr() - mem.buffer.tensor.data_ptr()) % HOST_ALIGNMENT == 0
                   for _, host in mem._parked)
        ptrs.append(mem.buffer.tensor.data_ptr())
        mem.offload(tensors)  # idempotent
        mem.restore()
        assert not _differing(_snapshot({"a": a, "b": b, "view": view, "kept": kept}), before)
        assert mem.parked_bytes == 0 and mem.buffer is not None  # kept for the next offload
    assert ptrs[0] == ptrs[1]

    grown = torch.randn(2000, generator=gen)  # a set that outgrew its buffer: one more
    mem.offload([*tensors, grown])
    assert mem.allocations == 2 and mem.buffer.nbytes >= 4000 + 8000
    mem.restore()
    mem.offload(tensors)  # smaller again: the larger buffer serves
    assert mem.allocations == 2
    mem.restore()
    assert not _differing(_snapshot({"a": a, "b": b, "view": view, "kept": kept}), before)
    off = HostOffload("test tensors", "test.key", enabled=False)
    off.offload(tensors)
    assert off.buffer is None and a.untyped_storage().nbytes() == 4000
