"""One validation boundary: every rule that needs no data is the spec's, so `run`, `tune`, the
suites and `bench` get it alike, and the CLI declares each spec option once."""

import pytest
import typer
from pydantic import ValidationError

from fpl_bench import cli_options as opt
from fpl_bench.catalog import resolve_method
from fpl_bench.cli import app
from fpl_bench.commands.tune import TUNE_SPEC_OPTIONS
from fpl_bench.errors import UsageError
from fpl_bench.run_records import run_config
from fpl_bench.spec import ExperimentSpec, FieldError, build_spec, spec_from_config
from fpl_bench.suite import Grid, load_suite
from fpl_bench.tune.space import spec_with
from tests.cli import run_cli

COOP = (resolve_method("coop"),)

SUITE = """
name = "mine"
summary = "a test suite"
[run]
rounds = 1
{run}
[[grid]]
methods = [{methods}]
datasets = ["synthetic"]
eps = ["none"]
seeds = [0]
"""


def _suite(tmp_path, *, run="", methods='"coop"'):
    path = tmp_path / "mine.toml"
    path.write_text(SUITE.format(run=run, methods=methods))
    return path


# ----------------------------------------------------------------------------- alpha


def test_alpha_without_the_dirichlet_partition_is_refused_by_build_spec():
    with pytest.raises(FieldError) as info:
        build_spec(methods=COOP, partition="iid", alpha=0.3)
    assert (info.value.field, info.value.value) == ("alpha", 0.3)
    assert info.value.message == "applies to partition dirichlet only, not iid"
    assert build_spec(methods=COOP, partition="dirichlet", alpha=0.3).alpha == 0.3


def test_a_spec_rebuilt_from_a_valid_one_keeps_its_alpha():
    """A rebuilt spec (a tuning trial, a saved configuration) carries the default alpha."""
    spec = build_spec(methods=COOP, partition="iid")
    assert spec_with(spec, {"lr": 0.01}, spec.methods[0]).alpha == spec.alpha
    again = spec_from_config(run_config(spec, spec.methods[0]), eps=(None,), seeds=(0,))
    assert again.alpha == spec.alpha and again.partition == "iid"


def test_a_suite_with_alpha_but_no_dirichlet_partition_is_refused(tmp_path):
    path = _suite(tmp_path, run="alpha = 0.3")
    with pytest.raises(UsageError, match=r"alpha=0\.3: applies to partition dirichlet only"):
        load_suite(path)
    load_suite(_suite(tmp_path, run="alpha = 0.3\npartition = 'dirichlet'"))


@pytest.mark.parametrize("command", ["run", "tune"])
def test_alpha_without_dirichlet_is_one_line_naming_the_flag(command, capsys, monkeypatch):
    args = [command, "--methods", "coop", "--alpha", "0.3", "--partition", "iid"]
    code, _, err = run_cli(
        args + (["--trials", "1"] if command == "tune" else []), capsys, monkeypatch
    )
    assert code == 2
    assert (
        err.strip() == "fpl-bench: error: --alpha 0.3: applies to partition dirichlet only, not iid"
    )


# ----------------------------------------------------------------------------- pairs


def test_a_pair_that_cannot_work_is_refused_by_build_spec_naming_it():
    methods = (resolve_method("promptfl"), resolve_method("coop@global_local"))
    with pytest.raises(FieldError) as info:
        build_spec(methods=methods)
    assert (info.value.field, info.value.value) == ("methods", "promptfl,coop@global_local")
    assert info.value.message.startswith("coop@global_local cannot work: coop scores 1 prompt")


def test_a_suite_grid_with_a_pair_that_cannot_work_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"zeroshot@fedavg cannot work: .*nothing to train"):
        load_suite(_suite(tmp_path, methods='"zeroshot@fedavg"'))


@pytest.mark.parametrize("command", ["run", "bench"])
def test_run_and_bench_refuse_a_pair_that_cannot_work(command, capsys, monkeypatch):
    code, out, err = run_cli([command, "--methods", "coop@global_local"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--methods coop@global_local: coop@global_local cannot work: coop scores" in err
    assert "s/round" not in out


# ----------------------------------------------------------------------------- eps, seeds


def _spec_message(**fields):
    with pytest.raises(FieldError) as info:
        build_spec(methods=COOP, **fields)
    return info.value.message


def _grid_message(**fields):
    with pytest.raises(ValidationError) as info:
        Grid(methods=["coop"], datasets=["synthetic"], **{"eps": ["none"], "seeds": [0], **fields})
    return info.value.errors()[0]["msg"].removeprefix("Value error, ")


@pytest.mark.parametrize("eps", [[0.0], [-1.0], [float("nan")], [2000.0], [0.5, 0.5], [None, None]])
def test_a_suite_grid_refuses_eps_with_the_specs_message(eps):
    assert _grid_message(eps=eps) == _spec_message(eps=tuple(eps))


@pytest.mark.parametrize("seeds", [[-1], [0, 0]])
def test_a_suite_grid_refuses_seeds_with_the_specs_message(seeds):
    assert _grid_message(seeds=seeds) == _spec_message(seeds=tuple(seeds))


def test_a_suite_grid_reads_none_as_no_privacy():
    assert Grid(methods=["coop"], datasets=["x"], eps=["none", 0.5], seeds=[0]).eps == (None, 0.5)


# ----------------------------------------------------------------------------- options


def _params(command):
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


SHARED = {
    "run": tuple(opt.SPEC_OPTIONS),
    "tune": TUNE_SPEC_OPTIONS,
    "bench": ("device", "batch_size", "precision"),
    "audit": tuple(name for name in opt.SPEC_OPTIONS if name != "resume"),
}


@pytest.mark.parametrize("command", sorted(SHARED))
def test_each_shared_option_has_its_one_declaration(command, monkeypatch):
    """Same flag and help in every command; its default sets the spec's default field value
    (or leaves the field unset)."""
    monkeypatch.delenv(opt.CACHE_ENV, raising=False)
    click_command = typer.main.get_command(app).commands[command]
    required = ["--methods", "coop", "--trials", "1"] if command == "tune" else []
    parsed = click_command.make_context(command, required).params  # as the command gets them
    params = {p.name: p for p in click_command.params}
    for name in SHARED[command]:
        option = opt.SPEC_OPTIONS[name]
        assert params[name].help == option.help, (command, name)
        assert params[name].opts == [option.flag], (command, name)
        value = option.field_value(parsed[name])
        field = ExperimentSpec.model_fields[option.spec_field]
        assert value is None or value == field.get_default(call_default_factory=True), name


def test_tune_takes_the_run_settings_that_set_what_it_tunes_for():
    assert {"clip_norm", "lr", "batch_size", "local_epochs", "n_ctx", "precision"} <= set(
        TUNE_SPEC_OPTIONS
    )
    assert set(_params("tune")) >= {"rounds", "eval_every", "last_k", "threads", "trial_rounds"}


@pytest.mark.parametrize("command", sorted(SHARED))
def test_help_lists_every_shared_option(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli([command, "--help"], capsys, monkeypatch)
    assert code == 0
    for name in SHARED[command]:
        assert f" {opt.SPEC_OPTIONS[name].flag} " in out, (command, name)


def test_a_bad_field_is_reported_as_the_flag_that_sets_it():
    assert opt.flag_of("precision") == "--precision"
    assert opt.flag_of("dataset_options") == "--dataset-option"
    assert opt.flag_of("methods") == "--methods"
    flags = opt.SpecFlags({"clients": 0, "alpha": None})
    with pytest.raises(UsageError, match=r"^--clients 0: Input should be greater than or equal"):
        opt.spec_from_flags(flags, methods=COOP)


def test_flags_not_given_keep_the_specs_defaults(monkeypatch):
    monkeypatch.delenv(opt.CACHE_ENV, raising=False)
    flags = opt.SpecFlags(
        {"alpha": None, "precision": None, "cache_dir": None, "dataset_option": None}
    )
    assert flags.fields() == {"dataset_options": {}}
    monkeypatch.setenv(opt.CACHE_ENV, "/tmp/cache")
    spec = opt.spec_from_flags(flags, methods=COOP, eps=None)
    assert (spec.alpha, spec.precision, str(spec.cache_dir)) == (0.5, "auto", "/tmp/cache")


def test_a_method_that_pools_every_clients_records_is_refused_under_client_dp_only():
    """central trains on the clients' raw records pooled at one trainer: central DP with a
    trusted curator at best, never the client trust model's local DP."""
    central = (resolve_method("central"),)
    with pytest.raises(FieldError, match="central cannot be private under trust client"):
        build_spec(methods=central, trust="client", eps=(None, 0.5))
    assert build_spec(methods=central, trust="server", eps=(0.5,)).methods == central
    assert build_spec(methods=central, trust="client", eps=(None,)).methods == central


def test_groups_leave_out_what_cannot_run_under_client_dp_and_suites_take_that():
    from fpl_bench.catalog import list_presets, method_names
    from fpl_bench.suite import suite_cells

    every = list_presets()
    assert "central" in every
    assert method_names("all") == every
    assert method_names("all", client_dp=True) == [n for n in every if n != "central"]
    assert "central" in method_names("default") and "central" not in method_names(
        "default", client_dp=True
    )
    assert method_names("central", client_dp=True) == ["central"]  # named: the spec refuses it
    client = {c.method.label for c in suite_cells(load_suite("embedded-client"))}
    server = {c.method.label for c in suite_cells(load_suite("embedded"))}
    assert server - client == {"central"} and client <= server
