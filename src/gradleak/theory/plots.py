"""Figures of the theory lab (matplotlib, Agg backend, PNG): the phase diagram, recovery error against
the noise with its epsilon, and the attack's convergence against the gradient-descent bound."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradleak.errors import GradleakError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is installed with the project's extras
        raise GradleakError("the theory lab's plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def phase_diagram(
    panels: Sequence[tuple[str, Mapping[tuple[int, int], tuple[int, int, bool]]]],
    ns: Sequence[int],
    ds: Sequence[int],
    path: Path,
    *,
    tolerance: float,
) -> None:
    """One heat map per panel: success fraction over (d, n); cells are {(n, d): (successes, trials,
    full local rank)}; a cell whose Jacobian is rank-deficient is marked 'r'."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    image = None
    for ax, (title, cells) in zip(axes[0], panels, strict=True):
        grid = [[math.nan for _ in ds] for _ in ns]
        for i, n in enumerate(ns):
            for j, d in enumerate(ds):
                if (n, d) not in cells:
                    continue
                ok, trials, full = cells[(n, d)]
                grid[i][j] = ok / trials if trials else math.nan
                label = f"{ok}/{trials}" + ("" if full else "\nr")
                ax.text(j, i, label, ha="center", va="center", fontsize=8, color="black")
        image = ax.imshow(grid, origin="lower", cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(ds)), [str(d) for d in ds])
        ax.set_yticks(range(len(ns)), [str(n) for n in ns])
        ax.set_xlabel("width d")
        ax.set_ylabel("tokens n")
        ax.set_title(title, fontsize=9)
        # n = 2d: beyond it the Jacobian of the shared gradient cannot have full rank (n d > 2 d^2)
        xs, ys = [], []
        for j, d in enumerate(ds):
            below = [i for i, n in enumerate(ns) if n <= 2 * d]
            if below:
                xs += [j - 0.5, j + 0.5]
                ys += [max(below) + 0.5] * 2
        ax.plot(xs, ys, color="navy", lw=1.5, ls="--", label="n = 2d")
        ax.legend(loc="upper left", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label=f"fraction recovered (error < {tolerance:g})")
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def noise_plot(
    sigmas: Sequence[float],
    errors: Sequence[Sequence[float]],
    predicted: Sequence[float],
    epsilons: Sequence[float],
    path: Path,
    *,
    tolerance: float,
    clip: float,
    delta: float,
    title: str,
) -> None:
    """Relative error against sigma (median, min-max band, sigma = 0 as a dotted line), the
    linearised prediction, and epsilon of the Gaussian mechanism on a twin axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pos = [(s, e) for s, e in zip(sigmas, errors, strict=True) if s > 0]
    xs = [s for s, _ in pos]
    med = [_median(e) for _, e in pos]
    ax.fill_between(xs, [min(e) for _, e in pos], [max(e) for _, e in pos], color="C0", alpha=0.2)
    ax.plot(xs, med, "o-", color="C0", label="measured (median, min-max over seeds)")
    pred = [(s, p) for s, p in zip(sigmas, predicted, strict=True) if s > 0 and math.isfinite(p)]
    if pred:
        ax.plot(
            [s for s, _ in pred],
            [p for _, p in pred],
            "--",
            color="C2",
            label="linearised: sigma ||J+||/||X||",
        )
    zero = [e for s, e in zip(sigmas, errors, strict=True) if s == 0]
    if zero:
        ax.axhline(max(_median(zero[0]), 1e-16), color="C0", ls=":", lw=1, label="sigma = 0")
    ax.axhline(tolerance, color="grey", ls="-.", lw=1, label=f"success threshold {tolerance:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"noise std sigma on the gradient clipped to C = {clip:g}")
    ax.set_ylabel("relative error ||X' - X||_F / ||X||_F")
    ax.set_title(title, fontsize=9)
    twin = ax.twinx()
    eps = [(s, e) for s, e in zip(sigmas, epsilons, strict=True) if s > 0 and math.isfinite(e)]
    twin.plot([s for s, _ in eps], [e for _, e in eps], "s:", color="C3", ms=4)
    twin.set_yscale("log")
    twin.set_ylabel(f"epsilon at delta = {delta:g} (analytic Gaussian)", color="C3")
    twin.tick_params(axis="y", colors="C3")
    ax.legend(loc="upper left", fontsize=7)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def convergence_plot(curves: Mapping[str, Mapping[str, Sequence[float]]], path: Path, *, title: str) -> None:
    """Per optimiser: min ||grad f||^2 over the first T evaluations against 2 L f(x0) / T, and the best
    objective against T with the convex-case value bound L ||x0 - x*||^2 / 2T for reference."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, c) in enumerate(curves.items()):
        color = f"C{i}"
        left.plot(c["T"], c["min_grad_sq"], color=color, label=f"{name}: min ||grad f||^2")
        left.plot(c["T"], c["gd_gradient_bound"], color=color, ls="--", lw=1, label=f"{name}: 2 L f(x0) / T")
        right.plot(c["T"], c["best_objective"], color=color, label=name)
        right.plot(
            c["T"], c["gd_value_bound"], color=color, ls="--", lw=1, label=f"{name}: L |x0 - x*|^2 / 2T"
        )
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gradient evaluations T")
    left.set_ylabel("squared gradient norm")
    right.set_ylabel("best objective ||G(X') - G||^2 / ||G||^2")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])
