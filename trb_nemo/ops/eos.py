"""EOS canonicalization: two stop ids become one event (paper appendix, tokenizer mismatch).

A Base student stops on one id (``<|endoftext|>``) and an Instruct teacher on another
(``<|im_end|>``). Before blending, sampling and the loss, each model's probability of both ids
is merged onto ``keep_id`` and ``drop_id`` is masked: z'_keep = logaddexp(z_keep, z_drop),
z'_drop = -inf. The normalizer is unchanged, so p'(keep) = p(keep) + p(drop) exactly. The two
ids may sit on different ranks of ``vocab_group``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trb_nemo.ops.vocab_parallel import NEG_INF, shard_start


def _merge(logits, keep_local, drop_local, group, weight: bool = True):
    """The forward of :class:`_ShardedMerge`: (merged logits, w_keep [R]; None off the keep
    owner or without ``weight``, which only the backward needs)."""
    lead = logits.shape[:-1]
    dropped = (logits[..., drop_local].float() if drop_local is not None
               else torch.full(lead, NEG_INF, device=logits.device))
    dropped = dropped.contiguous()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(dropped, op=dist.ReduceOp.MAX, group=group)
    out = logits.clone()
    w_keep = None
    if keep_local is not None:
        kept = logits[..., keep_local].float()
        merged = torch.logaddexp(kept, dropped)
        out[..., keep_local] = merged.to(logits.dtype)
        if weight:
            w_keep = torch.where(torch.isfinite(merged), torch.exp(kept - merged),
                                 torch.zeros_like(merged))
    if drop_local is not None:
        out[..., drop_local] = NEG_INF
    return out, w_keep


class _ShardedMerge(torch.autograd.Function):
    """canonicalize() on any shard layout (``group`` None: the whole vocabulary is local, no
    collective), with its exact gradient.

    Forward: the drop column travels to the keep column's owner by an all-reduce(MAX) of [R]
    (-inf on the other ranks); z'_keep = logaddexp(z_keep, z_drop), z'_drop = -inf.
    Backward (every rank, since every rank's output feeds the loss): columns other than the two
    ids pass through; dz_keep = g_keep w_keep and dz_drop = g_keep (1 - w_keep) with
    w_keep = sigmoid(z_keep - z_drop); the drop owner receives g_keep (1 - w_keep) by an
    all-reduce(SUM) of [R].
    """

    @staticmethod
    def forward(ctx, logits, keep_local, drop_local, group):
        out, w_keep = _merge(logits, keep_local, drop_local, group)
        ctx.keep_local, ctx.drop_local, ctx.group = keep_local, drop_local, group
        ctx.save_for_backward(w_keep if w_keep is not None else torch.zeros(0))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (w_keep,) = ctx.saved_tensors
        grad = grad_out.clone()
        to_drop = torch.zeros(grad_out.shape[:-1], dtype=torch.float32, device=grad_out.device)
        if ctx.keep_local is not None:
            g_keep = grad_out[..., ctx.keep_local].float()
            grad[..., ctx.keep_local] = (g_keep * w_keep).to(grad.dtype)
            to_drop = g_keep * (1.0 - w_keep)
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            dist.all_reduce(to_drop, group=ctx.group)
        if ctx.drop_local is not None:
            grad[..., ctx.drop_local] = to_drop.to(grad.dtype)
        return grad, None, None, None


def canonicalize(logits: torch.Tensor, *, keep_id: int, drop_id: int, vocab_group=None) -> torch.Tensor:
    """New logits [..., V] (input dtype) with drop_id's mass moved onto keep_id.

    Collectives: 1 all-reduce(MAX) of [R] (the drop column travels to the keep column's owner;
    differentiable: backward is 1 all-reduce(SUM) of [R]). The input is not modified.
    """
    if keep_id == drop_id:
        return logits
    v_local = logits.shape[-1]
    start = shard_start(v_local, vocab_group)
    owns_keep = start <= keep_id < start + v_local
    owns_drop = start <= drop_id < start + v_local
    if vocab_group is None and not (owns_keep and owns_drop):
        raise ValueError(f"keep_id={keep_id} and drop_id={drop_id} must be < vocab {v_local}")
    keep_local = keep_id - start if owns_keep else None
    drop_local = drop_id - start if owns_drop else None
    if not (torch.is_grad_enabled() and logits.requires_grad):  # decoding: no autograd node
        return _merge(logits, keep_local, drop_local, vocab_group, weight=False)[0]
    return _ShardedMerge.apply(logits, keep_local, drop_local, vocab_group)
