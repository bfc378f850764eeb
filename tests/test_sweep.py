"""Sweeps: TOML grids, the SQLite store, resuming after SIGKILL, failing runs, and bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import main_in_process

from gradleak.errors import GradleakError
from gradleak.experiment import RunSpec
from gradleak.store import Store, StoredRun, run_key
from gradleak.sweeps import Job, load_plan, parse_plan, run_sweep
from gradleak.sweeps.executors import LocalExecutor, make_executor


def counts(summary: dict) -> dict:
    """A sweep summary's total/done/skipped/failed, with no run refused (where it counts refusals)."""
    assert summary.get("refused", 0) == 0, summary
    return {k: v for k, v in summary.items() if k != "refused"}


ISSUE_SPEC = """\
[grid]
victim = ["gpt2-tiny"]
data = ["sst2"]
batch_size = [1, 2]
attack = ["exact"]
seed = [0, 1]
"""

# six runs of a random 2-layer BERT, TAG on the built-in sample (lengths known: TAG needs them), each
# long enough (40 steps: seconds, not milliseconds) that a SIGKILL after the first lands mid-sweep
SLOW_SPEC = """\
name = "six"
[grid]
batch_size = [1, 2]
seed = [0, 1, 2]
[fixed]
victim = "bert-tiny"
data = "sample"
attack = "tag"
iterations = 40
known_lengths = true
"""


def gradleak(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradleak", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ grids


def test_the_issue_spec_expands_to_four_runs(tmp_path):
    plan = load_plan(write(tmp_path, ISSUE_SPEC))
    specs = [j.spec for j in plan.jobs]
    assert len(specs) == 4
    assert {(s.batch_size, s.seed) for s in specs} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert all(s.victim == "gpt2-tiny" and s.attack == "exact" and s.data == "sst2" for s in specs)


def test_grid_defences_constants_and_coercion():
    plan = parse_plan(
        {
            "grid": {
                "defenses": [[], ["clip:norm=1", "gaussian:multiplier=1"], "gaussian:sigma=1e-4"],
                "attack": "dlg",  # a single value in [grid] is a constant
            },
            "fixed": {"time_budget": 5, "withhold": "embeddings"},  # an int widens to a float
        }
    )
    chains = [j.spec.defenses for j in plan.jobs]
    assert chains == [(), ("clip:norm=1", "gaussian:multiplier=1"), ("gaussian:sigma=1e-4",)]
    spec = plan.jobs[0].spec
    assert spec.attack == "dlg" and spec.time_budget == 5.0 and isinstance(spec.time_budget, float)
    assert spec.withhold == ("embeddings",)


def test_a_training_grid_gives_training_specs():
    plan = parse_plan(
        {"kind": "train", "grid": {"defenses": [[], "dp-sgd:clip=1,multiplier=1"]}, "fixed": {"steps": 3}}
    )
    assert plan.kind == "train" and [type(j.spec).__name__ for j in plan.jobs] == ["TrainSpec", "TrainSpec"]
    assert [j.spec.defenses for j in plan.jobs] == [(), ("dp-sgd:clip=1,multiplier=1",)]
    assert all(j.spec.steps == 3 for j in plan.jobs)


def test_duplicate_runs_are_kept_once():
    plan = parse_plan({"grid": {"seed": [0, 0, 1]}})
    assert [j.spec.seed for j in plan.jobs] == [0, 1]


def test_the_key_is_the_canonical_spec():
    a = Job("attack", RunSpec(seed=1, time_budget=5.0))
    b = Job("attack", RunSpec(time_budget=5, seed=1))
    assert a.key == b.key == run_key("attack", RunSpec(seed=1, time_budget=5.0))
    assert a.key != Job("attack", RunSpec(seed=2)).key
    assert a.key != Job("train", RunSpec(seed=1, time_budget=5.0)).key


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"grid": {"victims": ["bert-tiny"]}}, "unknown key 'victims' in [grid]"),
        ({"fixed": {"colour": "red"}}, "unknown key 'colour' in [fixed]"),
        ({"grid": {"seed": [0]}, "sweep": {}}, "unknown key 'sweep'"),
        ({"grid": {"batch_size": ["two"]}}, "batch_size must be an int"),
        ({"grid": {"batch_size": [True]}}, "batch_size must be an int"),
        ({"grid": {"seed": []}}, "seed is an empty list"),
        ({"fixed": {"seed": [0, 1]}}, "seed must be a single int"),
        ({"grid": {"defenses": [[1]]}}, "must be a string or a list of strings"),
        ({"grid": {"attack": ["tag", "nope"]}}, "unknown attack"),
        ({"grid": {"defenses": [["blur:radius=2"]]}}, "unknown defence 'blur'"),
        ({"grid": {"seed": [0]}, "fixed": {"seed": 1}}, "in both [grid] and [fixed]"),
        ({"kind": "bake", "grid": {"seed": [0]}}, "unknown kind of run 'bake'"),
        ({}, "nothing to run"),
        ({"grid": 3}, "grid must be a table"),
    ],
)
def test_bad_specs_are_one_line_errors(doc, message):
    with pytest.raises(GradleakError) as err:
        parse_plan(doc)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_malformed_toml(tmp_path):
    with pytest.raises(GradleakError, match="malformed TOML"):
        load_plan(write(tmp_path, "[grid\nseed = [0"))


# ------------------------------------------------------------------ the store


def _row(key: str, status: str = "done") -> StoredRun:
    record = {"scores": {"rouge1": 1.0}} if status == "done" else None
    return StoredRun(
        key, "attack", {"seed": 0}, status, record, None if record else "boom", 1.0, 2.0, "0.1.0"
    )


def test_store_round_trip_and_replace(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store.open(path, create=True) as store:
        store.put(_row("a", "failed"))
        store.put(_row("b"))
        assert store.finished_keys() == {"b"}
        store.put(_row("a"))  # a failed run that later succeeds replaces its row
        assert store.finished_keys() == {"a", "b"} and store.count() == 2
    with Store.open(path) as store:
        runs = store.runs()
        assert {r.key for r in runs} == {"a", "b"}
        assert all(r.done and r.record == {"scores": {"rouge1": 1.0}} for r in runs)
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_other_files_are_not_stores(tmp_path):
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a database at all, not even a little bit\n" * 20)
    for path in (other, text):
        with pytest.raises(GradleakError, match="is not a gradleak store"):
            Store.open(path, create=True)
    assert sqlite3.connect(other).execute("PRAGMA journal_mode").fetchone()[0] != "wal"  # left untouched
    with pytest.raises(GradleakError, match="no store at"):
        Store.open(tmp_path / "missing.sqlite")


# ------------------------------------------------------------------ running


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    plan = parse_plan(
        {
            "grid": {"victim": ["no-such-victim", "bert-tiny"]},
            "fixed": {"data": "sample", "attack": "tag", "iterations": 2, "known_lengths": True},
        }
    )
    with Store.open(tmp_path / "s.sqlite", create=True) as store:
        summary = run_sweep(plan.jobs, store, LocalExecutor())
        assert counts(summary.to_json()) == {"total": 2, "done": 1, "skipped": 0, "failed": 1}
        failed = [r for r in store.runs() if r.status == "failed"]
        assert len(failed) == 1 and "unknown victim 'no-such-victim'" in (failed[0].error or "")
        assert failed[0].record is None
        again = run_sweep(plan.jobs, store, LocalExecutor())  # failed runs are tried again
        assert counts(again.to_json()) == {"total": 2, "done": 0, "skipped": 1, "failed": 1}
        assert store.count() == 2


def test_sigkill_mid_sweep_then_rerun_gives_every_run_once(tmp_path):
    """SIGKILL the sweep every time once the store holds a finished run and fewer than all six, then
    re-run it: the finished runs are skipped, the rest run, every run is in the store exactly once."""
    spec = write(tmp_path, SLOW_SPEC)
    store_path = tmp_path / "results.sqlite"
    args = [sys.executable, "-m", "gradleak", "sweep", str(spec), "--store", str(store_path)]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    done = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if store_path.exists():
                try:
                    with Store.open(store_path) as store:
                        done = store.count()
                except GradleakError:  # the tables are being made
                    done = 0
                if done >= 1:
                    break
            time.sleep(0.05)
        running = proc.poll() is None
        if running:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert running, f"the sweep ended before it could be killed mid-way (exit {proc.returncode}): {stderr}"
    assert proc.returncode == -signal.SIGKILL
    with Store.open(store_path) as store:
        before = store.count()
        assert all(r.status == "done" for r in store.runs())
    assert 1 <= before < 6, before  # killed mid-way: some runs finished, not all

    rerun = gradleak("sweep", str(spec), "--store", str(store_path), "--json", "-", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert counts(summary) == {"total": 6, "done": 6 - before, "skipped": before, "failed": 0}

    keys = {j.key for j in load_plan(spec).jobs}
    rows = sqlite3.connect(store_path).execute("SELECT key, status FROM runs").fetchall()
    assert sorted(k for k, _ in rows) == sorted(keys)  # every run exactly once
    assert all(status == "done" for _, status in rows)


def test_sweep_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    bad_key = write(tmp_path, '[grid]\nvictim = ["bert-tiny"]\nbatchsize = [1]\n', "bad.toml")
    malformed = write(tmp_path, "[grid\n", "malformed.toml")
    good = write(tmp_path, ISSUE_SPEC, "good.toml")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    cases = [
        (("sweep", str(bad_key)), "unknown key 'batchsize'"),
        (("sweep", str(malformed)), "malformed TOML"),
        (("sweep", str(tmp_path / "missing.toml")), "sweep spec not found"),
        (("sweep", str(good), "--store", str(other)), "is not a gradleak store"),
        (("sweep", str(good), "--executor", "ray", "--address", "127.0.0.1:9"), "unreachable"),
        (("sweep", str(good), "--executor", "slurm"), "unknown executor 'slurm'"),
        (("report", str(other)), "is not a gradleak store"),
        (("report", str(good)), "is not a gradleak store"),
    ]
    for args, message in cases:
        code, stderr = main_in_process(args, capsys, monkeypatch)
        assert code == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, stderr)
    proc = gradleak("sweep", str(bad_key), cwd=tmp_path)  # and once as a user would run it
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_make_executor_checks_its_arguments():
    with pytest.raises(GradleakError, match="workers must be at least 1"):
        make_executor("local", workers=0)
    with pytest.raises(GradleakError, match="use it with --executor ray"):
        make_executor("local", address="127.0.0.1:6379")
