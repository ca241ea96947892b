"""The rollout's typed hand-offs: how to decode (:class:`DecodeSettings`), what decoding produces (:class:`Rollout`, its per-token
``RECORDS``) and what it recorded of the teacher (:class:`TeacherStats`), which scoring reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

RECORDS = ("beta", "kl", "injected", "student_logprob", "teacher_logprob")
"""Per-token [B, S] fp32 records (NaN where not a response prefix or not measured), in this
order (the decoder keeps them as one [B, S, len(RECORDS)] tensor)."""


@dataclass
class Rollout:
    tokens: torch.Tensor
    """[B, S] int64: prompt, response, 0-padding."""
    prompt_lengths: torch.Tensor
    """[B] int64."""
    response_lengths: torch.Tensor
    """[B] int64, the stop token included when emitted."""
    loss_mask: torch.Tensor
    """[B, S] bool: position t is a response prefix (tokens[t + 1] is a response token)."""
    records: dict
    """RECORDS -> [B, S] fp32 at response prefixes (NaN elsewhere); ``teacher_logprob`` is
    log pi_T of the chosen token (NaN when the teacher did not run)."""
    topk_ids: torch.Tensor
    """[B, S, K] int64: the student's global top-k at each response prefix."""
    teacher: TeacherStats | None
    """What the teacher said at every response prefix (None when it did not run): the hand-off
    to scoring."""
    stopped: torch.Tensor
    """[B] bool: the row ended with the stop id (not by length)."""
    forwards: dict = field(default_factory=dict)
    """Forward calls {"student", "teacher"} (a prefill counts once) and token positions fed
    {"student_positions", "teacher_positions"} (rows x positions)."""
    seconds: float = 0.0

    def response(self, row: int) -> list[int]:
        """Token ids of row ``row``'s response (the stop id included when emitted)."""
        start = int(self.prompt_lengths[row])
        return self.tokens[row, start: start + int(self.response_lengths[row])].tolist()


@dataclass
class TeacherStats:
    """What decoding recorded of the teacher at every response prefix."""

    topk_logprobs: torch.Tensor
    """[B, S, K] fp32: log pi_T (EOS-canonicalized) at the rollout's ``topk_ids``."""
    chosen_logprob: torch.Tensor
    """[B, S] fp32: log pi_T of the token drawn at each prefix."""


@dataclass(frozen=True)
class DecodeSettings:
    """How one :func:`~trb_nemo.rollout.engine.generate` call decodes (the rollout's and the
    evaluation's ``rollout.*`` / ``eval.*`` settings)."""

    max_new_tokens: int
    """Response tokens per sequence at most (the stop id included)."""
    topk_k: int
    """The student's global top-k recorded at every response prefix (``loss.topk``)."""
    max_in_flight: int = 64
    """Sequences decoding at once (``rollout.max_sequences_in_flight``): the KV caches' slots."""
    prefill_tokens: int = 8192
    """Positions per prefill forward at most (``rollout.prefill_chunk_tokens``)."""
    rows_multiple: int | None = None
    """Every forward feeds a multiple of this many rows (None: 16 under FP8, else 1)."""
    draft_tokens: int = 0
    """Speculative TRB's drafts per round (``rollout.draft_tokens``; 0: no speculation)."""
    cuda_graphs: bool = True
    """Capture each decode-step shape in a CUDA graph and replay it (``rollout.cuda_graphs``;
    CUDA only: CPU decoding runs the same step eagerly)."""


class Interrupt(Protocol):
    """Asks whether to stop a long phase early (a stop signal arrived somewhere)."""

    def requested(self, group) -> bool:
        """Collective over ``group`` (None: the world): whether any member was asked to stop.
        Every member calls it at the same point of the phase."""


class StopRequested(Exception):
    """A stop signal ended a phase (a rollout, an evaluation, a step) before it finished; the
    caller saves and exits. ``signum``: the signal (0 when not known here)."""

    def __init__(self, signum: int = 0):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
