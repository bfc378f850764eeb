"""Canary audit against the accountant: the lower bound on epsilon the exact attack certifies (95 %
confidence by default), beside the accountant's epsilon for the same mechanism (one release,
replace-one neighbours), for no defence, absolute Gaussian noise, and DP-SGD (clip 1) at several
noise multipliers, from ones under which the attack still works to 0.5, 1 and 2.

    python benchmarks/canary.py --threads 1                 # the full table
    python benchmarks/canary.py --threads 1 --trials 40 --multipliers 1,1e-6
    python benchmarks/canary.py --threads 1 --no-none --sigmas "" --multipliers 2e-5,5e-5 \
        --section canary_transition          # where the attack stops working

Writes the section `canary` of benchmarks/RESULTS.md after every cell and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

import torch
from _results import machine, table, write_section

from gradleak.canary import CanaryResult, run_canary_audit
from gradleak.canary_stats import planned_ceiling
from gradleak.errors import GradleakError
from gradleak.privacy import report


def _cells(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...]]]:
    """Issue 21's targets first (none, absolute noise, multipliers 0.5, 1, 2), then the rest."""
    cells: list[tuple[str, tuple[str, ...]]] = [] if args.no_none else [("none", ())]
    cells += [(f"gaussian sigma={s}", (f"gaussian:sigma={s}",)) for s in args.sigmas.split(",") if s]
    cells += [
        (f"dp-sgd clip={args.clip:g} Z={z}", (f"dp-sgd:clip={args.clip:g},multiplier={z}",))
        for z in args.multipliers.split(",")
        if z
    ]
    return cells


def _noise_order(defenses: tuple[str, ...]) -> tuple[int, float]:
    """Table order: none, absolute noise, then DP-SGD by decreasing multiplier (lower bound rising)."""
    if not defenses:
        return (0, 0.0)
    spec = defenses[0]
    value = float(spec.rsplit("=", 1)[1])
    return (1, -value) if spec.startswith("gaussian") else (2, -value)


def _eps(value: float | None, reason: str = "") -> str:
    if value is None:
        return f"none ({reason})" if reason else "none"
    return f"{value:.3g}"


def _analytic(result: CanaryResult) -> str:
    """The analytic Gaussian (Balle & Wang 2018) epsilon of the same release: tight for one Gaussian."""
    mechs = result.mechanisms
    if len(mechs) != 1 or mechs[0].kind != "gaussian":
        return "-"
    return _eps(report(mechs, result.delta, "analytic").epsilon)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--victim", default="gpt2-tiny")
    ap.add_argument("--data", default="sst2")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--attack", default="exact")
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--sigmas", default="1e-4", help="absolute Gaussian noise levels (unclipped)")
    ap.add_argument("--multipliers", default="0.5,1,2,1e-6,1e-5,1e-4", help="DP-SGD noise multipliers")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--no-none", action="store_true", help="leave out the row without a defence")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--accountant", default="rdp")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--section", default="canary")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(sys.argv[1:])

    rows: dict[tuple[str, ...], list[object]] = {}
    inconsistent: list[str] = []
    vacuous: list[str] = []  # the accountant's epsilon at or above what the trials can certify
    for label, defenses in _cells(args):
        try:
            r = run_canary_audit(
                victim=args.victim,
                data=args.data,
                batch_size=args.batch_size,
                attack=args.attack,
                defenses=defenses,
                trials=args.trials,
                seed=args.seed,
                device="cpu",
                delta=args.delta,
                accountant=args.accountant,
                confidence=args.confidence,
                dtype=args.dtype,
            )
        except GradleakError as exc:
            print(f"{label}: {exc}", file=sys.stderr)
            continue
        if not r.consistent():
            inconsistent.append(label)
        if r.epsilon_upper is not None and r.epsilon_upper >= r.epsilon_ceiling:
            vacuous.append(label)
        rows[defenses] = [
            label,
            f"{r.in_trials}/{r.out_trials}",
            r.false_negatives,
            r.false_positives,
            f"{r.epsilon_lower:.3g}",
            f"{r.epsilon_ceiling:.3g}",
            _eps(r.epsilon_upper, r.epsilon_upper_reason),
            _analytic(r),
            _eps(r.epsilon_add_remove),
            f"{r.seconds / r.trials:.2f}",
            f"{os.getloadavg()[0]:.1f}",
        ]
        print(label, rows[defenses], flush=True)
        _write(args, command, rows, inconsistent, vacuous)


def _write(
    args: argparse.Namespace, command: str, rows: dict, inconsistent: list[str], vacuous: list[str]
) -> None:
    header = [
        "defence",
        "in/out trials",
        "false neg.",
        "false pos.",
        f"epsilon >= ({100 * args.confidence:g} %)",
        "ceiling",
        f"{args.accountant} epsilon (replace-one)",
        "analytic (replace-one)",
        f"{args.accountant} (add/remove)",
        "s/trial",
        "load",
    ]
    ordered = [rows[k] for k in sorted(rows, key=_noise_order)]
    ceiling = planned_ceiling(args.trials, delta=args.delta, confidence=args.confidence)
    verdict = (
        "The certified lower bound never exceeds the accountant's epsilon in this table."
        if not inconsistent
        else f"LOWER BOUND ABOVE THE ACCOUNTANT'S EPSILON (a bug) for: {', '.join(inconsistent)}."
    )
    body = f"""## Canary audit against the accountant (`python benchmarks/canary.py`)

Command arguments: `{command or "(defaults)"}`. {args.trials} trials per row, each a fresh batch of
{args.batch_size} from {args.data} with the canary (`gradleak.canary.DEFAULT_CANARY`) in or out at
random; {args.attack} attack on {args.victim} ({args.dtype}), one FedSGD release; rule: "in" when a
reconstructed sentence has ROUGE-1 >= 50 against the canary, fixed in advance. Lower bound: one-sided
Clopper-Pearson limits on both error rates (alpha split between them), delta {args.delta:g},
confidence {args.confidence:g}. "ceiling": the most these trials could certify with no errors
(about {ceiling:.2f} for an even split of {args.trials}). Accountant: one release under replace-one
neighbours (the canary swapped for another sentence: sensitivity 2C, so the multiplier halves); the
add/remove-one epsilon `gradleak attack` reports is beside it. "none": no finite epsilon (no DP
mechanism, or noise on an unclipped update). s/trial: wall seconds per trial on 1 thread, the
1-minute load average of the 2-core machine (shared with other work) beside it.
Machine: {machine()}.

{table(header, ordered)}

{verdict} Rows where the accountant's epsilon is at or above the ceiling cannot show a violation
whatever the attack does (more trials would raise the ceiling): {", ".join(vacuous) or "none"}.
"""
    write_section(args.section, body)
    print(table(header, ordered))


if __name__ == "__main__":
    main()
