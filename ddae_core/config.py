"""Typed, validated configuration: one frozen dataclass per ``params.yaml`` section.

Validation happens once, at the edge (``PipelineConfig.from_dict``); every error names the key, the
value and what was expected, so a bad ``params.yaml`` fails before any work starts. Each default is
params.yaml's value, and params.yaml lists every field (``tests/unit/test_defaults.py``): a key left out of
a params mapping means what the default run uses.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (tuples for sequences)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return section_from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def section_from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by name."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'top level'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{_join(prefix, unknown[0])}: unknown key (known keys: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(value, hints[name], _join(prefix, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(_join(prefix, str(err))) from None


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def as_dict(config: Any) -> dict:
    """Plain-dict view of a config dataclass (tuples become lists), for JSON and MLflow."""

    def convert(value: Any) -> Any:
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(dataclasses.asdict(config))


@dataclass(frozen=True)
class DataConfig:
    """Which images to prepare and how to split them."""

    dataset: Literal["fashion-mnist", "cifar10", "imagefolder"] = "fashion-mnist"
    source: str = ""  # folder/archive for imagefolder and a local CIFAR-10 copy; "" = default place
    image_size: int | Literal["auto"] = "auto"  # square working size; auto: the rule in data/shape.py
    channels: int | Literal["auto"] = "auto"  # 1 = grayscale, 3 = RGB; auto: 3 if the images hold colour
    max_image_size: int = 64  # auto never picks a larger size (bigger photos are resized once, at prepare)
    val_fraction: float = 0.1  # share of train carved out (class-stratified) for model selection
    test_fraction: float = 0.2  # imagefolder without train/ and test/ subfolders: share held out
    split_seed: int = 0
    on_corrupt: Literal["fail", "skip"] = "fail"  # unreadable images: stop, or skip and report
    max_train: int = 0  # 0 = all; else a class-balanced subset (quick runs, tests)
    max_test: int = 0  # 0 = all
    # anomaly detection (good parts only): the normal classes; train and val keep only them, test all
    # classes (the others are the anomalies). Empty: the classifier. Names are checked against the data at prepare.
    normal_classes: tuple[str, ...] = ()

    @property
    def anomaly(self) -> bool:
        """True in the one-class mode: ``normal_classes`` lists the classes that are normal."""
        return bool(self.normal_classes)

    def __post_init__(self) -> None:
        for i, name in enumerate(self.normal_classes):
            _require(bool(name), f"normal_classes[{i}]", "must be a class name, got an empty string")
        _require(len(set(self.normal_classes)) == len(self.normal_classes), "normal_classes",
                 f"repeats a class: {list(self.normal_classes)}")
        _require(self.image_size == "auto" or self.image_size >= 8, "image_size",
                 f"must be >= 8 or auto, got {self.image_size}")
        _require(self.channels in (1, 3, "auto"), "channels", f"must be 1, 3 or auto, got {self.channels}")
        _require(self.max_image_size >= 8, "max_image_size", f"must be >= 8, got {self.max_image_size}")
        _require(0.0 < self.val_fraction < 1.0, "val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _require(0.0 < self.test_fraction < 1.0, "test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _require(self.max_train >= 0, "max_train", f"must be >= 0, got {self.max_train}")
        _require(self.max_test >= 0, "max_test", f"must be >= 0, got {self.max_test}")


@dataclass(frozen=True)
class NetworkConfig:
    """A named network from ``ddae_core.nn.NETWORKS``; input shape comes from the data section."""

    name: str = "ddpm-cpu"
    dropout: float | None = None  # None = the named configuration's own dropout

    def __post_init__(self) -> None:
        if self.dropout is not None:
            _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion framework and its constants (paper defaults)."""

    framework: Literal["ddpm", "edm"] = "ddpm"
    timesteps: int = 1000  # DDPM T
    beta_start: float = 1e-4  # DDPM linear schedule
    beta_end: float = 0.02
    sigma_data: float = 0.5  # EDM
    p_mean: float = -1.2  # EDM: ln(sigma) ~ N(p_mean, p_std^2) in training
    p_std: float = 1.2
    noise_label: Literal["scaled", "fraction"] = "scaled"  # DDPM: the network reads 1000 t / T, or t / T (official)
    t_power: float = 2.0  # DDPM training t = ceil(T u^t_power): 1 = uniform (the paper's), >1 = small t

    def __post_init__(self) -> None:
        _require(self.noise_label == "scaled" or self.framework == "ddpm", "noise_label",
                 f"{self.noise_label!r} applies to framework 'ddpm' only (EDM's network reads ln(sigma)/4); "
                 "leave it at 'scaled'")
        _require(self.timesteps >= 2, "timesteps", f"must be >= 2, got {self.timesteps}")
        _require(0 < self.beta_start < self.beta_end < 1, "beta_end", "need 0 < beta_start < beta_end < 1")
        _require(self.sigma_data > 0, "sigma_data", f"must be > 0, got {self.sigma_data}")
        _require(self.p_std > 0, "p_std", f"must be > 0, got {self.p_std}")
        _require(math.isfinite(self.t_power) and self.t_power > 0, "t_power",
                 f"must be a finite number > 0, got {self.t_power}")


@dataclass(frozen=True)
class TrainConfig:
    """Pretraining loop settings; the defaults are the CPU run's (profiles/ hold the paper's)."""

    splits: tuple[str, ...] = ("train",)  # images it trains on; no labels are used, so val may join (the paper's)
    steps: int = 0  # optimizer steps in total; 0 = planned from epochs (``planned_steps``)
    epochs: float = 2.0  # passes over the train split, kept within [min_images, max_images] images seen
    min_images: int = 25600  # a small dataset still trains this many images (many epochs)
    max_images: int = 115200  # a large one stops here (the CPU budget; profiles set steps instead)
    batch_size: int = 128  # global batch (split over processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    grad_clip: float = 1.0  # max grad norm; 0 disables
    ema_decay: float = 0.999
    ema_warmup: Literal["ramp", "power", "none"] = "ramp"  # ramp: (1+s)/(10+s); power: the official 1-(1+s)^-2/3
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "auto"  # auto: bf16 where native (precision.py)
    hflip: bool = True  # random horizontal flip, as in the paper
    checkpoint_every: int = 100  # steps between resumable checkpoints
    keep_last: int = 2  # checkpoints kept on disk
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every", "min_images"):
            value = getattr(self, key)
            _require(value >= 1, key, f"must be >= 1, got {value}")
        _require("train" in self.splits and set(self.splits) <= {"train", "val"} and len(set(self.splits)) ==
                 len(self.splits), "splits", f"must be [train] or [train, val], got {list(self.splits)}")
        _require(self.steps >= 0, "steps", f"must be >= 0 (0 = planned from epochs), got {self.steps}")
        _require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        _require(self.max_images >= self.min_images, "max_images",
                 f"must be >= min_images ({self.min_images}), got {self.max_images}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _require(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class SampleConfig:
    """The sample grid drawn after pretraining."""

    count: int = 64  # images in the grid (0 disables)
    sampler: Literal["auto", "ddpm", "ddim", "edm"] = "auto"  # auto: the paper's (DDIM for DDPM, Heun for EDM)
    steps: int = 50  # DDIM steps (DDPM) or Heun steps (EDM); the ancestral ddpm sampler runs all T
    variance: Literal["small", "large"] = "small"  # ddpm sampler only: beta_tilde_t, or beta_t (the official)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.count >= 0, "count", f"must be >= 0, got {self.count}")
        _require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class InitConfig:
    """Where the network starts: from scratch, or a model trained elsewhere, used as it is or adapted."""

    mode: Literal["scratch", "import", "adapt"] = "scratch"  # import: no training; adapt: train on from it
    source: str = ""  # a folder (diffusers save_pretrained, a ddae network), a hub id, or models:/<name>/<version>
    convert: bool = True  # a diffusers UNet2DModel our UNet expresses exactly becomes ours; false: always wrapped

    def __post_init__(self) -> None:
        _require(self.mode == "scratch" or bool(self.source), "source",
                 f"mode {self.mode!r} needs a source: a folder, a Hugging Face hub id or a models:/ URI")
        _require(self.mode != "scratch" or not self.source, "mode",
                 f"is 'scratch' but source is {self.source!r}: set mode to import or adapt, or clear source")


@dataclass(frozen=True)
class MonitorConfig:
    """The probe monitor: the EMA network's linear and kNN validation accuracy at points during pretraining,
    and which checkpoint the run carries forward."""

    points: int = 8  # scorings spread evenly over the run, the last step one of them (0 and every 0: off)
    every: int = 0  # > 0: score every this many steps (and the last) instead
    train_images: int = 2000  # class-balanced train images the monitor's probe fits on (0 = all)
    val_images: int = 1000  # class-balanced validation images it is scored on (0 = all)
    select: bool = True  # carry forward the best-scoring step's EMA network; false: the last step's
    batch_size: int = 256  # images per forward pass while scoring

    def __post_init__(self) -> None:
        for key in ("points", "every", "train_images", "val_images"):
            value = getattr(self, key)
            _require(value >= 0, key, f"must be >= 0, got {value}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class PretrainConfig:
    """The pretrain stage: where the network starts, network, framework, loop and sample grid."""

    init: InitConfig = field(default_factory=InitConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        framework, sampler = self.diffusion.framework, self.samples.sampler
        _require(sampler in ("auto", "edm") if framework == "edm" else sampler != "edm", "samples.sampler",
                 f"{sampler!r} does not sample framework {framework!r} (ddpm and ddim: DDPM; edm: EDM; or auto)")
        _require(self.samples.variance == "small" or sampler == "ddpm", "samples.variance",
                 f"{self.samples.variance!r} is read by the ancestral sampler only (samples.sampler: ddpm), "
                 f"not {sampler!r}")


@dataclass(frozen=True)
class ExtractConfig:
    """Which (tap, noise level, pooling) features to cache, and how."""

    taps: tuple[str, ...] = ("mid", "decoder")  # selectors (nn.tap_selectors: mid, decoder, dec1, out_6) or blocks
    levels: tuple[float, ...] = (11.0,)  # DDPM: t in 1..T; EDM: sigma (see sigma_indices)
    sigma_indices: tuple[int, ...] = ()  # EDM only: the paper's step indices, converted to sigma
    pools: tuple[int, ...] = (1, 4)  # 1 = global average pooling (paper); k = k x k average pooling
    augment_copies: int = 0  # extra flipped/cropped copies of the train split
    batch_size: int = 256
    seed: int = 0
    part_rows: int = 4096  # rows per resumable Parquet part (a killed run redoes at most one per process)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # the network's precision while read; auto: bf16 where
    # the hardware computes it natively (about 2x faster), else fp32; recorded with the features and served alike

    def __post_init__(self) -> None:
        _require(len(self.taps) > 0, "taps", "list at least one tap")
        _require(len(self.levels) + len(self.sigma_indices) > 0, "levels", "list at least one level")
        for i, level in enumerate(self.levels):
            _require(level > 0, f"levels[{i}]", f"must be > 0, got {level}")
        for i, pool in enumerate(self.pools):
            _require(pool >= 1, f"pools[{i}]", f"must be >= 1, got {pool}")
        _require(len(self.pools) > 0, "pools", "list at least one pooling size")
        _require(self.augment_copies >= 0, "augment_copies", f"must be >= 0, got {self.augment_copies}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.part_rows >= 1, "part_rows", f"must be >= 1, got {self.part_rows}")


@dataclass(frozen=True)
class ProbeConfig:
    """Linear probe grid: candidates are single (tap, level, pool) and the listed concatenations."""

    l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3)  # L2 strengths tried first; chosen on validation
    l2_extend: int = 4  # max extra L2 steps past each end of l2_grid while the optimum sits there (0 = off)
    l2_bounds: tuple[float, ...] = (1e-8, 10.0)  # (floor, ceiling) extension never passes
    max_iter: int = 100  # L-BFGS iterations per fit (preconditioned: 100 reach the plain fit's 200)
    screen_train: int = 5000  # >0: rank all candidates on this many train images first (two-phase search)
    finalists: int = 1  # candidates refitted on the full train split after screening
    concat: tuple[tuple[str, ...], ...] = (("mid", "dec1"), ("mid", "decoder"))  # tap groups, concatenated
    raw_pixels: bool = True  # also probe raw pixels through the same code (the floor)
    online: bool = False  # also run the official online protocol on the chosen readout (slow)
    online_epochs: int = 15  # official: 15 epochs of Adam, cosine per epoch, flip/zero-padded crop + fresh noise
    online_lr: float = 4e-3  # effective: official 1e-3 per GPU x 4 GPUs (the same for any process count here)
    online_batch_size: int = 512  # effective (global): official 128 per GPU x 4 GPUs
    anomaly_recall: float = 0.95  # data.normal_classes set: report the false-alarm rate at this recall of anomalies

    def __post_init__(self) -> None:
        _require(0.0 < self.anomaly_recall <= 1.0, "anomaly_recall", f"must be in (0, 1], got {self.anomaly_recall}")
        _require(self.online_epochs >= 1, "online_epochs", f"must be >= 1, got {self.online_epochs}")
        _require(self.online_lr > 0, "online_lr", f"must be > 0, got {self.online_lr}")
        _require(self.online_batch_size >= 1, "online_batch_size", f"must be >= 1, got {self.online_batch_size}")
        _require(len(self.l2_grid) > 0, "l2_grid", "list at least one value")
        for i, l2 in enumerate(self.l2_grid):
            _require(l2 >= 0, f"l2_grid[{i}]", f"must be >= 0, got {l2}")
        _require(self.l2_extend >= 0, "l2_extend", f"must be >= 0, got {self.l2_extend}")
        _require(len(self.l2_bounds) == 2 and 0 <= self.l2_bounds[0] <= self.l2_bounds[1], "l2_bounds",
                 f"must be [floor, ceiling] with 0 <= floor <= ceiling, got {list(self.l2_bounds)}")
        _require(self.max_iter >= 1, "max_iter", f"must be >= 1, got {self.max_iter}")
        _require(self.screen_train >= 0, "screen_train", f"must be >= 0, got {self.screen_train}")
        _require(self.finalists >= 1, "finalists", f"must be >= 1, got {self.finalists}")


@dataclass(frozen=True)
class RegisterConfig:
    """Model registry: name and the champion gate."""

    model_name: str = "ddae-classifier"
    # challenger must beat champion's test accuracy by more than this: a difference of accuracies, so
    # in [-1, 1] (negative accepts a loss up to that much; -1 promotes any challenger, 1 none)
    min_improvement: float = 0.0

    def __post_init__(self) -> None:
        _require(bool(self.model_name), "model_name", "must not be empty")
        _require(-1.0 <= self.min_improvement <= 1.0, "min_improvement",
                 f"must be in [-1, 1] (a difference of accuracies), got {self.min_improvement}")


@dataclass(frozen=True)
class LabelEfficiencyConfig:
    """Probe (and fine-tune) on class-balanced, seeded, nested fractions of the train labels."""

    fractions: tuple[float, ...] = (0.01, 0.1, 1.0)  # shares of the train labels; 1.0 reuses the probe stage
    seed: int = 0  # which rows each fraction keeps (the same rows for every model compared)
    raw_pixels: bool = True  # raw pixels through the same probe at the same label counts

    def __post_init__(self) -> None:
        _require(len(self.fractions) > 0, "fractions", "list at least one fraction")
        for i, fraction in enumerate(self.fractions):
            _require(0.0 < fraction <= 1.0, f"fractions[{i}]", f"must be in (0, 1], got {fraction}")
        _require(len(set(self.fractions)) == len(self.fractions), "fractions", f"repeats a value: {list(self.fractions)}")


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Alignment/uniformity of two augmented views and a kNN probe, per tap and noise level."""

    pairs: int = 256  # train images whose two augmented views are compared (0 disables alignment/uniformity)
    pool: int = 1  # pooling grid of the per-tap features studied (1 = global average, the paper)
    knn_k: int = 20  # neighbours voting in the kNN probe
    knn_temperature: float = 0.07  # votes weigh exp(cosine similarity / temperature)
    knn_queries: int = 2000  # test images the kNN probe classifies (class-balanced; 0 = all)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.pairs == 0 or self.pairs >= 2, "pairs", f"must be 0 or >= 2, got {self.pairs}")
        _require(self.pool >= 1, "pool", f"must be >= 1, got {self.pool}")
        _require(self.knn_k >= 1, "knn_k", f"must be >= 1, got {self.knn_k}")
        _require(self.knn_temperature > 0, "knn_temperature", f"must be > 0, got {self.knn_temperature}")
        _require(self.knn_queries >= 0, "knn_queries", f"must be >= 0, got {self.knn_queries}")


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end fine-tuning of the network up to the probe's readout, plus a from-scratch baseline."""

    enabled: bool = False  # off in the CPU profile: the stage then only records that it did not run
    scratch: bool = True  # also train the same architecture from random weights (the baseline)
    lr: float = 1e-3  # head learning rate (AdamW)
    backbone_lr_scale: float = 0.1  # the network's learning rate is lr x this
    weight_decay: float = 0.05
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 0
    epochs: int = 10  # passes over the labelled subset ...
    max_steps: int = 40  # ... capped at this many optimizer steps per model (0 = no cap)
    batch_size: int = 64
    eval_every: int = 20  # steps between validation checks (early stopping keeps the best)
    patience: int = 3  # validation checks without improvement before stopping
    val_max: int = 500  # validation images used for early stopping (0 = all)
    test_max: int = 2000  # test images scored once at the end (0 = all)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.backbone_lr_scale >= 0, "backbone_lr_scale", f"must be >= 0, got {self.backbone_lr_scale}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for key in ("warmup_steps", "max_steps", "val_max", "test_max"):
            value = getattr(self, key)
            _require(value >= 0, key, f"must be >= 0, got {value}")
        for key in ("epochs", "batch_size", "eval_every", "patience"):
            value = getattr(self, key)
            _require(value >= 1, key, f"must be >= 1, got {value}")


@dataclass(frozen=True)
class PredictConfig:
    """Batch inference and human review of uncertain predictions (``ddae predict``, the probe's curve)."""

    review_threshold: float = 0.5  # a prediction with confidence below this is flagged needs_review
    target_accuracy: float = 0.95  # the probe suggests the threshold whose accepted predictions reach this
    batch_size: int = 256  # images per model call in ddae predict / ddae embed
    novelty_false_alarm: float = 0.05  # share of known (validation) images the novelty threshold flags

    def __post_init__(self) -> None:
        _require(0.0 <= self.review_threshold <= 1.0, "review_threshold",
                 f"must be in [0, 1], got {self.review_threshold}")
        _require(0.0 < self.target_accuracy <= 1.0, "target_accuracy",
                 f"must be in (0, 1], got {self.target_accuracy}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        _require(0.0 < self.novelty_false_alarm < 1.0, "novelty_false_alarm",
                 f"must be in (0, 1), got {self.novelty_false_alarm}")


@dataclass(frozen=True)
class LaunchConfig:
    """How pretrain and extract start: one process, or ``accelerate launch`` over ``processes``.

    Not a DVC param of any stage: their results do not depend on the process count, so changing it
    reruns nothing.
    """

    processes: int = 1  # 1: python -m tasks.<stage>; N > 1: accelerate launch --multi_gpu --num_processes N
    args: str = ""  # more accelerate launch arguments (multi-node: "--num_machines 2 --machine_rank 0 ...")

    def __post_init__(self) -> None:
        _require(self.processes >= 1, "processes", f"must be >= 1, got {self.processes}")
        try:
            shlex.split(self.args)
        except ValueError as err:
            raise ConfigError(f"args: {self.args!r} does not split into arguments ({err})") from None

    def arguments(self) -> list[str]:
        """``args`` split as a shell would."""
        return shlex.split(self.args)


@dataclass(frozen=True)
class PipelineConfig:
    """All of ``params.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    label_efficiency: LabelEfficiencyConfig = field(default_factory=LabelEfficiencyConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @classmethod
    def from_dict(cls, data: Any, source: str = "params.yaml") -> "PipelineConfig":
        """Validate a parsed params mapping; errors read ``params.yaml: pretrain.train.lr: ...``."""
        try:
            return section_from_dict(cls, data, "")
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
