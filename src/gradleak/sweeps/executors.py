"""Executors run a sweep's jobs and hand back each stored row as soon as it finishes (registry
`EXECUTORS`):

- `local`: in this process, one run after another (`workers=1`, the default), or in N spawned worker
  processes.
- `ray`: Ray tasks, one CPU each, on a local Ray started with `ray.init(num_cpus=workers)`, or on an
  existing cluster at `address` (`host:port`, `ray://host:port`, or `auto`). An address that does not
  answer is a one-line error, found before Ray is asked (Ray itself would retry for minutes).

Every executor calls the same `execute(job)`, which seeds everything from the spec, so the records
are the same whichever runs them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Protocol

from gradleak.errors import GradleakError
from gradleak.store import StoredRun
from gradleak.sweeps.jobs import Job, Progress, execute, make_row, one_line

log = logging.getLogger(__name__)

OnStart = Callable[[Job], None]
OnResult = Callable[[StoredRun], None]


class Executor(Protocol):
    name: str

    def run(
        self,
        jobs: Sequence[Job],
        on_result: OnResult,
        on_start: OnStart | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Run every job; call `on_result` with each row as it finishes (in the caller's process)."""
        ...


@dataclass
class LocalExecutor:
    workers: int = 1
    name: str = "local"

    def run(
        self,
        jobs: Sequence[Job],
        on_result: OnResult,
        on_start: OnStart | None = None,
        progress: Progress | None = None,
    ) -> None:
        if self.workers <= 1:
            for job in jobs:
                if on_start is not None:
                    on_start(job)
                on_result(execute(job, progress))
            return
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(execute, job): job for job in jobs}
            for future in as_completed(futures):
                on_result(_result(future.result, futures[future]))


@dataclass
class RayExecutor:
    workers: int = 1
    address: str | None = None
    name: str = "ray"

    def __post_init__(self) -> None:  # fail before a store is touched
        if self.address not in (None, "", "auto", "local"):
            check_reachable(self.address)
        _import_ray()

    def run(
        self,
        jobs: Sequence[Job],
        on_result: OnResult,
        on_start: OnStart | None = None,
        progress: Progress | None = None,
    ) -> None:
        ray = _import_ray()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports home from a closed network
        started = not ray.is_initialized()
        if started:
            kwargs: dict[str, object] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
            }
            if self.address:
                kwargs["address"] = None if self.address == "local" else self.address
            if not self.address or self.address == "local":
                kwargs["num_cpus"] = max(1, self.workers)
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray raises many types; the user needs one line
                raise GradleakError(
                    f"cannot start or reach Ray at {self.address or 'a local instance'}: {one_line(exc)}"
                ) from None
        try:
            task = ray.remote(num_cpus=1, max_retries=0)(execute)
            pending = {task.remote(job): job for job in jobs}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                job = pending.pop(ref)
                on_result(_result(lambda ref=ref: ray.get(ref), job))
        finally:
            if started:
                ray.shutdown()


def _result(get: Callable[[], StoredRun], job: Job) -> StoredRun:
    """The row of a finished job; a worker that died (not a failing run, which `execute` records
    itself) becomes a failed row too."""
    started = time.time()
    try:
        return get()
    except Exception as exc:  # noqa: BLE001 - a crashed worker must not stop the sweep
        return make_row(job, started, None, f"worker failed: {one_line(exc)}")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise GradleakError('the ray executor needs Ray: pip install "gradleak[ray]"') from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One-line error unless something listens at the Ray address (`host:port` or `ray://host:port`)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise GradleakError(f"Ray address {address!r} is not host:port, ray://host:port, auto or local")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise GradleakError(f"Ray address {address} is unreachable: {exc.strerror or exc}") from None


EXECUTORS: dict[str, Callable[..., Executor]] = {
    "local": lambda workers, address: LocalExecutor(workers),
    "ray": lambda workers, address: RayExecutor(workers, address),
}


def make_executor(name: str, workers: int = 1, address: str | None = None) -> Executor:
    if workers < 1:
        raise GradleakError(f"workers must be at least 1, got {workers}")
    if name not in EXECUTORS:
        raise GradleakError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    if address and name != "ray":
        raise GradleakError("--address names a Ray cluster: use it with --executor ray")
    return EXECUTORS[name](workers, address)
