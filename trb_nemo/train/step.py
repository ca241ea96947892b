"""One optimizer step of the student on a scored batch: the OPD objective (paper Sec. 1).

    L(theta) = (1 / N) sum over response prefixes h in the global batch of KL(pi_theta(.|h) || pi_T(.|h))

(the Veto baseline replaces the KL by Veto's, :func:`trb_nemo.ops.losses.veto_kl`).
N = number of response prefixes (``loss_mask`` ones) over all data-parallel ranks: a token mean
over the global batch, so long and short responses weigh each prefix equally and the loss does
not depend on the DP/microbatch split (this is what DP=2 == DP=1 tests check). TRB changes only
which prefixes are visited, never this loss.

Batch: a :class:`~trb_nemo.scoring.teacher.LossBatch` (this data-parallel rank's share; the
same on every TP/PP rank of its group):
* ``tokens`` [B, S] int64, right-padded; ``loss_mask`` [B, S]: position t is trained when
  tokens[t + 1] is a response token (the logits at t are the prefix tokens[: t + 1]).
* teacher targets, one of:
  ``teacher_logits`` [B, S, V_pad / TP] (last stage only): the loss ``kind`` decides (``full``
  exact, ``topk`` on the student's current top-k);
  ``target_ids`` + ``teacher_logprobs`` [B, S, K]: the support recorded at rollout time with
  log pi_T there (``topk`` from decoding, or the sampled token for ``sampled``).
"""

from __future__ import annotations

import torch

from trb_nemo.config.schema import LossConfig
from trb_nemo.models.pipeline import MicrobatchPlan, microbatches_of, run_schedule
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.ops.losses import cross_entropy, reverse_kl, reverse_kl_at_ids, veto_kl
from trb_nemo.parallel import comm, groups
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.scoring.teacher import LossBatch
from trb_nemo.train.optimizer import StudentTraining


def prefix_kl(logits_BSV, mb: LossBatch, loss_cfg: LossConfig, vocab: SharedVocab,
              group) -> torch.Tensor:
    """Per-prefix loss [b, S] of one microbatch ``mb`` on the last stage (vocab-parallel over
    ``group``, the tensor-parallel group), on EOS-canonicalized distributions, by ``mb.target``:
    ``teacher``, the reverse KL to the teacher (``teacher_logits`` with ``loss.kind``, else at
    ``target_ids`` with ``teacher_logprobs``); ``veto``, Veto's KL to Q ∝ pi_T pi_S^b with
    ``mb.veto_b`` (needs ``teacher_logits``); ``sft``, the cross-entropy of ``target_ids``. The
    losses read the logits canonically in place (``stop_ids``): besides the gradient, only
    row-chunk temporaries (:mod:`trb_nemo.ops.losses`)."""
    kw = dict(vocab_group=group, vocab_size=vocab.size, stop_ids=vocab.stop_ids)  # no copies
    if mb.target == "sft":  # -log pi_S of the recorded (teacher) token
        return cross_entropy(logits_BSV, mb.target_ids[..., 0], **kw)
    if mb.target == "veto":
        return veto_kl(logits_BSV, mb.teacher_logits, mb.veto_b,
                       direction=loss_cfg.veto_direction, **kw)
    if mb.teacher_logits is not None:
        return reverse_kl(logits_BSV, mb.teacher_logits, kind=loss_cfg.kind,
                          topk=loss_cfg.topk, **kw)
    gradient = "policy" if loss_cfg.kind == "sampled" else "support"
    return reverse_kl_at_ids(logits_BSV, mb.target_ids, mb.teacher_logprobs,
                             gradient=gradient, **kw)


def train_step(training: StudentTraining, batch: LossBatch, step: int, loss_cfg: LossConfig,
               vocab: SharedVocab, micro_batch_size: int | MicrobatchPlan,
               pg: ParallelGroups) -> dict:
    """Forward/backward over the microbatches, clip, AdamW update. Returns metrics that every
    rank agrees on: ``loss`` (token mean over the global batch), ``grad_norm``, ``lr``,
    ``tokens`` (global response prefixes), ``update_ok``, and ``veto_b`` for Veto. The loss is
    the batch's (:func:`prefix_kl`: ``batch.target``, ``batch.veto_b``); a ``teacher_stream``
    gives each microbatch's ``teacher_logits`` on the last stage inside the step.
    ``micro_batch_size``: an int (contiguous microbatches of that many rows at the full S) or a
    :class:`~trb_nemo.models.pipeline.MicrobatchPlan` (rows grouped by length, each microbatch
    cut to its longest row): the loss and gradients are the same up to float summation order.

    Collectives: the schedule's (TP, PP p2p, DP grad reduce), then all-reduce(SUM) [2] over DP
    and a broadcast [2] over PP for the metrics.
    """
    lr = training.set_lr(step)
    model, optimizer = training.model, training.optimizer
    model.zero_grad_buffer()
    optimizer.zero_grad()

    def on_logits(index, part, logits_BSV):
        # this microbatch, typed; a streamed teacher's logits exist only while it is trained
        mb = batch.rows(part).with_streamed_teacher()
        mask = mb.loss_mask.to(torch.float32)
        kl_sum = (prefix_kl(logits_BSV, mb, loss_cfg, vocab, pg.tensor) * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        return kl_sum, num_tokens, {"kl_sum": kl_sum.detach().clone(), "tokens": num_tokens.clone()}

    reports = run_schedule(model, microbatches_of(batch.row_tensors(), micro_batch_size),
                           on_logits, pg, forward_only=False)
    update_ok, grad_norm, _ = optimizer.step()
    # on the batch's device: the reports' tensors live there (CUDA on a GPU)
    totals = torch.zeros(2, dtype=torch.float64, device=batch.tokens.device)
    for r in reports.values():
        totals += torch.stack([r["kl_sum"].double(), r["tokens"].double()])
    if pg.is_last_stage:
        totals = comm.all_reduce(totals, group=pg.data)
    groups.broadcast_from_last_stage(totals, pg)
    out = {"loss": float(totals[0] / totals[1].clamp_min(1)), "tokens": int(totals[1]),
           "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
           "lr": lr, "update_ok": bool(update_ok)}
    if batch.veto_b is not None:
        out["veto_b"] = batch.veto_b
    return out
