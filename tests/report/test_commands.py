"""`fpl-bench leaderboard` and `fpl-bench regress` end to end: files, exit codes 0 / 1 / 2."""

import shutil

import pandas as pd
import pytest

from fpl_bench.report.build import write_leaderboard
from fpl_bench.report.records import write_results
from tests.cli import run_cli
from tests.report.conftest import make_records


@pytest.fixture(scope="module")
def baseline_template(tmp_path_factory):
    """A leaderboard CSV of the hand-built records, made once per module."""
    out = tmp_path_factory.mktemp("template")
    return write_leaderboard(make_records(), out=out, name="embedded", png=False).csv


@pytest.fixture
def baseline(baseline_template, tmp_path):
    """A fresh copy of the template: leaderboards/embedded.csv, made from the same runs."""
    path = tmp_path / "leaderboards" / "embedded.csv"
    path.parent.mkdir()
    shutil.copy(baseline_template, path)
    return path


def test_leaderboard_writes_named_outputs(runs_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "leaderboards"
    args = ["leaderboard", "--runs", str(runs_dir), "--out", str(out), "--name", "embedded"]
    code, stdout, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert f"wrote {out / 'embedded.md'}" in stdout
    assert {p.name for p in out.iterdir()} == {
        "embedded.md",
        "embedded.csv",
        "embedded.html",
        "embedded-plots",
    }
    assert (out / "embedded-plots" / "caltech101-personalized-server-accuracy-vs-eps.png").is_file()


def test_leaderboard_default_out_is_the_runs_folder(runs_dir, capsys, monkeypatch):
    code, stdout, _ = run_cli(
        ["leaderboard", "--runs", str(runs_dir), "--no-png"], capsys, monkeypatch
    )
    assert code == 0 and "read 12 run(s)" in stdout
    assert (runs_dir / "leaderboard.md").is_file() and not (runs_dir / "leaderboard-plots").exists()


def leaderboard_files(runs, out, capsys, monkeypatch, *extra):
    """Run `fpl-bench leaderboard` on `runs` into `out` (name embedded, no PNG); its CSV text
    and the Markdown's tables (the lines after the source line, which names the folder)."""
    args = ["leaderboard", "--runs", str(runs), "--out", str(out), "--name", "embedded"]
    code, stdout, err = run_cli([*args, "--no-png", *extra], capsys, monkeypatch)
    assert code == 0, err
    tables = (out / "embedded.md").read_text().split("\n| ", 1)[1]
    return (out / "embedded.csv").read_text(), tables, stdout


def split_runs(records, tmp_path, method):
    """Two run folders: the rows of `method`, and the others."""
    mine = records["method"] == method
    write_results(records[~mine], tmp_path / "earlier" / "results.csv")
    write_results(records[mine], tmp_path / "added" / "results.csv")
    return tmp_path / "earlier", tmp_path / "added"


def test_leaderboard_add_to_equals_the_leaderboard_of_all_runs(
    records, runs_dir, tmp_path, capsys, monkeypatch
):
    # hashes of digits only with a leading zero must come back as they were written
    records = records.assign(config_hash="0123", setup_hash="0042")
    write_results(records, runs_dir / "results.csv")
    whole = leaderboard_files(runs_dir, tmp_path / "whole", capsys, monkeypatch)
    earlier, added = split_runs(records, tmp_path, "dpfpl")
    out = tmp_path / "parts"
    leaderboard_files(earlier, out, capsys, monkeypatch)
    csv, tables, stdout = leaderboard_files(
        added, out, capsys, monkeypatch, "--add-to", str(out / "embedded.csv")
    )
    assert "kept the cells of" in stdout
    assert (csv, tables) == whole[:2]
    assert csv.count("dpfpl,coop,dpfpl,") == 4 and csv.count("promptfl,coop,fedavg,") == 4


def test_leaderboard_add_to_takes_a_cell_the_runs_hold_from_the_runs(
    records, runs_dir, tmp_path, capsys, monkeypatch
):
    leaderboard_files(runs_dir, tmp_path, capsys, monkeypatch)
    rerun = records[records["method"] == "promptfl"].assign(local_acc=0.9)
    write_results(rerun, tmp_path / "rerun" / "results.csv")
    add = ("--add-to", str(tmp_path / "embedded.csv"))
    leaderboard_files(tmp_path / "rerun", tmp_path / "out", capsys, monkeypatch, *add)
    board = pd.read_csv(tmp_path / "out" / "embedded.csv", dtype={"eps": str})
    local = board[board["metric"] == "local_acc"].set_index(["method", "eps"])["mean"]
    # promptfl's cells from the rerun (0.9); dpfpl's kept: (0.70 + 0.71 + 0.75) / 3, seed 2
    # of eps 0.4 diverged: (0.55 + 0.58) / 2
    assert local.to_dict() == pytest.approx(
        {
            ("promptfl", "none"): 0.9,
            ("promptfl", "0.4"): 0.9,
            ("dpfpl", "none"): 0.72,
            ("dpfpl", "0.4"): 0.565,
        }
    )


def write_header_only(folder):
    folder.mkdir(parents=True, exist_ok=True)
    make_records().iloc[:0].to_csv(folder / "results.csv", index=False)
    return folder


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda t: ["--runs", str(t / "nowhere")], "not found"),
        (lambda t: ["--runs", str(write_header_only(t / "empty"))], "holds no runs"),
        (lambda t: ["--tracking-uri", "mongodb://x/y"], "unknown storage scheme 'mongodb'"),
        (lambda t: ["--tracking-uri", f"sqlite:///{t}/none.db"], "not found"),
        (lambda t: ["--runs", str(t), "--name", "a/b"], "--name 'a/b'"),
        (lambda t: ["--add-to", str(t / "none.csv")], "--add-to"),
    ],
)
def test_leaderboard_bad_input_one_line_exit_2(make_args, needle, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["leaderboard", *make_args(tmp_path)], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def regress(baseline, runs_dir, capsys, monkeypatch, *extra):
    args = ["regress", "--baseline", str(baseline), "--runs", str(runs_dir), *extra]
    return run_cli(args, capsys, monkeypatch)


def test_regress_same_runs_exit_0(baseline, runs_dir, capsys, monkeypatch):
    code, out, err = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 0, err
    assert "0 regression(s) in 8 compared cell(s)." in out
    assert (runs_dir / "regression.md").read_text().count("| ok |") == 8


def inflate(baseline, method, eps, metric, by):
    frame = pd.read_csv(baseline, dtype={"eps": str})
    hit = (frame["method"] == method) & (frame["eps"] == eps) & (frame["metric"] == metric)
    assert hit.sum() == 1
    frame.loc[hit, "mean"] += by
    frame.to_csv(baseline, index=False)


def test_regress_inflated_baseline_exit_1_naming_the_row(baseline, runs_dir, capsys, monkeypatch):
    inflate(baseline, "promptfl", "0.4", "local_acc", 0.10)
    code, _, err = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 1
    assert "1 regression(s):" in err
    assert "promptfl caltech101 personalized server eps=0.4 local_acc: 63.00 -> 53.00" in err
    assert "(-10.00 pp" in err
    report = (runs_dir / "regression.md").read_text()
    assert report.count("**regression**") == 1


def test_regress_drop_within_k_std_or_tolerance_passes(baseline, runs_dir, capsys, monkeypatch):
    # promptfl at 0.4: seed std 3.6 points, k = 2 allows 7.2; a 5-point drop passes...
    inflate(baseline, "promptfl", "0.4", "local_acc", 0.05)
    # ...and promptfl's neighbor accuracy has std 0: the 2-point tolerance applies
    inflate(baseline, "promptfl", "none", "neighbor_acc", 0.015)
    code, _, err = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 0, err
    code, _, err = regress(baseline, runs_dir, capsys, monkeypatch, "--k", "1")
    assert code == 1 and "eps=0.4 local_acc" in err
    code, _, err = regress(baseline, runs_dir, capsys, monkeypatch, "--tolerance", "0.01")
    assert code == 1 and "eps=none neighbor_acc" in err


def test_regress_newly_diverged_cell_is_a_regression(baseline, runs_dir, capsys, monkeypatch):
    frame = pd.read_csv(runs_dir / "results.csv", dtype={"eps": str})
    frame.loc[(frame["method"] == "promptfl") & (frame["seed"] == 0), "status"] = "diverged"
    frame.to_csv(runs_dir / "results.csv", index=False)
    code, _, err = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 1 and "4 regression(s):" in err and "status diverged" in err


def rename_method(baseline, old, new):
    frame = pd.read_csv(baseline, dtype={"eps": str})
    frame.loc[frame["method"] == old, "method"] = new
    frame.to_csv(baseline, index=False)


def drop_rows(baseline, **match):
    frame = pd.read_csv(baseline, dtype={"eps": str})
    hit = pd.Series(True, index=frame.index)
    for column, value in match.items():
        hit &= frame[column] == value
    frame[~hit].to_csv(baseline, index=False)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda b, r: b.unlink(), "not found"),
        (lambda b, r: b.write_text("method,eps\ncoop,none\n"), "missing columns"),
        (lambda b, r: b.write_text(""), "is empty"),
        (lambda b, r: drop_columns(b, "config_hash", "rounds"), "records no configuration"),
        (lambda b, r: set_config(r, rounds=10, config_hash="other"), "no run has the config"),
        (lambda b, r: write_header_only(r), "holds no runs"),
        (lambda b, r: (r / "results.csv").unlink(), "has no results.csv"),
        (lambda b, r: (r / "results.csv").write_text("method,seed\ncoop,0\n"), "missing"),
    ],
)
def test_regress_bad_input_exit_2(baseline, runs_dir, change, needle, capsys, monkeypatch):
    change(baseline, runs_dir)
    code, _, err = regress(baseline, runs_dir, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def drop_columns(baseline, *columns):
    frame = pd.read_csv(baseline, dtype={"eps": str})
    frame.drop(columns=list(columns)).to_csv(baseline, index=False)


def set_config(runs_dir, method=None, **values):
    """Give the runs (of `method`, or all) another configuration."""
    frame = pd.read_csv(runs_dir / "results.csv", dtype={"eps": str})
    hit = frame["method"] == method if method else slice(None)
    for column, value in values.items():
        frame.loc[hit, column] = value
    frame.to_csv(runs_dir / "results.csv", index=False)


def test_regress_runs_missing_a_baseline_cell_say_so_and_pass(
    baseline, runs_dir, capsys, monkeypatch
):
    frame = pd.read_csv(runs_dir / "results.csv", dtype={"eps": str})
    frame[~((frame["method"] == "dpfpl") & (frame["eps"] == "0.4"))].to_csv(
        runs_dir / "results.csv", index=False
    )
    code, out, err = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 0, err
    assert "0 regression(s) in 6 compared cell(s); 2 baseline cell(s) with no run of their " in err
    assert out.count("| unmatched (no run of this cell) |") == 2


def test_regress_compares_only_runs_of_the_same_configuration(
    baseline, runs_dir, capsys, monkeypatch
):
    # dpfpl rerun with 1 round and much lower numbers: another configuration, not a regression
    set_config(runs_dir, "dpfpl", rounds=1, config_hash="d1ffe7", local_acc=0.05)
    code, out, err = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 0, err
    assert out.count("| unmatched (runs: rounds 1 (baseline 20)) |") == 4
    assert out.count("| new |") == 4 and out.count("| ok |") == 4
    assert "0 regression(s) in 4 compared cell(s); 4 baseline cell(s)" in err


def test_regress_on_another_configuration_names_the_difference(
    baseline, runs_dir, capsys, monkeypatch
):
    set_config(runs_dir, rounds=10, shots=4, config_hash="other")
    code, _, err = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "baseline: rounds 20" in err and "runs: rounds 10" in err and "shots 4" in err
    assert "`fpl-bench run --suite embedded --out DIR`" in err  # the baseline's own suite


def test_regress_baseline_methods_the_runs_lack_are_unmatched(
    baseline, runs_dir, capsys, monkeypatch
):
    rename_method(baseline, "dpfpl", "fedpgp")
    code, out, err = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 0, err
    assert out.count("fedpgp") == 4 and out.count("| new |") == 4
    assert "regenerate" not in out + err


def test_regress_new_cells_do_not_fail(baseline, runs_dir, capsys, monkeypatch):
    drop_rows(baseline, eps="0.4")
    code, out, _ = regress(baseline, runs_dir, capsys, monkeypatch)
    assert code == 0 and out.count("| new |") == 4


def test_regress_without_runs_needs_recorded_configurations(baseline, capsys, monkeypatch):
    # the hand-built records have no OUT/configs: the leaderboard cannot say how to rerun them
    code, _, err = run_cli(["regress", "--baseline", str(baseline)], capsys, monkeypatch)
    assert code == 2 and "does not record the configuration" in err and "--runs DIR" in err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--methods", "fedpgp"], "--methods fedpgp: not in the baseline; it has promptfl, dpfpl"),
        (["--eps", "0.3"], "--eps 0.3: not in the baseline"),
        (["--seeds", "1"], "--work and --seeds choose what regress runs: not with --runs"),
    ],
)
def test_regress_filters_bad_input_exit_2(baseline, runs_dir, capsys, monkeypatch, extra, needle):
    code, _, err = regress(baseline, runs_dir, capsys, monkeypatch, *extra)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_regress_filters_compare_only_the_chosen_cells(baseline, runs_dir, capsys, monkeypatch):
    code, out, err = regress(baseline, runs_dir, capsys, monkeypatch, "--methods", "dpfpl")
    assert code == 0, err
    assert "0 regression(s) in 4 compared cell(s); 4 new." in err  # promptfl's runs: new
    assert out.count("| ok |") == 4


@pytest.mark.slow
def test_regress_runs_the_baseline_cells_itself(tmp_path, capsys, monkeypatch):
    """A real tiny job -> its leaderboard as baseline -> `regress` with no --runs runs exactly
    the chosen cells (same configuration and seeds) in a work folder and finds the same numbers;
    a second call resumes them instead of running again."""
    job = tmp_path / "job"
    args = ["run", "--methods", "coop,promptfl", "--rounds", "1", "--clients", "2"]
    args += ["--shots", "2", "--seeds", "0,1", "--out", str(job), "--cache-dir", str(tmp_path)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    lb = tmp_path / "lb"
    code, _, err = run_cli(
        ["leaderboard", "--runs", str(job), "--out", str(lb), "--name", "base", "--no-png"],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    board = pd.read_csv(lb / "base.csv", dtype={"eps": str})
    assert (board["seeds"] == "0,1").all() and board["config"].str.startswith("{").all()
    work = tmp_path / "work"
    regress_args = ["regress", "--baseline", str(lb / "base.csv"), "--methods", "coop"]
    regress_args += ["--work", str(work), "--cache-dir", str(tmp_path)]
    code, out, err = run_cli(regress_args, capsys, monkeypatch)
    assert code == 0, err
    assert "0 regression(s) in 5 compared cell(s)." in err
    assert out.count("+0.00 |") == 5  # the same configuration and seeds: the same numbers
    rows = pd.read_csv(work / "results.csv")
    assert sorted(rows["method"]) == ["coop", "coop"] and sorted(rows["seed"]) == [0, 1]
    code, _, err = run_cli(regress_args, capsys, monkeypatch)
    assert code == 0 and "skipped (--resume)" in err


def test_leaderboard_add_to_warns_when_a_cell_loses_seeds(
    records, runs_dir, tmp_path, capsys, monkeypatch
):
    """A cell is replaced, not pooled: runs of other seeds than the earlier cell's leave a
    warning per cell naming the seeds that dropped out (dpfpl's cells held seeds 0-2)."""
    leaderboard_files(runs_dir, tmp_path, capsys, monkeypatch)
    only_two = records[(records["method"] == "dpfpl") & (records["seed"] == 2)]
    write_results(only_two, tmp_path / "seed2" / "results.csv")
    args = ["leaderboard", "--runs", str(tmp_path / "seed2"), "--out", str(tmp_path / "out")]
    add = ["--name", "embedded", "--no-png", "--add-to", str(tmp_path / "embedded.csv")]
    code, _, err = run_cli([*args, *add], capsys, monkeypatch)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: dpfpl caltech101 personalized server eps {eps}: seeds 0,1 of the earlier "
        "cell are not in the runs "
        "(they hold 2): the cell now has the runs' seeds only; to pool them, run the missing "
        "seeds into the same runs folder"
        for eps in ("none", "0.4")
    ]
    rerun = ["leaderboard", "--runs", str(runs_dir), "--out", str(tmp_path / "again")]
    code, _, err = run_cli([*rerun, *add], capsys, monkeypatch)
    assert code == 0 and "warning:" not in err  # the same seeds again: nothing dropped
