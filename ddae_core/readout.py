"""A readout: where a classifier reads the frozen denoiser, as one value every layer passes around.

Taps (concatenated in order), one noise level, a pooling grid, the seed that keys the feature
noise and the precision the network runs in: the extract stage writes single-tap readouts, the probe chooses one (``candidates``), and
``selection.json`` (``Selection``) carries it to fine-tuning and to the registered model. Taps are
always block names (``UNet.tap_names()``); selectors (``mid``, ``decoder``, ``dec1``, the paper's
``out_6``: ``nn.tap_selectors``) are expanded once, by ``resolve_taps``, before a readout is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ddae_core.config import ConfigError

FeatureKey = tuple[str, float, int]  # (block, level, pool): one pooled block at one level, as extract_batch keys it
TAP_SEPARATOR = "+"  # joins the taps of a concatenation in names and columns; never inside a block name
SELECTION_FILE = "selection.json"  # in a probe directory, beside probe.safetensors

_READOUT_KEYS = ("taps", "level", "pool", "seed")
FeaturePrecision = Literal["fp32", "bf16"]
FEATURE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


@dataclass(frozen=True)
class Readout:
    """Blocks (features concatenated in this order) read at one noise level (DDPM t / EDM sigma),
    pooled on a ``pool`` x ``pool`` grid (1 = global average), with noise keyed by ``seed``, the network
    run in ``precision`` (bf16: under autocast, as it trains)."""

    taps: tuple[str, ...]  # block names, never selectors; non-empty, none containing TAP_SEPARATOR
    level: float
    pool: int
    seed: int  # extract.seed: with the sample id and level it keys the noise, so it is part of the features
    precision: FeaturePrecision = "fp32"  # part of the features too: serving runs the network as extract did

    def __post_init__(self) -> None:
        if isinstance(self.taps, str):  # tuple("mid.res1") would silently give one tap per character
            raise ValueError(f"readout taps must be a sequence of block names, got the string {self.taps!r}")
        taps = tuple(self.taps)
        if not taps:
            raise ValueError("readout taps are empty: a readout reads at least one block")
        for tap in taps:
            if not isinstance(tap, str) or not tap or TAP_SEPARATOR in tap:
                raise ValueError(f"readout tap {tap!r}: expected a block name without {TAP_SEPARATOR!r} "
                                 f"(a concatenation lists its blocks as separate taps)")
        if int(self.pool) < 1:
            raise ValueError(f"readout pool must be >= 1, got {self.pool}")
        if self.precision not in FEATURE_PRECISIONS:
            raise ValueError(f"readout precision: expected one of {', '.join(FEATURE_PRECISIONS)}, got {self.precision!r}")
        object.__setattr__(self, "taps", taps)
        object.__setattr__(self, "level", float(self.level))
        object.__setattr__(self, "pool", int(self.pool))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def key(self) -> tuple[tuple[str, ...], float, int]:
        """(taps, level, pool): what tells two candidates of one feature store apart (they share the seed)."""
        return self.taps, self.level, self.pool

    @property
    def feature_keys(self) -> tuple[FeatureKey, ...]:
        """The (block, level, pool) features this readout concatenates, in order."""
        return tuple((tap, self.level, self.pool) for tap in self.taps)

    @property
    def members(self) -> tuple[Readout, ...]:
        """One single-tap readout per tap, in order: the units the feature store keeps."""
        return tuple(Readout((tap,), self.level, self.pool, self.seed, self.precision) for tap in self.taps)

    @property
    def tap_name(self) -> str:
        """The taps as one name, ``a+b`` for a concatenation (CSV, heatmap and embed columns)."""
        return TAP_SEPARATOR.join(self.taps)

    @property
    def label(self) -> str:
        """``tap@level/pN``: the one way a readout is named in tables, logs, metrics and tags."""
        return f"{self.tap_name}@{self.level:g}/p{self.pool}"

    def concat(self, blocks: Mapping[FeatureKey, Any]) -> Any:
        """The readout's (N, D) features from per-block (N, D_i) arrays or tensors keyed by ``FeatureKey``.

        The one concatenation rule: blocks in ``taps`` order along axis 1; a single block comes back
        as it is (no copy). numpy arrays give an array, torch tensors a tensor (autograd flows through).
        """
        missing = [key for key in self.feature_keys if key not in blocks]
        if missing:
            raise KeyError(f"readout {self.label}: no features for {missing}")
        parts = [blocks[key] for key in self.feature_keys]
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts, axis=1)
        import torch  # only when the caller already holds tensors

        return torch.cat(parts, dim=1)

    def to_json(self) -> dict[str, Any]:
        """The keys a readout is stored as (flat, so ``selection.json`` keeps its layout); ``precision`` only
        when not fp32, so files of fp32 readouts read and rewrite as they always have."""
        data: dict[str, Any] = {"taps": list(self.taps), "level": self.level, "pool": self.pool, "seed": self.seed}
        if self.precision != "fp32":
            data["precision"] = self.precision
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Readout:
        """The readout in a mapping holding ``to_json``'s keys; other keys are ignored. A file written
        before readouts had a precision was extracted in fp32."""
        _require(data, _READOUT_KEYS)
        return cls(data["taps"], data["level"], data["pool"], data["seed"], data.get("precision", "fp32"))


@dataclass(frozen=True)
class Selection:
    """What ``selection.json`` holds: the readout a head was trained on, plus that head's provenance.

    The probe stage writes one (with the chosen ``l2`` and its ``val_acc``), the finetune stage one
    for its head (``kind="finetune"``, no L2 or validation score); served models load either. In
    anomaly mode the probe stage writes ``kind="anomaly"``: no linear probe, ``class_names`` the normal
    classes (the novelty model's means, in order), ``test_auroc`` instead of ``test_acc``.
    """

    readout: Readout
    class_names: tuple[str, ...]  # class id -> name, the head's output order
    level_kind: str  # "t" (DDPM) or "sigma" (EDM): how to read readout.level
    test_acc: float | None  # of this head on the test split, as its stage measured it (None: anomaly)
    network_hash: str  # the network the head reads (for a fine-tuned head, the fine-tuned network)
    data_checksum: str  # the prepared data it was trained and scored on
    l2: float | None = None  # probe only: the L2 strength chosen on validation
    val_acc: float | None = None  # probe only
    kind: Literal["probe", "finetune", "anomaly"] = "probe"
    test_auroc: float | None = None  # anomaly only: the novelty score's AUROC on test

    def __post_init__(self) -> None:
        if self.kind not in ("probe", "finetune", "anomaly"):
            raise ValueError(f"selection kind: expected 'probe', 'finetune' or 'anomaly', got {self.kind!r}")
        if (self.test_acc is None) != (self.kind == "anomaly"):
            raise ValueError(f"selection test_acc: a {self.kind} head {'has none' if self.kind == 'anomaly' else 'needs one'}")
        if isinstance(self.class_names, str):
            raise ValueError(f"selection class_names must be a list of names, got the string {self.class_names!r}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        for name in ("test_acc", "l2", "val_acc", "test_auroc"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    def to_json(self) -> dict[str, Any]:
        """Flat keys, as the stages have always written them; ``None`` fields and ``kind="probe"`` left out."""
        data = {**self.readout.to_json(), "class_names": list(self.class_names), "level_kind": self.level_kind,
                "test_acc": self.test_acc, "network_hash": self.network_hash, "data_checksum": self.data_checksum}
        if self.test_acc is None:
            del data["test_acc"]
        data.update({name: getattr(self, name) for name in ("l2", "val_acc", "test_auroc")
                     if getattr(self, name) is not None})
        if self.kind != "probe":
            data["kind"] = self.kind
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Selection:
        """Either stage's ``selection.json`` content; unknown keys are ignored."""
        kind = data.get("kind", "probe")
        _require(data, ("class_names", "level_kind", "network_hash", "data_checksum")
                 + (() if kind == "anomaly" else ("test_acc",)))
        return cls(readout=Readout.from_json(data), class_names=data["class_names"],
                   level_kind=data["level_kind"], test_acc=data.get("test_acc"), network_hash=data["network_hash"],
                   data_checksum=data["data_checksum"], l2=data.get("l2"), val_acc=data.get("val_acc"),
                   kind=kind, test_auroc=data.get("test_auroc"))

    @classmethod
    def read(cls, directory: Path) -> Selection:
        """``directory/selection.json``; FileNotFoundError when absent, ValueError naming the file when bad."""
        path = Path(directory) / SELECTION_FILE
        text = path.read_text()
        try:
            return cls.from_json(json.loads(text))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None


def _require(data: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(map(repr, missing))}")


def resolve_taps(taps: Sequence[str], known: Sequence[str], selectors: Mapping[str, Sequence[str]],
                 key: str) -> tuple[str, ...]:
    """Block names for ``taps``: selectors (``mid``, ``decoder``, ``dec1``, ``out_6``) expanded to their
    blocks, block names kept, each block once in first-seen order; an unknown name fails by name."""
    resolved: list[str] = []
    for i, tap in enumerate(taps):
        blocks = tuple(selectors.get(tap, (tap,)))
        for name in blocks:
            if name not in known:
                raise ConfigError(
                    f"{key}[{i}]: unknown tap {tap!r}; this network's taps: {', '.join(known)}"
                    + (f"; selectors: {', '.join(selectors)}" if selectors else "")
                )
        resolved += [name for name in blocks if name not in resolved]
    return tuple(resolved)


def candidates(singles: Sequence[Readout], concat: Sequence[Sequence[str]],
               selectors: Mapping[str, Sequence[str]]) -> list[Readout]:
    """Every readout the probe compares: ``singles`` in their order, then each ``concat`` group
    (selectors expanded to blocks) at every level, then every pool, both ascending.

    This order decides ties in the probe's selection, so it is kept exactly as it has always been;
    a readout listed twice keeps its first place. A group member whose block was not extracted raises
    ConfigError naming the member and, for a selector, the block it stands for.
    """
    for single in singles:
        if len(single.taps) != 1:
            raise ValueError(f"candidates: {single.label} is not a single-tap readout")
    if len({single.seed for single in singles}) > 1:
        raise ValueError(f"candidates: single readouts of several seeds {sorted({s.seed for s in singles})}")
    if len({single.precision for single in singles}) > 1:
        raise ValueError(f"candidates: single readouts of several precisions {sorted({s.precision for s in singles})}")
    extracted = {single.key for single in singles}
    extracted_taps = list(dict.fromkeys(single.taps[0] for single in singles))
    levels = sorted({single.level for single in singles})
    pools = sorted({single.pool for single in singles})
    found = {single.key: single for single in singles}
    for g, group in enumerate(concat):
        blocks: list[str] = []
        for i, tap in enumerate(group):
            for block in selectors.get(tap, (tap,)):
                if block not in extracted_taps:
                    named = f"tap {tap!r}" + (f" (block {block!r})" if block != tap else "")
                    raise ConfigError(f"probe.concat[{g}][{i}]: {named} was not extracted; "
                                      f"extracted taps: {', '.join(extracted_taps)}")
                if block not in blocks:
                    blocks.append(block)
        for level in levels:
            for pool in pools:
                readout = Readout(tuple(blocks), level, pool, singles[0].seed,  # extracted taps: singles is not empty
                                  singles[0].precision)
                absent = [member.label for member in readout.members if member.key not in extracted]
                if absent:
                    raise ConfigError(f"probe.concat[{g}]: no extracted features for {', '.join(absent)}")
                found.setdefault(readout.key, readout)
    return list(found.values())
