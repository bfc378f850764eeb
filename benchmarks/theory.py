"""The theory lab's documented regimes: where DLG recovers X from one attention layer's gradient.

    python benchmarks/theory.py                 # 5 seeds per regime, 1 thread
    python benchmarks/theory.py --seeds 2 --dry-run   # a quick look, RESULTS.md untouched

Writes the section `theory` of benchmarks/RESULTS.md and prints the table. The phase diagrams and
the noise and convergence figures come from `gradleak theory sweep --out docs/theory`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import replace

import torch
from _results import machine, table, write_section

from gradleak.theory.recover import RecoverySpec, recover

BASE = RecoverySpec(n=4, d=8, known_target=True)
LOCAL = {"init_distance": 0.1, "optimizer": "lm", "iterations": 60, "restarts": 1}
REGIMES = (
    ("n=4, d=8, Y known, qkv, L-BFGS, random start", {}),
    ("n=2, d=8, Y known", {"n": 2}),
    ("n=8, d=8, Y known", {"n": 8}),
    ("n=4, d=8, Y unknown", {"known_target": False}),
    ("n=4, d=8, Y unknown, start 10% away, LM", {"known_target": False, **LOCAL}),
    ("n=4, d=8, only W_V's gradient", {"share": "v"}),
    ("n=4, d=8, only W_Q's and W_K's gradients", {"share": "qk"}),
    ("n=16, d=8 (n = 2d), random start", {"n": 16}),
    ("n=16, d=8 (n = 2d), start 10% away, LM", {"n": 16, **LOCAL}),
    ("n=24, d=4 (n > 2d), start 10% away, LM", {"n": 24, "d": 4, **LOCAL}),
    ("n=4, d=8, weight norm 10", {"weight_norm": 10.0}),
    ("n=4, d=8, clip 1, sigma 1e-4", {"clip": 1.0, "sigma": 1e-4}),
    ("n=4, d=8, clip 1, sigma 1e-2", {"clip": 1.0, "sigma": 1e-2}),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--section", default="theory")
    ap.add_argument("--dry-run", action="store_true", help="print the table, do not write RESULTS.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    for label, overrides in REGIMES:
        results = [recover(replace(BASE, seed=s, **overrides)) for s in range(args.seeds)]
        its = [r.iterations for r in results if r.iterations is not None]
        li = results[0].identifiability
        rows.append(
            [label, f"{sum(r.success for r in results)}/{len(results)}",
             f"{statistics.median(r.relative_error for r in results):.2g}",
             f"{statistics.median(r.objective for r in results):.1g}",
             str(int(statistics.median(its))) if its else "-",
             f"{li.rank}/{li.unknowns}" if li is not None else "-",
             statistics.fmean(r.seconds for r in results)]
        )  # fmt: skip
        print(" | ".join(str(x) for x in rows[-1]), flush=True)
    body = "\n\n".join(
        [
            "## Theory lab: DLG on one softmax attention layer (`python benchmarks/theory.py`)",
            f"Seeds 0..{args.seeds - 1}; success is relative error < 1e-3 (X modulo the gradient's symmetries). "
            "L-BFGS: 8 restarts x 300 gradient evaluations, lowest objective kept. LM: Levenberg-Marquardt, "
            f"60 Jacobians. 'rank' is the Jacobian rank of the shared gradient in the unknowns at the truth "
            f"(seed 0). Machine: {machine()}.",
            table(
                [
                    "regime",
                    "recovered",
                    "median error",
                    "median objective",
                    "median evaluations to 1e-3",
                    "rank",
                    "s/run",
                ],
                rows,
            ),  # fmt: skip
        ]
    )
    if not args.dry_run:
        write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
