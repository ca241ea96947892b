"""The methods' schedules over training steps k, on plain numbers: the trust-region budget
eps_k (paper Eq. 3 and the fixed-eps baseline), Veto's b_k and the temperature warmup's tau_k.

eps_k:

* ``linear``: eps0 (1 - k/K) for k < K, then 0 (pure OPD on student rollouts).
* ``cosine``: eps0 (1 + cos(pi k / K)) / 2 for k < K, then 0.
* ``constant``: eps0 for every k (the paper's fixed-eps blending baseline).
* ``none``: 0 for every k (vanilla OPD).
Steps count from k = 0 (the first optimizer update uses eps0).
"""

from __future__ import annotations

import math

SCHEDULES = ("linear", "cosine", "constant", "none")


def eps_at(step: int, *, schedule: str, eps0: float, warmup_steps: int) -> float:
    """eps_k for training step ``step`` >= 0."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if eps0 < 0:
        raise ValueError(f"eps0 must be >= 0, got {eps0}")
    if schedule == "none":
        return 0.0
    if schedule == "constant":
        return float(eps0)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {'|'.join(SCHEDULES)}, got {schedule!r}")
    if step >= warmup_steps:
        return 0.0
    frac = step / warmup_steps
    if schedule == "linear":
        return eps0 * (1.0 - frac)
    return eps0 * 0.5 * (1.0 + math.cos(math.pi * frac))


def veto_b_at(step: int, *, b_start: float, total_steps: int) -> float:
    """Veto's target exponent b_k: linear from ``b_start`` at step 0 to 0 at the last step
    (``total_steps`` - 1), as Jang et al. anneal it over training."""
    if step < 0 or total_steps < 1:
        raise ValueError(f"need step >= 0 and total_steps >= 1, got {step}, {total_steps}")
    if b_start < 0:
        raise ValueError(f"b_start must be >= 0, got {b_start}")
    if total_steps == 1:
        return 0.0
    return b_start * max(0.0, 1.0 - step / (total_steps - 1))


def temperature_at(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """tau_k of the temperature-warmup baseline: linear from ``start`` at step 0 to ``end``
    (``rollout.temperature``) over ``warmup_steps`` steps, then ``end``."""
    k = warmup_steps
    if k == 0 or step >= k:
        return end
    return start + (end - start) * step / k
