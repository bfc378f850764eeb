"""`gradleak attack`: one attack on one client's update, scored."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gradleak.cli.common import (
    KnowsOption,
    LabelColumnOption,
    PriorOption,
    TextColumnOption,
    err,
    progress,
    write_json,
)
from gradleak.knowledge import DEFAULT_KNOWS, parse_knows
from gradleak.spec import DEFAULT_PRIOR


def attack(
    victim: Annotated[
        str,
        typer.Option(
            help="Preset (bert-tiny, gpt2-tiny, gpt2-wide, minilm, minilm-random), a random model of a "
            "family sized by keys layers, hidden, heads (gpt2-random:layers=4,hidden=256,heads=4, "
            "bert-random:...; every key optional), or a model directory."
        ),
    ] = "bert-tiny",
    data: Annotated[
        str, typer.Option(help="sample, cola, sst2, rt, wikitext, or a TSV/CSV/JSONL/text file.")
    ] = "sample",
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    batch_size: Annotated[int, typer.Option(help="Sentences in the private batch.")] = 1,
    attack: Annotated[
        str,
        typer.Option("--attack", help="dlg, tag, cos, lamp, lamp-l1l2, lamp-span, exact or exact-robust."),
    ] = "tag",
    iterations: Annotated[int, typer.Option(help="Optimisation steps of gradient-matching attacks.")] = 300,
    seed: Annotated[int, typer.Option(help="Seeds the model, the batch and the attack.")] = 0,
    task: Annotated[str, typer.Option(help="classify, or lm (next-token loss) for decoders.")] = "classify",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, or cuda where present.")] = "cpu",
    max_length: Annotated[int, typer.Option(help="Truncate sequences to this many tokens.")] = 32,
    max_words: Annotated[int | None, typer.Option(help="Only sentences of at most this many words.")] = None,
    withhold: Annotated[
        list[str] | None,
        typer.Option(
            help="Group (embeddings, positions, head) or name pattern kept from the server; repeatable."
        ),
    ] = None,
    protocol: Annotated[str, typer.Option(help="fedsgd (one gradient) or fedavg (weight delta).")] = "fedsgd",
    local_steps: Annotated[int, typer.Option(help="FedAvg local SGD steps.")] = 1,
    local_lr: Annotated[float, typer.Option(help="FedAvg local learning rate.")] = 0.01,
    local_batch: Annotated[
        int | None,
        typer.Option(help="FedAvg local mini-batch size: each local step takes the next this many."),
    ] = None,
    attack_lr: Annotated[float, typer.Option(help="Learning rate of gradient-matching attacks.")] = 0.01,
    optimizer: Annotated[str, typer.Option(help="adam or lbfgs.")] = "adam",
    prior: PriorOption = DEFAULT_PRIOR,
    knows: KnowsOption = DEFAULT_KNOWS,
    share: Annotated[
        list[str] | None,
        typer.Option(
            help="Share only this group (attention, embeddings, head, last:K) or name pattern; "
            "repeatable; the rest is withheld. Default: share everything."
        ),
    ] = None,
    peft: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune LoRA adapters on the frozen victim and share only them (and a classifier's "
            "head): lora:r=INT[,alpha=A][,targets=NAME+NAME|attention|mlp|all-linear][,dropout=P]"
            "[,bias=none|all|lora_only]."
        ),
    ] = None,
    finetune_steps: Annotated[
        int, typer.Option(help="SGD steps (batches of 8, other sentences) before the attacked round.")
    ] = 0,
    finetune_lr: Annotated[float, typer.Option(help="Learning rate of those fine-tuning steps.")] = 1e-3,
    min_tokens: Annotated[
        int, typer.Option(help="Only sentences of at least this many tokens (specials included).")
    ] = 0,
    force: Annotated[
        bool, typer.Option(help="Run the exact attack even where its assumptions fail.")
    ] = False,
    time_budget: Annotated[
        float, typer.Option(help="Seconds the exact attack's encoder search may take.")
    ] = 60.0,
    defense: Annotated[
        list[str] | None,
        typer.Option(
            "--defense",
            help="NAME[:key=value,...] applied to the update in order; repeatable. "
            "clip:norm=C, gaussian:sigma=S|multiplier=Z, laplace:scale=B|multiplier=Z, "
            "dp-sgd:clip=C,multiplier=Z, prune:fraction=P[,method=topk|random], quantize:bits=16|8, "
            "withhold:params=GROUP.",
        ),
    ] = None,
    delta: Annotated[float, typer.Option(help="The delta of the reported (epsilon, delta).")] = 1e-5,
    accountant: Annotated[
        str, typer.Option(help="rdp, pld, prv, analytic or classic: names every epsilon.")
    ] = "rdp",
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the record as JSON to FILE ('-' for stdout).")
    ] = None,
) -> None:
    """Rebuild a private batch from the gradient a client shares, and score the result."""
    from gradleak.experiment import RunSpec, run_one

    known = parse_knows(knows)
    spec = RunSpec(
        victim=victim,
        data=data,
        text_column=text_column,
        label_column=label_column,
        batch_size=batch_size,
        attack=attack,
        iterations=iterations,
        seed=seed,
        task=task,
        dtype=dtype,
        device=device,
        max_length=max_length,
        max_words=max_words,
        withhold=tuple(withhold or ()),
        protocol=protocol,
        local_steps=local_steps,
        local_lr=local_lr,
        local_batch=local_batch,
        attack_lr=attack_lr,
        optimizer=optimizer,
        prior=prior,
        force=force,
        time_budget=time_budget,
        defenses=tuple(defense or ()),
        delta=delta,
        accountant=accountant,
        share=tuple(share or ()),
        finetune_steps=finetune_steps,
        finetune_lr=finetune_lr,
        min_tokens=min_tokens,
        peft=peft,
        **known.spec_fields(),
    )
    spec.validate()
    quiet = json_out == "-"
    with progress(err) as bar:
        job = bar.add_task(f"{attack} on {victim}", total=iterations, objective=float("nan"))

        def tick(step: int, total: int, value: float) -> None:
            bar.update(job, completed=step, total=total, objective=value)

        record = run_one(spec, progress=tick)
    if not quiet:
        _show_record(record)
    if json_out is not None:
        write_json(record.to_json(), json_out)


def _show_record(record) -> None:
    out = Console()
    table = Table(title=f"{record.spec.attack} on {record.spec.victim}, batch of {record.spec.batch_size}")
    table.add_column("reference")
    table.add_column("reconstruction")
    from gradleak.metrics import match

    assignment = match(record.references, record.reconstructions) if record.reconstructions else []
    for i, ref in enumerate(record.references):
        j = assignment[i] if i < len(assignment) else -1
        rec = record.reconstructions[j] if 0 <= j < len(record.reconstructions) else ""
        table.add_row(ref, rec, style=None)
    out.print(table)
    s = record.scores
    out.print(
        f"ROUGE-1 {s.rouge1:.1f}  ROUGE-2 {s.rouge2:.1f}  ROUGE-L {s.rougeL:.1f}  "
        f"token accuracy {s.token_accuracy:.1f}  exact match {s.exact_match:.1f}  "
        f"({record.seconds:.1f} s)"
    )
    if record.spec.defenses:
        from gradleak.defenses import describe

        privacy = record.privacy.describe() if record.privacy is not None else "not accounted"
        out.print(f"defences {describe(record.spec.defense_chain())}: {privacy}")
    if record.labels is not None:
        out.print(f"labels {list(record.labels)}, inferred {record.inferred_labels}")
    if record.spec.uses_prior():
        out.print(f"language prior: {record.spec.prior}")
    for note in record.notes:
        out.print(f"note: {note}")
