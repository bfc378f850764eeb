"""Run the CLI's real entry point (`gradleak.cli.main`) in this process: exit code and stderr."""

from __future__ import annotations

import sys


def main_in_process(args: tuple[str, ...], capsys, monkeypatch) -> tuple[int, str]:
    """`gradleak ARGS` as the console script runs it, without a new interpreter (no torch import per call)."""
    from gradleak.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["gradleak", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err
