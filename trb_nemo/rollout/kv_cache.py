"""One network's per-sequence KV cache on this rank's TP/PP stage, and forwards through it.

The cache holds ``slots`` sequences of up to ``max_len`` positions: per layer of this stage,
keys and values ``[slots, max_len + 1, kv_heads / TP, head_dim]`` in the model's dtype (the
last position is scratch: padding tokens write there, so no write needs a boolean mask and
its device sync), so its memory is fixed by the budget (``rollout.max_sequences_in_flight`` x
the longest context), never by the number of prompts. Slot ``s`` holds ``lengths[s]``
positions, kept twice: as host ints (the scheduler plans without asking the device) and on the
device (``lengths_S``, what the forwards read), both updated by every feed, step, move and
truncation with the same host-known counts.

Two forwards, both through
:class:`~trb_nemo.models.cached_attention.CachedSelfAttention`, returning the vocab-parallel
logits of the fed tokens only (never gathered over TP, never at other positions:
:func:`stage_forward`):

* :meth:`feed` (prefill, tests): the next tokens of a contiguous range of slots, any counts
  per row (right-padded), positions built on the host. Eager.
* :meth:`step` (decoding): ``L`` tokens for each of the first ``live`` slots, the rows padded up
  to a bucket of :func:`row_buckets`; the tokens go into a static buffer, positions come from
  ``lengths_S``, the logits land in a static buffer, so nothing is built from host data and
  nothing is read back (0 host syncs), and the same buffers serve every step of a bucket. That
  body is what a CUDA graph captures (:mod:`trb_nemo.rollout.graphs`); elsewhere it runs eagerly.

Under pipeline parallelism stage s receives the hidden states ``[L, B, h]`` from stage s-1 and
sends its own on (1 p2p each way through :mod:`trb_nemo.parallel.comm`, outside any graph);
only the last stage returns logits. :meth:`move` copies a sequence to another slot (the
scheduler keeps live sequences in slots ``[0, n)``, so attention reads views of the cache).
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_context

from trb_nemo.models.cached_attention import (
    CacheStep,
    active,
    column_linear,
    flash_kv_kernel,
    segments,
)
from trb_nemo.models.gpt import fp8_scales_ready
from trb_nemo.parallel import comm
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.rollout.graphs import StepGraphs


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


def row_buckets(max_rows: int, multiple: int = 1) -> list[int]:
    """The row counts a decode step runs at, ascending: 1, 2, 4, 8, then every multiple of 8
    (the buckets of vLLM's CUDA graphs), each rounded up to a multiple of ``multiple`` (16
    under FP8), without repeats, ending at ``max_rows`` rounded up to that multiple (the
    cache's slots: no slot beyond the budget). Live sequences are padded up to the next bucket,
    so a budget of 64 makes at most 11 step shapes (and graphs)."""
    cap = -(-max_rows // multiple) * multiple
    sizes, b = [], 1
    while True:
        r = min(cap, -(-b // multiple) * multiple)
        if not sizes or r > sizes[-1]:
            sizes.append(r)
        if r >= cap:
            return sizes
        b = b * 2 if b < 8 else b + 8


def bucket_of(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``n`` rows."""
    return next(b for b in buckets if b >= n)


class SequenceCache:
    """See the module docstring. ``forwards`` counts calls; ``positions`` counts the token
    positions the network computed (padding included). ``slots`` becomes a multiple of
    ``rows_multiple`` (:func:`row_buckets`; a step's padded rows are free slots).
    ``cuda_graphs``: decode steps are captured and replayed (:mod:`trb_nemo.rollout.graphs`;
    CUDA only)."""

    def __init__(self, model, slots: int, max_len: int, pg: ParallelGroups,
                 rows_multiple: int = 1, cuda_graphs: bool = False):
        check_decodable(model)
        self.buckets = row_buckets(slots, rows_multiple)
        slots = self.buckets[-1]
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
        self.lengths_S = torch.zeros(slots, dtype=torch.long, device=self.device)
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
        # decode steps: the live count and per-L static buffers (tokens [slots, L], hidden
        # states in [L, slots, h], outputs), kept across steps (a CUDA graph reads and writes
        # exactly these)
        self._live = torch.zeros((), dtype=torch.long, device=self.device)
        self._tokens_SL: dict[int, torch.Tensor] = {}
        self._hidden_in: dict[int, torch.Tensor] = {}
        self._out: dict[int, torch.Tensor] = {}
        # flash-attn's KV-cache kernel for decode steps where it runs (CUDA, 16-bit caches)
        self.flash = (self.device.type == "cuda" and cfg.params_dtype in (torch.float16,
                                                                         torch.bfloat16)
                      and flash_kv_kernel() is not None)
        self.graphs = (StepGraphs(pg.model, self.flash)
                       if cuda_graphs and self.device.type == "cuda" else None)
        self.forwards = 0
        self.positions = 0

    def bytes(self) -> int:
        """Bytes the keys and values hold (held, until :meth:`release`)."""
        return self._bytes

    def release(self) -> None:
        """Free the keys, values, step buffers and graphs (the decoding is over; the counters
        stay)."""
        self.keys, self.values = {}, {}
        self._tokens_SL, self._hidden_in, self._out = {}, {}, {}
        if self.graphs is not None:
            self.graphs.release()

    def start(self, slot: int) -> None:
        """A new sequence takes ``slot``."""
        self.lengths[slot] = 0
        self.lengths_S[slot] = 0

    def truncate(self, lengths: list[int], lengths_B: torch.Tensor) -> None:
        """Slots [0, B) keep their first ``lengths[b]`` positions (speculative decoding rolls back
        the rejected drafts; the stale positions are overwritten by the next feed and no query
        attends past its own position): the host's ``lengths`` and the same values on the device
        ``lengths_B`` [B] (no copy from the host)."""
        for s, n in enumerate(lengths):
            if not 0 <= n <= self.lengths[s]:
                raise ValueError(f"slot {s} holds {self.lengths[s]} positions, not {n}")
            self.lengths[s] = n
        self.lengths_S[: len(lengths)] = lengths_B

    def move(self, src: int, dst: int) -> None:
        """The sequence in ``src`` now lives in ``dst`` (its keys/values copied)."""
        n = self.lengths[src]
        for cache in (self.keys, self.values):
            for t in cache.values():
                t[dst, :n] = t[src, :n]
        self.lengths[dst], self.lengths[src] = n, 0
        self.lengths_S[dst] = self.lengths_S[src]
        self.lengths_S[src] = 0

    def _check_room(self, key_len: int) -> None:
        if key_len > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions per sequence; "
                             f"feeding up to position {key_len}")

    def _forward(self, tokens_BL, pos_BL, hidden, last_B, slot_lo, key_lens, seqlens_B=None,
                 bound=None):
        """One stage forward over slots [slot_lo, slot_lo + B) through the cache (active);
        attention reads ``key_lens[b]`` keys per row (host ints), or ``bound`` keys for every row
        (a captured step), or flash-attn's per-row ``seqlens_B``."""
        length, rows = pos_BL.shape[1], pos_BL.shape[0]
        runs = segments(key_lens, length) if bound is None else ((0, rows, bound, True),)
        key_len = max(r[2] for r in runs)
        mask = self._key_positions[:key_len] <= pos_BL[:, None, :, None]  # [B, 1, L, K]
        pos_LB = pos_BL.T
        slots_LB = self._slot_ids[slot_lo: slot_lo + rows].expand(length, rows)
        step = CacheStep(self.keys, self.values, slot_lo, pos_LB, self._cos[pos_LB],
                         self._sin_signed[pos_LB], mask, runs, slots_LB, self._rope_swap,
                         seqlens_B)
        with active(step):
            return stage_forward(self.model, tokens_BL, pos_BL, hidden, last_B)

    @torch.no_grad()
    def feed(self, slot_lo: int, tokens_BL: torch.Tensor, counts: list[int],
             all_positions: bool = False) -> torch.Tensor | None:
        """Feed row b (slot ``slot_lo + b``) its next ``counts[b]`` tokens ``tokens_BL[b, :count]``
        at positions ``lengths[slot] ...``; returns the logits at each row's last fed token
        [B, V_pad / TP] on the last stage (None elsewhere), or with ``all_positions`` at every
        fed position [B, L, V_pad / TP] (speculative verification). ``counts[b] == 0`` feeds
        nothing for that row (its logits are meaningless). Eager; positions from the host."""
        rows, length = tokens_BL.shape
        starts = self.lengths[slot_lo: slot_lo + rows]
        key_lens = [max(1, s + c) for s, c in zip(starts, counts, strict=True)]
        self._check_room(max(key_lens))
        dev = self.device
        start_B = torch.tensor(starts, dtype=torch.long, device=dev)
        count_B = torch.tensor(counts, dtype=torch.long, device=dev)
        offs_L = torch.arange(length, device=dev)
        valid_BL = offs_L < count_B[:, None]
        pos_BL = torch.where(valid_BL, start_B[:, None] + offs_L, self.max_len)  # padding: scratch
        last_B = "all" if all_positions else (count_B - 1).clamp(min=0)
        pg = self.pg
        hidden = None
        if not pg.is_first_stage:
            hidden = comm.recv((length, rows, self._hidden[0]), self._hidden[1], pg.pp_rank - 1,
                               pg.pipeline, device=dev)
        out = self._forward(tokens_BL, pos_BL, hidden, last_B, slot_lo, key_lens)
        for b, c in enumerate(counts):
            self.lengths[slot_lo + b] += c
        self.lengths_S[slot_lo: slot_lo + rows] += count_B
        return self._done(rows, length, out)

    def _done(self, rows, length, out):
        self.forwards += 1
        self.positions += rows * length
        if not self.pg.is_last_stage:
            comm.send(out, self.pg.pp_rank + 1, self.pg.pipeline)
            return None
        return out

    def step_tokens(self, length: int) -> torch.Tensor:
        """The static token buffer [slots, ``length``] int64 of :meth:`step` (write the live rows'
        tokens into its first rows, or pass them to :meth:`step`)."""
        buf = self._tokens_SL.get(length)
        if buf is None:
            buf = self._tokens_SL[length] = torch.zeros(self.slots, length, dtype=torch.long,
                                                        device=self.device)
        return buf

    @torch.no_grad()
    def step(self, live: int, tokens_BL: torch.Tensor | None = None,
             all_positions: bool = False, length: int = 1) -> torch.Tensor | None:
        """A decode step: slots [0, ``live``) each feed ``L`` tokens (``tokens_BL`` [live, L], or
        ``length`` tokens already in :meth:`step_tokens`), the rows padded up to
        ``bucket_of(live)``. Returns a
        view of the static logits buffer, valid until the next step of this L: the last fed
        token's logits [live, V_pad / TP], or every fed position's [live, L, V_pad / TP] with
        ``all_positions``; None before the last pipeline stage. No host sync, no tensor built
        from host data (module docstring)."""
        length = length if tokens_BL is None else tokens_BL.shape[1]
        rows = bucket_of(live, self.buckets)
        key_lens = [self.lengths[s] + length for s in range(live)] + [1] * (rows - live)
        self._check_room(max(key_lens))
        buf = self.step_tokens(length)
        if tokens_BL is not None:
            buf[:live].copy_(tokens_BL)
        pg, dev = self.pg, self.device
        if not pg.is_first_stage:
            hidden = self._hidden_in.get(length)
            if hidden is None:
                hidden = self._hidden_in[length] = torch.zeros(
                    length, self.slots, self._hidden[0], dtype=self._hidden[1], device=dev)
            hidden[:, :rows].copy_(comm.recv((length, rows, self._hidden[0]), self._hidden[1],
                                             pg.pp_rank - 1, pg.pipeline, device=dev))
        self._live.fill_(live)
        body = _StepBody(self, rows, length, all_positions)
        if self.graphs is not None:
            out = self.graphs.run(self, body, key_lens)
        else:
            out = body(key_lens, seqlens=self.flash)
        self.lengths_S[:rows] += (self._slot_ids[:rows] < self._live) * length
        for s in range(live):
            self.lengths[s] += length
        out = self._done(rows, length, out)
        return None if out is None else out[:live]


class _StepBody:
    """The device work of :meth:`SequenceCache.step` for ``rows`` rows of ``length`` tokens:
    reads only the cache's static buffers (tokens, ``lengths_S``, the live count, the hidden
    states in) and writes only the KV cache (the fed positions, or scratch for padding rows)
    and the static output buffer, which it returns ([rows, (L,) V_pad / TP] or [L, rows, h]
    before the last stage). Running it twice in a row writes the same values: a CUDA graph's
    warm-up and capture change nothing. ``key_lens``: the keys each row reads (host ints; a
    graph reads a fixed bound)."""

    def __init__(self, cache: SequenceCache, rows: int, length: int, all_positions: bool):
        self.cache, self.rows, self.length, self.all_positions = cache, rows, length, all_positions
        self.key = (rows, length, all_positions)
        """What a graph of this body depends on, besides the keys it reads."""

    def __call__(self, key_lens: list[int], seqlens: bool = False,
                 bound: int | None = None) -> torch.Tensor:
        c, rows, length = self.cache, self.rows, self.length
        valid_B = c._slot_ids[:rows] < c._live
        start_B = c.lengths_S[:rows]
        pos_BL = torch.where(valid_B[:, None],
                             start_B[:, None] + c._key_positions[:length], c.max_len)
        # flash-attn's keys per row (valid rows: their prefix; padding rows: one key)
        seqlens_B = (torch.where(valid_B, start_B + length, length).to(torch.int32)
                     if seqlens else None)
        hidden = None if c.pg.is_first_stage else c._hidden_in[length][:, :rows]
        last = "all" if self.all_positions else None
        out = c._forward(c._tokens_SL[length][:rows], pos_BL, hidden, last, 0, key_lens,
                         seqlens_B, bound)
        key = (length, self.all_positions)
        dst = c._out.get(key)
        if dst is None:  # [slots, (L,) V_pad / TP] on the last stage, else [L, slots, h]
            shape = list(out.shape)
            shape[0 if c.pg.is_last_stage else 1] = c.slots
            dst = c._out[key] = torch.empty(shape, dtype=out.dtype, device=out.device)
        view = dst[:rows] if c.pg.is_last_stage else dst[:, :rows]
        view.copy_(out)
        return view
