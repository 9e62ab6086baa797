"""leaderboard: mean ± std over seeds, bold placement, diverged marks, paper numbers, CSV."""

import math

import pandas as pd
import pytest

from fpl_bench.report.build import write_leaderboard
from fpl_bench.report.leaderboard import (
    LEADERBOARD_COLUMNS,
    cell_status,
    cell_tables,
    dropped_seeds,
    row_ids,
    summarize,
)
from fpl_bench.report.markdown import table_markdown
from fpl_bench.report.records import read_results
from tests.report.conftest import make_records, record


def cell(board, method, eps, metric):
    row = board[(board["method"] == method) & (board["eps"] == eps) & (board["metric"] == metric)]
    assert len(row) == 1
    return row.iloc[0]


def test_summary_mean_std_over_finished_seeds(records):
    board = summarize(records)
    assert list(board.columns) == list(LEADERBOARD_COLUMNS)
    assert len(board) == 2 * 2 * 2  # methods x eps x personalized metrics
    row = cell(board, "promptfl", "0.4", "local_acc")
    assert row["mean"] == pytest.approx(0.53)
    assert row["std"] == pytest.approx(math.sqrt((0.03**2 + 0.01**2 + 0.04**2) / 2))
    assert (row["n_seeds"], row["n_runs"], row["status"]) == (3, 3, "finished")
    diverged = cell(board, "dpfpl", "0.4", "local_acc")
    assert diverged["mean"] == pytest.approx(0.565)  # the diverged 0.10 is left out
    assert diverged["std"] == pytest.approx(math.sqrt(2 * 0.015**2))
    assert (diverged["n_seeds"], diverged["n_runs"], diverged["status"]) == (2, 3, "diverged")
    assert board["eps"].tolist()[::2][:4] == ["none", "none", "0.4", "0.4"]


def test_paper_number_beside_ours_only_in_the_paper_setting(records):
    board = summarize(records)
    assert cell(board, "dpfpl", "none", "local_acc")["paper"] == pytest.approx(0.9606)
    assert cell(board, "promptfl", "0.4", "neighbor_acc")["paper"] == pytest.approx(0.8266)
    client_trust = summarize(make_records(trust="client"))
    assert math.isnan(cell(client_trust, "dpfpl", "0.4", "local_acc")["paper"])
    assert cell(client_trust, "dpfpl", "none", "local_acc")["paper"] == pytest.approx(0.9606)
    other_clients = summarize(make_records(clients=20))
    assert other_clients["paper"].isna().all()


def test_cell_status_worst_of_seeds():
    assert cell_status(pd.Series(["finished", "finished"])) == "finished"
    assert cell_status(pd.Series(["finished", "diverged"])) == "diverged"
    assert cell_status(pd.Series(["diverged", "failed", "finished"])) == "failed"


def test_markdown_numbers_bold_and_marks(records):
    local, neighbor = cell_tables(summarize(records))
    assert local.metric == "local_acc" and local.eps == ["none", "0.4"]
    text = table_markdown(local)
    lines = text.splitlines()
    assert lines[0] == "| method | no DP | ε = 0.4 |"
    # best of 'no DP' is dpfpl; at 0.4 dpfpl's 56.5 is higher but a seed diverged: promptfl
    assert lines[2] == "| promptfl | 62.0 ± 2.0 (94.5) | **53.0 ± 3.6** (82.5) |"
    assert lines[3] == "| dpfpl | **72.0 ± 2.6** (96.1) | 56.5 ± 2.1 [1/3 diverged] (95.7) |"
    neighbor_lines = table_markdown(neighbor).splitlines()
    assert neighbor_lines[2] == "| promptfl | **40.0 ± 0.0** (92.9) | **35.0 ± 0.0** (82.7) |"


def test_markdown_ties_bold_twice_and_unrun_cells_dash():
    rows = make_records()
    rows = rows[~((rows["method"] == "dpfpl") & (rows["eps"] == "0.4"))]
    rows.loc[rows["method"] == "dpfpl", "neighbor_acc"] = 0.40
    local, neighbor = cell_tables(summarize(rows))
    assert table_markdown(local).splitlines()[3].endswith("| — |")
    assert table_markdown(neighbor).count("**40.0 ± 0.0**") == 2


def test_all_seeds_diverged_cell_says_so():
    rows = make_records()
    rows.loc[(rows["method"] == "dpfpl") & (rows["eps"] == "0.4"), "status"] = "failed"
    local, _ = cell_tables(summarize(rows))
    assert table_markdown(local).splitlines()[3].endswith("| failed (95.7) |")


def test_latest_config_wins_per_cell(records):
    rerun = pd.DataFrame([record("promptfl", "none", 0, config_hash="new", local_acc=0.9)])
    board = summarize(pd.concat([records, rerun], ignore_index=True))
    row = cell(board, "promptfl", "none", "local_acc")
    assert row["mean"] == pytest.approx(0.9) and row["n_runs"] == 1


def test_write_leaderboard_files(tmp_path, records):
    written = write_leaderboard(records, out=tmp_path, name="embedded", source="runs/x")
    assert written.markdown == tmp_path / "embedded.md"
    assert "## caltech101 · personalized · server trust" in written.markdown.read_text()
    csv = pd.read_csv(written.csv, dtype={"eps": str})
    assert list(csv.columns) == list(LEADERBOARD_COLUMNS)
    row = csv[(csv["method"] == "dpfpl") & (csv["eps"] == "0.4") & (csv["metric"] == "local_acc")]
    assert row[["mean", "n_seeds", "status", "paper"]].values.tolist() == [
        [0.565, 2, "diverged", 0.9574]
    ]
    assert [p.name for p in written.pngs] == ["caltech101-personalized-server-accuracy-vs-eps.png"]
    for path in written.pngs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_base2novel_writes_the_scatter_too(tmp_path):
    rows = make_records(protocol="base2novel", dataset="synthetic", base_acc=0.6, novel_acc=0.5)
    rows["hm"] = 2 * 0.6 * 0.5 / 1.1
    written = write_leaderboard(rows, out=tmp_path, name="b2n", png=True)
    names = sorted(p.name for p in written.pngs)
    assert names == [
        "synthetic-base2novel-server-accuracy-vs-eps.png",
        "synthetic-base2novel-server-base-vs-novel.png",
    ]
    assert all(p.stat().st_size > 1000 for p in written.pngs)
    assert "(`hm`)" in written.markdown.read_text()
    assert "(9" not in written.markdown.read_text()  # no paper numbers outside its protocol


def test_leaderboard_reads_back_what_run_writes(runs_dir):
    board = summarize(read_results(runs_dir / "results.csv"))
    assert cell(board, "dpfpl", "none", "local_acc")["mean"] == pytest.approx(0.72)


def test_one_seed_shows_its_value_alone_and_the_csv_keeps_std(tmp_path):
    rows = make_records()
    rows = rows[rows["seed"] == 0]
    local, _ = cell_tables(summarize(rows))
    lines = table_markdown(local).splitlines()
    assert lines[2:4] == [
        "| promptfl | 60.0 (94.5) | 50.0 (82.5) |",
        "| dpfpl | **70.0** (96.1) | **55.0** (95.7) |",
    ]
    assert "±" not in table_markdown(local)
    written = write_leaderboard(rows, out=tmp_path, name="one", png=False)
    assert "±</" not in written.html.read_text() and "60.0 ±" not in written.html.read_text()
    csv = pd.read_csv(written.csv, dtype={"eps": str})
    assert (csv["n_seeds"] == 1).all() and (csv["std"] == 0).all()


def test_default_name_titles_the_page_once(tmp_path, records):
    written = write_leaderboard(records, out=tmp_path, png=False)
    assert written.html.name == "leaderboard.html"
    assert "<title>fpl-bench leaderboard</title>" in written.html.read_text()
    assert written.markdown.read_text().startswith("# fpl-bench leaderboard\n")
    named = write_leaderboard(records, out=tmp_path, name="embedded", png=False)
    assert "<title>fpl-bench leaderboard: embedded</title>" in named.html.read_text()


def test_rows_of_another_setup_get_a_table_of_their_own(records, tmp_path):
    # a 1-round dpfpl rerun in the same store: its own setup, never beside the 20-round rows
    rerun = pd.DataFrame(
        [
            record("dpfpl", "none", seed, rounds=1, setup_hash="0ne", config_hash="d1", local_acc=a)
            for seed, a in enumerate((0.9, 0.9, 0.9))
        ]
    )
    board = summarize(pd.concat([records, rerun], ignore_index=True))
    tables = cell_tables(board)
    assert [(t.setup, t.metric) for t in tables] == [
        ("rounds 20", "local_acc"),
        ("rounds 20", "neighbor_acc"),
        ("rounds 1", "local_acc"),
        ("rounds 1", "neighbor_acc"),
    ]
    twenty, one = tables[0], tables[2]
    assert [m for m, _ in twenty.rows] == ["promptfl", "dpfpl"]
    assert twenty.rows[1][1][0].value == "72.0 ± 2.6"  # the 20-round runs only
    assert [m for m, _ in one.rows] == ["dpfpl"] and one.rows[0][1][0].value == "90.0 ± 0.0"
    written = write_leaderboard(
        pd.concat([records, rerun], ignore_index=True), out=tmp_path, name="x", png=False
    )
    text = written.markdown.read_text()
    assert "## caltech101 · personalized · server trust · rounds 20" in text
    assert "## caltech101 · personalized · server trust · rounds 1" in text
    setup = "rounds 1, local_epochs 2, batch_size 32, lr 0.005, clients 10, shots 16"
    assert f"Setup: {setup}, backbone ViT-B-16:openai." in text
    csv = pd.read_csv(written.csv, dtype={"eps": str, "setup_hash": str})
    assert set(csv[csv["method"] == "dpfpl"]["rounds"]) == {1, 20}
    assert csv["config_hash"].notna().all() and "lr" in csv.columns


def test_one_setup_has_no_setup_label(records):
    assert {t.setup for t in cell_tables(summarize(records))} == {""}


def test_dropped_seeds_names_each_cell_once_and_skips_unrecorded_seeds(records):
    """One line per replaced cell (not per metric), seeds in numeric order; an earlier cell
    without recorded seeds, a cell the runs do not hold and an empty frame report nothing."""
    board = summarize(records)
    earlier = board.assign(seeds="0,1,2,10")
    latest = board[board["method"] == "promptfl"].assign(seeds="2")
    lines = dropped_seeds(earlier, latest)
    assert lines == [
        f"promptfl caltech101 personalized server eps {eps}: seeds 0,1,10 of the earlier cell "
        "are not in the runs (they hold 2)"
        for eps in ("none", "0.4")
    ]
    assert dropped_seeds(earlier.assign(seeds=""), latest) == []
    assert dropped_seeds(earlier, latest.iloc[:0]) == []
    assert row_ids(latest.iloc[:0], ["method"]).empty
