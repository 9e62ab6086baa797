"""Metric helpers shared by the protocols (fpl_bench/protocols.py) and the records.

Each client is evaluated with its own (personalized) prompt; a round's figure is the unweighted
mean over clients.

personalized (DP-FPL, Tran et al. ICLR 2025): all classes are dealt to clients; logits over all
    classes. local = the client's local test images (its own classes); neighbor = test images of
    the classes the client does not hold.
base2novel (CoOp / FedPGP): sorted classes split at ceil(n/2); only base classes are dealt and
    trained on. local / neighbor as above but within the base classes (logits over base);
    base = every base test image (logits over base); novel = every novel test image (logits over
    novel); hm = 2 B N / (B + N) of the client-averaged base and novel accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRICS = (
    "local_acc",
    "neighbor_acc",
    "base_acc",
    "novel_acc",
    "hm",
    "own_domain_acc",
    "other_domain_acc",
    "source_acc",
    "target_acc",
    "global_acc",
)
PROTOCOL_METRICS = {  # what each protocol of fpl_bench/protocols.py reports
    "personalized": ("local_acc", "neighbor_acc"),
    "base2novel": ("local_acc", "neighbor_acc", "base_acc", "novel_acc", "hm"),
    "multi-domain": ("local_acc", "own_domain_acc", "other_domain_acc"),
    "cross-domain": ("local_acc", "source_acc", "target_acc"),
    "cross-dataset": ("local_acc", "source_acc", "target_acc"),
    "global": ("global_acc",),
    "dual": ("local_acc", "global_acc", "hm"),
}


def accuracy(correct: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Fraction of True in correct[idx] (all of it when idx is None); nan when empty."""
    sel = correct if idx is None else correct[idx]
    return float(sel.mean()) if sel.size else math.nan


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when both are 0."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def evaluation_rounds(rounds: int, every: int, keep_last: int | None = None) -> frozenset[int]:
    """The rounds (1-based) after which a run evaluates: every `every`-th and the last one; with
    `keep_last`, only the last `keep_last` of them, the evaluations `final_metrics` averages (the
    result is the same; the rounds before cost evaluation time and only draw a curve).

    >>> sorted(evaluation_rounds(20, 4)), sorted(evaluation_rounds(20, 4, keep_last=2))
    ([4, 8, 12, 16, 20], [16, 20])
    >>> sorted(evaluation_rounds(10, 4)), sorted(evaluation_rounds(10, 4, keep_last=2))
    ([4, 8, 10], [8, 10])
    """
    scheduled = sorted({*range(every, rounds + 1, every), rounds})
    return frozenset(scheduled if keep_last is None else scheduled[-keep_last:])


def final_metrics(history: Sequence[dict[str, float]], last_k: int) -> dict[str, float]:
    """Mean of each metric over the last `last_k` evaluations (the paper's last-10-rounds mean)."""
    tail = list(history)[-last_k:]
    return {key: float(np.nanmean([h[key] for h in tail])) for key in tail[0]} if tail else {}
