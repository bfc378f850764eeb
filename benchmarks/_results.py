"""Shared helpers of the benchmark scripts: run cells, format tables, write RESULTS.md sections."""

from __future__ import annotations

import fcntl
import os
import platform
import re
import statistics
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from gradleak.experiment import RunRecord, RunSpec, run_one

RESULTS = Path(__file__).with_name("RESULTS.md")


def run_cell(spec: RunSpec, batches: int, first_seed: int = 0) -> list[RunRecord]:
    """The same spec over seeds first_seed.. (0..batches-1 by default; each seed draws another batch
    and model init)."""
    return [run_one(replace(spec, seed=seed)) for seed in range(first_seed, first_seed + batches)]


def run_counted(spec: RunSpec, batches: int) -> tuple[list[RunRecord], list[str]]:
    """`run_cell`, with a batch the attack refuses counted (its reason kept) rather than failing the
    cell: a refusal is a result."""
    from gradleak.errors import GradleakError

    records, refusals = [], []
    for seed in range(batches):
        try:
            records.append(run_one(replace(spec, seed=seed)))
        except GradleakError as exc:
            refusals.append(str(exc))
    return records, refusals


def summarise(records: Iterable[RunRecord]) -> dict[str, float]:
    records = list(records)

    def mean(key: str) -> float:
        return statistics.fmean(getattr(r.scores, key) for r in records)

    return {
        "rouge1": mean("rouge1"),
        "rouge2": mean("rouge2"),
        "token_accuracy": mean("token_accuracy"),
        "exact_match": mean("exact_match"),
        "seconds": statistics.fmean(r.seconds for r in records),
        "batches": len(records),
    }


def table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(x: object) -> str:
        return f"{x:.1f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {time.strftime('%Y-%m-%d')}, "
        f"1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when written"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of benchmarks/RESULTS.md."""
    with open(RESULTS.with_suffix(".lock"), "w") as lock:  # several benchmarks may run at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_section(name, body)


def _replace_section(name: str, body: str) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    )
    RESULTS.write_text(text, encoding="utf-8")
