"""Every seed a run derives from its config, as named streams: the one home of the formulas that
bit-exact resume rests on. Each is a pure function of the config's seeds and the position in
the run (step, epoch, index, tensor name), never of the process layout or of how much was drawn
before, so a resumed run draws exactly what an uninterrupted one would have.

The values are fixed by the runs already saved: changing a formula changes what every old
checkpoint resumes into (tests/unit/test_seeds.py pins them). ``STRIDE`` (a prime) separates
the streams of different base seeds.
"""

from __future__ import annotations

import zlib

STRIDE = 1_000_003
"""seed * STRIDE + offset: base seeds a prime apart, so (seed, offset) pairs rarely collide."""

TOY_HELD_OUT = 7919
"""The toy task's held-out problems are the stream ``data.seed + TOY_HELD_OUT``."""


def rollout(seed: int, step: int) -> int:
    """The generator of training step ``step``'s rollouts (``rollout.seed``); its one draw keys
    every sequence's sampling noise with the sequence id."""
    return seed * STRIDE + step * 1009 + 1


def evaluation(seed: int, step: int, dp_rank: int) -> int:
    """The generator of the evaluation at training step ``step`` on data-parallel rank
    ``dp_rank`` (``seed``; the rank's share of problems is its own)."""
    return seed * STRIDE + 7 * step + 1_000_000 * dp_rank + 5


def epoch_order(seed: int, epoch: int) -> int:
    """The shuffle of a prompt file's training rows in epoch ``epoch`` (``data.seed``)."""
    return seed * STRIDE + epoch


def toy_problem(stream: int, index: int) -> int:
    """Problem ``index`` of the toy task's stream ``stream`` (``data.seed``, or
    ``data.seed + TOY_HELD_OUT`` for the held-out problems)."""
    return stream * STRIDE + index


def init_tensor(seed: int, name: str) -> int:
    """The random initialization of the HF tensor ``name`` (``model.init_seed``): the same
    model under every TP/PP layout."""
    return seed * STRIDE + zlib.crc32(name.encode())
