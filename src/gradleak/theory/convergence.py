"""The attack's convergence against first-order theory, from the trace of one run (pure maths).

For an L-smooth f bounded below by f* (here f* >= 0: the objective is a squared distance), gradient
descent with step 1/L guarantees after T gradient evaluations

    min_{k<T} ||grad f(x_k)||^2 <= 2 L (f(x_0) - f*) / T                  (nonconvex; e.g. Nesterov 2004)

and, were f also convex, f(x_T) - f* <= L ||x_0 - x*||^2 / (2T). The smoothness constant L is
estimated along the run as the largest secant ratio ||grad f(a) - grad f(b)|| / ||a - b|| over
successive evaluations: a lower bound on the true L on the region visited, so the bounds below are,
if anything, tighter than the true guarantees."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Trace:
    """Per gradient evaluation of one restart: the objective, ||grad f||^2, the secant ratio with the
    previous evaluation (nan for the first), and the aligned relative recovery error."""

    objective: tuple[float, ...]
    grad_sq: tuple[float, ...]
    secant: tuple[float, ...]
    error: tuple[float, ...]
    start_distance: float  # ||z_0 - z*||, aligned to the truth

    def __len__(self) -> int:
        return len(self.objective)


@dataclass(frozen=True)
class ConvergenceReport:
    evaluations: int
    smoothness: float  # estimated L: max secant ratio along the run
    initial_objective: float
    final_objective: float  # best objective seen
    min_grad_sq: float
    gd_gradient_bound: float  # 2 L f(x0) / T
    gd_value_bound: float  # L ||x0 - x*||^2 / (2T) (convex case, for reference)
    linear_rate: float | None  # fitted per-evaluation contraction of the best objective (< 1 is linear)
    within_gradient_bound: bool  # at the end of the run
    bound_violations: int  # prefixes T at which min_{k<T} ||grad f||^2 exceeded 2 L f(x0) / T

    def to_json(self) -> dict[str, float | int | bool | None]:
        return {k: _finite(v) for k, v in self.__dict__.items()}


def _finite(v: float | int | bool | None) -> float | int | bool | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def running_min(values: Sequence[float]) -> list[float]:
    out: list[float] = []
    best = math.inf
    for v in values:
        best = min(best, v)
        out.append(best)
    return out


def smoothness(trace: Trace) -> float:
    finite = [s for s in trace.secant if math.isfinite(s)]
    return max(finite) if finite else math.nan


def gd_gradient_bound(L: float, f0: float, T: int) -> float:
    return 2.0 * L * f0 / T


def gd_value_bound(L: float, distance: float, T: int) -> float:
    return L * distance**2 / (2.0 * T)


def linear_rate(objective: Sequence[float], floor: float = 1e-28) -> float | None:
    """Least-squares slope of log(best objective) against the evaluation index, over the stretch
    before the objective reaches `floor` (machine precision); exp(slope) is the per-evaluation factor."""
    best = [v for v in running_min(objective) if v > floor]
    if len(best) < 3 or best[0] <= 0:
        return None
    xs = list(range(len(best)))
    ys = [math.log(v) for v in best]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var
    return math.exp(slope)


def analyse(trace: Trace) -> ConvergenceReport:
    T = len(trace)
    L = smoothness(trace)
    f0 = trace.objective[0]
    gbound = gd_gradient_bound(L, f0, T)
    min_g = min(trace.grad_sq)
    running = running_min(trace.grad_sq)
    violations = sum(m > gd_gradient_bound(L, f0, t) for t, m in enumerate(running, start=1))
    return ConvergenceReport(
        evaluations=T,
        smoothness=L,
        initial_objective=f0,
        final_objective=min(trace.objective),
        min_grad_sq=min_g,
        gd_gradient_bound=gbound,
        gd_value_bound=gd_value_bound(L, trace.start_distance, T),
        linear_rate=linear_rate(trace.objective),
        within_gradient_bound=bool(min_g <= gbound) if math.isfinite(gbound) else False,
        bound_violations=int(violations) if math.isfinite(L) else T,
    )


def bound_curves(trace: Trace) -> dict[str, list[float]]:
    """For plots: per T = 1..len, the measured min ||grad||^2 and best objective, and the two bounds
    with the run's L."""
    L = smoothness(trace)
    f0 = trace.objective[0]
    T = range(1, len(trace) + 1)
    return {
        "T": [float(t) for t in T],
        "min_grad_sq": running_min(trace.grad_sq),
        "best_objective": running_min(trace.objective),
        "gd_gradient_bound": [gd_gradient_bound(L, f0, t) for t in T],
        "gd_value_bound": [gd_value_bound(L, trace.start_distance, t) for t in T],
    }
