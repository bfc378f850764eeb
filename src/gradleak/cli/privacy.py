"""`gradleak privacy epsilon|calibrate`: the accountants on their own."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from gradleak.cli.common import JsonOut, write_json

privacy_app = typer.Typer(
    no_args_is_help=True,
    help="Differential privacy: epsilon of a noise mechanism, or the noise for an epsilon.",
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
