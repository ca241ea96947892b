"""One network's per-sequence KV cache on this rank's TP/PP stage, and forwards through it.

The cache holds ``slots`` sequences of up to ``max_len`` positions: per layer of this stage,
keys and values ``[slots, max_len + 1, kv_heads / TP, head_dim]`` in the model's dtype (the
last position is scratch: padding tokens write there, so no write needs a boolean mask and
its device sync), so its
memory is fixed by the budget (``rollout.max_sequences_in_flight`` x the longest context),
never by the number of prompts. Slot ``s`` holds ``lengths[s]`` positions (host ints: the
scheduler knows them without asking the device).

:meth:`feed` runs the network on the next tokens of a contiguous range of slots (a prefill of
several prompts of any lengths, right-padded, or one decode token per slot) through
:class:`~trb_nemo.models.cached_attention.CachedSelfAttention` and returns the vocab-parallel
logits of each row's last fed token only: ``[B, V_pad / TP]``, never gathered over TP and never
materialized at other positions (Megatron's ``output_processor`` hook). Under pipeline
parallelism stage s receives the hidden states ``[L, B, h]`` from stage s-1 and sends its own
on (1 p2p each way through :mod:`trb_nemo.parallel.comm`); only the last stage returns logits.
:meth:`move` copies a sequence to another slot (the scheduler keeps live sequences in slots
``[0, n)``, so attention reads a view of the cache, no gather).
"""

from __future__ import annotations

import torch

from trb_nemo.models.cached_attention import CacheStep, active
from trb_nemo.parallel import comm
from trb_nemo.parallel.groups import ParallelGroups


def _last_token_logits(hidden_states, output_layer, output_weight, context, **_):
    """Megatron output processor: logits [B, V_pad / TP] at row b's position ``context[b]``."""
    rows = torch.arange(hidden_states.shape[1], device=hidden_states.device)
    last = hidden_states[context, rows].unsqueeze(0)  # [1, B, h]
    logits, _ = output_layer(last, weight=output_weight, runtime_gather_output=False)
    return logits[0]


class SequenceCache:
    """See the module docstring. ``forwards`` counts calls; ``positions`` counts the token
    positions the network computed (padding included)."""

    def __init__(self, model, slots: int, max_len: int, pg: ParallelGroups):
        self.model, self.pg, self.slots, self.max_len = model, pg, slots, max_len
        cfg = model.config
        kv_heads = (cfg.num_query_groups or cfg.num_attention_heads) // pg.tp_size
        self.device = next(model.parameters()).device
        shape = (slots, max_len + 1, kv_heads, cfg.kv_channels)  # + the scratch position
        # zeros, not empty: a masked key still multiplies its value by probability 0
        self.keys = {layer.layer_number: torch.zeros(shape, dtype=cfg.params_dtype,
                                                     device=self.device)
                     for layer in model.decoder.layers}
        self.values = {n: torch.zeros_like(k) for n, k in self.keys.items()}
        self.lengths = [0] * slots
        self._freqs = model.rotary_pos_emb(max_len + 1)[:, 0].to(self.device)  # [max_len + 1, 1, D]
        self._hidden = (cfg.hidden_size, cfg.params_dtype)
        self.forwards = 0
        self.positions = 0

    def bytes(self) -> int:
        """Bytes held by the keys and values."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values)
                   for t in d.values())

    def start(self, slot: int) -> None:
        """A new sequence takes ``slot``."""
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """The sequence in ``src`` now lives in ``dst`` (its keys/values copied)."""
        n = self.lengths[src]
        for cache in (self.keys, self.values):
            for t in cache.values():
                t[dst, :n] = t[src, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    @torch.no_grad()
    def feed(self, slot_lo: int, tokens_BL: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Feed row b (slot ``slot_lo + b``) its next ``counts[b]`` tokens ``tokens_BL[b, :count]``
        at positions ``lengths[slot] ...``; returns the logits at each row's last fed token
        [B, V_pad / TP] on the last stage (None elsewhere). ``counts[b] == 0`` feeds nothing for
        that row (its logits are meaningless)."""
        rows, length = tokens_BL.shape
        starts = self.lengths[slot_lo: slot_lo + rows]
        key_len = max(s + c for s, c in zip(starts, counts, strict=True))
        if key_len > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions per sequence; "
                             f"feeding up to position {key_len}")
        dev = self.device
        start_B = torch.tensor(starts, dtype=torch.long, device=dev)
        count_B = torch.tensor(counts, dtype=torch.long, device=dev)
        offs_L = torch.arange(length, device=dev)
        valid_BL = offs_L < count_B[:, None]
        pos_BL = torch.where(valid_BL, start_B[:, None] + offs_L, self.max_len)  # padding: scratch
        mask = torch.arange(key_len, device=dev)[None, None, None, :] <= pos_BL[:, None, :, None]
        freqs = self._freqs[pos_BL.T]  # [L, B, 1, D]
        step = CacheStep(self.keys, self.values, slot_lo, pos_BL.T, freqs.cos(), freqs.sin(), mask,
                         key_len)
        pg = self.pg
        if not pg.is_first_stage:
            hidden = comm.recv((length, rows, self._hidden[0]), self._hidden[1], pg.pp_rank - 1,
                               pg.pipeline, device=dev)
            self.model.set_input_tensor(hidden)
        last_B = (count_B - 1).clamp(min=0)
        with active(step):
            out = self.model(tokens_BL, pos_BL, attention_mask=None,
                             output_processor=_last_token_logits if pg.is_last_stage else None,
                             output_processor_context=last_B)
        for b, c in enumerate(counts):
            self.lengths[slot_lo + b] += c
        self.forwards += 1
        self.positions += rows * length
        if not pg.is_last_stage:
            comm.send(out, pg.pp_rank + 1, pg.pipeline)
            return None
        return out
