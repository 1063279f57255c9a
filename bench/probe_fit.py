"""One probe fit's objective, in the probe stage's closed form against the textbook form, on the same features.

The textbook form is the L-BFGS fit on ``F.cross_entropy`` through autograd, with torch's BLAS and threads
(what ``ddae_core.heads.probe`` ran before its gradient went closed form through numpy's BLAS). The stage
also preconditions each fit (``_Spectrum``): half the iterations, and two (K, D) products more per
evaluation; both forms here run unpreconditioned, so their objectives can be compared. Both run
the same L-BFGS settings for the same iterations on the same standardised features, alternating A/B
round by round after one untimed round; the script prints milliseconds per objective evaluation
(medians) and both final objectives, which should agree to a few digits.

    python bench/probe_fit.py                       # 5000 x 6144: the screening of a 4x4 seven-tap readout
    python bench/probe_fit.py --rows 54000 --dim 2048 --iterations 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ddae_core.heads.probe import _fit_standardized


def textbook_fit(xs: torch.Tensor, y: torch.Tensor, classes: int, l2: float,
                 iterations: int) -> tuple[torch.Tensor, ...]:
    """L-BFGS on mean cross-entropy + l2/2 ||W||^2 through autograd: the form the closed one replaced."""
    weight = torch.zeros(classes, xs.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, history_size=20, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(torch.addmm(bias, xs, weight.T), y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def objective(xs: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float) -> float:
    """The fitted objective, computed the textbook way for both forms."""
    return float(F.cross_entropy(xs @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum())


def count_evaluations(fit, *args) -> tuple[float, int, tuple[torch.Tensor, ...]]:
    """Seconds, objective evaluations (L-BFGS's closure calls) and the result of one fit."""
    calls = 0
    real_step = torch.optim.LBFGS.step

    def counting_step(self, closure):
        def counted():
            nonlocal calls
            calls += 1
            return closure()
        return real_step(self, counted)

    torch.optim.LBFGS.step = counting_step
    try:
        started = time.perf_counter()
        result = fit(*args)
        return time.perf_counter() - started, calls, result
    finally:
        torch.optim.LBFGS.step = real_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=6144)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(args.rows, args.dim, generator=gen)
    centres = torch.randn(args.classes, args.dim, generator=gen) * 0.02
    y = (xs @ centres.T + 3 * torch.randn(args.rows, args.classes, generator=gen)).argmax(1)  # overlapping classes
    forms = {
        "textbook (autograd, torch BLAS)": lambda: textbook_fit(xs, y, args.classes, args.l2, args.iterations),
        "ddae (closed form, numpy BLAS)": lambda: _fit_standardized(xs, y, num_classes=args.classes, l2=args.l2,
                                                                    max_iter=args.iterations),
    }
    per_eval: dict[str, list[float]] = {name: [] for name in forms}
    final: dict[str, float] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms both up, untimed
        for name, fit in forms.items():
            seconds, calls, (weight, bias) = count_evaluations(fit)
            if round_index:
                per_eval[name].append(1e3 * seconds / max(calls, 1))
            final[name] = objective(xs, y, weight, bias, args.l2)
    print(f"{args.rows} x {args.dim} features, {args.classes} classes, {args.iterations} L-BFGS iterations, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} alternating rounds")
    for name in forms:
        print(f"  {name:32s} {statistics.median(per_eval[name]):7.1f} ms per evaluation (median), "
              f"final objective {final[name]:.6f}")
    textbook, ours = (statistics.median(per_eval[name]) for name in forms)
    print(f"  textbook / ddae: {textbook / ours:.2f}x")


if __name__ == "__main__":
    main()
