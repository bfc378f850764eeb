"""Run a sweep against a store: skip the runs the store already has as done or refused, run the rest
(failed ones again) on an executor, and write each row the moment it finishes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gradleak.store import Store, StoredRun
from gradleak.sweeps.executors import Executor, OnStart
from gradleak.sweeps.jobs import Job, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepSummary:
    """`total` runs in the sweep: `done` now, `skipped` (found done or refused in the store), `failed`
    now (crashes only: the count a non-zero exit is about), `refused` now (the attack declined the
    scenario: a result, not a failure)."""

    total: int
    done: int
    skipped: int
    failed: int
    errors: tuple[tuple[str, str], ...] = ()  # (run label, error) of the failed runs
    seconds: float = 0.0
    refused: int = 0
    refusals: tuple[tuple[str, str], ...] = ()  # (run label, refusal) of the refused runs

    def to_json(self) -> dict[str, int]:
        return {
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
            "refused": self.refused,
        }


def run_sweep(
    jobs: Sequence[Job],
    store: Store,
    executor: Executor,
    on_start: OnStart | None = None,
    on_result: Callable[[StoredRun], None] | None = None,
    progress: Progress | None = None,
) -> SweepSummary:
    """Run the jobs the store does not have as done or refused; store each row as it finishes."""
    start = time.perf_counter()
    finished = store.finished_keys()
    todo = [j for j in jobs if j.key not in finished]
    labels = {j.key: j.label() for j in todo}
    log.info("%d runs, %d already done in %s", len(jobs), len(jobs) - len(todo), store.path)
    done = 0
    errors: list[tuple[str, str]] = []
    refusals: list[tuple[str, str]] = []

    def record(row: StoredRun) -> None:
        nonlocal done
        store.put(row)
        if row.done:
            done += 1
        elif row.refused:
            refusals.append((labels.get(row.key, row.key[:12]), row.error or "no reason given"))
        else:
            errors.append((labels.get(row.key, row.key[:12]), row.error or "unknown error"))
        if on_result is not None:
            on_result(row)

    executor.run(todo, record, on_start, progress)
    return SweepSummary(
        total=len(jobs),
        done=done,
        skipped=len(jobs) - len(todo),
        failed=len(errors),
        errors=tuple(errors),
        seconds=time.perf_counter() - start,
        refused=len(refusals),
        refusals=tuple(refusals),
    )
