"""The command line: parses, calls the library, prints.

One module per command group, each importing only `gradleak.cli.common` (never another command module);
this module assembles the typer app and `main`, the console script (`gradleak = "gradleak.cli:main"`).

    common.py      consoles, progress bars, JSON output, option types, logging, exit codes
    attack.py      gradleak attack
    training.py    gradleak train
    privacy.py     gradleak privacy epsilon|calibrate|audit (the canary audit)
    runs.py        gradleak sweep, report, audit
    conditions.py  gradleak conditions
    fl.py          gradleak fl (Flower)
    theory.py      gradleak theory recover|sweep

Exit codes: 0 every run done (or found done), 1 some run failed, 2 bad input (one line `error: ...`).
"""

from __future__ import annotations

from typing import Annotated

import typer

from gradleak.cli import attack as attack_commands
from gradleak.cli import conditions as conditions_commands
from gradleak.cli import fl as fl_commands
from gradleak.cli import privacy as privacy_commands
from gradleak.cli import runs as run_commands
from gradleak.cli import theory as theory_commands
from gradleak.cli import training as training_commands
from gradleak.cli.common import EXIT_BAD_INPUT, err, setup_logging, write_json
from gradleak.errors import GradleakError

__all__ = ["app", "main", "write_json"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="gradleak: how much private text leaks from transformer gradients, and what stops it.",
)


@app.callback()
def _main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Log the library's progress, and the warnings of its dependencies."
        ),
    ] = False,
) -> None:
    setup_logging(verbose)


app.command()(attack_commands.attack)
app.command()(training_commands.train)
app.add_typer(privacy_commands.privacy_app, name="privacy")
app.add_typer(theory_commands.theory_app, name="theory")
for _command in run_commands.COMMANDS:  # sweep, report, audit
    app.command()(_command)
app.command("fl")(fl_commands.fl)  # Flower simulation with the server-side audit
app.command("conditions")(conditions_commands.conditions)  # the conditions studies


def main() -> None:
    try:
        app()
    except GradleakError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
