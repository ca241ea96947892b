"""Incremental forward of one network's TP/PP stage with a KV cache (no prefix is recomputed).

Megatron's ``StaticInferenceContext`` holds the keys and values of every position fed so far;
each call feeds the next ``L`` positions of all rows (``L`` = the shortest prompt at prefill,
then 1) and returns the vocab-parallel logits of the last fed position: ``[B, V_pad / TP]``,
never gathered over TP. Under pipeline parallelism a simple pipelined decode: stage s receives
the hidden states ``[L, B, h]`` from stage s-1 (p2p recv), runs its layers and sends them on;
only the last stage returns logits (None elsewhere). Megatron's ``InferenceMode`` is not
entered, so the output layer keeps ``parallel_output``.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from trb_nemo.parallel import comm
from trb_nemo.parallel.groups import ParallelGroups


class CachedForward:
    """Feed positions [offset, offset + L) of a batch to one network; see the module docstring."""

    def __init__(self, model, batch_size: int, max_length: int, pg: ParallelGroups):
        self.model = model
        self.pg = pg
        self.batch_size = batch_size
        self.context = StaticInferenceContext(batch_size, max_length)
        self.offset = 0
        self.forwards = 0
        """Calls made (a prefill counts once; each decode step once)."""
        self.positions = 0
        """Token positions fed (rows x positions per call, summed)."""
        cfg = model.config
        self._hidden = (cfg.hidden_size, cfg.params_dtype)

    @torch.no_grad()
    def __call__(self, tokens_BL: torch.Tensor) -> torch.Tensor | None:
        b, length = tokens_BL.shape
        if self.offset + length > self.context.max_sequence_length:
            raise ValueError(f"KV cache holds {self.context.max_sequence_length} positions; "
                             f"feeding {length} more after {self.offset}")
        positions = torch.arange(self.offset, self.offset + length,
                                 device=tokens_BL.device).expand(b, length)
        if self.offset > 0:
            self.context.enable_decode_mode()
        pg = self.pg
        if not pg.is_first_stage:
            hidden = comm.recv((length, b, self._hidden[0]), self._hidden[1], pg.pp_rank - 1,
                               pg.pipeline, device=tokens_BL.device)
            self.model.set_input_tensor(hidden)
        out = self.model(tokens_BL, positions, attention_mask=None, inference_context=self.context)
        self.context.increment_sequence_len_offset(length)
        self.offset += length
        self.forwards += 1
        self.positions += b * length
        if not pg.is_last_stage:
            comm.send(out, pg.pp_rank + 1, pg.pipeline)
            return None
        return out[:, -1, :]  # [B, V_pad / TP] at the last fed position
