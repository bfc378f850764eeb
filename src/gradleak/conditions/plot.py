"""A study's figure: ROUGE-1 (mean ± sd over seeds) against the study's axis, one line per series and
one panel per axis (a part may plot against its own). Matplotlib's object API, no pyplot state."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from gradleak.conditions.fields import get_field, show
from gradleak.conditions.table import HIGH, LOW, Row, StudyTable

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _numeric(rows: list[Row]) -> bool:
    return all(isinstance(r.x, int | float) and not isinstance(r.x, bool) for r in rows)


def study_figure(table: StudyTable) -> Figure:
    panels: dict[str, list[Row]] = {}
    for row in table.rows:
        panels.setdefault(row.x_field, []).append(row)
    width = 6.4 if len(panels) == 1 else 5.6
    fig = Figure(figsize=(width * len(panels), 4.3))
    for i, (x_field, rows) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _panel(ax, table, x_field, rows)
    fig.suptitle(table.study.title + (" (shrunken run)" if table.study.shrunk else ""), fontsize=11)
    fig.tight_layout()
    return fig


def _panel(ax, table: StudyTable, x_field: str, rows: list[Row]) -> None:
    numeric = _numeric(rows)
    log = numeric and table.study.xscale == "log"
    if numeric:
        positive = sorted({float(r.x) for r in rows if float(r.x) > 0})
        zero_at = positive[0] / 10 if log and positive else 0.0

        def pos(x: object) -> float:
            v = float(x)  # type: ignore[arg-type]
            return zero_at if log and v <= 0 else v

    else:
        order: list[str] = []
        for r in rows:
            if show(r.x) not in order:
                order.append(show(r.x))

        def pos(x: object) -> float:
            return float(order.index(show(x)))

    lines: dict[str, list[Row]] = {}
    for r in rows:
        lines.setdefault(r.series, []).append(r)
    for j, (series, line) in enumerate(lines.items()):
        color, marker = f"C{j % 10}", MARKERS[j % len(MARKERS)]
        done = [r for r in line if r.rouge1 is not None]
        done.sort(key=lambda r: pos(r.x))
        if done:
            ax.errorbar(
                [pos(r.x) for r in done],
                [r.rouge1 for r in done],
                yerr=[r.rouge1_sd or 0.0 for r in done],
                capsize=3,
                color=color,
                marker=marker,
                markerfacecolor="none",
                label=series or "runs",
            )
        broken = [r for r in line if r.rouge1 is None]
        if broken:
            ax.scatter(
                [pos(r.x) for r in broken],
                [-1.5] * len(broken),
                marker="x",
                color=color,
                label=f"{series}: no result" if series else "no result",
            )
    with_eps = sorted({(pos(r.x), r.epsilon) for r in rows if r.epsilon is not None and r.n})
    if with_eps:  # the ε each noise level buys (one release), on its own log axis
        twin = ax.twinx()
        xs = sorted({x for x, _ in with_eps})
        twin.plot(xs, [max(e for x2, e in with_eps if x2 == x) for x in xs], "k--", marker=".", alpha=0.6)
        twin.set_yscale("log")
        twin.set_ylabel("ε of the release (dashed)")
    ax.axhline(HIGH, color="grey", linewidth=0.6, linestyle=":")
    ax.axhline(LOW, color="grey", linewidth=0.6, linestyle="--")
    heading = get_field(x_field).heading
    if numeric:
        values = sorted({float(r.x) for r in rows})
        if log:
            ax.set_xscale("log")
            ax.set_xticks([pos(v) for v in values], ["none" if v <= 0 else f"{v:g}" for v in values])
            ax.minorticks_off()
        else:
            ax.set_xticks(values, [f"{v:g}" for v in values])
    else:
        ax.set_xticks(range(len(order)), order, rotation=20 if max(map(len, order)) > 8 else 0, ha="right")
    ax.set_xlabel(heading)
    ax.set_ylabel("ROUGE-1 (mean ± sd over seeds)")
    ax.set_ylim(-4, 104)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def save_figure(table: StudyTable, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = study_figure(table)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return path
