"""The command line, run as a user would: `python -m gradleak ...` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def gradleak(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradleak", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.mark.slow
def test_attack_writes_a_json_record(tmp_path):
    out = tmp_path / "out.json"
    proc = gradleak(
        "attack",
        "--victim", "bert-tiny",
        "--data", "sst2",
        "--batch-size", "1",
        "--attack", "tag",
        "--iterations", "300",
        "--seed", "0",
        "--json", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    record = json.loads(out.read_text(encoding="utf-8"))
    assert RECORD_KEYS <= set(record)
    assert set(record["scores"]) == SCORE_KEYS
    assert record["victim"] == "bert-tiny"
    assert record["attack"] == "tag"
    assert record["data"] == "sst2"
    assert record["batch_size"] == 1
    assert record["seed"] == 0
    assert len(record["references"]) == len(record["reconstructions"]) == 1
    assert record["references"][0]  # a real SST-2 sentence
    assert record["seconds"] > 0
    for key, value in record["scores"].items():
        assert 0.0 <= value <= 100.0, key
    # the human-readable summary goes to stdout as well
    assert "token accuracy" in proc.stdout
    assert record["references"][0].split()[0] in proc.stdout


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
