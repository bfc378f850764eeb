"""Stored rows -> the report's data: attack runs, training runs and failures as plain dataclasses, and
the groups (same condition, several seeds) that tables and plots average over."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradleak.errors import GradleakError
from gradleak.knowledge import Knows
from gradleak.store import StoredRun

DEFAULT_KNOWS = Knows()
SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match")


@dataclass(frozen=True)
class NoiseLevel:
    """The noise of a defence chain: `sigma` (absolute std) or `multiplier` (std / sensitivity)."""

    family: str  # "sigma" or "multiplier"
    value: float


@dataclass(frozen=True)
class AttackRun:
    key: str
    victim: str
    data: str
    attack: str
    batch_size: int
    seed: int
    defenses: tuple[str, ...]
    scores: dict[str, float]
    epsilon: float | None  # of the one release the server saw; None: no finite bound
    delta: float
    accountant: str
    references: tuple[str, ...]
    reconstructions: tuple[str, ...]
    seconds: float
    noise: NoiseLevel | None
    knows: str = DEFAULT_KNOWS.describe()  # what the attack was given besides the update (Knows.describe)

    @property
    def condition(self) -> tuple[str, str, str, int, tuple[str, ...], str]:
        return (self.victim, self.data, self.attack, self.batch_size, self.defenses, self.knows)

    @property
    def chain(self) -> str:
        return " -> ".join(self.defenses) or "none"


@dataclass(frozen=True)
class EvalPoint:
    step: int
    accuracy: float
    loss: float
    epsilon: float | None


@dataclass(frozen=True)
class TrainRun:
    key: str
    victim: str
    data: str
    batch_size: int
    seed: int
    defenses: tuple[str, ...]
    steps: tuple[int, ...]
    loss: tuple[float, ...]
    eval: tuple[EvalPoint, ...]
    epsilon: float | None
    final_accuracy: float | None

    @property
    def chain(self) -> str:
        return " -> ".join(self.defenses) or "none"


@dataclass(frozen=True)
class FailedRun:
    kind: str
    label: str
    error: str


@dataclass(frozen=True)
class Group:
    """Attack runs of one condition (victim, data, attack, batch size, defences, what the server knew)
    over seeds."""

    runs: tuple[AttackRun, ...]

    @property
    def first(self) -> AttackRun:
        return self.runs[0]

    def mean(self, key: str) -> float:
        return statistics.fmean(r.scores[key] for r in self.runs)

    def std(self, key: str) -> float:
        return statistics.pstdev(r.scores[key] for r in self.runs) if len(self.runs) > 1 else 0.0

    @property
    def epsilon(self) -> float | None:
        eps = [r.epsilon for r in self.runs if r.epsilon is not None]
        return max(eps) if len(eps) == len(self.runs) else None

    @property
    def seconds(self) -> float:
        return statistics.fmean(r.seconds for r in self.runs)


@dataclass(frozen=True)
class ThresholdMark:
    """Where one attack's leak stops (an audit's threshold scan): the strength, its one-round epsilon
    (None: no finite bound or no threshold), and the accuracy training there costs (points)."""

    attack: str
    defence: str  # the strength in words ("DP-SGD multiplier")
    status: str  # stops, no-leak, leaks, failed
    strength: float | None
    epsilon: float | None
    utility_cost: float | None = None
    leak_rouge1: float = 20.0  # the leak criterion's ROUGE-1 level


@dataclass(frozen=True)
class BoundPoint:
    """One DP run: the largest reconstruction success its mechanism allows at the prior, and the
    success measured (the fraction of sentences recovered exactly), both 0-1."""

    key: str
    attack: str
    epsilon: float
    bound: float
    measured: float
    prior: float


@dataclass(frozen=True)
class CanaryMark:
    """A canary audit: the epsilon the attack certifies (a lower bound) against the accountant's."""

    defence: str
    attack: str
    lower: float
    ceiling: float  # the most these trials could certify
    upper: float | None  # None: the accountant gives no finite epsilon
    accountant: str
    trials: int
    confidence: float


@dataclass(frozen=True)
class ReportData:
    attacks: tuple[AttackRun, ...] = ()
    trains: tuple[TrainRun, ...] = ()
    failed: tuple[FailedRun, ...] = ()
    source: str = ""
    versions: tuple[str, ...] = field(default=())
    refused: tuple[FailedRun, ...] = ()  # runs whose attack declined the scenario; `error` is the reason
    thresholds: tuple[ThresholdMark, ...] = ()  # an audit's threshold scan, one per attack
    bounds: tuple[BoundPoint, ...] = ()  # an audit's reconstruction bounds, one per DP run
    bound_curve: tuple[tuple[float, float], ...] = ()  # (one-round epsilon, bound): the bound as a curve
    canary: CanaryMark | None = None  # an audit's canary audit: lower against upper epsilon

    def groups(self) -> list[Group]:
        return group_runs(self.attacks)


def group_runs(runs: Iterable[AttackRun]) -> list[Group]:
    by: dict[tuple[Any, ...], list[AttackRun]] = defaultdict(list)
    for r in runs:
        by[r.condition].append(r)
    return [
        Group(tuple(sorted(v, key=lambda r: r.seed)))
        for _, v in sorted(by.items(), key=lambda kv: _order(kv[0]))
    ]


def _order(condition: tuple[Any, ...]) -> tuple[Any, ...]:
    victim, data, attack, b, defenses, knows = condition
    return (victim, data, attack, len(defenses) > 0, defenses, b, knows)


def noise_level(defenses: Sequence[str]) -> NoiseLevel | None:
    """The first noise in a chain: gaussian/laplace sigma or scale (absolute), or a multiplier."""
    from gradleak.defenses import DpSgd, Noise, parse_defense

    for text in defenses:
        try:
            d = parse_defense(text)
        except GradleakError:
            return None
        if isinstance(d, DpSgd):
            return NoiseLevel("multiplier", d.multiplier)
        if isinstance(d, Noise):
            if d.absolute is not None:
                return NoiseLevel("sigma", d.absolute)
            return NoiseLevel("multiplier", float(d.multiplier or 0.0))
    return None


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def _attack(run: StoredRun, rec: dict[str, Any]) -> AttackRun:
    spec = rec.get("spec", run.spec)
    privacy = rec.get("privacy") or {}
    defenses = tuple(spec.get("defenses", ()))
    return AttackRun(
        key=run.key,
        victim=str(spec["victim"]),
        data=str(spec["data"]),
        attack=str(spec["attack"]),
        batch_size=int(spec["batch_size"]),
        seed=int(spec["seed"]),
        defenses=defenses,
        scores={k: float(rec["scores"][k]) for k in SCORE_KEYS},
        epsilon=_finite(privacy.get("epsilon")),
        delta=float(privacy.get("delta", spec.get("delta", 1e-5))),
        accountant=str(privacy.get("accountant", spec.get("accountant", ""))),
        references=tuple(str(t) for t in rec.get("references", ())),
        reconstructions=tuple(str(t) for t in rec.get("reconstructions", ())),
        seconds=float(rec.get("seconds", run.seconds)),
        noise=noise_level(defenses),
        knows=knowledge_of(rec, spec).describe(),
    )


def knowledge_of(rec: dict[str, Any], spec: dict[str, Any]) -> Knows:
    """What the attack of a record was given: the record's `knowledge`, else its spec's `known_*` fields
    (records written before `knowledge` existed), each missing fact at the server's default."""
    given = rec.get("knowledge")
    if isinstance(given, dict):
        return Knows(
            batch_size=bool(given.get("batch_size", DEFAULT_KNOWS.batch_size)),
            lengths=bool(given.get("lengths", DEFAULT_KNOWS.lengths)),
            labels=bool(given.get("labels", DEFAULT_KNOWS.labels)),
        )
    return Knows(
        batch_size=bool(spec.get("known_batch_size", DEFAULT_KNOWS.batch_size)),
        lengths=bool(spec.get("known_lengths", DEFAULT_KNOWS.lengths)),
        labels=bool(spec.get("known_labels", DEFAULT_KNOWS.labels)),
    )


def _train(run: StoredRun, rec: dict[str, Any]) -> TrainRun:
    spec = rec.get("spec", run.spec)
    evals = tuple(
        EvalPoint(int(e["step"]), float(e["accuracy"]), float(e["loss"]), _finite(e.get("epsilon")))
        for e in rec.get("eval", ())
    )
    return TrainRun(
        key=run.key,
        victim=str(spec["victim"]),
        data=str(spec["data"]),
        batch_size=int(spec.get("batch_size", 0)),
        seed=int(spec.get("seed", 0)),
        defenses=tuple(spec.get("defenses", ())),
        steps=tuple(int(s) for s in rec.get("steps", ())),
        loss=tuple(math.nan if x is None else float(x) for x in rec.get("loss", ())),  # None: empty draw
        eval=evals,
        epsilon=_finite(rec.get("epsilon")),
        final_accuracy=_finite(rec.get("final_accuracy")),
    )


READERS = {"attack": _attack, "fl": _attack, "train": _train}  # fl: one client in one Flower round


def _label(run: StoredRun) -> str:
    s = run.spec
    what = s.get("attack", run.kind)
    chain = ",".join(s.get("defenses", ())) or "no defence"
    where = f"{s.get('victim', '?')} {s.get('data', '?')} B={s.get('batch_size', '?')}"
    return f"{what} {where} seed={s.get('seed', '?')} [{chain}]"


def load_report_data(runs: Sequence[StoredRun], source: str = "") -> ReportData:
    """Sort stored rows into attack runs, training runs, refusals (status `refused`) and failures. A
    done row this gradleak cannot read is listed as a failure, not an exception."""
    attacks: list[AttackRun] = []
    trains: list[TrainRun] = []
    failed: list[FailedRun] = []
    refused: list[FailedRun] = []
    for run in runs:
        reader = READERS.get(run.kind)
        if run.refused:
            refused.append(FailedRun(run.kind, _label(run), run.error or "no reason given"))
            continue
        if not run.done or run.record is None:
            failed.append(FailedRun(run.kind, _label(run), run.error or "no record"))
            continue
        if reader is None:
            failed.append(FailedRun(run.kind, _label(run), f"unknown kind of run {run.kind!r}"))
            continue
        try:
            item = reader(run, run.record)
        except (KeyError, TypeError, ValueError) as exc:
            failed.append(FailedRun(run.kind, _label(run), f"unreadable record: {exc!r}"))
            continue
        (attacks if run.kind in ("attack", "fl") else trains).append(item)  # type: ignore[arg-type]
    return ReportData(
        attacks=tuple(attacks),
        trains=tuple(trains),
        failed=tuple(failed),
        refused=tuple(refused),
        source=source,
        versions=tuple(sorted({r.version for r in runs})),
    )
