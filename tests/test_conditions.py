"""The conditions study: every committed study runs shrunken end to end through the CLI, its section,
table and PNG are written, the table's numbers are the store's, and bad input is one line, exit 2."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from _cli import main_in_process

from gradleak.conditions import load_study, study_paths
from gradleak.conditions.study import shrunk_tables
from gradleak.errors import GradleakError
from gradleak.store import Store

STUDIES = Path(__file__).resolve().parents[1] / "studies"
NAMES = sorted(p.stem for p in STUDIES.glob("*.toml"))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory) -> dict:
    """All studies, shrunken, into one tmp store and one tmp docs folder (run once for the module)."""
    tmp = tmp_path_factory.mktemp("conditions")
    (tmp / "docs").mkdir()
    out, store, report = tmp / "docs" / "conditions.md", tmp / "c.sqlite", tmp / "c.json"
    mp = pytest.MonkeyPatch()
    capsys = _Capture()
    try:
        code, err = main_in_process(
            (
                "conditions",
                "--shrink",
                "--threads",
                "1",
                "--studies",
                str(STUDIES),
                "--store",
                str(store),
                "--out",
                str(out),
                "--json",
                str(report),
            ),
            capsys,
            mp,
        )
    finally:
        mp.undo()
    assert code == 0, err
    return {"out": out, "store": store, "json": json.loads(report.read_text()), "tmp": tmp}


class _Capture:
    """capsys for a module-scoped fixture (the CLI's output is not checked there)."""

    def readouterr(self):
        class R:
            out = ""
            err = ""

        return R()


def test_studies_are_committed_and_valid():
    assert {
        "batch-size",
        "sequence-length",
        "depth-width",
        "training-stage",
        "sharing",
        "knowledge",
        "noise",
    } <= set(NAMES)
    for path in study_paths([], STUDIES):
        study = load_study(path)
        assert study.jobs and study.title and study.question
        assert {p.plan.jobs[0].spec.attack for p in study.parts} >= {"exact", "tag"}, path.stem
        small = load_study(path, shrink=True)
        assert 0 < len(small.jobs) < len(study.jobs)
        assert all(j.spec.iterations <= 5 for j in small.jobs if not j.spec.attack.startswith("exact"))
        assert all(j.spec.time_budget <= 5 for j in small.jobs if j.spec.attack.startswith("exact"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_shrunken_study_end_to_end(shrunk, name):
    doc = shrunk["out"].read_text(encoding="utf-8")
    assert doc.startswith("# When does gradient leakage work")
    assert "## In short" in doc.split("<!-- BEGIN study:")[0]  # studies/summary.md, before the sections
    assert f"<!-- BEGIN study:{name} " in doc and f"<!-- END study:{name} -->" in doc
    section = doc.split(f"<!-- BEGIN study:{name} ")[1].split(f"<!-- END study:{name} -->")[0]
    png = shrunk["out"].parent / "conditions" / f"{name}.png"
    assert png.read_bytes()[:8] == PNG
    assert f"](conditions/{name}.png)" in section
    assert f"gradleak conditions {name} --store c.sqlite --shrink" in section
    assert "| ROUGE-1 | ROUGE-2 | exact % |" in section and "**Measured**" in section

    entry = next(s for s in shrunk["json"]["studies"] if s["study"] == name)
    assert entry["rows"] and entry["runs"] == sum(
        r["n"] + r["failed"] + r["refused"] for r in entry["rows"] if not r["repeat"]
    )
    with Store.open(shrunk["store"]) as store:
        crashed = [
            (r.spec, r.error)
            for r in store.runs(keys=[k for row in entry["rows"] for k in row["keys"]])
            if r.failed
        ]
        assert not crashed, f"runs of study {name} crashed (a refusal is stored as refused): {crashed[:3]}"
        for row in entry["rows"]:
            runs = store.runs(keys=row["keys"])
            done = [r for r in runs if r.done]
            refused = [r for r in runs if r.refused]
            assert row["n"] == len(done) and row["refused"] == len(refused) and row["failed"] == 0
            if not done:
                assert row["rouge1"] is None and row["note"].startswith("refused: ")
                assert row["note"].replace("|", "\\|") in section
                continue
            for key in ("rouge1", "rouge2", "exact_match"):
                mean = statistics.fmean(r.record["scores"][key] for r in done)
                assert row[key] == pytest.approx(mean)
            numbers = (row["rouge1"], row["rouge2"], row["exact_match"], row["seconds"])
            cells = "| " + " | ".join(f"{v:.1f}" for v in numbers) + " |"
            assert cells in section


@pytest.mark.slow
def test_rerun_resumes_and_keeps_other_sections(shrunk, capsys, monkeypatch):
    with Store.open(shrunk["store"]) as store:
        before = store.count()
    out = shrunk["out"]
    code, err = main_in_process(
        (
            "conditions",
            "noise",
            "--shrink",
            "--threads",
            "1",
            "--studies",
            str(STUDIES),
            "--store",
            str(shrunk["store"]),
            "--out",
            str(out),
            "--json",
            "-",
        ),
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    with Store.open(shrunk["store"]) as store:
        assert store.count() == before  # nothing ran again
    doc = out.read_text(encoding="utf-8")
    assert all(f"<!-- BEGIN study:{n} " in doc for n in NAMES)


def test_shrink_keeps_ends_and_caps():
    grid, fixed = shrunk_tables(
        {"batch_size": [1, 2, 4, 8], "seed": [0, 1, 2], "iterations": [300]},
        {"time_budget": 30.0},
        {"batch_size": [1, 2]},
    )
    assert grid == {"batch_size": [1, 2], "seed": [0], "iterations": [5]}
    assert fixed == {"time_budget": 5.0}


def _bad(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("title = 'x'\n[[part]\n", "malformed TOML"),
        ("title = 'x'\n", "needs at least one [[part]]"),
        ("colour = 'x'\n[[part]]\n[part.grid]\nseed = [0]\n", "unknown key 'colour'"),
        ("[[part]]\n[part.grid]\nbogus = [1]\n", "unknown key 'bogus'"),
        ("x = 'nope'\n[[part]]\n[part.grid]\nseed = [0]\n", "unknown field 'nope'"),
        ("[[part]]\n[part.zip]\nseed = [0, 1]\nbatch_size = [1]\n", "one length"),
    ],
)
def test_malformed_study_is_one_line_exit_2(tmp_path, capsys, monkeypatch, text, message):
    path = _bad(tmp_path, text)
    with pytest.raises(GradleakError, match=message.replace("[", r"\[")):
        load_study(path)
    code, err = main_in_process(
        ("conditions", str(path), "--store", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "c.md")),
        capsys,
        monkeypatch,
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.sqlite").exists() and not (tmp_path / "c.md").exists()


def test_unknown_study_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    code, err = main_in_process(
        ("conditions", "no-such-study", "--studies", str(STUDIES), "--store", str(tmp_path / "s.sqlite")),
        capsys,
        monkeypatch,
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown study 'no-such-study'" in err and "batch-size" in err


def test_bad_options_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    for args, message in (
        (("--seeds", "0"), "--seeds must be at least 1"),
        (("--seed", "1", "--seeds", "2"), "not both"),
        (("--out", str(tmp_path / "missing" / "c.md")), "does not exist"),
    ):
        code, err = main_in_process(
            ("conditions", "noise", "--studies", str(STUDIES), "--store", str(tmp_path / "s.sqlite"), *args),
            capsys,
            monkeypatch,
        )
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
