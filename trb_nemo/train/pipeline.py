"""Microbatches through Megatron's pipeline schedule (``get_forward_backward_func``).

Every rank of a TP/PP group holds the same microbatches (token ids are small); the last
pipeline stage turns each microbatch's vocab-parallel logits ``[b, S, V_pad / TP]`` into what
``on_logits(index, microbatch, logits)`` returns: ``(loss_sum, num_tokens, report)`` when
training (the schedule backpropagates loss_sum; see ``calculate_per_token_loss``), or any value
(collected, by microbatch index) when ``forward_only``.
"""

from __future__ import annotations

from collections.abc import Callable

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


def schedule_seq_length(model, seq: int) -> int:
    """The sequence length ``model`` (a stage, DDP-wrapped or not) runs S = ``seq`` tokens at:
    S, or under FP8 S right-padded to a multiple of 16 (x TP under sequence parallelism; see
    :func:`trb_nemo.models.gpt.fp8_padded_length`). ``forward_step`` pads to it, so it is also
    the schedule's ``seq_length`` (the shape of the PP p2p buffers)."""
    config = get_model_config(model)
    shards = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return fp8_padded_length(seq, config.fp8, shards)


def run_schedule(model, microbatches: list[dict], on_logits: Callable, pg: ParallelGroups, *,
                 forward_only: bool):
    """Run the schedule; returns {index: on_logits result} on the last stage ({} elsewhere).

    ``model`` is the (DDP-wrapped) stage; all microbatches share the sequence length S.
    """
    seq = microbatches[0]["tokens"].shape[1]
    results = {}
    indexed = iter(list(enumerate(microbatches)))

    def forward_step(data_iterator, module):
        index, mb = next(data_iterator)
        tokens = mb["tokens"]
        # Under FP8 the tokens are right-padded (id 0, positions continuing) to the schedule's
        # length, a multiple of 16 for TE's FP8 GEMMs. Attention is causal: positions >= S never
        # reach the logits at positions < S, so cutting the logits back to S is exact (and the
        # padding gets no gradient).
        length = schedule_seq_length(module, seq)
        if length > seq:
            tokens = torch.nn.functional.pad(tokens, (0, length - seq))
        positions = torch.arange(length, device=tokens.device).expand_as(tokens)
        logits = module(tokens, positions, attention_mask=None)

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

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=indexed,
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=schedule_seq_length(model, seq),
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )
    return results if pg.is_last_stage else {}
