"""The bad-input matrix: every usage or environment error is one line on stderr naming the
problem and the fix, exit code 2, no traceback, and earlier results stay byte-for-byte."""

import fcntl
import os

import pytest

from fpl_bench.report.records import RESULT_COLUMNS
from tests.cli import run_cli

TINY = ["--rounds", "1", "--clients", "2", "--shots", "2"]
for _opt in ("n_train_per_class=4", "n_test_per_class=2", "n_val_per_class=2"):
    TINY += ["--dataset-option", _opt]

CASES = [
    # parser errors
    (["run", "--epochs", "5"], "No such option: --epochs"),
    (["run", "--eps"], "requires an argument"),
    (["run", "--clients", "abc"], "'--clients'"),
    (["rnu"], "No such command 'rnu'"),
    (["pretrain-tiny"], "--out"),
    # values the spec refuses
    (["run", "--clients", "0"], "--clients 0"),
    (["run", "--rounds", "0"], "--rounds 0"),
    (["run", "--batch-size", "0"], "--batch-size 0"),
    (["run", "--local-epochs", "0"], "--local-epochs 0"),
    (["run", "--client-fraction", "1.5"], "--client-fraction 1.5"),
    (["run", "--n-ctx", "0"], "--n-ctx 0"),
    (["run", "--eval-every", "0"], "--eval-every 0"),
    (["run", "--last-k", "0"], "--last-k 0"),
    (["run", "--lr", "0"], "--lr 0"),
    (["run", "--backbone", "no-such-net"], "no-such-net"),
    (["run", "--shots", "-1"], "--shots -1"),
    (["run", "--eps", "0"], "epsilon must be > 0"),
    (["run", "--eps", "-1"], "epsilon must be > 0"),
    (["run", "--eps", "abc"], "'abc' is not a number"),
    (["run", "--eps", "inf"], "say 'none'"),
    (["run", "--eps", "0.5,0.5"], "listed twice"),
    (["run", "--seeds", "0,0"], "listed twice"),
    (["run", "--seeds", "a,b"], "--seeds a,b"),
    (["run", "--eps", "1", "--delta", "1.5"], "--delta 1.5"),
    (["run", "--eps", "1", "--clip-norm", "0"], "--clip-norm 0"),
    (["run", "--eps", "1e308"], "epsilon must be <= 1000"),
    (["run", "--eps", "1e50"], "epsilon must be <= 1000"),
    (["run", "--eps", "1", "--clip-norm", "inf"], "--clip-norm inf: Input should be a finite"),
    (["run", "--eps", "1", "--clip-norm", "nan"], "--clip-norm nan: Input should be a finite"),
    (["run", "--lr", "nan"], "--lr nan: Input should be a finite number"),
    (["run", "--lr", "inf"], "--lr inf: Input should be a finite number"),
    (["run", "--eps", "1", "--delta", "1"], "--delta 1.0: Input should be less than 1"),
    (["run", "--eps", "1", "--delta", "nan"], "--delta nan: Input should be a finite number"),
    (["run", "--client-fraction", "nan"], "--client-fraction nan: Input should be a finite"),
    (["run", "--partition", "dirichlet", "--alpha", "inf"], "--alpha inf: Input should be a fin"),
    (["run", "--accountant", "moments"], "--accountant moments"),
    (["run", "--trust", "nobody"], "--trust nobody"),
    (["run", "--protocol", "cross-nothing"], "--protocol cross-nothing"),
    (["run", "--partition", "random"], "--partition random"),
    (["run", "--device", "tpu"], "--device tpu"),
    (["run", "--alpha", "0.3"], "--alpha 0.3: applies to partition dirichlet only"),
    (["tune", "--methods", "coop", "--trials", "1", "--alpha", "0.3"], "--alpha 0.3: applies to"),
    (["tune", "--methods", "coop", "--trials", "1", "--clients", "0"], "--clients 0: Input"),
    (["tune", "--methods", "coop", "--trials", "1", "--dataset-option", "x"], "expected KEY=VALUE"),
    (["run", "--partition", "dirichlet", "--alpha", "0"], "--alpha 0"),
    (["run", "--out", ""], "--out is empty"),
    # methods and their options
    (["run", "--methods", "fedpgb"], "unknown method 'fedpgb'"),
    (["run", "--methods", ""], "method list is empty"),
    (
        ["run", "--methods", "coop", "--eps", "0.5", "--accountant", "paper", *TINY],
        "the paper's closed form sigma=6.786 (T=1) does not meet --eps 0.5 under RDP",
    ),
    (
        ["run", "--methods", "promptfl", "--ctx-init", "a photo of a"],
        "--ctx-init 'a photo of a' is 4 tokens but --n-ctx is 16: give --n-ctx 4",
    ),
    (["run", "--methods", "coop,coop"], "listed twice"),
    (["run", "--methods", "coop@nosuch"], "unknown scheme 'nosuch'"),
    (["run", "--methods", "zeroshot@fedavg"], "nothing to train"),
    (["run", "--methods", "coop@global_local"], "scores 1 prompt component"),
    (["run", "--param", "coop.bogus=1"], "has no option 'bogus'"),
    (["run", "--param", "dpfpl.residual=no"], "expected bool"),
    (["run", "--methods", "fedotp", "--param", "fedotp.max_iter=2.5"], "expected int"),
    (["run", "--param", "dpfpl.rank=0"], "must be >= 1"),
    (["run", "--param", "rank=4"], "METHOD.OPTION=VALUE"),
    (["run", "--methods", "coop", "--param", "dpfpl.rank=4"], "is not among this run's methods"),
    (["run", "--methods", "all,promptfl"], "'all' names a group of presets and cannot be combined"),
    (
        ["run", "--methods", "central,coop", "--trust", "client", "--eps", "none,0.5"],
        "central cannot be private under trust client: it pools every client's raw records",
    ),
    (
        ["tune", "--methods", "central", "--trials", "1", "--trust", "client", "--eps", "1"],
        "central cannot be private under trust client",
    ),
    # data, backbone and privacy settings found while preparing
    (["run", "--dataset", "imagenet-xl"], "unknown dataset 'imagenet-xl'"),
    (["run", "--dataset-option", "nokey"], "KEY=VALUE"),
    (["run", "--dataset-option", "colour=red"], "colour"),
    (["run", "--dataset-option", "n_train_per_class=abc"], "'abc' must be an integer"),
    (["run", "--dataset-option", "n_train_per_class=1e400"], "inf must be an integer"),
    (["run", "--protocol", "cross-dataset", "--transfer-datasets", "nosuch"], "'nosuch'"),
    (["run", "--dataset", "caltech101"], "caltech101"),
    (["run", "--target-domain", "noise"], "cross-domain protocol only"),
    (["run", "--protocol", "cross-domain", *TINY], "at least 2 domains"),
    (["run", "--partition", "by_domain", *TINY], "partition by_domain needs at least 2 domains"),
    (["run", "--shots", "500"], "--shots 500"),
    (["run", "--methods", "coop", "--eps", "1", "--delta", "0.6", *TINY], "1/n"),
    # a budget whose noise would fall below the floor, for this run's (q, steps): before training
    (["run", "--methods", "coop", "--eps", "800", *TINY], "largest supported epsilon"),
    (["run", "--device", "cuda"], "CUDA"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _existing_results(out):
    out.mkdir(parents=True, exist_ok=True)
    text = ",".join(RESULT_COLUMNS) + "\n"
    (out / "results.csv").write_text(text)
    return text


def _run(args, capsys, monkeypatch):
    code, _, err = run_cli(args, capsys, monkeypatch)
    return code, err


@pytest.mark.parametrize(("args", "needle"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_invocation(args, needle, tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "out"
    before = _existing_results(out)
    if args[0] == "run" and "--out" not in args:
        args = ["run", "--out", str(out), "--cache-dir", str(cache), *args[1:]]
    code, err = _run(args, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert (out / "results.csv").read_text() == before


def _bad_environment_cases(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    return [
        ({}, ["--out", str(afile)], "is a file"),
        ({}, ["--cache-dir", str(afile)], "is a file"),
        ({"MLFLOW_TRACKING_URI": "garbage://x"}, [], "unsupported scheme"),
        ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, [], "cannot reach"),
        ({}, ["--checkpoint", str(tmp_path / "missing.pt")], "missing.pt"),
        ({}, ["--out", str(readonly / "sub")], "not writable"),
        ({"MLFLOW_TRACKING_URI": f"sqlite:///{afile}"}, [], "is not an SQLite database"),
        ({"MLFLOW_TRACKING_URI": f"sqlite:///{readonly}"}, [], "is a folder, not an SQLite"),
        ({}, ["--checkpoint", str(readonly)], "is a folder; give the file in it"),
    ]


def test_bad_files_and_environment(tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "out"
    before = _existing_results(out)
    for env, extra, needle in _bad_environment_cases(tmp_path):
        if needle == "not writable" and os.geteuid() == 0:
            continue  # root ignores permission bits
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            args = ["run", "--out", str(out), "--cache-dir", str(cache), *extra]
            code, err = _run(args, capsys, monkeypatch)
        assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, (extra, err)
        assert "Traceback" not in err
        assert "MLFLOW_TRACKING_URI=" in err or not env  # the line names the variable
        assert (out / "results.csv").read_text() == before


def test_results_file_that_is_empty_or_a_folder_is_refused(tmp_path, cache, capsys, monkeypatch):
    for make in ("empty", "folder"):
        out = tmp_path / make
        out.mkdir()
        if make == "empty":
            (out / "results.csv").write_text("")
        else:
            (out / "results.csv").mkdir()
        code, err = _run(["run", "--out", str(out), "--cache-dir", str(cache)], capsys, monkeypatch)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "results.csv" in err


def test_a_second_job_on_the_same_folder_is_refused(tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "out"
    before = _existing_results(out)
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = _run(
            ["run", "--methods", "zeroshot", "--out", str(out), "--cache-dir", str(cache), *TINY],
            capsys,
            monkeypatch,
        )
    assert code == 2 and "another fpl-bench job" in err
    assert (out / "results.csv").read_text() == before


def test_help_and_version_exit_0_without_traceback(capsys, monkeypatch):
    for args in ([], ["-h"], ["--help"], ["run", "-h"], ["--version"]):
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, args
        assert "Traceback" not in err and out.strip()


def test_cross_dataset_without_transfer_datasets_is_refused(tmp_path, cache, capsys, monkeypatch):
    code, err = _run(
        ["run", "--protocol", "cross-dataset", "--out", str(tmp_path), "--cache-dir", str(cache)],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "needs transfer datasets" in err and len(err.strip().splitlines()) == 1


# -- files and folders the report, pretrain and bench commands read or write ---------------------

CORRUPT_RESULTS = {
    "unbalanced quotes": ",".join(RESULT_COLUMNS).encode() + b'\n"coop,"none\n0,"x\n',
    "random bytes": bytes(range(128, 256)) * 8,
}


def refusal(code, err):
    """The one stderr line of a refused command (exit code 2, no traceback)."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _runs_folder(folder):
    """A run folder with the hand-built records of tests/report (12 rows)."""
    from fpl_bench.report.records import write_results
    from tests.report.conftest import make_records

    write_results(make_records(), folder / "results.csv")
    return folder


@pytest.mark.parametrize("kind", list(CORRUPT_RESULTS))
def test_corrupt_results_file_is_refused_by_run(kind, tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_bytes(CORRUPT_RESULTS[kind])
    code, err = _run(["run", "--out", str(out), "--cache-dir", str(cache)], capsys, monkeypatch)
    assert f"{out / 'results.csv'} is not a readable results CSV" in refusal(code, err), err
    assert "move it away" in err
    assert (out / "results.csv").read_bytes() == CORRUPT_RESULTS[kind]


@pytest.mark.parametrize("kind", list(CORRUPT_RESULTS))
def test_corrupt_results_file_is_refused_by_leaderboard(kind, tmp_path, capsys, monkeypatch):
    (tmp_path / "results.csv").write_bytes(CORRUPT_RESULTS[kind])
    code, _, err = run_cli(["leaderboard", "--runs", str(tmp_path)], capsys, monkeypatch)
    assert "is not a readable results CSV" in refusal(code, err), err


def test_results_row_with_a_seed_that_is_not_an_integer_is_refused(tmp_path, capsys, monkeypatch):
    import pandas as pd

    runs = _runs_folder(tmp_path)
    frame = pd.read_csv(runs / "results.csv", dtype=str)
    frame.loc[0, "seed"] = "abc"
    frame.to_csv(runs / "results.csv", index=False)
    code, _, err = run_cli(["leaderboard", "--runs", str(runs)], capsys, monkeypatch)
    assert "seed 'abc' is not an integer" in refusal(code, err), err


def test_leaderboard_out_that_cannot_be_written_is_refused(tmp_path, capsys, monkeypatch):
    runs = _runs_folder(tmp_path / "runs")
    afile = tmp_path / "afile"
    afile.write_text("x")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    cases = [(afile, "is a file, not a folder"), (afile / "sub", "is not writable")]
    if os.geteuid() != 0:  # root ignores permission bits
        cases.append((readonly, "is not writable"))
    for out, needle in cases:
        args = ["leaderboard", "--runs", str(runs), "--out", str(out), "--no-png"]
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert f"--out {out} {needle}" in refusal(code, err), err


def test_leaderboard_runs_that_is_not_a_run_folder_says_what_it_is(tmp_path, capsys, monkeypatch):
    notes = tmp_path / "NOTES.md"
    notes.write_text("# notes\n")
    board = tmp_path / "board.csv"
    board.write_text("method,eps,metric,mean,std\ncoop,none,local_acc,0.5,0.0\n")
    for runs, needle in (
        (notes, f"--runs {notes} is a file, not a run folder"),
        (board, f"--runs {board} is a CSV file but not a results file"),
    ):
        code, _, err = run_cli(["leaderboard", "--runs", str(runs)], capsys, monkeypatch)
        assert needle in refusal(code, err), err
        assert "results.csv not found" not in err


def test_leaderboard_tracking_uri_that_is_not_sqlite_is_refused(tmp_path, capsys, monkeypatch):
    text = tmp_path / "notes.db"
    text.write_text("not a database\n")
    uri = f"sqlite:///{text}"
    code, _, err = run_cli(["leaderboard", "--tracking-uri", uri], capsys, monkeypatch)
    assert f"--tracking-uri {uri}: {text} is not an SQLite database" in refusal(code, err), err


def test_tracking_database_in_out_that_is_not_sqlite_is_refused(
    tmp_path, cache, capsys, monkeypatch
):
    out = tmp_path / "out"
    before = _existing_results(out)
    (out / "mlflow.db").write_text("hello\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, err = _run(["run", "--out", str(out), "--cache-dir", str(cache)], capsys, monkeypatch)
    assert f"tracking database {out / 'mlflow.db'} is not an SQLite database" in refusal(
        code, err
    ), err
    assert (out / "results.csv").read_text() == before


def test_regress_bad_baseline_and_options_are_refused(tmp_path, capsys, monkeypatch):
    runs = _runs_folder(tmp_path / "runs")
    readme = tmp_path / "README.md"
    readme.write_text("# fpl-bench\n\nA benchmark.\nIt runs CoOp, PromptFL and DP-FPL.\n")
    binary = tmp_path / "board.csv"
    binary.write_bytes(bytes(range(128, 256)))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (["--baseline", str(readme)], f"baseline {readme} is not a leaderboard CSV"),
        (["--baseline", str(binary)], f"baseline {binary} is not a leaderboard CSV"),
        (["--baseline", str(tmp_path)], f"baseline {tmp_path} is a folder"),
        (["--baseline", str(readme), "--tolerance", "nan"], "both must be finite"),
        (["--baseline", str(readme), "--k", "inf"], "both must be finite"),
        (["--baseline", str(readme), "--out", str(afile)], f"--out {afile} is a file"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(["regress", "--runs", str(runs), *extra], capsys, monkeypatch)
        assert needle in refusal(code, err), err


def test_pretrain_tiny_refuses_bad_options_before_training(tmp_path, capsys, monkeypatch):
    import fpl_bench.pretrain as pretrain

    def no_training(**_):
        raise AssertionError("pretrain_tiny ran on bad input")

    monkeypatch.setattr(pretrain, "pretrain_tiny", no_training)
    afile = tmp_path / "afile"
    afile.write_text("x")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    out = str(tmp_path / "tiny.pt")
    cases = [
        (["--out", out, "--n-images", "0"], "at least one batch of 128 images"),
        (["--out", out, "--n-images", "64"], "give --n-images 128 or more"),
        (["--out", out, "--n-images", "127"], "give --n-images 128 or more"),
        (["--out", str(afile / "tiny.pt")], "is a file, not a folder"),
        (["--out", str(afile / "sub" / "tiny.pt")], "is not writable"),
        (["--out", out, "--minutes", "0"], "--minutes 0.0"),
        (["--out", out, "--minutes", "nan"], "--minutes nan"),
        (["--out", out, "--threads", "0"], "--threads 0"),
        (["--out", out, "--seed", "-1"], "--seed -1"),
    ]
    if os.geteuid() != 0:  # root ignores permission bits
        cases.append((["--out", str(readonly / "tiny.pt")], "is not writable"))
    for extra, needle in cases:
        code, _, err = run_cli(["pretrain-tiny", *extra], capsys, monkeypatch)
        assert needle in refusal(code, err), err


def test_pretrain_tiny_minimum_is_one_batch():
    """The --n-images floor the CLI names is pretrain_tiny's batch: below it phase 1 has no step."""
    import inspect

    from fpl_bench.pretrain import BATCH_SIZE, pretrain_tiny

    assert inspect.signature(pretrain_tiny).parameters["batch_size"].default == BATCH_SIZE == 128


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--rounds", "0"], "'--rounds'"),
        (["--threads", "0"], "'--threads'"),
        (["--batch-size", "0"], "--batch-size 0: Input should be greater than or equal to 1"),
        (["--samples-per-client", "0"], "'--samples-per-client'"),
        (["--local-epochs", "0"], "'--local-epochs'"),
        (["--total-clients", "0"], "'--total-clients'"),
        (["--clients", "0"], "--clients: give positive counts"),
        (["--eps", "-1"], "--eps -1: epsilon must be > 0 and finite"),
        (["--eps", "nan"], "--eps nan: epsilon must be > 0 and finite"),
        (["--eps", "0.5,0.5"], "--eps 0.5,0.5: an epsilon is listed twice"),
        (["--methods", "coop@global_local"], "coop@global_local cannot work: coop scores 1"),
        (["--device", "tpu"], "--device tpu: Input should be"),
        (["--json", "."], "--json . is a folder"),
    ],
)
def test_bench_refuses_bad_numbers_before_timing(extra, needle, capsys, monkeypatch):
    import fpl_bench.bench as bench

    def no_timing(*_, **__):
        raise AssertionError("bench ran on bad input")

    monkeypatch.setattr(bench, "run_bench", no_timing)
    code, out, err = run_cli(["bench", *extra], capsys, monkeypatch)
    assert needle in refusal(code, err), err
    assert "s/round" not in out


def test_param_for_a_method_outside_the_run_names_the_runs_methods(
    tmp_path, cache, capsys, monkeypatch
):
    args = ["run", "--out", str(tmp_path), "--cache-dir", str(cache), "--methods", "promptfl"]
    code, err = _run([*args, "--param", "dpfpl.rank=4"], capsys, monkeypatch)
    assert "'dpfpl' is not among this run's methods (promptfl)" in refusal(code, err), err
    assert err.count("dpfpl.rank=4") == 1  # the refused input is not offered as the example


def test_the_interrupted_line_says_how_to_continue_only_where_one_can():
    from fpl_bench.cli import _interrupted

    assert "--resume" in _interrupted(["run", "--methods", "coop"])
    assert "--resume" not in _interrupted(["pretrain-tiny", "--out", "t.pt"])
    assert _interrupted(["--verbose", "pretrain-tiny"]) == "fpl-bench: interrupted"
    assert "reuses the finished runs" in _interrupted(["audit"])
