"""The field's facts on hand-built leaderboards, and `regress` reporting a lost one."""

import math

import pandas as pd
import pytest

from fpl_bench.report.build import write_leaderboard
from fpl_bench.report.facts import fact_e, facts, lost_facts
from fpl_bench.report.records import write_results
from tests.cli import run_cli
from tests.report.conftest import record

# (method, eps) -> (base, novel, local) means; std 0.01 everywhere
GOOD = {
    ("zeroshot", "none"): (0.70, 0.75, 0.70),
    ("promptfl", "none"): (0.80, 0.65, 0.80),
    ("fedkgcoop", "none"): (0.78, 0.72, 0.79),
    ("promptfl", "0.5"): (0.75, 0.60, 0.74),
    ("fedkgcoop", "0.5"): (0.74, 0.70, 0.75),
}


def board(cells, std=0.01):
    """A leaderboard (long format) of one base2novel table."""
    rows = []
    for (method, eps), (base, novel, local) in cells.items():
        hm = 2 * base * novel / (base + novel)
        for metric, mean in (("base_acc", base), ("novel_acc", novel), ("hm", hm)):
            rows.append((method, eps, metric, mean))
        rows.append((method, eps, "local_acc", local))
    frame = pd.DataFrame(rows, columns=["method", "eps", "metric", "mean"])
    return frame.assign(
        std=std, dataset="synthetic", protocol="base2novel", trust="server", setup_hash="s"
    )


def verdicts(frame):
    return dict(zip(facts(frame)["fact"], facts(frame)["holds"], strict=True))


def test_every_fact_holds_on_a_world_that_shows_them():
    assert verdicts(board(GOOD)) == dict.fromkeys("abcde", "holds")


def test_a_gap_within_the_seed_std_does_not_hold():
    cells = {**GOOD, ("promptfl", "none"): (0.705, 0.65, 0.80)}  # base +0.5 point, std 1
    found = facts(board(cells))
    row = found[found["fact"] == "a"].iloc[0]
    assert row["holds"] == "does not hold"
    assert row["numbers"] == "base_acc: promptfl 70.5 ± 1.0 vs zeroshot 70.0 ± 1.0"


def test_each_fact_fails_where_the_world_breaks_it():
    cells = dict(GOOD)
    cells[("promptfl", "none")] = (0.68, 0.78, 0.80)  # a and b fail
    cells[("fedkgcoop", "none")] = (0.78, 0.60, 0.65)  # c fails, d fails (local 65 < 70)
    cells[("fedkgcoop", "0.5")] = (0.74, 0.70, 0.90)  # e: local rises at eps 0.5
    assert verdicts(board(cells)) == dict.fromkeys("abcde", "does not hold")
    _, text = fact_e(board(cells))
    assert "fedkgcoop local_acc none->0.5 65.0 ± 1.0->90.0 ± 1.0" in text


def test_missing_cells_make_a_fact_not_applicable():
    cells = {k: v for k, v in GOOD.items() if k[0] != "fedkgcoop"}
    assert verdicts(board(cells))["c"] == "n/a"
    assert facts(board({k: v for k, v in GOOD.items() if k[0] != "zeroshot"})).empty


def test_lost_facts_are_those_that_held_and_now_do_not():
    broken = {
        **GOOD,
        ("promptfl", "none"): (0.705, 0.65, 0.8),
        ("promptfl", "0.5"): (0.7, 0.6, 0.74),
    }
    lost = lost_facts(facts(board(GOOD)), facts(board(broken)))
    assert list(lost["fact"]) == ["a"]
    assert lost_facts(facts(board(broken)), facts(board(GOOD))).empty  # a gained fact is fine


def records_of(cells):
    """Results rows: 3 seeds per (method, eps) at mean -1, 0, +1 point (std 1)."""
    rows = []
    for (method, eps), (base, novel, local) in cells.items():
        for seed, jitter in enumerate((-0.01, 0.0, 0.01)):
            b, n = base + jitter, novel + jitter
            row = record("promptfl", "none", seed)  # every column, then this cell's values
            row.update(
                method=method,
                eps=eps,
                protocol="base2novel",
                dataset="synthetic",
                local_acc=local + jitter,
                neighbor_acc=local,
                base_acc=b,
                novel_acc=n,
                hm=2 * b * n / (b + n),
                eps_target=math.nan if eps == "none" else float(eps),
                config_hash=f"c-{method}",
            )
            rows.append(row)
    return pd.DataFrame(rows)


def test_regress_reports_a_lost_fact_as_a_regression(tmp_path, capsys, monkeypatch):
    baseline = write_leaderboard(records_of(GOOD), out=tmp_path, name="base", png=False)
    assert (tmp_path / "base-facts.csv").is_file()
    assert "## The field's facts" in baseline.markdown.read_text()
    runs = tmp_path / "runs"
    runs.mkdir()
    worse = {
        **GOOD,
        ("promptfl", "none"): (0.705, 0.65, 0.8),
        ("promptfl", "0.5"): (0.7, 0.6, 0.74),
    }
    write_results(records_of(worse), runs / "results.csv")
    args = ["regress", "--baseline", str(baseline.csv), "--runs", str(runs), "--tolerance", "0.1"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 1, err
    assert "0 regression(s)" in err  # every cell within the tolerance ...
    assert (
        "fact a (synthetic · base2novel · server) held in the baseline and no longer holds" in err
    )
    assert "no longer hold" in out  # ... but fact a is lost: in regression.md too


@pytest.mark.parametrize("name", ["embedded"])
def test_committed_leaderboard_has_its_facts_table(name):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "leaderboards"
    table = pd.read_csv(root / f"{name}-facts.csv")
    assert list(table["fact"]) == list("abcde")
    assert set(table["holds"]) <= {"holds", "does not hold", "n/a"}
    assert "## The field's facts" in (root / f"{name}.md").read_text()
