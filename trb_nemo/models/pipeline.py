"""Microbatches through Megatron's pipeline schedule (``get_forward_backward_func``).

Every rank of a TP/PP group holds the same microbatches (token ids are small); the last
pipeline stage turns each microbatch's vocab-parallel logits ``[b, S, V_pad / TP]`` into what
``on_logits(index, microbatch, logits)`` returns: ``(loss_sum, num_tokens, report)`` when
training (the schedule backpropagates loss_sum; see ``calculate_per_token_loss``), or any value
(collected, by microbatch index) when ``forward_only``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from trb_nemo.models.gpt import fp8_padded_length
from trb_nemo.parallel.groups import ParallelGroups


def split_microbatches(batch: dict, micro_batch_size: int) -> list[dict]:
    """A dict of [B, ...] tensors (None allowed) as B / micro_batch_size dicts of [b, ...]."""
    size = batch["tokens"].shape[0]
    if size % micro_batch_size:
        raise ValueError(f"batch of {size} sequences is not a multiple of micro_batch_size="
                         f"{micro_batch_size}")
    return [{k: (v[i:i + micro_batch_size] if v is not None else None) for k, v in batch.items()}
            for i in range(0, size, micro_batch_size)]


@dataclass(frozen=True)
class MicrobatchPlan:
    """Which rows form each microbatch, and how many positions each runs.

    ``rows[m]``: the batch rows of microbatch m (``micro_batch_size`` of them); ``lengths[m]``:
    its positions, the longest ``needed`` length among its rows rounded up to ``multiple``
    (capped at the batch's S). Positions past a row's needed length are never read by the loss,
    and attention is causal, so cutting them changes no logit at a needed position: the loss
    and its gradients are those of the full-length batch (up to float summation order). With
    length grouping the rows are sorted by needed length (longest first, stable), so rows of
    similar length share a microbatch and few padded positions run.
    """

    rows: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]
    full_length: int
    """S of the batch the plan cuts."""

    @property
    def fed_positions(self) -> int:
        """Token positions the microbatches run (rows x their microbatch's length)."""
        return sum(len(r) * n for r, n in zip(self.rows, self.lengths, strict=True))

    @property
    def full_positions(self) -> int:
        """Token positions at the full S (no trimming)."""
        return sum(len(r) for r in self.rows) * self.full_length

    @property
    def contiguous(self) -> bool:
        """Every microbatch is consecutive rows in batch order (all of them slice as views)."""
        flat = [r for rows in self.rows for r in rows]
        return flat == list(range(len(flat)))

    def microbatch(self, batch: dict, m: int) -> dict:
        """Microbatch m of ``batch`` (a dict of [B, S, ...] tensors or None, all on one device):
        [b, L_m, ...]. Consecutive rows are sliced (views); others are gathered with one index
        on the batch's device, built on demand: at most one microbatch's copy exists."""
        rows, length = self.rows[m], self.lengths[m]
        if rows == tuple(range(rows[0], rows[0] + len(rows))):
            lo, hi = rows[0], rows[-1] + 1
            return {k: (v[lo:hi, :length] if v is not None else None) for k, v in batch.items()}
        index = torch.tensor(rows, dtype=torch.long, device=batch["tokens"].device)
        return {k: (v[:, :length].index_select(0, index) if v is not None else None)
                for k, v in batch.items()}

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-microbatch results [b, L_m, ...] back as one [B, S, ...] tensor in the batch's
        row order, zero past each microbatch's length (positions the loss never reads)."""
        first = parts[0]
        batch_rows = sum(len(r) for r in self.rows)
        out = first.new_zeros((batch_rows, self.full_length, *first.shape[2:]))
        for rows, part in zip(self.rows, parts, strict=True):
            index = torch.tensor(rows, dtype=torch.long, device=part.device)
            out[:, : part.shape[1]].index_copy_(0, index, part)
        return out


def plan_microbatches(loss_mask: torch.Tensor, micro_batch_size: int, *, multiple: int,
                      group_by_length: bool) -> MicrobatchPlan:
    """The microbatches of a batch with ``loss_mask`` [B, S] (position t is trained/scored).

    Row i needs positions [0, last trained t + 1) (at least 1). ``multiple`` 0 keeps every
    microbatch at the full S (no trimming). Host sync: one [B] transfer per call (once per
    step, not per token)."""
    size, full = loss_mask.shape
    if size % micro_batch_size:
        raise ValueError(f"batch of {size} sequences is not a multiple of micro_batch_size="
                         f"{micro_batch_size}")
    positions = torch.arange(1, full + 1, device=loss_mask.device)
    needed = (loss_mask.to(torch.long) * positions).amax(dim=1).clamp_min(1).tolist()
    order = list(range(size))
    if group_by_length:
        order.sort(key=lambda i: -needed[i])  # stable: equal lengths keep their order
    rows, lengths = [], []
    for first in range(0, size, micro_batch_size):
        group = tuple(order[first:first + micro_batch_size])
        longest = max(needed[i] for i in group)
        length = full if multiple <= 0 else min(full, -(-longest // multiple) * multiple)
        rows.append(group)
        lengths.append(length)
    return MicrobatchPlan(tuple(rows), tuple(lengths), full)


def schedule_seq_length(model, seq: int) -> int:
    """The sequence length ``model`` (a stage, DDP-wrapped or not) runs S = ``seq`` tokens at:
    S, or under FP8 S right-padded to a multiple of 16 (x TP under sequence parallelism; see
    :func:`trb_nemo.models.gpt.fp8_padded_length`). ``forward_step`` pads to it, so it is also
    the schedule's ``seq_length`` (the shape of the PP p2p buffers)."""
    config = get_model_config(model)
    shards = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return fp8_padded_length(seq, config.fp8, shards)


def stage_forward_padded(module, tokens_BS: torch.Tensor) -> torch.Tensor:
    """``module``'s forward (a stage, DDP-wrapped or not) on ``tokens_BS`` [b, S] at positions
    0..S-1: hidden states or, on the last stage, vocab-parallel logits [b, S', V_pad / TP]
    with S' = :func:`schedule_seq_length` >= S. Under FP8 the tokens are right-padded (id 0,
    positions continuing) to that length, a multiple of 16 for TE's FP8 GEMMs. Attention is
    causal: positions >= S never reach the logits at positions < S, so cutting the logits back
    to S is exact (and the padding gets no gradient)."""
    seq = tokens_BS.shape[1]
    length = schedule_seq_length(module, seq)
    if length > seq:
        tokens_BS = torch.nn.functional.pad(tokens_BS, (0, length - seq))
    positions = torch.arange(length, device=tokens_BS.device).expand_as(tokens_BS)
    return module(tokens_BS, positions, attention_mask=None)


class PlannedMicrobatches(Sequence):
    """The microbatches of ``batch`` under ``plan``, each built when the schedule asks for it."""

    def __init__(self, batch: dict, plan: MicrobatchPlan):
        self.batch, self.plan = batch, plan

    def __len__(self) -> int:
        return len(self.plan.rows)

    def __getitem__(self, m: int) -> dict:
        return self.plan.microbatch(self.batch, m)


def microbatches_of(batch: dict, microbatching: int | MicrobatchPlan) -> Sequence[dict]:
    """``batch``'s microbatches: an int cuts contiguous [b, S] slices (views); a plan builds
    each of its microbatches on demand."""
    if isinstance(microbatching, MicrobatchPlan):
        return PlannedMicrobatches(batch, microbatching)
    return split_microbatches(batch, microbatching)


def run_schedule(model, microbatches: Sequence[dict], on_logits: Callable, pg: ParallelGroups, *,
                 forward_only: bool):
    """Run the schedule; returns {index: on_logits result} on the last stage ({} elsewhere).

    ``model`` is the (DDP-wrapped) stage; ``microbatches`` a sequence of dicts of [b, S_m, ...]
    tensors, fetched one at a time (a :class:`PlannedMicrobatches` builds each on demand).
    Microbatches may differ in S_m: under pipeline parallelism the stages then exchange each
    activation's shape before it (Megatron's ``variable_seq_lengths``, one small p2p more per
    transfer); with equal lengths the fixed-shape path runs.
    """
    count = len(microbatches)
    first = microbatches[0]
    lengths = set(_lengths_of(microbatches))
    results = {}
    indices = iter(range(count))

    def forward_step(data_iterator, module):
        index = next(data_iterator)
        mb = first if index == 0 else microbatches[index]
        seq = mb["tokens"].shape[1]
        logits = stage_forward_padded(module, mb["tokens"])

        def loss_func(logits_BSV):
            logits_BSV = logits_BSV[:, :seq]
            out = on_logits(index, mb, logits_BSV)
            if forward_only:
                results[index] = out
                return logits_BSV.new_zeros(()), {}
            loss_sum, num_tokens, report = out
            results[index] = report
            return loss_sum, num_tokens, report

        return logits, loss_func

    config = get_model_config(model)
    variable = len(lengths) > 1 and pg.pp_size > 1
    saved = config.variable_seq_lengths
    config.variable_seq_lengths = saved or variable
    try:
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=indices,
            model=[model],
            num_microbatches=count,
            seq_length=schedule_seq_length(model, max(lengths)),
            micro_batch_size=first["tokens"].shape[0],
            forward_only=forward_only,
        )
    finally:
        config.variable_seq_lengths = saved
    return results if pg.is_last_stage else {}


def _lengths_of(microbatches: Sequence[dict]) -> list[int]:
    """Each microbatch's S_m, without building a planned microbatch."""
    if isinstance(microbatches, PlannedMicrobatches):
        return list(microbatches.plan.lengths)
    return [int(mb["tokens"].shape[1]) for mb in microbatches]
