"""Process settings (fpl_bench/process.py) are made by the process's owner only: importing the
package or calling it changes nothing; the CLI's entry and the worker processes set them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fpl_bench.process import ENVIRONMENT

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, tmp_path: Path) -> str:
    """`code` in a fresh interpreter started in the checkout, without the ENVIRONMENT
    variables (conftest.py sets them for the test process); returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_every_module_and_preparing_a_run_change_no_process_setting(tmp_path):
    """Every module of the package imported, then a job prepared (data, backbone, features):
    os.environ is as it was and no process setting was made."""
    out = run_python(
        """
        import importlib, json, os, pkgutil, sys
        import open_clip  # sets TOKENIZERS_PARALLELISM and TORCHINDUCTOR_CACHE_DIR itself

        before = dict(os.environ)
        import fpl_bench
        import fpl_bench.process as process

        calls = []
        process.configure_process = lambda: calls.append("configure_process")
        process.retain_freed_memory = lambda: calls.append("retain_freed_memory")
        for info in pkgutil.walk_packages(fpl_bench.__path__, "fpl_bench."):
            importlib.import_module(info.name)
        from fpl_bench.catalog import resolve_method
        from fpl_bench.prepare import prepare
        from fpl_bench.spec import build_spec

        sizes = {"n_train_per_class": 4, "n_test_per_class": 2, "n_val_per_class": 2}
        spec = build_spec(
            methods=(resolve_method("coop"),), shots=2, clients=2, dataset_options=sizes,
            out=sys.argv[1] + "/out", cache_dir=sys.argv[1] + "/cache",
        )
        prepare(spec, log=lambda text: None)
        changed = sorted(set(os.environ.items()) ^ set(before.items()))
        print(json.dumps({"changed": changed, "calls": calls}))
        """,
        tmp_path,
    )
    found = json.loads(out.strip().splitlines()[-1])
    assert found == {"changed": [], "calls": []}


def report_environment(results) -> None:
    """A worker's target: the ENVIRONMENT variables of its process."""
    from fpl_bench.process import ENVIRONMENT

    results.put({name: os.environ.get(name) for name in ENVIRONMENT})


def test_the_fork_server_starts_with_the_settings_and_the_parent_keeps_its_environment(
    tmp_path,
):
    """Workers are forks of the fork server, which imports torch (OpenMP reads the settings
    then): it starts with ENVIRONMENT set, while the parent's os.environ stays as it was."""
    out = run_python(
        """
        import os
        from fpl_bench.parallel import warm_workers, worker_context

        before = dict(os.environ)
        if warm_workers(("os",)):
            assert dict(os.environ) == before
            context = worker_context()
            results = context.Queue()
            from tests.test_process import report_environment

            worker = context.Process(target=report_environment, args=(results,))
            worker.start()
            print(results.get(timeout=60))
            worker.join()
        else:
            print("no forkserver")
        """,
        tmp_path,
    )
    if out.strip() == "no forkserver":
        pytest.skip("this platform has no forkserver start method")
    assert out.strip() == repr(ENVIRONMENT)


def test_the_cli_entry_makes_the_settings(monkeypatch, capsys):
    from tests.cli import run_main

    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert run_main(["--version"], monkeypatch) == 0
    assert "fpl-bench" in capsys.readouterr().out
    for name, value in ENVIRONMENT.items():
        assert os.environ[name] == value
