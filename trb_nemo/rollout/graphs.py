"""CUDA graphs of the rollout engine's decode steps (``rollout.cuda_graphs``).

A decode step's device work (:class:`~trb_nemo.rollout.kv_cache._StepBody`: RoPE, the KV
writes, attention, every layer, the output layer) is ~50 kernels per layer, so at decode sizes
launching them costs more CPU time than the GPU spends. :class:`StepGraphs` captures each
step shape once and replays it after: the shape is the body's key (rows bucket, tokens per
row, all positions or the last) and, where attention is PyTorch's SDPA, a bound on the keys read
(:func:`key_bound`: a power of two, so a 4k context makes at most ~6 graphs per bucket);
flash-attn's kernel reads per-row lengths from the device, so it needs no bound. All graphs of
a cache share one memory pool. Prefill stays eager.

Warm-up and capture follow PyTorch's recipe (a side stream, then ``torch.cuda.graph``); the body
writes the same values when run twice, so the warm-up changes nothing. Under pipeline
parallelism the p2p of hidden states stays outside the graph (the body reads a static input
buffer); the TP all-reduces inside it are captured (NCCL supports capture). Under FP8 the
layers' FP8 contexts are captured with the body, with the scales calibrated before decoding
(:func:`~trb_nemo.models.gpt.fp8_scales_ready`).

A capture that fails (an op that cannot be captured, an allocator or driver refusal) must
not leave ranks decoding differently: every rank of the model-parallel group reports its
outcome (1 all-reduce MIN of [1], once per new shape), and if any failed, all of them warn once
and decode eagerly from then on.
"""

from __future__ import annotations

import warnings

import torch

from trb_nemo.parallel import comm

MIN_KEY_BOUND = 128


def key_bound(keys: int, room: int) -> int:
    """Keys a captured SDPA step reads for a longest row of ``keys``: the next power of two from
    :data:`MIN_KEY_BOUND`, at most ``room`` (the cache's positions, scratch included)."""
    bound = MIN_KEY_BOUND
    while bound < keys:
        bound *= 2
    return min(bound, room)


class StepGraphs:
    """The captured decode steps of one :class:`~trb_nemo.rollout.kv_cache.SequenceCache`
    (module docstring). ``captured`` counts the graphs made; ``eager`` is set once a capture
    failed anywhere in the group."""

    def __init__(self, group, flash: bool):
        self.group, self.flash = group, flash
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None
        self.eager = False
        self.captured = 0

    def run(self, cache, body, key_lens: list[int]) -> torch.Tensor:
        """The body's output for this step: a replay of its graph (captured on first use), or
        the body run eagerly once graphs were given up."""
        if self.eager:
            return body(key_lens, seqlens=self.flash)
        bound = None if self.flash else key_bound(max(key_lens), cache.max_len + 1)
        key = body.key + (bound,)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(body, key_lens, bound)
            if entry is None:
                return body(key_lens, seqlens=self.flash)
            self.graphs[key] = entry
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, body, key_lens, bound):
        def run():
            return body(key_lens, seqlens=self.flash, bound=bound)

        graph, out, error = torch.cuda.CUDAGraph(), None, None
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run()  # warm-up: lazy initializations happen outside the capture
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph, pool=self.pool):
                out = run()
        except Exception as err:  # noqa: BLE001 - any refusal falls back, agreed below
            error = err
        ok = comm.all_reduce(torch.tensor([0 if error else 1], device=out.device if out is not None
                                          else torch.device("cuda")), self.group, op="min")
        if int(ok[0]) == 1:
            self.captured += 1
            return graph, out
        self.give_up(error)
        return None

    def give_up(self, error: Exception | None) -> None:
        """Decode eagerly from now on (one warning line)."""
        self.eager = True
        self.graphs = {}
        why = (f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
               if error is not None else "another rank of the model-parallel group failed")
        warnings.warn(f"rollout.cuda_graphs: a decode step could not be captured, so decoding "
                      f"runs eagerly from now on ({why})", stacklevel=2)

    def release(self) -> None:
        self.graphs = {}
        self.pool = None
