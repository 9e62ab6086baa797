"""Where the declarative cards live, and the dataset cards re-exported.

`methods/` (learners, schemes and presets; read by fpl_bench/catalog.py), `datasets/` (read
by fpl_bench/data/catalog.py) and `leaderboards/` (suites and baselines; fpl_bench/suite.py)
are top-level folders of the checkout, installed by a wheel under <prefix>/share/fpl-bench.
Cards are read once and keyed by file stem; a card with a missing or unknown field is an
error, never a skip (open_clip skips; we do not).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Dataset cards live with the data sources (one model per source kind); re-exported here.
from fpl_bench.data.catalog import DatasetCard as DatasetCard
from fpl_bench.data.catalog import dataset_card as dataset_card
from fpl_bench.data.catalog import dataset_cards as dataset_cards
from fpl_bench.errors import UsageError


def cards_root() -> Path:
    """The folder holding `methods/` and `datasets/`: the checkout, or the installed share dir."""
    import site

    candidates = [Path(__file__).resolve().parents[1]]  # a checkout (or editable install)
    # a wheel installs the cards as data files under <prefix>/share/fpl-bench
    for prefix in (sys.prefix, sys.base_prefix, site.getuserbase()):
        candidates.append(Path(prefix) / "share" / "fpl-bench")
    for root in candidates:
        if (root / "methods").is_dir() and (root / "datasets").is_dir():
            return root
    raise UsageError(
        "cannot find the methods/ and datasets/ cards; install with `pip install -e .`"
    )
