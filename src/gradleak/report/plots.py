"""The report's plots (matplotlib, Agg, no pyplot state), each a function of the report's data that
returns a Figure, or None when the store has nothing to draw. `PLOTS` is the registry the page draws
in order; each entry says what is missing when it has nothing to show."""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

from gradleak.report.data import AttackRun, Group, ReportData, ThresholdMark, TrainRun, group_runs

NO_DP = "no finite ε"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # series that coincide stay visible: hollow, distinct


def _style(i: int) -> dict[str, object]:
    color = f"C{i % 10}"
    return {
        "color": color,
        "marker": MARKERS[i % len(MARKERS)],
        "markerfacecolor": "none",
        "markersize": 7 + i % 3,
    }


def to_png(fig: Figure) -> str:
    """The figure as a base64 PNG (for a data: URI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _varying(runs: Sequence[AttackRun], names: Sequence[str]) -> list[str]:
    return [n for n in names if len({getattr(r, n) for r in runs}) > 1]


def _label(run: AttackRun, fields: Sequence[str]) -> str:
    parts = []
    for f in fields:
        value = getattr(run, f)
        if f == "defenses":
            parts.append(run.chain)
        elif f == "batch_size":
            parts.append(f"B={value}")
        else:
            parts.append(str(value))
    return ", ".join(parts)


def _errorbar(ax, xs: list[float], groups: list[Group], label: str, **kw) -> None:
    ys = [g.mean("rouge1") for g in groups]
    es = [g.std("rouge1") for g in groups]
    ax.errorbar(xs, ys, yerr=es, capsize=3, label=label, **kw)


# ------------------------------------------------------------------ ROUGE against batch size


def rouge_vs_batch(data: ReportData) -> Figure | None:
    runs = list(data.attacks)
    if len({r.batch_size for r in runs}) < 2:
        return None
    legend = ["attack", *_varying(runs, ("victim", "data", "defenses"))]
    series: dict[str, list[AttackRun]] = defaultdict(list)
    for r in runs:
        series[_label(r, legend)].append(r)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    for j, (label, rs) in enumerate(sorted(series.items())):
        groups = sorted(group_runs(rs), key=lambda g: g.first.batch_size)
        _errorbar(ax, [g.first.batch_size for g in groups], groups, label, **_style(j))
    sizes = sorted({r.batch_size for r in runs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size B")
    ax.set_ylabel("ROUGE-1 (mean ± sd over seeds)")
    ax.set_ylim(-3, 103)
    ax.set_title("Leakage against batch size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------ ROUGE against noise, epsilon twin


NOISE_AXES = {"sigma": "noise std σ (absolute)", "multiplier": "noise multiplier z = σ / sensitivity"}


def rouge_vs_noise(data: ReportData) -> Figure | None:
    noisy = [r for r in data.attacks if r.noise is not None and r.noise.value > 0]
    families = [f for f in NOISE_AXES if any(r.noise and r.noise.family == f for r in noisy)]
    if not families:
        return None
    fig = Figure(figsize=(7 * len(families), 4.2))
    for i, family in enumerate(families):
        ax = fig.add_subplot(1, len(families), i + 1)
        runs = [r for r in noisy if r.noise and r.noise.family == family]
        legend = ["attack", *_varying(runs, ("victim", "data", "batch_size"))]
        series: dict[str, list[AttackRun]] = defaultdict(list)
        for r in runs:
            series[_label(r, legend)].append(r)
        for j, (label, rs) in enumerate(sorted(series.items())):
            by_level: dict[float, list[AttackRun]] = defaultdict(list)
            for r in rs:
                by_level[r.noise.value].append(r)  # type: ignore[union-attr]
            levels = sorted(by_level)
            groups = [Group(tuple(by_level[v])) for v in levels]
            style = _style(j)
            color = style["color"]
            _errorbar(ax, levels, groups, label, **style)
            baseline = [
                b for b in data.attacks if not b.defenses and _label(b, legend) == label
            ]  # the same attack with no defence
            if baseline:
                mean = sum(b.scores["rouge1"] for b in baseline) / len(baseline)
                ax.axhline(mean, color=color, linestyle=":", alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel(NOISE_AXES[family])
        ax.set_ylabel("ROUGE-1 (dotted: no defence)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        eps: dict[float, list[float]] = defaultdict(list)
        for r in runs:
            if r.epsilon is not None:
                eps[r.noise.value].append(r.epsilon)  # type: ignore[union-attr]
        if eps:
            twin = ax.twinx()
            xs = sorted(eps)
            twin.plot(xs, [max(eps[x]) for x in xs], "k--", marker="s", label="ε (one release)")
            twin.set_yscale("log")
            twin.set_ylabel(f"ε at δ = {runs[0].delta:g} ({runs[0].accountant}), dashed")
        else:
            ax.set_title(f"{NO_DP}: noise on an unclipped update", fontsize=9)
        if eps:
            ax.set_title("Leakage and ε against noise")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ training curves


def training_curves(data: ReportData) -> Figure | None:
    trains = list(data.trains)
    if not trains:
        return None
    fig = Figure(figsize=(13, 3.8))
    loss_ax, acc_ax, eps_ax = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    for i, t in enumerate(trains):
        label = f"{t.victim} {t.data} [{t.chain}] seed {t.seed}"
        color = f"C{i % 10}"
        if t.loss:
            loss_ax.plot(t.steps or range(1, len(t.loss) + 1), _smooth(t.loss), color=color, label=label)
        if t.eval:
            acc_ax.plot([e.step for e in t.eval], [e.accuracy for e in t.eval], marker="o", color=color)
            pts = [(e.step, e.epsilon) for e in t.eval if e.epsilon is not None and e.epsilon > 0]
            if pts:
                eps_ax.plot(*zip(*pts, strict=True), marker=".", color=color)
    loss_ax.set(xlabel="step", ylabel="minibatch loss (smoothed)", title="Training loss")
    acc_ax.set(xlabel="step", ylabel="held-out accuracy", title="Utility")
    eps_ax.set(xlabel="step", ylabel="ε spent", title="Privacy spent")
    for ax in (loss_ax, acc_ax, eps_ax):
        ax.grid(alpha=0.3)
    loss_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _smooth(values: Sequence[float], window: int = 5) -> list[float]:
    """Mean of the last `window` finite values (a NaN, an empty Poisson draw's loss, is skipped)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


# ------------------------------------------------------------------ the frontier


def _eps_positions(values: Sequence[float | None]) -> tuple[list[float], float]:
    finite = [v for v in values if v is not None]
    inf_at = (max(finite) * 10 if finite else 10.0) if any(v is None for v in values) else math.nan
    return [v if v is not None else inf_at for v in values], inf_at


def frontier(data: ReportData) -> Figure | None:
    groups = data.groups()
    if not groups or len({g.first.defenses for g in groups}) < 2 and not data.trains:
        return None
    panels = 1 + (1 if data.trains else 0) + (1 if data.trains and groups else 0)
    fig = Figure(figsize=(5.5 * panels, 4.2))
    ax = fig.add_subplot(1, panels, 1)
    xs, inf_at = _eps_positions([g.epsilon for g in groups])
    by_attack: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for x, g in zip(xs, groups, strict=True):
        by_attack[g.first.attack].append((x, g.mean("rouge1")))
    for j, (attack, pts) in enumerate(sorted(by_attack.items())):
        pts.sort()
        ax.plot(*zip(*pts, strict=True), linestyle="", label=attack, **_style(j))
    ax.set_xscale("log")
    _mark_inf(ax, inf_at)
    ax.set(xlabel="ε of one release (log)", ylabel="ROUGE-1 (leakage)", title="Leakage against privacy")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if data.trains:
        ax2 = fig.add_subplot(1, panels, 2)
        trains = [t for t in data.trains if t.final_accuracy is not None]
        txs, tinf = _eps_positions([t.epsilon for t in trains])
        for x, t in zip(txs, trains, strict=True):
            ax2.plot([x], [t.final_accuracy], marker="o", color="C0")
            ax2.annotate(
                t.chain, (x, t.final_accuracy or 0), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax2.set_xscale("log")
        _mark_inf(ax2, tinf)
        ax2.set(
            xlabel="ε of the training run (log)", ylabel="held-out accuracy", title="Utility against privacy"
        )
        ax2.grid(alpha=0.3)
        if groups:
            _leakage_utility(fig.add_subplot(1, panels, 3), groups, data.trains)
    fig.tight_layout()
    return fig


def _mark_inf(ax, inf_at: float) -> None:
    if not math.isnan(inf_at):
        ax.axvline(inf_at, color="grey", linestyle=":", alpha=0.6)
        ax.annotate(
            NO_DP,
            (inf_at, 0.5),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            ha="right",
            va="center",
            rotation=90,
        )


def _leakage_utility(ax, groups: Sequence[Group], trains: Sequence[TrainRun]) -> None:
    """Per defence chain: the strongest attack's ROUGE-1 against the utility of training with it,
    with the Pareto front (low leakage, high utility)."""
    leak: dict[tuple[str, str, tuple[str, ...]], float] = {}
    for g in groups:
        k = (g.first.victim, g.first.data, g.first.defenses)
        leak[k] = max(leak.get(k, 0.0), g.mean("rouge1"))
    pts = []
    for t in trains:
        k = (t.victim, t.data, t.defenses)
        if k in leak and t.final_accuracy is not None:
            pts.append((leak[k], t.final_accuracy, t.chain))
    for x, y, chain in pts:
        ax.plot([x], [y], marker="o", color="C1")
        ax.annotate(chain, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = _pareto([(x, y) for x, y, _ in pts])
    if len(front) > 1:
        ax.step(*zip(*front, strict=True), where="post", color="C1", alpha=0.6, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set(
        xlabel="ROUGE-1 of the strongest attack", ylabel="held-out accuracy", title="Utility against leakage"
    )
    if not pts:
        ax.set_title("Utility against leakage: no training run shares an attack's defences", fontsize=9)
    ax.grid(alpha=0.3)


def _pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both low leakage (x) and high utility (y)."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


# ------------------------------------------------------------------ the audit: threshold and bound


def _chain_epsilon(data: ReportData) -> dict[tuple[str, ...], float | None]:
    """The one-release epsilon of each defence chain the attack runs used."""
    out: dict[tuple[str, ...], float | None] = {}
    for r in data.attacks:
        out.setdefault(r.defenses, r.epsilon)
    return out


def _mark_thresholds(ax, marks: Sequence[ThresholdMark], colors: dict[str, str]) -> None:
    for m in marks:
        if m.status == "stops" and m.epsilon is not None and m.strength is not None:
            ax.axvline(
                m.epsilon,
                color=colors.get(m.attack, "k"),
                linestyle="--",
                alpha=0.8,
                label=f"{m.attack} stops: {m.defence} {m.strength:.3g}, ε {m.epsilon:.3g}",
            )


def threshold_plot(data: ReportData) -> Figure | None:
    """Leakage of each attack, and held-out accuracy, against the one-round epsilon of the scanned
    defence, each attack's threshold marked; runs with no finite epsilon at the right edge."""
    if not data.thresholds:
        return None
    runs = list(data.attacks)
    if not any(r.epsilon is not None for r in runs):
        return None
    chain_eps = _chain_epsilon(data)
    trains = [t for t in data.trains if t.final_accuracy is not None and t.defenses in chain_eps]
    panels = 2 if trains else 1
    fig = Figure(figsize=(6.5 * panels, 4.4))
    ax = fig.add_subplot(1, panels, 1)
    xs, inf_at = _eps_positions([r.epsilon for r in runs])
    attacks = sorted({r.attack for r in runs})
    colors = {a: f"C{j % 10}" for j, a in enumerate(attacks)}
    for j, attack in enumerate(attacks):
        pts = sorted(
            (x, r.scores["rouge1"], r.scores["exact_match"])
            for x, r in zip(xs, runs, strict=True)
            if r.attack == attack
        )
        style = _style(j)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{attack}: ROUGE-1", **style)
        ax.plot(
            [p[0] for p in pts],
            [p[2] for p in pts],
            linestyle=":",
            color=style["color"],
            marker="x",
            label=f"{attack}: exact match %",
        )
    ax.axhline(data.thresholds[0].leak_rouge1, color="grey", linewidth=0.8, alpha=0.6)
    ax.set_xscale("log")
    _mark_inf(ax, inf_at)
    _mark_thresholds(ax, data.thresholds, colors)
    ax.set(xlabel="ε of one round (log; right edge: no defence)", ylabel="leakage (0-100)")
    ax.set_title("Where the leak stops")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left")
    if trains:
        ax2 = fig.add_subplot(1, 2, 2)
        txs, tinf = _eps_positions([chain_eps[t.defenses] for t in trains])
        pts = sorted(
            zip(txs, [100 * (t.final_accuracy or 0) for t in trains], [t.chain for t in trains], strict=True)
        )
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color="C2", linestyle="")
        for x, y, chain in pts:
            ax2.annotate(chain, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax2.set_xscale("log")
        if not math.isnan(inf_at):
            ax2.set_xlim(ax.get_xlim())
        _mark_inf(ax2, tinf)
        _mark_thresholds(ax2, data.thresholds, colors)
        ax2.set(
            xlabel="ε of one round of the same defence (log)",
            ylabel="held-out accuracy % after the short training run",
            title="Utility of training under that noise",
        )
        ax2.grid(alpha=0.3)
        ax2.margins(x=0.08, y=0.25)
        ax2.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def bound_plot(data: ReportData) -> Figure | None:
    """Per DP run: the reconstruction success DP allows at the prior (line) and the measured success."""
    if not data.bounds:
        return None
    pts = sorted(data.bounds, key=lambda b: b.epsilon)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    curve = list(data.bound_curve) or sorted({(b.epsilon, b.bound) for b in pts})
    ax.plot(
        [e for e, _ in curve],
        [100 * b for _, b in curve],
        "k-",
        label="bound: the most any attack can recover",
    )
    for j, attack in enumerate(sorted({b.attack for b in pts})):
        mine = [b for b in pts if b.attack == attack]
        style = _style(j)
        style.pop("markersize")
        ax.plot(
            [b.epsilon for b in mine],
            [100 * b.measured for b in mine],
            linestyle="",
            markersize=9,
            label=f"{attack}: measured (sentences exact)",
            **style,
        )
    ax.axhline(100 * pts[0].prior, color="grey", linestyle=":", label=f"prior κ = {pts[0].prior:.3g}")
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.set(
        xlabel="ε of one round (log)",
        ylabel="reconstruction success % (per sentence)",
        title="What ε promises about reconstruction",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def canary_plot(data: ReportData) -> Figure | None:
    """The canary audit: the epsilon the attack certifies (with the most its trials could certify)
    against the accountant's upper bound, on one log axis."""
    c = data.canary
    if c is None:
        return None
    fig = Figure(figsize=(7, 2.8))
    ax = fig.add_subplot()
    finite = [v for v in (c.lower, c.ceiling, c.upper) if v is not None and v > 0]
    left = min(finite) / 3 if finite else 0.1
    right = max(finite) * 3 if finite else 10.0
    lower = f"lower bound {c.lower:.3g}, {c.attack} attack ({c.trials} trials, {c.confidence:.0%})"
    if c.lower > 0:
        ax.barh([1], [c.lower - left], left=left, height=0.5, color="C3", alpha=0.7, label=lower)
    else:
        ax.text(left * 1.15, 1, f"{lower}: nothing certified", va="center", fontsize=9, color="C3")
    ax.plot([c.ceiling], [1], "k|", markersize=20, label=f"the most {c.trials} trials can certify")
    if c.upper is not None:
        ax.barh([0], [c.upper - left], left=left, height=0.5, color="C0", alpha=0.7,
                label=f"upper bound {c.upper:.3g}: {c.accountant} accountant")  # fmt: skip
    else:
        ax.text(left * 1.15, 0, f"accountant: {NO_DP}", va="center", fontsize=9, color="C0")
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ax.set_ylim(-0.6, 1.6)
    ax.set_yticks([0, 1], ["accountant", "canary audit"])
    ax.set(xlabel="ε of one release (log; replace-one)", title=f"What the attack proves about ε: {c.defence}")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    return fig


# ------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Plot:
    title: str
    draw: Callable[[ReportData], Figure | None]
    caption: str
    missing: str


PLOTS: tuple[Plot, ...] = (
    Plot(
        "Where the leak stops",
        threshold_plot,
        "Left: each attack's ROUGE-1 (solid) and percentage of sentences recovered exactly (dotted) against "
        "the one-round ε of the audited defence as the scan moved its strength; dashed verticals: where each "
        "attack's leak stops; grey: ROUGE-1 20. Right: held-out accuracy after the short training run under "
        "the same defence.",
        "No threshold scan of a DP defence in this store (gradleak audit makes one).",
    ),
    Plot(
        "What ε promises about reconstruction",
        bound_plot,
        "For each DP run, the largest per-sentence reconstruction success any attack can have at the prior "
        "κ (hypothesis-testing bound, Hayes, Mahloujifar & Balle 2023), and the success measured: the "
        "fraction of sentences recovered exactly.",
        "No reconstruction bounds in this store (gradleak audit computes them).",
    ),
    Plot(
        "What the attack proves about ε",
        canary_plot,
        "Canary audit of the audited defence: over independent trials a canary sentence is in the batch or "
        "not at random and the attack's reconstruction decides which; Clopper-Pearson limits on its two "
        "error rates give a lower bound on ε (red; the tick: the most that many trials can certify), to "
        "hold against the accountant's upper bound (blue) for the same release.",
        "No canary audit in this store's report (gradleak audit runs one; gradleak privacy audit alone).",
    ),
    Plot(
        "ROUGE against batch size",
        rouge_vs_batch,
        "Mean ROUGE-1 over seeds (bars: one standard deviation), one line per attack.",
        "The store has attack runs at fewer than two batch sizes.",
    ),
    Plot(
        "ROUGE against noise, with ε",
        rouge_vs_noise,
        "ROUGE-1 against the defence's noise (solid), the ε of that one release (dashed, right axis), "
        "and the same attack without a defence (dotted).",
        "The store has no runs with a noise defence (gaussian, laplace or dp-sgd).",
    ),
    Plot(
        "Training curves",
        training_curves,
        "Minibatch loss, held-out accuracy and ε spent along each training run.",
        "The store has no training runs.",
    ),
    Plot(
        "Privacy, utility and leakage",
        frontier,
        "Leakage (ROUGE-1) against ε for each defence; with training runs, utility against ε and "
        "utility against leakage with its Pareto front.",
        "The store has attack runs under fewer than two defence settings and no training runs.",
    ),
)
