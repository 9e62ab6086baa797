"""plots: every method of a figure has its own colour and marker, and equal lines stay apart."""

import pandas as pd

from fpl_bench.report.leaderboard import summarize
from fpl_bench.report.plots import accuracy_vs_eps, dodge, method_styles
from tests.report.conftest import make_records

ELEVEN = [f"method{i}" for i in range(11)]


def test_eleven_methods_get_eleven_colours_and_markers():
    styles = method_styles(ELEVEN)
    assert len({s["color"] for s in styles.values()}) == 11
    assert len({s["marker"] for s in styles.values()}) == 11
    assert method_styles(ELEVEN[:3]) == {m: styles[m] for m in ELEVEN[:3]}  # stable by order


def test_equal_methods_are_nudged_apart_around_the_tick():
    offsets = [dodge(i, 11) for i in range(11)]
    assert len(set(offsets)) == 11 and abs(sum(offsets)) < 1e-9
    assert max(offsets) < 0.5  # never reaches the next eps


def test_a_figure_of_eleven_methods_renders():
    base = make_records()
    base = base[base["method"] == "promptfl"]
    rows = pd.concat(
        [base.assign(method=name, mlflow_run_id=base["mlflow_run_id"] + name) for name in ELEVEN]
    )
    board = summarize(rows)
    png = accuracy_vs_eps(board, "eleven methods")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
