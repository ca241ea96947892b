"""Scoring: a finished rollout becomes the loss batch, with the teacher's targets at every
response prefix (DESIGN.md: rollout -> scoring -> update).

The hand-off from decoding is typed: a rollout carries :class:`TeacherStats` when the teacher
ran in lockstep (the TRB warmup, fixed eps, SKD), or None. The loss then needs a teacher
scoring pass only when decoding did not record what it needs:

* ``loss.kind=full``: the teacher's logits at every position (always one pass);
* ``topk``: log pi_T at the student's top-k ids of each prefix (recorded while decoding);
* ``sampled``: log pi_T of the token drawn at each prefix (recorded while decoding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trb_nemo.config.schema import LossConfig
from trb_nemo.models.pipeline import (
    MicrobatchPlan,
    microbatches_of,
    run_schedule,
    stage_forward_padded,
)
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.ops.vocab_parallel import logprobs_at
from trb_nemo.parallel.groups import ParallelGroups


@dataclass
class LossBatch:
    """This data-parallel rank's loss batch (the layout of :mod:`trb_nemo.train.step`)."""

    tokens: torch.Tensor
    """[B, S] int64."""
    loss_mask: torch.Tensor
    """[B, S] bool: response prefixes."""
    teacher_logits: torch.Tensor | None = None
    """[B, S, V_pad / TP] (``loss.kind=full``; last stage only)."""
    target_ids: torch.Tensor | None = None
    """[B, S, K] int64: the support of the loss at each prefix (``topk``/``sampled``)."""
    teacher_logprobs: torch.Tensor | None = None
    """[B, S, K] fp32: log pi_T at ``target_ids``, 0 outside response prefixes (last stage)."""
    teacher_passes: int = 0
    """Teacher scoring passes it took (0 when decoding recorded the targets)."""
    teacher_stream: object = None
    """Instead of ``teacher_logits``, under PP = 1: a function of a microbatch's tokens
    [b, S_m] to the teacher's logits [b, S_m, V_pad / TP] (:class:`TeacherStream`), which the
    training step calls per microbatch, so only one microbatch of teacher logits exists."""

    def as_dict(self) -> dict:
        """The batch dict :func:`trb_nemo.train.step.train_step` takes."""
        out = {"tokens": self.tokens, "loss_mask": self.loss_mask}
        if self.teacher_logits is not None:
            out["teacher_logits"] = self.teacher_logits
        if self.target_ids is not None:
            out.update(target_ids=self.target_ids, teacher_logprobs=self.teacher_logprobs)
        return out


class TeacherStream:
    """The teacher's logits of one microbatch at a time, computed when the training step needs
    them (``loss.kind=full`` and Veto, which need every teacher logit): the memory of one
    microbatch's logits [b, S_m, V_pad / TP] instead of the whole batch's. Pipeline
    parallelism 1 only (the whole teacher on this rank; no collective but the teacher's own TP
    ones). Forward only, under no_grad, the teacher in eval mode."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.calls = 0

    @torch.no_grad()
    def __call__(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return stage_forward_padded(self.teacher, tokens_BS)[:, : tokens_BS.shape[1]]


@torch.no_grad()
def score_with_teacher(teacher, tokens: torch.Tensor, micro_batch_size: int | MicrobatchPlan, *,
                       vocab: SharedVocab, pg: ParallelGroups, ids: torch.Tensor | None = None):
    """The teacher's targets for ``tokens`` [B, S], forward-only on the run's TP/PP layout.

    ``ids`` None: teacher logits [B, S, V_pad / TP] (for ``loss.kind=full``); else log pi_T at
    ``ids`` [B, S, K] fp32 of the EOS-canonicalized teacher (compact, for ``target_ids``). Last
    stage only; None on other stages. Memory: one microbatch of teacher activations at a time,
    plus the result. ``micro_batch_size``: an int, or the step's
    :class:`~trb_nemo.models.pipeline.MicrobatchPlan` (the training step's microbatches: each
    cut to its longest row; positions past it are 0 in the result, and the loss never reads
    them).
    """
    mbs = microbatches_of({"tokens": tokens, "ids": ids}, micro_batch_size)

    def on_logits(index, mb, logits_BSV):
        if mb["ids"] is None:
            return logits_BSV.detach()
        # the EOS merge read in place (stop_ids): no canonical copy of the [b, S, V/TP] logits
        return logprobs_at(logits_BSV, mb["ids"], vocab_group=pg.tensor,
                                   vocab_size=vocab.size, stop_ids=vocab.stop_ids)

    out = run_schedule(teacher, mbs, on_logits, pg, forward_only=True)
    if not pg.is_last_stage:
        return None
    parts = [out[i] for i in range(len(mbs))]
    if isinstance(micro_batch_size, MicrobatchPlan):
        return micro_batch_size.assemble(parts)
    return torch.cat(parts)


def loss_batch(rollout, loss_cfg: LossConfig, teacher, micro_batch_size: int | MicrobatchPlan, *,
               vocab: SharedVocab, pg: ParallelGroups, target: str = "teacher") -> LossBatch:
    """The loss batch of a finished rollout (:class:`~trb_nemo.rollout.types.Rollout`),
    running the teacher only for what decoding did not record (module docstring). ``target``
    is the method's (:mod:`trb_nemo.methods`): ``veto`` needs the teacher's full logits, as
    ``loss.kind=full`` does: under PP = 1 they are streamed per microbatch
    (``teacher_stream``), else scored for the whole batch first."""
    tokens, mask = rollout.tokens, rollout.loss_mask
    batch = LossBatch(tokens, mask)
    if target == "sft":  # the cross-entropy of the sampled tokens: no teacher statistic
        batch.target_ids = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).unsqueeze(-1)
        return batch
    if loss_cfg.kind == "full" or target == "veto":
        batch.teacher_passes = 1
        if pg.pp_size == 1:  # streamed: one microbatch of teacher logits at a time
            batch.teacher_stream = TeacherStream(teacher)
            return batch
        batch.teacher_logits = score_with_teacher(teacher, tokens, micro_batch_size, vocab=vocab,
                                                  pg=pg)
        return batch
    recorded = rollout.teacher
    if loss_cfg.kind == "topk":
        ids = rollout.topk_ids
        lp = recorded.topk_logprobs if recorded is not None else None
    else:  # sampled: the token drawn at each prefix is the next one
        ids = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).unsqueeze(-1)
        lp = recorded.chosen_logprob.unsqueeze(-1) if recorded is not None else None
    if lp is None:
        lp = score_with_teacher(teacher, tokens, micro_batch_size, vocab=vocab, pg=pg, ids=ids)
        batch.teacher_passes = 1
    if lp is not None:  # last stage: NaN outside response prefixes would poison the sums
        lp = torch.where(mask.unsqueeze(-1), lp, torch.zeros_like(lp))
    batch.target_ids, batch.teacher_logprobs = ids, lp
    return batch
