"""The command line: parses, calls the library, prints. Errors are one line and exit code 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gradleak.cli_conditions import conditions as conditions_command
from gradleak.cli_runs import COMMANDS as RUN_COMMANDS
from gradleak.errors import GradleakError
from gradleak.flower.cli import fl as fl_command
from gradleak.theory.cli import theory_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="gradleak: how much private text leaks from transformer gradients, and what stops it.",
)
err = Console(stderr=True)


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log the library's progress.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("transformers", "httpx", "huggingface_hub", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def write_json(payload: Any, target: str) -> None:
    text = json.dumps(payload, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("objective {task.fields[objective]:.3g}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


@app.command()
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
    batch_size: Annotated[int, typer.Option(help="Sentences in the private batch.")] = 1,
    attack: Annotated[str, typer.Option("--attack", help="dlg, tag, cos or exact.")] = "tag",
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
    attack_lr: Annotated[float, typer.Option(help="Learning rate of gradient-matching attacks.")] = 0.01,
    optimizer: Annotated[str, typer.Option(help="adam or lbfgs.")] = "adam",
    known_labels: Annotated[bool, typer.Option(help="The server knows the labels.")] = False,
    known_batch_size: Annotated[
        bool, typer.Option("--known-batch-size/--unknown-batch-size", help="The server knows the batch size.")
    ] = True,
    share: Annotated[
        list[str] | None,
        typer.Option(
            help="Share only this group (attention, embeddings, head, last:K) or name pattern; "
            "repeatable; the rest is withheld. Default: share everything."
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

    spec = RunSpec(
        victim=victim,
        data=data,
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
        attack_lr=attack_lr,
        optimizer=optimizer,
        known_labels=known_labels,
        force=force,
        time_budget=time_budget,
        defenses=tuple(defense or ()),
        delta=delta,
        accountant=accountant,
        share=tuple(share or ()),
        known_batch_size=known_batch_size,
        finetune_steps=finetune_steps,
        finetune_lr=finetune_lr,
        min_tokens=min_tokens,
    )
    spec.validate()
    quiet = json_out == "-"
    with _progress(err) as bar:
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
    for note in record.notes:
        out.print(f"note: {note}")


@app.command()
def train(
    victim: Annotated[
        str, typer.Option(help="Preset (bert-tiny, gpt2-tiny, gpt2-wide, minilm) or a model directory.")
    ] = "bert-tiny",
    data: Annotated[str, typer.Option(help="sst2, cola, rt, wikitext, sample, or a file.")] = "sst2",
    steps: Annotated[int, typer.Option(help="SGD steps T.")] = 100,
    lr: Annotated[float, typer.Option(help="SGD step size (plain SGD, no momentum).")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="Sentences per minibatch B.")] = 16,
    defense: Annotated[
        list[str] | None,
        typer.Option(
            "--defense",
            help="NAME[:key=value,...] applied to every step's gradient, as in `attack`; repeatable. "
            "withhold cannot apply to training.",
        ),
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Held-out accuracy and epsilon every K steps.")] = 10,
    train_only: Annotated[
        list[str] | None,
        typer.Option(help="Train only this group (embeddings, positions, head) or name pattern; repeatable."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the model, the minibatches and the noise.")] = 0,
    task: Annotated[str, typer.Option(help="classify, or lm (next-token loss) for decoders.")] = "classify",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, or cuda where present.")] = "cpu",
    max_length: Annotated[int, typer.Option(help="Truncate sequences to this many tokens.")] = 32,
    holdout: Annotated[float, typer.Option(help="Fraction of the data held out (fixed seed 0).")] = 0.2,
    max_eval: Annotated[int, typer.Option(help="Evaluate on at most this many held-out sentences.")] = 512,
    max_train: Annotated[
        int | None, typer.Option(help="Train on only the first N sentences of the training split.")
    ] = None,
    delta: Annotated[float, typer.Option(help="The delta of the reported (epsilon, delta).")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="rdp, pld or prv.")] = "rdp",
    bound: Annotated[
        bool, typer.Option(help="Estimate L and the gradient variance, and compute the convergence bound.")
    ] = True,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the record as JSON to FILE ('-' for stdout).")
    ] = None,
    plot_out: Annotated[
        str | None, typer.Option("--plot", help="Draw loss, accuracy and the bound to FILE.png.")
    ] = None,
) -> None:
    """Fine-tune the victim with SGD on defended gradients: loss, accuracy, epsilon, and the bound."""
    from gradleak.train import TrainSpec
    from gradleak.train import plot as draw
    from gradleak.train import train as run_training

    spec = TrainSpec(
        victim=victim,
        data=data,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        defenses=tuple(defense or ()),
        eval_every=eval_every,
        seed=seed,
        task=task,
        dtype=dtype,
        device=device,
        max_length=max_length,
        holdout=holdout,
        max_eval=max_eval,
        max_train=max_train,
        train_only=tuple(train_only or ()),
        delta=delta,
        accountant=accountant,
        bound=bound,
    )
    spec.validate()
    if plot_out is not None and not plot_out.lower().endswith(".png"):
        raise GradleakError(f"--plot writes a PNG: give a FILE.png, got {plot_out!r}")
    with _progress(err) as bar:
        job = bar.add_task(f"SGD on {victim}", total=steps, objective=float("nan"))

        def tick(step: int, total: int, value: float) -> None:
            bar.update(job, completed=step, total=total, objective=value)

        record = run_training(spec, progress=tick)
    if plot_out is not None:
        draw(record, plot_out)
    if json_out != "-":
        _show_training(record)
    if json_out is not None:
        write_json(record.to_json(), json_out)


def _show_training(record) -> None:
    out = Console()
    spec = record.spec
    table = Table(title=f"SGD on {spec.victim}, {spec.data}: lr {spec.lr:g}, batch {spec.batch_size}")
    for column in ("step", "held-out accuracy", "held-out loss", "epsilon"):
        table.add_column(column, justify="right")
    for e in record.eval:
        eps = "inf" if e.epsilon is None else f"{e.epsilon:.3g}"
        table.add_row(str(e.step), f"{e.accuracy:.3f}", f"{e.loss:.4f}", eps)
    out.print(table)
    level = f" ({record.privacy_unit}-level)" if record.epsilon is not None else ""
    out.print(
        f"{record.train_size} training / {record.eval_size} held-out sentences, {record.parameters} trained "
        f"parameters, {record.seconds:.1f} s; {record.privacy.describe()}{level}"
    )
    if record.bound is not None:
        b = record.bound
        verdict = f"bound {b.value:.4g}" if b.bound.applies else f"no bound: {b.bound.reason}"
        out.print(
            f"mean ||grad||^2 {b.measured:.4g}; {verdict} (estimated L {b.bound.smoothness:.3g}, "
            f"sigma_g^2 {b.bound.grad_variance:.3g}, perturbation {b.bound.perturbation:.3g})"
        )


privacy_app = typer.Typer(
    no_args_is_help=True,
    help="Differential privacy: epsilon of a noise mechanism, or the noise for an epsilon.",
)
app.add_typer(privacy_app, name="privacy")

Accountant = Annotated[
    str, typer.Option(help="rdp, pld or prv (dp_accounting / Opacus); analytic or classic for one release.")
]
Mechanism = Annotated[str, typer.Option(help="gaussian or laplace.")]
SampleRate = Annotated[float, typer.Option(help="Poisson sampling rate q in (0, 1].")]
Steps = Annotated[int, typer.Option(help="Number of composed steps T.")]
Delta = Annotated[float, typer.Option(help="delta in (0, 1).")]
JsonOut = Annotated[str | None, typer.Option("--json", help="Write JSON to FILE ('-' for stdout).")]


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


app.add_typer(theory_app, name="theory")


for _command in RUN_COMMANDS:  # sweep, report, audit (gradleak.cli_runs)
    app.command()(_command)

app.command("fl")(fl_command)  # Flower simulation with the server-side audit (gradleak.flower.cli)
app.command("conditions")(conditions_command)  # the conditions studies (gradleak.cli_conditions)


def main() -> None:
    try:
        app()
    except GradleakError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
