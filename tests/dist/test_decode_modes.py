"""Decoding and evaluation run the networks in eval mode and hand the student back in training
mode for the optimizer step (with TE >= 2.2 a training-mode model keeps the causal mask in a
one-token decode step; dropout would change the samples)."""

import pytest
from decode_modes import check_modes, modes_seen
from harness import spawn_bare

pytestmark = pytest.mark.dist


def test_decode_and_eval_in_eval_mode_student_back_in_training():
    check_modes(spawn_bare(modes_seen, 1)[0])


def test_padding_rows_leave_the_real_rows_unchanged():
    """Under FP8 every forward feeds a multiple of 16 rows, the extra ones feeding nothing; the
    sequences draw the same tokens as without (records agree to float rounding: a matmul over
    more rows may sum in another order)."""
    import torch
    from decode_modes import rows_alone_and_padded

    alone, padded = spawn_bare(rows_alone_and_padded, 1)[0]
    assert torch.equal(alone["tokens"], padded["tokens"])
    assert torch.equal(alone["lengths"], padded["lengths"])
    beta_alone, beta_padded = alone["beta"], padded["beta"]
    assert torch.equal(beta_alone.isnan(), beta_padded.isnan())
    assert (beta_alone - beta_padded).nan_to_num().abs().max() <= 1e-5
