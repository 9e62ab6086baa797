"""Cards and registries: the learners, schemes and presets the cards name are the ones the code
registers, option defaults live only in cards, and every bad name or value is one UsageError."""

import dataclasses
import sys
import textwrap

import pytest

from fpl_bench.catalog import (
    learner_cards,
    list_presets,
    method_names,
    parse_params,
    parse_value,
    preset_cards,
    resolve_method,
    scheme_cards,
)
from fpl_bench.errors import UsageError
from fpl_bench.learners import LEARNERS
from fpl_bench.method import build_method, pair_problem
from fpl_bench.registry import Registry
from fpl_bench.schemes import SCHEMES


def test_learner_and_scheme_cards_match_the_registries_field_by_field():
    for cards, registry in ((learner_cards(), LEARNERS), (scheme_cards(), SCHEMES)):
        assert set(cards) == set(registry.names())
        for name, card in cards.items():
            fields = dataclasses.fields(registry.get(name))
            assert {f.name for f in fields} == set(card.options), name
            # no default is written in code: the card is the only source
            assert all(f.default is dataclasses.MISSING for f in fields), name


IVLP = {"text_depth": 9, "vision_depth": 9, "template": "a photo of a {}."}
PSRC = {
    **IVLP,
    **{"image_weight": 10.0, "text_weight": 25.0, "logits_weight": 1.0, "n_templates": 60},
    **{"gpa_mean": 0.75, "gpa_std": 0.05},
}
PLOT = {"n_prompts": 4, "eps": 0.1, "top_percent": 1.0, "max_iter": 100, "thresh": 0.001}
PROGRAD = {"lam": 1.0, "temperature": 1.0, "template": "a photo of a {}."}
BPL = {"samples": 4, "kl_weight": 0.001, "reduction": 2}
PRODA = {"n_prompts": 4, "lam": 1.0}
MOAP = {"lam": 0.5, "num_experts": 10, "heads": 8, "gating_dim": 128, "scaling": 10.0}


def test_presets_resolve_to_the_papers_values():
    expected = {
        "zeroshot": ("zeroshot", "local", {"template": "a photo of a {}."}, {}),
        "coop": ("coop", "local", {}, {}),
        "kgcoop": ("kgcoop", "local", {"lam": 8.0, "template": "a photo of a {}."}, {}),
        "promptfl": ("coop", "fedavg", {}, {}),
        "fedprox": ("coop", "fedprox", {}, {"mu": 0.01}),
        "fedkgcoop": ("kgcoop", "fedavg", {"lam": 8.0, "template": "a photo of a {}."}, {}),
        "fedotp": (
            "ot",
            "global_local",
            {"eps": 0.1, "top_percent": 0.8, "max_iter": 100, "thresh": 0.001},
            {},
        ),
        "fedpgp": ("coop", "sigma_uv", {}, {"rank": 8, "mu": 1.0, "temperature": 0.5}),
        "dpfpl": ("coop", "dpfpl", {}, {"rank": 8, "residual": True}),
        "bpl": ("bpl", "local", BPL, {}),  # presets outside PRESET_ORDER: by name
        "central": ("coop", "central", {}, {}),
        "cocoop": ("cocoop", "local", {"reduction": 16}, {}),
        "fedadam": (
            "coop",
            "fedadam",
            {},
            {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001},
        ),
        "fedbpl": ("bpl", "fedavg", BPL, {}),
        "fedclip": ("fedclip_adapter", "fedavg", {"template": "a photo of a {}."}, {}),
        "fedcocoop": ("cocoop", "fedavg", {"reduction": 16}, {}),
        "fedivlp": ("ivlp", "fedavg", IVLP, {}),
        "fedmaple": ("maple", "fedavg", {"depth": 9}, {}),
        "fedpha": ("coop", "fedpha", {}, {"ratio": 0.8, "alpha": 1.0, "pull": 1.0, "push": 1.0}),
        "fedplot": ("plot", "fedavg", PLOT, {}),
        "fedproda": ("proda", "fedavg", PRODA, {}),
        "fedprograd": ("prograd", "fedavg", PROGRAD, {}),
        "fedpromptsrc": ("promptsrc", "fedavg", PSRC, {}),
        "fedtpg": ("fedtpg", "fedavg", {"heads": 4, "ff_mult": 4}, {}),
        "fedyogi": (
            "coop",
            "fedyogi",
            {},
            {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 0.001},
        ),
        "ivlp": ("ivlp", "local", IVLP, {}),
        "maple": ("maple", "local", {"depth": 9}, {}),
        "pfedmoap": ("coop", "pfedmoap", {}, MOAP),
        "plot": ("plot", "local", PLOT, {}),
        "proda": ("proda", "local", PRODA, {}),
        "prograd": ("prograd", "local", PROGRAD, {}),
        "promptfolio": ("coop", "promptfolio", {}, {"theta": 0.4}),
        "promptsrc": ("promptsrc", "local", PSRC, {}),
        "scaffold": ("coop", "scaffold", {}, {}),
    }
    assert list_presets() == list(expected)
    for name, (learner, scheme, lopts, sopts) in expected.items():
        choice = resolve_method(name)
        assert (choice.learner, choice.scheme) == (learner, scheme), name
        assert choice.learner_options == lopts and choice.scheme_options == sopts, name
        build_method(choice)


def test_every_preset_has_a_search_space_naming_real_options():
    for name, card in preset_cards().items():
        if name != "zeroshot":
            assert "lr" in card.search, name


def test_spelled_pairs_take_the_components_defaults():
    choice = resolve_method("kgcoop@fedavg", {"lam": 2})
    assert (choice.learner, choice.scheme, choice.learner_options["lam"]) == (
        "kgcoop",
        "fedavg",
        2.0,
    )
    assert resolve_method("coop@dpfpl", {"scheme.rank": 4}).scheme_options["rank"] == 4


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("fedpgb", {}, r"unknown method 'fedpgb'; known: zeroshot, coop"),
        ("kgcoop@fedsgd", {}, r"unknown scheme 'fedsgd'"),
        ("dpfpl", {"residual": "no"}, r"dpfpl.residual='no': expected bool"),
        ("fedotp", {"max_iter": 2.5}, r"fedotp.max_iter=2.5: expected int"),
        ("fedotp", {"top_percent": 1.2}, r"must be <= 1"),
        ("fedotp", {"eps": 0.0}, r"must be > 0"),
        ("dpfpl", {"rank": 0}, r"must be >= 1"),
        ("coop", {"bogus": 1}, r"has no option 'bogus'"),
    ],
)
def test_bad_methods_and_options_are_one_line_usage_errors(name, overrides, message):
    with pytest.raises(UsageError, match=message) as err:
        resolve_method(name, overrides)
    assert "\n" not in str(err.value)


def test_a_pair_that_cannot_work_is_refused_with_a_reason():
    from fpl_bench.spec import build_spec

    with pytest.raises(UsageError, match="scores 1 prompt component"):
        build_spec(methods=(resolve_method("coop@global_local"),))
    with pytest.raises(UsageError, match="nothing to train"):
        build_spec(methods=(resolve_method("zeroshot@fedavg"),))
    assert pair_problem(LEARNERS.get("ot"), SCHEMES.get("global_local")) is None


def test_param_values_parse_as_toml_and_must_name_a_job_method():
    assert parse_value("4") == 4 and parse_value("2.5") == 2.5 and parse_value("true") is True
    assert parse_value("no") == "no"
    got = parse_params(["dpfpl.rank=4", "kgcoop@fedavg.lam=2"], ["dpfpl", "kgcoop@fedavg"])
    assert got == {"dpfpl": {"rank": 4}, "kgcoop@fedavg": {"lam": 2}}
    with pytest.raises(UsageError, match=r"METHOD\.OPTION=VALUE"):
        parse_params(["fedpgp.mu=1"], ["dpfpl"])
    with pytest.raises(UsageError, match="listed twice"):
        method_names("coop,coop")
    assert method_names("all") == list_presets()


def test_registry_discovers_a_new_file_and_propagates_its_import_error(tmp_path, monkeypatch):
    pkg = tmp_path / "fplx_parts"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "alpha.py").write_text(
        textwrap.dedent(
            """
            from fplx_registry import REG

            @REG.register("alpha")
            class Alpha:
                pass
            """
        )
    )
    (tmp_path / "fplx_registry.py").write_text(
        "from fpl_bench.registry import Registry\nREG = Registry('part', 'fplx_parts')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import fplx_registry

    assert fplx_registry.REG.names() == ["alpha"]
    (pkg / "broken.py").write_text("import no_such_module_anywhere\n")
    fresh = Registry("part", "fplx_parts")
    with pytest.raises(ModuleNotFoundError):
        fresh.names()
    for mod in [m for m in sys.modules if m.startswith("fplx_")]:
        del sys.modules[mod]


def test_every_trained_preset_justifies_its_run_defaults_in_its_card():
    for name, card in preset_cards().items():
        if name != "zeroshot":
            assert {"lr", "clip_norm"} <= set(card.notes), name


def test_the_default_group_is_every_preset_whose_text_does_not_depend_on_the_image():
    from fpl_bench.catalog import default_presets, method_names

    everything = list_presets()
    default = default_presets()
    assert method_names("default") == default and method_names("all") == everything
    image_conditioned = [
        "bpl",
        "cocoop",
        "fedbpl",
        "fedcocoop",
        "fedivlp",
        "fedmaple",
        "fedpromptsrc",
        "ivlp",
        "maple",
        "promptsrc",
    ]
    assert sorted(set(everything) - set(default)) == image_conditioned
    assert default == [n for n in everything if n in default]  # report order kept
