"""Schedule math for pretraining as small pure functions (learning-rate warm-up, EMA decay ramp).

Kept free of torch and state so each rule is checked by a one-line test and reused by the loop.
"""

from __future__ import annotations


def warmup_lr_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warm-up, then 1.

    As in the paper (linear warm-up, then constant). Step ``s`` uses ``(s + 1) / warmup_steps``, so
    the first step already moves the weights and step ``warmup_steps - 1`` reaches the full lr.
    ``warmup_steps <= 0`` disables the warm-up. Range: (0, 1].
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay used after optimizer step ``step`` (0-based): ``decay``, or ramped when ``warmup``.

    The ramp ``min(decay, (1 + s) / (10 + s))`` keeps a short run's EMA from being mostly the random
    initialisation (0.1 at s=0, 0.5 at s=8, 0.99 at s=890). Range: [0, 1).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))
