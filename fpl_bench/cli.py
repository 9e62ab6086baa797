"""fpl-bench command line: the app, its `--version`, and `main`, the console entry point.

The commands live in fpl_bench/commands/ (`run` in run.py, `methods` and `datasets` in
catalog.py, `pretrain-tiny` in pretrain.py, ...); `register_all` adds them to `app` here.
A `UsageError` (or a click usage error) becomes one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import click
import typer
import typer._click.exceptions as _typer_click
import typer.exceptions as _typer_exc

from fpl_bench.errors import UsageError

# typer ships its own copy of click: catch the exceptions of both.
_CLICK_USAGE = (click.exceptions.UsageError, _typer_click.UsageError)
_CLICK_ERROR = (click.exceptions.ClickException, _typer_click.ClickException)
_CLICK_ABORT = (click.exceptions.Abort, _typer_exc.Abort)
_CLICK_EXIT = (click.exceptions.Exit, _typer_exc.Exit)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Benchmark federated prompt-learning methods on CLIP under differential privacy.",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"fpl-bench {version('fpl-bench')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
) -> None:
    """Benchmark federated prompt-learning methods on CLIP under differential privacy."""


def _register_commands() -> None:
    from fpl_bench.commands import register_all

    register_all(app)


_register_commands()


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: runs marked KILLED, results kept


def _interrupted(args: list[str]) -> str:
    """The line after Ctrl-C / SIGTERM: how to continue, for the commands that can (run)."""
    command = next((a for a in args if not a.startswith("-")), "")
    if command == "run":
        return (
            "fpl-bench: interrupted; finished runs are kept in results.csv and the current run "
            "in checkpoints/; rerun the same command with --resume to continue"
        )
    if command == "audit":
        return "fpl-bench: interrupted; rerun the same command: it reuses the finished runs"
    return "fpl-bench: interrupted"


def main() -> None:
    """Console entry point: one-line errors with exit code 2 for bad input. The process's
    settings (fpl_bench/process.py) are made first, before any command imports torch."""
    import signal

    from fpl_bench.process import configure_process

    configure_process()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = app(standalone_mode=False)
    except UsageError as err:
        print(f"fpl-bench: error: {err}", file=sys.stderr)
        sys.exit(2)
    except _typer_click.NoArgsIsHelpError as err:  # bare `fpl-bench`: the help, exit 0
        print(err.format_message())
        sys.exit(0)
    except _CLICK_USAGE as err:
        message = " ".join(err.format_message().split())
        print(f"fpl-bench: error: {message} (see `fpl-bench --help`)", file=sys.stderr)
        sys.exit(2)
    except _CLICK_ERROR as err:
        print(f"fpl-bench: error: {' '.join(err.format_message().split())}", file=sys.stderr)
        sys.exit(2)
    except _CLICK_EXIT as err:
        sys.exit(err.exit_code)
    except (*_CLICK_ABORT, KeyboardInterrupt):
        result = 130
    if result == 130:  # typer turns Ctrl-C / SIGTERM into exit code 130
        print(_interrupted(sys.argv[1:]), file=sys.stderr)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
