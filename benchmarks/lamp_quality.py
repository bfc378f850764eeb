"""LAMP against the weaker gradient-matching attacks on the same batches: ROUGE, exact match, time.

    python benchmarks/lamp_quality.py --victims bert-tiny --batches 5 --threads 1
    python benchmarks/lamp_quality.py --victims minilm --batch-sizes 1 --batches 3 --threads 1 \\
        --variants tag,lamp-l1l2,lamp,lamp:none,cos --section lamp_minilm

Each variant is an attack, optionally with `:PRIOR` (`lamp:none` is LAMP without its prior; the
default prior is smollm2); every variant of a cell runs on the same batches (seeds 0..batches-1,
which draw the batch and the victim's initialisation). LAMP's constants and the choice of the
relative candidate score were tried on other seeds (bert-tiny CoLA 101-103, MiniLM CoLA 101-102),
and the cosine variant's repair and token search (issue 20) on bert-tiny 101-114 and MiniLM
101-103 (`--first-seed`), never on seeds 0..N-1; `lamp-span`'s weight (`lamp.SPAN_WEIGHT`) on
bert-tiny 101-114 (section `lamp_span_tuning`). Writes the section `--section` of
benchmarks/RESULTS.md after each cell (marked in progress until the end) and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
from _results import machine, run_cell, summarise, table, write_section

from gradleak.experiment import RunSpec
from gradleak.knowledge import DEFAULT_KNOWS, parse_knows
from gradleak.spec import DEFAULT_PRIOR

PUBLISHED = """Published anchors (LAMP paper, Balunovic et al. 2022, BERT-base, CoLA, B = 1, ROUGE-1/2, 2000
steps on a GPU): TAG 78.9/10.2, LAMP 89.6/51.9. The issue's targets: lamp with its prior at B = 1 on
CoLA ROUGE-1 >= 89.6 on MiniLM and on bert-tiny, and >= 10 points above tag at B = 1 and 2."""

HEADER = ["victim", "variant", "B", "batches", "ROUGE-1", "ROUGE-2", "exact %", "s/batch", "load"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--victims", default="bert-tiny")
    ap.add_argument("--variants", default="tag,cos,lamp,lamp:none,lamp-l1l2,lamp-l1l2:none")
    ap.add_argument("--data", default="cola")
    ap.add_argument("--batch-sizes", default="1,2")
    ap.add_argument("--batches", type=int, default=5, help="batches per cell (seeds 0..N-1)")
    ap.add_argument(
        "--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 instead (tuning: not 0..N-1)"
    )
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--section", default="lamp_quality")
    ap.add_argument("--knows", default=DEFAULT_KNOWS, help="what the server knows (as gradleak's --knows)")
    args = ap.parse_args()
    knows = parse_knows(args.knows)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows: list[list[object]] = []
    for victim in args.victims.split(","):
        for b in (int(x) for x in args.batch_sizes.split(",")):
            for variant in args.variants.split(","):
                attack, _, prior = variant.partition(":")
                spec = RunSpec(
                    victim=victim, data=args.data, batch_size=b, attack=attack, iterations=args.iterations,
                    prior=prior or DEFAULT_PRIOR, **knows.spec_fields(),
                )  # fmt: skip
                s = summarise(run_cell(spec, args.batches, args.first_seed))
                load = f"{os.getloadavg()[0]:.1f}"
                row = [victim, variant, b, s["batches"], s["rouge1"], s["rouge2"], s["exact_match"],
                       s["seconds"], load]  # fmt: skip
                rows.append(row)
                print(" | ".join(f"{x:.1f}" if isinstance(x, float) else str(x) for x in row), flush=True)
                write_section(args.section, _body(args, rows, done=False))
    write_section(args.section, _body(args, rows, done=True))
    print(table(HEADER, rows))


def _body(args: argparse.Namespace, rows: list[list[object]], *, done: bool) -> str:
    status = "" if done else " (run in progress: the table so far)"
    return (
        f"## LAMP against TAG and cos (`python benchmarks/lamp_quality.py`){status}\n\n"
        f"Command arguments: `{' '.join(sys.argv[1:])}`. Data {args.data}, {args.iterations} Adam steps "
        f"for every attack, the same batches (seeds {args.first_seed}..{args.first_seed + args.batches - 1}) "
        "for every variant; the server "
        f"knows: {parse_knows(args.knows).describe()} (lengths inferred from the update, labels from the "
        "head's bias gradient). `lamp` is LAMP with the cosine distance, `lamp-l1l2` with TAG's L1+L2 "
        "distance (the paper's two variants); `:none` runs it without the language prior, otherwise the "
        "prior is smollm2 (SmolLM2-135M). s/batch is wall time per batch on a shared machine; `load` is the "
        f"1-minute load average when the cell finished. Machine: {machine()}.\n\n"
        f"{table(HEADER, rows)}\n\n{PUBLISHED}\n"
    )


if __name__ == "__main__":
    main()
