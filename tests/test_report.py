"""The HTML report: every section, escaping of attacker-controlled text, and the page in headless
Chromium (no console errors, a real screenshot, an injected <script> shown as text)."""

from __future__ import annotations

import html
import io
import json
import time
from pathlib import Path

import pytest
from _chromium import chromium_binary, load_page
from _cli import main_in_process

from gradleak.experiment import RunRecord, RunSpec
from gradleak.metrics import Scores
from gradleak.privacy import Mechanism, PrivacyReport
from gradleak.report import load_report_data, render
from gradleak.report.highlight import mark_common
from gradleak.store import Store, StoredRun, canonical, run_key

INJECTED = '<script>document.title="pwned";window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
TITLE = "gradleak report"


def _attack_row(
    batch_size: int, seed: int, defenses: tuple[str, ...], rouge: float, eps: float | None
) -> StoredRun:
    spec = RunSpec(
        victim="gpt2-tiny", data="sst2", batch_size=batch_size, attack="exact", seed=seed, defenses=defenses
    )
    refs = tuple(f"a private sentence number {i} & friends" for i in range(batch_size))
    recs = tuple(r if rouge > 50 else "some other words" for r in refs)
    if defenses == ("gaussian:sigma=0.001",) and seed == 0:
        recs = (INJECTED, *recs[1:])
    privacy = (
        PrivacyReport(eps, 1e-5, "rdp", (Mechanism("gaussian", 1.0),))
        if eps is not None
        else PrivacyReport(None, 1e-5, "rdp", (), "no DP mechanism")
    )
    record = RunRecord(
        spec=spec,
        references=refs,
        reconstructions=recs,
        scores=Scores(rouge, rouge, rouge, rouge, rouge),
        seconds=1.5,
        labels=None,
        inferred_labels=None,
        privacy=privacy,
    ).to_json()
    now = time.time()
    return StoredRun(run_key("attack", spec), "attack", {}, "done", record, None, now, now + 1, "0.1.0")


def _train_row(defenses: tuple[str, ...], accuracy: float, eps: float | None) -> StoredRun:
    spec = {"victim": "gpt2-tiny", "data": "sst2", "batch_size": 16, "seed": 0, "defenses": list(defenses)}
    record = {
        "spec": spec,
        "steps": list(range(1, 21)),
        "loss": [0.7 - 0.01 * i for i in range(20)],
        "eval": [
            {
                "step": s,
                "accuracy": 0.5 + (accuracy - 0.5) * s / 20,
                "loss": 0.7,
                "epsilon": eps and eps * s / 20,
            }
            for s in (0, 10, 20)
        ],
        "epsilon": eps,
        "final_accuracy": accuracy,
    }
    key = run_key("train", spec)
    return StoredRun(key, "train", spec, "done", record, None, 1.0, 2.0, "0.1.0")


def _failed_row() -> StoredRun:
    spec = RunSpec(victim="<b>no-such</b>", attack="tag")
    import json

    return StoredRun(
        run_key("attack", spec),
        "attack",
        json.loads(canonical(spec)),
        "failed",
        None,
        "unknown victim '<b>no-such</b>' <img src=x onerror=alert(1)>",
        1.0,
        2.0,
        "0.1.0",
    )


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "results.sqlite"
    rows = [
        _attack_row(b, s, d, rouge, eps)
        for b in (1, 2, 4)
        for s in (0, 1)
        for d, rouge, eps in (
            ((), 100.0, None),
            (("gaussian:sigma=0.001",), 60.0, None),
            (("gaussian:sigma=0.1",), 10.0, None),
            (("dp-sgd:clip=1,multiplier=0.5",), 40.0, 12.0),
            (("dp-sgd:clip=1,multiplier=2",), 5.0, 1.5),
        )
    ]
    rows += [
        _train_row((), 0.8, None),
        _train_row(("dp-sgd:clip=1,multiplier=0.5",), 0.7, 12.0),
        _train_row(("dp-sgd:clip=1,multiplier=2",), 0.6, 1.5),
        _failed_row(),
    ]
    with Store.open(path, create=True) as store:
        for row in rows:
            store.put(row)
    return path


@pytest.fixture(scope="module")
def report_html(store_path) -> str:
    with Store.open(store_path) as store:
        data = load_report_data(store.runs(), source=str(store_path))
    return render(data, title=TITLE)


def test_mark_common_escapes_then_marks():
    out = mark_common("<script>alert(1)</script> hello world", "hello <script>alert(1)</script>")
    assert "<script>" not in out
    assert "<mark>&lt;script&gt;alert(1)&lt;/script&gt;</mark>" in out
    assert "<mark>hello</mark> world" in out


def test_the_report_has_every_section_and_no_script(report_html):
    page = report_html
    for heading in ("Attacks", "Training", "Failed runs", "Plots", "Reconstructions"):
        assert f"<h2>{heading}</h2>" in page
    assert page.count('src="data:image/png;base64,') == 4  # batch size, noise, training, frontier
    assert "<script" not in page.lower()  # nothing executable at all, injected or ours
    assert html.escape(INJECTED) in page  # shown as text
    assert "&lt;b&gt;no-such&lt;/b&gt;" in page and "<b>no-such" not in page
    assert "<mark>" in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch


def test_report_command_writes_the_file(store_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report.html"
    code, stderr = main_in_process(("report", str(store_path), "--out", str(out)), capsys, monkeypatch)
    assert code == 0, stderr
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_an_empty_store_gives_a_page_that_says_so(tmp_path):
    with Store.open(tmp_path / "empty.sqlite", create=True) as store:
        page = render(load_report_data(store.runs()))
    assert "No finished attack runs." in page and "The store has no training runs." in page


@pytest.mark.skipif(
    chromium_binary() is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_the_report_in_headless_chromium(report_html, tmp_path):
    pytest.importorskip("websocket", reason="websocket-client is not installed (the dev extra has it)")
    page = tmp_path / "report.html"
    page.write_text(report_html, encoding="utf-8")
    probes = {
        "title": "document.title",
        "scripts": "document.scripts.length",
        "pwned": "typeof window.__pwned",
        "shown": f"document.body.innerText.includes({INJECTED[:40]!r})",
        "images": "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length",
        "broken": "Array.from(document.images).filter(i => i.naturalWidth === 0).length",
    }
    loaded = load_page(page, probes, chromium_binary() or "chromium")
    assert loaded.errors == []
    assert loaded.probes == {
        "title": TITLE,
        "scripts": 0,
        "pwned": "undefined",
        "shown": True,
        "images": 4,
        "broken": 0,  # the injected <img src=x> is text, not an image
    }
    assert loaded.screenshot.startswith(b"\x89PNG") and len(loaded.screenshot) > 20_000
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(loaded.screenshot), format="png")
    assert pixels.shape[0] > 1000 and pixels.std() > 0.05  # a long page with content, not a blank one


def test_refused_runs_are_listed_apart_from_failed_ones(store_path):
    spec = RunSpec(victim="gpt2-tiny", attack="exact", batch_size=64)
    refused = StoredRun(
        run_key("attack", spec),
        "attack",
        json.loads(canonical(spec)),
        "refused",
        None,
        "the batch holds 900 tokens, at or above the hidden width 64 <i>",
        1.0,
        2.0,
        "0.1.0",
    )
    with Store.open(store_path) as store:
        runs = [*store.runs(), refused]  # the module's store stays as it is
    data = load_report_data(runs)
    assert [f.error for f in data.refused] == [refused.error]
    assert all(f.label != data.refused[0].label for f in data.failed) and len(data.failed) == 1
    page = render(data)
    assert "<h2>Refused runs</h2>" in page and "1 refused, 1 failed" in page
    refusals = page.split("<h2>Refused runs</h2>")[1].split("<h2>Failed runs</h2>")[0]
    assert html.escape(refused.error) in refusals and "no-such" not in refusals
