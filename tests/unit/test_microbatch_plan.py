"""Microbatch plans: grouping by length and trimming to the longest row (trb_nemo.models.pipeline).

The step-level check (same loss, gradients and weights as full-length microbatches, at PP=2
with microbatches of different lengths) is tests/dist/test_train_step.py::pp2-trimmed-grouped.
"""

import pytest
import torch

from trb_nemo.models.pipeline import PlannedMicrobatches, plan_microbatches, split_microbatches


def mask_of(ends: list[int], seq: int, start: int = 2) -> torch.Tensor:
    """[B, seq] loss mask: row i trains positions [start, ends[i])."""
    pos = torch.arange(seq)
    return (pos >= start) & (pos < torch.tensor(ends)[:, None])


def test_grouping_sorts_rows_by_needed_length_and_trims_each_microbatch():
    ends = [5, 70, 6, 130, 3, 65, 64, 2]
    plan = plan_microbatches(mask_of(ends, 200), 2, multiple=64, group_by_length=True)
    # needed = last trained position + 1 = ends; longest first, stable among equals
    assert plan.rows == ((3, 1), (5, 6), (2, 0), (4, 7))
    assert plan.lengths == (192, 128, 64, 64)
    assert sorted(r for rows in plan.rows for r in rows) == list(range(8))
    assert plan.fed_positions == 2 * (192 + 128 + 64 + 64)
    assert plan.full_positions == 8 * 200
    # without grouping: batch order, each still cut to its own longest row
    plain = plan_microbatches(mask_of(ends, 200), 2, multiple=64, group_by_length=False)
    assert plain.rows == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert plain.lengths == (128, 192, 128, 64)
    assert plan.fed_positions < plain.fed_positions < plain.full_positions
    # multiple 0: no trimming at all
    full = plan_microbatches(mask_of(ends, 200), 2, multiple=0, group_by_length=False)
    assert full.lengths == (200,) * 4 and full.fed_positions == full.full_positions


def test_length_is_capped_at_the_batch_length_and_empty_rows_need_one_position():
    plan = plan_microbatches(mask_of([100, 0], 100, start=0), 1, multiple=64,
                             group_by_length=False)
    assert plan.lengths == (100, 64)  # 100 rounds to 128 > S; a row with nothing trained: 1 -> 64


def test_planned_microbatches_and_assemble_invert_each_other():
    gen = torch.Generator().manual_seed(0)
    ends = [9, 3, 12, 5, 7, 12]
    mask = mask_of(ends, 12, start=1)
    batch = {"tokens": torch.randint(0, 50, (6, 12), generator=gen), "loss_mask": mask,
             "scores": torch.randn(6, 12, 3, generator=gen), "absent": None}
    plan = plan_microbatches(mask, 2, multiple=4, group_by_length=True)
    mbs = PlannedMicrobatches(batch, plan)
    assert len(mbs) == 3
    for m in range(3):
        mb = mbs[m]
        assert mb["absent"] is None
        assert mb["tokens"].shape == (2, plan.lengths[m])
        rows = list(plan.rows[m])
        assert torch.equal(mb["scores"], batch["scores"][rows, : plan.lengths[m]])
    whole = plan.assemble([mbs[m]["scores"] for m in range(3)])
    assert whole.shape == batch["scores"].shape
    for i, end in enumerate(ends):  # every needed position comes back to its row
        assert torch.equal(whole[i, :end], batch["scores"][i, :end])
    for m, rows in enumerate(plan.rows):  # past a microbatch's length: zeros
        assert not whole[list(rows), plan.lengths[m]:].any()


def test_contiguous_plan_slices_views_like_split_microbatches():
    mask = mask_of([12] * 4, 12)
    batch = {"tokens": torch.arange(48).view(4, 12), "loss_mask": mask}
    plan = plan_microbatches(mask, 2, multiple=4, group_by_length=True)
    assert plan.contiguous
    for m, ref in enumerate(split_microbatches(batch, 2)):
        mb = PlannedMicrobatches(batch, plan)[m]
        assert mb["tokens"].data_ptr() == ref["tokens"].data_ptr()  # a view, no copy
        assert torch.equal(mb["tokens"], ref["tokens"])


def test_batch_not_a_multiple_of_the_microbatch_is_refused():
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        plan_microbatches(mask_of([3, 4, 5], 8), 2, multiple=4, group_by_length=True)
