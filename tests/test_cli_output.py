"""What `fpl-bench run` prints: the table's cells and marks, progress in a log, elapsed time."""

import io
import math
import re
import time
from types import SimpleNamespace

import pandas as pd
from rich.console import Console

from fpl_bench import cli
from fpl_bench.commands import run as run_cmd
from tests.cli import run_cli


def rendered(frame: pd.DataFrame, with_privacy: bool = False) -> str:
    console = Console(file=io.StringIO(), width=120)
    for table in run_cmd.format_table(frame, ["local_acc"], with_privacy):
        console.print(table)
    return console.file.getvalue()


def row(method: str, seed: int, local: float, *, tuned: bool = False) -> dict:
    return {
        "eps": "none",
        "method": method,
        "seed": seed,
        "status": "finished",
        "local_acc": local,
        "tuned": tuned,
        "eps_spent": math.nan,
        "noise_multiplier": math.nan,
        "sample_rate": math.nan,
        "steps": math.nan,
    }


def test_table_one_seed_shows_the_value_alone_several_show_the_spread():
    frame = pd.DataFrame([row("coop", 0, 0.62), row("promptfl", 0, 0.5), row("promptfl", 1, 0.7)])
    text = rendered(frame)
    assert re.search(r"coop\s+62\.0\s*$", text, re.M), text
    # the sample std (ddof 1) over seeds, as the leaderboards: sqrt(200) = 14.1
    assert re.search(r"promptfl\s+60\.0±14\.1\s*$", text, re.M), text
    assert "±0.0" not in text


def test_table_marks_tuned_rows():
    frame = pd.DataFrame([row("coop", 0, 0.62, tuned=True), row("promptfl", 0, 0.5)])
    text = rendered(frame)
    assert re.search(r"coop \(tuned\)\s+62\.0", text) and "promptfl (tuned)" not in text
    as_read_back = pd.DataFrame([row("coop", 0, 0.62, tuned="True")])  # results.csv's text
    assert "coop (tuned)" in rendered(as_read_back)


def specs(rounds: int = 4, runs: int = 2) -> SimpleNamespace:
    method = SimpleNamespace(learner="coop")
    return SimpleNamespace(methods=[method] * runs, rounds=rounds, eps=[None], seeds=[0])


def test_progress_in_a_log_is_plain_lines(capsys, monkeypatch):
    progress = run_cmd.TqdmProgress(specs(), plain=True)
    progress.start_run(1, 2, "coop eps=none seed=0", 4)
    monkeypatch.setattr(run_cmd.TqdmProgress, "PLAIN_EVERY_S", 0.0)
    progress.advance(2)
    monkeypatch.setattr(run_cmd.TqdmProgress, "PLAIN_EVERY_S", 3600.0)
    progress.advance(3)  # within PLAIN_EVERY_S of the last line: quiet
    progress.start_run(2, 2, "promptfl eps=none seed=0", 4)
    progress.close()
    assert progress.bar is None
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "run 1/2 coop eps=none seed=0: started; 2 runs, 8 rounds in the job"
    assert re.fullmatch(
        r"run 1/2 coop eps=none seed=0: round 2/4; \d+ s into the job, about "
        r"\d+ s left",
        lines[1],
    ), lines
    assert re.fullmatch(
        r"run 1/2 coop eps=none seed=0: done; \d+ s into the job, about \d+ s "
        r"left",
        lines[2],
    ), lines
    assert len(lines) == 3


def test_elapsed_time_counts_from_the_process_start(monkeypatch):
    since_import = time.time() - run_cmd._IMPORTED
    assert run_cmd.process_seconds() >= since_import - 0.05  # the process began before the import

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(run_cmd, "open", no_proc, raising=False)
    assert abs(run_cmd.process_seconds() - (time.time() - run_cmd._IMPORTED)) < 0.05


def test_a_piped_run_logs_its_progress(capsys, monkeypatch, tmp_path):
    code, out, err = run_cli(
        [
            "run",
            "--methods",
            "zeroshot,coop",
            "--rounds",
            "2",
            "--clients",
            "2",
            "--eval-every",
            "2",
            "--dataset-option",
            "n_train_per_class=8",
            "--dataset-option",
            "n_test_per_class=4",
            "--shots",
            "8",
            "--out",
            str(tmp_path / "o"),
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        capsys,
        monkeypatch,
    )
    assert code in (0, None), err
    lines = err.splitlines()
    accepted = next(i for i, line in enumerate(lines) if "preparing image features..." in line)
    assert (
        lines[accepted].startswith("synthetic: ")
        and "image features [train]" in lines[accepted + 1]
    )
    assert "run 1/2 zeroshot eps=none seed=0: started; 2 runs, 3 rounds in the job" in lines
    assert any(line.startswith("run 1/2 zeroshot eps=none seed=0: done; ") for line in lines), err
    seconds = int(re.search(r"MLflow runs \((\d+) s since the command started\)", out)[1])
    assert seconds >= int(time.time() - run_cmd._IMPORTED) - 1


def test_datasets_listing_names_only_flags_that_exist(capsys, monkeypatch):
    import typer

    run_flags = {
        opt for p in typer.main.get_command(cli.app).commands["run"].params for opt in p.opts
    }
    code, out, _ = run_cli(["datasets"], capsys, monkeypatch)
    assert code in (0, None)
    named = set(re.findall(r"--[a-z][a-z-]*", out))
    assert named and named <= run_flags, named - run_flags
    assert "--dataset-option domain=" in out
