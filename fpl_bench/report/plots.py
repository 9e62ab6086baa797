"""Leaderboard figures as PNG bytes (matplotlib's object API with the Agg canvas: no pyplot, no
global backend, safe in threads and tests).

- accuracy vs eps: one panel per metric of the protocol, one line per method, eps as ordered
  categories ('no DP', then from the largest budget down), error bars = std over seeds (none
  for a single seed).

Every method has its own colour and marker (`method_styles`, distinct up to 20 methods), lines
are slightly transparent and nudged apart along x (`dodge`), so methods with equal numbers do
not hide each other; the legend sits under the panels.
- base vs novel (base2novel only): one point per (method, eps), a colour per method and a
  marker per eps, zoomed to the data, dotted curves of equal HM.
- attack success vs eps (where the runs were audited; the DP-FPL paper's plot): one panel per
  membership attack, the mean balanced accuracy (%) of each method against eps, error bars =
  std over seeds, chance (50%) dashed; and, where the canary attack ran, a panel of its lower
  bound on epsilon per method against the claimed epsilon (grey crosses).
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from fpl_bench.report.leaderboard import METRIC_LABELS
from fpl_bench.report.markdown import eps_header
from fpl_bench.report.records import protocol_metrics, sorted_eps

DPI = 100
PANELS_PER_ROW = 3
MIN_SPAN = 10.0  # percentage points: a flat line is not blown up to fill the panel
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p", "d", "8", "H")
DODGE = 0.05  # x offset between neighbouring methods, in eps steps: equal values stay visible
LINE_ALPHA = 0.8  # lines drawn over each other stay visible through the top one


def method_styles(methods: list[str]) -> dict[str, dict[str, object]]:
    """A colour and a marker per method, all distinct up to 20 methods (tab20, its ten darker
    shades first so that up to ten methods get ten different hues), in `methods` order, so the
    same job's figures colour a method alike."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    colors = [*palette[0::2], *palette[1::2]]
    return {
        method: {
            "color": colors[i % len(colors)],
            "marker": MARKERS[i % len(MARKERS)],
            "alpha": LINE_ALPHA,
            "markeredgecolor": "white",
            "markeredgewidth": 0.6,
        }
        for i, method in enumerate(methods)
    }


def dodge(index: int, count: int) -> float:
    """The x offset of method `index` of `count`, centred on the tick."""
    return (index - (count - 1) / 2) * DODGE


def legend_below(figure, ax, columns: int) -> None:
    """One legend for the figure, under the panels (inside, 11 methods hide the lines)."""
    handles, labels = ax.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=8)


def widen(ax, span: float) -> None:
    """Widen the y range of `ax` to at least `span`, around its centre."""
    low, high = ax.get_ylim()
    if high - low < span:
        centre = (low + high) / 2
        ax.set_ylim(centre - span / 2, centre + span / 2)


def _png(figure) -> bytes:
    """Render a matplotlib Figure to PNG bytes (no timestamp, so the same input gives the same
    bytes)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def accuracy_vs_eps(part: pd.DataFrame, title: str) -> bytes:
    """Accuracy (%) against eps for every method of one (dataset, protocol, trust)."""
    from matplotlib.figure import Figure

    metrics = protocol_metrics(str(part["protocol"].iloc[0]))
    eps_values = sorted_eps(part["eps"])
    methods = list(dict.fromkeys(part["method"]))
    styles = method_styles(methods)
    columns = min(len(metrics), PANELS_PER_ROW)
    n_rows = -(-len(metrics) // columns)
    legend_columns = min(len(methods), 3 * columns)
    legend_rows = -(-len(methods) // legend_columns)
    figure = Figure(
        figsize=(3.4 * columns + 0.6, 3.0 * n_rows + 0.4 + 0.25 * legend_rows),
        layout="constrained",
    )
    grid = figure.subplots(n_rows, columns, squeeze=False).ravel()
    for unused in grid[len(metrics) :]:
        unused.set_visible(False)
    axes = grid[: len(metrics)]
    positions = np.arange(len(eps_values))
    for ax, metric in zip(axes, metrics, strict=True):
        rows = part[part["metric"] == metric].set_index(["method", "eps"])
        for index, method in enumerate(methods):
            means = [
                100 * rows["mean"].get((method, e), np.nan) for e in eps_values
            ]  # NaN: not run or diverged, a gap in the line
            stds = [  # one seed has no spread: no bar
                100 * rows["std"].get((method, e), np.nan)
                if rows["n_seeds"].get((method, e), 0) > 1
                else np.nan
                for e in eps_values
            ]
            ax.errorbar(
                positions + dodge(index, len(methods)),
                means,
                yerr=stds,
                capsize=2,
                elinewidth=0.8,
                markersize=6,
                linewidth=1.2,
                label=method,
                **styles[method],
            )
        ax.set_xticks(positions, [eps_header(e) for e in eps_values])
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        widen(ax, MIN_SPAN)
    legend_below(figure, axes[0], legend_columns)
    figure.suptitle(title, fontsize=10)
    return _png(figure)


EPS_MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # no DP, then from the largest budget down
ZOOM_MARGIN = 3.0  # percentage points around the data in the base-vs-novel panel


def base_vs_novel(part: pd.DataFrame, title: str) -> bytes:
    """Novel against base accuracy (%): one colour per method, epsilon by marker (a second
    legend), a method's points joined in eps order; zoomed to the data, with dotted curves of
    equal HM every 5 points across the visible range; no text on the points."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    wide = part[part["metric"].isin(["base_acc", "novel_acc"])].pivot_table(
        index=["method", "eps"], columns="metric", values="mean", sort=False
    )
    methods = list(dict.fromkeys(part["method"]))
    styles = method_styles(methods)
    eps_values = sorted_eps(part["eps"])
    eps_marker = {e: EPS_MARKERS[i % len(EPS_MARKERS)] for i, e in enumerate(eps_values)}
    legend_columns = min(len(methods), 4)
    legend_rows = -(-len(methods) // legend_columns) + 1
    figure = Figure(figsize=(5.4, 4.6 + 0.25 * legend_rows), layout="constrained")
    ax = figure.subplots()
    shown_points = []
    for method in methods:
        if method not in wide.index.get_level_values(0):
            continue
        points = wide.loc[method].reindex(sorted_eps(wide.loc[method].index))
        points = points.dropna(how="any") if {"base_acc", "novel_acc"} <= set(points) else None
        if points is None or points.empty:
            continue
        style = {k: v for k, v in styles[method].items() if k != "marker"}
        x, y = 100 * points["base_acc"], 100 * points["novel_acc"]
        ax.plot(x, y, "-", linewidth=1.0, label=method, color=style["color"], alpha=0.6)
        for eps, bx, ny in zip(points.index, x, y, strict=True):
            ax.plot([bx], [ny], linestyle="none", markersize=6, marker=eps_marker[eps], **style)
        shown_points += list(zip(x, y, strict=True))
    if shown_points:
        xs, ys = np.array(shown_points).T
        low = min(xs.min(), ys.min()) - ZOOM_MARGIN
        high = max(xs.max(), ys.max()) + ZOOM_MARGIN
        low, high = max(low, 0.0), min(high, 100.0)
        if high - low < MIN_SPAN:
            centre = (low + high) / 2
            low, high = centre - MIN_SPAN / 2, centre + MIN_SPAN / 2
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        grid = np.linspace(max(low, 1e-3), high, 200)
        for hm in range(5 * int(low // 5), int(high) + 5, 5):
            if hm <= 0:
                continue
            novel = hm * grid / (2 * grid - hm)  # HM = 2 B N / (B + N), solved for N
            keep = (2 * grid > hm) & (novel >= low) & (novel <= high)
            if keep.sum() < 2:
                continue
            ax.plot(grid[keep], novel[keep], ":", color="0.75", linewidth=0.8)
            ax.annotate(
                f"HM {hm}",
                (grid[keep][-1], novel[keep][-1]),
                fontsize=6,
                color="0.5",
                xytext=(-2, 2),
                textcoords="offset points",
                ha="right",
            )
    ax.set_xlabel("base accuracy %")
    ax.set_ylabel("novel accuracy %")
    ax.set_aspect("equal", adjustable="box")
    ax.grid(alpha=0.3)
    legend_below(figure, ax, legend_columns)
    ax.legend(
        handles=[
            Line2D([], [], linestyle="none", marker=eps_marker[e], color="0.3", label=eps_header(e))
            for e in eps_values
        ],
        loc="lower right",
        fontsize=7,
        title="ε",
        title_fontsize=7,
    )
    ax.set_title(title, fontsize=10)
    return _png(figure)


CANARY_ATTACK = "canary"  # report/audits.py's: its rows bound epsilon, the others infer membership
ATTACK_LABELS = {
    "loss": "loss-threshold attack",
    "shadow": "shadow-model attack (DP-FPL)",
    "input": "input canaries (black-box)",
}


def attack_vs_eps(summary: pd.DataFrame, methods: list[str], title: str) -> bytes:
    """Membership-attack success (balanced accuracy, %) against eps per method, a panel per
    attack, and the canary audit's epsilon lower bound against the claimed eps where it ran;
    `summary`: report/audits.py `audit_summary` rows of one table, `methods` in table order."""
    from matplotlib.figure import Figure

    attacks = [a for a in dict.fromkeys(summary["attack"]) if a != CANARY_ATTACK]
    bounds = summary[(summary["attack"] == CANARY_ATTACK) & summary["eps_lower"].notna()]
    panels = [*attacks, *([CANARY_ATTACK] if len(bounds) else [])]
    all_eps = sorted_eps(summary["eps"])
    styles = method_styles(methods)
    shown = [m for m in methods if m in set(summary["method"])]
    columns = max(1, min(len(panels), PANELS_PER_ROW))
    n_rows = -(-len(panels) // columns)
    legend_columns = max(1, min(len(shown), 3 * columns))
    legend_rows = -(-len(shown) // legend_columns)
    figure = Figure(
        figsize=(3.4 * columns + 0.6, 3.0 * n_rows + 0.4 + 0.25 * legend_rows),
        layout="constrained",
    )
    grid = figure.subplots(n_rows, columns, squeeze=False).ravel()
    for unused in grid[len(panels) :]:
        unused.set_visible(False)
    for ax, panel in zip(grid, panels, strict=False):
        rows = summary[summary["attack"] == panel].set_index(["method", "eps"])
        # the bound exists for private cells only: its panel has no 'no DP' column
        eps_values = [e for e in all_eps if panel != CANARY_ATTACK or e != "none"]
        positions = np.arange(len(eps_values))
        column = "eps_lower" if panel == CANARY_ATTACK else "balanced_acc"
        scale = 1.0 if panel == CANARY_ATTACK else 100.0
        for index, method in enumerate(shown):
            values = [scale * rows[column].get((method, e), np.nan) for e in eps_values]
            spread = [
                scale * rows["balanced_acc_std"].get((method, e), np.nan)
                if panel != CANARY_ATTACK and rows["n_seeds"].get((method, e), 0) > 1
                else np.nan
                for e in eps_values
            ]
            ax.errorbar(
                positions + dodge(index, len(shown)),
                values,
                yerr=spread,
                capsize=2,
                elinewidth=0.8,
                markersize=6,
                linewidth=1.2,
                label=method,
                **styles[method],
            )
        if panel == CANARY_ATTACK:
            claimed = [np.nan if e == "none" else float(e) for e in eps_values]
            ax.plot(positions, claimed, "x", color="0.4", markersize=8, label="_claimed ε")
            ax.set_title("canary audit: ε lower bound (× claimed ε)", fontsize=9)
            ax.set_ylabel("ε")
            top = np.nanmax([*claimed, *rows[column].to_numpy(dtype=float)])
            ax.set_ylim(0, 1.15 * top)
        else:
            ax.axhline(50, linestyle="--", color="0.5", linewidth=0.8)
            ax.set_title(ATTACK_LABELS.get(panel, panel), fontsize=9)
            ax.set_ylabel("balanced accuracy %")
            widen(ax, MIN_SPAN)
        ax.set_xticks(positions, [eps_header(e) for e in eps_values])
        ax.set_xlim(-0.5, len(eps_values) - 0.5)
        ax.grid(alpha=0.3)
    legend_below(figure, grid[0], legend_columns)
    figure.suptitle(f"{title}: membership inference and canary audit", fontsize=10)
    return _png(figure)


def figures(
    part: pd.DataFrame, title: str, stem: str, audit: pd.DataFrame | None = None
) -> dict[str, bytes]:
    """The PNGs of one (dataset, protocol, trust), keyed by file name; `audit` (its
    `audit_summary` rows) adds the attack-success figure."""
    out = {f"{stem}-accuracy-vs-eps.png": accuracy_vs_eps(part, title)}
    if str(part["protocol"].iloc[0]) == "base2novel":
        out[f"{stem}-base-vs-novel.png"] = base_vs_novel(part, title)
    if audit is not None:
        canary = audit["attack"] == CANARY_ATTACK
        audit = audit[
            (canary & audit["eps_lower"].notna()) | (~canary & audit["balanced_acc"].notna())
        ]
        if not audit.empty:
            methods = list(dict.fromkeys(part["method"]))
            out[f"{stem}-attack-vs-eps.png"] = attack_vs_eps(audit, methods, title)
    return out
