"""What every command of the CLI shares: consoles, progress bars, JSON output, option types, logging
and the exit codes. A leaf: it imports no other module of `gradleak.cli`, and no command module imports
another command module, only this one.

Exit codes: 0 when every run is done (or was found done), 1 when some run failed, 2 on bad input.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

EXIT_OK = 0
EXIT_RUNS_FAILED = 1
EXIT_BAD_INPUT = 2

# loggers of dependencies that chat at INFO/WARNING; shown only under --verbose
NOISY_LOGGERS = ("transformers", "httpx", "huggingface_hub", "absl", "urllib3", "filelock", "py.warnings")

Device = Annotated[str | None, typer.Option(help="cpu or cuda: overrides every run's device.")]
JsonOut = Annotated[str | None, typer.Option("--json", help="Write JSON to FILE ('-' for stdout).")]
TextColumnOption = Annotated[
    str | None, typer.Option(help="The text column of a table or hf: data set (found by name if not given).")
]
LabelColumnOption = Annotated[
    str | None, typer.Option(help="The label column of a table or hf: data set (found by name if not given).")
]
PriorOption = Annotated[
    str,
    typer.Option(
        help="Language prior of the attacks that read one (lamp's discrete moves, exact-robust's beams): "
        "smollm2, any causal LM (gpt2-tiny, a model directory, ...), or none. Other attacks ignore it."
    ),
]
KnowsOption = Annotated[
    str,
    typer.Option(
        "--knows",
        help="What the server knows of the private batch besides the update: any of batch-size, lengths, "
        "labels (comma-separated), or none.",
    ),
]

err = Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    """INFO from the library under --verbose, else warnings of gradleak only. Python warnings (a
    dependency's FutureWarning, ...) go to logging and show only under --verbose, as do the warnings of
    transformers and the other dependencies (their INFO chatter never)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    # transformers sets its logger's level from TRANSFORMERS_VERBOSITY when it is imported (after this,
    # when a command runs); processes a sweep spawns (--workers N, Ray) read both variables at start
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning" if verbose else "error")
    if not verbose:
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if "transformers" in sys.modules:  # already imported (a second call in one process): set it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.WARNING if verbose else logging.ERROR)


def write_json(payload: Any, target: str) -> None:
    text = json.dumps(payload, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def console_for(json_out: str | None) -> Console:
    """Where human output goes: stderr when JSON goes to stdout."""
    return Console(stderr=True) if json_out == "-" else Console()


def progress(console: Console) -> Progress:
    """One bar with the objective of an optimisation (attack, training, theory lab)."""
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


@contextmanager
def trial_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A bar on stderr over counted work (`update(done, total)`), shown from the first update on."""
    bar = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    task: list[TaskID] = []

    def update(done: int, total: int) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task(label, total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    finally:
        bar.stop()


@contextmanager
def sweep_progress(total: int, console: Console):
    """A two-line progress display: runs done, and the steps of the run in this process."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with bar:
        runs = bar.add_task("runs", total=total)
        steps = bar.add_task("", total=1, visible=False)

        def on_start(job) -> None:
            bar.update(steps, description=f"  {job.label()}", completed=0, total=1, visible=True)

        def on_result(row) -> None:
            bar.advance(runs)
            bar.update(steps, visible=False)

        def tick(step: int, total_steps: int, value: float) -> None:
            bar.update(steps, completed=step, total=total_steps)

        yield on_start, on_result, tick


def failed_count(summaries: Sequence[Any]) -> tuple[int, int, int]:
    """(failed, refused, total) over sweep summaries. Only `failed` runs count as failures; a run the
    attack refused (a `Refusal`: its assumptions fail) is a result, counted apart where the summary
    has a `refused` field."""
    failed = sum(int(s.failed) for s in summaries)
    refused = sum(int(getattr(s, "refused", 0) or 0) for s in summaries)
    total = sum(int(s.total) for s in summaries)
    return failed, refused, total


def runs_failed_line(failed: int, total: int, where: str, refused: int = 0) -> str:
    """`2 of 4 runs failed; errors in ...`, with the refused runs named apart (they did not fail)."""
    runs = "run" if total == 1 else "runs"
    line = f"{failed} of {total} {runs} failed; errors in {where}"
    if refused:
        line += f" ({refused} refused by the attack: results, not failures)"
    return line


def finish_runs(failed: int, refused: int, total: int, where: str) -> None:
    """The end of a command that ran runs: exit 1, saying how many failed and where their errors are,
    when some run failed; else name the refused runs (if any) and return, for exit 0."""
    if failed:
        err.print(
            runs_failed_line(failed, total, where, refused), markup=False, highlight=False, soft_wrap=True
        )
        raise typer.Exit(EXIT_RUNS_FAILED)
    if refused:
        runs = "run" if refused == 1 else "runs"
        err.print(f"{refused} of {total} {runs} refused by the attack (results, not failures)", markup=False)
