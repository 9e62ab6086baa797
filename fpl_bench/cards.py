"""Where the declarative cards live, and the dataset cards re-exported.

`methods/` (learners, schemes and presets; read by fpl_bench/catalog.py), `datasets/` (read
by fpl_bench/data/catalog.py) and `leaderboards/` (suites and baselines; fpl_bench/suite.py)
are top-level folders of the checkout; a wheel carries them inside the package as
`fpl_bench/_cards/` (setup.py), found with importlib.resources wherever the package lies.
Cards are read once and keyed by file stem; a card with a missing or unknown field is an
error, never a skip (open_clip skips; we do not).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# Dataset cards live with the data sources (one model per source kind); re-exported here.
from fpl_bench.data.catalog import DatasetCard as DatasetCard
from fpl_bench.data.catalog import dataset_card as dataset_card
from fpl_bench.data.catalog import dataset_cards as dataset_cards
from fpl_bench.errors import UsageError


def cards_root() -> Path:
    """The folder holding `methods/` and `datasets/`: the checkout (or an editable install), or
    the installed package's `_cards/` (a wheel, however installed: venv, --target, --prefix)."""
    candidates = [Path(__file__).resolve().parents[1]]  # a checkout (or editable install)
    packaged = resources.files("fpl_bench") / "_cards"
    if isinstance(packaged, Path):  # a package on disk (not inside a zip)
        candidates.append(packaged)
    for root in candidates:
        if (root / "methods").is_dir() and (root / "datasets").is_dir():
            return root
    raise UsageError(
        "cannot find the methods/ and datasets/ cards: install from a checkout "
        "(`pip install -e .`) or a wheel built by `python -m build`"
    )
