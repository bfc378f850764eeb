"""Time the main job, `gradleak audit` with no arguments, as a user runs it: a fresh interpreter in an
empty folder (so a fresh store), wall-clock and CPU seconds, and the load on the machine while it ran.

    python benchmarks/audit.py            # writes the `audit` section of benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import machine, table, write_section

LIMIT = 300.0  # the budget: under 5 minutes on 2 cores


def run_audit() -> tuple[float, float, dict, tuple[float, float, float]]:
    with tempfile.TemporaryDirectory(prefix="gradleak-bench-audit-") as tmp:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "gradleak", "audit", "--json", "audit.json"],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        load = os.getloadavg()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"gradleak audit failed ({proc.returncode}):\n{proc.stderr}")
        result = json.loads((Path(tmp) / "audit.json").read_text(encoding="utf-8"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result, load


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    wall, cpu, result, load = run_audit()
    rows = [
        [
            r["attack"],
            " -> ".join(r["defenses"]) or "none",
            r["scores"]["rouge1"],
            r["scores"]["exact_match"],
            "∞" if not r["privacy"] or r["privacy"]["epsilon"] is None else f"{r['privacy']['epsilon']:.3g}",
            r["seconds"],
        ]
        for r in result["runs"]
    ]
    runs = table(["attack", "defences", "ROUGE-1", "exact match", "ε", "attack s"], rows)
    thresholds = table(
        ["attack", "status", "leak stops at", "ε one round", "ε deployed", "utility cost (points)"],
        [
            [
                attack,
                t["status"],
                "-" if t["strength"] is None else f"{t['defence']} {t['strength']:.3g}",
                "-" if t["epsilon"] is None else f"{t['epsilon']:.3g}",
                "-" if t["epsilon_deployment"] is None else f"{t['epsilon_deployment']:.3g}",
                "-" if t["utility_cost"] is None else f"{t['utility_cost']:.1f}",
            ]
            for attack, v in result["attacks"].items()
            for t in [v["threshold"]]
        ],
    )
    counts = result["summary"]
    shared = load[0] > (os.cpu_count() or 2) + 0.5
    body = "\n".join(
        [
            "## `gradleak audit` (the main job, no arguments: threshold scan, utility, reconstruction bound)",
            "",
            f"Machine: {machine()}; {os.cpu_count()} cores. Command: `python benchmarks/audit.py`.",
            "",
            f"**{wall:.0f} s wall clock** ({'under' if wall < LIMIT else 'OVER'} the {LIMIT:.0f} s budget), "
            f"{cpu:.0f} s of CPU in the audit process; 1-minute load average at the end {load[0]:.1f}"
            + (" (the machine was shared with other jobs: the wall clock is pessimistic)" if shared else "")
            + ".",
            "",
            f"{counts['total']} runs in all (attacks with and without the defence, the threshold scan, "
            "the utility training runs):",
            "",
            runs,
            "",
            thresholds,
            "",
            "Verdict: " + " ".join(result["verdict"]),
        ]
    )
    print(body)
    write_section("audit", body)


if __name__ == "__main__":
    main()
