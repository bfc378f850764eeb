"""`gradleak theory sweep`: where gradient matching recovers X from the attention layer's gradient.

Five parts, each a grid of `RecoverySpec`s over seeds:
- `phase`: success fraction over (n, d), L-BFGS from random starts (the attacker's real position);
- `local`: the same grid from a start 10% away from the truth, Levenberg-Marquardt (local recovery);
- `conditions`: one factor at a time around n = 4, d = 8 (target known or not, which weights' gradients
  are shared, weight norm, initial distance, optimiser);
- `noise`: error against sigma on the clipped gradient, with the linearised prediction and epsilon;
- `convergence`: one run per optimiser against the gradient-descent bound.
Writes `table.md`, `results.json` and the PNGs into the output folder.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from gradleak.errors import GradleakError
from gradleak.theory import plots
from gradleak.theory.convergence import bound_curves
from gradleak.theory.recover import RecoveryResult, RecoverySpec, recover
from gradleak.theory.share import check_noise, gaussian_epsilon

log = logging.getLogger(__name__)

PARTS = ("phase", "local", "conditions", "noise", "convergence")
SweepProgress = Callable[[int, int, str], None]  # (done, total, what)

BASE = RecoverySpec(n=4, d=8, known_target=True)
LOCAL = {"init_distance": 0.1, "optimizer": "lm", "iterations": 60, "restarts": 1}
CONDITIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("baseline: n=4, d=8, Y known, share qkv, norm 1, L-BFGS, random start", {}),
    ("Y unknown", {"known_target": False}),
    ("Y unknown, start 10% away, LM", {"known_target": False, **LOCAL}),
    ("share qk", {"share": "qk"}),
    ("share q", {"share": "q"}),
    ("share v", {"share": "v"}),
    ("share v, start 10% away, LM", {"share": "v", **LOCAL}),
    ("weight norm 0.1", {"weight_norm": 0.1}),
    ("weight norm 0.3", {"weight_norm": 0.3}),
    ("weight norm 3", {"weight_norm": 3.0}),
    ("weight norm 10", {"weight_norm": 10.0}),
    ("weight norm 0.1, start 10% away, LM", {"weight_norm": 0.1, **LOCAL}),
    ("weight norm 10, start 10% away, LM", {"weight_norm": 10.0, **LOCAL}),
    ("start 100% away", {"init_distance": 1.0}),
    ("start 10% away", {"init_distance": 0.1}),
    ("start 1% away", {"init_distance": 0.01}),
    ("optimiser Adam (lr 0.05, cosine decay)", {"optimizer": "adam"}),
    ("optimiser GD (backtracking on L)", {"optimizer": "gd"}),
    ("optimiser LM (60 Jacobians a restart)", {"optimizer": "lm", "iterations": 60}),
    ("n=12", {"n": 12}),
    ("n=12, start 10% away, LM", {"n": 12, **LOCAL}),
    ("n=16 (= 2d)", {"n": 16}),
    ("n=16 (= 2d), start 10% away, L-BFGS", {"n": 16, "init_distance": 0.1}),
    ("n=16 (= 2d), start 10% away, LM", {"n": 16, **LOCAL}),
    ("n=17 (> 2d), start 10% away, LM", {"n": 17, **LOCAL}),
)
SIGMAS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class SweepConfig:
    out: Path
    ns: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32)
    ds: tuple[int, ...] = (2, 4, 8, 16)
    seeds: int = 3
    sigmas: tuple[float, ...] = SIGMAS
    noise_seeds: int = 5
    clip: float = 1.0
    delta: float = 1e-5
    parts: tuple[str, ...] = PARTS
    convergence_iterations: int = 2000
    base: RecoverySpec = field(default=BASE)

    def validate(self) -> None:
        if not self.ns or not self.ds:
            raise GradleakError("the sweep needs at least one n and one d")
        for n in self.ns:
            if n < 1:
                raise GradleakError(f"n (tokens) must be at least 1, got {n}")
        for d in self.ds:
            if d < 1:
                raise GradleakError(f"d (width) must be at least 1, got {d}")
        if self.seeds < 1 or self.noise_seeds < 1:
            raise GradleakError("seeds must be at least 1")
        for s in self.sigmas:
            check_noise(s, self.clip, self.delta)
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise GradleakError(
                f"unknown sweep part {unknown[0] if unknown else ''!r}; choose from {', '.join(PARTS)}"
            )
        if self.convergence_iterations < 2:
            raise GradleakError("convergence iterations must be at least 2")
        self.base.validate()


@dataclass(frozen=True)
class Cell:
    """Runs of one spec over seeds."""

    part: str
    label: str
    results: tuple[RecoveryResult, ...]

    @property
    def spec(self) -> RecoverySpec:
        return self.results[0].spec

    @property
    def successes(self) -> int:
        return sum(r.success for r in self.results)

    @property
    def errors(self) -> list[float]:
        return [r.relative_error for r in self.results]

    @property
    def full_rank(self) -> bool | None:
        local = [r.identifiability for r in self.results if r.identifiability is not None]
        return all(li.full_rank for li in local) if local else None

    def summary(self) -> dict[str, Any]:
        local = [r.identifiability for r in self.results if r.identifiability is not None]
        its = [r.iterations for r in self.results if r.iterations is not None]
        return {
            "part": self.part,
            "label": self.label,
            "trials": len(self.results),
            "successes": self.successes,
            "median_error": statistics.median(self.errors),
            "median_objective": statistics.median(r.objective for r in self.results),
            "median_iterations": statistics.median(its) if its else None,
            "mean_seconds": statistics.fmean(r.seconds for r in self.results),
            "rank": min(li.rank for li in local) if local else None,
            "unknowns": local[0].unknowns if local else None,
            "noise_gain": statistics.median(li.noise_gain for li in local) if local else None,
        }


@dataclass
class SweepOutput:
    cells: list[Cell] = field(default_factory=list)
    convergence: dict[str, RecoveryResult] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _grid(cfg: SweepConfig) -> list[tuple[int, int]]:
    return [(n, d) for n in cfg.ns for d in cfg.ds]


def _plan(cfg: SweepConfig) -> list[tuple[str, str, RecoverySpec, int]]:
    """(part, label, spec, seeds) for every cell the chosen parts need."""
    base = cfg.base
    plan: list[tuple[str, str, RecoverySpec, int]] = []
    if "phase" in cfg.parts:
        plan += [
            ("phase", f"n={n}, d={d}", replace(base, n=n, d=d), cfg.seeds) for n in cfg.ns for d in cfg.ds
        ]
    if "local" in cfg.parts:
        plan += [
            ("local", f"n={n}, d={d}", replace(base, n=n, d=d, **LOCAL), cfg.seeds)
            for n in cfg.ns
            for d in cfg.ds
        ]
    if "conditions" in cfg.parts:
        plan += [("conditions", label, replace(base, **kw), cfg.seeds) for label, kw in CONDITIONS]
    if "noise" in cfg.parts:
        plan += [
            ("noise", f"sigma={s:g}", replace(base, sigma=s, clip=cfg.clip, delta=cfg.delta), cfg.noise_seeds)
            for s in cfg.sigmas
        ]
    return plan


def run_sweep(cfg: SweepConfig, progress: SweepProgress | None = None) -> SweepOutput:
    cfg.validate()
    cfg.out.mkdir(parents=True, exist_ok=True)
    plan = _plan(cfg)
    optimisers = ("lbfgs", "gd", "adam") if "convergence" in cfg.parts else ()
    total = sum(seeds for *_, seeds in plan) + len(optimisers)
    done = 0
    out = SweepOutput()
    for part, label, spec, seeds in plan:
        results = []
        for seed in range(seeds):
            results.append(recover(replace(spec, seed=seed)))
            done += 1
            if progress is not None:
                progress(done, total, f"{part}: {label}")
        cell = Cell(part, label, tuple(results))
        log.info("%s %s: %d/%d recovered", part, label, cell.successes, len(results))
        out.cells.append(cell)
    for name in optimisers:
        spec = replace(
            cfg.base, optimizer=name, restarts=1, iterations=cfg.convergence_iterations, init_distance=0.5
        )
        out.convergence[name] = recover(spec)
        done += 1
        if progress is not None:
            progress(done, total, f"convergence: {name}")
    out.files = write_outputs(cfg, out)
    return out


# ----------------------------------------------------------------- outputs


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "inf"
        return f"{x:.2g}" if (abs(x) < 1e-2 or abs(x) >= 1e4) and x != 0 else f"{x:.3g}"
    return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _cells_table(cells: Sequence[Cell]) -> str:
    rows = []
    for c in cells:
        s = c.summary()
        rank = "-" if s["rank"] is None else f"{s['rank']}/{s['unknowns']}"
        rows.append(
            [c.label, f"{s['successes']}/{s['trials']}", s["median_error"], s["median_objective"],
             s["median_iterations"], rank, s["noise_gain"], s["mean_seconds"]]
        )  # fmt: skip
    header = ["condition", "recovered", "median error", "median objective", "median iterations",
              "Jacobian rank", "noise gain", "s/run"]  # fmt: skip
    return _table(header, rows)


def _phase_cells(cells: Sequence[Cell], part: str) -> dict[tuple[int, int], tuple[int, int, bool]]:
    out = {}
    for c in cells:
        if c.part == part:
            out[(c.spec.n, c.spec.d)] = (c.successes, len(c.results), c.full_rank is not False)
    return out


def _part(out: SweepOutput, part: str) -> list[Cell]:
    return [c for c in out.cells if c.part == part]


def write_outputs(cfg: SweepConfig, out: SweepOutput) -> list[Path]:
    files: list[Path] = []
    tol = cfg.base.tolerance
    sections = [
        "# Theory lab sweep",
        f"Success: relative error < {tol:g}. Base spec: `{asdict(cfg.base)}`. Seeds 0..{cfg.seeds - 1} "
        f"(noise: 0..{cfg.noise_seeds - 1}). 'Jacobian rank' is the rank of d(shared gradient)/d(unknowns) "
        "at the truth over the number of unknowns (worst seed); 'noise gain' is ||J_X^+||_F / ||X||_F, the "
        "linearised relative error per unit of noise std; iterations are gradient evaluations (LM: "
        "Jacobians), summed over restarts until the error first fell below the threshold.",
    ]
    panels = []
    if "phase" in cfg.parts:
        panels.append(("random start, L-BFGS (8 x 300 evaluations)", _phase_cells(out.cells, "phase")))
        sections += [
            "## Phase diagram: random start, L-BFGS",
            _cells_table([c for c in out.cells if c.part == "phase"]),
        ]
    if "local" in cfg.parts:
        panels.append(("start 10% away from X, Levenberg-Marquardt", _phase_cells(out.cells, "local")))
        sections += [
            "## Phase diagram: start 10% away, LM",
            _cells_table([c for c in out.cells if c.part == "local"]),
        ]
    if panels:
        path = cfg.out / "phase_diagram.png"
        plots.phase_diagram(panels, cfg.ns, cfg.ds, path, tolerance=tol)
        files.append(path)
    if "conditions" in cfg.parts:
        sections += [
            "## Conditions (one factor at a time)",
            _cells_table([c for c in out.cells if c.part == "conditions"]),
        ]
    noise = [c for c in out.cells if c.part == "noise"]
    if noise:
        sigmas = [c.spec.sigma for c in noise]
        errors = [c.errors for c in noise]
        gains = [c.summary()["noise_gain"] for c in noise]
        predicted = [s * g if g is not None else math.nan for s, g in zip(sigmas, gains, strict=True)]
        eps = [gaussian_epsilon(s, cfg.clip, cfg.delta) for s in sigmas]
        path = cfg.out / "noise.png"
        plots.noise_plot(
            sigmas, errors, predicted, eps, path, tolerance=tol, clip=cfg.clip, delta=cfg.delta,
            title=f"n={cfg.base.n}, d={cfg.base.d}, Y known, gradient clipped to C={cfg.clip:g}, "
            f"{cfg.noise_seeds} seeds",
        )  # fmt: skip
        files.append(path)
        rows = [
            [
                s,
                f"{c.successes}/{len(c.results)}",
                statistics.median(c.errors),
                min(c.errors),
                max(c.errors),
                p,
                e,
            ]
            for s, c, p, e in zip(sigmas, noise, predicted, eps, strict=True)
        ]
        sections += [
            f"## Noise: error against sigma (clip C = {cfg.clip:g}, epsilon at delta = {cfg.delta:g})",
            _table(
                ["sigma", "recovered", "median error", "min", "max", "linearised prediction", "epsilon"], rows
            ),
        ]
    if out.convergence:
        curves = {name: bound_curves(r.trace) for name, r in out.convergence.items()}
        path = cfg.out / "convergence.png"
        plots.convergence_plot(
            curves, path,
            title=f"n={cfg.base.n}, d={cfg.base.d}, Y known, seed 0, start 50% away: measured against the "
            "GD guarantee with the L estimated along each run",
        )  # fmt: skip
        files.append(path)
        rows = []
        for name, r in out.convergence.items():
            c = r.convergence
            rows.append(
                [name, c.evaluations, c.smoothness, c.initial_objective, c.final_objective, c.min_grad_sq,
                 c.gd_gradient_bound, c.bound_violations, c.gd_value_bound, c.linear_rate, r.relative_error,
                 r.iterations]
            )  # fmt: skip
        sections += [
            "## Convergence against the gradient-descent bound (start 50% away, seed 0)",
            _table(
                [
                    "optimiser",
                    "T",
                    "L (max secant)",
                    "f(x0)",
                    "best f",
                    "min ‖∇f‖²",
                    "2 L f(x0) / T",
                    "T with min ‖∇f‖² above the bound",
                    "L ‖x0 - x*‖² / 2T",
                    "rate per eval",
                    "error",
                    "evaluations to 1e-3",
                ],  # fmt: skip
                rows,
            ),  # fmt: skip
        ]
    table = cfg.out / "table.md"
    table.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    files.append(table)
    payload = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "cells": [{**c.summary(), "errors": c.errors} for c in out.cells],
        "convergence": {k: r.to_json() for k, r in out.convergence.items()},
    }
    results = cfg.out / "results.json"
    results.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    files.append(results)
    return files


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot serialise {type(x).__name__}")
