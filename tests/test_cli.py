"""The command line, run as a user would: `python -m gradleak ...` in a subprocess."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _cli import main_in_process

SCORE_KEYS = {"rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match"}
RECORD_KEYS = {
    "victim",
    "attack",
    "data",
    "batch_size",
    "seed",
    "references",
    "reconstructions",
    "scores",
    "seconds",
}


def clean_env() -> dict[str, str]:
    """This environment without what the CLI sets for its own child processes (an in-process CLI test
    may have set it here): a subprocess starts as a user's shell would start it."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}


def gradleak(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradleak", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=clean_env(),
    )


@pytest.mark.slow
def test_tag_run_recovers_words_and_repeats_itself(tmp_path):
    """TAG on bert-tiny, one SST-2 sentence of known length, seed 0: the record is what the run did.

    Measured at seed 0 (300 steps): ROUGE-1 19.0, token accuracy 16.0 ("you", "were", "what", "next" come
    back in place), the label inferred from the head's bias gradient. A broken gradient or matching loss
    gives random tokens from a 30522-word vocabulary (token accuracy ~0), so the thresholds can fail."""
    out = tmp_path / "out.json"
    base = ("attack", "--victim", "bert-tiny", "--data", "sst2", "--batch-size", "1", "--attack", "tag")
    base += ("--seed", "0", "--knows", "batch-size,lengths")
    proc = gradleak(*base, "--iterations", "300", "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    record = json.loads(out.read_text(encoding="utf-8"))
    assert RECORD_KEYS <= set(record) and set(record["scores"]) == SCORE_KEYS
    assert (record["victim"], record["attack"], record["data"], record["batch_size"]) == (
        "bert-tiny",
        "tag",
        "sst2",
        1,
    )
    assert record["spec"]["known_lengths"] is True and record["spec"]["known_labels"] is False
    (reference,) = record["references"]
    (reconstruction,) = record["reconstructions"]
    assert reference != reconstruction
    # the attack found something: far above chance, and the words it found are the reference's
    scores = record["scores"]
    assert scores["token_accuracy"] >= 8.0 and scores["rouge1"] >= 10.0, scores
    found = set(reference.split()) & set(reconstruction.replace(",", " ").split())
    assert len(found) >= 2, (reference, reconstruction)
    assert record["inferred_labels"] == record["labels"]  # B = 1: the bias gradient gives the label
    # the human-readable summary goes to stdout as well, with this record's numbers
    assert f"ROUGE-1 {scores['rouge1']:.1f}" in " ".join(proc.stdout.split())
    assert reference.split()[0] in proc.stdout

    # the same seed gives the same run: batch, reconstruction and scores (a short run, twice)
    short = [gradleak(*base, "--iterations", "20", "--json", "-", cwd=tmp_path) for _ in range(2)]
    assert all(p.returncode == 0 for p in short), [p.stderr for p in short]
    first, second = (json.loads(p.stdout) for p in short)
    for key in ("references", "reconstructions", "scores", "labels", "inferred_labels"):
        assert first[key] == second[key], key
    assert first["references"] == record["references"]  # the seed, not the step count, picks the batch


def test_json_to_stdout_is_pure_json(tmp_path):
    proc = gradleak(
        "attack", "--data", "sample", "--attack", "dlg", "--iterations", "2", "--seed", "3",
        "--knows", "lengths,batch-size", "--json", "-",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["attack"] == "dlg" and record["seed"] == 3 and record["data"] == "sample"
    assert record["spec"]["iterations"] == 2
    # --knows reaches the spec: lengths and the batch size, not the labels
    knows = {k: record["spec"][k] for k in ("known_batch_size", "known_lengths", "known_labels")}
    assert knows == {"known_batch_size": True, "known_lengths": True, "known_labels": False}
    assert set(record["scores"]) == SCORE_KEYS


def _bad_inputs(tmp_path):
    two = tmp_path / "two.txt"
    two.write_text("the first sentence\nthe second sentence\n", encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    return {
        "unknown victim": ["--victim", "no-such-victim"],
        "unknown attack": ["--attack", "no-such-attack"],
        "unknown data name": ["--data", "no-such-set"],
        "missing data file": ["--data", str(tmp_path / "missing.tsv")],
        "empty data file": ["--data", str(empty)],
        "batch larger than data": ["--data", str(two), "--batch-size", "5"],
        "zero iterations": ["--iterations", "0"],
        "negative batch size": ["--batch-size", "-1"],
    }


CASES = [
    ("unknown victim", "no-such-victim"),
    ("unknown attack", "no-such-attack"),
    ("unknown data name", "no-such-set"),
    ("missing data file", "missing.tsv"),
    ("empty data file", "no sentences"),
    ("batch larger than data", "larger than the data"),
    ("zero iterations", "iterations must be at least 1"),
    ("negative batch size", "batch size must be at least 1"),
]


@pytest.mark.parametrize(("case", "expected"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_exits_2_with_one_line(tmp_path, case, expected):
    args = _bad_inputs(tmp_path)[case]
    proc = gradleak("attack", *args, cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    assert expected in lines[0]
    assert proc.stdout == ""


def test_error_output_starts_with_error(tmp_path):
    proc = gradleak("attack", "--victim", "no-such-victim", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:"), repr(proc.stderr)
    assert len(proc.stderr.splitlines()) == 1


def test_option_parsing_error_is_a_usage_error(tmp_path):
    proc = gradleak("attack", "--batch-size", "abc", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Usage:" in proc.stderr and "--batch-size" in proc.stderr


def test_help(tmp_path):
    proc = gradleak("attack", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for option in ("--victim", "--data", "--batch-size", "--attack", "--iterations", "--json"):
        assert option in proc.stdout


def test_a_normal_run_prints_no_warnings(tmp_path):
    """gpt2-tiny makes transformers warn (a FutureWarning about past_key_values): not on a normal run."""
    proc = gradleak(
        "attack", "--victim", "gpt2-tiny", "--data", "sample", "--attack", "exact", "--batch-size", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
    assert "exact match 100.0" in " ".join(proc.stdout.split())  # rich wraps at 80 columns


@pytest.mark.parametrize("verbose", [False, True])
def test_python_warnings_go_to_logging_and_show_only_when_verbose(verbose):
    code = (
        "import warnings\n"
        "from gradleak.cli.common import setup_logging\n"
        f"setup_logging({verbose})\n"
        "warnings.warn('a dependency is deprecating something', FutureWarning)\n"
        "import logging; logging.getLogger('transformers.modeling_utils').warning('chatter')\n"
    )
    env = clean_env()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    if verbose:
        assert "WARNING py.warnings:" in proc.stderr and "FutureWarning: a dependency" in proc.stderr
        assert "chatter" in proc.stderr
    else:
        assert proc.stderr == ""


@pytest.mark.parametrize(
    ("command", "knows", "message"),
    [
        ("attack", "lengths,foo", "unknown item 'foo'"),
        ("audit", "", "--knows is empty"),
        ("attack", "none,labels", "unknown item 'none'"),
    ],
)
def test_bad_knows_is_one_line_exit_2(command, knows, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = main_in_process((command, "--knows", knows), capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --knows") and message in lines[0], err


def test_the_old_knowledge_flags_are_gone(tmp_path):
    for flag in ("--known-labels", "--unknown-batch-size"):
        proc = gradleak("attack", flag, cwd=tmp_path)
        assert proc.returncode == 2 and "No such option" in proc.stderr, proc.stderr


def test_knows_reaches_the_audit_specs():
    from gradleak.audit import AuditSpec
    from gradleak.knowledge import parse_knows

    jobs = AuditSpec(knows=parse_knows("labels,lengths")).jobs()
    fields = {(j.spec.known_batch_size, j.spec.known_lengths, j.spec.known_labels) for j in jobs}
    assert fields == {(False, True, True)}


CLI = Path(__file__).resolve().parents[1] / "src" / "gradleak" / "cli"


def _cli_imports(path: Path) -> set[str]:
    """The gradleak.cli modules a file imports (anywhere in it, deferred imports included)."""

    def ours(name: str) -> bool:
        return name == "gradleak.cli" or name.startswith("gradleak.cli.")

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and ours(node.module):
            if node.module == "gradleak.cli":
                found.update(f"gradleak.cli.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if ours(a.name))
    return found


def test_the_cli_package_has_no_circles():
    """common is a leaf; a command module imports only common; only __init__ imports the commands."""
    modules = sorted(p for p in CLI.glob("*.py") if p.stem != "__init__")
    assert {p.stem for p in modules} >= {"common", "attack", "runs", "conditions", "fl", "theory"}
    for path in modules:
        allowed = set() if path.stem == "common" else {"gradleak.cli.common"}
        assert _cli_imports(path) <= allowed, path.name
    # and nothing outside the package but `python -m gradleak` imports the CLI (the library never
    # reaches up into it)
    for path in (CLI.parent).rglob("*.py"):
        if CLI not in path.parents and path.name != "__main__.py":
            assert not _cli_imports(path), path
    assert not (CLI.parent / "cli.py").exists()
    assert not (CLI.parent / "flower" / "cli.py").exists() and not (CLI.parent / "theory" / "cli.py").exists()


def test_the_entry_points_run(tmp_path):
    from gradleak.cli import app, main

    assert callable(main) and app.registered_commands
    proc = subprocess.run(
        [sys.executable, "-c", "from gradleak.cli import main; main()", "privacy", "epsilon",
         "--noise-multiplier", "1", "--json", "-"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["noise_multiplier"] == 1.0


def test_sweep_workers_print_no_warnings(tmp_path):
    """The worker processes of `sweep --workers 2` (spawned) keep quiet as the main process does."""
    spec = tmp_path / "w.toml"
    spec.write_text(
        '[grid]\nseed = [0, 1]\n[fixed]\nvictim = "gpt2-tiny"\ndata = "sample"\nattack = "exact"\n',
        encoding="utf-8",
    )
    env = clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "gradleak", "sweep", str(spec), "--store", str(tmp_path / "w.sqlite"),
         "--workers", "2", "--json", "-"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["done"] == 2
    assert "Warning" not in proc.stderr, proc.stderr
