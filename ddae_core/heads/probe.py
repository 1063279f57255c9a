"""Linear probe: standardised multinomial logistic regression, L2 strength chosen on validation.

The L2 path starts from a configured grid and extends past its ends while a candidate's validation
optimum sits there (the right strength grows as the labels get fewer), with a warning when it stays there.

Full-batch L-BFGS on cached features is deterministic and converges in seconds, unlike the paper's
15 epochs of Adam; the model is the same single linear layer on the pooled feature. Each candidate's
fits run preconditioned by the leading directions of its train covariance (``_Spectrum``). The fits run on
``device`` (standardisation stays on the CPU, in float64); probes come back as CPU numpy arrays.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddae_core.sampling import balanced_subset

logger = logging.getLogger(__name__)

_CHUNK = 16384  # rows per chunk when standardising or scoring, to bound temporary memory
STD_EPS = 1e-6  # a feature whose std is below this counts as constant

ArrayLike = np.ndarray | torch.Tensor


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    """A float32 CPU tensor view (or copy) of a 2-D array; rejects other ranks."""
    if isinstance(x, torch.Tensor):
        tensor = x.detach().cpu()
    else:
        array = np.asarray(x)
        tensor = torch.from_numpy(array if array.flags.writeable else array.astype(np.float32))
    if tensor.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(tensor.shape)}")
    return tensor.float()


def _as_labels(y: ArrayLike, num_classes: int, rows: int) -> torch.Tensor:
    """Labels as an int64 tensor (N,) checked against ``num_classes`` and the row count."""
    labels = y.detach().cpu().long() if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y, np.int64))
    if labels.shape != (rows,):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {rows} rows")
    if rows and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return labels


def unit_std(std: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """``std`` with 1 wherever it is below ``eps``: a near-constant feature is centred, not blown up."""
    return torch.where(std < eps, torch.ones_like(std), std)


@dataclass
class Standardizer:
    """Per-feature mean and std fitted on train; near-constant features (std < eps) keep std 1."""

    mean: np.ndarray  # (D,) float32
    std: np.ndarray  # (D,) float32, > 0

    @classmethod
    def fit(cls, x: ArrayLike, eps: float = STD_EPS) -> "Standardizer":
        """Fit on ``x`` (N, D), accumulating in float64 chunk by chunk for accuracy and memory."""
        data = _as_float_tensor(x)
        rows = data.shape[0]
        if rows == 0:
            raise ValueError("cannot standardise zero rows")
        total = torch.zeros(data.shape[1], dtype=torch.float64)
        for start in range(0, rows, _CHUNK):
            total += data[start : start + _CHUNK].double().sum(0)
        mean = total / rows  # (D,)
        squares = torch.zeros_like(mean)
        for start in range(0, rows, _CHUNK):
            squares += (data[start : start + _CHUNK].double() - mean).square().sum(0)
        std = unit_std((squares / rows).sqrt(), eps)
        return cls(mean=mean.float().numpy(), std=std.float().numpy())

    def transform(self, x: ArrayLike) -> torch.Tensor:
        """``(x - mean) / std`` as a new float32 tensor (N, D)."""
        data = _as_float_tensor(x)
        mean, std = torch.from_numpy(self.mean), torch.from_numpy(self.std)
        out = torch.empty(data.shape, dtype=torch.float32)
        for start in range(0, data.shape[0], _CHUNK):
            torch.div(data[start : start + _CHUNK] - mean, std, out=out[start : start + _CHUNK])
        return out


@dataclass
class LinearProbe:
    """Softmax classifier on standardised features: ``logits = ((x - mean) / std) @ weight.T + bias``."""

    weight: np.ndarray  # (K, D) float32
    bias: np.ndarray  # (K,) float32
    mean: np.ndarray  # (D,) float32
    std: np.ndarray  # (D,) float32

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def _logits(self, x: ArrayLike) -> torch.Tensor:
        data = _as_float_tensor(x)
        if data.shape[1] != self.weight.shape[1]:
            raise ValueError(f"probe expects {self.weight.shape[1]} features, got {data.shape[1]}")
        mean, std = torch.from_numpy(self.mean), torch.from_numpy(self.std)
        weight, bias = torch.from_numpy(self.weight), torch.from_numpy(self.bias)
        chunks = [((data[s : s + _CHUNK] - mean) / std) @ weight.T + bias for s in range(0, data.shape[0], _CHUNK)]
        return torch.cat(chunks) if chunks else torch.empty((0, self.num_classes))

    def logits(self, x: ArrayLike) -> np.ndarray:
        """Class scores, float32 (N, K)."""
        return self._logits(x).numpy()

    def predict_proba(self, x: ArrayLike) -> np.ndarray:
        """Class probabilities, float32 (N, K), rows sum to 1."""
        return torch.softmax(self._logits(x), dim=1).numpy()

    def predict(self, x: ArrayLike) -> np.ndarray:
        """Predicted class, int64 (N,)."""
        return self._logits(x).argmax(1).numpy()

    def accuracy(self, x: ArrayLike, y: ArrayLike) -> float:
        """Fraction of rows whose prediction equals ``y``."""
        labels = _as_labels(y, self.num_classes, _as_float_tensor(x).shape[0])
        return float((self._logits(x).argmax(1) == labels).double().mean()) if len(labels) else 0.0

    def state_dict(self) -> dict[str, np.ndarray]:
        """Plain float32 numpy arrays (safetensors/npz friendly, no pickle needed to load)."""
        return {name: np.ascontiguousarray(getattr(self, name), dtype=np.float32) for name in _FIELDS}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "LinearProbe":
        """Rebuild from ``state_dict()`` output (numpy arrays or tensors)."""
        missing = [name for name in _FIELDS if name not in state]
        if missing:
            raise KeyError(f"probe state lacks {missing}")
        arrays = {
            name: np.array(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
            for name, v in ((n, state[n]) for n in _FIELDS)
        }
        return cls(**arrays)


_FIELDS = ("weight", "bias", "mean", "std")


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for float32 matrices; on the CPU through numpy's BLAS (OpenBLAS): a fit's gradient
    product (10 classes against N x D features) ran 3.3x faster there than through torch's, the logits'
    a quarter slower, a whole evaluation 1.9x faster (5000 x 6144, AMD EPYC with AVX2; bench/probe_fit.py)."""
    if a.device.type != "cpu":
        return a @ b
    return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))


def _objective(xs: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               l2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy + l2/2 ||W||^2 of ``logits = xs W^T + b`` and its gradient, in closed form:
    (loss, dW (K, D), db (K,)); one pass for the logits, one for dW = ((softmax - onehot) / N)^T xs + l2 W."""
    logits = _matmul(xs, weight.T).add_(bias)  # (N, K)
    log_norm = torch.logsumexp(logits, 1, keepdim=True)
    loss = (log_norm - (logits * onehot).sum(1, keepdim=True)).mean() + 0.5 * l2 * weight.square().sum()
    residual = logits.sub_(log_norm).exp_().sub_(onehot).div_(max(len(xs), 1))  # d loss / d logits
    return loss, _matmul(residual.T, xs).add_(weight, alpha=l2), residual.sum(0)


SPECTRUM_RANK = 128  # leading covariance directions a fit preconditions one by one (5000 x 1024 and 5000 x 6144
# readouts: ranks 64, 128 and 256 reached the same objectives); the remaining ones share their mean eigenvalue
_MIN_CURVATURE = 1e-6  # floor of eigenvalue + l2, so a direction without variance or penalty keeps a finite scale


@dataclass
class _Spectrum:
    """The leading eigenvectors of standardised train features' covariance, to precondition a fit.

    Correlated features pile their variance into a few directions, and there the objective's curvature is
    hundreds of times that of the rest: L-BFGS crawls. A fit with this spectrum iterates on ``U`` with
    ``W = U P``, ``P = V diag(s) V^T + t (I - V V^T)``, ``s = (eigenvalue + l2)^-1/2`` on the leading
    directions and ``t = (mean remaining eigenvalue + l2)^-1/2`` on the rest: the same problem and optimum,
    the curvature evened out, and only (K, D) products added per evaluation. Half the iterations reach the
    plain fit's objective (docs/benchmarks.md).
    """

    vectors: torch.Tensor  # (D, k), orthonormal columns
    values: torch.Tensor  # (k,) their eigenvalues, >= 0
    tail: float  # mean eigenvalue over the other D - k directions (0 when k = D)

    @classmethod
    def of(cls, xs: torch.Tensor, rank: int = SPECTRUM_RANK, seed: int = 0) -> "_Spectrum":
        """The ``rank`` leading directions of ``xs`` (N, D): exact below ``rank`` + 16 features, else by
        randomised subspace iteration (a seeded start, two power steps; a few passes over ``xs``)."""
        rows, dim = xs.shape

        def covariance(basis: torch.Tensor) -> torch.Tensor:
            return _matmul(xs.T, _matmul(xs, basis)).div_(max(rows, 1))

        if dim <= rank + 16:
            values, vectors = torch.linalg.eigh(_matmul(xs.T, xs).div_(max(rows, 1)))
        else:
            start = torch.randn(dim, rank + 16, generator=torch.Generator().manual_seed(seed)).to(xs.device)
            basis = torch.linalg.qr(start).Q
            for _ in range(2):
                basis = torch.linalg.qr(covariance(basis)).Q
            values, rotation = torch.linalg.eigh(basis.T @ covariance(basis))
            values, vectors = values[-rank:], basis @ rotation[:, -rank:]
        values = values.clamp(min=0)
        trace = sum(float(xs[s : s + _CHUNK].square().sum()) for s in range(0, rows, _CHUNK)) / max(rows, 1)
        rest = dim - len(values)
        tail = max(trace - float(values.sum()), 0.0) / rest if rest else 0.0
        return cls(vectors=vectors, values=values, tail=tail)

    def precondition(self, l2: float) -> tuple[torch.Tensor, float]:
        """``P``'s factors at ``l2``: (eigenvalue + l2)^-1/2 on the leading directions, and on the rest."""
        return (self.values + l2).clamp(min=_MIN_CURVATURE).rsqrt(), max(self.tail + l2, _MIN_CURVATURE) ** -0.5

    def apply(self, rows: torch.Tensor, factors: tuple[torch.Tensor, float]) -> torch.Tensor:
        """``rows`` (M, D) times the symmetric map that multiplies the leading directions by ``factors[0]``
        and the rest by ``factors[1]``; ``(1 / lead, 1 / rest)`` inverts it. Torch's own products: for
        (10, 1024) rows and 128 directions one call took 0.2-0.35 ms, numpy's BLAS 0.8-1.0 ms (2 cores)."""
        lead, rest = factors
        return ((rows @ self.vectors).mul_(lead - rest) @ self.vectors.T).add_(rows, alpha=rest)


@contextmanager
def _blas_owns_the_cores(device: torch.device) -> Iterator[None]:
    """On the CPU, one torch thread while a fit runs (restored after): numpy's BLAS brings its own
    threads for the products, and torch's, spinning between the small ops, competed with them (58 against
    95 ms an evaluation, 5000 x 6144 features, 2 cores)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_standardized(
    xs: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    l2: float,
    max_iter: int,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    spectrum: _Spectrum | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on mean CE + l2/2 ||W||^2 for standardised ``xs`` (N, D) (``_objective``: its gradient in
    closed form); returns (W (K, D), b (K,)) on ``xs``'s device. With ``spectrum`` (``_Spectrum.of(xs)``)
    L-BFGS iterates on the preconditioned weights; the objective and the weights returned are the same."""
    if init is None:
        weight = torch.zeros((num_classes, xs.shape[1]), dtype=torch.float32, device=xs.device)
        bias = torch.zeros(num_classes, dtype=torch.float32, device=xs.device)
    else:
        weight, bias = init[0].detach().to(xs.device).clone(), init[1].detach().to(xs.device).clone()
    factors = None
    if spectrum is not None:  # iterate on U = W P^-1; W = U P, dU = dW P (P symmetric)
        factors = spectrum.precondition(l2)
        weight = spectrum.apply(weight, (1 / factors[0], 1 / factors[1]))
    onehot = F.one_hot(y, num_classes).float()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        if factors is None:
            loss, weight.grad, bias.grad = _objective(xs, onehot, weight, bias, l2)
        else:
            loss, grad, bias.grad = _objective(xs, onehot, spectrum.apply(weight, factors), bias, l2)
            weight.grad = spectrum.apply(grad, factors)
        return loss

    with torch.no_grad(), _blas_owns_the_cores(xs.device):
        optimizer.step(closure)
    weight.grad = bias.grad = None
    if factors is not None:
        weight = spectrum.apply(weight, factors)
    return weight, bias


def fit_logistic(
    x: ArrayLike,
    y: ArrayLike,
    *,
    num_classes: int,
    l2: float,
    max_iter: int = 100,
    init: LinearProbe | None = None,
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Fit a standardised softmax regression on ``x`` (N, D) float, ``y`` (N,) int in [0, K).

    Loss = mean cross-entropy + ``l2`` / 2 * ||W||^2 (bias unpenalised), weights in standardised
    units; full-batch L-BFGS with strong-Wolfe line search from zeros (or from ``init``, same D and K),
    on ``device``.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    data = _as_float_tensor(x)
    labels = _as_labels(y, num_classes, data.shape[0])
    scaler = Standardizer.fit(data)
    start = None if init is None else (torch.from_numpy(init.weight), torch.from_numpy(init.bias))
    xs = scaler.transform(data).to(device)
    weight, bias = _fit_standardized(xs, labels.to(device), num_classes=num_classes, l2=l2, max_iter=max_iter,
                                     init=start, spectrum=_Spectrum.of(xs))
    return LinearProbe(weight=weight.cpu().numpy(), bias=bias.cpu().numpy(), mean=scaler.mean, std=scaler.std)


def _correct(xs: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> int:
    """Number of rows of standardised ``xs`` classified correctly."""
    hits = 0
    for start in range(0, xs.shape[0], _CHUNK):
        logits = _matmul(xs[start : start + _CHUNK], weight.T).add_(bias)
        hits += int((logits.argmax(1) == y[start : start + _CHUNK]).sum())
    return hits


def _l2_steps(grid: Sequence[float]) -> tuple[float, float]:
    """Factors for one step below and one step above an ascending L2 grid: its end spacings, or 10."""
    down = grid[1] / grid[0] if len(grid) > 1 and grid[0] > 0 else 10.0
    up = grid[-1] / grid[-2] if len(grid) > 1 and grid[-2] > 0 else 10.0
    return down, up


def _round_l2(l2: float) -> float:
    """``l2`` to 6 significant digits, so a step of 10 from 1e-3 is 0.01, not 0.010000000000000002."""
    return float(f"{l2:.6g}")


@dataclass
class _Fit:
    """One fit on a candidate's L2 path: its strength, hits on train and validation, and its weights."""

    l2: float
    train_hits: int
    val_hits: int
    state: tuple[torch.Tensor, torch.Tensor]  # (W (K, D), b (K,)) in standardised units


def _best_fit(fits: Sequence[_Fit]) -> _Fit:
    """Most validation hits; a tie goes to the larger L2 (the simpler model)."""
    return max(fits, key=lambda f: (f.val_hits, f.l2))


def _l2_path(
    key: Hashable,
    xs_train: torch.Tensor,
    y_train: torch.Tensor,
    xs_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    num_classes: int,
    grid: Sequence[float],
    max_iter: int,
    l2_extend: int,
    l2_bounds: tuple[float, float],
    bar: tqdm,
) -> tuple[list[_Fit], bool]:
    """One candidate's fits along its L2 path, largest L2 first, and whether its best is at an edge.

    ``grid`` (ascending) first, largest first, each fit warm-started from the previous one; then, while
    the best fit is the largest (smallest) L2 tried, one step beyond it, warm-started from it. Only the
    first fit starts from zeros and runs ``max_iter`` iterations; a warm-started one starts near its
    optimum and runs half as many (on a 6144-feature readout of 54k images: the same validation accuracy
    to 0.1 pt at a quarter of the iterations).
    """
    floor, ceiling = l2_bounds
    step_down, step_up = _l2_steps(grid)
    fits: dict[float, _Fit] = {}
    spectrum = _Spectrum.of(xs_train)  # once per candidate, for every L2 on its path

    def fit(l2: float, init: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        iterations = max_iter if init is None else max(1, max_iter // 2)
        state = _fit_standardized(xs_train, y_train, num_classes=num_classes, l2=l2, max_iter=iterations,
                                   init=init, spectrum=spectrum)
        fits[l2] = _Fit(l2, _correct(xs_train, y_train, *state), _correct(xs_val, y_val, *state), state)
        logger.info("probe %s l2=%g train_acc=%.4f val_acc=%.4f", key, l2,
                    fits[l2].train_hits / max(len(y_train), 1), fits[l2].val_hits / max(len(y_val), 1))
        bar.update(1)
        return state

    state = None
    for l2 in reversed(grid):
        state = fit(l2, state)
    up = down = 0
    while True:
        chosen, low, high = _best_fit(list(fits.values())).l2, min(fits), max(fits)
        if chosen == high and 0 < high < ceiling and up < l2_extend:
            up += 1
            nearest, l2 = high, min(_round_l2(high * step_up), ceiling)
        elif chosen == low and low > floor and down < l2_extend:
            down += 1
            nearest, l2 = low, max(_round_l2(low / step_down), floor)
        else:
            break
        bar.total += 1
        bar.refresh()
        fit(l2, fits[nearest].state)
    at_edge = chosen == high or (chosen == low and low > 0)  # nothing lies below an L2 of 0
    if at_edge:
        logger.info("probe %s: best L2 %g is at the edge of the values tried (%g .. %g)", key, chosen, low, high)
    return sorted(fits.values(), key=lambda f: -f.l2), at_edge


def _search(
    candidates: Mapping[Hashable, tuple[ArrayLike, ArrayLike]],
    y_train: ArrayLike,
    y_val: ArrayLike,
    *,
    num_classes: int,
    l2_grid: Sequence[float],
    max_iter: int,
    l2_extend: int,
    l2_bounds: tuple[float, float],
    progress: bool,
    device: str | torch.device = "cpu",
) -> tuple[Hashable, float, LinearProbe, list[dict[str, Any]]]:
    """``select_probe`` without its edge warning (screening uses it: its choice is not the final one)."""
    if not candidates:
        raise ValueError("select_probe needs at least one candidate")
    if not l2_grid:
        raise ValueError("l2_grid is empty")
    if l2_extend < 0:
        raise ValueError(f"l2_extend must be >= 0, got {l2_extend}")
    if len(l2_bounds) != 2 or not 0 <= l2_bounds[0] <= l2_bounds[1]:
        raise ValueError(f"l2_bounds must be (floor, ceiling) with 0 <= floor <= ceiling, got {tuple(l2_bounds)}")
    bounds = (float(l2_bounds[0]), float(l2_bounds[1]))
    grid = sorted({float(l2) for l2 in l2_grid})
    table: list[dict[str, Any]] = []
    best: tuple[int, Hashable, float, LinearProbe] | None = None  # (val hits, key, l2, probe)
    with tqdm(total=len(candidates) * len(grid), disable=not progress, desc="probe", unit="fit") as bar:
        for key, (x_train, x_val) in candidates.items():
            train = _as_float_tensor(x_train)
            labels_train = _as_labels(y_train, num_classes, train.shape[0]).to(device)
            scaler = Standardizer.fit(train)
            xs_train = scaler.transform(train).to(device)
            xs_val = scaler.transform(x_val).to(device)
            if xs_val.shape[1] != xs_train.shape[1]:
                raise ValueError(f"{key}: train has {xs_train.shape[1]} features, val {xs_val.shape[1]}")
            labels_val = _as_labels(y_val, num_classes, xs_val.shape[0]).to(device)
            fits, at_edge = _l2_path(key, xs_train, labels_train, xs_val, labels_val, num_classes=num_classes,
                                     grid=grid, max_iter=max_iter, l2_extend=l2_extend, l2_bounds=bounds, bar=bar)
            table += [{"key": key, "l2": f.l2, "train_acc": f.train_hits / max(len(labels_train), 1),
                       "val_acc": f.val_hits / max(len(labels_val), 1), "l2_at_edge": at_edge} for f in fits]
            top = _best_fit(fits)
            if best is None or top.val_hits > best[0]:  # a tie keeps the candidate listed first
                probe = LinearProbe(weight=top.state[0].cpu().numpy().copy(), bias=top.state[1].cpu().numpy().copy(),
                                    mean=scaler.mean, std=scaler.std)
                best = (top.val_hits, key, top.l2, probe)
    assert best is not None
    return best[1], best[2], best[3], table


def _warn_if_at_edge(key: Hashable, l2: float, table: Sequence[Mapping[str, Any]], train_rows: int) -> None:
    """Log a warning when the chosen L2 has nothing tried beyond it on one side: the optimum may lie there."""
    rows = [row for row in table if row["key"] == key]
    if rows and rows[0]["l2_at_edge"]:
        tried = [row["l2"] for row in rows]
        logger.warning(
            "probe %s: the chosen L2 %g is at the edge of the values tried (%g .. %g, %d train rows); the "
            "validation optimum may lie beyond: widen probe.l2_grid or raise probe.l2_extend / probe.l2_bounds",
            key, l2, min(tried), max(tried), train_rows,
        )


def select_probe(
    candidates: Mapping[Hashable, tuple[ArrayLike, ArrayLike]],
    y_train: ArrayLike,
    y_val: ArrayLike,
    *,
    num_classes: int,
    l2_grid: Sequence[float],
    max_iter: int = 100,
    l2_extend: int = 0,
    l2_bounds: tuple[float, float] = (0.0, math.inf),
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Hashable, float, LinearProbe, list[dict[str, Any]]]:
    """Fit every (candidate, L2) on train, pick the best VALIDATION accuracy; test is left to the caller.

    ``candidates`` maps a key (e.g. (tap, level, pool)) to (X_train, X_val). Each candidate first fits
    ``l2_grid``, largest L2 first, each fit warm-started from the previous one (and running half of
    ``max_iter``: only the first starts from zeros). While its best L2 is
    the largest (or smallest) value tried, the path extends one step beyond (by the ratio of the grid's
    two values at that end, 10 for a one-value grid), warm-started from that neighbour, at most
    ``l2_extend`` steps a side and never past ``l2_bounds`` (floor, ceiling; a step past one is clamped
    to it). Only candidates whose best is at an end pay for extension. Ties in validation accuracy go
    to the candidate listed first, then to the larger L2: a tie at the top keeps extending upward (a
    flat curve says nothing against more L2), one at the bottom stops. Returns (key, l2, probe, rows of {key, l2,
    train_acc, val_acc, l2_at_edge}), a candidate's rows largest L2 first; ``l2_at_edge`` (the same on
    all of a candidate's rows) says its best L2 still has nothing tried beyond it on one side, and a
    warning names the chosen candidate when that is so. The fits run on ``device``.
    """
    key, l2, probe, table = _search(candidates, y_train, y_val, num_classes=num_classes, l2_grid=l2_grid,
                                    max_iter=max_iter, l2_extend=l2_extend, l2_bounds=l2_bounds, progress=progress,
                                    device=device)
    _warn_if_at_edge(key, l2, table, len(np.asarray(y_train)))
    return key, l2, probe, table


def screen_and_select(
    candidates: Mapping[Hashable, tuple[ArrayLike, ArrayLike]],
    y_train: ArrayLike,
    y_val: ArrayLike,
    *,
    num_classes: int,
    l2_grid: Sequence[float],
    max_iter: int = 100,
    l2_extend: int = 0,
    l2_bounds: tuple[float, float] = (0.0, math.inf),
    screen_size: int = 0,
    finalists: int = 2,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[Hashable, float, LinearProbe, list[dict[str, Any]]]:
    """Two-phase selection: every candidate on a ``screen_size`` train subset, the best few on all.

    Phase 1 ranks all candidates by their best validation accuracy along their L2 path (``select_probe``'s,
    extension included) using a class-balanced subset of train (``sampling.balanced_subset`` drawn from
    ``default_rng(seed)``); phase 2 refits the ``finalists`` best candidates on the full train split,
    each starting again from ``l2_grid`` (the optimum moves with the train size), and selects among
    them on validation. ``screen_size`` 0 (or >= the train size) is plain ``select_probe``. Rows carry
    ``phase`` ("screen" or "full"). Selection never looks at test. A train matrix may be any array-like
    that takes row indexing and ``np.asarray`` (features joined on demand): screening reads its subset's rows.
    """
    path = {"num_classes": num_classes, "l2_grid": l2_grid, "max_iter": max_iter, "l2_extend": l2_extend,
            "l2_bounds": l2_bounds, "progress": progress, "device": device}
    y_train = np.asarray(y_train)
    if screen_size <= 0 or screen_size >= len(y_train) or len(candidates) <= finalists:
        key, l2, probe, table = select_probe(candidates, y_train, y_val, **path)
        return key, l2, probe, [{**row, "phase": "full"} for row in table]
    subset = balanced_subset(y_train, screen_size, np.random.default_rng(seed))
    screened = {key: (x_train[subset], x_val) for key, (x_train, x_val) in candidates.items()}  # those rows only
    _key, _l2, _probe, screen_table = _search(screened, y_train[subset], y_val, **path)
    best_val: dict[Hashable, float] = {}
    for row in screen_table:  # first-listed candidate wins ties, as in select_probe
        best_val[row["key"]] = max(best_val.get(row["key"], -1.0), row["val_acc"])
    order = list(candidates)
    ranked = sorted(order, key=lambda k: (-best_val[k], order.index(k)))[:finalists]
    logger.info("probe screening on %d images kept %s", len(subset), ranked)
    key, l2, probe, full_table = select_probe({k: candidates[k] for k in ranked}, y_train, y_val, **path)
    rows = [{**row, "phase": "screen"} for row in screen_table] + [{**row, "phase": "full"} for row in full_table]
    return key, l2, probe, rows
