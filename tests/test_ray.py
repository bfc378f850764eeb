"""The Ray executor: the same records as the in-process one for fixed seeds, and on a real multi-node
cluster on this machine (`ray.cluster_utils.Cluster`: a head with no CPUs, worker nodes on loopback)
runs lose none and store none twice when a node is killed mid-sweep, take their thread budget from the
cluster's CPUs, and ask for GPUs when they run on cuda (a cluster without any refuses the sweep)."""

from __future__ import annotations

import os
import time

import pytest
from _cli import main_in_process

from gradleak.errors import GradleakError
from gradleak.store import Store
from gradleak.sweeps import Job, parse_plan, run_sweep
from gradleak.sweeps.executors import LocalExecutor, RayExecutor, forget_address

pytest.importorskip("ray", reason='Ray is not installed: pip install -e ".[ray]" (.ci/run installs it)')

# the head notices a dead node after 2 missed health checks 0.5 s apart (Ray's default: 5 of 3 s)
FAST_FAILURE = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 2,
}


def _plan() -> tuple[Job, ...]:
    exact = parse_plan(
        {
            "grid": {"seed": [0]},
            "fixed": {"victim": "gpt2-tiny", "data": "sst2", "batch_size": 2, "attack": "exact"},
        }
    )
    tag = parse_plan(
        {
            "grid": {"seed": [0]},
            "fixed": {"victim": "bert-tiny", "data": "sst2", "attack": "tag", "iterations": 20},
        }
    )
    return exact.jobs + tag.jobs


def _quick(seeds: int, **fixed: object) -> tuple[Job, ...]:
    """Short runs (TAG, a few steps on a random 2-layer BERT), one per seed."""
    doc = {"victim": "bert-tiny", "data": "sample", "attack": "tag", "iterations": 3, "known_lengths": True}
    return parse_plan({"grid": {"seed": list(range(seeds))}, "fixed": {**doc, **fixed}}).jobs


def _records(path, executor) -> dict[str, dict]:
    with Store.open(path, create=True) as store:
        summary = run_sweep(_plan(), store, executor)
        expected = {"total": 2, "done": 2, "skipped": 0, "failed": 0, "refused": 0}
        assert summary.to_json() == expected, summary.errors
        return {r.key: r.record for r in store.runs()}


def test_local_and_ray_executors_give_identical_scores(tmp_path):
    local = _records(tmp_path / "local.sqlite", LocalExecutor())
    remote = _records(tmp_path / "ray.sqlite", RayExecutor(workers=2))
    assert local.keys() == remote.keys()
    for key, rec in local.items():
        other = remote[key]
        for field in ("scores", "references", "reconstructions", "privacy", "spec", "inferred_labels"):
            assert rec[field] == other[field], (field, rec["attack"])
        assert other["environment"]["torch_threads"] == "1"  # 1 core (OMP_NUM_THREADS=1) // 2 workers


# ------------------------------------------------------------------ a multi-node cluster


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs (so every run goes to a worker node) and one worker node of 1 CPU."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    head = {"num_cpus": 0, "include_dashboard": False, "_system_config": FAST_FAILURE}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    forget_address(cluster.address)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_cuda_sweep_on_a_cluster_without_gpus_is_one_line(cluster, tmp_path, capsys, monkeypatch):
    spec = tmp_path / "spec.toml"
    spec.write_text('[grid]\nseed = [0, 1]\n[fixed]\nvictim = "bert-tiny"\ndata = "sample"\nattack = "tag"\n')
    store = tmp_path / "s.sqlite"
    ray_sweep = ("sweep", str(spec), "--store", str(store), "--executor", "ray", "--address", cluster.address)
    cases = [
        ((*ray_sweep, "--device", "cuda"), f"--device cuda: the Ray cluster at {cluster.address} has no GPU"),
        ((*ray_sweep, "--gpus-per-run", "0.5"), "--gpus-per-run is for runs on a GPU: add --device cuda"),
        ((*ray_sweep, "--threads", "2"), "--threads 2: no node of the Ray cluster"),
    ]
    for args, message in cases:
        code, stderr = main_in_process(args, capsys, monkeypatch)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, stderr)
        assert lines[0].startswith("error: ") and message in lines[0], (args, stderr)
    with Store.open(store) as s:
        assert s.count() == 0  # refused before any run


def test_cuda_runs_ask_ray_for_a_share_of_a_gpu(cluster, tmp_path):
    """A node that says it has one GPU (a resource only: this machine has no CUDA) takes two runs of
    half a GPU each; they fail in the run itself (no CUDA), which proves Ray placed them there."""
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        jobs = _quick(2, device="cuda")
        executor = RayExecutor(workers=1, address=cluster.address, gpus_per_run=0.5)
        assert executor.options(jobs[0], executor_budget(1), 0.5) == {
            "num_cpus": 1,
            "num_gpus": 0.5,
            "max_retries": 2,
        }
        cpu_job = _quick(1)[0]
        assert executor.options(cpu_job, executor_budget(1), 0.5)["num_gpus"] == 0
        with Store.open(tmp_path / "s.sqlite", create=True) as store:
            summary = run_sweep(jobs, store, executor)
            rows = store.runs()
        assert summary.to_json()["failed"] == 2
        assert all("CUDA is not available" in (r.error or "") for r in rows), [r.error for r in rows]
        with Store.open(tmp_path / "s.sqlite") as store:
            with pytest.raises(GradleakError, match="no node of the Ray cluster .* has that many GPUs"):
                run_sweep(jobs, store, RayExecutor(address=cluster.address, gpus_per_run=2))
    finally:
        cluster.remove_node(gpu_node)


def executor_budget(threads: int):
    from gradleak.sweeps.resources import ThreadBudget

    return ThreadBudget(threads, "test")


def _busy(node) -> bool:
    """Whether a Ray worker of this node is running a run now (Ray titles it after the task)."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for proc in raylet.children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::ray_execute"):
            return True
    return False


def _node_processes(node) -> list:
    """The node's raylet and every process under it (its Ray workers)."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


def _kill_all(procs: list) -> None:
    """SIGKILL whatever of `procs` still runs, and wait until none does."""
    import psutil

    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def test_a_node_killed_mid_sweep_loses_no_run_and_stores_none_twice(cluster, tmp_path, capsys):
    """Two worker nodes of 1 CPU; once the first run is stored and the second node is running one,
    that node is killed (SIGKILL, no grace): its run is retried on the other node, every run is
    reported once and stored once, by the driver."""
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    jobs = _quick(6)
    reported: list[str] = []
    kill: dict[str, object] = {}

    def on_result(row) -> None:
        reported.append(row.key)
        if kill:
            return
        deadline = time.monotonic() + 30
        while not _busy(doomed) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill.update(busy=_busy(doomed), node=doomed.node_id)
        workers = _node_processes(doomed)
        cluster.remove_node(doomed, allow_graceful=False)
        _kill_all(workers)  # the raylet's workers can outlive it for a moment: the whole node dies here
        kill["at"] = time.time()

    executor = RayExecutor(workers=2, address=cluster.address)
    with Store.open(tmp_path / "s.sqlite", create=True) as store:
        summary = run_sweep(jobs, store, executor, on_result=on_result)
        rows = store.runs()
    assert kill["busy"], "the node was killed while it ran no run"
    assert capsys.readouterr().out == ""  # Ray's messages about the dead node stay off stdout (--json -)
    keys = sorted(j.key for j in jobs)
    assert sorted(reported) == keys  # each run reported once
    assert sorted(r.key for r in rows) == keys  # and stored once
    assert summary.to_json() == {"total": 6, "done": 6, "skipped": 0, "failed": 0, "refused": 0}, summary
    for row in rows:
        env = row.record["environment"]
        assert env["torch_threads"] == "1" and env["thread_budget"] == "2 cluster CPUs // 2 workers"
        if env["ray_node"] == kill["node"]:  # what the dead node ran, it finished before it died
            assert row.finished <= kill["at"]
    assert sum(r.record["environment"]["ray_node"] != kill["node"] for r in rows) >= 5
