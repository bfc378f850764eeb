"""Scaling out: each worker's torch thread budget (cores // workers, or --threads), said in every run's
environment record, and the one-line refusals of the scaling options (--threads, --gpus-per-run,
--device cuda where there is no GPU). The Ray cluster tests are in test_ray.py."""

from __future__ import annotations

import os

import pytest
import torch
from _cli import main_in_process

from gradleak.errors import GradleakError
from gradleak.store import Store
from gradleak.sweeps import execute, parse_plan, run_sweep
from gradleak.sweeps.executors import LocalExecutor, make_executor
from gradleak.sweeps.resources import (
    ThreadBudget,
    available_cores,
    check_gpus_per_run,
    cluster_budget,
    thread_budget,
    torch_threads,
)

SPEC = '[grid]\nseed = [0, 1]\n[fixed]\nvictim = "bert-tiny"\ndata = "sample"\nattack = "tag"\n'


def _quick(seeds: int):
    doc = {"victim": "bert-tiny", "data": "sample", "attack": "tag", "iterations": 2, "known_lengths": True}
    return parse_plan({"grid": {"seed": list(range(seeds))}, "fixed": doc}).jobs


@pytest.mark.parametrize(
    ("workers", "cores", "threads", "reason"),
    [
        (1, 2, 2, "2 cores // 1 worker"),
        (2, 2, 1, "2 cores // 2 workers"),
        (3, 2, 1, "2 cores // 3 workers"),  # at least one
        (3, 8, 2, "8 cores // 3 workers"),
        (4, 1, 1, "1 core // 4 workers"),
    ],
)
def test_each_worker_gets_cores_over_workers_threads(workers, cores, threads, reason):
    assert thread_budget(workers, cores=cores) == ThreadBudget(threads, reason)


def test_threads_override_the_budget_and_must_be_positive():
    assert thread_budget(2, threads=5, cores=2) == ThreadBudget(5, "--threads 5")
    with pytest.raises(GradleakError, match="--threads must be at least 1, got 0"):
        thread_budget(2, threads=0)


def test_the_cores_are_the_affinity_capped_by_omp_num_threads(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert available_cores() == (affinity, f"{affinity} core{'' if affinity == 1 else 's'}")
    monkeypatch.setenv("OMP_NUM_THREADS", str(affinity + 4))  # more than there are: the affinity
    assert available_cores()[0] == affinity
    if affinity > 1:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert available_cores() == (1, "1 core (OMP_NUM_THREADS)")
        assert thread_budget(2) == ThreadBudget(1, "1 core (OMP_NUM_THREADS) // 2 workers")


def test_on_a_cluster_the_budget_shares_its_cpus_within_one_node():
    assert cluster_budget(2, None, [1, 1]) == ThreadBudget(1, "2 cluster CPUs // 2 workers")
    assert cluster_budget(1, None, [8, 8, 0]) == ThreadBudget(
        8, "16 cluster CPUs // 1 worker, capped at the largest node's 8"
    )
    assert cluster_budget(4, None, [8, 8]) == ThreadBudget(4, "16 cluster CPUs // 4 workers")
    assert cluster_budget(1, 2, [2, 1]) == ThreadBudget(2, "--threads 2")
    with pytest.raises(
        GradleakError, match="no node of the Ray cluster has that many CPUs .the largest has 2."
    ):
        cluster_budget(1, 3, [2, 2])
    with pytest.raises(GradleakError, match="has no CPUs to run on"):
        cluster_budget(1, None, [0.0])


@pytest.mark.parametrize("gpus", [0.25, 0.5, 1, 2, 4])
def test_gpus_per_run_ray_can_give(gpus):
    check_gpus_per_run(gpus)


@pytest.mark.parametrize(
    ("gpus", "message"),
    [(0, "must be more than 0, got 0"), (-1, "more than 0"), (1.5, "at most 1 or a whole number, got 1.5")],
)
def test_gpus_per_run_ray_cannot_give(gpus, message):
    with pytest.raises(GradleakError, match=message):
        check_gpus_per_run(gpus)


def test_torch_threads_sets_the_budget_for_the_block_only():
    before = torch.get_num_threads()
    with torch_threads(ThreadBudget(before + 1, "test")) as threads:
        assert threads == torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with torch_threads(None) as threads:
        assert threads == before


def test_in_process_runs_record_their_budget_and_leave_the_threads_as_they_were(tmp_path):
    before = torch.get_num_threads()
    jobs = _quick(1)
    with Store.open(tmp_path / "s.sqlite", create=True) as store:
        run_sweep(jobs, store, LocalExecutor(cores=2))
        (row,) = store.runs()
    assert torch.get_num_threads() == before
    env = row.record["environment"]
    assert (env["torch_threads"], env["thread_budget"]) == ("2", "2 cores // 1 worker")
    with Store.open(tmp_path / "t.sqlite", create=True) as store:
        run_sweep(jobs, store, LocalExecutor(threads=3))
        (row,) = store.runs()
    assert torch.get_num_threads() == before
    env = row.record["environment"]
    assert (env["torch_threads"], env["thread_budget"]) == ("3", "--threads 3")
    plain = execute(jobs[0]).record["environment"]  # no executor: this process's own setting
    assert (plain["torch_threads"], plain["thread_budget"]) == (str(before), "this process's setting")


def test_worker_processes_each_get_their_share_of_the_cores(tmp_path):
    """Two spawned workers sharing four cores: two torch threads each, as their records say."""
    with Store.open(tmp_path / "s.sqlite", create=True) as store:
        summary = run_sweep(_quick(2), store, LocalExecutor(workers=2, cores=4))
        rows = store.runs()
    assert summary.to_json()["done"] == 2, summary.errors
    for row in rows:
        env = row.record["environment"]
        assert (env["torch_threads"], env["thread_budget"]) == ("2", "4 cores // 2 workers")


def test_make_executor_checks_the_scaling_options():
    with pytest.raises(GradleakError, match="--threads must be at least 1"):
        make_executor("local", threads=0)
    with pytest.raises(GradleakError, match="--gpus-per-run must be more than 0"):
        make_executor("ray", gpus_per_run=0)
    with pytest.raises(GradleakError, match="use it with --executor ray"):
        make_executor("local", gpus_per_run=0.5)


def test_scaling_options_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC, encoding="utf-8")
    store = tmp_path / "s.sqlite"
    sweep = ("sweep", str(spec), "--store", str(store))
    cases = [
        ((*sweep, "--threads", "0"), "--threads must be at least 1, got 0"),
        ((*sweep, "--workers", "2", "--threads", "-1"), "--threads must be at least 1, got -1"),
        ((*sweep, "--gpus-per-run", "0"), "--gpus-per-run must be more than 0, got 0"),
        ((*sweep, "--executor", "ray", "--gpus-per-run", "-0.5"), "--gpus-per-run must be more than 0"),
        ((*sweep, "--executor", "ray", "--gpus-per-run", "1.5"), "at most 1 or a whole number, got 1.5"),
        ((*sweep, "--gpus-per-run", "0.5"), "--gpus-per-run asks Ray for GPUs: use it with --executor ray"),
        (("conditions", "--threads", "0", "--out", str(tmp_path / "c.md")), "--threads must be at least 1"),
    ]
    if not torch.cuda.is_available():
        cases.append(((*sweep, "--device", "cuda"), "--device cuda: CUDA is not available on this machine"))
    for args, message in cases:
        code, stderr = main_in_process(args, capsys, monkeypatch)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, stderr)
        assert lines[0].startswith("error: ") and message in lines[0], (args, stderr)
    if store.exists():
        with Store.open(store) as s:
            assert s.count() == 0  # nothing ran
