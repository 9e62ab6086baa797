"""CLI: bad input gives one line on stderr and exit code 2, and leaves earlier results alone."""

import re

import pytest

from tests.cli import run_cli


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--methods", "fedpgb"], "unknown method 'fedpgb'"),
        (["--dataset", "imagenet-xl"], "unknown dataset 'imagenet-xl'"),
        (["--clients", "0"], "--clients 0"),
        (["--partition", "dirichlet", "--alpha", "0"], "--alpha 0"),
        (["--eps", "0"], "epsilon must be > 0"),
        (["--eps", "-1"], "epsilon must be > 0"),
        (["--eps", "abc"], "'abc' is not a number"),
        (["--eps", "1", "--delta", "1.5"], "--delta 1.5"),
        (["--eps", "1", "--clip-norm", "0"], "--clip-norm 0"),
        (["--param", "coop.bogus=1"], "has no option 'bogus'"),
        (["--param", "dpfpl.residual=no"], "dpfpl.residual='no': expected bool"),
        (["--methods", "fedotp", "--param", "fedotp.max_iter=2.5"], "expected int"),
        (["--param", "dpfpl.rank=0"], "must be >= 1"),
        (["--methods", "coop@global_local"], "scores 1 prompt component"),
        (["--methods", "coop,coop"], "listed twice"),
        (["--trust", "nobody"], "--trust nobody"),
        (["--dataset-option", "nokey"], "KEY=VALUE"),
        (["--seeds", "a,b"], "--seeds a,b"),
    ],
)
def test_bad_flags_one_line_exit_2(args, needle, capsys, monkeypatch, tmp_path):
    code, _, err = run_cli(["run", "--out", str(tmp_path / "out"), *args], capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_bad_input_found_late_keeps_existing_results(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    from fpl_bench.report.records import RESULT_COLUMNS

    header = ",".join(RESULT_COLUMNS) + "\n"
    (out / "results.csv").write_text(header)
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    code, _, err = run_cli(
        ["run", "--out", str(out), "--checkpoint", str(corrupt), *cache], capsys, monkeypatch
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.pt" in err
    code, _, err = run_cli(
        ["run", "--out", str(out), "--shots", "500", *cache], capsys, monkeypatch
    )
    assert code == 2 and "--shots 500" in err
    assert (out / "results.csv").read_text() == header


def test_a_results_file_with_other_columns_is_refused_and_kept(capsys, monkeypatch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("method,seed\ncoop,0\n")
    code, _, err = run_cli(
        ["run", "--out", str(out), "--cache-dir", str(tmp_path / "c")], capsys, monkeypatch
    )
    assert code == 2 and "missing" in err and len(err.strip().splitlines()) == 1
    assert (out / "results.csv").read_text() == "method,seed\ncoop,0\n"


def test_methods_and_datasets_list(capsys, monkeypatch):
    code, out, _ = run_cli(["methods"], capsys, monkeypatch)
    assert code in (0, None)
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert names[:3] == ["zeroshot", "coop", "kgcoop"] and {"dpfpl", "fedkgcoop"} <= set(names)
    code, out, _ = run_cli(["methods", "--all"], capsys, monkeypatch)
    assert "kgcoop@fedavg" in out and re.search(r"coop@global_local\s+refused", out)
    code, out, _ = run_cli(["datasets"], capsys, monkeypatch)
    assert "synthetic" in out


def test_suite_dry_run_lists_every_cell_with_the_papers_number(capsys, monkeypatch, tmp_path):
    code, out, _ = run_cli(
        ["run", "--suite", "dpfpl-table2", "--dry-run", "--out", str(tmp_path / "o")],
        capsys,
        monkeypatch,
    )
    assert code in (0, None)
    # the paper's four methods: 96 cells x 5 seeds; the other 30 presets: 4 x 3 eps x 3 seeds
    assert out.startswith("suite dpfpl-table2: 1560 cells")
    assert sum("  pending  " in line for line in out.splitlines()) == 480 + 1080
