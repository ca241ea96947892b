"""Scoring: a finished rollout becomes the loss batch, with the teacher's targets at every
response prefix (the data flow: rollout -> scoring -> update).

The hand-off from decoding is typed: a rollout carries :class:`TeacherStats` when the teacher
ran in lockstep (the TRB warmup, fixed eps, SKD), or None. The loss then needs a teacher
scoring pass only when decoding did not record what it needs:

* ``loss.kind=full``: the teacher's logits at every position (always one pass);
* ``topk``: log pi_T at the student's top-k ids of each prefix (recorded while decoding);
* ``sampled``: log pi_T of the token drawn at each prefix (recorded while decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from trb_nemo.config.schema import LossConfig
from trb_nemo.methods.table import TARGETS, needs_full_teacher_logits
from trb_nemo.models.pipeline import (
    MicrobatchPlan,
    microbatches_of,
    run_schedule,
    stage_forward_padded,
)
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.ops.vocab_parallel import logprobs_at
from trb_nemo.parallel.groups import ParallelGroups

ROW_FIELDS = ("tokens", "loss_mask", "teacher_logits", "target_ids", "teacher_logprobs")
"""The :class:`LossBatch` fields indexed by row (split into microbatches)."""


@dataclass
class LossBatch:
    """This data-parallel rank's loss batch, typed down to the loss
    (:func:`trb_nemo.train.step.train_step`); a microbatch is a LossBatch too
    (:meth:`rows`). Set in one place, :func:`loss_batch`. Exactly one kind of teacher target is
    present: ``teacher_logits`` or ``teacher_stream`` (the full vocabulary: ``loss.kind=full``
    and Veto, :func:`~trb_nemo.methods.table.needs_full_teacher_logits`), ``target_ids`` with
    ``teacher_logprobs`` (``topk``/``sampled``), or ``target_ids`` alone (``sft``)."""

    tokens: torch.Tensor
    """[B, S] int64."""
    loss_mask: torch.Tensor
    """[B, S] bool: response prefixes."""
    target: str = "teacher"
    """The method's target (:data:`trb_nemo.methods.table.TARGETS`): ``teacher`` (the per-prefix
    reverse KL of ``loss.kind``), ``veto`` (Veto's KL to Q ∝ pi_T pi_S^b) or ``sft`` (the
    cross-entropy of ``target_ids``)."""
    veto_b: float | None = None
    """Veto's b_k of this step (target ``veto`` only)."""
    teacher_logits: torch.Tensor | None = None
    """[B, S, V_pad / TP] (``loss.kind=full`` and Veto under PP > 1; last stage only)."""
    target_ids: torch.Tensor | None = None
    """[B, S, K] int64: the support of the loss at each prefix (``topk``/``sampled``/``sft``)."""
    teacher_logprobs: torch.Tensor | None = None
    """[B, S, K] fp32: log pi_T at ``target_ids``, 0 outside response prefixes (last stage)."""
    teacher_passes: int = 0
    """Teacher scoring passes it took (0 when decoding recorded the targets)."""
    teacher_stream: TeacherStream | None = None
    """Instead of ``teacher_logits``, under PP = 1: the teacher's logits of a microbatch's
    tokens, computed when the training step needs them (:meth:`with_streamed_teacher`), so only
    one microbatch of teacher logits exists."""

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {'|'.join(TARGETS)}, got {self.target!r}")
        if (self.target == "veto") != (self.veto_b is not None):
            raise ValueError("Veto's b is set exactly when the target is veto, got target "
                             f"{self.target!r} and veto_b {self.veto_b!r}")

    def row_tensors(self) -> dict[str, torch.Tensor]:
        """The present row-indexed fields (``ROW_FIELDS``), for the microbatch split."""
        return {k: getattr(self, k) for k in ROW_FIELDS if getattr(self, k) is not None}

    def rows(self, part: dict[str, torch.Tensor]) -> LossBatch:
        """This batch with its row fields replaced by one microbatch's ``part`` (from
        :meth:`row_tensors` split by :func:`~trb_nemo.models.pipeline.microbatches_of`)."""
        return replace(self, **part)

    def with_streamed_teacher(self) -> LossBatch:
        """With a ``teacher_stream``: this (micro)batch with its ``teacher_logits`` computed;
        else itself."""
        if self.teacher_stream is None:
            return self
        return replace(self, teacher_logits=self.teacher_stream(self.tokens), teacher_stream=None)


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


def next_token_ids(tokens_BS: torch.Tensor) -> torch.Tensor:
    """[B, S, 1] int64: the token each prefix drew (tokens[t + 1] at t; the last column wraps
    and is never a response prefix)."""
    return torch.cat([tokens_BS[:, 1:], tokens_BS[:, :1]], dim=1).unsqueeze(-1)


def loss_batch(rollout, loss_cfg: LossConfig, teacher, micro_batch_size: int | MicrobatchPlan, *,
               vocab: SharedVocab, pg: ParallelGroups, target: str = "teacher",
               veto_b: float | None = None) -> LossBatch:
    """The loss batch of a finished rollout (:class:`~trb_nemo.rollout.types.Rollout`),
    running the teacher only for what decoding did not record (module docstring). ``target``
    is the method's (:mod:`trb_nemo.methods.table`), ``veto_b`` Veto's b_k this step (target
    ``veto``). A loss that needs the teacher's full logits
    (:func:`~trb_nemo.methods.table.needs_full_teacher_logits`) gets them streamed per
    microbatch under PP = 1 (``teacher_stream``), else scored for the whole batch first."""
    tokens, mask = rollout.tokens, rollout.loss_mask
    batch = LossBatch(tokens, mask, target=target, veto_b=veto_b)
    if target == "sft":  # the cross-entropy of the sampled tokens: no teacher statistic
        batch.target_ids = next_token_ids(tokens)
        return batch
    if needs_full_teacher_logits(loss_cfg.kind, target):
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
        ids = next_token_ids(tokens)
        lp = recorded.chosen_logprob.unsqueeze(-1) if recorded is not None else None
    if lp is None:
        lp = score_with_teacher(teacher, tokens, micro_batch_size, vocab=vocab, pg=pg, ids=ids)
        batch.teacher_passes = 1
    if lp is not None:  # last stage: NaN outside response prefixes would poison the sums
        lp = torch.where(mask.unsqueeze(-1), lp, torch.zeros_like(lp))
    batch.target_ids, batch.teacher_logprobs = ids, lp
    return batch
