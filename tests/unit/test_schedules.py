"""The one learning-rate schedule: warm-up, then constant (pretraining) or cosine (fine-tuning, online probe)."""

from __future__ import annotations

import math

import pytest
import torch

from ddae_core.training.schedules import lr_factor


def test_warmup_ramps_linearly_then_stays_at_one():
    """Pretraining (no total): (s + 1) / warmup, then the base lr for good."""
    assert [lr_factor(s, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, warmup_steps=0) == 1.0
    assert lr_factor(10**6, warmup_steps=5000) == 1.0


def test_warmup_then_cosine_decays_to_zero():
    """Fine-tuning: warm-up, then a half cosine over the remaining steps."""
    assert lr_factor(0, warmup_steps=4, total_steps=20) == pytest.approx(0.25)
    assert lr_factor(3, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert lr_factor(4, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert lr_factor(12, warmup_steps=4, total_steps=20) == pytest.approx(0.5)
    assert lr_factor(20, warmup_steps=4, total_steps=20) == pytest.approx(0.0, abs=1e-12)


def test_cosine_without_warmup():
    """The online probe: base lr x factor, from the base lr at step 0 towards 0 at the last step."""
    assert 1e-3 * lr_factor(0, warmup_steps=0, total_steps=10) == pytest.approx(1e-3)
    assert 1e-3 * lr_factor(5, warmup_steps=0, total_steps=10) == pytest.approx(5e-4)
    assert 1e-3 * lr_factor(10, warmup_steps=0, total_steps=10) == pytest.approx(0.0, abs=1e-12)


def test_cosine_is_the_half_cosine_and_holds_after_total():
    for warmup, total in ((0, 1), (0, 7), (3, 40), (10, 11), (50, 20)):
        span = max(total - warmup, 1)
        for step in range(warmup, total + 3):
            expected = 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
            assert lr_factor(step, warmup_steps=warmup, total_steps=total) == expected
        values = [lr_factor(s, warmup_steps=warmup, total_steps=total) for s in range(total + 3)]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))  # never rises after warm-up


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step"):
        lr_factor(-1, warmup_steps=3)


def test_lambda_lr_applies_the_factor_per_optimizer_step():
    """How training.py uses it: LambdaLR stepped once per optimizer step."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps=3))
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([2 / 3, 4 / 3, 2.0, 2.0, 2.0])
