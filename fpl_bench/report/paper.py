"""The DP-FPL paper's published numbers, to show beside ours.

Tran et al., "Privacy-Preserving Personalized Federated Prompt Learning for Multimodal Large
Language Models", ICLR 2025 (arXiv 2501.13904): Table 2 (local accuracy) and Table 3 (neighbor
accuracy) on Caltech101, OxfordPets, OxfordFlowers, Food101 (ViT-B/16, 10 clients, pathological
split, 100 rounds), Table 4 (CIFAR-100 local accuracy, ResNet50, Dirichlet alpha 0.3, 25 or 50
clients, 200 rounds). Methods PromptFL, FedOTP, FedPGP, DP-FPL; eps none, 0.4, 0.2, 0.1, 0.05,
0.01; means over 5 seeds of the last 10 rounds, in the personalized protocol.

`leaderboards/paper-dpfpl.csv` holds them as published (percent, column `accuracy_pct`), one row
per (dataset, method, eps, metric, clients); `paper_number` returns a fraction in [0, 1], the unit
of our records.

>>> paper_number("caltech101", "dpfpl", None, "local_acc")
0.9606
>>> paper_number("cifar100", "fedotp", 0.4, "local_acc", clients=50)
0.5823
>>> paper_number("cifar100", "fedotp", 0.4, "local_acc") is None   # 25 or 50 clients?
True
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from fpl_bench.report.records import normalize_eps


def _paper_csv() -> Path:
    from fpl_bench.cards import cards_root

    return cards_root() / "leaderboards" / "paper-dpfpl.csv"


PAPER_CSV = _paper_csv()
PAPER_COLUMNS: tuple[str, ...] = (
    "table",
    "dataset",
    "method",
    "eps",
    "metric",
    "clients",
    "partition",
    "alpha",
    "backbone",
    "rounds",
    "accuracy_pct",
)
PAPER_PROTOCOL = "personalized"
PAPER_TRUST = "server"


@cache
def paper_table(path: Path = PAPER_CSV) -> pd.DataFrame:
    """The published numbers, eps normalised (`records.normalize_eps`); cached per path."""
    frame = pd.read_csv(path, dtype={"eps": str})
    missing = [c for c in PAPER_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}")
    frame["eps"] = frame["eps"].map(normalize_eps)
    return frame


def paper_number(
    dataset: str,
    method: str,
    eps: Any,
    metric: str,
    clients: int | None = None,
    *,
    path: Path = PAPER_CSV,
) -> float | None:
    """The paper's number for this cell as a fraction, or None where it published none.

    eps: None / 'none' (no DP) or a number. clients: the number of clients of our run; a number
    is returned only for the paper's own setting of that dataset (10 clients for Tables 2 and 3;
    25 or 50 for CIFAR-100's Table 4). clients=None accepts any setting but returns None where
    the paper has several (CIFAR-100).
    """
    table = paper_table(path)
    rows = table[
        (table["dataset"] == dataset)
        & (table["method"] == method)
        & (table["eps"] == normalize_eps(eps))
        & (table["metric"] == metric)
    ]
    if clients is not None:
        rows = rows[rows["clients"] == int(clients)]
    if len(rows) != 1:
        return None
    return round(float(rows["accuracy_pct"].iloc[0]) / 100, 6)


def applies(protocol: str, trust: str, eps: str) -> bool:
    """Whether a cell of ours is in the paper's setting: the personalized protocol, and under DP
    the trusted-server model (the paper's code noised every method at the server)."""
    return protocol == PAPER_PROTOCOL and (eps == "none" or trust == PAPER_TRUST)
