"""The audit's threshold scan, epsilon at the threshold, utility cost and reconstruction bounds: the
orchestration against scripted runs (an attack whose leak stops at a known multiplier), the report
in headless Chromium, and one small real `gradleak audit --json`."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from _chromium import chromium_binary, load_page
from _cli import main_in_process

from gradleak import privacy
from gradleak.audit import (
    AuditSpec,
    bound_verdict,
    canary_verdict,
    report_data,
    run_audit,
    threshold_verdict,
    verdict,
)
from gradleak.canary import CanaryResult
from gradleak.defenses import DpSgd, parse_defense
from gradleak.experiment import RunRecord
from gradleak.metrics import Scores
from gradleak.privacy import Mechanism, PrivacyReport
from gradleak.report import load_report_data, render
from gradleak.rero import gaussian_bound
from gradleak.sweeps.jobs import make_row

STOPS_AT = 3e-5  # the scripted exact attack leaks below this DP-SGD multiplier
ACCURACY = {(): 0.80, ("dp-sgd:clip=1,multiplier=1",): 0.70}  # else (a threshold's chain) 0.79


def _multiplier(defenses: tuple[str, ...]) -> float | None:
    d = parse_defense(defenses[0]) if defenses else None
    return d.multiplier if isinstance(d, DpSgd) else None


def _scripted(jobs, stops_at: float = STOPS_AT):
    rows = []
    for job in jobs:
        spec = job.spec
        if job.kind == "train":
            record = {
                "spec": asdict(spec),
                "steps": [spec.steps],
                "loss": [0.7],
                "eval": [],
                "epsilon": None,
                "final_accuracy": ACCURACY.get(spec.defenses, 0.79),
                "eval_size": 64,
            }
        else:
            z = _multiplier(spec.defenses)
            leaks = spec.attack == "exact" and (z is None or z < stops_at)
            s = 100.0 if leaks else 2.0
            report = (
                PrivacyReport(None, spec.delta, spec.accountant, (), "no DP mechanism")
                if z is None
                else privacy.report([Mechanism("gaussian", z)], spec.delta, spec.accountant)
            )
            refs = tuple(f"private sentence {i}" for i in range(spec.batch_size))
            record = RunRecord(
                spec=spec,
                references=refs,
                reconstructions=refs if leaks else ("other words",) * spec.batch_size,
                scores=Scores(s, s, s, s, s if leaks else 0.0),
                seconds=0.1,
                labels=None,
                inferred_labels=None,
                privacy=report,
            ).to_json()
        rows.append(make_row(job, time.time(), record, None))
    return rows


SPEC = AuditSpec(rounds=10, sample_rate=0.1, utility_steps=3, canary_trials=0)

# a canary audit as run_canary_audit returns it (its own tests are in test_canary.py)
CANARY = CanaryResult(
    epsilon_lower=0.0,
    epsilon_upper=10.7,
    epsilon_upper_reason="",
    epsilon_add_remove=4.73,
    epsilon_ceiling=1.1,
    confidence=0.95,
    delta=1e-5,
    accountant="rdp",
    trials=30,
    in_trials=16,
    out_trials=14,
    false_positives=0,
    false_negatives=16,
    fpr_upper=0.3,
    fnr_upper=1.0,
    refusals=0,
    threshold=50.0,
    canary="a canary",
    victim="gpt2-tiny",
    data="sst2",
    batch_size=4,
    attack="exact",
    defenses=("dp-sgd:clip=1,multiplier=1",),
    seed=0,
    dtype="float32",
    seconds=1.0,
)


@pytest.fixture(scope="module")
def audited():
    result = dataclasses.replace(run_audit(SPEC, _scripted), canary=CANARY)
    data = report_data(result, load_report_data(list(result.rows), source="scripted"))
    return result, data


def test_the_canary_audit_stands_beside_the_accountant(audited):
    result, data = audited
    assert data.canary is not None and data.canary.upper == 10.7 and data.canary.lower == 0.0
    (line,) = canary_verdict(result)
    assert line.startswith("Canary audit (30 trials, the exact attack deciding whether the canary was in")
    assert "16/16 missed, 0/14 false alarms" in line and "certifies no positive epsilon" in line
    assert "the accountant's epsilon for the same release is 10.7 (rdp, replace-one" in line
    broken = dataclasses.replace(CANARY, epsilon_lower=12.0, false_negatives=0)
    (line,) = canary_verdict(dataclasses.replace(result, canary=broken))
    assert "proves epsilon >= 12" in line and line.endswith("a bug in the attack's audit or the accountant.")
    (line,) = canary_verdict(dataclasses.replace(result, canary=None, canary_error="too few"))
    assert line == "Canary audit not run: too few."


def test_the_scan_finds_the_threshold_and_its_epsilons(audited):
    result, _ = audited
    exact, tag = result.thresholds
    assert (exact.attack, exact.scan.status, tag.attack, tag.scan.status) == (
        "exact",
        "stops",
        "tag",
        "no-leak",
    )
    z = exact.strength
    assert exact.scan.below < STOPS_AT <= z and z / exact.scan.below < 1.4
    assert exact.defence == "DP-SGD multiplier" and exact.chain == (f"dp-sgd:clip=1,multiplier={z:g}",)
    assert exact.epsilon == pytest.approx(privacy.epsilon(z, 1.0, 1, 1e-5, "rdp"))
    assert exact.epsilon_deployment == pytest.approx(privacy.epsilon(z, 0.1, 10, 1e-5, "rdp"))
    assert exact.utility_cost == pytest.approx(1.0) and result.utility.cost(
        result.utility.audited
    ) == pytest.approx(10)
    out = exact.to_json()
    assert {"defence", "strength", "epsilon", "epsilon_deployment", "utility_cost"} <= set(out)
    assert tag.to_json()["strength"] is None and tag.scan.points == ()


def test_every_dp_run_has_its_bound_and_measured_success(audited):
    result, data = audited
    dp = [r for r in data.attacks if r.epsilon is not None]
    assert len(dp) >= 6 and {r.key for r in dp} == set(result.bounds)
    kappa = result.prior.kappa
    assert 1e-4 < kappa < 1e-2 and "candidate sentences of sst2" in result.prior.why
    for r in dp:
        b = result.bounds[r.key]
        z = _multiplier(r.defenses)
        assert b["reconstruction_bound"]["bound"] == pytest.approx(gaussian_bound(z, kappa))
        assert b["measured_success"] == r.scores["exact_match"] / 100
    assert len(data.bound_curve) > 10 and len(data.thresholds) == 2


def test_the_verdict_says_it_in_the_issue_s_shape(audited):
    result, data = audited
    lines = [
        *verdict(SPEC, data),
        *threshold_verdict(SPEC, result, data),
        *bound_verdict(result, data, SPEC.defenses),
    ]
    shape = (
        r"The exact attack recovers 4/4 sentences exactly \(ROUGE-1 100\) without a defence\. It stops at "
        r"DP-SGD multiplier [0-9.e+-]+ \(epsilon [0-9.e+]+ for one round; [0-9.e+]+ over 10 rounds at "
        r"q = 0\.1\)\. "
        r"Your setting, multiplier 1 \(epsilon 4\.73\), is [0-9.e+]+ times past it and costs 10\.0 points of "
        r"held-out accuracy \(70\.0% against 80\.0% without noise, 3 SGD steps, 64 held-out sentences\)\. "
        r"At the threshold training loses 1\.0 points\."
    )
    assert re.fullmatch(shape, lines[2]), lines[2]
    assert (
        lines[3]
        == "The tag attack recovers 0/4 sentences exactly (ROUGE-1 2) without a defence: no leak to stop."
    )
    assert lines[4].startswith("At your setting DP allows a reconstruction attack at most 1.")


def test_a_leak_the_clip_alone_stops_has_no_noise_threshold():
    spec = AuditSpec(attacks=("exact",), canary_trials=0)
    result = run_audit(spec, lambda jobs: _scripted(jobs, stops_at=-1.0))  # any DP-SGD, even z = 0, stops it
    (t,) = result.thresholds
    assert t.scan.status == "stops" and t.strength == 0.0 and t.epsilon is None
    assert [p.strength for p in t.scan.points] == [1e-4, 1e-5, 1e-6, 1e-7, 0.0]
    data = report_data(result, load_report_data(list(result.rows)))
    (line,) = threshold_verdict(spec, result, data)
    assert line.endswith(
        "the rest of the chain stops it, not the noise, so there is no noise threshold "
        "(and no finite epsilon there)."
    )


def test_the_audit_report_in_headless_chromium(audited, tmp_path):
    _, data = audited
    page = render(data, title="audit", verdict=["v"])
    # where the leak stops, the bound, the canary audit, ROUGE against noise, training curves, the frontier
    assert page.count('src="data:image/png;base64,') == 6
    if chromium_binary() is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (the dev extra has it)")
    path = tmp_path / "audit.html"
    path.write_text(page, encoding="utf-8")
    probes = {
        "images": "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length",
        "alts": "Array.from(document.images).map(i => i.alt).slice(0, 3)",
    }
    loaded = load_page(path, probes, chromium_binary() or "chromium")
    assert loaded.errors == []
    assert loaded.probes == {
        "images": 6,
        "alts": [
            "Where the leak stops",
            "What ε promises about reconstruction",
            "What the attack proves about ε",
        ],
    }
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(loaded.screenshot), format="png")
    assert pixels.shape[0] > 1000 and pixels.std() > 0.05


def test_gradleak_audit_json_has_thresholds_and_bounds(tmp_path, capsys, monkeypatch):
    """A real, small audit: the exact attack on gpt2-tiny, B = 1, two grid points and no bisection."""
    monkeypatch.chdir(tmp_path)
    args = ("audit", "--batch-size", "1", "--attack", "exact", "--bisect-steps", "0", "--no-utility")
    args += ("--canary-trials", "12")
    code, stderr = main_in_process(
        (*args, "--rounds", "50", "--sample-rate", "0.01", "--json", "audit.json"), capsys, monkeypatch
    )
    assert code == 0, stderr
    out = json.loads(Path("audit.json").read_text(encoding="utf-8"))
    t = out["attacks"]["exact"]["threshold"]
    assert t["defence"] == "DP-SGD multiplier" and t["status"] == "stops" and t["utility_cost"] is None
    assert t["epsilon"] == pytest.approx(privacy.epsilon(t["strength"], 1.0, 1, 1e-5, "rdp"))
    assert t["epsilon_deployment"] == pytest.approx(privacy.epsilon(t["strength"], 0.01, 50, 1e-5, "rdp"))
    dp = [r for r in out["runs"] if r["privacy"]["epsilon"] is not None]
    assert dp and all(0 < r["reconstruction_bound"]["bound"] <= 1 for r in dp)
    assert all(r["measured_success"] == r["scores"]["exact_match"] / 100 for r in dp)
    assert not [r for r in out["runs"] if not r["spec"]["defenses"] and "reconstruction_bound" in r]
    assert any(line.startswith("The exact attack recovers 1/1 sentence") for line in out["verdict"])
    canary = out["canary"]
    assert canary["trials"] == 12 and canary["confidence"] == 0.95 and out["canary_error"] is None
    assert 0 <= canary["epsilon_lower"] <= canary["epsilon_upper"]  # DP-SGD at z = 1: the attack sees nothing
    assert canary["epsilon_upper"] == pytest.approx(privacy.epsilon(0.5, 1.0, 1, 1e-5, "rdp"))  # replace-one
    assert any(line.startswith("Canary audit (12 trials") for line in out["verdict"])
    assert Path("gradleak-audit.html").exists()


def test_bad_audit_options_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, message in [
        (("--rounds", "0"), "rounds must be at least 1"),
        (("--sample-rate", "1.5"), "sample rate must be in (0, 1]"),
        (("--leak-threshold", "0"), "leak threshold"),
        (("--prior-success", "1"), "prior success"),
        (("--utility-steps", "0"), "utility steps"),
        (("--bisect-steps", "-1"), "bisection steps"),
        (("--canary-trials", "5"), "the canary audit needs at least 11 trials"),
    ]:
        code, stderr = main_in_process(("audit", *args), capsys, monkeypatch)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, stderr)
