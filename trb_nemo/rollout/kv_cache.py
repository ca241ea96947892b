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
materialized at other positions (:func:`stage_forward`). Under pipeline
parallelism stage s receives the hidden states ``[L, B, h]`` from stage s-1 and sends its own
on (1 p2p each way through :mod:`trb_nemo.parallel.comm`); only the last stage returns logits.
:meth:`move` copies a sequence to another slot (the scheduler keeps live sequences in slots
``[0, n)``, so attention reads a view of the cache, no gather).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_context

from trb_nemo.models.cached_attention import CacheStep, active, column_linear
from trb_nemo.models.gpt import fp8_scales_ready
from trb_nemo.parallel import comm
from trb_nemo.parallel.groups import ParallelGroups


def stage_forward(model, tokens_BL: torch.Tensor, pos_BL: torch.Tensor,
                  hidden_LBh: torch.Tensor | None, last_B) -> torch.Tensor:
    """This pipeline stage of ``model`` on one cache step (active): GPTModel's forward in eval
    mode, one layer after another (pre-norm attention and MLP, each added to the residual as
    Megatron's bias-dropout-add does without dropout), without its per-call machinery
    (rotary tables, masks, packed-sequence and inference-context branches), which costs more
    than the layers at decode sizes. Input: the tokens on the first stage, else the previous
    stage's hidden states [L, B, h]. Output: [L, B, h] hidden states, or on the last stage the
    vocab-parallel logits at row b's position ``last_B[b]`` (None: the last position) only:
    [B, V_pad / TP] (the final norm and the output layer see those B rows), or at every
    position when ``last_B == "all"``: [B, L, V_pad / TP]."""
    if model.pre_process:
        hidden = model.embedding(input_ids=tokens_BL, position_ids=pos_BL)  # [L, B, h]
    else:
        hidden = hidden_LBh
    cfg = model.config
    # FP8 as TransformerBlock applies it: one context around the stage under delayed scaling,
    # else one per layer (which may keep the first/last layers in bf16); delayed scaling only
    # once its scales are calibrated (bf16 before: models.gpt.fp8_scales_ready)
    delayed = cfg.fp8 is not None and cfg.fp8_recipe == Fp8Recipe.delayed
    fp8_delayed = delayed and fp8_scales_ready(model)
    with get_fp8_context(cfg) if fp8_delayed else contextlib.nullcontext():
        for layer in model.decoder.layers:
            per_layer = (get_fp8_context(cfg, layer.layer_number - 1)
                         if cfg.fp8 is not None and not delayed else contextlib.nullcontext())
            with per_layer:
                out, bias = layer.self_attention(layer.input_layernorm(hidden), None)
                hidden = _residual_add(hidden, out, bias, cfg)
                out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
                hidden = _residual_add(hidden, out, bias, cfg)
    if not model.post_process:
        return hidden
    if isinstance(last_B, str):  # "all": every position
        last = hidden
    elif last_B is None:
        last = hidden[-1:]  # [1, B, h]
    else:
        rows = torch.arange(hidden.shape[1], device=hidden.device)
        last = hidden[last_B, rows].unsqueeze(0)  # [1, B, h]
    if model.decoder.final_layernorm is not None:
        last = model.decoder.final_layernorm(last)
    weight = (model.shared_embedding_or_output_weight()
              if model.share_embeddings_and_output_weights else None)
    logits, _ = column_linear(model.output_layer, last, weight, runtime_gather_output=False)
    return logits.transpose(0, 1) if isinstance(last_B, str) else logits[0]


def _residual_add(residual, out, bias, cfg):
    """Megatron's bias-dropout-add in eval mode: residual + (out + bias)."""
    if cfg.fp32_residual_connection:
        residual = residual.float()
    return residual + (out if bias is None else out + bias)


def check_decodable(model) -> None:
    """Refuse, in one line, a network :func:`stage_forward` does not run as Megatron would."""
    cfg = model.config
    unsupported = {"mtp_num_layers": cfg.mtp_num_layers, "num_moe_experts": cfg.num_moe_experts,
                   "multi_latent_attention": cfg.multi_latent_attention,
                   "rotary_interleaved": cfg.rotary_interleaved}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"the rollout engine's decode path does not support {', '.join(bad)}")


class SequenceCache:
    """See the module docstring. ``forwards`` counts calls; ``positions`` counts the token
    positions the network computed (padding included)."""

    def __init__(self, model, slots: int, max_len: int, pg: ParallelGroups):
        check_decodable(model)
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
        self._bytes = sum(t.numel() * t.element_size() for d in (self.keys, self.values)
                          for t in d.values())
        self.lengths = [0] * slots
        # RoPE tables of every position [max_len + 1, 1, D] in the model's dtype, the sine signed
        # so that rotate_half(x) = x[swap] * sign needs no negation (cached_attention)
        freqs = model.rotary_pos_emb(max_len + 1)[:, 0].to(self.device)
        half = freqs.shape[-1] // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(self.device)
        self._cos = freqs.cos().to(cfg.params_dtype)
        self._sin_signed = (freqs.sin() * sign).to(cfg.params_dtype)
        self._rope_swap = torch.cat([torch.arange(half, 2 * half), torch.arange(half)]).to(
            self.device)
        self._key_positions = torch.arange(max_len + 1, device=self.device)
        self._slot_ids = torch.arange(slots, device=self.device)
        self._hidden = (cfg.hidden_size, cfg.params_dtype)
        self.forwards = 0
        self.positions = 0

    def bytes(self) -> int:
        """Bytes the keys and values hold (held, until :meth:`release`)."""
        return self._bytes

    def release(self) -> None:
        """Free the keys and values (the decoding is over; the counters stay)."""
        self.keys, self.values = {}, {}

    def start(self, slot: int) -> None:
        """A new sequence takes ``slot``."""
        self.lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions of ``slot`` (speculative decoding rolls back the
        rejected drafts; the stale positions are overwritten by the next feed and no query
        attends past its own position)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} positions, not {length}")
        self.lengths[slot] = length

    def move(self, src: int, dst: int) -> None:
        """The sequence in ``src`` now lives in ``dst`` (its keys/values copied)."""
        n = self.lengths[src]
        for cache in (self.keys, self.values):
            for t in cache.values():
                t[dst, :n] = t[src, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    @torch.no_grad()
    def feed(self, slot_lo: int, tokens_BL: torch.Tensor, counts: list[int],
             all_positions: bool = False) -> torch.Tensor | None:
        """Feed row b (slot ``slot_lo + b``) its next ``counts[b]`` tokens ``tokens_BL[b, :count]``
        at positions ``lengths[slot] ...``; returns the logits at each row's last fed token
        [B, V_pad / TP] on the last stage (None elsewhere), or with ``all_positions`` at every
        fed position [B, L, V_pad / TP] (speculative verification). ``counts[b] == 0`` feeds
        nothing for that row (its logits are meaningless)."""
        rows, length = tokens_BL.shape
        starts = self.lengths[slot_lo: slot_lo + rows]
        key_len = max(s + c for s, c in zip(starts, counts, strict=True))
        if key_len > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions per sequence; "
                             f"feeding up to position {key_len}")
        dev = self.device
        if length == 1 or all_positions:  # positions known on the host
            pos_BL = torch.tensor([[s + i if i < c else self.max_len for i in range(length)]
                                   for s, c in zip(starts, counts, strict=True)], dtype=torch.long, device=dev)
            last_B = "all" if all_positions else None
        else:
            start_B = torch.tensor(starts, dtype=torch.long, device=dev)
            count_B = torch.tensor(counts, dtype=torch.long, device=dev)
            offs_L = torch.arange(length, device=dev)
            valid_BL = offs_L < count_B[:, None]
            pos_BL = torch.where(valid_BL, start_B[:, None] + offs_L, self.max_len)  # padding: scratch
            last_B = (count_B - 1).clamp(min=0)
        mask = self._key_positions[:key_len] <= pos_BL[:, None, :, None]  # [B, 1, L, K]
        pos_LB = pos_BL.T
        slots_LB = self._slot_ids[slot_lo: slot_lo + rows].expand(length, rows)
        step = CacheStep(self.keys, self.values, slot_lo, pos_LB, self._cos[pos_LB],
                         self._sin_signed[pos_LB], mask, key_len, slots_LB, self._rope_swap)
        dtype = self._hidden[1]
        pg = self.pg
        hidden = None
        if not pg.is_first_stage:
            hidden = comm.recv((length, rows, self._hidden[0]), dtype, pg.pp_rank - 1,
                               pg.pipeline, device=dev)
        with active(step):
            out = stage_forward(self.model, tokens_BL, pos_BL, hidden, last_B)
        for b, c in enumerate(counts):
            self.lengths[slot_lo + b] += c
        self.forwards += 1
        self.positions += rows * length
        if not pg.is_last_stage:
            comm.send(out, pg.pp_rank + 1, pg.pipeline)
            return None
        return out
