"""The registry and the method cards list the same methods; defaults match the dataclasses."""

import pytest

from fpl_bench.cards import method_cards
from fpl_bench.errors import UsageError
from fpl_bench.methods.registry import (
    build_method,
    hyperparameters,
    list_methods,
    resolve_method_name,
)


def test_registry_and_cards_agree():
    cards = method_cards()
    assert set(cards) == set(list_methods())
    for name, card in cards.items():
        assert set(card.defaults) == set(hyperparameters(name)), name
        build_method(name, card.defaults)


def test_unknown_method_and_option_are_usage_errors():
    with pytest.raises(UsageError, match=r"unknown method 'fedpgb'; known: .*coop"):
        resolve_method_name("fedpgb")
    with pytest.raises(UsageError, match="has no option 'bogus'"):
        build_method("coop", {"bogus": 1})


def test_aliases_resolve():
    assert resolve_method_name("DP_FPL") == "dpfpl"
