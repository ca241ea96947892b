"""The vocabulary student and teacher share, and their two stop ids.

A Base student and an Instruct teacher stop on different ids. Before blending, sampling and the
loss, both models' logits are canonicalized (:func:`trb_nemo.ops.eos.canonicalize`): the
probability of the teacher's stop id is merged onto the student's, which ends every response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trb_nemo.config.schema import ModelConfig
from trb_nemo.ops.eos import canonicalize


@dataclass(frozen=True)
class SharedVocab:
    size: int
    """True vocabulary size (the logits' padded columns are >= size)."""
    stop_id: int
    """The canonical stop id (the student's)."""
    other_stop_id: int
    """The teacher's stop id, merged into ``stop_id`` and masked."""

    @classmethod
    def of(cls, model: ModelConfig) -> SharedVocab:
        teacher_eos = model.teacher.eos_token_id if model.teacher else model.student.eos_token_id
        return cls(model.student.vocab_size, model.student.eos_token_id, teacher_eos)

    @property
    def stop_ids(self) -> tuple[int, int]:
        """(kept, dropped) stop id: what the losses take as ``stop_ids`` to read logits
        canonically without a copy (:mod:`trb_nemo.ops.losses`)."""
        return self.stop_id, self.other_stop_id

    def canonical(self, logits: torch.Tensor, vocab_group) -> torch.Tensor:
        """Local shard with the two stop ids merged: a copy (differentiable; input unchanged).
        For decoding; the losses read the raw shard with :attr:`stop_ids` instead."""
        return canonicalize(logits, keep_id=self.stop_id, drop_id=self.other_stop_id,
                            vocab_group=vocab_group)
