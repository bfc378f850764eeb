"""The exact attack on a GPT-2-width decoder, the real MiniLM, or any victim: quality and seconds per batch.

    python benchmarks/exact.py                       # the full table (long)
    python benchmarks/exact.py --batches 2           # a quick look
    python benchmarks/exact.py --victims smollm2 --tasks classify,lm --device cuda   # any victim, Hub ids too
    python benchmarks/exact.py --victims smollm2 --peft lora:r=256,targets=q_proj+k_proj+v_proj --peft none

Writes the section `exact` of benchmarks/RESULTS.md and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from _results import machine, run_counted, summarise, table, write_section

from gradleak.experiment import RunSpec

PUBLISHED = """DAGER (Petrov et al., NeurIPS 2024), published ROUGE-1: GPT-2 100 up to B=64 on CoLA;
BERT-base CoLA B=4 94.0, B=8 67.8; BERT-base RT B=4 66.8, B=8 37.1. DAGER's own code on a 2-core
machine (float32, held-out SST-2 of 5-20 words): MiniLM-L6 B=1 80.0 ROUGE-1 / 80 % exact at 5.3 s;
B=2/4/8 90.1/57.3/33.9 at 16/39/109 s; GPT-2 (2 layers, n_embd 768, random) B=1/4/8/16 100 % at
14.5/25.8/55.7/223 s per batch."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--victims", default="gpt2-wide,minilm", help="presets, model folders or Hub ids")
    ap.add_argument("--tasks", default="classify", help="classify and/or lm (decoders)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default="cola,sst2,rt")
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--batches", type=int, default=10, help="batches per cell")
    ap.add_argument(
        "--large-batches",
        type=int,
        default=3,
        help="batches per cell from B=8 (minilm) or B=32 (decoders) up",
    )
    ap.add_argument("--minilm-max-batch", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-length", type=int, default=64, help="tokens kept per sentence")
    ap.add_argument("--min-tokens", type=int, default=0, help="only passages of at least this many tokens")
    ap.add_argument("--time-budget", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--peft",
        action="append",
        default=None,
        help="LoRA adapters the client trains and shares (lora:r=8,...; repeatable; none: the full model)",
    )
    ap.add_argument("--finetune-steps", type=int, default=0, help="SGD steps before the attacked round")
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--section", default="exact")
    args = ap.parse_args()
    pefts = [None if p == "none" else p for p in (args.peft or ["none"])]
    with_peft = any(pefts)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    cells = [(v, t, p) for v in args.victims.split(",") for t in args.tasks.split(",") for p in pefts]
    for victim, task, peft in cells:
        for data in args.data.split(","):
            for b in (int(x) for x in args.batch_sizes.split(",")):
                if victim == "minilm" and b > args.minilm_max_batch:
                    continue
                n = args.large_batches if b >= (8 if victim == "minilm" else 32) else args.batches
                spec = RunSpec(
                    victim=victim, task=task, data=data, batch_size=b, attack="exact", dtype=args.dtype,
                    device=args.device, known_lengths=False, max_length=args.max_length,
                    min_tokens=args.min_tokens, time_budget=args.time_budget, peft=peft,
                    finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                )  # fmt: skip
                head = [victim, task, *([peft or "full"] if with_peft else []), data, b]
                records, refusals = run_counted(spec, n)  # a refused batch is counted
                if not records:
                    rows.append([*head, n, "-", "-", "-", f"refused: {refusals[0][:110]}"])
                    print(rows[-1], flush=True)
                    write_section(args.section, _body(args, rows, done=False))
                    continue
                s = summarise(records)
                seconds = (
                    s["seconds"] if not refusals else f"{s['seconds']:.1f} ({len(refusals)} of {n} refused)"
                )
                rows.append([*head, s["batches"], s["rouge1"], s["rouge2"], s["exact_match"], seconds])
                print(
                    " | ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in rows[-1]), flush=True
                )
                write_section(args.section, _body(args, rows, done=False))
    write_section(args.section, _body(args, rows, done=True))
    print(table(_header(args), rows))


HEADER = ["victim", "task", "data", "B", "batches", "ROUGE-1", "ROUGE-2", "exact %", "s/batch"]


def _header(args: argparse.Namespace) -> list[str]:
    return HEADER if not args.peft else [*HEADER[:2], "shared", *HEADER[2:]]


def _body(args: argparse.Namespace, rows: list[list[object]], *, done: bool) -> str:
    status = "" if done else " (run in progress: the table so far)"
    shared = (
        "LoRA rows: only the adapters (and a classifier's head) are shared, the word embeddings frozen"
        if args.peft
        else "word-embedding gradient shared"
    )
    tuned = f", {args.finetune_steps} fine-tuning steps first" if args.finetune_steps else ""
    return (
        f"## Exact recovery (`python benchmarks/exact.py`){status}\n\n"
        f"Command arguments: `{' '.join(sys.argv[1:])}`. "
        f"{args.dtype} updates{tuned}, {shared}, lengths and labels unknown, batch size "
        f"known; assembly budget {args.time_budget:.0f} s a batch (the encoder search's; a decoder "
        f"returns its prefixes so far when it passes); device {args.device}. Machine: {machine()}.\n\n"
        f"{table(_header(args), rows)}\n\n{PUBLISHED}\n"
    )


if __name__ == "__main__":
    main()
