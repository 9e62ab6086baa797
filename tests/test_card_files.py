"""Cards of one's own: a preset or dataset card file wherever a name is taken (`run --methods`,
`--dataset`, a suite's grid), validated like a shipped card, labelled by its card's name, with
unambiguous records; and the shipped generic `imagefolder` card on a tree of generated PNGs."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from fpl_bench import catalog
from fpl_bench.catalog import method_names, resolve_method
from fpl_bench.data import catalog as data_catalog
from fpl_bench.errors import UsageError
from fpl_bench.run_records import config_hash, run_config
from fpl_bench.spec import build_spec, spec_from_config
from fpl_bench.suite import load_suite, suite_cells
from tests.cli import run_cli

CARDS = Path(__file__).resolve().parents[1] / "datasets"
TINY = ["--rounds", "1", "--clients", "2", "--shots", "2", "--workers", "1"]
TINY += ["--protocol", "personalized"]

MINE = """
name = "mine"
summary = "FedProx with a larger mu"
paper = "none"
reference = "none"
learner = "coop"
scheme = "fedprox"
scheme_options = { mu = 0.1 }

[search]
lr = { low = 0.001, high = 0.01, log = true }
"""


@pytest.fixture(autouse=True)
def fresh_cards(monkeypatch):
    """Each test starts with no card read from a path (they are kept per process)."""
    monkeypatch.setattr(catalog, "_ADDED", {})
    monkeypatch.setattr(data_catalog, "_ADDED", {})


def image_tree(root: Path, folders=("golden_retriever", "tabby_cat"), per_class=6) -> Path:
    for c, folder in enumerate(folders):
        for i in range(per_class):
            path = root / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 12), (120 * c, 40 * i, 70)).save(path)
    return root


def dataset_file(folder: Path, name: str, **defaults) -> Path:
    """A copy of the shipped imagefolder card named `name`, with other [defaults]."""
    text = (CARDS / "imagefolder.toml").read_text().replace('"imagefolder"', f'"{name}"', 1)
    for key, value in defaults.items():
        text = text.replace(f"\n{key} = ", f"\n{key} = {value}  # was ", 1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(text)
    return folder / f"{name}.toml"


def test_run_takes_card_files_for_a_method_and_the_dataset(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.toml").write_text(MINE)
    tree = image_tree(tmp_path / "tree")
    card = dataset_file(tmp_path / "cards", "pets")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    args = ["run", "--methods", "promptfl,mine.toml", "--dataset", str(card), *TINY]
    args += ["--param", "mine.mu=0.2", "--data-root", str(tree), "--out", str(out)]
    code, _, err = run_cli([*args, "--cache-dir", str(tmp_path / "cache")], capsys, monkeypatch)
    assert code in (0, None), err
    rows = pd.read_csv(out / "results.csv")
    assert list(rows.method) == ["promptfl", "mine"] and set(rows.dataset) == {"pets"}
    assert list(rows.scheme) == ["fedavg", "fedprox"] and set(rows.status) == {"finished"}
    config = json.loads((out / "configs" / f"{rows.config_hash[1]}.json").read_text())
    assert config["scheme.mu"] == 0.2 and config["dataset_card"] == str(card)
    assert len(config["dataset_card_sha256"]) == 16
    assert (out / "partitions" / "pets-2c-seed0.json").is_file()
    assert list((tmp_path / "cache" / "data" / "splits").glob("pets-*.json"))


def test_the_shipped_imagefolder_card_runs_on_a_tree_and_reruns_its_split(
    tmp_path, capsys, monkeypatch
):
    tree, cache = image_tree(tmp_path / "tree"), tmp_path / "cache"
    args = ["run", "--methods", "coop", "--dataset", "imagefolder", "--data-root", str(tree)]
    args += [*TINY, "--cache-dir", str(cache)]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "a")], capsys, monkeypatch)
    assert code in (0, None), err
    (split,) = (cache / "data" / "splits").glob("imagefolder-*.json")
    written = split.read_text()
    code, _, err = run_cli([*args, "--out", str(tmp_path / "b")], capsys, monkeypatch)
    assert code in (0, None), err
    assert split.read_text() == written
    first, again = (pd.read_csv(tmp_path / o / "results.csv") for o in "ab")
    assert list(first.local_acc) == list(again.local_acc)
    assert list(first.config_hash) == list(again.config_hash)


def test_a_method_card_file_is_validated_like_a_shipped_one(tmp_path):
    cases = {
        "nofield": (MINE.replace('summary = "FedProx with a larger mu"\n', ""), "summary"),
        "nolearner": (MINE.replace('"coop"', '"maple9"'), "unknown learner 'maple9'"),
        "badvalue": (MINE.replace("mu = 0.1", "mu = -1.0"), "must be >= 0"),
        "badsearch": (MINE.replace("lr =", "rank ="), "search key 'rank'"),
        "coop": (MINE.replace('"mine"', '"coop"'), "name 'coop' is fpl-bench's own method"),
        "Mine": (MINE.replace('"mine"', '"Mine"'), "must be lowercase letters"),
    }
    for case, (text, needle) in cases.items():  # the name must be the file stem
        stem = case if case in ("coop", "Mine") else "mine"
        path = tmp_path / case / f"{stem}.toml"
        path.parent.mkdir()
        path.write_text(text)
        with pytest.raises(UsageError) as err:
            method_names(f"coop,{path}")
        message = str(err.value)
        assert str(path) in message and needle in message and "\n" not in message, message
    with pytest.raises(UsageError, match=r"nothere\.toml: no such file"):
        resolve_method(str(tmp_path / "nothere.toml"))
    path = tmp_path / "mine.toml"
    path.write_text(MINE)
    other = tmp_path / "other" / "mine.toml"
    other.parent.mkdir()
    other.write_text(MINE)
    assert method_names(f"{path},kgcoop") == ["mine", "kgcoop"]
    with pytest.raises(UsageError, match="name 'mine' is already the card"):
        method_names(str(other))  # two files, one name: rows would be ambiguous
    with pytest.raises(UsageError, match="listed twice"):
        method_names(f"mine,{path}")


def test_a_method_from_a_card_file_keeps_its_label_and_hash_in_another_process(tmp_path):
    (tmp_path / "mine.toml").write_text(MINE)
    choice = resolve_method(str(tmp_path / "mine.toml"), {"mu": 0.3})
    assert (choice.label, choice.preset, choice.card) == (
        "mine",
        "mine",
        str(tmp_path / "mine.toml"),
    )
    spec = build_spec(methods=(choice,))
    config = run_config(spec, choice)
    catalog._ADDED.clear()  # a later process, which never read the file: the config suffices
    again = spec_from_config(config, eps=(None,), seeds=(0,))
    assert again.methods[0].label == "mine" and again.methods[0].scheme_options == {"mu": 0.3}
    assert config_hash(run_config(again, again.methods[0])) == config_hash(config)


def test_a_dataset_card_file_is_checked_and_hashed_by_its_content(tmp_path):
    first = dataset_file(tmp_path / "a", "pets")
    spec = build_spec(methods=(resolve_method("coop"),), dataset=str(first))
    assert (spec.dataset, spec.dataset_card) == ("pets", first)
    digest = config_hash(run_config(spec, spec.methods[0]))
    moved = tmp_path / "b" / "pets.toml"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    with pytest.raises(UsageError, match="name 'pets' is already the card"):
        build_spec(methods=spec.methods, dataset=str(moved))
    data_catalog._ADDED.clear()  # another process: the same content elsewhere, the same hash
    elsewhere = build_spec(methods=spec.methods, dataset=str(moved))
    assert config_hash(run_config(elsewhere, spec.methods[0])) == digest
    data_catalog._ADDED.clear()  # other content under the same name: another hash
    edited = dataset_file(tmp_path / "c", "pets", p_val=0.1)
    changed = build_spec(methods=spec.methods, dataset=str(edited))
    assert config_hash(run_config(changed, spec.methods[0])) != digest
    for text, needle in [
        ("name = ", "bad card"),
        (first.read_text().replace("[source]", "classes = 0\n[source]"), "classes"),
        (first.read_text().replace('"pets"', '"dtd"'), "name 'dtd' is fpl-bench's own dataset"),
    ]:
        stem = "dtd" if "'dtd'" in needle else "pets"
        path = tmp_path / "bad" / f"{stem}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        data_catalog._ADDED.clear()
        with pytest.raises(UsageError) as err:
            build_spec(methods=spec.methods, dataset=str(path))
        assert str(path) in str(err.value) and needle in str(err.value), err.value


def test_bad_card_files_on_the_command_line_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "broken.toml").write_text("name = \n")
    for flag in ("--methods", "--dataset"):
        args = ["run", flag, str(tmp_path / "broken.toml"), "--out", str(tmp_path / "out")]
        code, _, err = run_cli(args, capsys, monkeypatch)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "broken.toml" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_suite_grid_takes_card_files_relative_to_the_suite(tmp_path):
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "mine.toml").write_text(MINE)
    dataset_file(tmp_path / "cards", "pets")
    suite = tmp_path / "suites" / "own.toml"
    suite.parent.mkdir()
    suite.write_text(
        """
        name = "own"
        summary = "my method on my data"

        [params.mine]
        mu = 0.5

        [[grid]]
        methods = ["coop", "../cards/mine.toml"]
        datasets = ["../cards/pets.toml"]
        eps = ["none"]
        seeds = [0, 1]
        """.replace("\n        ", "\n")
    )
    cells = suite_cells(load_suite(suite))
    assert [(c.method.label, c.dataset, c.seed) for c in cells] == [
        ("coop", "pets", 0),
        ("coop", "pets", 1),
        ("mine", "pets", 0),
        ("mine", "pets", 1),
    ]
    assert cells[2].method.scheme_options == {"mu": 0.5}
    assert cells[0].spec.dataset_card == (tmp_path / "cards" / "pets.toml").resolve()
    assert cells[0].key["dataset"] == "pets"


def test_unknown_dataset_names_the_card_file_form():
    with pytest.raises(UsageError, match=r"unknown dataset 'mine'; known: .*PATH\.toml"):
        data_catalog.dataset_card("mine")
    assert tomllib.loads((CARDS / "imagefolder.toml").read_text())["source"]["kind"] == (
        "imagefolder"
    )


def test_a_method_card_file_is_tuned_by_its_search_table(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.toml").write_text(MINE)
    tree = image_tree(tmp_path / "tree")
    args = ["tune", "--methods", str(tmp_path / "mine.toml"), "--trials", "1", "--rounds", "1"]
    args += ["--trial-rounds", "1", "--eval-every", "1"]
    args += ["--dataset", "imagefolder", "--data-root", str(tree), "--clients", "2"]
    args += ["--shots", "2", "--protocol", "personalized", "--out", str(tmp_path / "out")]
    code, out, err = run_cli([*args, "--cache-dir", str(tmp_path / "c")], capsys, monkeypatch)
    assert code in (0, None), err
    assert "tune-mine-imagefolder-personalized-server-epsnone: 1 complete" in out
    assert f"fpl-bench run --tuned --methods {tmp_path / 'mine.toml'} " in out


def test_an_option_bounded_but_not_a_number_is_a_bad_card_not_a_type_error(tmp_path):
    card = tmp_path / "mine.toml"
    card.write_text(
        'name = "mine"\nsummary = "s"\npaper = "p"\nreference = "r"\n'
        '[options.lam]\ndefault = "abc"\nmin = 0.0\nhelp = "h"\n'
    )
    with pytest.raises(
        UsageError, match=r"options\.lam: min bound a number, but the default 'abc'"
    ):
        catalog.read_toml_model(card, catalog.ComponentCard, what="card")


def test_a_class_whose_fields_its_card_does_not_give_is_named_with_the_fix():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Mine:
        lam: float
        template: str

    def card(*options):
        return catalog.ComponentCard(
            name="mine",
            summary="s",
            paper="p",
            reference="r",
            options={k: catalog.OptionCard(default=1.0, help="h") for k in options},
        )

    assert catalog.fields_problem(Mine, card("lam", "template")) is None
    missing = catalog.fields_problem(Mine, card("lam"))
    assert missing.endswith("(lam, template): add [options.template] to its card"), missing
    extra = catalog.fields_problem(Mine, card("lam", "template", "beta"))
    assert "drop [options.beta] or add the field" in extra
    assert catalog.fields_problem(object, card("x")) is None  # not a dataclass: not checked
