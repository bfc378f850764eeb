"""Where the leak stops: the weakest setting of a defence at which an attack no longer leaks.

A defence chain has one *strength* the scan moves (`Knob`): the noise multiplier of DP-SGD or of
noise after a clip, the absolute sigma (Gaussian) or scale (Laplace) of noise on an unclipped update,
or the fraction of pruned coordinates. Everything else in the chain stays as given.

The scan (`scan`) is a coarse grid, then bisection:

1. the grid's points, weakest first (decades of the noise; 0.1, 0.5, 0.9, 0.99, 0.999 of pruning),
   until the first point at which leakage stops; if that is the grid's first point, noise grids
   step further down a decade at a time (up to `extend` decades) to find a setting that still leaks,
   and when even the lowest stops it, the scan tries strength 0: if the chain stops the leak without
   noise (DP-SGD's per-example clipping can), the threshold is 0 and the noise is not what stops it;
2. `bisect` steps between the last setting that leaked and the first that did not, halving their
   distance on the grid's axis (log of the noise; -log10(1 - fraction) of pruning).

The threshold is the weakest setting seen to stop the leak. Leakage need not be monotone in the
noise (the noise is one random draw); the scan assumes it is and says so in its notes only through
the runs it lists. "Leaks" means ROUGE-1 >= the leak threshold (default 20) or at least one sentence
recovered exactly (`LeakCriterion`). Pure logic: the runs are made by the `evaluate` callable.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradleak.errors import GradleakError

DEFAULT_LEAK_ROUGE = 20.0
DEFAULT_BISECT = 3
DEFAULT_EXTEND = 3
ROUND_DIGITS = 3  # strengths are rounded to 3 significant digits (stable spec strings and store keys)


@dataclass(frozen=True)
class LeakCriterion:
    """An attack leaks when ROUGE-1 >= `rouge1` or any sentence is recovered exactly."""

    rouge1: float = DEFAULT_LEAK_ROUGE

    def __post_init__(self) -> None:
        if not (0 < self.rouge1 <= 100):
            raise GradleakError(f"the leak threshold is a ROUGE-1 level in (0, 100], got {self.rouge1}")

    def leaks(self, rouge1: float, exact_match: float) -> bool:
        return rouge1 >= self.rouge1 or exact_match > 0

    def describe(self) -> str:
        return f"ROUGE-1 < {self.rouge1:g} and no sentence exact"


@dataclass(frozen=True)
class Family:
    key: str  # the defence's parameter
    label: str  # in words, for the verdict
    grid: tuple[float, ...]  # weakest first
    log: bool  # axis: log10(value) (noise) or -log10(1 - value) (pruning)
    extend: bool  # whether the grid steps further down when its first point already stops the leak

    def to_axis(self, value: float) -> float:
        return math.log10(value) if self.log else -math.log10(1 - value)

    def from_axis(self, u: float) -> float:
        return _round(10**u if self.log else 1 - 10 ** (-u))


NOISE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
SIGMA_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
PRUNE_GRID = (0.1, 0.5, 0.9, 0.99, 0.999)


def _round(x: float) -> float:
    return float(f"{x:.{ROUND_DIGITS}g}")


@dataclass(frozen=True)
class Knob:
    """The strength of one defence in a chain, and the chain at any other strength."""

    chain: tuple[str, ...]
    index: int  # which defence of the chain
    family: Family
    value: float  # the strength the chain has as given

    @property
    def label(self) -> str:
        return self.family.label

    def at(self, value: float) -> tuple[str, ...]:
        from gradleak.defenses import parse_defense

        d = parse_defense(self.chain[self.index])
        field = {"multiplier": "multiplier", "sigma": "absolute", "scale": "absolute", "fraction": "fraction"}
        moved = dataclasses.replace(d, **{field[self.family.key]: value})  # type: ignore[type-var]
        return (*self.chain[: self.index], moved.spec(), *self.chain[self.index + 1 :])


def knob_of(chain: Sequence[str]) -> Knob | None:
    """The first defence of the chain with a strength to scan; None when there is none (clip alone,
    quantisation, withholding)."""
    from gradleak.defenses import DpSgd, Noise, Prune, parse_defense

    for i, text in enumerate(chain):
        d = parse_defense(text)
        if isinstance(d, DpSgd):
            fam = Family("multiplier", "DP-SGD multiplier", NOISE_GRID, log=True, extend=True)
            return Knob(tuple(chain), i, fam, d.multiplier)
        if isinstance(d, Noise):
            if d.multiplier is not None:
                fam = Family("multiplier", f"{d.kind} noise multiplier", NOISE_GRID, log=True, extend=True)
                return Knob(tuple(chain), i, fam, d.multiplier)
            key = "sigma" if d.kind == "gaussian" else "scale"
            fam = Family(key, f"{d.kind} noise {key}", SIGMA_GRID, log=True, extend=True)
            return Knob(tuple(chain), i, fam, float(d.absolute or 0.0))
        if isinstance(d, Prune):
            fam = Family("fraction", f"pruning fraction ({d.method})", PRUNE_GRID, log=False, extend=False)
            return Knob(tuple(chain), i, fam, d.fraction)
    return None


@dataclass(frozen=True)
class ScanPoint:
    strength: float
    rouge1: float | None  # None: the run failed
    exact_match: float | None
    leaks: bool | None  # None: the run failed


@dataclass(frozen=True)
class ThresholdScan:
    """One attack's scan. `status`:

    - `stops`: `strength` is the weakest setting seen to stop the leak, `below` the strongest seen
      to leak (None when the grid's floor already stopped it: the threshold is at most `strength`);
    - `no-leak`: the attack does not leak even without the defence: there is no threshold;
    - `leaks`: it still leaks at the strongest setting tried (`strength` None);
    - `failed`: a run of the scan failed (`note` says which)."""

    attack: str
    status: str
    strength: float | None
    below: float | None
    points: tuple[ScanPoint, ...]
    note: str = ""


Evaluate = Callable[[float], tuple[float, float] | None]  # strength -> (rouge1, exact_match); None: failed


def scan(
    knob: Knob,
    attack: str,
    baseline_leaks: bool,
    evaluate: Evaluate,
    criterion: LeakCriterion = LeakCriterion(),
    bisect: int = DEFAULT_BISECT,
    extend: int = DEFAULT_EXTEND,
    grid: Sequence[float] | None = None,
) -> ThresholdScan:
    """Grid then bisection, as the module says; `evaluate` runs the attack at a strength."""
    if bisect < 0 or extend < 0:
        raise GradleakError("bisection and extension steps must be at least 0")
    fam = knob.family
    points: list[ScanPoint] = []
    seen: dict[float, bool] = {}

    def leaks(value: float) -> bool | None:
        if value in seen:
            return seen[value]
        got = evaluate(value)
        if got is None:
            points.append(ScanPoint(value, None, None, None))
            return None
        r1, em = got
        out = criterion.leaks(r1, em)
        points.append(ScanPoint(value, r1, em, out))
        seen[value] = out
        return out

    def failed(value: float) -> ThresholdScan:
        note = f"the run at {fam.label} {value:g} failed"
        return ThresholdScan(attack, "failed", None, None, tuple(points), note)

    if not baseline_leaks:
        return ThresholdScan(attack, "no-leak", None, None, (), "no leak without the defence")
    values = sorted(grid or fam.grid)
    below: float | None = None
    stop: float | None = None
    for v in values:
        got = leaks(v)
        if got is None:
            return failed(v)
        if got:
            below = v
        else:
            stop = v
            break
    if stop is None:
        return ThresholdScan(
            attack, "leaks", None, below, tuple(points), "leaks at the strongest setting tried"
        )
    if below is None and fam.extend:  # the first grid point stopped it: look further down
        u = fam.to_axis(stop)
        for _ in range(extend):
            u -= 1
            v = fam.from_axis(u)
            got = leaks(v)
            if got is None:
                return failed(v)
            if got:
                below = v
                break
            stop = v
    if below is None and fam.extend:  # even the floor stops it: does the chain without noise?
        got = leaks(0.0)
        if got is None:
            return failed(0.0)
        if not got:
            note = "stops even at strength 0: the rest of the chain (the clip) stops the leak, not the noise"
            return ThresholdScan(attack, "stops", 0.0, None, tuple(points), note)
        note = f"leaks at strength 0, stops at {stop:g} (the weakest tried): the threshold is at most that"
        return ThresholdScan(attack, "stops", stop, None, tuple(points), note)
    if below is None:
        return ThresholdScan(attack, "stops", stop, None, tuple(points), "stops at the weakest setting tried")
    lo, hi = fam.to_axis(below), fam.to_axis(stop)
    for _ in range(bisect):
        v = fam.from_axis((lo + hi) / 2)
        if v in (below, stop):
            break  # rounding has reached the grid's resolution
        got = leaks(v)
        if got is None:
            return failed(v)
        if got:
            below, lo = v, fam.to_axis(v)
        else:
            stop, hi = v, fam.to_axis(v)
    return ThresholdScan(attack, "stops", stop, below, tuple(points))
