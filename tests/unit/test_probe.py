"""Linear probe: standardised softmax regression and validation-only L2 selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddae_core.heads.probe import LinearProbe, Standardizer, fit_logistic, select_probe


def _blobs(n: int, dim: int, classes: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around random centres, float32 (n, dim) and int64 labels (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 4
    y = rng.integers(0, classes, size=n)
    x = centres[y] + spread * rng.normal(size=(n, dim))
    return x.astype(np.float32), y.astype(np.int64)


def test_separable_blobs_are_classified() -> None:
    x, y = _blobs(600, 8, 4, spread=0.5, seed=0)
    x[:, 0] = x[:, 0] * 1000 + 5000  # wildly scaled column: standardisation handles it
    probe = fit_logistic(x, y, num_classes=4, l2=1e-3, max_iter=100)
    assert probe.accuracy(x, y) == 1.0
    proba = probe.predict_proba(x[:5])
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert probe.predict(x).dtype == np.int64
    assert probe.weight.shape == (4, 8) and probe.bias.shape == (4,)


def test_standardisation_invariance() -> None:
    x, y = _blobs(300, 6, 3, spread=2.0, seed=1)
    base = fit_logistic(x, y, num_classes=3, l2=1e-2, max_iter=100)
    scaled = x.copy()
    scaled[:, 2] *= 37.0
    scaled[:, 4] = scaled[:, 4] * 0.01 + 3.0
    other = fit_logistic(scaled, y, num_classes=3, l2=1e-2, max_iter=100)
    np.testing.assert_array_equal(other.predict(scaled), base.predict(x))
    np.testing.assert_allclose(other.logits(scaled), base.logits(x), rtol=1e-3, atol=1e-3)


def test_constant_feature_is_harmless() -> None:
    x, y = _blobs(200, 4, 2, spread=0.5, seed=2)
    x[:, 3] = 7.0
    scaler = Standardizer.fit(x)
    assert scaler.std[3] == 1.0
    assert torch.all(scaler.transform(x)[:, 3] == 0)
    probe = fit_logistic(x, y, num_classes=2, l2=1e-3, max_iter=50)
    assert np.isfinite(probe.weight).all() and probe.accuracy(x, y) > 0.95


def test_larger_l2_shrinks_weights() -> None:
    x, y = _blobs(400, 10, 3, spread=3.0, seed=3)
    norms = [np.linalg.norm(fit_logistic(x, y, num_classes=3, l2=l2, max_iter=100).weight) for l2 in (1e-3, 1e-1, 10.0)]
    assert norms[0] > norms[1] > norms[2] > 0


def test_fit_is_deterministic_and_validates_inputs() -> None:
    x, y = _blobs(200, 5, 3, spread=2.0, seed=4)
    a = fit_logistic(x, y, num_classes=3, l2=1e-2, max_iter=50)
    b = fit_logistic(x, y, num_classes=3, l2=1e-2, max_iter=50)
    np.testing.assert_array_equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="labels"):
        fit_logistic(x, y + 3, num_classes=3, l2=1e-2)
    with pytest.raises(ValueError, match="features"):
        a.predict(x[:, :4])


def test_state_dict_round_trip(tmp_path) -> None:
    x, y = _blobs(200, 5, 3, spread=2.0, seed=5)
    probe = fit_logistic(x, y, num_classes=3, l2=1e-2, max_iter=50)
    state = probe.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    np.savez(tmp_path / "probe.npz", **state)
    with np.load(tmp_path / "probe.npz", allow_pickle=False) as stored:
        loaded = LinearProbe.from_state_dict(dict(stored))
    np.testing.assert_array_equal(loaded.logits(x), probe.logits(x))
    from_tensors = LinearProbe.from_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    np.testing.assert_array_equal(from_tensors.predict(x), probe.predict(x))
    with pytest.raises(KeyError, match="std"):
        LinearProbe.from_state_dict({k: v for k, v in state.items() if k != "std"})


def test_select_probe_chooses_on_validation_not_train() -> None:
    # "memorise": pure noise features, separable on train by sheer dimension, useless on val.
    # "signal": one informative feature with label noise: lower train accuracy, better val accuracy.
    rng = np.random.default_rng(6)
    n_train, n_val = 60, 200
    y_train = rng.integers(0, 2, n_train)
    y_val = rng.integers(0, 2, n_val)

    def signal(labels: np.ndarray) -> np.ndarray:
        return (labels * 2.0 - 1.0 + rng.normal(scale=1.0, size=len(labels)))[:, None].astype(np.float32)

    memorise = (rng.normal(size=(n_train, 200)).astype(np.float32), rng.normal(size=(n_val, 200)).astype(np.float32))
    candidates = {"memorise": memorise, "signal": (signal(y_train), signal(y_val))}
    key, l2, probe, table = select_probe(
        candidates, y_train, y_val, num_classes=2, l2_grid=(1e-4, 1e-2), max_iter=100, progress=False
    )
    rows = {(r["key"], r["l2"]): r for r in table}
    assert len(table) == 4 and set(table[0]) == {"key", "l2", "train_acc", "val_acc", "l2_at_edge"}
    best_train = max(table, key=lambda r: r["train_acc"])
    assert best_train["key"] == "memorise" and best_train["train_acc"] == 1.0
    assert key == "signal"
    assert rows[(key, l2)]["val_acc"] == max(r["val_acc"] for r in table)
    assert probe.weight.shape == (2, 1)
    assert probe.accuracy(candidates["signal"][1], y_val) == rows[(key, l2)]["val_acc"]


def test_select_probe_ties_go_to_first_candidate_then_larger_l2() -> None:
    x, y = _blobs(120, 4, 3, spread=0.3, seed=7)  # every fit is perfect: all rows tie
    candidates = {"b": (x, x), "a": (x.copy(), x.copy())}
    key, l2, _probe, table = select_probe(
        candidates, y, y, num_classes=3, l2_grid=(1e-3, 1e-1, 1e-2), max_iter=50, progress=False
    )
    assert all(r["val_acc"] == 1.0 for r in table)
    assert (key, l2) == ("b", 1e-1)
    assert [r["l2"] for r in table[:3]] == [1e-1, 1e-2, 1e-3]


def test_warm_start_reaches_the_same_solution() -> None:
    x, y = _blobs(300, 6, 3, spread=3.0, seed=8)
    cold = fit_logistic(x, y, num_classes=3, l2=1e-1, max_iter=200)
    warm_from = fit_logistic(x, y, num_classes=3, l2=1.0, max_iter=200)
    warm = fit_logistic(x, y, num_classes=3, l2=1e-1, max_iter=200, init=warm_from)
    np.testing.assert_allclose(warm.weight, cold.weight, rtol=1e-3, atol=1e-3)


def _textbook(xs, y, weight, bias, l2):
    """The probe's objective as written: mean cross-entropy of xs W^T + b, plus l2/2 ||W||^2."""
    return torch.nn.functional.cross_entropy(xs @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum()


def test_the_closed_form_gradient_is_autograds_on_the_textbook_objective() -> None:
    from ddae_core.heads.probe import _objective

    gen = torch.Generator().manual_seed(0)
    xs, y = torch.randn(300, 40, generator=gen), torch.randint(0, 5, (300,), generator=gen)
    weight = torch.randn(5, 40, generator=gen).requires_grad_(True)
    bias = torch.randn(5, generator=gen).requires_grad_(True)
    expected = _textbook(xs, y, weight, bias, 0.3)
    expected.backward()
    with torch.no_grad():
        loss, grad_w, grad_b = _objective(xs, torch.nn.functional.one_hot(y, 5).float(), weight, bias, 0.3)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w, weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_b, bias.grad, rtol=1e-4, atol=1e-6)


def test_a_fit_ends_at_the_textbook_optimum_and_gives_torch_its_threads_back() -> None:
    x, y = _blobs(400, 12, 4, spread=4.0, seed=9)
    threads = torch.get_num_threads()
    probe = fit_logistic(x, y, num_classes=4, l2=1e-2, max_iter=200)
    assert torch.get_num_threads() == threads
    xs = (torch.from_numpy(x) - torch.from_numpy(probe.mean)) / torch.from_numpy(probe.std)
    weight = torch.from_numpy(probe.weight).requires_grad_(True)
    bias = torch.from_numpy(probe.bias).requires_grad_(True)
    _textbook(xs, torch.from_numpy(y), weight, bias, 1e-2).backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4  # stationary: the optimum


def _correlated(rows: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised features driven by 3 shared factors (a few large covariance directions) and labels."""
    gen = torch.Generator().manual_seed(seed)
    factors = torch.randn(rows, 3, generator=gen)
    x = factors @ torch.randn(3, dim, generator=gen) * 3 + torch.randn(rows, dim, generator=gen)
    x = (x - x.mean(0)) / x.std(0)
    return x, (factors[:, 0] > 0).long() + (factors[:, 1] > 0).long()


@pytest.mark.parametrize("rank", [64, 4])  # exact (D <= rank + 16) and randomised leading directions
def test_the_spectrum_leads_with_the_covariances_top_directions_and_its_map_inverts(rank) -> None:
    from ddae_core.heads.probe import _Spectrum

    xs, _y = _correlated(400, 40, seed=4)
    spectrum = _Spectrum.of(xs, rank=rank)
    top = torch.linalg.eigvalsh(xs.T @ xs / len(xs)).flip(0)
    k = min(rank, 40)
    torch.testing.assert_close(spectrum.values.flip(0), top[:k], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(spectrum.vectors.T @ spectrum.vectors, torch.eye(k), rtol=0, atol=1e-4)
    assert spectrum.tail == pytest.approx(float(top[k:].mean()) if k < 40 else 0.0, rel=1e-3, abs=1e-6)
    factors = spectrum.precondition(1e-2)
    vectors = spectrum.vectors
    explicit = vectors @ torch.diag(factors[0]) @ vectors.T + factors[1] * (torch.eye(40) - vectors @ vectors.T)
    rows = torch.randn(5, 40, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(spectrum.apply(rows, factors), rows @ explicit, rtol=1e-4, atol=1e-4)
    back = spectrum.apply(spectrum.apply(rows, factors), (1 / factors[0], 1 / factors[1]))
    torch.testing.assert_close(back, rows, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [64, 4])
def test_a_preconditioned_fit_ends_at_the_textbook_optimum_in_the_features_units(rank) -> None:
    from ddae_core.heads.probe import _fit_standardized, _Spectrum

    xs, y = _correlated(400, 40, seed=6)
    plain = _textbook(xs, y, *_fit_standardized(xs, y, num_classes=3, l2=1e-2, max_iter=500), 1e-2)
    weight, bias = _fit_standardized(xs, y, num_classes=3, l2=1e-2, max_iter=200, spectrum=_Spectrum.of(xs, rank=rank))
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    loss = _textbook(xs, y, weight, bias, 1e-2)
    loss.backward()
    assert float(loss) == pytest.approx(float(plain), rel=1e-5)  # float32 resolves the loss to about 1e-7
    assert weight.grad.abs().max() < 5e-4 and bias.grad.abs().max() < 5e-4  # stationary: the optimum


def test_preconditioning_reaches_the_plain_fits_objective_in_fewer_iterations() -> None:
    from ddae_core.heads.probe import _fit_standardized, _Spectrum

    xs, y = _correlated(600, 60, seed=7)
    optimum = _fit_standardized(xs, y, num_classes=3, l2=1e-3, max_iter=500)
    plain = _fit_standardized(xs, y, num_classes=3, l2=1e-3, max_iter=15)
    preconditioned = _fit_standardized(xs, y, num_classes=3, l2=1e-3, max_iter=15, spectrum=_Spectrum.of(xs, rank=8))
    gap = [float(_textbook(xs, y, *fit, 1e-3) - _textbook(xs, y, *optimum, 1e-3)) for fit in (plain, preconditioned)]
    assert gap[1] < gap[0] / 2, gap


def test_the_fits_products_through_numpy_equal_torchs_on_transposed_views() -> None:
    from ddae_core.heads.probe import _matmul

    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 30, generator=gen), torch.randn(7, 30, generator=gen)
    torch.testing.assert_close(_matmul(a, b.T), a @ b.T)
    torch.testing.assert_close(_matmul(a.T, a[:, :7]), a.T @ a[:, :7])


def test_only_the_paths_first_fit_starts_cold_the_warm_ones_run_half_the_iterations(monkeypatch) -> None:
    import ddae_core.heads.probe as probe_module

    calls = []
    real = probe_module._fit_standardized

    def spy(*args, max_iter, init=None, **kwargs):
        calls.append((init is None, max_iter))
        return real(*args, max_iter=max_iter, init=init, **kwargs)

    monkeypatch.setattr(probe_module, "_fit_standardized", spy)
    x, y = _blobs(200, 5, 3, spread=3.0, seed=2)
    select_probe({"x": (x[:150], x[150:])}, y[:150], y[150:], num_classes=3, l2_grid=(1e-3, 1e-2, 1e-1),
                 max_iter=60, progress=False)
    assert calls == [(True, 60), (False, 30), (False, 30)]


def test_screening_keeps_the_informative_candidate_and_refits_it_on_all_data():
    from ddae_core.heads.probe import screen_and_select

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 3
    y, y_val = np.repeat(np.arange(3), 200), np.repeat(np.arange(3), 60)
    good = (centres[y] + rng.normal(size=(len(y), 6))).astype(np.float32)
    good_val = (centres[y_val] + rng.normal(size=(len(y_val), 6))).astype(np.float32)
    noise = rng.normal(size=(len(y), 6)).astype(np.float32)
    noise_val = rng.normal(size=(len(y_val), 6)).astype(np.float32)
    candidates = {"noise_a": (noise, noise_val), "good": (good, good_val), "noise_b": (noise * 2, noise_val * 2)}
    key, _l2, probe, rows = screen_and_select(candidates, y, y_val, num_classes=3, l2_grid=[1e-3, 1e-2],
                                              max_iter=50, screen_size=60, finalists=1, progress=False)
    assert key == "good"
    assert {r["key"] for r in rows if r["phase"] == "full"} == {"good"}
    assert {r["key"] for r in rows if r["phase"] == "screen"} == set(candidates)
    assert probe.accuracy(good_val, y_val) > 0.9


def _few_labels(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """150 train rows in 100 dims, weak dense signal, 80/70 classes; 1000 balanced validation rows.

    Few labels per dimension: small L2 overfits and validation accuracy climbs with L2 up to ~1; far
    larger L2 shrinks the weights until the train prior (the bias) decides, and accuracy falls to 50%.
    """
    rng = np.random.default_rng(seed)
    centres = 0.1 * rng.normal(size=(2, 100))

    def draw(counts: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(2), counts)
        return (centres[y] + rng.normal(size=(len(y), 100))).astype(np.float32), y

    return draw((80, 70)), draw((500, 500))


OLD_GRID = (1e-5, 1e-4, 1e-3)


def _search(seed: int, **path):
    from ddae_core.heads.probe import select_probe

    (x, y), (x_val, y_val) = _few_labels(seed)
    return select_probe({"few": (x, x_val)}, y, y_val, num_classes=2, max_iter=100, progress=False,
                        **{"l2_grid": OLD_GRID, **path})


@pytest.mark.parametrize("seed", [0, 2])
def test_the_path_extends_past_a_grid_whose_best_is_its_edge_until_the_optimum_is_interior(seed) -> None:
    _key, old_l2, _probe, old = _search(seed)  # the fixed grid: the old behaviour
    assert len(old) == len(OLD_GRID) and old_l2 == max(OLD_GRID) and old[0]["l2_at_edge"]
    _key, l2, probe, table = _search(seed, l2_extend=4, l2_bounds=(1e-8, 10.0))  # 1e-3 -> 10 at most
    tried = [r["l2"] for r in table]
    assert tried == sorted(tried, reverse=True) and set(OLD_GRID) < set(tried)
    assert min(tried) < l2 < max(tried) and l2 >= 1e-1
    assert not any(r["l2_at_edge"] for r in table)
    rows = {r["l2"]: r["val_acc"] for r in table}
    assert rows[l2] == max(rows.values()) > rows[max(OLD_GRID)]
    assert max(tried) / l2 == pytest.approx(10)  # one step past the optimum, then it stopped
    (_x, _y), (x_val, y_val) = _few_labels(seed)
    assert probe.accuracy(x_val, y_val) == rows[l2]  # the returned probe is the chosen fit


def test_an_interior_optimum_fits_exactly_the_grid(caplog) -> None:
    grid = (1e-1, 1.0, 10.0)
    with caplog.at_level("INFO", logger="ddae_core.heads.probe"):
        _key, l2, _probe, table = _search(0, l2_grid=grid, l2_extend=3, l2_bounds=(1e-8, 100.0))
    assert [r["l2"] for r in table] == sorted(grid, reverse=True)  # three fits, nothing added
    assert l2 == 1.0 and not table[0]["l2_at_edge"]
    assert "edge" not in caplog.text


def test_a_choice_held_at_the_bound_is_flagged_and_warned(caplog) -> None:
    with caplog.at_level("WARNING", logger="ddae_core.heads.probe"):
        _key, l2, _probe, table = _search(0, l2_extend=5, l2_bounds=(1e-8, 0.05))
    assert [r["l2"] for r in table][:2] == [0.05, 0.01]  # 1e-2, then clamped to the ceiling, then stopped
    assert l2 == 0.05 and all(r["l2_at_edge"] for r in table)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "few" in warnings[0].getMessage() and "0.05" in warnings[0].getMessage()
    assert "1e-05 .. 0.05" in warnings[0].getMessage()


def test_the_extension_step_is_the_grids_end_ratio_and_each_side_is_capped() -> None:
    # (1e-4, 1e-2) steps by its end ratio, 100: 1 comes next, and l2_extend=1 ends the path there, at its edge
    _key, l2, _probe, table = _search(0, l2_grid=(1e-4, 1e-2), l2_extend=1)
    assert [r["l2"] for r in table] == [1.0, 1e-2, 1e-4] and l2 == 1.0 and table[0]["l2_at_edge"]


def test_an_optimum_below_the_grid_extends_downwards() -> None:
    _key, l2, _probe, table = _search(0, l2_grid=(10.0, 100.0), l2_extend=3)
    tried = [r["l2"] for r in table]
    assert tried == [100.0, 10.0, 1.0, 0.1] and l2 == 1.0 and not table[0]["l2_at_edge"]


def test_screening_extends_the_screen_and_the_final_refit() -> None:
    from ddae_core.heads.probe import screen_and_select

    (x, y), (x_val, y_val) = _few_labels(0)
    noise, noise_val = np.zeros_like(x), np.zeros_like(x_val)
    candidates = {"flat": (noise, noise_val), "few": (x, x_val)}  # zeros: the bias alone, 50% on validation
    grid = (1e-2, 1e-1)  # below 1e-2, 100 screening rows are separable and validation is flat within noise
    key, l2, _probe, rows = screen_and_select(candidates, y, y_val, num_classes=2, l2_grid=grid, max_iter=100,
                                              l2_extend=5, l2_bounds=(1e-8, 100.0), screen_size=100, finalists=1,
                                              progress=False)
    screen = [r for r in rows if r["phase"] == "screen" and r["key"] == "few"]
    full = [r for r in rows if r["phase"] == "full"]
    assert len(screen) > len(grid) and len(full) > len(grid)
    assert key == "few" and {r["key"] for r in full} == {"few"}
    assert l2 >= 1e-1 and not full[0]["l2_at_edge"]
