"""What each run of a sweep may use: torch threads (a budget per worker) and, on Ray, GPUs.

Thread budget: N workers share the cores, so each worker's torch gets `cores // N` threads (at least
one) and N workers never oversubscribe the machine; `threads` (`--threads`) overrides. `cores` is what
this process may run on: its CPU affinity, capped by `OMP_NUM_THREADS` when that is set (the thread
budget the user already gave the whole job). On an existing Ray cluster it is the cluster's CPUs, and a
run never gets more threads than the largest node has. Every run's environment record says what it
got: `torch_threads` (as torch reported inside the run) and `thread_budget` (how that number came
about, e.g. `2 cores // 2 workers`).

GPUs: a run whose device is `cuda` asks Ray for `gpus_per_run` GPUs (1 by default; a fraction lets
several small runs share one GPU, as Ray schedules them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gradleak.errors import GradleakError


@dataclass(frozen=True)
class ThreadBudget:
    """The torch threads of each run, and how that number came about (for the environment record)."""

    threads: int
    reason: str

    def environment(self, actual: int) -> dict[str, str]:
        return {"torch_threads": str(actual), "thread_budget": self.reason}


def available_cores() -> tuple[int, str]:
    """The CPUs this process may use, and what they are in words: its affinity (all cores by
    default), or `OMP_NUM_THREADS` when that is set and smaller."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and 1 <= int(omp) < cores:
        return int(omp), f"{_plural(int(omp), 'core')} (OMP_NUM_THREADS)"
    return cores, _plural(cores, "core")


def thread_budget(workers: int, threads: int | None = None, cores: int | None = None) -> ThreadBudget:
    """Each of `workers` workers gets `cores // workers` threads (at least one), `cores` being this
    process's CPUs unless given; `threads` overrides."""
    if threads is not None:
        check_threads(threads)
        return ThreadBudget(threads, f"--threads {threads}")
    if cores is None:
        cores, what = available_cores()
    else:
        what = _plural(cores, "core")
    return ThreadBudget(max(1, cores // workers), f"{what} // {_plural(workers, 'worker')}")


def cluster_budget(
    workers: int, threads: int | None, node_cpus: Iterable[float], where: str = "the Ray cluster"
) -> ThreadBudget:
    """The budget on a Ray cluster whose alive nodes have `node_cpus` CPUs: its CPUs // workers, but
    never more than the largest node has (a run runs on one node); `threads` overrides."""
    cpus = [int(c) for c in node_cpus]
    total, largest = sum(cpus), max(cpus, default=0)
    if largest < 1:
        raise GradleakError(f"{where} has no CPUs to run on")
    if threads is not None:
        check_threads(threads)
        if threads > largest:
            raise GradleakError(
                f"--threads {threads}: no node of {where} has that many CPUs (the largest has {largest})"
            )
        return ThreadBudget(threads, f"--threads {threads}")
    share = total // workers
    reason = f"{_plural(total, 'cluster CPU')} // {_plural(workers, 'worker')}"
    if share > largest:
        reason += f", capped at the largest node's {largest}"
    return ThreadBudget(max(1, min(share, largest)), reason)


def check_threads(threads: int) -> None:
    if threads < 1:
        raise GradleakError(f"--threads must be at least 1, got {threads}")


def check_gpus_per_run(gpus: float) -> None:
    """Ray takes a fraction of one GPU, or a whole number of them."""
    if not gpus > 0:
        raise GradleakError(f"--gpus-per-run must be more than 0, got {gpus:g}")
    if gpus > 1 and gpus != int(gpus):
        raise GradleakError(f"--gpus-per-run must be at most 1 or a whole number, got {gpus:g}")


def wants_gpu(spec: object) -> bool:
    """Whether a run's spec puts it on a GPU (device `cuda` or `cuda:N`)."""
    return str(getattr(spec, "device", "cpu")).startswith("cuda")


@contextmanager
def torch_threads(budget: ThreadBudget | None) -> Iterator[int]:
    """Run the block with the budget's torch threads (then put back what was there); yields the
    number torch reports. No budget: this process's own setting."""
    import torch

    before = torch.get_num_threads()
    if budget is not None and budget.threads != before:
        torch.set_num_threads(budget.threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
