"""The field's known facts, checked on a leaderboard: does the benchmark show what prompt
learning is known to do?

Facts from the base-to-novel literature (CoOp, IJCV 2022; CoCoOp, CVPR 2022; KgCoOp, CVPR
2023: one prompt trained on every base class; their federated analogues here are PromptFL and
FedKgCoOp) and from DP training, each over a table's cells without DP unless it says so:

    a  promptfl base_acc  > zeroshot base_acc    a learned prompt beats the hand-written one
                                                 on the classes it was trained on
    b  promptfl novel_acc < zeroshot novel_acc   ... and overfits them: worse on unseen ones
    c  fedkgcoop hm > promptfl hm, and fedkgcoop novel_acc > promptfl novel_acc
                                                 knowledge guidance recovers the novel classes
    d  every trained method's local_acc > zeroshot's
                                                 personalization pays on a client's own classes
    e  every trained method's every metric: mean at no DP >= at the largest eps >= ... >= at
       the smallest eps                          less privacy budget, less accuracy

A comparison holds when its gap exceeds the larger of the two cells' seed standard deviations
(fact e, an ordering of means, when no step goes up by more than that); a fact holds when all
its comparisons hold, and is `n/a` when a cell it needs is missing or has no number.

    >>> gap_holds(left=0.80, right=0.70, left_std=0.02, right_std=0.05)
    True
    >>> gap_holds(left=0.80, right=0.77, left_std=0.02, right_std=0.05)
    False
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from fpl_bench.report.records import NO_DP, sorted_eps

FACT_COLUMNS: tuple[str, ...] = (
    "dataset",
    "protocol",
    "trust",
    "setup_hash",
    "fact",
    "statement",
    "numbers",
    "holds",
)
TRAINED_EXCLUDED = ("zeroshot",)  # methods that train nothing


@dataclass(frozen=True)
class Number:
    """One cell's mean and seed std (fractions), NaN when missing."""

    mean: float
    std: float

    @property
    def missing(self) -> bool:
        return math.isnan(self.mean)

    def text(self) -> str:
        if self.missing:
            return "—"
        std = 0.0 if math.isnan(self.std) else self.std
        return f"{100 * self.mean:.1f} ± {100 * std:.1f}"


def gap_holds(*, left: float, right: float, left_std: float, right_std: float) -> bool:
    """left - right > max(left_std, right_std) (a NaN std counts as 0)."""
    stds = [s for s in (left_std, right_std) if not math.isnan(s)]
    return left - right > max(stds, default=0.0)


def number(table: pd.DataFrame, method: str, metric: str, eps: str = NO_DP) -> Number:
    """The mean and std of (method, metric, eps) in one table's leaderboard rows."""
    row = table[(table["method"] == method) & (table["metric"] == metric) & (table["eps"] == eps)]
    if row.empty or pd.isna(row["mean"].iloc[-1]):
        return Number(math.nan, math.nan)
    return Number(float(row["mean"].iloc[-1]), float(row["std"].iloc[-1]))


def greater(table: pd.DataFrame, left: str, right: str, metric: str) -> tuple[str, str]:
    """('holds' | 'does not hold' | 'n/a', 'left 83.9 ± 1.1 vs right 84.9 ± 0.3')."""
    a, b = number(table, left, metric), number(table, right, metric)
    text = f"{metric}: {left} {a.text()} vs {right} {b.text()}"
    if a.missing or b.missing:
        return "n/a", text
    ok = gap_holds(left=a.mean, right=b.mean, left_std=a.std, right_std=b.std)
    return ("holds" if ok else "does not hold"), text


def combine(results: list[tuple[str, str]]) -> tuple[str, str]:
    """All comparisons of one fact: n/a if any is, else holds only if all do."""
    verdicts = [v for v, _ in results]
    text = "; ".join(t for _, t in results)
    if not results or "n/a" in verdicts:
        return "n/a", text
    return ("holds" if all(v == "holds" for v in verdicts) else "does not hold"), text


def trained_methods(table: pd.DataFrame) -> list[str]:
    return [m for m in dict.fromkeys(table["method"]) if m not in TRAINED_EXCLUDED]


def fact_d(table: pd.DataFrame) -> tuple[str, str]:
    methods = trained_methods(table)
    results = [greater(table, m, "zeroshot", "local_acc") for m in methods]
    verdict, _ = combine(results)
    failing = [m for m, (v, _) in zip(methods, results, strict=True) if v != "holds"]
    zs = number(table, "zeroshot", "local_acc")
    text = f"zeroshot local_acc {zs.text()}; " + (
        f"not above it: {', '.join(failing)}" if failing else f"all {len(methods)} above it"
    )
    return verdict, text


def fact_e(table: pd.DataFrame) -> tuple[str, str]:
    """Means fall (within a seed std) from no DP down to the smallest eps, every trained
    method and metric; lists the steps that go up by more than the larger std."""
    eps_values = sorted_eps(table["eps"])
    if len(eps_values) < 2 or eps_values[0] != NO_DP:
        return "n/a", "needs runs without DP and at some eps"
    rises = []
    checked = 0
    for method in trained_methods(table):
        for metric in dict.fromkeys(table["metric"]):
            numbers = [number(table, method, metric, e) for e in eps_values]
            for i in range(len(eps_values) - 1):
                before, after = numbers[i], numbers[i + 1]
                if before.missing or after.missing:
                    continue
                checked += 1
                if gap_holds(
                    left=after.mean, right=before.mean, left_std=after.std, right_std=before.std
                ):
                    step = f"{eps_values[i]}->{eps_values[i + 1]}"
                    rises.append(f"{method} {metric} {step} {before.text()}->{after.text()}")
    if not checked:
        return "n/a", "no method has numbers at two eps values"
    text = f"{checked} steps checked; " + (
        f"{len(rises)} rise: " + ", ".join(rises[:6]) + (" ..." if len(rises) > 6 else "")
        if rises
        else "none rises"
    )
    return ("does not hold" if rises else "holds"), text


FACTS: tuple[tuple[str, str, Callable[[pd.DataFrame], tuple[str, str]]], ...] = (
    (
        "a",
        "promptfl base > zeroshot base (a learned prompt beats the hand-written one on its "
        "classes)",
        lambda t: greater(t, "promptfl", "zeroshot", "base_acc"),
    ),
    (
        "b",
        "promptfl novel < zeroshot novel (CoOp's overfitting to the base classes)",
        lambda t: greater(t, "zeroshot", "promptfl", "novel_acc"),
    ),
    (
        "c",
        "fedkgcoop HM > promptfl HM and fedkgcoop novel > promptfl novel (knowledge guidance)",
        lambda t: combine(
            [
                greater(t, "fedkgcoop", "promptfl", "hm"),
                greater(t, "fedkgcoop", "promptfl", "novel_acc"),
            ]
        ),
    ),
    (
        "d",
        "every trained method's local accuracy > zeroshot's, without DP (personalization)",
        fact_d,
    ),
    (
        "e",
        "every trained method's accuracy falls as epsilon falls (no DP >= 0.5 >= 0.1, each metric)",
        fact_e,
    ),
)


def facts(leaderboard: pd.DataFrame) -> pd.DataFrame:
    """`FACT_COLUMNS` per (dataset, protocol, trust, setup) table of a leaderboard (the long
    format of `leaderboard.summarize` or a leaderboard CSV) that has a zeroshot row."""
    rows = []
    keys = ["dataset", "protocol", "trust", "setup_hash"]
    for key, table in leaderboard.groupby(keys, sort=False):
        if "zeroshot" not in set(table["method"]) or NO_DP not in set(table["eps"]):
            continue
        for fact, statement, check in FACTS:
            holds, numbers = check(table)
            rows.append(
                {
                    **dict(zip(keys, map(str, key), strict=True)),
                    "fact": fact,
                    "statement": statement,
                    "numbers": numbers,
                    "holds": holds,
                }
            )
    return pd.DataFrame(rows, columns=list(FACT_COLUMNS))


def lost_facts(baseline: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """Facts (`facts` frames) that hold in the baseline and not in the current runs (a fact
    that is n/a in the current runs, e.g. a method left out, is not lost)."""
    keys = ["dataset", "protocol", "trust", "fact"]
    joined = baseline.merge(current, on=keys, suffixes=("_b", "_c"))
    lost = joined[(joined["holds_b"] == "holds") & (joined["holds_c"] == "does not hold")]
    return lost.reset_index(drop=True)


FACTS_TITLE = "The field's facts"
FACTS_LEGEND = (
    "Known behaviour of prompt learning, checked on the tables above (fpl_bench/report/facts.py): "
    "a comparison holds when its gap exceeds the larger seed std of its two cells; n/a when a "
    "cell is missing. `fpl-bench regress` reports a fact that held in the baseline and no "
    "longer holds as a regression."
)


def table_name(row: pd.Series) -> str:
    """'synthetic · base2novel · server' of one facts row."""
    return f"{row['dataset']} · {row['protocol']} · {row['trust']}"


def facts_markdown(frame: pd.DataFrame) -> str:
    """The facts section in Markdown ('' when there are none)."""
    if frame.empty:
        return ""
    lines = [f"## {FACTS_TITLE}", "", FACTS_LEGEND, ""]
    lines += ["| table | fact | statement | numbers (mean ± std, %) | holds |"]
    lines += ["|---|---|---|---|---|"]
    for _, row in frame.iterrows():
        mark = f"**{row['holds']}**" if row["holds"] == "holds" else row["holds"]
        cells = [table_name(row), row["fact"], row["statement"], row["numbers"], mark]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def facts_html(frame: pd.DataFrame) -> str:
    """The facts section as HTML ('' when there are none)."""
    from html import escape

    if frame.empty:
        return ""
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(str(v))}</td>"
            for v in (table_name(r), r["fact"], r["statement"], r["numbers"])
        )
        + (
            f"<td><strong>{escape(r['holds'])}</strong></td></tr>"
            if r["holds"] == "holds"
            else f"<td>{escape(r['holds'])}</td></tr>"
        )
        for _, r in frame.iterrows()
    )
    head = "".join(
        f"<th>{h}</th>" for h in ("table", "fact", "statement", "numbers (mean ± std, %)", "holds")
    )
    return (
        f"<h2>{escape(FACTS_TITLE)}</h2><p>{escape(FACTS_LEGEND)}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    )
