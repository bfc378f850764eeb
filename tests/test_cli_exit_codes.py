"""Exit codes of the commands that run runs: 0 when every run is done (or found done), 1 when some run
failed (saying how many and where the errors are), 2 on bad input. A run the attack refused is a result,
not a failure.

The failing runs here fail at run time, cheaply: a data file of two sentences and a batch of five (the
spec is valid; loading the batch fails).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from _cli import main_in_process

from gradleak.cli.common import failed_count, runs_failed_line
from gradleak.store import Store

TWO = "a first sentence\nand a second one\n"


@pytest.fixture
def two(tmp_path: Path) -> Path:
    path = tmp_path / "two.txt"
    path.write_text(TWO, encoding="utf-8")
    return path


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_sweep_whose_runs_all_fail_exits_1(tmp_path, two, capsys, monkeypatch):
    spec = tmp_path / "s.toml"
    spec.write_text(
        f'[grid]\nseed = [0, 1]\n[fixed]\nvictim = "bert-tiny"\ndata = "{two}"\nbatch_size = 5\n'
        'attack = "tag"\niterations = 2\n',
        encoding="utf-8",
    )
    store = tmp_path / "r.sqlite"
    args = ("sweep", str(spec), "--store", str(store), "--json", "-")
    code, err = main_in_process(args, capsys, monkeypatch)
    assert code == 1, err
    assert _last_line(err) == (
        f"2 of 2 runs failed; errors in the store {store} (gradleak report {store} lists them)"
    )
    with Store.open(store) as s:
        assert [r.status for r in s.runs()] == ["failed", "failed"]
        assert all("larger than the data" in (r.error or "") for r in s.runs())


def test_sweep_with_every_run_done_or_found_done_exits_0(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "s.toml"
    spec.write_text(
        '[grid]\nseed = [0]\n[fixed]\nvictim = "bert-tiny"\ndata = "sample"\nattack = "tag"\n'
        "iterations = 2\nknown_lengths = true\n",
        encoding="utf-8",
    )
    store = tmp_path / "r.sqlite"
    for done, skipped in ((1, 0), (0, 1)):  # done now, then found done
        args = ("sweep", str(spec), "--store", str(store), "--json", str(tmp_path / "s.json"))
        code, err = main_in_process(args, capsys, monkeypatch)
        assert code == 0, err
        summary = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
        assert (summary["done"], summary["skipped"], summary["failed"]) == (done, skipped, 0)


def test_audit_with_failed_runs_exits_1(tmp_path, two, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("audit", "--data", str(two), "--batch-size", "5", "--attack", "exact", "--defense", "clip:norm=1")
    code, err = main_in_process((*args, "--json", "audit.json"), capsys, monkeypatch)
    assert code == 1, err
    assert _last_line(err) == (
        "2 of 2 runs failed; errors in the store gradleak-audit.sqlite "
        "(gradleak report gradleak-audit.sqlite lists them) and the report gradleak-audit.html"
    )
    result = json.loads((tmp_path / "audit.json").read_text(encoding="utf-8"))
    assert result["summary"]["failed"] == 2 and len(result["failed"]) == 2
    assert (tmp_path / "gradleak-audit.html").exists()  # the report is still written


def test_audit_counts_refusals_apart_from_failures(tmp_path, capsys, monkeypatch):
    """A summary that counts refused runs: they are printed, and do not make the exit code 1."""
    import gradleak.cli.runs as runs

    class Summary(SimpleNamespace):
        def to_json(self):
            return {"total": 2, "done": 0, "skipped": 0, "failed": 0, "refused": 2}

    monkeypatch.setattr(
        runs, "_run", lambda *a, **k: (Summary(total=2, done=0, skipped=0, failed=0, refused=2), [])
    )
    monkeypatch.chdir(tmp_path)
    args = ("audit", "--attack", "exact", "--batch-size", "1", "--canary-trials", "0")
    code, err = main_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    assert "2 of 2 runs refused by the attack (results, not failures)" in err
    monkeypatch.setattr(
        runs, "_run", lambda *a, **k: (Summary(total=2, done=0, skipped=0, failed=1, refused=1), [])
    )
    code, err = main_in_process(args, capsys, monkeypatch)
    assert code == 1, err
    assert "1 of 2 runs failed" in err and "1 refused by the attack" in err


def test_conditions_with_failed_runs_exits_1_and_still_writes_the_doc(tmp_path, two, capsys, monkeypatch):
    study = tmp_path / "fails.toml"
    study.write_text(
        'title = "fails"\nx = "batch_size"\n[[part]]\nlabel = "too few sentences"\n[part.grid]\nseed = [0]\n'
        f'[part.fixed]\nvictim = "bert-tiny"\ndata = "{two}"\nbatch_size = 5\n'
        'attack = "tag"\niterations = 2\n',
        encoding="utf-8",
    )
    (tmp_path / "docs").mkdir()
    out, store = tmp_path / "docs" / "c.md", tmp_path / "c.sqlite"
    code, err = main_in_process(
        ("conditions", str(study), "--store", str(store), "--out", str(out)), capsys, monkeypatch
    )
    assert code == 1, err
    assert _last_line(err) == (
        f"1 of 1 run failed; errors in the store {store} (gradleak report {store} lists them)"
    )
    assert out.exists()


def test_the_failure_counts_ignore_refusals():
    plain = SimpleNamespace(total=4, failed=2)
    counted = SimpleNamespace(total=3, failed=0, refused=3)
    assert failed_count([plain, counted]) == (2, 3, 7)
    assert runs_failed_line(2, 4, "the store s.sqlite") == "2 of 4 runs failed; errors in the store s.sqlite"
    assert runs_failed_line(1, 1, "x", refused=2).startswith("1 of 1 run failed; errors in x (2 refused")


# ------------------------------------------------------------------ fl


def _leak(client: int, error: str | None = None, refused: bool = False):
    from gradleak.flower.audit import ClientLeak
    from gradleak.metrics import Scores
    from gradleak.privacy import PrivacyReport

    leak = ClientLeak(
        round=1,
        client=client,
        node_id=client,
        references=("a first sentence",),
        reconstructions=() if error else ("a first sentence",),
        scores=Scores(0.0, 0.0, 0.0, 0.0, 0.0) if error else Scores(100.0, 100.0, 100.0, 100.0, 100.0),
        seconds=0.1,
        privacy=PrivacyReport(epsilon=None, delta=1e-5, accountant="rdp"),
        error=None if error is None else f"{'refused' if refused else 'failed'}: {error}",
    )
    assert leak.refused == refused
    return leak


def test_fl_failures_count_errors_but_not_refusals():
    pytest.importorskip("flwr")
    from gradleak.cli.fl import fl_failures, fl_refused

    ok = SimpleNamespace(errors=(), leaks=(_leak(0), _leak(1)))
    assert fl_failures(ok) == [] and fl_refused(ok) == 0
    crashed = SimpleNamespace(errors=(), leaks=(_leak(0), _leak(1, "boom")))
    assert fl_failures(crashed) == ["round 1 client 1: failed: boom"]
    refused = SimpleNamespace(errors=(), leaks=(_leak(0, "too many tokens", refused=True),))
    assert fl_failures(refused) == [] and fl_refused(refused) == 1
    client_failed = SimpleNamespace(errors=("round 1, node 7: out of memory",), leaks=())
    assert fl_failures(client_failed) == ["round 1, node 7: out of memory"]


@pytest.mark.parametrize(("error", "code"), [(None, 0), ("boom", 1)])
def test_fl_exit_code_follows_the_audit(error, code, tmp_path, capsys, monkeypatch):
    """`gradleak fl` end to end through the CLI, with the simulation replaced by its result."""
    pytest.importorskip("flwr")
    import gradleak.flower.simulation as simulation

    def fake_run_fl(spec, store=None, on_leak=None):
        leaks = (_leak(0), _leak(1, error))
        for leak in leaks:
            if on_leak is not None:
                on_leak(leak)
        return simulation.FlResult(spec=spec, leaks=leaks, seconds=0.1, store=store)

    monkeypatch.setattr(simulation, "run_fl", fake_run_fl)
    got, err = main_in_process(("fl", "--clients", "2", "--rounds", "1"), capsys, monkeypatch)
    assert got == code, err
    if code:
        assert _last_line(err) == "1 of 2 runs failed; errors in the tables above"


def test_fl_knows_is_parsed_and_checked(capsys, monkeypatch):
    pytest.importorskip("flwr")
    code, err = main_in_process(("fl", "--knows", "lengths,foo"), capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown item 'foo'" in err


def test_fl_spec_takes_every_knows_field():
    pytest.importorskip("flwr")
    from gradleak.flower.spec import FlSpec
    from gradleak.knowledge import parse_knows

    spec = FlSpec(**parse_knows("labels,lengths").spec_fields())
    assert (spec.known_batch_size, spec.known_lengths, spec.known_labels) == (False, True, True)
    assert (FlSpec().known_batch_size, FlSpec().known_lengths, FlSpec().known_labels) == (True, False, False)
