"""The one learning-rate schedule and the EMA ramp: values, and equality with the schedules it replaces."""

from __future__ import annotations

from ddae_core.schedules import lr_factor

BASE_LRS = (1e-3, 3e-4, 0.1, 1.0, 7.7e-5)
TOTALS = (1, 2, 7, 40, 100, 3000)


def test_lr_factor_equals_the_pretraining_warmup():
    from ddae_core.schedules import warmup_lr_factor

    for warmup in (0, 1, 2, 5, 10, 500, 1000):
        for step in range(0, 3 * max(warmup, 1) + 3):
            assert lr_factor(step, warmup_steps=warmup) == warmup_lr_factor(step, warmup)


def test_lr_factor_equals_the_finetune_schedule():
    from ddae_core.finetune import lr_factor as finetune_lr_factor

    for warmup in (0, 1, 2, 10, 50):
        for total in (*TOTALS, warmup, warmup + 1):
            for step in range(0, max(total, warmup) + 1):  # finetune steps run while step < total
                assert lr_factor(step, warmup_steps=warmup, total_steps=total) == finetune_lr_factor(step, warmup, total)


def test_lr_factor_equals_the_online_probe_cosine():
    from ddae_core.probe_online import cosine_lr

    for total in TOTALS:  # epochs x ceil(n / batch) >= 1; the history row reads step == total
        for base in BASE_LRS:
            for step in range(0, total + 1):
                assert base * lr_factor(step, warmup_steps=0, total_steps=total) == cosine_lr(step, total, base)
