"""Schedule math as small pure functions: the one learning-rate schedule, the EMA decay ramp, the length
of a pretraining run.

Kept free of torch and state so each rule is checked by a one-line test and reused by every loop
(pretraining, fine-tuning, the online probe).
"""

from __future__ import annotations

import math

from ddae_core.config import TrainConfig


def lr_factor(step: int, *, warmup_steps: int, total_steps: int | None = None) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warm-up, then 1 or a cosine.

    Warm-up: step ``s < warmup_steps`` uses ``(s + 1) / warmup_steps``, so the first step already
    moves the weights and step ``warmup_steps - 1`` reaches the full lr (``warmup_steps <= 0``: none).
    After it: 1 when ``total_steps`` is None (pretraining: constant, as in the paper), else
    ``0.5 * (1 + cos(pi * progress))`` with progress going from 0 at the warm-up's end to 1 at
    ``total_steps`` and held there (fine-tuning, the online probe). Range: [0, 1].
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


EMA_POWER = 2.0 / 3.0  # ema-pytorch's default warm-up power, which the official DDAE code runs with


def ema_decay_at(step: int, decay: float, warmup: str) -> float:
    """EMA decay used after optimizer step ``step`` (0-based), under the warm-up ``warmup``:

    - ``ramp``: ``min(decay, (1 + s) / (10 + s))``, so a short run's EMA is not mostly the random
      initialisation (0.1 at s=0, 0.5 at s=8, 0.99 at s=890);
    - ``power``: ``min(decay, 1 - (1 + s) ** (-2/3))``, ema-pytorch's as the official code uses it (no
      delay, every step): 0 at s=0, 0.999 only at s=31.6k, so at 0.9999 it averages over ~1.8k steps
      at the paper's epoch 800 (70k steps);
    - ``none``: ``decay`` from the first step.

    Range: [0, 1).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup == "none":
        return decay
    if warmup == "ramp":
        return min(decay, (1.0 + step) / (10.0 + step))
    if warmup == "power":
        return min(decay, 1.0 - (1.0 + step) ** -EMA_POWER)
    raise ValueError(f"ema_warmup: unknown {warmup!r} (ramp, power or none)")


def planned_steps(config: TrainConfig, train_images: int) -> int:
    """``config.steps`` if set, else enough steps to see ``epochs`` x ``train_images`` images, that count
    kept within [min_images, max_images]: the same rule means the same on 200 or 1M images."""
    if config.steps:
        return config.steps
    images = min(max(config.epochs * train_images, config.min_images), config.max_images)
    return max(1, -(-int(images) // config.batch_size))


def monitor_steps(total_steps: int, *, points: int, every: int = 0) -> frozenset[int]:
    """Optimizer steps (1-based counts) after which the probe monitor scores the network.

    ``every`` > 0: every ``every`` steps, and the last step; else ``points`` steps spread evenly
    (``ceil(total * k / points)``, k = 1..points, so the last step is always one). ``points`` 0 and
    ``every`` 0: none. A run shorter than ``points`` steps scores every step.
    """
    if total_steps < 1 or (points <= 0 and every <= 0):
        return frozenset()
    if every > 0:
        return frozenset([*range(every, total_steps + 1, every), total_steps])
    return frozenset(-(-total_steps * k // points) for k in range(1, points + 1))
