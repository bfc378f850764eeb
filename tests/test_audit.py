"""`gradleak audit`: the runs it makes, its verdict, its report, and its bad input."""

from __future__ import annotations

import json

import pytest
from _cli import main_in_process

from gradleak.audit import DEFAULT_ATTACKS, DEFAULT_DEFENSES, AuditSpec, verdict
from gradleak.errors import GradleakError
from gradleak.report.data import AttackRun, FailedRun, ReportData
from gradleak.store import Store


def counts(summary: dict) -> dict:
    """A sweep summary's total/done/skipped/failed, with no run refused (where it counts refusals)."""
    assert summary.get("refused", 0) == 0, summary
    return {k: v for k, v in summary.items() if k != "refused"}


def _run(attack: str, defenses: tuple[str, ...], rouge1: float, exact: float, eps: float | None) -> AttackRun:
    scores = {"rouge1": rouge1, "rouge2": 0.0, "rougeL": 0.0, "token_accuracy": 0.0, "exact_match": exact}
    return AttackRun(
        key=attack + str(defenses),
        victim="gpt2-tiny",
        data="sst2",
        attack=attack,
        batch_size=4,
        seed=0,
        defenses=defenses,
        scores=scores,
        epsilon=eps,
        delta=1e-5,
        accountant="rdp",
        references=(),
        reconstructions=(),
        seconds=1.0,
        noise=None,
    )


def test_the_default_audit_is_both_attacks_with_and_without_the_defence():
    jobs = AuditSpec().jobs()
    assert [(j.spec.attack, j.spec.defenses) for j in jobs] == [
        *((a, ()) for a in DEFAULT_ATTACKS),
        *((a, DEFAULT_DEFENSES) for a in DEFAULT_ATTACKS),
    ]
    assert {"exact"} < {j.spec.attack for j in jobs}  # and a gradient-matching attack


def test_the_audit_passes_its_prior_to_every_run():
    jobs = AuditSpec(attacks=("lamp", "tag"), prior="none").jobs()
    assert {(j.spec.attack, j.spec.prior) for j in jobs} == {("lamp", "none"), ("tag", "none")}
    assert AuditSpec(attacks=("lamp",)).jobs()[0].spec.prior == "smollm2"  # the default


def test_verdict_names_the_strongest_attack_and_epsilon():
    spec = AuditSpec(defenses=("dp-sgd:clip=1,multiplier=1",))
    data = ReportData(
        attacks=(
            _run("exact", (), 100.0, 100.0, None),
            _run("tag", (), 20.0, 0.0, None),
            _run("exact", spec.defenses, 0.0, 0.0, 4.73),
            _run("tag", spec.defenses, 8.0, 0.0, 4.73),
        )
    )
    assert verdict(spec, data) == [
        "Without a defence the server recovers 4/4 sentences exactly (ROUGE-1 100, exact attack).",
        "With dp-sgd:clip=1,multiplier=1 (epsilon 4.73 at delta 1e-05, rdp) it recovers 0/4 sentences "
        "exactly (ROUGE-1 8, tag attack).",
    ]
    failed = ReportData(failed=(FailedRun("attack", "exact", "boom"),))
    lines = verdict(spec, failed)
    assert "no attack finished" in lines[0] and "1 of 4 runs failed" in lines[-1]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (AuditSpec(attacks=()), "at least one attack"),
        (AuditSpec(defenses=()), "at least one --defense"),
        (AuditSpec(attacks=("nope",)), "unknown attack"),
        (AuditSpec(batch_size=0), "batch size must be at least 1"),
    ],
)
def test_bad_audits(spec, message):
    with pytest.raises(GradleakError, match=message):
        spec.jobs()


def test_audit_command_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = (
        "audit",
        "--victim",
        "gpt2-tiny",
        "--batch-size",
        "1",
        "--attack",
        "exact",
        "--defense",
        "clip:norm=1",
        "--no-utility",
        "--canary-trials",
        "0",
    )
    code, stderr = main_in_process((*args, "--json", "audit.json"), capsys, monkeypatch)
    assert code == 0, stderr
    result = json.loads((tmp_path / "audit.json").read_text(encoding="utf-8"))
    assert counts(result["summary"]) == {"total": 2, "done": 2, "skipped": 0, "failed": 0}
    assert (
        result["verdict"][0]
        == "Without a defence the server recovers 1/1 sentence exactly (ROUGE-1 100, exact attack)."
    )
    assert result["verdict"][1].startswith(
        "With clip:norm=1 (no finite epsilon: not a DP mechanism) it recovers"
    )
    page = (tmp_path / "gradleak-audit.html").read_text(encoding="utf-8")
    assert "Without a defence the server recovers 1/1" in page
    with Store.open(tmp_path / "gradleak-audit.sqlite") as store:
        assert store.count() == 2

    code, stderr = main_in_process((*args, "--json", "again.json"), capsys, monkeypatch)
    assert code == 0, stderr
    again = json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))
    assert counts(again["summary"]) == {
        "total": 2,
        "done": 0,
        "skipped": 2,
        "failed": 0,
    }  # found in the store
    assert again["verdict"] == result["verdict"]


def test_audit_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, message in [
        (("audit", "--defense", "blur:radius=1"), "unknown defence 'blur'"),
        (("audit", "--batch-size", "0"), "batch size must be at least 1"),
        (("audit", "--out", str(tmp_path / "no" / "such" / "r.html")), "cannot write the report"),
        (("audit", "--store", str(tmp_path)), "is a directory"),
        (("audit", "--attack", "lamp", "--prior", "minilm"), "prior 'minilm' is an encoder"),
    ]:
        code, stderr = main_in_process(args, capsys, monkeypatch)
        assert code == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, stderr)
