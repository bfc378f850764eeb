"""Leakage under noise: ROUGE-1 of the exact attack, its noise-robust variant (exact-robust) and TAG
against absolute Gaussian noise and against DP-SGD's noise multiplier (clip 1), on the GPT-2-width
decoder and MiniLM, epsilon beside each point.

    python benchmarks/noise.py                          # the full table (long)
    python benchmarks/noise.py --batches 1 --attacks exact,exact-robust

Writes the section `noise` of benchmarks/RESULTS.md (after every cell) and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from dataclasses import replace

import torch
from _results import machine, table, write_section

from gradleak.errors import GradleakError
from gradleak.experiment import RunRecord, RunSpec, run_one
from gradleak.knowledge import DEFAULT_KNOWS, parse_knows

PUBLISHED = """DAGER (Petrov et al., NeurIPS 2024), published ROUGE-1 under absolute Gaussian noise, GPT-2,
Rotten Tomatoes, B=1: sigma 1e-5 -> 74.0, 5e-5 -> 46.9, 1e-4 -> 20.7, 5e-4 -> 5.6."""

LEAK_STOPS = 20.0  # ROUGE-1 below this counts as no leak (unigram overlap of unrelated text)


def _points(args: argparse.Namespace) -> list[tuple[str, tuple[str, ...]]]:
    pts: list[tuple[str, tuple[str, ...]]] = [("none", ())]
    pts += [(f"sigma={s}", (f"gaussian:sigma={s}",)) for s in args.sigmas.split(",") if s]
    pts += [
        (f"dp-sgd Z={z}", (f"dp-sgd:clip={args.clip},multiplier={z}",))
        for z in args.multipliers.split(",")
        if z
    ]
    return pts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--victims", default="gpt2-wide,minilm")
    ap.add_argument("--attacks", default="exact,tag")
    ap.add_argument("--data", default="rt")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--sigmas", default="1e-6,1e-5,5e-5,1e-4,5e-4,1e-3,1e-2")
    ap.add_argument("--multipliers", default="1e-4,1e-3,0.01,0.1,0.5,1,2")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--batches", type=int, default=3, help="batches per exact cell")
    ap.add_argument(
        "--first-seed", type=int, default=0, help="batches are seeds first-seed.. (held-out checks)"
    )
    ap.add_argument("--tag-batches", type=int, default=1, help="batches per TAG cell")
    ap.add_argument("--tag-iterations", type=int, default=150)
    ap.add_argument("--tag-points", default="none,sigma=1e-4,sigma=1e-2,dp-sgd Z=0.1,dp-sgd Z=1")
    ap.add_argument("--max-words", type=int, default=25)
    ap.add_argument("--time-budget", type=float, default=30.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--accountant", default="rdp")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--section", default="noise")
    ap.add_argument("--knows", default=DEFAULT_KNOWS, help="what the server knows (as gradleak's --knows)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    tag_points = set(args.tag_points.split(","))
    rows: list[list[object]] = []
    curves: dict[tuple[str, str, int], list[tuple[str, float, str]]] = {}
    for victim in args.victims.split(","):
        for attack in args.attacks.split(","):
            for b in (int(x) for x in args.batch_sizes.split(",")):
                for label, defenses in _points(args):
                    if attack == "tag" and label not in tag_points:
                        continue
                    spec = RunSpec(
                        victim=victim, data=args.data, batch_size=b, attack=attack, defenses=defenses,
                        **parse_knows(args.knows).spec_fields(), max_length=64, max_words=args.max_words,
                        time_budget=args.time_budget, iterations=args.tag_iterations,
                        delta=args.delta, accountant=args.accountant,
                    )  # fmt: skip
                    n = args.batches if attack.startswith("exact") else args.tag_batches
                    try:
                        seeds = range(args.first_seed, args.first_seed + n)
                        recs = [run_one(replace(spec, seed=s)) for s in seeds]
                    except GradleakError as exc:
                        rows.append([victim, attack, b, label, n, "-", "-", f"error: {str(exc)[:50]}"])
                        continue
                    r1 = statistics.fmean(r.scores.rouge1 for r in recs)
                    eps = _epsilon(recs[0])
                    sec = statistics.fmean(r.seconds for r in recs)
                    rows.append([victim, attack, b, label, n, r1, eps, sec])
                    curves.setdefault((victim, attack, b), []).append((label, r1, eps))
                    print(
                        " | ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in rows[-1]),
                        flush=True,
                    )
                    write_section(args.section, _body(args, rows, curves, done=False))
    write_section(args.section, _body(args, rows, curves, done=True))
    print(table(HEADER, rows))


HEADER = ["victim", "attack", "B", "defence", "batches", "ROUGE-1", "epsilon", "s/batch"]


def _epsilon(record: RunRecord) -> str:
    p = record.privacy
    if p is None or not record.spec.defenses:
        return "inf (no defence)"
    if p.epsilon is None:
        return f"inf ({p.reason.split(':')[0]})"
    return f"{p.epsilon:.3g}"


def _stops(curves: dict[tuple[str, str, int], list[tuple[str, float, str]]]) -> str:
    lines = []
    for (victim, attack, b), pts in curves.items():
        for family in ("sigma=", "dp-sgd"):
            fam = [p for p in pts if p[0].startswith(family)]
            stop = next((p for p in fam if p[1] < LEAK_STOPS), None)
            what = "absolute sigma" if family == "sigma=" else "DP-SGD (clip 1)"
            if stop is None:
                lines.append(f"- {victim}, {attack}, B={b}, {what}: still leaks at the largest noise tested")
            else:
                lines.append(
                    f"- {victim}, {attack}, B={b}, {what}: leak stops (ROUGE-1 < {LEAK_STOPS:.0f}) at "
                    f"{stop[0]} (epsilon {stop[2]})"
                )
    return "\n".join(lines)


def _body(args, rows, curves, *, done: bool) -> str:
    status = "" if done else " (run in progress: the table so far)"
    return (
        f"## Leakage under noise (`python benchmarks/noise.py`){status}\n\n"
        f"Command arguments: `{' '.join(sys.argv[1:])}`. Batches: seeds {args.first_seed}.. . Data {args.data} (sentences of at most "
        f"{args.max_words} words), float32 updates, one FedSGD release of one batch. Exact attacks: "
        f"the server knows the protocol perturbs updates, assembly budget {args.time_budget:g} s a batch "
        f"(exact-robust: language prior smollm2); TAG: {args.tag_iterations} Adam steps. The server "
        f"knows: {parse_knows(args.knows).describe()} (TAG infers lengths it is not given). "
        f"Epsilon: {args.accountant} accountant, "
        f"delta {args.delta:g}, one release (sample rate 1, one step), example-level for DP-SGD; "
        f"absolute noise on an unclipped update has no finite epsilon. Machine: {machine()}.\n\n"
        f"{table(HEADER, rows)}\n\nWhere the leak stops:\n\n{_stops(curves)}\n\n{PUBLISHED}\n"
    )


if __name__ == "__main__":
    main()
