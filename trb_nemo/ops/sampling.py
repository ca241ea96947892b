"""Exact, TP-invariant sampling from vocabulary-sharded logits: counter-based noise keyed by
(seed, sequence, position) (:class:`RowNoise`) and a sharded Gumbel-max (:func:`sample`).

Shape legend as in :mod:`trb_nemo.ops.vocab_parallel`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trb_nemo.ops.checks import fail_if
from trb_nemo.ops.fused import is_fused, kernel
from trb_nemo.ops.shards import row_chunks, shard_start, valid_columns
from trb_nemo.ops.vocab_parallel import all_gather_rows, as_fp32_masked

_MIX1 = -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64


_MIX2 = -7723592293110705685  # 0x94d049bb133111eb as int64
_GOLDEN = -7046029254386353131  # 0x9e3779b97f4a7c15 as int64


def _mix64_(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (wrapping multiply, logical shifts), in place:
    ``x`` is overwritten and returned."""
    x.bitwise_xor_((x >> 30).bitwise_and_((1 << 34) - 1)).mul_(_MIX1)
    x.bitwise_xor_((x >> 27).bitwise_and_((1 << 37) - 1)).mul_(_MIX2)
    return x.bitwise_xor_((x >> 31).bitwise_and_((1 << 33) - 1))


def _row_seeds(key_R: torch.Tensor, counter_R: torch.Tensor) -> torch.Tensor:
    """Each row's stream seed: one finalizer round of key XOR counter x a second odd constant
    (a bijection of the counter for each key). Inputs are not modified; any matching shape."""
    return _mix64_((counter_R * _MIX2).bitwise_xor_(key_R))


def _stream_uniforms(seed_R1: torch.Tensor, cols_1V: torch.Tensor) -> torch.Tensor:
    """U(0, 1) fp64 [R, V]: step ``column`` of each row's SplitMix64 stream (one finalizer round
    of seed + column x golden ratio), its top 53 bits as (k + 1/2) 2^-53. Integer math only up
    to the exact int -> fp64 conversion, so it is bit-identical eager and compiled."""
    bits = _mix64_(seed_R1 + cols_1V * _GOLDEN)
    return ((bits >> 11).bitwise_and_((1 << 53) - 1)).double().add_(0.5).mul_(2.0**-53)


def _uniform(key_R: torch.Tensor, counter_R: torch.Tensor, cols_V: torch.Tensor) -> torch.Tensor:
    """U(0,1) fp64 [R, V] that depends only on (row key, row counter < 2^31, global column).

    Counter-based, so each rank draws only its own columns and the noise of a column does not
    depend on how the vocabulary is sharded: TP=N samples equal TP=1 samples. Each (row key,
    counter) seeds (:func:`_row_seeds`) its own SplitMix64 stream, whose output at step
    ``column`` is one finalizer round of seed + column x golden ratio (:func:`_stream_uniforms`):
    one mix per element (the per-element cost of sampling), and no two rows' streams are
    shifted copies of each other unless two 64-bit seeds land within V steps (probability
    ~ V / 2^64 per pair).
    """
    return _stream_uniforms(_row_seeds(key_R, counter_R).unsqueeze(-1), cols_V)


@kernel
def _gumbel_max(x_RV: torch.Tensor, key_R1: torch.Tensor, counter_R1: torch.Tensor,
                start_11: torch.Tensor, valid_V: torch.Tensor | None) -> torch.Tensor:
    """One shard's Gumbel-max of R rows: fp64 [R, 2] (best score, its global id).

    ``x_RV`` logits (any float dtype, read as fp32 with padding at -inf where ``valid_V`` [V]
    bool is False; None: no padding), ``key_R1``/``counter_R1`` int64 [R, 1] (each row's
    stream, :func:`_uniform`), ``start_11`` int64 [1, 1] the shard's first global column.
    score_v = fp64(x_v) - log(-log U_v); ties -> the lowest column (``max``'s first index).
    Compiled (one chunk of every row): one pass, no [R, V] temporary. Eager (row chunks):
    about three 8-byte [rows_chunk, V] temporaries at a time, as the pre-kernel code.
    """
    cols_1V = torch.arange(x_RV.shape[-1], device=x_RV.device).unsqueeze(0) + start_11
    u = _stream_uniforms(_row_seeds(key_R1, counter_R1), cols_1V)
    score = as_fp32_masked(x_RV, valid_V).double() - u.log_().neg_().log_()  # + Gumbel
    val_R, idx_R = score.max(dim=-1)
    return torch.stack([val_R, (idx_R + start_11[0]).double()], dim=-1)


class RowNoise(NamedTuple):
    """The sampling noise of R rows keyed by what each row *is*, not where it sits in a batch:
    row r's uniforms depend only on (``key``, ``ids_R[r]``, ``counter_R[r]``, column). The
    rollout engine keys a row by its sequence's index and the position it draws, so a sequence
    samples the same tokens whichever sequences share its batch and in whatever order.
    ``ids_R``/``counter_R``: int64 [R] on the logits' device; counters < 2^31."""

    key: int
    ids_R: torch.Tensor
    counter_R: torch.Tensor

    def stream(self, salt: int) -> RowNoise:
        """An independent stream for the same rows (e.g. a policy's second draw)."""
        x = (self.key * 0x9E3779B97F4A7C15 + salt) % 2**64  # splitmix64 on Python ints
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
        x ^= x >> 31
        return RowNoise(x - 2**64 if x >= 2**63 else x, self.ids_R, self.counter_R)

    def row_keys(self) -> torch.Tensor:
        return _mix64_(self.ids_R * _GOLDEN + self.key)


def row_uniforms(noise: RowNoise) -> torch.Tensor:
    """One U(0, 1) per row [R] fp64 of ``noise`` (its column 0): no collective, the same on
    every rank (it depends only on the row's key and counter)."""
    cols = torch.zeros(1, dtype=torch.long, device=noise.ids_R.device)
    return _uniform(noise.row_keys(), noise.counter_R, cols)[:, 0]


def sample(
    logprobs: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: RowNoise | None = None,
    vocab_group=None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """One exact draw per row from softmax(logprobs) over the vocabulary: ids [...] int64.

    Gumbel-max: argmax_v (logprobs_v + G_v), G_v = -log(-log U_v), ties to the lowest global
    id. U is counter-based: either keyed per row by ``noise`` (:class:`RowNoise`), or by one
    int64 drawn from ``generator`` and the row's index in the batch. Every rank of
    ``vocab_group`` must hold the same ``noise``/generator state (seed it from (seed, step),
    not tp_rank). The result is identical on every rank and does not depend on TP.
    ``logprobs`` need not be normalized.

    Per row chunk one row kernel (:func:`_gumbel_max`: noise, score and max/argmax in one
    compiled pass when :func:`~trb_nemo.ops.fused.is_fused`, then all rows are one chunk).
    The uniforms are bit-identical eager and compiled; the Gumbel transform uses the
    backend's fp64 log, which on a CPU differs by an ulp between eager (MKL) and compiled
    (Sleef) code, so the two modes could draw differently only for a row whose two best
    scores lie within ~1e-15 of each other.

    With ``noise`` there is no host sync: a row without a finite best score (all -inf, a NaN
    or a +inf) fails :func:`~trb_nemo.ops.checks.fail_if` (``ValueError``, deferred while
    decoding). ``generator`` costs 1 sync (the key). Collectives: 1 all-gather of [P, R, 2]
    (value, id) in fp64. Memory: compiled, only [R, 2]; eager, about three 8-byte
    [rows_chunk, V] temporaries (:func:`~trb_nemo.ops.shards.row_chunks`).
    """
    lead, v_local = logprobs.shape[:-1], logprobs.shape[-1]
    x_RV = logprobs.reshape(-1, v_local)
    rows, device = x_RV.shape[0], logprobs.device
    if noise is None:
        key = int(torch.randint(-(2**62), 2**62, (1,), generator=generator, device=generator.device))
        counter_R = torch.arange(rows, device=device)
        keys_R = torch.full_like(counter_R, key)
    else:
        keys_R, counter_R = noise.row_keys(), noise.counter_R
    valid = valid_columns(v_local, vocab_size, vocab_group, device)
    start_11 = torch.full((1, 1), shard_start(v_local, vocab_group), dtype=torch.long,
                          device=device)  # a device fill from a host int: no copy, no sync
    keys_R1, counter_R1 = keys_R.unsqueeze(-1), counter_R.unsqueeze(-1)
    best = [_gumbel_max(x_RV[c], keys_R1[c], counter_R1[c], start_11, valid)
            for c in row_chunks(rows, v_local, is_fused(device), device)]
    if not best:
        local_R2 = x_RV.new_zeros((0, 2), dtype=torch.float64)
    else:
        local_R2 = torch.cat(best) if len(best) != 1 else best[0]
    gathered_PR2 = all_gather_rows(local_R2, vocab_group)
    if gathered_PR2.shape[0] == 1:  # one shard: its best is the winner
        ids_R, best_R = gathered_PR2[0, :, 1], gathered_PR2[0, :, 0]
    else:
        winner_R = gathered_PR2[..., 0].argmax(dim=0)  # ties -> lower rank -> lower id
        ids_R = gathered_PR2[..., 1].gather(0, winner_R.unsqueeze(0)).squeeze(0)
        best_R = gathered_PR2[..., 0].amax(dim=0)
    fail_if(~torch.isfinite(best_R), "sample: a row has no finite log-probability")
    return ids_R.long().reshape(lead)
