"""Refused runs in the store: their own status, skipped on resume like done ones (failed ones run
again), carried by the row across worker processes, and schema-1 stores migrated in place."""

from __future__ import annotations

import sqlite3

from gradleak.errors import Refusal
from gradleak.store import SCHEMA, Store, StoredRun
from gradleak.sweeps import Job, run_sweep
from gradleak.sweeps.executors import LocalExecutor
from gradleak.sweeps.jobs import execute, make_row


def _row(key: str, status: str) -> StoredRun:
    record = {"scores": {"rouge1": 1.0}} if status == "done" else None
    error = None if record else f"{status}: why"
    return StoredRun(key, "attack", {"seed": 0}, status, record, error, 1.0, 2.0, "0.1.0")


def test_refused_rows_are_results_failed_rows_are_not(tmp_path):
    with Store.open(tmp_path / "s.sqlite", create=True) as store:
        for key, status in (("a", "done"), ("b", "refused"), ("c", "failed")):
            store.put(_row(key, status))
        assert store.finished_keys() == {"a", "b"}  # a re-run tries c again, not b
        by_key = {r.key: r for r in store.runs()}
        assert by_key["b"].refused and not by_key["b"].failed and by_key["b"].error == "refused: why"
        assert by_key["c"].failed and not by_key["c"].refused


def _refusing_run(spec, progress=None):
    raise Refusal("attack 'tag' needs the sequence lengths, which this scenario withholds")


def _crashing_run(spec, progress=None):
    raise RuntimeError("boom")


def test_execute_decides_the_status_in_the_worker(monkeypatch):
    from gradleak.experiment import RunSpec
    from gradleak.sweeps import jobs

    job = Job("attack", RunSpec(victim="bert-tiny", data="sample", attack="tag"))
    for run, status, error in (
        (_refusing_run, "refused", "attack 'tag' needs the sequence lengths, which this scenario withholds"),
        (_crashing_run, "failed", "RuntimeError: boom"),
    ):
        monkeypatch.setitem(
            jobs.KINDS, "attack", jobs.RunKind("attack", lambda run=run: (RunSpec, run), "test")
        )
        row = execute(job)
        assert (row.status, row.error, row.record) == (status, error, None)
    # the row (a plain dataclass of JSON-able values) is what crosses a process boundary
    import pickle

    assert pickle.loads(pickle.dumps(row)) == row


def test_summary_counts_refusals_apart_and_resume_skips_them(tmp_path, monkeypatch):
    from gradleak.experiment import RunSpec
    from gradleak.sweeps import jobs

    specs = [RunSpec(victim="bert-tiny", data="sample", attack="tag", seed=s) for s in range(3)]
    outcome = {0: "refused", 1: "failed", 2: "done"}

    class Record:
        def to_json(self):
            return {"scores": {"rouge1": 1.0}}

    def run(spec, progress=None):
        if outcome[spec.seed] == "refused":
            _refusing_run(spec)
        if outcome[spec.seed] == "failed":
            _crashing_run(spec)
        return Record()

    monkeypatch.setitem(jobs.KINDS, "attack", jobs.RunKind("attack", lambda: (RunSpec, run), "test"))
    plan = [Job("attack", s) for s in specs]
    with Store.open(tmp_path / "s.sqlite", create=True) as store:
        summary = run_sweep(plan, store, LocalExecutor())
        assert summary.to_json() == {"total": 3, "done": 1, "skipped": 0, "failed": 1, "refused": 1}
        assert [label for label, _ in summary.refusals] == [plan[0].label()]
        assert [e for _, e in summary.errors] == ["RuntimeError: boom"]
        again = run_sweep(plan, store, LocalExecutor())  # only the crash runs again
        assert again.to_json() == {"total": 3, "done": 0, "skipped": 2, "failed": 1, "refused": 0}


def test_make_row_without_refused_is_failed():
    from gradleak.experiment import RunSpec

    job = Job("attack", RunSpec())
    assert make_row(job, 0.0, None, "worker failed: EOFError").status == "failed"
    assert make_row(job, 0.0, None, "needs the lengths", refused=True).status == "refused"


def test_schema_1_store_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE runs (
            key TEXT PRIMARY KEY, kind TEXT NOT NULL, spec TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
            record TEXT, error TEXT, started REAL NOT NULL, finished REAL NOT NULL, version TEXT NOT NULL
        );
        CREATE INDEX runs_kind ON runs (kind);
        INSERT INTO meta VALUES ('application', 'gradleak'), ('schema', '1'), ('created', '0');
        INSERT INTO runs VALUES ('a', 'attack', '{"seed":0}', 'done', '{"scores":{}}', NULL, 1, 2, '0.1');
        INSERT INTO runs VALUES ('c', 'attack', '{"seed":1}', 'failed', NULL, 'boom', 1, 2, '0.1');
        """
    )
    conn.commit()
    conn.close()
    with Store.open(path) as store:
        assert {(r.key, r.status) for r in store.runs()} == {("a", "done"), ("c", "failed")}
        store.put(_row("b", "refused"))
        assert store.finished_keys() == {"a", "b"}
    meta = dict(sqlite3.connect(path).execute("SELECT key, value FROM meta").fetchall())
    assert meta["schema"] == str(SCHEMA) == "2"
