"""`gradleak fl`: a Flower simulation with the server-side leakage audit. Registered on the app in
`gradleak.cli`; torch, Flower and Ray load only when the command runs. Exits 1 when the audit of some
client's update failed (a refusal by the attack is a result, not a failure)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gradleak.cli.common import (
    KnowsOption,
    LabelColumnOption,
    PriorOption,
    TextColumnOption,
    finish_runs,
    write_json,
)
from gradleak.knowledge import DEFAULT_KNOWS, parse_knows
from gradleak.spec import DEFAULT_PRIOR


def fl(
    clients: Annotated[
        int, typer.Option(help="Simulated Flower clients (SuperNodes), each with a shard.")
    ] = 2,
    rounds: Annotated[int, typer.Option(help="Federated rounds; every client trains in every round.")] = 2,
    victim: Annotated[
        str, typer.Option(help="Preset (bert-tiny, gpt2-tiny, gpt2-wide, minilm) or a model directory.")
    ] = "gpt2-tiny",
    data: Annotated[
        str, typer.Option(help="sst2, cola, rt, wikitext, sample, or a file; split into the clients' shards.")
    ] = "sst2",
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    peft: Annotated[
        str | None,
        typer.Option(
            help="Clients train LoRA adapters on the frozen victim and send only them (and a classifier's "
            "head); the server audits the adapter updates: lora:r=INT[,alpha=A]"
            "[,targets=NAME+NAME|attention|mlp|all-linear][,dropout=P][,bias=none|all|lora_only]."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sentences each client trains on per round.")] = 1,
    local_steps: Annotated[int, typer.Option(help="Local SGD steps K per round (FedAvg).")] = 1,
    local_lr: Annotated[float, typer.Option(help="Local SGD learning rate (known to the server).")] = 0.01,
    attack: Annotated[
        str,
        typer.Option(
            "--attack",
            help="The server's attack: exact, exact-robust, dlg, tag, cos, lamp, lamp-l1l2 or lamp-span.",
        ),
    ] = "exact",
    prior: PriorOption = DEFAULT_PRIOR,
    iterations: Annotated[int, typer.Option(help="Optimisation steps of gradient-matching attacks.")] = 100,
    attack_lr: Annotated[float, typer.Option(help="Learning rate of gradient-matching attacks.")] = 0.01,
    optimizer: Annotated[str, typer.Option(help="adam or lbfgs.")] = "adam",
    force: Annotated[
        bool, typer.Option(help="Run the exact attack even where its assumptions fail.")
    ] = False,
    time_budget: Annotated[float, typer.Option(help="Seconds the exact attack's search may take.")] = 60.0,
    defense: Annotated[
        list[str] | None,
        typer.Option(
            "--defense",
            help="gradleak defence NAME[:key=value,...] each client applies to its weight delta; repeatable "
            "(as in `attack`; dp-sgd needs --local-steps 1; withhold does not apply).",
        ),
    ] = None,
    flower_dp: Annotated[
        str,
        typer.Option(
            help="Flower's DP: none; local (LocalDpMod: clip and noise on the client; --dp-clip, "
            "--dp-epsilon, [--dp-delta, --dp-sensitivity]); central-client-clip (fixedclipping_mod and "
            "DifferentialPrivacyClientSideFixedClipping: noise on the aggregate; --dp-clip, "
            "--dp-noise-multiplier)."
        ),
    ] = "none",
    dp_clip: Annotated[
        float | None, typer.Option(help="Flower DP: clipping norm of the weight delta.")
    ] = None,
    dp_epsilon: Annotated[float | None, typer.Option(help="LocalDpMod's epsilon per round.")] = None,
    dp_delta: Annotated[
        float | None, typer.Option(help="LocalDpMod's delta per round (default --delta).")
    ] = None,
    dp_sensitivity: Annotated[
        float | None, typer.Option(help="LocalDpMod's sensitivity (default --dp-clip).")
    ] = None,
    dp_noise_multiplier: Annotated[
        float | None, typer.Option(help="Central DP: noise multiplier of the aggregate's noise.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the model, the shards, the batches and the noise.")] = 0,
    task: Annotated[str, typer.Option(help="classify, or lm (next-token loss) for decoders.")] = "classify",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, or cuda where present.")] = "cpu",
    max_length: Annotated[int, typer.Option(help="Truncate sequences to this many tokens.")] = 32,
    max_words: Annotated[int | None, typer.Option(help="Only sentences of at most this many words.")] = None,
    delta: Annotated[float, typer.Option(help="The delta of the reported (epsilon, delta).")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="rdp, pld or prv: composes each client's rounds.")] = "rdp",
    store: Annotated[
        str | None, typer.Option(help="Results store (SQLite) for one record per round and client.")
    ] = None,
    knows: KnowsOption = DEFAULT_KNOWS,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the leaks per round and client as JSON ('-': stdout).")
    ] = None,
) -> None:
    """Federated learning in Flower's simulation: what the server reads from each client's update."""
    from gradleak.flower.simulation import run_fl
    from gradleak.flower.spec import FlSpec, partitions

    known = parse_knows(knows).spec_fields()
    spec = FlSpec(
        victim=victim,
        data=data,
        text_column=text_column,
        label_column=label_column,
        peft=peft,
        clients=clients,
        rounds=rounds,
        batch_size=batch_size,
        local_steps=local_steps,
        local_lr=local_lr,
        attack=attack,
        prior=prior,
        iterations=iterations,
        attack_lr=attack_lr,
        optimizer=optimizer,
        seed=seed,
        task=task,
        dtype=dtype,
        device=device,
        max_length=max_length,
        max_words=max_words,
        force=force,
        time_budget=time_budget,
        defenses=tuple(defense or ()),
        flower_dp=flower_dp,
        dp_clip=dp_clip,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        dp_sensitivity=dp_sensitivity,
        dp_noise_multiplier=dp_noise_multiplier,
        delta=delta,
        accountant=accountant,
        **known,
    )
    spec.validate()
    partitions(spec)
    console = Console(stderr=True) if json_out == "-" else Console()

    def found(leak) -> None:
        eps = "inf" if leak.epsilon is None else f"{leak.epsilon:.3g}"
        console.print(
            f"round {leak.round} client {leak.client}: ROUGE-1 {leak.scores.rouge1:.1f}, "
            f"exact match {leak.scores.exact_match:.0f}, epsilon {eps}",
            markup=False,
            highlight=False,
        )

    result = run_fl(spec, store=store, on_leak=found if json_out != "-" else None)
    if json_out != "-":
        show(result, Console())
    if json_out is not None:
        write_json(result.to_json(), json_out)
    failures = fl_failures(result)
    places = [f"the store {store}"] if store else []
    if json_out is not None:
        places.append("the JSON on stdout" if json_out == "-" else json_out)
    where = " and ".join(places) or "the tables above"
    finish_runs(len(failures), fl_refused(result), len(result.leaks) or spec.clients * spec.rounds, where)


def _refused(leak: Any) -> bool:
    return bool(getattr(leak, "refused", False))


def fl_failures(result: Any) -> list[str]:
    """What failed in a federated run: a client that failed, and every client update whose audit ended
    in an error that was not the attack refusing the scenario."""
    failures = list(getattr(result, "errors", ()) or ())
    for leak in result.leaks:
        if leak.error is not None and not _refused(leak):
            failures.append(f"round {leak.round} client {leak.client}: {leak.error}")
    return failures


def fl_refused(result: Any) -> int:
    return sum(1 for leak in result.leaks if _refused(leak))


def show(result, out: Console) -> None:
    spec = result.spec
    central = spec.flower_dp == "central-client-clip"
    for r, leaks in result.rounds():
        table = Table(
            title=f"round {r}: {spec.attack} attack on {spec.victim}, {spec.data}, B={spec.batch_size}"
        )
        for col in ("client", "ROUGE-1", "ROUGE-2", "token acc.", "exact match", "epsilon"):
            table.add_column(col, justify="right")
        if central:
            table.add_column("aggregate epsilon", justify="right")
        for leak in leaks:
            s = leak.scores
            eps = "inf" if leak.epsilon is None else f"{leak.epsilon:.3g}"
            row = [str(leak.client), f"{s.rouge1:.1f}", f"{s.rouge2:.1f}", f"{s.token_accuracy:.1f}"]
            row += [f"{s.exact_match:.0f}", eps]
            if central:
                row.append("-" if leak.aggregate_epsilon is None else f"{leak.aggregate_epsilon:.3g}")
            table.add_row(*row)
        out.print(table)
        for leak in leaks:
            got = (
                " | ".join(leak.reconstructions)
                if leak.reconstructions
                else f"nothing ({leak.error or 'no text'})"
            )
            out.print(
                f"  client {leak.client} sent: {' | '.join(leak.references)}", markup=False, highlight=False
            )
            out.print(f"  server read: {got}", markup=False, highlight=False)
    out.print(f"The server sees {spec.server_view()}.", markup=False, highlight=False, soft_wrap=True)
    lora = result.shared.get("peft")
    if lora:
        out.print(
            f"Each update holds {result.shared['tensors']} arrays ({lora['adapter_tensors']} LoRA factors of "
            f"rank {lora['r']} on {'+'.join(lora['targets'])}), {result.shared['parameters']} parameters.",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    eps_note = (
        f"epsilon: each client's releases to the server composed over its rounds ({spec.accountant}, "
        f"delta {spec.delta:g}); inf where the server reads an update without noise"
    )
    out.print(eps_note + ".", markup=False, highlight=False, soft_wrap=True)
    if central:
        out.print(
            "aggregate epsilon: Flower's own RDP accountant for the noised aggregate (what a party that sees "
            "only the global model could learn), not for the updates the server reads.",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    where = f"; store {result.store}" if result.store else ""
    out.print(f"Flower {result.flwr_version}, {result.seconds:.1f} s{where}", markup=False, highlight=False)
