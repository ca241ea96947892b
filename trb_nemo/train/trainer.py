"""The training loop: TRB warmup, then pure on-policy distillation (the method box below).

``Trainer.step`` is the method box, one call per stage:

    prompts  -> rollout from the behavior policy mu_k (TRB: eps_k-trust-region blend;
                continuous batching, trb_nemo.rollout)
             -> loss batch (trb_nemo.scoring: the teacher statistics decoding recorded, or
                one teacher scoring pass)
             -> reverse-KL loss and optimizer step on the student

``Trainer.fit`` adds evaluation (pass@1 at step 0, every ``eval.interval`` steps and at the
end), checkpoints (every ``checkpoint.interval`` steps, at the end, and when SIGTERM, SIGUSR1
or a first SIGINT arrives, after which it exits cleanly), logging and the final report. A signal
inside a rollout or an evaluation stops it within seconds (the decoder asks as it goes): the
checkpoint is the state before that phase, which the resumed run redoes. Decoding phases end
with every rank waiting for the others (:meth:`Trainer.uneven`), so a data-parallel rank that
decoded short sequences never waits in an NCCL collective. Rerunning the same command resumes
from the newest complete checkpoint.
"""

from __future__ import annotations

import signal
import time

import torch

from trb_nemo import seeds
from trb_nemo.config.compose import composed_yaml
from trb_nemo.config.schema import TrainConfig
from trb_nemo.data.prompts import build_source, step_prompts
from trb_nemo.eval.pass_at_1 import evaluate
from trb_nemo.methods.schedules import veto_b_at
from trb_nemo.methods.table import method_of, policy_for
from trb_nemo.models.gpt import mark_fp8_scales_ready
from trb_nemo.models.networks import build_student, build_teacher
from trb_nemo.models.pipeline import plan_microbatches
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.parallel import comm, groups
from trb_nemo.rollout.engine import generate
from trb_nemo.rollout.stats import summarize
from trb_nemo.rollout.types import DecodeSettings, Rollout, StopRequested
from trb_nemo.scoring.teacher import loss_batch
from trb_nemo.train import stop_signal
from trb_nemo.train.checkpoint import (
    agreed_resume_folder,
    latest_complete_step,
    load_training,
    save_training,
)
from trb_nemo.train.metrics_log import MetricsLog
from trb_nemo.train.offload import PhaseMemory
from trb_nemo.train.optimizer import wrap_student
from trb_nemo.train.report import write_report
from trb_nemo.train.run_dir import RunFolder
from trb_nemo.train.step import train_step


class Trainer:
    def __init__(self, cfg: TrainConfig):
        stop_signal.install()  # first: a signal during start-up stops after the first step
        self.cfg = cfg
        self.run = RunFolder.of(cfg)
        self.pg = pg = groups.initialize(cfg.parallel, cfg.seed)
        self.vocab = SharedVocab.of(cfg.model)
        self.source = build_source(cfg)
        self.training = wrap_student(build_student(cfg.model, cfg.parallel, pg), cfg.optim,
                                     cfg.parallel)
        self.student = self.training.model.module
        self.teacher = build_teacher(cfg.model, cfg.parallel, pg)
        # optim.offload_during_rollout / model.offload_teacher_during_training: which tensors
        # wait in host memory in which stage of the step
        self.memory = PhaseMemory(self.training, self.teacher,
                                  cfg.model.offload_teacher_during_training)
        self.checkpoint_dir = self.run.checkpoints
        self.step_k, self.resumed_from, self.eval_pending = 0, None, False
        # the pre-flight's choice (the newest intact checkpoint), the same on every rank; rank 0
        # first removes unfinished saves and moves damaged newer checkpoints aside
        latest = agreed_resume_folder(self.checkpoint_dir, cfg.checkpoint.resume)
        if latest is not None:
            resumed = load_training(latest, self.training, pg)
            self.step_k, self.resumed_from = resumed.step, (latest, resumed)
            mark_fp8_scales_ready(self.student)  # TE's extra state held them
            # a stop inside the evaluation of that step: it runs again first
            self.eval_pending = bool(resumed.progress.get("eval_pending", False))
        if comm.world_rank() == 0:  # the run has started: config.yaml (and allowed changes)
            self.run.started(composed_yaml(cfg), self.resumed_from[0] if self.resumed_from
                             else None)
        self.log = MetricsLog(self.run, cfg.logging, cfg.optim.max_steps, self.step_k)
        if self.resumed_from:
            folder, r = self.resumed_from
            self.log.print(f"trb-nemo: resumed from {folder} at step {r.step}"
                           + ("" if r.optimizer_restored else " (new TP/PP layout: Adam restarts)"))

    # ------------------------------------------------------------------ the method box, per step

    def step(self) -> dict:
        k = self.step_k
        prompts = self.prompts(k)
        policy = policy_for(k, self.cfg.rollout, self.cfg.trb)
        self.memory.before_decoding(policy.needs_teacher())
        rollout = self.uneven(lambda: self.rollout(prompts, policy, k))
        target = method_of(self.cfg.rollout.behavior).target
        o = self.cfg.optim
        plan = plan_microbatches(rollout.loss_mask, o.micro_batch_size,
                                 multiple=o.pad_to_multiple, group_by_length=o.group_by_length)
        self.memory.before_scoring()
        veto_b = (veto_b_at(k, b_start=self.cfg.loss.veto_b_start,
                            total_steps=self.cfg.optim.max_steps) if target == "veto" else None)
        batch = loss_batch(rollout, self.cfg.loss, self.teacher, plan, vocab=self.vocab,
                           pg=self.pg, target=target, veto_b=veto_b)
        # a streamed teacher runs inside the training step: it stays on the device
        self.memory.before_training(keep_teacher=batch.teacher_stream is not None)
        metrics = train_step(self.training, batch, k, self.cfg.loss, self.vocab, plan, self.pg)
        mark_fp8_scales_ready(self.student)  # a grad-enabled FP8 forward updated them
        return self.step_metrics(k, policy, rollout, prompts, metrics, batch.teacher_passes, plan)

    def prompts(self, k: int) -> list:
        """This DP rank's prompts of step k, each repeated rollout.num_rollouts_per_prompt times."""
        if method_of(self.cfg.rollout.behavior).target == "sft":  # OPD step k's prompts
            k = k % self.cfg.sft.prompt_steps
        share = step_prompts(self.source, k, self.cfg.optim.prompts_per_step, self.pg.dp_rank,
                             self.pg.dp_size)
        return [p for p in share for _ in range(self.cfg.rollout.num_rollouts_per_prompt)]

    def rollout(self, prompts, policy, k: int) -> Rollout:
        """Step k's rollouts of this DP rank; sequence ids are global (DP rank x share + i), so
        a sequence's noise depends on (seed, step, its index), not on the DP layout."""
        r = self.cfg.rollout
        seed = seeds.rollout(r.seed, k)
        first = self.pg.dp_rank * len(prompts)
        return generate(self.student, self.teacher, [list(p.ids) for p in prompts], policy,
                        DecodeSettings(max_new_tokens=r.max_new_tokens, topk_k=self.cfg.loss.topk,
                                       max_in_flight=r.max_sequences_in_flight,
                                       prefill_tokens=r.prefill_chunk_tokens,
                                       draft_tokens=r.draft_tokens,
                                       cuda_graphs=r.cuda_graphs),
                        vocab=self.vocab, generator=torch.Generator().manual_seed(seed),
                        pg=self.pg, sequence_ids=range(first, first + len(prompts)),
                        interrupt=stop_signal.INTERRUPT)

    def step_metrics(self, k, policy, rollout, prompts, train, teacher_passes, plan) -> dict:
        correct = [self.source.check(rollout.response(i), p.answer) for i, p in enumerate(prompts)
                   if p.answer is not None]  # prompts without answers are not scored
        eps = getattr(policy, "eps", None)
        m = summarize(rollout, eps)
        if correct:
            m["rollout/reward"] = sum(correct) / len(correct)
        m.update({"rollout/temperature": getattr(policy, "temperature", 1.0),
                  "scoring/teacher_passes": teacher_passes,
                  "train/fed_positions": plan.fed_positions / plan.full_positions,
                  "rollout/teacher_forwards": rollout.forwards["teacher"]})
        m = groups.data_parallel_mean(m, self.pg)
        m.update({f"train/{key}": v for key, v in train.items()})
        return m

    # --------------------------------------------------------------------------------- loop

    def stopped_by(self, signum: int, saved: bool = True) -> None:
        """A signal stopped the run after a save (or before its first step, with nothing to
        save): the stop marker (the Slurm job script requeues itself on seeing it; a Ctrl-C
        means stop) and one line."""
        if comm.world_rank() == 0 and signum != signal.SIGINT:
            self.run.stop_marker.write_text(f"{self.step_k}\n")
        where = (f"saved step {self.step_k} to {self.checkpoint_dir}" if saved
                 else "stopped before the first step, nothing to save")
        self.log.print(f"trb-nemo: signal {signum}: {where}; rerun the same command to resume")

    def uneven(self, phase):
        """Run ``phase``, whose length differs across data-parallel ranks (decoding); then every
        rank waits for the others and they agree (1 all-reduce over the world) whether a stop
        signal came: if so every rank raises :class:`StopRequested` (the step is redone on
        resume), else returns the phase's result."""
        try:
            out = phase()
        except StopRequested:  # this model-parallel group stopped decoding part way
            out = None
        groups.wait_after_uneven_phase()
        signum = stop_signal.stop_requested()
        if signum:
            raise StopRequested(signum)
        return out

    def evaluate(self) -> dict:
        self.memory.before_decoding(needs_teacher=False)
        return evaluate(self.student, self.source.eval_sets, self.cfg, self.vocab, self.step_k,
                        self.pg, interrupt=stop_signal.INTERRUPT)

    def log_evaluation(self) -> None:
        """Evaluate at ``step_k`` and log it; a save while it runs (a stop inside it) records
        that it is pending, so the resumed run evaluates that step first."""
        self.eval_pending = True
        self.log.log(self.step_k, self.evaluate())
        self.eval_pending = False

    def save(self) -> None:
        self.memory.before_saving()  # the optimizer state is saved: on the device
        save_training(self.checkpoint_dir, self.step_k, self.training, self.cfg.model.student,
                      {"step": self.step_k, "eval_pending": self.eval_pending},
                      self.cfg.checkpoint.keep_last, self.pg, config_yaml=composed_yaml(self.cfg))

    def fit(self) -> dict:
        cfg = self.cfg
        stopped = 0
        try:
            if self.step_k == 0 or self.eval_pending:
                self.log_evaluation()
            while self.step_k < cfg.optim.max_steps:
                t0 = time.perf_counter()
                metrics = self.step()
                self.step_k += 1
                metrics["time/step_seconds"] = time.perf_counter() - t0
                self.log.log(self.step_k - 1, metrics, advance=True)
                last = self.step_k == cfg.optim.max_steps
                if last or (cfg.eval.interval and self.step_k % cfg.eval.interval == 0):
                    self.log_evaluation()
                stopped = 0 if last else stop_signal.stop_requested()  # the last step: finish
                if last or stopped or (cfg.checkpoint.interval and self.step_k % cfg.checkpoint.interval == 0):
                    self.save()
                if stopped:
                    self.stopped_by(stopped)
                    break
        except StopRequested as stop:  # inside a rollout or an evaluation: every rank is here
            stopped = stop.signum or stop_signal.stop_requested() or signal.SIGTERM
            saved = torch.tensor([int(latest_complete_step(self.checkpoint_dir) == self.step_k)])
            saved = int(comm.broadcast(saved, src=0).item())  # rank 0's view of the folder
            if self.step_k > 0 and not saved:  # at step 0 nothing is lost: the rerun starts over
                self.save()  # the state before the unfinished phase
            self.stopped_by(stopped, saved=self.step_k > 0)
        self.memory.restore_all()
        self.log.close()
        summary = {"stopped_by_signal": stopped, "step": self.step_k}
        if not stopped and comm.world_rank() == 0:
            summary.update(write_report(self.run, cfg))
        groups.destroy()
        return summary
