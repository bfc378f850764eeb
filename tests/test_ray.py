"""The Ray executor gives the same records as the in-process one for fixed seeds."""

from __future__ import annotations

import pytest

from gradleak.store import Store
from gradleak.sweeps import Job, parse_plan, run_sweep
from gradleak.sweeps.executors import LocalExecutor, RayExecutor

pytest.importorskip("ray", reason='Ray is not installed: pip install -e ".[ray]" (.ci/run installs it)')


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
