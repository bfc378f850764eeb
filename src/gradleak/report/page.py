"""The report as one self-contained HTML page: inline CSS, plots as base64 PNG, no script at all (the
page's Content-Security-Policy forbids scripts, too), and every piece of text HTML-escaped."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from pathlib import Path

from gradleak.errors import GradleakError
from gradleak.report.data import Group, ReportData
from gradleak.report.highlight import pairs
from gradleak.report.plots import PLOTS, to_png

MAX_RECONSTRUCTIONS = 40  # conditions shown with their reconstructions

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d2330; line-height: 1.45; }
h1 { margin-bottom: .2rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #d6dae3; padding-bottom: .2rem; }
.meta { color: #5b6474; font-size: .9rem; }
.verdict { background: #f3f6fb; border-left: 4px solid #3b6fd8; padding: .8rem 1rem; font-size: 1.05rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .88rem; }
th, td { border: 1px solid #d6dae3; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #eef1f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; border: 1px solid #e3e6ec; }
mark { background: #c8f0c8; color: inherit; padding: 0 .1rem; border-radius: 2px; }
table.pairs td { width: 50%; font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .82rem;
       white-space: pre-wrap; word-break: break-word; }
.empty { color: #5b6474; font-style: italic; } .error { color: #a4262c; }
"""

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(x: float | None, digits: int = 1) -> str:
    return "∞" if x is None else f"{x:.{digits}f}"


def _eps(x: float | None) -> str:
    return "∞" if x is None else f"{x:.3g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table; cells are already HTML (escape before)."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _attack_table(groups: Sequence[Group]) -> str:
    if not groups:
        return '<p class="empty">No finished attack runs.</p>'
    rows = []
    for g in groups:
        r = g.first
        rows.append(
            [
                e(r.victim),
                e(r.data),
                e(r.attack),
                str(r.batch_size),
                e(r.chain),
                e(r.knows),
                str(len(g.runs)),
                *(_num(g.mean(k)) for k in ("rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match")),
                e(_eps(g.epsilon)),
                f"{g.seconds:.1f}",
            ]
        )
    header = ["victim", "data", "attack", "B", "defences", "server knows", "seeds"]
    header += ["ROUGE-1", "ROUGE-2", "ROUGE-L", "token acc.", "exact", "ε (one release)", "attack seconds"]
    return _table(header, rows, numeric=range(6, 14))


def _train_table(data: ReportData) -> str:
    if not data.trains:
        return '<p class="empty">No training runs in this store.</p>'
    rows = [
        [
            e(t.victim),
            e(t.data),
            e(t.chain),
            str(t.batch_size),
            str(t.seed),
            str(t.steps[-1] if t.steps else 0),
            _num(None if t.final_accuracy is None else 100 * t.final_accuracy),
            e(_eps(t.epsilon)),
        ]
        for t in data.trains
    ]
    header = ["victim", "data", "defences", "B", "seed", "steps", "held-out accuracy %", "ε"]
    return _table(header, rows, numeric=range(3, 8))


def _failed_table(data: ReportData) -> str:
    if not data.failed:
        return '<p class="empty">None.</p>'
    rows = [[e(f.kind), e(f.label), f'<span class="error">{e(f.error)}</span>'] for f in data.failed]
    return _table(["kind", "run", "error"], rows)


def _refused_table(data: ReportData) -> str:
    rows = [[e(f.kind), e(f.label), e(f.error)] for f in data.refused]
    return _table(["kind", "run", "reason"], rows)


def _plots(data: ReportData) -> str:
    out = []
    for plot in PLOTS:
        out.append(f"<h3>{e(plot.title)}</h3>")
        fig = plot.draw(data)
        if fig is None:
            out.append(f'<p class="empty">{e(plot.missing)}</p>')
            continue
        out.append(f'<img alt="{e(plot.title)}" src="data:image/png;base64,{to_png(fig)}">')
        out.append(f'<p class="meta">{e(plot.caption)}</p>')
    return "\n".join(out)


def _reconstructions(groups: Sequence[Group], limit: int) -> str:
    if not groups:
        return '<p class="empty">No finished attack runs.</p>'
    out = []
    if len(groups) > limit:
        out.append(f'<p class="meta">The first seed of {limit} of {len(groups)} conditions.</p>')
    for g in groups[:limit]:
        r = g.first
        title = (
            f"{r.attack} on {r.victim}, {r.data}, B={r.batch_size}, seed {r.seed}, defences {r.chain}, "
            f"server knows {r.knows}"
        )
        out.append(f"<h3>{e(title)}</h3>")
        out.append(
            f'<p class="meta">ROUGE-1 {r.scores["rouge1"]:.1f}, exact match {r.scores["exact_match"]:.0f}, '
            f"ε {e(_eps(r.epsilon))}</p>"
        )
        rows = [[p.reference, p.reconstruction] for p in pairs(r.references, r.reconstructions)]
        out.append(
            _table(["reference (private)", "reconstruction (server)"], rows).replace(
                "<table>", '<table class="pairs">', 1
            )
        )
    return "\n".join(out)


def render(
    data: ReportData,
    title: str = "gradleak report",
    verdict: Sequence[str] = (),
    max_reconstructions: int = MAX_RECONSTRUCTIONS,
) -> str:
    """The whole page as a string."""
    groups = data.groups()
    n_runs = len(data.attacks) + len(data.trains) + len(data.refused) + len(data.failed)
    refused = f"{len(data.refused)} refused, " if data.refused else ""
    meta = (
        f"{n_runs} runs from {e(data.source or 'a store')}: {len(data.attacks)} attack, {len(data.trains)} "
        f"training, {refused}{len(data.failed)} failed. gradleak {e(', '.join(data.versions) or '?')}; "
        f"written {e(time.strftime('%Y-%m-%d %H:%M'))}."
    )
    verdict_html = "".join(f"<p>{e(s)}</p>" for s in verdict)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{meta}</p>',
        f'<div class="verdict">{verdict_html}</div>' if verdict else "",
        "<h2>Attacks</h2>",
        '<p class="meta">Scores are 0-100, averaged over seeds; ε is for the one update the server saw '
        "(∞: the defence is no DP mechanism).</p>",
        _attack_table(groups),
        "<h2>Training</h2>",
        _train_table(data),
        *(
            [
                "<h2>Refused runs</h2>",
                '<p class="meta">The attack declined the scenario: one of its assumptions fails.</p>',
                _refused_table(data),
            ]
            if data.refused
            else []
        ),
        "<h2>Failed runs</h2>",
        _failed_table(data),
        "<h2>Plots</h2>",
        _plots(data),
        "<h2>Reconstructions</h2>",
        '<p class="meta">Each private sentence beside the reconstruction matched to it; '
        "<mark>marked</mark> words occur in both.</p>",
        _reconstructions(groups, max_reconstructions),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_report(path: str | Path, data: ReportData, **kwargs) -> Path:
    path = Path(path)
    if not path.parent.exists():
        raise GradleakError(f"cannot write the report: folder {path.parent} does not exist")
    path.write_text(render(data, **kwargs), encoding="utf-8")
    return path
