"""`fpl-bench methods NAME`: one method's learner, scheme, options, search space and paper."""

import re

from fpl_bench.catalog import preset_cards, scheme_cards
from tests.cli import run_cli


def test_methods_name_shows_options_defaults_search_space_and_paper(capsys, monkeypatch):
    code, out, _ = run_cli(["methods", "dpfpl"], capsys, monkeypatch)
    assert code in (0, None)
    card, rank = preset_cards()["dpfpl"], scheme_cards()["dpfpl"].options["rank"]
    assert re.search(r"learner\s+coop:", out) and re.search(r"scheme\s+dpfpl:", out)
    assert re.search(rf"^\s+rank\s+int, default {rank.default}, >= 1 \[scheme dpfpl\]$", out, re.M)
    assert rank.help in out
    assert re.search(r"^\s+scheme\.rank\s+one of 1, 2, 4, 8$", out, re.M)
    assert re.search(r"^\s+lr\s+0\.0005 to 0\.1, log scale$", out, re.M)
    assert card.paper in out and card.reference in out and card.notes["clip_norm"] in out


def test_methods_pair_shows_both_cards_options_and_validity(capsys, monkeypatch):
    code, out, _ = run_cli(["methods", "kgcoop@fedprox"], capsys, monkeypatch)
    assert code in (0, None)
    assert re.search(r"pair\s+valid", out) and "--param kgcoop@fedprox.OPTION=VALUE" in out
    assert re.search(r"^\s+lam\s+float, default 8\.0", out, re.M)
    assert re.search(r"^\s+mu\s+float, default 0\.01", out, re.M)
    code, out, _ = run_cli(["methods", "zeroshot@fedavg"], capsys, monkeypatch)
    assert code in (0, None) and re.search(r"pair\s+refused: zeroshot has nothing", out)


def test_methods_unknown_name_one_line_exit_2(capsys, monkeypatch):
    code, out, err = run_cli(["methods", "dpfpx"], capsys, monkeypatch)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unknown method 'dpfpx'" in lines[0] and "dpfpl" in lines[0]
    code, _, err = run_cli(["methods", "coop@nowhere"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fedavg" in err
