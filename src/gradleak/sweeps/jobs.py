"""What a sweep runs: kinds of run (a registry), a job (kind + spec), and `execute`, which turns a job
into a stored row and never raises for a failing run (the failure is the row). An attack's refusal
(`gradleak.errors.Refusal`) becomes a `refused` row, any other exception a `failed` one; the status
is decided here, in the worker, so it crosses process boundaries (spawned workers, Ray) inside the
row and never depends on an exception surviving pickling. The run gets the torch threads of the
executor's budget (`gradleak.sweeps.resources`), and its record's environment says how many."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Any

from gradleak.errors import GradleakError, Refusal
from gradleak.store import StoredRun, canonical, gradleak_version, run_key
from gradleak.sweeps.resources import ThreadBudget, torch_threads

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class RunKind:
    """A kind of run: its spec class and run function (imported lazily: torch loads only when needed)."""

    name: str
    load: Callable[[], tuple[type, Callable[..., Any]]]
    summary: str


def _attack() -> tuple[type, Callable[..., Any]]:
    from gradleak.experiment import RunSpec, run_one

    return RunSpec, run_one


def _train() -> tuple[type, Callable[..., Any]]:
    from gradleak.train import TrainSpec, train

    return TrainSpec, train


KINDS: dict[str, RunKind] = {
    k.name: k
    for k in (
        RunKind("attack", _attack, "reconstruct a private batch from its update (RunSpec -> RunRecord)"),
        RunKind("train", _train, "train under the defence chain (TrainSpec -> TrainRecord)"),
    )
}


def get_kind(name: str) -> RunKind:
    try:
        return KINDS[name]
    except KeyError:
        raise GradleakError(f"unknown kind of run {name!r}: choose one of {', '.join(KINDS)}") from None


@dataclass(frozen=True)
class Job:
    """One run of a sweep: its kind and its spec (a RunSpec or a TrainSpec)."""

    kind: str
    spec: Any

    @property
    def key(self) -> str:
        return run_key(self.kind, self.spec)

    def label(self) -> str:
        s = self.spec
        defenses = ",".join(getattr(s, "defenses", ())) or "no defence"
        what = getattr(s, "attack", self.kind)
        shown = {"attack", "victim", "data", "batch_size", "seed", "defenses"}
        extra = [
            f"{f.name}={_short(getattr(s, f.name))}"
            for f in fields(s)
            if f.name not in shown and f.default is not MISSING and getattr(s, f.name) != f.default
        ]  # what else sets this run apart from the defaults (share, local steps, dtype, ...)
        more = f" {' '.join(extra)}" if extra else ""
        return f"{what} {s.victim} {s.data} B={s.batch_size} seed={s.seed} [{defenses}]{more}"


def _short(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, GradleakError) else f"{type(exc).__name__}: {text}"


def execute(job: Job, progress: Progress | None = None, budget: ThreadBudget | None = None) -> StoredRun:
    """Run a job with the budget's torch threads (none: this process's setting). A refusal comes back
    as a `refused` row, any other failing run as a `failed` row with its error, never as an exception
    (KeyboardInterrupt and other non-`Exception`s still propagate)."""
    started = time.time()
    record: dict[str, Any] | None = None
    error: str | None = None
    refused = False
    try:
        _, run = get_kind(job.kind).load()
        with torch_threads(budget) as threads:
            record = run(job.spec, progress).to_json()
        used = budget or ThreadBudget(threads, "this process's setting")
        record.setdefault("environment", {}).update(used.environment(threads))
    except Refusal as exc:  # the attack declined the scenario: a result, said as is
        error, refused = one_line(exc), True
        log.info("run %s refused: %s", job.label(), error)
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded and the sweep goes on
        error = one_line(exc)
        log.warning("run %s failed: %s", job.label(), error)
    return make_row(job, started, record, error, refused=refused)


def make_row(
    job: Job, started: float, record: dict[str, Any] | None, error: str | None, refused: bool = False
) -> StoredRun:
    """The store row of a finished job: done with its record, refused (`refused`, with the refusal as
    its error) or failed with its error."""
    status = "done" if error is None else ("refused" if refused else "failed")
    return StoredRun(
        key=job.key,
        kind=job.kind,
        spec=json.loads(canonical(job.spec)),
        status=status,
        record=record if error is None else None,
        error=error,
        started=started,
        finished=time.time(),
        version=gradleak_version(),
    )
