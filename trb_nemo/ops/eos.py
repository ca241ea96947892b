"""EOS canonicalization: two stop ids become one event (paper appendix, tokenizer mismatch).

A Base student stops on one id (``<|endoftext|>``) and an Instruct teacher on another
(``<|im_end|>``). Before blending, sampling and the loss, each model's probability of both ids
is merged onto ``keep_id`` and ``drop_id`` is masked: z'_keep = logaddexp(z_keep, z_drop),
z'_drop = -inf. The normalizer is unchanged, so p'(keep) = p(keep) + p(drop) exactly. The two
ids may sit on different ranks of ``vocab_group``.

Two forms of the same merge (:class:`StopMerge` holds its one definition):

* :func:`canonicalize`: a canonical copy of the logits (decoding, sampling);
* :func:`stop_merge`: the merge as index arithmetic on the raw shard, which the losses
  (``stop_ids=``) fold into their row passes: a chunk copy or a fused kernel reads the two
  columns with their merged values, and the merge's backward rewrites two columns of the
  loss's gradient in place. No [R, V] copy of the logits or of their gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from trb_nemo.ops.shards import NEG_INF, shard_start


@dataclass(frozen=True)
class StopMerge:
    """canonicalize() of one shard [..., V] as index arithmetic (module docstring).

    The canonical shard equals the raw one except in two local columns: ``keep`` holds
    ``keep_lead`` and ``drop`` holds -inf. Either column is None on a rank that does not own
    it. Every rank of ``group`` holds a StopMerge of the same pair, so all make the backward's
    collective.
    """

    keep: int | None
    """Local column of the kept stop id (None: another rank owns it)."""
    drop: int | None
    """Local column of the dropped stop id (None: another rank owns it)."""
    keep_lead: torch.Tensor | None
    """[...] z'_keep = logaddexp(z_keep, z_drop) in the logits' dtype (what a canonical copy
    holds), on the keep owner."""
    w_keep: torch.Tensor | None
    """[...] fp32 dz'_keep/dz_keep = sigmoid(z_keep - z_drop) (0 where z'_keep = -inf), on the
    keep owner when a gradient is wanted."""
    group: object

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The canonical copy [..., V] of ``logits`` (the shard this merge was made of)."""
        return self.patch_(logits.clone(), slice(None))

    def patch_(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Write the two columns into ``x`` in place and return it: ``x`` is a copy of rows
        ``rows`` of the [R, V] shard (any dtype; columns a prefix of the shard's, a column
        beyond it is left out). O(rows)."""
        width = x.shape[-1]
        if self.keep is not None and self.keep < width:
            x[..., self.keep] = self.keep_lead if rows == slice(None) else self.keep_lead[rows]
        if self.drop is not None and self.drop < width:
            x[..., self.drop] = NEG_INF
        return x

    def at_ids(self, picked_RK: torch.Tensor, local_ids_RK: torch.Tensor) -> torch.Tensor:
        """Values gathered from the raw [R, V] shard at local ids [R, K] -> the canonical
        shard's values there (same dtype)."""
        if self.keep is not None:
            picked_RK = torch.where(local_ids_RK == self.keep,
                                    self.keep_lead.unsqueeze(-1).to(picked_RK.dtype), picked_RK)
        if self.drop is not None:
            picked_RK = picked_RK.masked_fill(local_ids_RK == self.drop, NEG_INF)
        return picked_RK

    def backward_(self, grad: torch.Tensor) -> torch.Tensor:
        """Turn the gradient w.r.t. the canonical shard into the gradient w.r.t. the raw one, in
        place (two columns), and return it. Other columns pass through; dz_keep = g_keep w_keep
        and dz_drop = g_keep (1 - w_keep) with g_keep = dL/dz'_keep; the drop owner receives
        g_keep (1 - w_keep) by 1 all-reduce(SUM) of [...] (every rank of ``group``)."""
        to_drop = torch.zeros(grad.shape[:-1], dtype=torch.float32, device=grad.device)
        if self.keep is not None:
            g_keep = grad[..., self.keep].float()  # a view for fp32: both products first
            kept = (g_keep * self.w_keep).to(grad.dtype)
            to_drop = g_keep * (1.0 - self.w_keep)
            grad[..., self.keep] = kept
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(to_drop, group=self.group)
        if self.drop is not None:
            grad[..., self.drop] = to_drop.to(grad.dtype)
        return grad


def stop_merge(logits: torch.Tensor, stop_ids: tuple[int, int] | None, vocab_group=None,
               *, weight: bool = True) -> StopMerge | None:
    """The merge of ``stop_ids = (keep_id, drop_id)`` for a shard [..., V] of ``vocab_group``
    (None: the whole vocabulary is local); None when there is nothing to merge (no ids, or
    keep_id == drop_id). ``weight``: keep what the backward needs.

    Collectives: 1 all-reduce(MAX) of [...] (the drop column travels to the keep column's
    owner; -inf from the other ranks). The input is not modified.
    """
    if stop_ids is None or stop_ids[0] == stop_ids[1]:
        return None
    keep_id, drop_id = stop_ids
    v_local = logits.shape[-1]
    start = shard_start(v_local, vocab_group)
    owns_keep = start <= keep_id < start + v_local
    owns_drop = start <= drop_id < start + v_local
    if vocab_group is None and not (owns_keep and owns_drop):
        raise ValueError(f"keep_id={keep_id} and drop_id={drop_id} must be < vocab {v_local}")
    keep = keep_id - start if owns_keep else None
    drop = drop_id - start if owns_drop else None
    logits = logits.detach()
    dropped = (logits[..., drop].to(torch.float32, copy=True) if drop is not None
               else torch.full(logits.shape[:-1], NEG_INF, device=logits.device))
    if vocab_group is not None and dist.get_world_size(vocab_group) > 1:
        dist.all_reduce(dropped, op=dist.ReduceOp.MAX, group=vocab_group)
    keep_lead = w_keep = None
    if keep is not None:
        kept = logits[..., keep].float()
        merged = torch.logaddexp(kept, dropped)
        keep_lead = merged.to(logits.dtype)
        if weight:
            w_keep = torch.where(torch.isfinite(merged), torch.exp(kept - merged),
                                 torch.zeros_like(merged))
    return StopMerge(keep, drop, keep_lead, w_keep, vocab_group)


def kernel_operand(z_RV: torch.Tensor, rows: slice, merge: StopMerge | None, fused: bool):
    """Arguments (z, stops, keep) of a row kernel that reads rows ``rows`` of a [R, V] shard
    canonically through :func:`read_fp32`.

    ``fused`` (a compiled kernel): the raw rows, stops [2] int64 (the local keep and drop
    columns, -1 for none) and keep [rows, 1] fp32 (z'_keep), also without a merge so that one
    compiled graph serves both; the kernel applies the merge in registers. Eager: a copy of the
    rows with the merge written in (no copy without one), and None, None.
    """
    z = z_RV[rows]
    if not fused:
        return (z if merge is None else merge.patch_(z.clone(), rows)), None, None
    keep = None if merge is None else merge.keep
    drop = None if merge is None else merge.drop
    stops = torch.stack([torch.full((), -1 if c is None else c, dtype=torch.long, device=z.device)
                         for c in (keep, drop)])  # device fills from host ints: no sync
    if keep is None:
        value = torch.zeros((z.shape[0], 1), dtype=torch.float32, device=z.device)
    else:
        value = merge.keep_lead[rows].float().unsqueeze(-1)
    return z, stops, value


def read_fp32(z_RV: torch.Tensor, stops_2: torch.Tensor | None,
              keep_R1: torch.Tensor | None) -> torch.Tensor:
    """A row kernel's fp32 read of a shard chunk, the merge applied by index arithmetic on
    the column index (arguments from :func:`kernel_operand`; None: nothing to apply). Plain
    torch: fused, it costs no memory pass."""
    z = z_RV.float()
    if stops_2 is None:
        return z
    col = torch.arange(z.shape[-1], device=z.device)
    return torch.where(col == stops_2[0], keep_R1, torch.where(col == stops_2[1], NEG_INF, z))


class _ShardedMerge(torch.autograd.Function):
    """canonicalize() on any shard layout, with its exact gradient (:meth:`StopMerge.backward_`:
    1 all-reduce(SUM) of [...] in backward)."""

    @staticmethod
    def forward(ctx, logits, stop_ids, group):
        ctx.merge = stop_merge(logits, stop_ids, group)
        return ctx.merge.apply(logits)

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.merge.backward_(grad_out.clone()), None, None


def canonicalize(logits: torch.Tensor, *, keep_id: int, drop_id: int, vocab_group=None) -> torch.Tensor:
    """New logits [..., V] (input dtype) with drop_id's mass moved onto keep_id: a copy (the
    losses read the raw logits with ``stop_ids`` instead, :func:`stop_merge`).

    Collectives: 1 all-reduce(MAX) of [R] (the drop column travels to the keep column's owner;
    differentiable: backward is 1 all-reduce(SUM) of [R]). The input is not modified.
    """
    if keep_id == drop_id:
        return logits
    if not (torch.is_grad_enabled() and logits.requires_grad):  # decoding: no autograd node
        return stop_merge(logits, (keep_id, drop_id), vocab_group, weight=False).apply(logits)
    return _ShardedMerge.apply(logits, (keep_id, drop_id), vocab_group)
