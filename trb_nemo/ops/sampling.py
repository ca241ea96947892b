"""Exact, TP-invariant sampling from vocabulary-sharded logits: counter-based noise keyed by
(seed, sequence, position) (:class:`RowNoise`) and a sharded Gumbel-max (:func:`sample`).

Shape legend as in :mod:`trb_nemo.ops.vocab_parallel`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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


def _uniform(key_R: torch.Tensor, counter_R: torch.Tensor, cols_V: torch.Tensor) -> torch.Tensor:
    """U(0,1) fp64 [R, V] that depends only on (row key, row counter < 2^31, global column).

    Counter-based, so each rank draws only its own columns and the noise of a column does not
    depend on how the vocabulary is sharded: TP=N samples equal TP=1 samples. Each (row key,
    counter) seeds, through one finalizer round of key XOR counter x a second odd constant (a
    bijection of the counter for each key), its own SplitMix64 stream, whose
    output at step ``column`` is one finalizer round of seed + column x golden ratio: one
    mix per element (the per-element cost of sampling), and no two rows' streams are shifted
    copies of each other unless two 64-bit seeds land within V steps (probability ~ V / 2^64
    per pair).
    """
    seed_R = _mix64_((counter_R * _MIX2).bitwise_xor_(key_R))
    bits = _mix64_(seed_R.unsqueeze(-1) + cols_V * _GOLDEN)
    return ((bits >> 11).bitwise_and_((1 << 53) - 1)).double().add_(0.5).mul_(2.0**-53)


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

    Gumbel-max: argmax_v (logprobs_v + G_v), G_v = -log(-log U_v). U is counter-based: either
    keyed per row by ``noise`` (:class:`RowNoise`), or by one int64 drawn from ``generator``
    and the row's index in the batch. Every rank of ``vocab_group`` must hold the same
    ``noise``/generator state (seed it from (seed, step), not tp_rank). The result is
    identical on every rank and does not depend on TP. ``logprobs`` need not be normalized.
    Collectives: 1 all-gather of [P, R, 2] (value, id) in fp64.
    """
    lead, v_local = logprobs.shape[:-1], logprobs.shape[-1]
    x_RV = logprobs.reshape(-1, v_local)
    if noise is None:
        key = int(torch.randint(-(2**62), 2**62, (1,), generator=generator, device=generator.device))
        counter = torch.arange(x_RV.shape[0], device=logprobs.device)
        keys_R = torch.full_like(counter, key)
    else:
        keys_R, counter = noise.row_keys(), noise.counter_R
    valid = valid_columns(v_local, vocab_size, vocab_group, logprobs.device)
    start = shard_start(v_local, vocab_group)
    cols_V = torch.arange(start, start + v_local, device=logprobs.device)
    best = []
    for c in row_chunks(x_RV.shape[0], v_local, device=x_RV.device):
        u = _uniform(keys_R[c], counter[c], cols_V)
        score = as_fp32_masked(x_RV[c], valid).double() - u.log_().neg_().log_()  # + Gumbel
        val, idx = score.max(dim=-1)
        best.append(torch.stack([val, (idx + start).double()], dim=-1))
    local_R2 = torch.cat(best) if len(best) != 1 else best[0]
    if not best:
        local_R2 = x_RV.new_zeros((0, 2), dtype=torch.float64)
    gathered_PR2 = all_gather_rows(local_R2, vocab_group)
    if gathered_PR2.shape[0] == 1:  # one shard: its best is the winner
        ids_R, best_R = gathered_PR2[0, :, 1], gathered_PR2[0, :, 0]
    else:
        winner_R = gathered_PR2[..., 0].argmax(dim=0)  # ties -> lower rank -> lower id
        ids_R = gathered_PR2[..., 1].gather(0, winner_R.unsqueeze(0)).squeeze(0)
        best_R = gathered_PR2[..., 0].amax(dim=0)
    if bool(torch.isinf(best_R).any()):
        raise ValueError("sample: a row has no finite log-probability")
    return ids_R.long().reshape(lead)
