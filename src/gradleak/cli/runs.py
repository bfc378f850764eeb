"""The commands that run many runs and read them back: `sweep`, `report` and `audit` (the main job).

Registered on the app in `gradleak.cli`; heavy modules (torch, matplotlib, Ray) load only when a
command runs. `sweep` and `audit` exit 1 when some run failed (a run the attack refused is a result).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gradleak import audit as audit_defaults
from gradleak.cli.common import (
    Device,
    JsonOut,
    KnowsOption,
    LabelColumnOption,
    PriorOption,
    TextColumnOption,
    console_for,
    failed_count,
    finish_runs,
    sweep_progress,
    trial_progress,
    write_json,
)
from gradleak.errors import GradleakError
from gradleak.knowledge import DEFAULT_KNOWS, parse_knows
from gradleak.spec import DEFAULT_PRIOR


def _run(
    jobs: Sequence[Any],
    store_path: str,
    executor: str,
    workers: int,
    address: str | None,
    console: Console,
    threads: int | None = None,
    gpus_per_run: float | None = None,
):
    from gradleak.store import Store
    from gradleak.sweeps import run_sweep
    from gradleak.sweeps.executors import make_executor

    runner = make_executor(executor, workers, address, threads, gpus_per_run)
    with Store.open(store_path, create=True) as store:
        todo = len(jobs) - len(store.finished_keys() & {j.key for j in jobs})
        with sweep_progress(todo, console) as (on_start, on_result, progress):
            summary = run_sweep(
                jobs, store, runner, on_start=on_start, on_result=on_result, progress=progress
            )
        rows = store.runs(keys=[j.key for j in jobs])
    return summary, rows


def _show_summary(summary, store: str, console: Console) -> None:
    table = Table(title=f"sweep of {summary.total} run{'' if summary.total == 1 else 's'}, store {store}")
    counts = summary.to_json()  # total, done, skipped, failed, refused
    for col in (*counts, "seconds"):
        table.add_column(col, justify="right")
    table.add_row(*(str(v) for v in counts.values()), f"{summary.seconds:.1f}")
    console.print(table)
    for label, error in summary.errors:
        console.print(f"failed: {label}: {error}", markup=False, highlight=False)
    for label, reason in summary.refusals:
        console.print(f"refused: {label}: {reason}", markup=False, highlight=False)


def sweep(
    spec: Annotated[Path, typer.Argument(help="The sweep spec (TOML): a [grid] of run-spec fields.")],
    store: Annotated[str, typer.Option(help="SQLite results store; made if missing.")] = "results.sqlite",
    executor: Annotated[str, typer.Option(help="local (in process) or ray.")] = "local",
    workers: Annotated[
        int, typer.Option(help="Runs at once: worker processes, or the share of the Ray cluster's CPUs.")
    ] = 1,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch threads (and Ray CPUs) per run; default cores // workers, at least 1."),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="An existing Ray cluster (host:port, ray://host:port or auto).")
    ] = None,
    device: Device = None,
    gpus_per_run: Annotated[
        float | None,
        typer.Option(help="GPUs each cuda run asks Ray for (default 1; a fraction shares a GPU)."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Overrides every run's seed (the grid's seed axis).")
    ] = None,
    json_out: JsonOut = None,
) -> None:
    """Run a grid of runs, each stored as it finishes; re-running skips the finished ones."""
    from gradleak.sweeps import load_plan

    overrides = {k: v for k, v in (("device", device), ("seed", seed)) if v is not None}
    plan = load_plan(spec, overrides)
    console = console_for(json_out)
    summary, _ = _run(plan.jobs, store, executor, workers, address, console, threads, gpus_per_run)
    _show_summary(summary, store, console)
    if json_out is not None:
        write_json(summary.to_json(), json_out)
    failed, refused, total = failed_count([summary])
    finish_runs(failed, refused, total, _store_errors(store))


def _store_errors(store: str) -> str:
    return f"the store {store} (gradleak report {store} lists them)"


def report(
    store: Annotated[Path, typer.Argument(help="A gradleak results store (SQLite).")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    title: Annotated[str, typer.Option(help="The report's title.")] = "gradleak report",
) -> None:
    """Write one self-contained HTML report of a store: tables, plots, reconstructions."""
    from gradleak.report import load_report_data, write_report
    from gradleak.store import Store

    with Store.open(store) as s:
        runs = s.runs()
    data = load_report_data(runs, source=str(store))
    path = write_report(out, data, title=title)
    Console().print(f"report of {len(runs)} runs: {path}", markup=False, highlight=False)


def audit(
    victim: Annotated[str, typer.Option(help="Preset or model directory.")] = audit_defaults.DEFAULT_VICTIM,
    data: Annotated[str, typer.Option(help="Named data set or file.")] = audit_defaults.DEFAULT_DATA,
    text_column: TextColumnOption = None,
    label_column: LabelColumnOption = None,
    batch_size: Annotated[
        int, typer.Option(help="Sentences in the private batch.")
    ] = audit_defaults.DEFAULT_BATCH_SIZE,
    defense: Annotated[
        list[str] | None,
        typer.Option(
            "--defense",
            help="The defence chain to audit, NAME[:key=value,...]; repeatable. "
            "Default dp-sgd:clip=1,multiplier=1.",
        ),
    ] = None,
    attack: Annotated[
        list[str] | None, typer.Option("--attack", help="Attacks to run (default exact and tag); repeatable.")
    ] = None,
    iterations: Annotated[
        int, typer.Option(help="Steps of gradient-matching attacks.")
    ] = audit_defaults.DEFAULT_ITERATIONS,
    time_budget: Annotated[float, typer.Option(help="Seconds the exact attack's search may take.")] = 60.0,
    max_words: Annotated[int | None, typer.Option(help="Only sentences of at most this many words.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the model, the batch, the noise and the attacks.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, or cuda where present.")] = "cpu",
    delta: Annotated[float, typer.Option(help="The delta of the reported (epsilon, delta).")] = 1e-5,
    accountant: Annotated[str, typer.Option(help="rdp, pld, prv, analytic or classic.")] = "rdp",
    scan: Annotated[
        bool,
        typer.Option(
            help="Scan the defence's strength for the weakest setting that stops each attack's leak."
        ),
    ] = True,
    leak_threshold: Annotated[
        float, typer.Option(help="Leakage stops below this ROUGE-1 (and with no sentence recovered exactly).")
    ] = audit_defaults.DEFAULT_LEAK_ROUGE,
    bisect_steps: Annotated[
        int, typer.Option(help="Bisection steps after the coarse grid of the scan.")
    ] = audit_defaults.DEFAULT_BISECT,
    rounds: Annotated[
        int,
        typer.Option(help="Your deployment: training rounds T the epsilon at the threshold is given for."),
    ] = audit_defaults.DEFAULT_ROUNDS,
    sample_rate: Annotated[
        float,
        typer.Option(
            help="Your deployment: the chance q that a sentence takes part in a round (1: every round)."
        ),
    ] = audit_defaults.DEFAULT_SAMPLE_RATE,
    utility: Annotated[
        bool,
        typer.Option(
            help="Measure the accuracy cost of the noise in short training runs (--no-utility: skip)."
        ),
    ] = True,
    utility_steps: Annotated[
        int, typer.Option(help="SGD steps of each utility training run.")
    ] = audit_defaults.DEFAULT_UTILITY_STEPS,
    utility_eval: Annotated[
        int, typer.Option(help="Held-out sentences the utility runs are evaluated on.")
    ] = audit_defaults.DEFAULT_UTILITY_EVAL,
    prior_success: Annotated[
        float | None,
        typer.Option(
            help="The prior kappa of the reconstruction bound: the chance of guessing a private sentence "
            "without the update. Default 1 / (candidate sentences of the data set - B + 1)."
        ),
    ] = None,
    canary_trials: Annotated[
        int,
        typer.Option(
            help="Trials of the canary audit of the audited defence (the epsilon the attack proves, beside "
            "the accountant's); 0 skips it."
        ),
    ] = audit_defaults.DEFAULT_CANARY_TRIALS,
    store: Annotated[
        str, typer.Option(help="Results store to keep the runs in; a re-run skips the finished ones.")
    ] = "gradleak-audit.sqlite",
    out: Annotated[Path, typer.Option(help="The HTML report to write.")] = Path("gradleak-audit.html"),
    knows: KnowsOption = DEFAULT_KNOWS,
    prior: PriorOption = DEFAULT_PRIOR,
    json_out: JsonOut = None,
) -> None:
    """The main job: attack one client's update with and without a defence, find where each attack's
    leak stops, its epsilon and accuracy cost, and what DP promises about reconstruction; verdict,
    report."""
    from gradleak.report import load_report_data, write_report

    known = parse_knows(knows)
    spec = audit_defaults.AuditSpec(
        victim=victim,
        data=data,
        text_column=text_column,
        label_column=label_column,
        batch_size=batch_size,
        attacks=tuple(attack or audit_defaults.DEFAULT_ATTACKS),
        defenses=tuple(defense or audit_defaults.DEFAULT_DEFENSES),
        iterations=iterations,
        seed=seed,
        device=device,
        time_budget=time_budget,
        max_words=max_words,
        delta=delta,
        accountant=accountant,
        knows=known,
        prior=prior,
        scan=scan,
        leak_rouge1=leak_threshold,
        bisect=bisect_steps,
        rounds=rounds,
        sample_rate=sample_rate,
        utility=utility,
        utility_steps=utility_steps,
        utility_eval=utility_eval,
        prior_success=prior_success,
        canary_trials=canary_trials,
    )
    spec.jobs()  # validates everything before any run
    if not out.parent.exists():
        raise GradleakError(f"cannot write the report: folder {out.parent} does not exist")
    console = console_for(json_out)
    summaries = []

    def run_jobs(jobs):
        summary, rows = _run(jobs, store, "local", 1, None, console)
        summaries.append(summary)
        return rows

    with trial_progress("canary trials") as canary_progress:
        result = audit_defaults.run_audit(spec, run_jobs, canary_progress)
    data_ = audit_defaults.report_data(result, load_report_data(list(result.rows), source=store))
    sentences = [
        *audit_defaults.verdict(spec, data_),
        *audit_defaults.threshold_verdict(spec, result, data_),
        *audit_defaults.bound_verdict(result, data_, spec.defenses),
        *audit_defaults.canary_verdict(result),
    ]
    path = write_report(
        out, data_, title=f"gradleak audit: {victim} on {data}, B={batch_size}", verdict=sentences
    )
    for line in [*sentences, f"report: {path}"]:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if json_out is not None:
        write_json(
            {
                "verdict": sentences,
                "report": str(path),
                "store": store,
                "summary": _total(summaries),
                "attacks": {t.attack: {"threshold": t.to_json()} for t in result.thresholds},
                "deployment": {
                    "rounds": rounds,
                    "sample_rate": sample_rate,
                    "delta": delta,
                    "accountant": accountant,
                },
                "utility": None if result.utility is None else result.utility.to_json(),
                "prior": {"kappa": result.prior.kappa, "why": result.prior.why},
                "canary": None if result.canary is None else result.canary.to_json(),
                "canary_error": result.canary_error or None,
                "measured_success": "the fraction of the sentences recovered exactly (0-1)",
                "runs": [
                    {**r.record, **result.bounds.get(r.key, {})}
                    for r in result.rows
                    if r.record is not None and r.kind == "attack"
                ],
                "training": [r.record for r in result.rows if r.record is not None and r.kind == "train"],
                "failed": [{"run": f.label, "error": f.error} for f in data_.failed],
            },
            json_out,
        )
    failed, refused, total = failed_count(summaries)
    where = f"{_store_errors(store)} and the report {path}"
    finish_runs(failed, refused, total, where)


def _total(summaries: Sequence[Any]) -> dict[str, Any]:
    """The runs of all the audit's sweeps (plain and defended, the scan's steps, training), added up."""
    out: dict[str, Any] = {}
    for s in summaries:
        for k, v in s.to_json().items():
            out[k] = out.get(k, 0) + v
    return out


COMMANDS: tuple[Callable[..., None], ...] = (sweep, report, audit)
