"""Plugins: learners and schemes of other installed packages, found through entry points.

Each test builds a tiny plugin package in tmp_path (pyproject.toml + a module + its card) and
"installs" it without pip: the `.dist-info` folder with `entry_points.txt` that an install would
write goes beside the package, and that folder goes on sys.path for the test only (monkeypatch),
so nothing is installed into the venv and nothing is left behind.
"""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from fpl_bench.catalog import learner_cards, resolve_method, scheme_cards
from fpl_bench.learners import LEARNERS
from fpl_bench.method import all_pairs, build_method
from fpl_bench.schemes import SCHEMES
from tests.cli import run_cli

TINY = ["--rounds", "1", "--clients", "2", "--shots", "2", "--workers", "1"]
for _opt in ("n_train_per_class=4", "n_test_per_class=2", "n_val_per_class=2"):
    TINY += ["--dataset-option", _opt]

PYPROJECT = """
[project]
name = "fpl-tempered"
version = "0.1"
dependencies = ["fpl-bench"]

[project.entry-points."fpl_bench.learners"]
tempered_coop = "fpl_tempered:TemperedCoOp"

[project.entry-points."fpl_bench.schemes"]
fedavg_copy = "fpl_tempered:FedAvgCopy"
"""

MODULE = '''
"""A plugin: CoOp with tempered logits, and FedAvg under another name."""

from dataclasses import dataclass

from fpl_bench.catalog import ComponentCard
from fpl_bench.learners.coop import CoOp
from fpl_bench.schemes.fedavg import FedAvg


@dataclass(frozen=True)
class TemperedCoOp(CoOp):
    """CoOp whose logits are divided by a temperature."""

    temperature: float
    card = "tempered_coop.toml"  # beside this module

    def logits(self, text, images, tokens, ctx, given=None):
        return super().logits(text, images, tokens, ctx, given) / self.temperature


@dataclass(frozen=True)
class FedAvgCopy(FedAvg):
    """FedAvg, its card given as an object."""

    card = ComponentCard(
        name="fedavg_copy", summary="FedAvg again", paper="McMahan et al. 2017", reference="-"
    )
'''

CARD = """
name = "tempered_coop"
summary = "CoOp with logits / temperature (a plugin)"
paper = "none"
reference = "tests/test_plugins.py"

[options.temperature]
default = 1.0
gt = 0.0
help = "divides the logits"
"""


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(files) -> the plugin folder, on sys.path with a dist-info made from its
    pyproject.toml (name, version, entry points) as pip would write it."""
    for registry in (LEARNERS, SCHEMES):  # entry points are read again, and forgotten after
        monkeypatch.setattr(registry, "_plugins", None)
    modules = set(sys.modules)

    def run(files: dict[str, str]) -> Path:
        folder = tmp_path / "plugin"
        for name, text in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(textwrap.dedent(text))
        project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
        info = folder / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
        info.mkdir()
        head = f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
        (info / "METADATA").write_text(head)
        groups = project.get("entry-points", {})
        (info / "entry_points.txt").write_text(
            "".join(
                f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in points.items())
                for group, points in groups.items()
            )
        )
        monkeypatch.syspath_prepend(str(folder))
        return folder

    yield run
    for name in set(sys.modules) - modules:
        if name.startswith("fpl_tempered") or name.startswith("fpl_broken"):
            del sys.modules[name]


PLUGIN = {
    "pyproject.toml": PYPROJECT,
    "fpl_tempered/__init__.py": MODULE,
    "fpl_tempered/tempered_coop.toml": CARD,
}


def test_plugins_join_the_registries_and_cards(install, capsys, monkeypatch):
    install(PLUGIN)
    assert "tempered_coop" in LEARNERS.names() and "fedavg_copy" in SCHEMES.names()
    assert learner_cards()["tempered_coop"].options["temperature"].default == 1.0
    assert scheme_cards()["fedavg_copy"].summary == "FedAvg again"
    assert ("tempered_coop", "fedavg_copy", None) in all_pairs()
    choice = resolve_method("tempered_coop@fedavg", {"temperature": 0.5})
    method = build_method(choice)
    assert type(method.learner).__name__ == "TemperedCoOp" and method.learner.temperature == 0.5
    code, out, _ = run_cli(["methods", "--all"], capsys, monkeypatch)
    assert code in (0, None)
    assert "tempered_coop" in out and "CoOp with logits / temperature" in out
    assert "tempered_coop@fedavg_copy" in out and "coop@fedavg_copy" in out
    code, out, _ = run_cli(["methods", "tempered_coop@fedavg"], capsys, monkeypatch)
    assert "temperature" in out and "divides the logits" in out


def test_a_plugin_learner_runs_by_name(install, capsys, monkeypatch, tmp_path):
    install(PLUGIN)
    out = tmp_path / "out"
    methods = "tempered_coop@fedavg,tempered_coop@fedavg_copy"
    args = ["run", "--methods", methods, *TINY, "--out", str(out)]
    args += ["--param", "tempered_coop@fedavg.temperature=0.5"]
    code, _, err = run_cli([*args, "--cache-dir", str(tmp_path / "cache")], capsys, monkeypatch)
    assert code in (0, None), err
    rows = pd.read_csv(out / "results.csv")
    assert list(rows.method) == methods.split(",") and set(rows.status) == {"finished"}
    assert set(rows.learner) == {"tempered_coop"}
    assert list(rows.scheme) == ["fedavg", "fedavg_copy"]
    configs = [json.loads((out / "configs" / f"{h}.json").read_text()) for h in rows.config_hash]
    assert [c["learner.temperature"] for c in configs] == [0.5, 1.0]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (  # the module cannot be imported
            {"fpl_tempered/__init__.py": "import fpl_no_such_dependency\n"},
            "plugin learner 'tempered_coop' (fpl_tempered:TemperedCoOp from fpl-tempered 0.1) "
            "cannot be loaded: ModuleNotFoundError",
        ),
        (  # the card's name is not the plugin's
            {"fpl_tempered/tempered_coop.toml": CARD.replace('"tempered_coop"', '"tempered"')},
            "name 'tempered' differs from the file stem",
        ),
        (  # the card lacks an option the class has
            {"fpl_tempered/tempered_coop.toml": CARD.split("[options")[0]},
            "its card's options (none) are not its dataclass fields (temperature)",
        ),
        (  # no card at all
            {"fpl_tempered/__init__.py": MODULE.replace('    card = "tempered_coop.toml"', "")},
            "has no card: give its class a `card` attribute",
        ),
        (  # not a learner
            {"fpl_tempered/__init__.py": MODULE + "\nTemperedCoOp = object\n"},
            "fpl_tempered:TemperedCoOp is not a subclass of PromptLearner",
        ),
        (  # one of fpl-bench's own names
            {"pyproject.toml": PYPROJECT.replace("tempered_coop =", "coop =")},
            "'coop' is already fpl-bench's own learner",
        ),
    ],
)
def test_a_broken_plugin_is_one_line_naming_it(install, capsys, monkeypatch, change, needle):
    install({**PLUGIN, **change})
    code, _, err = run_cli(["--help"], capsys, monkeypatch)  # the CLI itself loads no plugin
    assert code == 0 and not err
    code, _, err = run_cli(["methods", "--all"], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and "plugin" in lines[0], lines[0]
