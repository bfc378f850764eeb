"""`gradleak privacy epsilon|calibrate|audit`: the accountants on their own, and the canary audit that
checks them against an attack."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from gradleak.cli.common import (
    EXIT_RUNS_FAILED,
    JsonOut,
    KnowsOption,
    LabelColumnOption,
    TextColumnOption,
    console_for,
    err,
    trial_progress,
    write_json,
)
from gradleak.knowledge import DEFAULT_KNOWS, parse_knows

privacy_app = typer.Typer(
    no_args_is_help=True,
    help="Differential privacy: epsilon of a noise mechanism, the noise for an epsilon, or a canary audit.",
)

Accountant = Annotated[
    str, typer.Option(help="rdp, pld or prv (dp_accounting / Opacus); analytic or classic for one release.")
]
Mechanism = Annotated[str, typer.Option(help="gaussian or laplace.")]
SampleRate = Annotated[float, typer.Option(help="Poisson sampling rate q in (0, 1].")]
Steps = Annotated[int, typer.Option(help="Number of composed steps T.")]
Delta = Annotated[float, typer.Option(help="delta in (0, 1).")]


@privacy_app.command("epsilon")
def privacy_epsilon(
    noise_multiplier: Annotated[float, typer.Option(help="Noise std (or Laplace scale) / sensitivity.")],
    sample_rate: SampleRate = 1.0,
    steps: Steps = 1,
    delta: Delta = 1e-5,
    accountant: Accountant = "rdp",
    mechanism: Mechanism = "gaussian",
    json_out: JsonOut = None,
) -> None:
    """Epsilon of T Poisson-subsampled Gaussian (or Laplace) mechanisms at delta."""
    from gradleak.privacy import epsilon

    eps = epsilon(noise_multiplier, sample_rate, steps, delta, accountant, mechanism)
    payload = {
        "epsilon": eps if eps != float("inf") else None,
        "delta": delta,
        "accountant": accountant,
        "noise_multiplier": noise_multiplier,
        "sample_rate": sample_rate,
        "steps": steps,
        "mechanism": mechanism,
    }
    if json_out != "-":
        Console().print(
            f"epsilon = {eps:.6g} at delta = {delta:g} ({accountant} accountant; {mechanism}, "
            f"noise multiplier {noise_multiplier:g}, sample rate {sample_rate:g}, {steps} steps)"
        )
    if json_out is not None:
        write_json(payload, json_out)


@privacy_app.command("calibrate")
def privacy_calibrate(
    epsilon: Annotated[float, typer.Option(help="Target epsilon.")],
    sample_rate: SampleRate = 1.0,
    steps: Steps = 1,
    delta: Delta = 1e-5,
    accountant: Accountant = "rdp",
    mechanism: Mechanism = "gaussian",
    json_out: JsonOut = None,
) -> None:
    """The smallest noise multiplier whose epsilon is at most the target."""
    from gradleak import privacy

    z = privacy.calibrate(epsilon, delta, sample_rate, steps, accountant, mechanism)
    achieved = privacy.epsilon(z, sample_rate, steps, delta, accountant, mechanism)
    payload = {
        "noise_multiplier": z,
        "epsilon": achieved,
        "target_epsilon": epsilon,
        "delta": delta,
        "accountant": accountant,
        "sample_rate": sample_rate,
        "steps": steps,
        "mechanism": mechanism,
    }
    if json_out != "-":
        Console().print(
            f"noise multiplier = {z:.6g} gives epsilon = {achieved:.6g} <= {epsilon:g} at delta = {delta:g} "
            f"({accountant} accountant; sample rate {sample_rate:g}, {steps} steps)"
        )
    if json_out is not None:
        write_json(payload, json_out)


@privacy_app.command("audit")
def privacy_audit(
    victim: Annotated[
        str,
        typer.Option(
            help="Preset (gpt2-tiny, bert-tiny, minilm, ...), a sized random model, or a directory."
        ),
    ] = "gpt2-tiny",
    data: Annotated[
        str,
        typer.Option(help="The other sentences of each batch: sample, cola, sst2, rt, wikitext, or a file."),
    ] = "sst2",
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    batch_size: Annotated[
        int, typer.Option(help="Sentences in each private batch, the canary's place included.")
    ] = 1,
    attack: Annotated[
        str, typer.Option("--attack", help="The attack that decides: exact, dlg, tag or cos.")
    ] = "exact",
    defense: Annotated[
        list[str] | None,
        typer.Option(
            "--defense",
            help="NAME[:key=value,...] applied to the update in order; repeatable (as for gradleak attack).",
        ),
    ] = None,
    trials: Annotated[int, typer.Option(help="Independent trials, the canary in or out at random.")] = 100,
    canary: Annotated[
        str | None, typer.Option(help="The canary sentence (default: a fixed SST-2 sentence).")
    ] = None,
    canary_label: Annotated[int, typer.Option(help="The canary's label for a classifier.")] = 0,
    threshold: Annotated[
        float,
        typer.Option(help="Guess 'in' when a reconstructed sentence has ROUGE-1 >= this against the canary."),
    ] = 50.0,
    confidence: Annotated[float, typer.Option(help="Confidence of the lower bound, in (0, 1).")] = 0.95,
    delta: Delta = 1e-5,
    accountant: Accountant = "rdp",
    seed: Annotated[int, typer.Option(help="Seeds the model and every trial.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, or cuda where present.")] = "cpu",
    dtype: Annotated[
        str, typer.Option(help="float64 (the exact attack's precision) or float32.")
    ] = "float64",
    task: Annotated[str, typer.Option(help="classify, or lm (next-token loss) for decoders.")] = "classify",
    max_length: Annotated[int, typer.Option(help="Truncate sequences to this many tokens.")] = 32,
    max_words: Annotated[
        int | None, typer.Option(help="Only other sentences of at most this many words.")
    ] = None,
    iterations: Annotated[int, typer.Option(help="Optimisation steps of gradient-matching attacks.")] = 300,
    time_budget: Annotated[
        float, typer.Option(help="Seconds the exact attack's encoder search may take.")
    ] = 60.0,
    knows: KnowsOption = DEFAULT_KNOWS,
    json_out: JsonOut = None,
) -> None:
    """Canary audit: a lower bound on epsilon from what the attack tells apart, beside the accountant's."""
    from gradleak.canary import run_canary_audit

    console = console_for(json_out)
    with trial_progress("canary trials") as update:
        result = run_canary_audit(
            victim=victim,
            data=data,
            text_column=text_column,
            label_column=label_column,
            batch_size=batch_size,
            attack=attack,
            defenses=tuple(defense or ()),
            trials=trials,
            canary=canary,
            canary_label=canary_label,
            threshold=threshold,
            confidence=confidence,
            delta=delta,
            accountant=accountant,
            seed=seed,
            device=device,
            dtype=dtype,
            task=task,
            max_length=max_length,
            max_words=max_words,
            iterations=iterations,
            time_budget=time_budget,
            knows=parse_knows(knows),
            progress=update,
        )
    if json_out != "-":
        _show_canary(result, console)
    if json_out is not None:
        write_json(result.to_json(), json_out)
    if not result.consistent():
        err.print(
            f"the certified lower bound {result.epsilon_lower:.4g} exceeds the {result.accountant} "
            f"accountant's epsilon {result.epsilon_upper:.4g}: "
            "a bug in the accounting, the defence or the audit",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_RUNS_FAILED)


def _show_canary(r, console: Console) -> None:
    chain = " -> ".join(r.defenses) or "none"
    console.print(
        f"canary audit: {r.attack} attack on {r.victim} ({r.dtype}), batches of {r.batch_size} "
        f"from {r.data}, defence {chain}; "
        f"{r.trials} trials ({r.in_trials} with the canary, {r.out_trials} without)",
        markup=False,
        highlight=False,
    )
    console.print(
        f"rule: 'in' when a reconstructed sentence has ROUGE-1 >= {r.threshold:g} against the canary; "
        f"{r.false_positives} false positives, {r.false_negatives} false negatives"
        + (f", {r.refusals} trials refused by the attack (guessed 'out')" if r.refusals else ""),
        markup=False,
        highlight=False,
    )
    pct = f"{100 * r.confidence:g}%"
    ceiling = "; the attack won every trial" if r.false_positives == r.false_negatives == 0 else ""
    console.print(
        f"epsilon >= {r.epsilon_lower:.3g} at delta {r.delta:g} with {pct} confidence "
        f"(the most {r.trials} trials can certify: {r.epsilon_ceiling:.3g}{ceiling})",
        markup=False,
        highlight=False,
    )
    if r.epsilon_upper is None:
        upper = f"no finite epsilon ({r.epsilon_upper_reason})"
    else:
        upper = f"epsilon <= {r.epsilon_upper:.4g}"
        if r.epsilon_add_remove is not None:
            upper += f" (add/remove-one: {r.epsilon_add_remove:.4g})"
    console.print(
        f"accountant ({r.accountant}, one release, replace-one neighbours): {upper}",
        markup=False,
        highlight=False,
    )
