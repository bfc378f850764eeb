"""`gradleak theory recover` and `gradleak theory sweep`: the theory lab, thin as the rest of the CLI."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from gradleak.cli.common import JsonOut, progress, write_json
from gradleak.errors import GradleakError

theory_app = typer.Typer(
    no_args_is_help=True,
    help="The theory lab: gradient leakage in one softmax self-attention layer with a squared loss.",
)
DEFAULT_SIGMAS = "0,1e-8,1e-7,1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1"


def _err() -> Console:
    return Console(stderr=True)


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise GradleakError(f"{name} must be a comma-separated list of integers, got {text!r}") from None


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise GradleakError(f"{name} must be a comma-separated list of numbers, got {text!r}") from None


def _threads(threads: int) -> None:
    import torch

    if threads < 1:
        raise GradleakError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


@theory_app.command("recover")
def recover_cmd(
    n: Annotated[int, typer.Option("--n", help="Tokens in the private input X (n x d).")] = 4,
    d: Annotated[int, typer.Option("--d", help="Width of the attention layer.")] = 8,
    seed: Annotated[int, typer.Option(help="Seeds the weights, the batch, the noise and the attack.")] = 0,
    sigma: Annotated[
        float, typer.Option(help="Std of the Gaussian noise added to the shared gradient.")
    ] = 0.0,
    clip: Annotated[
        float | None, typer.Option(help="L2-clip the shared gradient to this norm first (gives an epsilon).")
    ] = None,
    delta: Annotated[float, typer.Option(help="The delta of the reported epsilon.")] = 1e-5,
    known_target: Annotated[bool, typer.Option(help="The server knows the target Y.")] = False,
    share: Annotated[str, typer.Option(help="Whose gradients are shared: letters of q, k, v.")] = "qkv",
    weight_norm: Annotated[float, typer.Option(help="Spectral norm of W_Q, W_K and W_V.")] = 1.0,
    init_distance: Annotated[
        float | None, typer.Option(help="Start at relative distance R from the truth (default: random).")
    ] = None,
    optimizer: Annotated[str, typer.Option(help="lbfgs, adam, gd or lm (Levenberg-Marquardt).")] = "lbfgs",
    iterations: Annotated[int, typer.Option(help="Gradient evaluations per restart (lm: Jacobians).")] = 300,
    restarts: Annotated[int, typer.Option(help="Random restarts; the lowest objective is kept.")] = 8,
    learning_rate: Annotated[float, typer.Option(help="Adam's learning rate.")] = 0.05,
    tolerance: Annotated[float, typer.Option(help="Relative error counted as recovered.")] = 1e-3,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    trace: Annotated[bool, typer.Option(help="Include the per-evaluation trace in the JSON.")] = False,
    json_out: JsonOut = None,
) -> None:
    """DLG on one attention layer: recover X from the shared gradient and print the relative error."""
    from gradleak.theory.recover import RecoverySpec, recover

    spec = RecoverySpec(
        n=n, d=d, seed=seed, weight_norm=weight_norm, share=share, known_target=known_target, sigma=sigma,
        clip=clip, delta=delta, init_distance=init_distance, optimizer=optimizer, iterations=iterations,
        restarts=restarts, learning_rate=learning_rate, tolerance=tolerance,
    )  # fmt: skip
    spec.validate()
    _threads(threads)
    with progress(_err()) as bar:
        job = bar.add_task(f"{optimizer} on attention-layer", total=iterations * restarts, objective=math.nan)

        def tick(step: int, total: int, value: float) -> None:
            bar.update(job, completed=step, total=total, objective=value)

        result = recover(spec, progress=tick)
    if json_out != "-":
        _show(result)
    if json_out is not None:
        write_json(result.to_json(with_trace=trace), json_out)


def _show(result) -> None:
    out = Console()
    s = result.spec
    verdict = "recovered" if result.success else "not recovered"
    its = "never" if result.iterations is None else f"after {result.iterations}"
    out.print(
        f"relative error {result.relative_error:.3g} ({verdict}: tolerance {s.tolerance:g}); "
        f"reached the tolerance {its} of {result.evaluations} gradient evaluations; {result.seconds:.1f} s"
    )
    if result.target_error is not None:
        out.print(f"target error {result.target_error:.3g} (Y was unknown)")
    out.print(f"objective {result.objective:.3g} (||G(X') - G||^2 / ||G||^2), restart {result.restart}")
    eps = "inf (no DP guarantee)" if not math.isfinite(result.epsilon) else f"{result.epsilon:.4g}"
    out.print(f"gradient norm {result.gradient_norm:.4g}; epsilon {eps} at delta {s.delta:g}")
    out.print("symmetries: " + ("; ".join(result.symmetries) or "none (the known Y fixes order and sign)"))
    c = result.convergence
    out.print(
        f"convergence: L ~ {c.smoothness:.3g} (max secant), min ||grad f||^2 {c.min_grad_sq:.3g} vs GD bound "
        f"2 L f(x0) / T = {c.gd_gradient_bound:.3g} at T = {c.evaluations}"
    )
    li = result.identifiability
    if li is not None:
        gain = "inf" if not math.isfinite(li.noise_gain) else f"{li.noise_gain:.3g}"
        out.print(
            f"local identifiability: Jacobian rank {li.rank} of {li.unknowns} unknowns "
            f"({li.equations} gradient entries), noise gain {gain}"
        )


@theory_app.command("sweep")
def sweep_cmd(
    out: Annotated[Path, typer.Option(help="Folder for table.md, results.json and the PNGs.")],
    ns: Annotated[str, typer.Option(help="Token counts n of the phase diagram.")] = "1,2,4,8,12,16,24,32",
    ds: Annotated[str, typer.Option(help="Widths d of the phase diagram.")] = "2,4,8,16",
    seeds: Annotated[int, typer.Option(help="Seeds per cell.")] = 3,
    sigmas: Annotated[
        str, typer.Option(help="Noise stds of the noise part.")
    ] = "0,1e-8,1e-7,1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1",
    noise_seeds: Annotated[int, typer.Option(help="Seeds per noise level.")] = 5,
    clip: Annotated[
        float, typer.Option(help="Clip norm C of the noise part (sensitivity of epsilon).")
    ] = 1.0,
    delta: Annotated[float, typer.Option(help="The delta of the reported epsilon.")] = 1e-5,
    part: Annotated[
        list[str] | None,
        typer.Option(help="phase, local, conditions, noise, convergence (repeatable; default all)."),
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    json_out: JsonOut = None,
) -> None:
    """Where recovery succeeds: phase diagrams over (n, d), conditions, noise and convergence."""
    from gradleak.theory.sweep import PARTS, SweepConfig, run_sweep

    cfg = SweepConfig(
        out=out, ns=_ints(ns, "ns"), ds=_ints(ds, "ds"), seeds=seeds, sigmas=_floats(sigmas, "sigmas"),
        noise_seeds=noise_seeds, clip=clip, delta=delta, parts=tuple(part or PARTS),
    )  # fmt: skip
    cfg.validate()
    _threads(threads)
    err = _err()
    display = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal,
    )  # fmt: skip
    with display as bar:
        job = bar.add_task("theory sweep", total=None)

        def tick(done: int, total: int, what: str) -> None:
            bar.update(job, completed=done, total=total, description=what)

        result = run_sweep(cfg, progress=tick)
    summary = {"files": [str(p) for p in result.files], "cells": [c.summary() for c in result.cells]}
    if json_out != "-":
        Console().print("wrote " + ", ".join(str(p) for p in result.files))
    if json_out is not None:
        write_json(summary, json_out)
