"""The exact attack on FedAvg updates: local epochs, mini-batch size and learning rate (the grid of
DAGER's FedAvg table: GPT-2, Rotten Tomatoes, B = 16), on any victim, the full model or LoRA adapters.

    python benchmarks/fedavg.py                                   # smollm2, full and LoRA r=256 on q/k/v
    python benchmarks/fedavg.py --grid 2:4:1e-4,10:8:1e-3 --batches 1

An epoch is ceil(B / b) SGD steps over the batch's mini-batches in order (`--local-batch`); the server
attacks the pseudo-gradient -delta / (lr * steps). Writes the section `fedavg` of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import torch
from _results import machine, run_counted, summarise, table, write_section

from gradleak.experiment import RunSpec

HEADER = [
    "victim",
    "shared",
    "epochs",
    "b",
    "lr",
    "steps",
    "batches",
    "ROUGE-1",
    "ROUGE-2",
    "exact %",
    "s/batch",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--victims", default="smollm2")
    ap.add_argument(
        "--peft", action="append", default=None, help="LoRA spec (repeatable); none: the full model"
    )
    ap.add_argument("--data", default="rt")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--grid", default="2:4:1e-4,2:8:1e-4,5:4:1e-4,2:4:1e-3,5:8:1e-3", help="EPOCHS:B_MINI:LR,..."
    )
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="attack past the rank checks (as a noisy update)")
    ap.add_argument("--section", default="fedavg")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    pefts = [
        None if p == "none" else p for p in (args.peft or ["none", "lora:r=256,targets=q_proj+k_proj+v_proj"])
    ]
    grid = [(int(e), int(b), float(lr)) for e, b, lr in (g.split(":") for g in args.grid.split(","))]
    rows: list[list[object]] = []
    for victim in args.victims.split(","):
        for peft in pefts:
            for epochs, b_mini, lr in grid:
                steps = epochs * math.ceil(args.batch_size / b_mini)
                spec = RunSpec(
                    victim=victim, data=args.data, batch_size=args.batch_size, attack="exact",
                    protocol="fedavg", local_steps=steps, local_batch=b_mini, local_lr=lr, peft=peft,
                    time_budget=args.time_budget, max_length=64, force=args.force,
                )  # fmt: skip
                head = [victim, peft or "full", epochs, b_mini, f"{lr:g}", steps]
                records, refusals = run_counted(spec, args.batches)  # a refused batch is counted
                if not records:
                    rows.append([*head, args.batches, "-", "-", "-", f"refused: {refusals[0][:110]}"])
                else:
                    s = summarise(records)
                    secs = s["seconds"] if not refusals else f"{s['seconds']:.1f} ({len(refusals)} refused)"
                    rows.append([*head, s["batches"], s["rouge1"], s["rouge2"], s["exact_match"], secs])
                print(" | ".join(str(x) for x in rows[-1]), flush=True)
                write_section(args.section, _body(args, rows, done=False))
    write_section(args.section, _body(args, rows, done=True))
    print(table(HEADER, rows))


def _body(args: argparse.Namespace, rows: list[list[object]], *, done: bool) -> str:
    status = "" if done else " (run in progress: the table so far)"
    return (
        f"## The exact attack on FedAvg updates (`python benchmarks/fedavg.py`){status}\n\n"
        f"Command arguments: `{' '.join(sys.argv[1:])}`. Data {args.data}, B = {args.batch_size}, "
        "classification, float32; each client runs `epochs` passes of SGD over its batch in mini-batches of "
        "`b` (in order) at learning rate `lr` and sends the weight delta (LoRA: the adapters' and the head's "
        "only); the attack takes -delta / (lr * steps) and knows the batch size only"
        f"{'; forced past its rank checks (float32 deltas blur the rank gap), it treats the update as noisy' if args.force else ''}. Machine: "
        f"{machine()}.\n\n{table(HEADER, rows)}\n\n"
        "DAGER (Petrov et al., NeurIPS 2024) reports the same grid (epochs, mini-batch size, learning rate; "
        "GPT-2, Rotten Tomatoes, B = 16) in its FedAvg table; its figures are not restated here, only the "
        "setting (its `scripts/fed_avg.sh`).\n"
    )


if __name__ == "__main__":
    main()
