"""A study's measured table: its runs (from the store) grouped by condition (the spec without the seed),
one row each, and the findings that can be read off the table mechanically."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradleak.conditions.fields import get_field, show
from gradleak.conditions.study import Study
from gradleak.store import StoredRun

HIGH = 99.0  # ROUGE-1 at or above this: recovered
LOW = 50.0  # ROUGE-1 below this: recovery has failed
IGNORED = ("seed", "device")  # fields that do not make a condition


@dataclass(frozen=True)
class Row:
    """One condition of a study: the mean over its done runs (seeds), and why the others were refused
    (the attack declined the scenario: a result) or failed (a crash)."""

    part: str
    x_field: str
    x: Any
    series: str
    labels: tuple[str, ...]  # the study's label columns, as text
    keys: tuple[str, ...]  # store keys of the condition's runs
    n: int  # done runs
    failed: int  # runs that crashed (status `failed`)
    rouge1: float | None
    rouge2: float | None
    exact_match: float | None
    rouge1_sd: float | None
    seconds: float | None  # the attack's seconds, mean over done runs
    epsilon: float | None  # largest over done runs; None: no finite bound
    defended: bool
    note: str
    repeat: bool = False  # the same condition as an earlier row (of another part): not tabulated again
    refused: int = 0  # runs whose attack declined the scenario (status `refused`)

    def to_json(self, columns: Sequence[str]) -> dict[str, Any]:
        return {
            "part": self.part,
            **dict(zip(columns, self.labels, strict=True)),
            "x": self.x,
            "series": self.series,
            "n": self.n,
            "failed": self.failed,
            "refused": self.refused,
            "rouge1": self.rouge1,
            "rouge2": self.rouge2,
            "exact_match": self.exact_match,
            "seconds": self.seconds,
            "epsilon": self.epsilon,
            "note": self.note,
            "repeat": self.repeat,
            "keys": list(self.keys),
        }


@dataclass(frozen=True)
class StudyTable:
    study: Study
    rows: tuple[Row, ...]
    runs: int  # stored runs of the study (done, refused or failed)
    wall_seconds: float  # sum of the stored runs' wall clock (load, update, attack, scoring)

    @property
    def defended(self) -> bool:
        return any(r.defended for r in self.rows)


def build_table(study: Study, stored: Sequence[StoredRun]) -> StudyTable:
    """The study's rows from its stored runs (any run of the study missing from the store: 'not run')."""
    by_key = {r.key: r for r in stored}
    columns = [get_field(c) for c in study.columns]
    rows: list[Row] = []
    seen: set[str] = set()
    for part in study.parts:
        x_field = get_field(part.x)
        series_fields = [get_field(s) for s in study.series if s != part.x]
        conditions: dict[str, list[str]] = {}
        specs: dict[str, dict[str, Any]] = {}
        for job in part.plan.jobs:
            spec = by_key[job.key].spec if job.key in by_key else _spec_dict(job.spec)
            cond = _condition(spec)
            conditions.setdefault(cond, []).append(job.key)
            specs.setdefault(cond, spec)
        for cond, keys in conditions.items():
            repeat = cond in seen  # a condition two parts share: plotted in both, tabulated once
            seen.add(cond)
            spec = specs[cond]
            runs = [by_key[k] for k in keys if k in by_key]
            rows.append(
                _row(
                    part.label,
                    x_field.name,
                    x_field.get(spec),
                    ", ".join(t for t in (_series_text(f.heading, f.get(spec)) for f in series_fields) if t),
                    tuple(show(f.get(spec)) for f in columns),
                    tuple(keys),
                    runs,
                    bool(spec.get("defenses")),
                    repeat,
                )
            )
    wall = sum(max(0.0, by_key[k].seconds) for k in {j.key for j in study.jobs} if k in by_key)
    count = sum(1 for j in study.jobs if j.key in by_key)
    return StudyTable(study=study, rows=tuple(rows), runs=count, wall_seconds=wall)


def _series_text(heading: str, value: Any) -> str:
    """A series' part of a legend: strings as they are, numbers and flags with their heading (B=4)."""
    return show(value) if isinstance(value, str) else f"{heading}={show(value)}"


def _spec_dict(spec: Any) -> dict[str, Any]:
    import json

    from gradleak.store import canonical

    return json.loads(canonical(spec))


def _condition(spec: dict[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in spec.items() if k not in IGNORED))


def _row(
    part: str,
    x_field: str,
    x: Any,
    series: str,
    labels: tuple[str, ...],
    keys: tuple[str, ...],
    runs: list[StoredRun],
    defended: bool,
    repeat: bool,
) -> Row:
    done = [r for r in runs if r.done and r.record is not None]
    refused = [r for r in runs if r.refused]
    failed = [r for r in runs if not r.refused and not (r.done and r.record is not None)]

    def mean(key: str) -> float | None:
        return statistics.fmean(float(r.record["scores"][key]) for r in done) if done else None  # type: ignore[index]

    eps = [_epsilon(r.record) for r in done]  # type: ignore[arg-type]
    notes = []
    for status, group in (("failed", failed), ("refused", refused)):  # a crash first: it needs fixing
        if group:
            text = reason(status, group[0].error or ("no record" if status == "failed" else "no reason"))
            notes.append(text if len(group) == len(runs) else f"{len(group)} of {len(runs)} {text}")
    if not notes and len(runs) < len(keys):
        notes.append(f"{len(keys) - len(runs)} of {len(keys)} not run")
    note = "; ".join(notes)
    return Row(
        part=part,
        x_field=x_field,
        x=x,
        series=series,
        labels=labels,
        keys=keys,
        n=len(done),
        failed=len(failed),
        refused=len(refused),
        rouge1=mean("rouge1"),
        rouge2=mean("rouge2"),
        exact_match=mean("exact_match"),
        rouge1_sd=statistics.pstdev(float(r.record["scores"]["rouge1"]) for r in done) if done else None,  # type: ignore[index]
        seconds=statistics.fmean(float(r.record.get("seconds", r.seconds)) for r in done) if done else None,  # type: ignore[union-attr]
        epsilon=max(e for e in eps if e is not None) if eps and all(e is not None for e in eps) else None,
        defended=defended,
        note=note,
        repeat=repeat,
    )


def _epsilon(record: dict[str, Any]) -> float | None:
    value = (record.get("privacy") or {}).get("epsilon")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


_ATTACK_PREFIX = re.compile(r"^attack '[^']+' ")


def reason(status: str, error: str) -> str:
    """A run's one-line reason, `refused: ...` or `failed: ...` by its stored status (`refused`: the
    attack raised `Refusal`; anything else that is not done: `failed`), never by its wording."""
    text = _ATTACK_PREFIX.sub("", " ".join(error.split()))
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{'refused' if status == 'refused' else 'failed'}: {text}"


# ------------------------------------------------------------------ findings read off the table


def findings(table: StudyTable) -> list[str]:
    """One sentence per plotted line: where ROUGE-1 starts, how long it stays >= 99, where it first
    falls below 50, where it ends; and which points were refused or failed."""
    out: list[str] = []
    lines: dict[tuple[str, str], list[Row]] = {}
    for row in table.rows:
        lines.setdefault((row.x_field, row.series), []).append(row)
    for (x_field, series), rows in lines.items():
        heading = get_field(x_field).heading
        name = f"{series}" if series else "all runs"
        out.append(f"{name}: {_trajectory(rows, heading)}")
    return out


def _trajectory(rows: list[Row], heading: str) -> str:
    measured = [r for r in rows if r.rouge1 is not None]
    broken = [r for r in rows if r.rouge1 is None]
    parts: list[str] = []
    if measured:
        values = [round(r.rouge1, 1) for r in measured]  # type: ignore[arg-type]  # as the table shows them
        at = [f"{heading} = {show(r.x)}" for r in measured]
        if all(v >= HIGH for v in values):
            parts.append(f"ROUGE-1 ≥ {HIGH:.0f} at every measured point ({at[0]} … {show(measured[-1].x)})")
        elif all(v < LOW for v in values):
            best = max(range(len(values)), key=values.__getitem__)
            parts.append(f"ROUGE-1 stays below {LOW:.0f} (at most {values[best]:.1f}, at {at[best]})")
        else:
            parts.append(f"ROUGE-1 {values[0]:.1f} at {at[0]}")
            highs = [i for i, v in enumerate(values) if v >= HIGH]
            if highs and highs != [0]:
                contiguous = highs == list(range(highs[0], highs[-1] + 1))
                where = (
                    f"{at[highs[0]]} … {show(measured[highs[-1]].x)}"
                    if contiguous and len(highs) > 1
                    else f"{heading} = " + ", ".join(show(measured[i].x) for i in highs)
                )
                parts.append(f"≥ {HIGH:.0f} at {where}")
            if values[0] >= LOW:
                turn = next((i for i, v in enumerate(values) if v < LOW), None)
                what = f"first below {LOW:.0f}"
            else:
                turn = next((i for i, v in enumerate(values) if v >= LOW), None)
                what = f"first ≥ {LOW:.0f}"
            if turn is not None and turn not in highs:
                parts.append(f"{what} at {at[turn]} ({values[turn]:.1f})")
            if len(values) > 1 and turn != len(values) - 1 and len(values) - 1 not in highs:
                parts.append(f"{values[-1]:.1f} at {at[-1]}")
    if broken:
        reasons: dict[str, str] = {}  # one example of each reason (numbers aside)
        for r in broken:
            short = ": ".join(r.note.split(": ")[:2])  # the reason's first clause
            reasons.setdefault(re.sub(r"[\d.]+", "#", short), short)
        where = ", ".join(show(r.x) for r in broken)
        parts.append(f"no result at {heading} = {where} ({'; '.join(reasons.values())})")
    return "; ".join(parts) + "."
