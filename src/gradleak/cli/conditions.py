"""`gradleak conditions`: run the conditions studies (studies/*.toml) into a store and write
docs/conditions.md with one section per study (plot, table, findings, the command that reproduces it).

Registered on the app in `gradleak.cli`; the library (`gradleak.conditions`) loads when the command runs.
Exits 1 when some run failed (the doc is still written); a run the attack refused is a result.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gradleak.cli.common import (
    Device,
    JsonOut,
    console_for,
    failed_count,
    finish_runs,
    sweep_progress,
    write_json,
)
from gradleak.errors import GradleakError


def conditions(
    studies: Annotated[
        list[str] | None,
        typer.Argument(help="Studies to run: names in --studies or paths to TOML files (default: all)."),
    ] = None,
    store: Annotated[str, typer.Option(help="SQLite results store; made if missing.")] = "conditions.sqlite",
    out: Annotated[
        Path, typer.Option(help="The markdown to write; figures go to <folder>/<stem>/<study>.png.")
    ] = Path("docs/conditions.md"),
    studies_dir: Annotated[Path, typer.Option("--studies", help="Where named studies live.")] = Path(
        "studies"
    ),
    shrink: Annotated[
        bool,
        typer.Option(help="Quick version: first seed, first and last point of each axis, few iterations."),
    ] = False,
    seeds: Annotated[
        int | None, typer.Option(help="Seeds 0..N-1 for every run (replaces the studies').")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="One seed for every run (overrides the studies').")] = None,
    workers: Annotated[int, typer.Option(help="Runs at once (worker processes).")] = 1,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch threads per run (default cores // workers; 1 on a shared machine)."),
    ] = None,
    device: Device = None,
    run: Annotated[bool, typer.Option(help="Run what the store lacks; --no-run only writes the doc.")] = True,
    json_out: JsonOut = None,
) -> None:
    """Run the conditions studies (resuming from the store) and write their sections of the doc."""
    from gradleak.conditions import build_table, load_study, study_paths, write_doc, write_section
    from gradleak.store import Store
    from gradleak.sweeps import run_sweep
    from gradleak.sweeps.executors import make_executor

    if seed is not None and seeds is not None:
        raise GradleakError("give --seed (one seed) or --seeds (seeds 0..N-1), not both")
    if not out.parent.exists():
        raise GradleakError(f"cannot write {out}: folder {out.parent} does not exist")
    executor = make_executor("local", workers, threads=threads)  # checks both before anything runs
    overrides = {k: v for k, v in (("device", device), ("seed", seed)) if v is not None}
    paths = study_paths(list(studies or []), studies_dir)
    loaded = [load_study(p, shrink=shrink, seeds=seeds, overrides=overrides) for p in paths]
    console = console_for(json_out)
    with Store.open(store, create=True) as st:
        summaries = {}
        if run:
            finished = st.finished_keys()
            todo = sum(1 for s in loaded for j in s.jobs if j.key not in finished)
            with sweep_progress(todo, console) as (on_start, on_result, progress):
                for study in loaded:
                    summaries[study.name] = run_sweep(
                        study.jobs, st, executor, on_start=on_start, on_result=on_result, progress=progress
                    )
        date = datetime.date.today().isoformat()
        written = [
            write_section(build_table(s, st.runs(keys=[j.key for j in s.jobs])), out, store, date)
            for s in loaded
        ]
    path = write_doc(out, [w.section for w in written], studies_dir)
    summary = Table(
        title=f"conditions: {len(written)} stud{'y' if len(written) == 1 else 'ies'}, store {store}"
    )
    for col in ("study", "runs", "done now", "failed now", "skipped", "wall s (all runs)"):
        summary.add_column(col, justify="right" if col != "study" else "left")
    for w in written:
        s = summaries.get(w.table.study.name)
        summary.add_row(
            w.table.study.name,
            str(len(w.table.study.jobs)),
            str(s.done if s else 0),
            str(s.failed if s else 0),
            str(s.skipped if s else "—"),
            f"{w.table.wall_seconds:.0f}",
        )
    console.print(summary)
    console.print(f"wrote {path} and {len(written)} figure(s) under {out.parent / out.stem}", markup=False)
    if json_out is not None:
        write_json({"out": str(path), "store": store, "studies": [w.to_json() for w in written]}, json_out)
    failed, refused, total = failed_count(list(summaries.values()))
    finish_runs(failed, refused, total, f"the store {store} (gradleak report {store} lists them)")
