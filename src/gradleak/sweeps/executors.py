"""Executors run a sweep's jobs and hand back each stored row as soon as it finishes (registry
`EXECUTORS`):

- `local`: in this process, one run after another (`workers=1`, the default), or in N spawned worker
  processes.
- `ray`: Ray tasks on a local Ray started with `ray.init(num_cpus=workers * threads)`, or on an
  existing cluster at `address` (`host:port`, `ray://host:port`, or `auto`). An address that does not
  answer is a one-line error, found before Ray is asked (Ray itself would retry for minutes). A task
  whose worker or node dies is retried elsewhere (`RETRIES` times), then stored as failed; the store
  is written by the driver only, one row per run.

Resources (`gradleak.sweeps.resources`): every executor gives each run `cores // workers` torch
threads (at least one; `threads` overrides) and each run's record says how many. On Ray a task asks
for as many CPUs as it has threads, and a run on `cuda` for `gpus_per_run` GPUs (default 1; a fraction
shares a GPU); a sweep of cuda runs on a cluster without GPUs (or a machine without CUDA) is refused
before any run starts.

Every executor calls the same `execute(job)`, which seeds everything from the spec, so the records
are the same whichever runs them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Protocol

from gradleak.errors import GradleakError
from gradleak.store import StoredRun
from gradleak.sweeps.jobs import Job, Progress, execute, make_row, one_line
from gradleak.sweeps.resources import (
    ThreadBudget,
    check_gpus_per_run,
    check_threads,
    cluster_budget,
    thread_budget,
    wants_gpu,
)

log = logging.getLogger(__name__)

OnStart = Callable[[Job], None]
OnResult = Callable[[StoredRun], None]

RETRIES = 2  # times Ray runs a task again whose worker or node died (a failing run is a row, not retried)


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
    threads: int | None = None  # torch threads per run (default: cores // workers)
    cores: int | None = None  # the CPUs the workers share (default: this process's)
    name: str = "local"

    def budget(self) -> ThreadBudget:
        return thread_budget(self.workers, self.threads, self.cores)

    def run(
        self,
        jobs: Sequence[Job],
        on_result: OnResult,
        on_start: OnStart | None = None,
        progress: Progress | None = None,
    ) -> None:
        if not jobs:
            return
        _check_cuda_here(jobs)
        budget = self.budget()
        log.info(
            "%d run(s), %d at once, %d torch thread(s) each (%s)",
            len(jobs),
            self.workers,
            budget.threads,
            budget.reason,
        )
        if self.workers <= 1:
            for job in jobs:
                if on_start is not None:
                    on_start(job)
                on_result(execute(job, progress, budget))
            return
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(execute, job, None, budget): job for job in jobs}
            for future in as_completed(futures):
                on_result(_result(future.result, futures[future]))


@dataclass
class RayExecutor:
    workers: int = 1
    address: str | None = None
    threads: int | None = None  # torch threads (and Ray CPUs) per run (default: CPUs // workers)
    gpus_per_run: float | None = None  # GPUs a cuda run asks for (default 1)
    retries: int = RETRIES
    name: str = "ray"

    def __post_init__(self) -> None:  # fail before a store is touched
        if self.threads is not None:
            check_threads(self.threads)
        if self.gpus_per_run is not None:
            check_gpus_per_run(self.gpus_per_run)
        if not self.local:
            check_reachable(self.address or "")
        _import_ray()

    @property
    def local(self) -> bool:
        """Whether this executor starts its own Ray on this machine (no address, or `local`)."""
        return self.address in (None, "", "local")

    def _where(self) -> str:
        return "the local Ray" if self.local else f"the Ray cluster at {self.address}"

    def run(
        self,
        jobs: Sequence[Job],
        on_result: OnResult,
        on_start: OnStart | None = None,
        progress: Progress | None = None,
    ) -> None:
        if not jobs:
            return
        ray = _import_ray()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports home from a closed network
        started = not ray.is_initialized()
        budget: ThreadBudget | None = None
        if started:
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
            }
            kwargs["address"] = "local" if self.local else self.address  # never a cluster found by chance
            if self.local:  # our own Ray: room for `workers` runs of `threads` CPUs each
                budget = thread_budget(self.workers, self.threads)
                kwargs["num_cpus"] = self.workers * budget.threads
            try:
                ray.init(**kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray raises many types; the user needs one line
                raise GradleakError(
                    f"cannot start or reach Ray at {self.address or 'a local instance'}: {one_line(exc)}"
                ) from None
        with _quiet_driver(ray):  # until Ray is shut down: its messages come late
            try:
                nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
                if budget is None:  # a cluster someone else started: share its CPUs
                    budget = cluster_budget(
                        self.workers, self.threads, (n.get("CPU", 0) for n in nodes), self._where()
                    )
                gpus = self._gpus(jobs, [float(n.get("GPU", 0)) for n in nodes])
                log.info(
                    "%d run(s) on %s: %d CPU(s) each (%s)",
                    len(jobs),
                    self._where(),
                    budget.threads,
                    budget.reason,
                )
                task = ray.remote(ray_execute)
                pending = {
                    task.options(**self.options(job, budget, gpus)).remote(job, budget): job for job in jobs
                }
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    ref = ready[0]
                    job = pending.pop(ref)
                    on_result(_result(lambda ref=ref: ray.get(ref), job))
            finally:
                if started:
                    ray.shutdown()

    def options(self, job: Job, budget: ThreadBudget, gpus: float) -> dict[str, Any]:
        """What a run's Ray task asks for: a CPU per thread, its GPUs when it runs on cuda, and how
        often Ray may run it again when its worker or node dies."""
        return {
            "num_cpus": budget.threads,
            "num_gpus": gpus if wants_gpu(job.spec) else 0,
            "max_retries": self.retries,
        }

    def _gpus(self, jobs: Sequence[Job], node_gpus: list[float]) -> float:
        """The GPUs each cuda run asks for; a one-line refusal when the cluster cannot give them."""
        cuda = any(wants_gpu(j.spec) for j in jobs)
        if not cuda:
            if self.gpus_per_run is not None:
                raise GradleakError("--gpus-per-run is for runs on a GPU: add --device cuda")
            return 0.0
        per_run = self.gpus_per_run if self.gpus_per_run is not None else 1.0
        most = max(node_gpus, default=0.0)
        if most <= 0:
            raise GradleakError(f"--device cuda: {self._where()} has no GPUs")
        if per_run > most:
            raise GradleakError(
                f"--gpus-per-run {per_run:g}: no node of {self._where()} has that many GPUs "
                f"(the most is {most:g})"
            )
        return per_run


def ray_execute(job: Job, budget: ThreadBudget) -> StoredRun:
    """`execute` in a Ray task; the record's environment also names the node that ran it."""
    import ray

    row = execute(job, None, budget)
    if row.record is not None:
        row.record.setdefault("environment", {})["ray_node"] = ray.get_runtime_context().get_node_id()
    return row


def _check_cuda_here(jobs: Sequence[Job]) -> None:
    """A sweep of cuda runs on a machine without CUDA is refused before the first run."""
    if any(wants_gpu(j.spec) for j in jobs):
        import torch

        if not torch.cuda.is_available():
            raise GradleakError("--device cuda: CUDA is not available on this machine")


@contextmanager
def _quiet_driver(ray: Any) -> Iterator[None]:
    """Keep Ray's driver from printing its workers' and raylets' messages (a node that died, a task
    retried: several lines each) to stdout, where `--json -` writes; the executor logs what matters.
    Ray's own debugger switches them off the same way."""
    worker = getattr(getattr(ray, "_private", None), "worker", None)
    if worker is None or not hasattr(worker, "_worker_logs_enabled"):
        yield
        return
    before = worker._worker_logs_enabled
    worker._worker_logs_enabled = False
    try:
        yield
    finally:
        worker._worker_logs_enabled = before


def _result(get: Callable[[], StoredRun], job: Job) -> StoredRun:
    """The row of a finished job; a worker that died (not a failing run, which `execute` records
    itself) becomes a failed row too."""
    started = time.time()
    try:
        return get()
    except Exception as exc:  # noqa: BLE001 - a crashed worker must not stop the sweep
        log.warning("run %s: its worker died: %s", job.label(), one_line(exc))
        return make_row(job, started, None, f"worker failed: {one_line(exc)}")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise GradleakError('the ray executor needs Ray: pip install "gradleak[ray]"') from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """One-line error unless something listens at the Ray address (`host:port` or `ray://host:port`)."""
    if address == "auto":
        return
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
    "local": lambda workers, address, threads, gpus_per_run: LocalExecutor(workers, threads),
    "ray": lambda workers, address, threads, gpus_per_run: RayExecutor(
        workers, address, threads, gpus_per_run
    ),
}


def make_executor(
    name: str,
    workers: int = 1,
    address: str | None = None,
    threads: int | None = None,
    gpus_per_run: float | None = None,
) -> Executor:
    if workers < 1:
        raise GradleakError(f"workers must be at least 1, got {workers}")
    if threads is not None:
        check_threads(threads)
    if gpus_per_run is not None:
        check_gpus_per_run(gpus_per_run)
    if name not in EXECUTORS:
        raise GradleakError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    if address and name != "ray":
        raise GradleakError("--address names a Ray cluster: use it with --executor ray")
    if gpus_per_run is not None and name != "ray":
        raise GradleakError("--gpus-per-run asks Ray for GPUs: use it with --executor ray")
    return EXECUTORS[name](workers, address, threads, gpus_per_run)


def forget_address(address: str) -> None:
    """Take a cluster's address out of Ray's `ray_current_cluster` file (`ray.cluster_utils.Cluster`
    writes it for convenience), so that a plain `ray.init()` elsewhere on this machine does not join
    that cluster."""
    from pathlib import Path

    try:
        from ray._common.utils import get_ray_address_file

        path = Path(get_ray_address_file(None))
        if path.read_text().strip() == address:
            path.unlink()
    except (ImportError, OSError):  # another Ray's layout, or no file: nothing to forget
        pass
