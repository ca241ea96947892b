"""The vocabulary shard layout: which global columns a rank holds, which of them are real
tokens, and how rows are chunked so one fp32 [rows_chunk, V] temporary stays small.

Layout: rank i of ``vocab_group`` holds global columns ``[i*V, (i+1)*V)``; ``vocab_group=None``
means the shard is the whole vocabulary. ``vocab_size`` is the true global vocabulary: columns at
or beyond it are Megatron's padding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEG_INF = float("-inf")


ROW_CHUNK_BYTES = 2 * 2**20
"""Target size of one fp32 [rows_chunk, V] temporary on a CPU (cache-sized: elementwise passes
over smaller chunks ran 4x faster on CPU than over 64 MiB ones); rows are processed in chunks."""
CUDA_ROW_CHUNK_BYTES = 256 * 2**20
"""The same on a GPU: each chunk costs ~20 kernel launches, so chunks are as large as memory
allows (2 MiB would give 6-row chunks at V/TP = 76k: ~110k launches per training microbatch);
256 MiB keeps one temporary under 1% of an H100 and a 32-row decode step in one chunk."""


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def shard_start(v_local: int, group) -> int:
    """Global id of this rank's first column."""
    return group_rank(group) * v_local


def chunk_bytes(device: torch.device | None) -> int:
    """Target bytes of one fp32 row-chunk temporary on ``device`` (None: a CPU)."""
    return CUDA_ROW_CHUNK_BYTES if device is not None and device.type == "cuda" \
        else ROW_CHUNK_BYTES


def row_chunks(num_rows: int, v_local: int, fused: bool = False,
               device: torch.device | None = None):
    """Slices of rows so that one fp32 [rows_chunk, V] temporary is about
    :func:`chunk_bytes` of ``device``; one slice of every row when the kernels are ``fused``
    (they hold no [R, V] temporary). The rule depends on the device type only, so every rank of
    a group chunks alike (each chunk makes its own collectives)."""
    step = num_rows if fused else max(1, chunk_bytes(device) // (4 * max(v_local, 1)))
    step = max(step, 1)
    for start in range(0, num_rows, step):
        yield slice(start, min(start + step, num_rows))


def valid_columns(v_local: int, vocab_size: int | None, group, device) -> torch.Tensor | None:
    """Bool [V]: which local columns are real tokens (None when there is no padding here)."""
    n = valid_count(v_local, vocab_size, group)  # host ints: no device sync
    if n == v_local:
        return None
    return torch.arange(v_local, device=device) < n


def valid_count(v_local: int, vocab_size: int | None, group) -> int:
    """How many local columns are real tokens. Padding sits at the end of the global
    vocabulary, so the real columns of every shard are a prefix ``[:, :valid_count]``."""
    if vocab_size is None:
        return v_local
    return max(0, min(v_local, vocab_size - shard_start(v_local, group)))


def flat_pair(student_logits, teacher_logits):
    """Both [..., V] operands as [R, V] views, and the leading shape; a ValueError unless
    they have the same shape (the same vocabulary shard)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (same vocab shard)")
    v = student_logits.shape[-1]
    return student_logits.reshape(-1, v), teacher_logits.reshape(-1, v), student_logits.shape[:-1]
