"""The conditions study (issue 9): when does gradient leakage work on transformers, and when does it stop.

A study is a TOML file under `studies/` (one question, several sweeps); `load_study` reads it,
`run_sweep` (gradleak.sweeps) runs its jobs into a store, `build_table` reads its runs back, and
`write_section` draws its figure and writes its markdown section of docs/conditions.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradleak.conditions.doc import Section, command, section_markdown, wrap, write_doc
from gradleak.conditions.plot import save_figure
from gradleak.conditions.study import Part, Study, load_study, study_paths
from gradleak.conditions.table import Row, StudyTable, build_table, findings

log = logging.getLogger(__name__)

__all__ = [
    "Part",
    "Row",
    "Section",
    "Study",
    "StudyTable",
    "WrittenStudy",
    "build_table",
    "findings",
    "load_study",
    "study_paths",
    "write_doc",
    "write_section",
]


@dataclass(frozen=True)
class WrittenStudy:
    table: StudyTable
    section: Section
    png: Path
    command: str

    def to_json(self) -> dict[str, Any]:
        study = self.table.study
        return {
            "study": study.name,
            "title": study.title,
            "png": str(self.png),
            "command": self.command,
            "runs": self.table.runs,
            "wall_seconds": self.table.wall_seconds,
            "findings": findings(self.table),
            "rows": [r.to_json(study.columns) for r in self.table.rows],
        }


def write_section(table: StudyTable, out: Path, store: str, date: str) -> WrittenStudy:
    """Draw the study's PNG under `<out's folder>/<out's stem>/` and build its markdown section."""
    name = table.study.name
    png = out.parent / out.stem / f"{name}.png"
    save_figure(table, png)
    body = section_markdown(table, f"{out.stem}/{name}.png", store, date)
    log.info("study %s: %d rows, %d runs, figure %s", name, len(table.rows), table.runs, png)
    return WrittenStudy(
        table,
        Section(name, table.study.order, wrap(name, table.study.order, body)),
        png,
        command(table, store),
    )
