"""`gradleak train`: SGD on defended gradients, with accuracy, epsilon and the convergence bound."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gradleak.cli.common import LabelColumnOption, TextColumnOption, err, progress, write_json
from gradleak.errors import GradleakError


def train(
    victim: Annotated[
        str, typer.Option(help="Preset (bert-tiny, gpt2-tiny, gpt2-wide, minilm) or a model directory.")
    ] = "bert-tiny",
    data: Annotated[str, typer.Option(help="sst2, cola, rt, wikitext, sample, or a file.")] = "sst2",
    steps: Annotated[int, typer.Option(help="SGD steps T.")] = 100,
    lr: Annotated[float, typer.Option(help="Step size (plain SGD: no momentum; or Adam's lr).")] = 0.1,
    optimizer: Annotated[
        str, typer.Option(help="sgd (plain, the bound's setting) or adam (DP-Adam under dp-sgd; no bound).")
    ] = "sgd",
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    peft: Annotated[
        str | None,
        typer.Option(
            help="Train only LoRA adapters (and a classifier's head) on the frozen victim; dp-sgd then "
            "clips and noises those only: lora:r=INT[,alpha=A][,targets=NAME+NAME|attention|mlp|all-linear]"
            "[,dropout=P][,bias=none|all|lora_only]."
        ),
    ] = None,
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
        bool | None,
        typer.Option(
            help="Estimate L and the gradient variance, and the convergence bound (sgd only; default on).",
        ),
    ] = None,
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
        text_column=text_column,
        label_column=label_column,
        peft=peft,
        steps=steps,
        lr=lr,
        optimizer=optimizer,
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
        bound=optimizer == "sgd" if bound is None else bound,
    )
    spec.validate()
    if plot_out is not None and not plot_out.lower().endswith(".png"):
        raise GradleakError(f"--plot writes a PNG: give a FILE.png, got {plot_out!r}")
    with progress(err) as bar:
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
    method = {"sgd": "SGD", "adam": "Adam"}.get(spec.optimizer, spec.optimizer)
    table = Table(title=f"{method} on {spec.victim}, {spec.data}: lr {spec.lr:g}, batch {spec.batch_size}")
    for column in ("step", "held-out accuracy", "held-out loss", "epsilon"):
        table.add_column(column, justify="right")
    for e in record.eval:
        eps = "inf" if e.epsilon is None else f"{e.epsilon:.3g}"
        table.add_row(str(e.step), f"{e.accuracy:.3f}", f"{e.loss:.4f}", eps)
    out.print(table)
    level = f" ({record.privacy_unit}-level)" if record.epsilon is not None else ""
    lora = record.trained.get("peft")
    how = f" (LoRA r={lora['r']} on {'+'.join(lora['targets'])}, base frozen)" if lora else ""
    out.print(
        f"{record.train_size} training / {record.eval_size} held-out sentences, {record.parameters} trained "
        f"parameters{how}, {record.seconds:.1f} s; {record.privacy.describe()}{level}"
    )
    if record.bound is not None:
        b = record.bound
        verdict = f"bound {b.value:.4g}" if b.bound.applies else f"no bound: {b.bound.reason}"
        out.print(
            f"mean ||grad||^2 {b.measured:.4g}; {verdict} (estimated L {b.bound.smoothness:.3g}, "
            f"sigma_g^2 {b.bound.grad_variance:.3g}, perturbation {b.bound.perturbation:.3g})"
        )
