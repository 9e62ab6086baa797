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
    (["run", "--accountant", "moments"], "--accountant moments"),
    (["run", "--trust", "nobody"], "--trust nobody"),
    (["run", "--protocol", "cross-nothing"], "--protocol cross-nothing"),
    (["run", "--partition", "random"], "--partition random"),
    (["run", "--device", "tpu"], "--device tpu"),
    (["run", "--alpha", "0.3"], "--alpha applies to --partition dirichlet"),
    (["run", "--partition", "dirichlet", "--alpha", "0"], "--alpha 0"),
    (["run", "--out", ""], "--out is empty"),
    # methods and their options
    (["run", "--methods", "fedpgb"], "unknown method 'fedpgb'"),
    (["run", "--methods", ""], "method list is empty"),
    (["run", "--methods", "coop,coop"], "listed twice"),
    (["run", "--methods", "coop@nosuch"], "unknown scheme 'nosuch'"),
    (["run", "--methods", "zeroshot@fedavg"], "nothing to train"),
    (["run", "--methods", "coop@global_local"], "scores 1 prompt component"),
    (["run", "--param", "coop.bogus=1"], "has no option 'bogus'"),
    (["run", "--param", "dpfpl.residual=no"], "expected bool"),
    (["run", "--methods", "fedotp", "--param", "fedotp.max_iter=2.5"], "expected int"),
    (["run", "--param", "dpfpl.rank=0"], "must be >= 1"),
    (["run", "--param", "rank=4"], "METHOD.OPTION=VALUE"),
    (["run", "--methods", "coop", "--param", "dpfpl.rank=4"], "METHOD.OPTION=VALUE"),
    # data, backbone and privacy settings found while preparing
    (["run", "--dataset", "imagenet-xl"], "unknown dataset 'imagenet-xl'"),
    (["run", "--dataset-option", "nokey"], "KEY=VALUE"),
    (["run", "--dataset-option", "colour=red"], "colour"),
    (["run", "--dataset", "caltech101"], "caltech101"),
    (["run", "--target-domain", "noise"], "cross-domain protocol only"),
    (["run", "--protocol", "cross-domain", *TINY], "at least 2 domains"),
    (["run", "--shots", "500"], "--shots 500"),
    (["run", "--methods", "coop", "--eps", "1", "--delta", "0.6", *TINY], "1/n"),
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
