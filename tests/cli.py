"""Calling `fpl-bench` in-process from tests: argv in, (exit code, stdout, stderr) out."""

from __future__ import annotations

import sys

import pytest

from fpl_bench.cli import main


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run `fpl-bench ARGS` in this process; returns its exit code."""
    monkeypatch.setattr(sys, "argv", ["fpl-bench", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """`run_main` plus what it printed: (exit code, stdout, stderr)."""
    code = run_main(args, monkeypatch)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
