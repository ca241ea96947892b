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


def canonicalize(logits: torch.Tensor, *, keep_id: int, drop_id: int, vocab_group=None) -> torch.Tensor:
    """New logits [..., V] (input dtype) with drop_id's mass moved onto keep_id.

    Collectives: 1 all-reduce(MAX) of [R] (the drop column travels to the keep column's owner);
    none when both ids are local or there is no group. The input is not modified.
    """
    if keep_id == drop_id:
        return logits
    v_local = logits.shape[-1]
    start = shard_start(v_local, vocab_group)
    owns_keep = start <= keep_id < start + v_local
    owns_drop = start <= drop_id < start + v_local
    out = logits.clone()
    if vocab_group is None:
        if not (owns_keep and owns_drop):
            raise ValueError(f"keep_id={keep_id} and drop_id={drop_id} must be < vocab {v_local}")
        dropped = logits[..., drop_id].float()
    else:
        dropped = (logits[..., drop_id - start].float() if owns_drop
                   else torch.full(logits.shape[:-1], NEG_INF, device=logits.device))
        dropped = dropped.contiguous()
        dist.all_reduce(dropped, op=dist.ReduceOp.MAX, group=vocab_group)
    if owns_keep:
        merged = torch.logaddexp(logits[..., keep_id - start].float(), dropped)
        out[..., keep_id - start] = merged.to(logits.dtype)
    if owns_drop:
        out[..., drop_id - start] = NEG_INF
    return out
