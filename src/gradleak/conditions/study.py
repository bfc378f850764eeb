"""A conditions study: one question, one TOML file under `studies/`, several sweeps (`[[part]]`).

```toml
title = "Batch size"                 # the section's heading
order = 1                            # where the section goes in docs/conditions.md
question = "How many sentences ...?"
x = "batch_size"                     # the plotted axis: a RunSpec field or a derived field (fields.py)
xscale = "log"                       # optional: "log" or "linear" (numeric x only)
series = ["attack", "victim"]        # fields that tell the plotted lines apart
columns = ["attack", "victim", "B"]  # optional: the table's label columns (default: series + x)
finding = "hand-written, after reading the measured table"

[[part]]                             # one sweep: a [grid] / [fixed] table exactly as `gradleak sweep`
label = "exact, GPT-2 tiny (random, float64)"
x = "batch_size"                     # optional: this part's own axis (a panel of its own in the plot)
[part.grid]
batch_size = [1, 2, 4]
[part.fixed]
attack = "exact"
[part.zip]                           # optional: axes that move together (lists of one length), crossed
max_length = [32, 64]                # with the [grid]; several groups: [[part.zip]] tables
min_tokens = [32, 64]
[part.shrink]                        # optional: values that replace the grid's / zip's / fixed's in --shrink
batch_size = [1, 2]
```

Each part is handed to `gradleak.sweeps.parse_plan`, so every spec is built and validated before
anything runs; a malformed file or an unknown key is a one-line `GradleakError`.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradleak.conditions.fields import get_field
from gradleak.errors import GradleakError
from gradleak.sweeps import Job, SweepPlan, parse_plan

STUDY_KEYS = ("title", "order", "question", "x", "xscale", "series", "columns", "finding", "part")
PART_KEYS = ("label", "x", "grid", "zip", "fixed", "shrink")
XSCALES = ("linear", "log")

# --shrink: caps on the costly fields (a grid axis keeps its first and last values, then these apply)
SHRINK_CAPS: dict[str, float] = {"iterations": 5, "time_budget": 5.0, "finetune_steps": 2}


@dataclass(frozen=True)
class Part:
    label: str
    x: str
    plan: SweepPlan


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    title: str
    order: int
    question: str
    x: str
    xscale: str
    series: tuple[str, ...]
    columns: tuple[str, ...]
    finding: str
    parts: tuple[Part, ...]
    shrunk: bool = False
    seeds: int | None = None

    @property
    def jobs(self) -> tuple[Job, ...]:
        """Every run of the study once, in part order."""
        seen: dict[str, Job] = {}
        for part in self.parts:
            for job in part.plan.jobs:
                seen.setdefault(job.key, job)
        return tuple(seen.values())


def study_paths(names: list[str], directory: Path) -> list[Path]:
    """The study files named (a file path, or a name in `directory`); all of `directory` when none is."""
    available = sorted(directory.glob("*.toml")) if directory.is_dir() else []
    if not names:
        if not available:
            raise GradleakError(f"no studies (*.toml) in {directory}")
        return available
    paths: list[Path] = []
    for name in names:
        path = Path(name)
        if path.suffix == ".toml" and path.is_file():
            paths.append(path)
            continue
        candidate = directory / f"{name}.toml"
        if not candidate.is_file():
            choices = ", ".join(p.stem for p in available) or f"none in {directory}"
            raise GradleakError(f"unknown study {name!r}: choose one of {choices}")
        paths.append(candidate)
    return list(dict.fromkeys(paths))


def load_study(
    path: str | Path,
    *,
    shrink: bool = False,
    seeds: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Study:
    """Read a study; `seeds` replaces each part's seed axis with 0..seeds-1, `shrink` makes the quick
    version (first seed, first and last point of each axis, capped iterations), `overrides` set a field
    in every run (`device`, `seed`)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GradleakError(f"study not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise GradleakError(f"{path}: malformed TOML: {' '.join(str(exc).split())}") from None
    return parse_study(doc, path, shrink=shrink, seeds=seeds, overrides=overrides)


def parse_study(
    doc: dict[str, Any],
    path: Path,
    *,
    shrink: bool = False,
    seeds: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> Study:
    source = str(path)
    unknown = [k for k in doc if k not in STUDY_KEYS]
    if unknown:
        raise GradleakError(f"{source}: unknown key {unknown[0]!r}; study keys: {', '.join(STUDY_KEYS)}")
    if seeds is not None and seeds < 1:
        raise GradleakError(f"--seeds must be at least 1, got {seeds}")
    title = _string(doc, "title", source, default=path.stem)
    question = _string(doc, "question", source, default="")
    finding = _string(doc, "finding", source, default="").strip()
    x = _string(doc, "x", source, default="batch_size")
    xscale = _string(doc, "xscale", source, default="linear")
    if xscale not in XSCALES:
        raise GradleakError(f"{source}: xscale must be one of {', '.join(XSCALES)}, got {xscale!r}")
    order = doc.get("order", 100)
    if not isinstance(order, int) or isinstance(order, bool):
        raise GradleakError(f"{source}: order must be an integer")
    series = _strings(doc, "series", source, default=("attack", "victim"))
    columns = _strings(doc, "columns", source, default=())
    for name in (x, *series, *columns):
        get_field(name, source)
    raw_parts = doc.get("part")
    if not isinstance(raw_parts, list) or not raw_parts or not all(isinstance(p, dict) for p in raw_parts):
        raise GradleakError(f"{source}: a study needs at least one [[part]] table")
    parts = tuple(
        _part(p, f"{source} part {i + 1}", x, shrink, seeds, overrides) for i, p in enumerate(raw_parts)
    )
    return Study(
        name=path.stem,
        path=path,
        title=title,
        order=order,
        question=question,
        x=x,
        xscale=xscale,
        series=series,
        columns=columns or (*series, x),
        finding=finding,
        parts=parts,
        shrunk=shrink,
        seeds=seeds,
    )


def _part(
    raw: dict[str, Any],
    source: str,
    default_x: str,
    shrink: bool,
    seeds: int | None,
    overrides: dict[str, Any] | None,
) -> Part:
    unknown = [k for k in raw if k not in PART_KEYS]
    if unknown:
        raise GradleakError(f"{source}: unknown key {unknown[0]!r}; part keys: {', '.join(PART_KEYS)}")
    label = _string(raw, "label", source, default=source.rsplit(" ", 1)[-1])
    x = _string(raw, "x", source, default=default_x)
    get_field(x, source)
    grid = dict(_table(raw, "grid", source))
    groups = _zip_groups(raw.get("zip", []), source)
    fixed = dict(_table(raw, "fixed", source))
    if seeds is not None:
        fixed.pop("seed", None)
        grid["seed"] = list(range(seeds))
    replace = _table(raw, "shrink", source)  # checked even when unused
    if shrink:
        grid, fixed = shrunk_tables(grid, fixed, {})
        groups = [{k: _ends(k, v) for k, v in g.items()} for g in groups]
        for key, value in replace.items():  # replaced where it was: an axis stays an axis
            group = next((g for g in groups if key in g), None)
            (group if group is not None else grid if key in grid else fixed)[key] = value
    jobs: dict[str, Job] = {}
    kind = "attack"
    for combo in itertools.product(*(_zip_points(g, source) for g in groups)):
        point = {k: v for p in combo for k, v in p.items()}
        plan = parse_plan({"grid": grid, "fixed": {**fixed, **point}}, source=source, overrides=overrides)
        kind = plan.kind
        for job in plan.jobs:
            jobs.setdefault(job.key, job)
    plan = SweepPlan(kind=kind, name=label, jobs=tuple(jobs.values()), axes={})
    return Part(label=label, x=x, plan=plan)


def _zip_groups(value: Any, source: str) -> list[dict[str, Any]]:
    """[part.zip] (one group) or [[part.zip]] (several, crossed with each other) as a list of groups."""
    groups = [value] if isinstance(value, dict) else value
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise GradleakError(f"{source}: zip must be a table ([part.zip]) or tables ([[part.zip]])")
    return [dict(g) for g in groups]


def _zip_points(zipped: dict[str, Any], source: str) -> list[dict[str, Any]]:
    """A zip group as points ({field: value} per position)."""
    if not all(isinstance(v, list) and v for v in zipped.values()):
        raise GradleakError(f"{source}: each key of [part.zip] must be a non-empty list")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise GradleakError(
            f"{source}: the lists of one [part.zip] must have one length, got {sorted(lengths)}"
        )
    return [dict(zip(zipped, values, strict=True)) for values in zip(*zipped.values(), strict=True)]


def shrunk_tables(
    grid: dict[str, Any], fixed: dict[str, Any], replace: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The quick version of a part: each axis keeps its first and last values (the seed axis its first),
    costly fields are capped (`SHRINK_CAPS`), and the part's own [shrink] values replace the rest (a key
    of [grid] stays an axis; any other goes to [fixed])."""
    grid = {k: _ends(k, v) for k, v in grid.items()}
    fixed = {k: _cap(k, v) for k, v in fixed.items()}
    for key, value in replace.items():  # replaced where it was: an axis stays an axis
        (grid if key in grid else fixed)[key] = value
    return grid, fixed


def _ends(key: str, values: Any) -> Any:
    if not isinstance(values, list):
        return _cap(key, values)
    kept = values[:1] if key == "seed" else [values[0], values[-1]] if len(values) > 1 else values
    out: list[Any] = []
    for v in (_cap(key, v) for v in kept):
        if v not in out:
            out.append(v)
    return out


def _cap(key: str, value: Any) -> Any:
    cap = SHRINK_CAPS.get(key)
    if cap is None or not isinstance(value, int | float) or isinstance(value, bool):
        return value
    return type(value)(min(value, cap))


def _table(doc: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise GradleakError(f"{source}: {name} must be a table ([part.{name}])")
    return value


def _string(doc: dict[str, Any], key: str, source: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str):
        raise GradleakError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _strings(doc: dict[str, Any], key: str, source: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = doc.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GradleakError(f"{source}: {key} must be a list of strings, got {value!r}")
    return tuple(value)
