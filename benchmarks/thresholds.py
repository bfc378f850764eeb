"""Where the leak stops: the audit's threshold scan (`gradleak.audit.run_audit`) for several victims
and batch sizes, with epsilon at the threshold for one round and for the audit's default deployment,
and the reconstruction bound there.

    python benchmarks/thresholds.py --threads 1                       # gpt2-wide, minilm, smollm2 x 1,4,16
    python benchmarks/thresholds.py --threads 1 --victims gpt2-wide --batch-sizes 1
    python benchmarks/thresholds.py --threads 1 --skip smollm2:16 --note "why"   # list a cell as not run

Runs are kept in a store (`--store`, default benchmarks/.thresholds.sqlite): a re-run skips what is
done. Writes the section `thresholds` of benchmarks/RESULTS.md after every cell, marked as in
progress until the last one, and prints the table.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from _results import machine, table, write_section

from gradleak.audit import AuditSpec, run_audit
from gradleak.rero import reconstruction_bound
from gradleak.store import Store
from gradleak.sweeps.jobs import execute


def _g(x: float | None) -> str:
    return "∞" if x is None else f"{x:.3g}"


def _where(t) -> str:
    if t.strength is None:
        return t.scan.status  # no-leak, leaks (at the strongest setting tried), failed
    if t.strength == 0:
        return f"{t.defence} 0 (the clip alone stops it)"
    at = "≤ " if t.scan.below is None else ""  # the grid's floor (1e-7) already stopped the leak
    return f"{t.defence} {at}{_g(t.strength)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--victims", default="gpt2-wide,minilm,smollm2")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--attacks", default="exact")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--defense", default="dp-sgd:clip=1,multiplier=1")
    ap.add_argument("--bisect", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--sample-rate", type=float, default=1.0)
    ap.add_argument("--max-words", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--store", default=str(Path(__file__).with_name(".thresholds.sqlite")))
    ap.add_argument("--section", default="thresholds")
    ap.add_argument("--skip", default="", help="cells not to run, VICTIM:B,... (listed as not run)")
    ap.add_argument("--note", default="", help="a sentence on why, printed under the table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = {(v, int(b)) for v, b in (c.split(":") for c in args.skip.split(",") if c)}
    cells = [(v, int(b)) for v in args.victims.split(",") for b in args.batch_sizes.split(",")]
    cells = [c for c in cells if c not in skip]
    rows: list[list[object]] = []
    header = ["victim", "B", "attack", "leak stops at", "still leaks at", "ε one round", "ε deployed"]
    header += ["bound at z*", "scan runs", "s"]
    with Store.open(args.store, create=True) as store:
        done = store.finished_keys()

        def run_jobs(jobs):
            out = []
            for job in jobs:
                if job.key in done:
                    out.extend(store.runs(keys=[job.key]))
                    continue
                row = execute(job)
                store.put(row)
                out.append(row)
            return out

        for i, (victim, b) in enumerate(cells):
            spec = AuditSpec(
                victim=victim,
                data=args.data,
                batch_size=b,
                attacks=tuple(args.attacks.split(",")),
                defenses=(args.defense,),
                bisect=args.bisect,
                rounds=args.rounds,
                sample_rate=args.sample_rate,
                max_words=args.max_words,
                time_budget=args.time_budget,
                utility=False,
                canary_trials=0,  # the canary audit has its own benchmark (canary.py)
            )
            result = run_audit(spec, run_jobs)
            seconds = sum(r.finished - r.started for r in result.rows)  # each run's wall clock, as stored
            for t in result.thresholds:
                bound = None
                if t.strength is not None and t.epsilon is not None:
                    from gradleak.privacy import Mechanism

                    bound = reconstruction_bound(
                        [Mechanism("gaussian", t.strength)], result.prior.kappa
                    ).bound
                rows.append(
                    [
                        victim,
                        b,
                        t.attack,
                        _where(t),
                        "-" if t.scan.below is None else _g(t.scan.below),
                        _g(t.epsilon),
                        _g(t.epsilon_deployment),
                        "-" if bound is None else f"{100 * bound:.3g} %",
                        len(t.scan.points),
                        round(seconds),
                    ]
                )
            progress = "" if i == len(cells) - 1 else " (run in progress: the table so far)"
            body = "\n".join(
                [
                    f"## Where the leak stops (`python benchmarks/thresholds.py`){progress}",
                    "",
                    f"Command arguments: `--threads {args.threads} --victims {args.victims} "
                    f"--batch-sizes {args.batch_sizes}`. Data {args.data}, the audit's threshold scan of "
                    f"`{args.defense}` (grid of decades from 1e-4, down to 1e-7 when needed, then "
                    f"{args.bisect} bisection steps); leakage stops at ROUGE-1 < 20 with no sentence exact. "
                    f"ε: rdp accountant, δ = 1e-5, one round, and {args.rounds} rounds at q = "
                    f"{args.sample_rate:g}. Bound: the largest exact-recovery success DP allows at the "
                    f"threshold for one release (Gaussian trade-off, Hayes et al. 2023) at prior "
                    f"κ = 1/(N - B + 1), N the {args.data} candidate sentences (the audit's default). s: wall-clock "
                    f"seconds of the cell's runs (plain, defended and the scan's, each as the store timed it; "
                    f"≤: the grid's floor already stopped the leak). Machine: {machine()}; "
                    f"load average {os.getloadavg()[0]:.1f} at the end of the cell.",
                    "",
                    table(header, rows),
                    *(
                        [
                            "",
                            "Not run: " + ", ".join(f"{v} B={b}" for v, b in sorted(skip)) + ". " + args.note,
                        ]
                        if skip
                        else []
                    ),
                ]
            )
            print(body, flush=True)
            write_section(args.section, body)


if __name__ == "__main__":
    main()
