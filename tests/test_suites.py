"""Suites (`leaderboards/<name>.toml`): loading and validation, the DP-FPL grids and their
published numbers, resuming from results.csv, estimates, and one tiny suite run end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from fpl_bench.catalog import list_presets
from fpl_bench.errors import UsageError
from fpl_bench.report.records import RESULT_COLUMNS, write_results
from fpl_bench.suite import (
    cell_flops,
    dry_run_rows,
    format_dry_run,
    list_suites,
    load_suite,
    pending_specs,
    run_suite,
    suite_cells,
)

SHIPPED = ("base2novel", "cross-domain", "dpfpl-table2", "dpfpl-table4", "embedded")


@pytest.fixture(scope="module")
def table2():
    return load_suite("dpfpl-table2")


@pytest.fixture(scope="module")
def table2_rows(table2, tmp_path_factory):
    return dry_run_rows(table2, tmp_path_factory.mktemp("out"))


def test_shipped_suites_are_listed():
    assert set(SHIPPED) <= set(list_suites())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_suite_loads_and_every_cell_has_a_spec(name):
    suite = load_suite(name)
    cells = suite_cells(suite)
    assert cells
    assert len({c.config_hash for c in cells}) == len(
        {(c.grid, c.dataset, c.method.label) for c in cells}
    )
    for cell in cells:
        assert cell.spec.dataset == cell.dataset
        assert cell.method in cell.spec.methods


PAPER_FOUR = {"promptfl", "fedotp", "fedpgp", "dpfpl"}


def test_dpfpl_table2_lists_every_preset_with_paper_numbers_for_the_papers_four(table2_rows):
    others = [r for r in table2_rows if r["method"] not in PAPER_FOUR]
    assert {r["method"] for r in table2_rows} == set(list_presets())
    # the rest of the 34 presets: 4 datasets x eps none / 0.4 / 0.1 x 3 seeds, no paper number
    assert len(others) == (len(list_presets()) - 4) * 4 * 3 * 3 == 1080
    assert {r["eps"] for r in others} == {"none", "0.4", "0.1"}
    assert {r["seed"] for r in others} == {0, 1, 2}
    assert all(r["paper_local_acc"] is None and r["paper_neighbor_acc"] is None for r in others)


@pytest.mark.parametrize("name", ["base2novel", "cross-domain", "embedded", "embedded-client"])
def test_suites_list_every_preset(name):
    """Every preset, but central under client-trust DP (it pools the clients' raw records)."""
    every = set(list_presets()) - ({"central"} if name == "embedded-client" else set())
    assert {c.method.label for c in suite_cells(load_suite(name))} == every


def test_dpfpl_table2_is_96_cells_by_5_seeds_with_paper_numbers(table2_rows):
    table2_rows = [r for r in table2_rows if r["method"] in PAPER_FOUR]
    assert len(table2_rows) == 480
    keys = {(r["method"], r["dataset"], r["eps"]) for r in table2_rows}
    assert len(keys) == 96
    assert {r["seed"] for r in table2_rows} == {0, 1, 2, 3, 4}
    assert {r["method"] for r in table2_rows} == PAPER_FOUR
    assert {r["eps"] for r in table2_rows} == {"none", "0.4", "0.2", "0.1", "0.05", "0.01"}
    for row in table2_rows:
        assert row["paper_local_acc"] is not None and row["paper_neighbor_acc"] is not None
        assert row["status"] == "pending" and row["estimate"].startswith("~")
        assert row["estimate_source"].startswith("model (assumed")
        config = row["config"]
        assert (config["backbone"], config["pretrained"], config["clients"]) == (
            "ViT-B-16",
            "openai",
            10,
        )
        assert (config["rounds"], config["batch_size"], config["n_ctx"]) == (100, 32, 16)
        assert (config["protocol"], config["clip_norm"], config["trust"]) == (
            "personalized",
            10.0,
            "server",
        )


# Read by hand from /work/shared/paper-tables.md (Table 2 local, Table 3 neighbor), in %.
BY_HAND = [
    ("caltech101", "dpfpl", "none", 96.06, 91.54),
    ("oxford_pets", "fedotp", "0.4", 80.03, 60.95),
    ("oxford_flowers", "fedpgp", "0.05", 39.52, 35.27),
    ("food101", "promptfl", "0.01", 67.47, 61.42),
]


@pytest.mark.parametrize(("dataset", "method", "eps", "local", "neighbor"), BY_HAND)
def test_dpfpl_table2_numbers_match_the_paper(table2_rows, dataset, method, eps, local, neighbor):
    rows = [
        r for r in table2_rows if (r["dataset"], r["method"], r["eps"]) == (dataset, method, eps)
    ]
    assert len(rows) == 5
    for row in rows:
        assert row["paper_local_acc"] == pytest.approx(local / 100)
        assert row["paper_neighbor_acc"] == pytest.approx(neighbor / 100)


def test_dpfpl_table4_numbers_follow_the_client_count(tmp_path):
    rows = dry_run_rows(load_suite("dpfpl-table4"), tmp_path)
    assert len(rows) == 2 * 3 * 6 * 5
    by_clients = {
        r["config"]["clients"]: r["paper_local_acc"]
        for r in rows
        if (r["method"], r["eps"], r["seed"]) == ("fedpgp", "0.4", 0)
    }
    assert by_clients == {25: pytest.approx(0.5887), 50: pytest.approx(0.5843)}
    assert all(r["config"]["backbone"] == "RN50" for r in rows)


def test_dry_run_text_lists_every_cell_once(table2, table2_rows):
    text = format_dry_run(table2, table2_rows)
    assert text.splitlines()[0].startswith("suite dpfpl-table2: 1560 cells, 0 done, 1560 to run")
    assert re.search(r"^caltech101  dpfpl  none  0  pending  96\.06  91\.54  ~\S+ ", text, re.M)
    assert re.search(
        r"^estimates: model \(assumed [\d.]+ [GT]FLOP/s on (cpu|cuda)\): 1560 cells", text, re.M
    )
    assert len([line for line in text.splitlines() if "  pending  " in line]) == 1560


# ----------------------------------------------------------------------------- resume


def _record(cell, status: str, wall_s: float = 1.0) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS, math.nan)
    row.update(cell.key, status=status, tuned=False, wall_s=wall_s)
    return row


def test_done_cells_are_skipped_and_failed_ones_rerun(tmp_path):
    suite = load_suite("embedded")
    cells = suite_cells(suite, out=tmp_path)
    finished, failed, diverged = cells[0], cells[1], cells[2]
    rows = [
        _record(finished, "finished", 12.0),
        _record(failed, "failed"),
        _record(diverged, "diverged"),
    ]
    write_results(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)), tmp_path / "results.csv")

    statuses = [r["status"] for r in dry_run_rows(suite, tmp_path)]
    assert statuses[:4] == ["finished", "failed", "diverged", "pending"]
    planned = {
        (m.label, e, s, spec.dataset)
        for spec in pending_specs(suite, tmp_path)
        for m in spec.methods
        for e in spec.eps
        for s in spec.seeds
    }
    expected = {(c.method.label, c.eps, c.seed, c.dataset) for c in cells}
    expected -= {(c.method.label, c.eps, c.seed, c.dataset) for c in (finished, diverged)}
    assert planned == expected  # exactly the pending cells, each once


def test_finished_seed_gives_a_measured_estimate_for_its_siblings(tmp_path):
    suite = load_suite("embedded")
    cells = suite_cells(suite, out=tmp_path)
    done = cells[0]
    write_results(
        pd.DataFrame([_record(done, "finished", 12.0)], columns=list(RESULT_COLUMNS)),
        tmp_path / "results.csv",
    )
    rows = dry_run_rows(suite, tmp_path)
    sibling = next(
        r
        for r, c in zip(rows, cells, strict=True)
        if c.config_hash == done.config_hash and c.eps == done.eps and c.seed != done.seed
    )
    assert (sibling["estimate_s"], sibling["estimate_source"]) == (12.0, "measured (1 runs)")


def test_bench_file_gives_round_time_estimates(tmp_path, table2):
    bench = {
        "entries": [{"backbone": "ViT-B-16", "method": "dpfpl", "private": True, "round_s": 3}]
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    rows = dry_run_rows(table2, tmp_path)
    private_dpfpl = [r for r in rows if r["method"] == "dpfpl" and r["eps"] != "none"]
    assert {(r["estimate_s"], r["estimate_source"]) for r in private_dpfpl} == {(300.0, "bench")}
    others = [r for r in rows if r["method"] != "dpfpl" or r["eps"] == "none"]
    assert all(r["estimate_source"].startswith("model") for r in others)


def test_bad_bench_file_is_a_usage_error(tmp_path, table2):
    (tmp_path / "bench.json").write_text(json.dumps({"entries": [{"backbone": "x"}]}))
    with pytest.raises(UsageError, match="bench file"):
        dry_run_rows(table2, tmp_path)


# ----------------------------------------------------------------------------- bad files

GOOD = """
name = "{name}"
summary = "a test suite"
[run]
rounds = 1
[[grid]]
methods = ["coop"]
datasets = ["synthetic"]
eps = ["none"]
seeds = [0]
"""


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t + "colour = 1\n", r"colour: Extra inputs are not permitted"),
        (lambda t: t.replace("rounds = 1", "roundz = 1"), r"run\.roundz: not a run setting"),
        (lambda t: t.replace("rounds = 1", "data_root = '/x'"), r"machine setting"),
        (lambda t: t.replace("rounds = 1", "rounds = 0"), r"grid\.0 synthetic: rounds=0"),
        (lambda t: t.replace('["none"]', "[0]"), r"grid\.0\.eps: epsilon must be > 0"),
        (lambda t: t.replace('["none"]', '["none", "none"]'), r"listed twice"),
        (lambda t: t.replace('["coop"]', '["coopp"]'), r"unknown method 'coopp'"),
        (lambda t: t.replace('["synthetic"]', '["imagenet21k"]'), r"unknown dataset 'imagenet21k'"),
        (lambda t: t.replace("[[grid]]", "[[grid]\n"), r"bad suite .*\.toml: "),
        (lambda t: t.replace('name = "', 'name = "other-'), r"differs from the file stem"),
        (lambda t: t + "[params]\nfedpgp = { rank = 4 }\n", r"params\.fedpgp: no grid runs"),
        (lambda t: t + "[params]\ncoop = { rnak = 4 }\n", r"has no option 'rnak'"),
        (
            lambda t: t.replace('["coop"]', '["fedotp"]').replace(
                "rounds = 1", "rounds = 1\nbackbone = 'RN50'\npretrained = 'openai'"
            ),
            r"fedotp scores image patch tokens, which backbone RN50 does not give",
        ),
    ],
)
def test_bad_suite_file_is_one_line_usage_error(tmp_path, edit, match):
    path = tmp_path / "mine.toml"
    path.write_text(edit(GOOD.format(name="mine")))
    with pytest.raises(UsageError, match=match) as info:
        load_suite(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_suite_lists_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown suite 'table9'; known: .*dpfpl-table2"):
        load_suite("table9")


def test_grid_fields_cannot_be_overridden(tmp_path):
    with pytest.raises(UsageError, match="cannot override 'eps'"):
        suite_cells(load_suite("embedded"), overrides={"eps": (None,)})


# ----------------------------------------------------------------------------- run


TINY = """
name = "tiny"
summary = "two cells on a small synthetic set"
[run]
clients = 2
shots = 2
rounds = 1
local_epochs = 1
eval_every = 1
last_k = 1
dataset_options = { n_train_per_class = 4, n_val_per_class = 2, n_test_per_class = 2 }
[[grid]]
methods = ["zeroshot", "coop"]
datasets = ["synthetic"]
eps = ["none"]
seeds = [0]
"""


def test_run_suite_runs_the_cells_then_resumes_with_nothing_left(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    suite = load_suite(path)
    out = tmp_path / "out"
    overrides = {"cache_dir": tmp_path / "cache", "device": "cpu"}
    bars = []

    class Bar:
        closed = False

        def start_run(self, index, total, label, rounds):
            pass

        def advance(self, rounds_done):
            pass

        def close(self):
            self.closed = True

    def progress(spec):
        bars.append(Bar())
        return bars[-1]

    frame = run_suite(suite, out, log=lambda line: None, overrides=overrides, progress=progress)
    assert len(bars) == 1 and bars[0].closed
    assert list(frame["method"]) == ["zeroshot", "coop"]
    assert set(frame["status"]) == {"finished"}
    assert pending_specs(suite, out, overrides=overrides) == []
    again = run_suite(suite, out, log=lambda line: None, overrides=overrides)
    assert again.empty
    rows = dry_run_rows(suite, out, overrides=overrides)
    assert [r["status"] for r in rows] == ["finished", "finished"]
    assert all(r["estimate_source"] == "measured (1 runs)" for r in rows)
    assert Path(out / "results.csv").is_file()


# ----------------------------------------------------------------------------- cost model


def test_model_estimate_without_bench_file_scales_with_the_work(table2_rows):
    def seconds(dataset, method, eps):
        (row,) = [
            r
            for r in table2_rows
            if (r["dataset"], r["method"], r["eps"], r["seed"]) == (dataset, method, eps, 0)
        ]
        return row["estimate_s"]

    none, private = seconds("caltech101", "dpfpl", "none"), seconds("caltech101", "dpfpl", "0.1")
    assert 0 < none < private  # DP: a backward per sample
    assert private == seconds("caltech101", "dpfpl", "0.01")  # eps changes sigma, not the work
    assert seconds("food101", "dpfpl", "0.1") > 10 * private  # 50500 training images vs 4128
    assert seconds("caltech101", "fedotp", "none") > none  # two prompt components


def test_model_is_calibrated_on_finished_cells(tmp_path):
    suite = load_suite("embedded")
    cells = suite_cells(suite, out=tmp_path)
    done = next(c for c in cells if c.method.label == "coop" and c.eps is None)
    assumed = {r["estimate_source"] for r in dry_run_rows(suite, tmp_path)}
    assert all(source.startswith("model (assumed") for source in assumed)
    write_results(
        pd.DataFrame([_record(done, "finished", 12.0)], columns=list(RESULT_COLUMNS)),
        tmp_path / "results.csv",
    )
    rows = dry_run_rows(suite, tmp_path)
    other, promptfl = next(
        (r, c) for r, c in zip(rows, cells, strict=True) if c.method.label == "promptfl"
    )
    assert other["estimate_source"] == "model (calibrated on 1 runs)"
    assert other["estimate"].startswith("~")
    assert other["estimate_s"] == pytest.approx(12.0 * cell_flops(promptfl) / cell_flops(done))


def test_no_model_estimate_without_the_training_set_size(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        GOOD.format(name="mine")
        .replace('["synthetic"]', '["pacs"]')
        .replace(
            "rounds = 1",
            "rounds = 1\nshots = 0\nprotocol = 'multi-domain'\npartition = 'by_domain'",
        )
    )
    (row,) = dry_run_rows(load_suite(path), tmp_path)
    assert (row["estimate"], row["estimate_source"]) == ("unknown", "unknown")


# ----------------------------------------------------------------------------- filters


def test_a_filter_keeps_only_the_chosen_cells():
    from fpl_bench.suite import CellFilter

    suite = load_suite("embedded")
    assert len(suite_cells(suite)) == len(list_presets()) * 3 * 3  # presets x 3 eps x 3 seeds
    only = CellFilter(methods=("promptfl", "dpfpl"), eps=("none", "0.1"), seeds=(1,))
    cells = suite_cells(suite, only=only)
    assert [(c.method.label, c.eps, c.seed) for c in cells] == [
        ("promptfl", None, 1),
        ("promptfl", 0.1, 1),
        ("dpfpl", None, 1),
        ("dpfpl", 0.1, 1),
    ]
    # the same configuration as the whole suite's cells: a filtered run resumes into its folder
    whole = {c.key["config_hash"] for c in suite_cells(suite) if c.method.label == "promptfl"}
    assert {c.key["config_hash"] for c in cells if c.method.label == "promptfl"} == whole


@pytest.mark.parametrize(
    ("only", "needle"),
    [
        ({"methods": ("nosuch",)}, "--methods nosuch: suite embedded has no such cell"),
        ({"eps": ("0.3",)}, "--eps 0.3: suite embedded has no such cell; it has none, 0.5, 0.1"),
        ({"seeds": (7,)}, "--seeds 7: suite embedded has no such cell"),
    ],
)
def test_a_filter_value_the_suite_lacks_is_refused(only, needle):
    from fpl_bench.suite import CellFilter

    with pytest.raises(UsageError, match=re.escape(needle)):
        suite_cells(load_suite("embedded"), only=CellFilter(**only))


def test_run_suite_with_filters_dry_run(tmp_path, capsys, monkeypatch):
    from tests.cli import run_cli

    args = ["run", "--suite", "embedded", "--methods", "promptfl", "--eps", "none,0.5"]
    code, out, err = run_cli([*args, "--out", str(tmp_path), "--dry-run"], capsys, monkeypatch)
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("synthetic  promptfl")]
    assert len(lines) == 6 and not any("  0.1  " in line for line in lines)
    code, _, err = run_cli(
        ["run", "--suite", "embedded", "--dataset", "cifar10", "--dry-run"], capsys, monkeypatch
    )
    assert code == 2 and "--dataset: the suite sets the datasets" in err
