"""Evaluation protocols: what is scored, over which classes, and how clients are averaged.

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
from dataclasses import dataclass

import numpy as np

METRICS = ("local_acc", "neighbor_acc", "base_acc", "novel_acc", "hm")
PROTOCOL_METRICS = {
    "personalized": ("local_acc", "neighbor_acc"),
    "base2novel": METRICS,
}


def accuracy(correct: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Fraction of True in correct[idx] (all of it when idx is None); nan when empty."""
    sel = correct if idx is None else correct[idx]
    return float(sel.mean()) if sel.size else math.nan


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when both are 0."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


@dataclass(frozen=True)
class ClientScores:
    """One client's predictions at one evaluation.

    seen_correct:  [N_seen] bool, test images of the trained classes, logits over those classes
    novel_correct: [N_novel] bool, novel test images, logits over novel classes (base2novel)
    """

    seen_correct: np.ndarray
    novel_correct: np.ndarray | None


def client_metrics(
    scores: ClientScores,
    *,
    seen_labels: np.ndarray,
    local_idx: np.ndarray,
    client_classes: np.ndarray,
) -> dict[str, float]:
    """local / neighbor / base / novel accuracy of one client.

    seen_labels: [N_seen] class ids of the seen test images; local_idx: positions (into the seen
    test images) of the client's local test set; client_classes: the classes it holds.
    """
    neighbor = np.flatnonzero(~np.isin(seen_labels, client_classes))
    out = {
        "local_acc": accuracy(scores.seen_correct, local_idx),
        "neighbor_acc": accuracy(scores.seen_correct, neighbor),
        "base_acc": accuracy(scores.seen_correct),
    }
    if scores.novel_correct is not None:
        out["novel_acc"] = accuracy(scores.novel_correct)
    return out


def mean_over_clients(per_client: Sequence[dict[str, float]], protocol: str) -> dict[str, float]:
    """Unweighted mean over clients of each metric the protocol reports (nan-aware); hm last."""
    names = [m for m in PROTOCOL_METRICS[protocol] if m != "hm"]
    out: dict[str, float] = {}
    for name in names:
        values = np.array([c[name] for c in per_client if name in c], dtype=float)
        finite = values[~np.isnan(values)]
        out[name] = float(finite.mean()) if finite.size else math.nan
    if "hm" in PROTOCOL_METRICS[protocol]:
        out["hm"] = harmonic_mean(out["base_acc"], out["novel_acc"])
    return out


def final_metrics(history: Sequence[dict[str, float]], last_k: int) -> dict[str, float]:
    """Mean of each metric over the last `last_k` evaluations (the paper's last-10-rounds mean)."""
    tail = list(history)[-last_k:]
    return {key: float(np.nanmean([h[key] for h in tail])) for key in tail[0]} if tail else {}
