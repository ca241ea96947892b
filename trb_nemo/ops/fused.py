"""Row kernels: one pass over a local [R, V] shard that returns per-row sums (or a gradient).

The vocab-parallel ops are written as a few such kernels with collectives of [R, k] between
them. Each kernel is plain torch, so it runs eagerly anywhere (one temporary [R, V] per op,
rows processed in cache-sized chunks). Compiled with ``torch.compile`` (Triton on CUDA, C++ on
CPU) each kernel becomes one fused loop that reads its inputs once and writes only [R, k]
(or the gradient), so rows need no chunking and no [R, V] temporary exists.

When kernels are compiled (``TRB_NEMO_FUSED_OPS`` or :func:`set_mode`):

* ``auto`` (default): on CUDA tensors, eager elsewhere (compiling costs tens of seconds on a
  CPU, more than the toy vocabularies gain);
* ``on``: everywhere (CPU needs a C++ compiler);
* ``off``: never.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

MODES = ("auto", "on", "off")
_mode = "auto"
_agreed = False
"""The ranks agreed to run kernels compiled (:func:`agreed`): a compile failure after that is
an error, not a per-process fallback (ranks that chunk rows differently hang)."""
_fell_back = False
"""A kernel failed to compile in this process: every kernel runs eagerly from then on, and
callers chunk rows for the eager path (:func:`is_fused` is the one answer to both), instead of
handing an eager kernel the all-rows chunk meant for a fused one (tens of GB of fp32
temporaries at a 152k vocabulary)."""


def set_mode(mode: str) -> None:
    """auto | on | off (module docstring); also forgets an earlier compile failure and
    agreement."""
    global _mode, _fell_back, _agreed
    if mode not in MODES:
        raise ValueError(f"fused ops mode (TRB_NEMO_FUSED_OPS, parallel.fused_ops) must be one "
                         f"of {'|'.join(MODES)}, got {mode!r}")
    _mode, _fell_back, _agreed = mode, False, False


set_mode(os.environ.get("TRB_NEMO_FUSED_OPS", "auto"))


def agreed(value: bool) -> None:
    """Record that every rank of the job agreed to run the kernels compiled
    (:func:`trb_nemo.parallel.groups.agree_on_fused_kernels`)."""
    global _agreed
    _agreed = value


def compiles(device: torch.device) -> bool:
    """Whether a kernel compiles and runs here: a probe of the compiler, Dynamo and the device
    (a small row reduction like the ops' own kernels). Seconds, once per process."""
    @kernel
    def probe(x_RV, c_R1):
        return torch.exp(x_RV - x_RV.amax(-1, keepdim=True)).sum(-1, keepdim=True) + c_R1

    x = torch.arange(24, dtype=torch.float32, device=device).reshape(3, 8) / 8
    before = _fell_back
    try:
        out = probe(x, torch.zeros(3, 1, device=device))
        ok = bool(torch.allclose(out.cpu(), torch.exp(x - x.amax(-1, keepdim=True)).sum(
            -1, keepdim=True).cpu()))
    except Exception:  # noqa: BLE001 - whatever fails, the kernels do not run compiled here
        ok = False
    return ok and not (_fell_back and not before)


def is_fused(device: torch.device) -> bool:
    """Whether kernels run compiled for tensors on ``device`` (False after a compile failure).
    Callers size their row chunks by it (``shards.row_chunks``)."""
    return not _fell_back and (_mode == "on" or (_mode == "auto" and device.type == "cuda"))


_NEVER_REALIZE = {
    "realize_reads_threshold": 1_000,
    "realize_opcount_threshold": 10_000,
    "realize_acc_reads_threshold": 1_000,
}
"""Inductor's default is to store a pointwise value read by several reductions into an [R, V]
buffer; a kernel's values are cheap to recompute, so every one stays in registers (measured:
a 7-sum kernel went from 133 ms to 34 ms on 2048 x 32768 fp32, 2 CPU threads)."""


RECOMPILE_LIMIT = 64
"""Compiled variants per kernel: one per input dtype, contiguity and 0/1-size specialization
(Dynamo's default of 8 is reached by a test suite that mixes fp64, fp32, bf16, padded views
and single rows)."""


def _recompile_limit():
    """A context raising Dynamo's recompile limit (named cache_size_limit before torch 2.7)."""
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{key: RECOMPILE_LIMIT})


def kernel(fn):
    """Run ``fn(x_RV, ...)`` compiled (one fused pass) or eagerly, per :func:`is_fused`.

    Kernels take tensors only (per-row constants as [R, k] tensors, never Python floats, so one
    compiled graph serves every value; None for an optional input the eager caller leaves out)
    and run without autograd. A kernel that cannot be compiled here (no compiler, Dynamo
    refuses) warns once, and from then on every kernel of the process runs eagerly. In a job,
    ranks must chunk rows alike (each chunk makes its own collectives), so the choice is made
    once for the world at start-up (:func:`trb_nemo.parallel.groups.agree_on_fused_kernels`:
    a probe compile on every rank, eager everywhere unless all succeed), and a compile failure
    after that agreement raises instead of falling back on one rank only.
    """
    compiled = limit = None

    @functools.wraps(fn)
    def run(*tensors):
        global _fell_back
        nonlocal compiled, limit
        # no autograd state for Dynamo to inspect (None: an optional input left out)
        tensors = [t if t is None else t.detach() for t in tensors]
        with torch.no_grad():
            if not is_fused(tensors[0].device):
                return fn(*tensors)
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=_NEVER_REALIZE)
                limit = _recompile_limit()
            try:
                with limit:
                    return compiled(*tensors)
            except Exception as err:  # compiler or Dynamo failure: the eager kernel is exact too
                if _agreed:  # the ranks chunk alike only while all run compiled: stop, not hang
                    raise RuntimeError(
                        f"trb_nemo.ops.fused: {fn.__name__} failed to compile on this rank after "
                        "every rank agreed to compile; rerun the same command (it resumes) with "
                        f"parallel.fused_ops=off: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from err
                _fell_back = True
                warnings.warn(f"trb_nemo.ops.fused: {fn.__name__} failed to compile, so the op "
                              f"kernels run eagerly from now on: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}", stacklevel=2)
                return fn(*tensors)

    return run


SMALL = 0.5
"""expm1_small is exact to fp32 rounding for |t| < SMALL; callers take e^t - 1 beyond."""


def expm1_small(t: torch.Tensor) -> torch.Tensor:
    """e^t - 1 with full relative precision (<= 2e-7 relative in fp32) where |t| < SMALL; any
    finite value elsewhere (callers select another formula there).

    A degree-9 Taylor polynomial in Horner form (truncation < 3e-10 relative at |t| = 0.5):
    multiplies and adds only, so it vectorizes eagerly and compiled. torch.expm1 runs scalar on
    CPU (about 9x slower than exp there) and the compiled CPU backend has no vector expm1.
    """
    t = t.clamp(-SMALL, SMALL)
    poly = 1.0 + t * (1.0 / 9.0)
    for k in (8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0):
        poly = 1.0 + t * (1.0 / k) * poly  # multiply: vector division is slow
    return t * poly
