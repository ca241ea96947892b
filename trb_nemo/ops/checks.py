"""Input checks on device values that either raise now or, while decoding, are deferred.

A check such as "no row of the logits is NaN" needs the device's answer on the host: one
device-to-host sync. Outside decoding that is cheap next to the work it guards, and
:func:`fail_if` raises at once. Inside a decode step it would be one sync per check per token,
so the decoder opens :func:`deferred`: each check then ORs its flag into a device tensor of
its own (no sync, no allocation after the first step: CUDA-graph safe), and the decoder reads
them all once, at the end of the rollout (:meth:`DeferredChecks.raise_first`), raising the
same one-line ``ValueError`` the check would have raised at once.

Contract: ``bad`` is a bool tensor (any shape) on the device of the data it checks;
``message`` is a constant string (it names the check: one flag per distinct message).
"""

from __future__ import annotations

import contextlib

import torch


class DeferredChecks:
    """The failed-check flags of one decoding (module docstring): message -> device bool []."""

    def __init__(self):
        self.flags: dict[str, torch.Tensor] = {}

    def add(self, bad: torch.Tensor, message: str) -> None:
        flag = self.flags.get(message)
        if flag is None:
            flag = self.flags[message] = torch.zeros((), dtype=torch.bool, device=bad.device)
        flag.logical_or_(bad.any())

    def raise_first(self) -> None:
        """Raise ``ValueError(message)`` of the first check that failed (1 host sync in all)."""
        if not self.flags:
            return
        failed = torch.stack(list(self.flags.values())).tolist()
        for message, bad in zip(self.flags, failed, strict=True):
            if bad:
                raise ValueError(message)


_ACTIVE: list[DeferredChecks] = []


def fail_if(bad: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` if any element of ``bad`` is True: now (1 host sync), or,
    inside :func:`deferred`, when the decoder reads its checks."""
    if _ACTIVE:
        _ACTIVE[-1].add(bad, message)
    elif bool(bad.any()):
        raise ValueError(message)


@contextlib.contextmanager
def deferred(checks: DeferredChecks):
    """Within this block :func:`fail_if` records into ``checks`` instead of syncing."""
    _ACTIVE.append(checks)
    try:
        yield checks
    finally:
        _ACTIVE.pop()
