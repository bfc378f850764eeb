"""Sweep specs in TOML: a grid over the fields of a run's spec.

```toml
kind = "attack"            # optional: attack (RunSpec, the default) or train (TrainSpec)
name = "batch size study"  # optional label

[grid]                     # a list is an axis; a single value is a constant
victim = ["gpt2-tiny"]
data = ["sst2"]
batch_size = [1, 2]
attack = ["exact"]
seed = [0, 1]
defenses = [[], ["gaussian:sigma=1e-4"], "dp-sgd:clip=1,multiplier=1"]

[fixed]                    # constants (a list here is the value of a tuple field)
iterations = 20
```

Keys are the spec's field names. For a tuple field (`defenses`, `withhold`) each element of a grid list
is one alternative: a list of strings is a chain, a string a chain of one. Every spec is built and
validated before anything runs; a malformed file, an unknown key or a value of the wrong type is a
one-line `GradleakError`.
"""

from __future__ import annotations

import itertools
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gradleak.errors import GradleakError
from gradleak.sweeps.jobs import Job, get_kind

TOP_KEYS = ("kind", "name", "grid", "fixed")


@dataclass(frozen=True)
class SweepPlan:
    """The runs of a sweep, in grid order, each spec once."""

    kind: str
    name: str
    jobs: tuple[Job, ...]
    axes: dict[str, list[Any]]


def load_plan(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepPlan:
    """Read and expand a TOML sweep spec; `overrides` replace those fields in every run."""
    path = Path(path)
    if not path.is_file():
        raise GradleakError(f"sweep spec not found: {path}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise GradleakError(f"{path}: malformed TOML: {exc}") from None
    return parse_plan(doc, source=str(path), overrides=overrides)


def parse_plan(
    doc: dict[str, Any], source: str = "sweep spec", overrides: dict[str, Any] | None = None
) -> SweepPlan:
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise GradleakError(f"{source}: unknown key {unknown[0]!r}; top-level keys: {', '.join(TOP_KEYS)}")
    kind = doc.get("kind", "attack")
    name = doc.get("name", "")
    if not isinstance(kind, str):
        raise GradleakError(f"{source}: kind must be a string")
    if not isinstance(name, str):
        raise GradleakError(f"{source}: name must be a string")
    spec_type, _ = get_kind(kind).load()
    grid = _table(doc, "grid", source)
    fixed = _table(doc, "fixed", source)
    if not grid and not fixed:
        raise GradleakError(f"{source}: nothing to run: add a [grid] table")
    if overrides:  # from the command line: the same value for every run
        grid = {k: v for k, v in grid.items() if k not in overrides}
        fixed = {**{k: v for k, v in fixed.items() if k not in overrides}, **overrides}
    hints = typing.get_type_hints(spec_type)
    names = [f.name for f in fields(spec_type)]
    both = [k for k in grid if k in fixed]
    if both:
        raise GradleakError(f"{source}: key {both[0]!r} is in both [grid] and [fixed]")

    constants: dict[str, Any] = {}
    axes: dict[str, list[Any]] = {}
    for table, values in (("fixed", fixed), ("grid", grid)):
        for key, value in values.items():
            if key not in names:
                raise GradleakError(f"{source}: unknown key {key!r} in [{table}]; keys: {', '.join(names)}")
            where = f"{source}: [{table}] {key}"
            if table == "grid" and isinstance(value, list):
                if not value:
                    raise GradleakError(f"{where} is an empty list")
                axes[key] = [_coerce(hints[key], v, where, element=True) for v in value]
            else:
                constants[key] = _coerce(hints[key], value, where)

    jobs: dict[str, Job] = {}
    for combo in itertools.product(*axes.values()):
        values = {**constants, **dict(zip(axes, combo, strict=True))}
        spec = spec_type(**values)
        job = Job(kind, spec)
        try:
            spec.validate()
        except GradleakError as exc:
            raise GradleakError(f"{source}: run {job.label()}: {exc}") from None
        jobs.setdefault(job.key, job)
    return SweepPlan(kind=kind, name=name, jobs=tuple(jobs.values()), axes=axes)


def _table(doc: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise GradleakError(f"{source}: {name} must be a table ([{name}])")
    return value


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _strip_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _coerce(hint: Any, value: Any, where: str, element: bool = False) -> Any:
    """A TOML value as the field's type (ints widen to floats); anything else is a one-line error."""
    hint = _strip_none(hint)
    if _is_tuple(hint):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            what = "each alternative" if element else "the value"
            raise GradleakError(f"{where}: {what} must be a string or a list of strings, got {value!r}")
        return tuple(items)
    if isinstance(value, list | dict):
        raise GradleakError(f"{where} must be a single {hint.__name__}, got {type(value).__name__}")
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise GradleakError(f"{where} must be {'an' if name == 'int' else 'a'} {name}, got {value!r}")
