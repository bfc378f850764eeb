"""docs/conditions.md: an intro, then one section per study between markers, so that re-running one
study replaces its own section and keeps the others."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gradleak.conditions.fields import get_field
from gradleak.conditions.table import Row, StudyTable, findings

BEGIN = "<!-- BEGIN study:{name} order:{order} -->"
END = "<!-- END study:{name} -->"
_SECTION = re.compile(
    r"<!-- BEGIN study:(?P<name>[\w.-]+) order:(?P<order>-?\d+) -->\n.*?<!-- END study:(?P=name) -->\n?",
    re.S,
)

INTRO = """# When does gradient leakage work on transformers, and when does it stop?

Each section below answers one question with a study: a TOML file under `studies/` that holds one
sweep per attack setting (`[[part]]`). The command under each section re-runs that study (runs already in
the store are skipped) and rewrites the section and its plot. Everything at once:

```
gradleak conditions --store conditions.sqlite --out docs/conditions.md
```

(`--store` names any SQLite file; the sections below were measured into one under /tmp with
`--threads 1 --workers 1`: on a shared 2-core machine two torch threads per run oversubscribe the cores
and TAG ran up to 30 times slower. Add `--seeds N` for more seeds, `--shrink` for a quick check that
everything runs; `--no-run` only rewrites the sections from the store.)

Two attacks throughout: `exact` (structural exact recovery: the token set from the embedding gradient,
then span checks on the attention gradients) and TAG, the gradient-matching attack that scores best on
our small BERT (see `benchmarks/RESULTS.md`). TAG needs second derivatives on every step, so its parts
use small victims, few iterations and B ≤ 4: its numbers are a lower bound on what a patient attacker
gets. ROUGE-1/2 and exact match are in percent (Hungarian matching within a batch, as LAMP and DAGER
report them), means over seeds; "attack s" is the attack's own time, the run time under each section
the wall clock of all its runs (loading, update, attack, scoring) on a shared 2-core CPU, one worker.
The plotted lines mark ROUGE-1 = 99 (dotted) and 50 (dashed); × marks a point with no result.
"""


@dataclass(frozen=True)
class Section:
    name: str
    order: int
    text: str


def command(table: StudyTable, store: str) -> str:
    study = table.study
    extra = (f" --seeds {study.seeds}" if study.seeds else "") + (" --shrink" if study.shrunk else "")
    return f"gradleak conditions {study.name} --store {Path(store).name}{extra}"


def _cell(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _epsilon(row: Row) -> str:
    if not row.defended:
        return "∞ (none)"
    if row.n == 0:
        return "—"
    return "∞" if row.epsilon is None else f"{row.epsilon:.3g}"


def table_markdown(table: StudyTable) -> str:
    study = table.study
    heads = [get_field(c).heading for c in study.columns]
    heads += ["ROUGE-1", "ROUGE-2", "exact %", "attack s"]
    if table.defended:
        heads.append("ε")
    heads += ["n", "note"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in (r for r in table.rows if not r.repeat):
        cells = [*r.labels, _cell(r.rouge1), _cell(r.rouge2), _cell(r.exact_match), _cell(r.seconds)]
        if table.defended:
            cells.append(_epsilon(r))
        cells += [str(r.n), r.note.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _runs(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def section_markdown(table: StudyTable, png: str, store: str, date: str) -> str:
    study = table.study
    out = [f"## {study.title}", ""]
    if study.shrunk:
        out += [
            "*Shrunken run (`--shrink`): first seed, first and last point of each axis, capped "
            "iterations. The numbers only show that the pipeline works.*",
            "",
        ]
    if study.question:
        out += [f"**Question.** {study.question.strip()}", ""]
    out += [f"![{study.title}]({png})", "", table_markdown(table), ""]
    out += ["**Measured** (read off the table):", ""]
    out += [f"- {line}" for line in findings(table)]
    out.append("")
    if study.finding:
        out += [f"**Finding.** {' '.join(study.finding.split())}", ""]
    out += [
        "**Parts.** " + "; ".join(f"{p.label} ({_runs(len(p.plan.jobs))})" for p in study.parts) + ".",
        "",
    ]
    out += [
        f"**Run time**: {_minutes(table.wall_seconds)} for {_runs(table.runs)} (sum of the runs' wall clock, "
        f"one worker, 2 shared CPU cores; {date}).",
        "",
        "Reproduce:",
        "",
        "```",
        command(table, store),
        "```",
    ]
    return "\n".join(out) + "\n"


def wrap(name: str, order: int, body: str) -> str:
    return f"{BEGIN.format(name=name, order=order)}\n{body}{END.format(name=name)}\n"


def read_sections(text: str) -> list[Section]:
    return [Section(m["name"], int(m["order"]), m.group(0)) for m in _SECTION.finditer(text)]


SUMMARY = "summary.md"  # in the studies' folder: the hand-written overview that follows the intro


def write_doc(path: Path, new: Sequence[Section], studies_dir: Path | None = None) -> Path:
    """Write the intro, the studies' hand-written summary (`<studies_dir>/summary.md`, when there is
    one) and every section: the new ones, plus those of other studies already in the file."""
    old = read_sections(path.read_text(encoding="utf-8")) if path.is_file() else []
    by_name = {s.name: s for s in old}
    by_name.update({s.name: s for s in new})
    sections = sorted(by_name.values(), key=lambda s: (s.order, s.name))
    summary = studies_dir / SUMMARY if studies_dir is not None else None
    head = INTRO
    if summary is not None and summary.is_file():
        head += "\n" + summary.read_text(encoding="utf-8").strip() + "\n"
    text = head + "\n" + "\n".join(s.text.rstrip("\n") + "\n" for s in sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
