"""Fine-tuning through the one feature path, on a tiny network and a separable toy problem."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ddae_core.config import FinetuneConfig
from ddae_core.features import extract_batch, live_features
from ddae_core.heads.finetune import ReadoutClassifier, accuracy, finetune, total_steps, zero_head
from ddae_core.heads.probe_online import ImageSet
from ddae_core.readout import Readout

from toy_images import brightness_split, random_tiny_denoiser

TAPS = ("mid.res1", "dec.8x8.res0")

@pytest.fixture(scope="module")
def denoiser() -> torch.nn.Module:
    return random_tiny_denoiser()


@pytest.fixture(scope="module")
def splits() -> tuple[ImageSet, ImageSet]:
    return brightness_split(48, 0, 1), brightness_split(30, 1000, 2)


def _model(denoiser, split: ImageSet) -> ReadoutClassifier:
    """A fresh copy of the network with a zero head standardised on ``split``'s features."""
    from ddae_core.data import to_model_input

    net = copy.deepcopy(denoiser)
    feats = extract_batch(net, to_model_input(split.images), split.sample_ids, taps=TAPS, levels=[11.0],
                          pools=[1], seed=3)
    head = zero_head(Readout(TAPS, 11.0, 1, 3).concat(feats), num_classes=3)
    return ReadoutClassifier(net, head, Readout(TAPS, 11.0, 1, 3))


def _config(**overrides) -> FinetuneConfig:
    values = dict(lr=3e-2, backbone_lr_scale=0.1, weight_decay=0.0, warmup_steps=2, epochs=4, batch_size=16,
                  eval_every=3, patience=10, max_steps=0, seed=0)
    return FinetuneConfig(**{**values, **overrides})


def test_readout_equals_cached_features_and_is_differentiable(denoiser, splits) -> None:
    from ddae_core.data import to_model_input

    train = splits[0]
    x0 = to_model_input(train.images[:6])
    chosen = Readout(TAPS, 11.0, 2, 3)
    cached = chosen.concat(extract_batch(denoiser, x0, train.sample_ids[:6], taps=TAPS, levels=[11.0],
                                         pools=[2], seed=3))
    net = copy.deepcopy(denoiser)
    live = live_features(net, x0, train.sample_ids[:6], chosen)
    np.testing.assert_allclose(live.detach().numpy(), cached, rtol=1e-5, atol=1e-6)
    live.square().sum().backward()
    first = next(net.unet.parameters())
    assert first.grad is not None and float(first.grad.abs().sum()) > 0


def test_zero_head_predicts_uniformly_with_the_features_statistics() -> None:
    """The head standardises with the float64 mean/std of its features (probe.Standardizer); the
    same float32 values numpy's float64 mean and std give, bit for bit on these features."""
    rng = np.random.default_rng(0)
    feats = (rng.normal(size=(1024, 256)) * rng.uniform(0.01, 10, 256) + rng.uniform(-5, 5, 256)).astype(np.float32)
    feats[:, 7] = 3.0  # constant: std 1
    head = zero_head(feats, num_classes=4)
    as64 = feats.astype(np.float64)
    np.testing.assert_array_equal(head.mean, as64.mean(0).astype(np.float32))
    np.testing.assert_array_equal(head.std, np.where(as64.std(0) < 1e-6, 1.0, as64.std(0)).astype(np.float32))
    assert head.std[7] == 1.0
    np.testing.assert_array_equal(head.predict_proba(feats[:5]), np.full((5, 4), 0.25, np.float32))


def test_total_steps_counts_epochs_and_caps_at_max_steps() -> None:
    assert total_steps(100, _config(epochs=3, batch_size=16)) == 3 * math.ceil(100 / 16)
    assert total_steps(100, _config(epochs=3, batch_size=16, max_steps=5)) == 5


def test_finetune_learns_keeps_best_state_and_moves_the_network(denoiser, splits) -> None:
    train, val = splits
    model = _model(denoiser, train)
    before = copy.deepcopy(model.denoiser.state_dict())
    result = finetune(model, train, np.arange(len(train.labels)), val, np.arange(len(val.labels)), _config(),
                      progress=False)
    assert result.steps == total_steps(len(train.labels), _config())
    assert result.val_acc > 0.6  # chance is 1/3; the zero head starts at chance
    assert accuracy(result.model, val) == pytest.approx(result.val_acc)  # the kept state is the best one
    moved = [name for name, value in result.model.denoiser.state_dict().items()
             if not torch.equal(value, before[name])]
    assert moved, "the network's weights should be fine-tuned too"


def test_backbone_lr_zero_freezes_network_and_runs_are_deterministic(denoiser, splits) -> None:
    train, val = splits
    config = _config(backbone_lr_scale=0.0, epochs=1)
    runs = [finetune(_model(denoiser, train), train, np.arange(24), val, np.arange(12), config, progress=False)
            for _ in range(2)]
    for name, value in runs[0].model.denoiser.state_dict().items():
        assert torch.equal(value, denoiser.state_dict()[name]), name
    assert torch.equal(runs[0].model.head.weight, runs[1].model.head.weight)


def test_finetuned_model_serves_as_network_plus_probe(denoiser, splits) -> None:
    """What the register stage logs: the fine-tuned network + ``to_probe()`` gives the model's predictions."""
    from ddae_core.classifier import Classifier
    from ddae_core.data import to_model_input

    train, val = splits
    result = finetune(_model(denoiser, train), train, np.arange(24), val, np.arange(12), _config(epochs=1),
                      progress=False)
    served = Classifier(denoiser=result.model.denoiser, probe=result.model.to_probe(),
                        readout=Readout(tuple(TAPS), 11.0, 1, seed=3), preprocess=None, class_names=["a", "b", "c"])  # type: ignore[arg-type]
    with torch.no_grad():
        logits = result.model(to_model_input(val.images), val.sample_ids).numpy()
    probs = served.probe.predict_proba(served.features(val.images, val.sample_ids))
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-5)
