"""Gradient-matching attacks (DLG, TAG, cos) on bert-tiny and MiniLM: ROUGE, token accuracy, time.

    python benchmarks/attack_quality.py                 # the full table (long)
    python benchmarks/attack_quality.py --batches 2     # a quick look

Writes the section `attack_quality` of benchmarks/RESULTS.md and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from _results import machine, run_cell, summarise, table, write_section

from gradleak.experiment import RunSpec
from gradleak.knowledge import DEFAULT_KNOWS, parse_knows

PUBLISHED = """Published reference points (LAMP paper, BERT-base, CoLA, B=1, ROUGE-1/2): DLG 59.3/7.7,
TAG 78.9/10.2, LAMP 89.6/51.9. LAMP's own code on a 2-core machine, MiniLM, held-out SST-2, B=1,
300 steps: TAG ROUGE-1/2 46.9/2.0 at about 0.27 s per step."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--victims", default="bert-tiny,minilm")
    ap.add_argument("--attacks", default="dlg,tag,cos")
    ap.add_argument("--data", default="cola,sst2,rt")
    ap.add_argument("--batch-sizes", default="1,2,4")
    ap.add_argument("--minilm-batch-sizes", default="1")
    ap.add_argument("--batches", type=int, default=10, help="batches per cell (bert-tiny)")
    ap.add_argument("--minilm-batches", type=int, default=2, help="batches per cell (minilm)")
    ap.add_argument("--target-batches", type=int, default=10, help="batches of the TAG/MiniLM/SST-2 cell")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--section", default="attack_quality")
    ap.add_argument("--knows", default=DEFAULT_KNOWS, help="what the server knows (as gradleak's --knows)")
    args = ap.parse_args()
    knows = parse_knows(args.knows)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for victim in args.victims.split(","):
        is_minilm = victim == "minilm"
        sizes = args.minilm_batch_sizes if is_minilm else args.batch_sizes
        for attack in args.attacks.split(","):
            for data in args.data.split(","):
                for b in (int(x) for x in sizes.split(",")):
                    n = args.minilm_batches if is_minilm else args.batches
                    if is_minilm and attack == "tag" and data == "sst2" and b == 1:
                        n = max(n, args.target_batches)
                    spec = RunSpec(
                        victim=victim, data=data, batch_size=b, attack=attack, iterations=args.iterations,
                        **knows.spec_fields(),
                    )  # fmt: skip
                    s = summarise(run_cell(spec, n))
                    row = [victim, attack, data, b, s["batches"], s["rouge1"], s["rouge2"],
                           s["token_accuracy"], s["seconds"], f"{s['seconds'] / args.iterations:.3f}"]  # fmt: skip
                    rows.append(row)
                    print(" | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in row), flush=True)
                    write_section(args.section, _body(args, rows, done=False))
    write_section(args.section, _body(args, rows, done=True))
    print(table(HEADER, rows))


HEADER = ["victim", "attack", "data", "B", "batches", "ROUGE-1", "ROUGE-2", "token acc.", "s/batch", "s/step"]


def _body(args: argparse.Namespace, rows: list[list[object]], *, done: bool) -> str:
    status = "" if done else " (run in progress: the table so far)"
    return (
        f"## Gradient matching (`python benchmarks/attack_quality.py`){status}\n\n"
        f"Command arguments: `{' '.join(sys.argv[1:])}`. "
        f"{args.iterations} Adam steps, the server knows: {parse_knows(args.knows).describe()} (lengths it "
        "is not given are inferred from the update; labels from the head's bias gradient). "
        f"Machine: {machine()}.\n\n{table(HEADER, rows)}\n\n{PUBLISHED}\n"
    )


if __name__ == "__main__":
    main()
