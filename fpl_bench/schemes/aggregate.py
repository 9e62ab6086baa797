"""Server aggregation rules as free functions (Flower's `aggregate.py` idea).

FedAvg (McMahan et al., AISTATS 2017, arXiv:1602.05629): the new global value is the average of
the clients' values weighted by their number of training examples,
    w = sum_i n_i w_i / sum_i n_i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def weighted_mean(uploads: Sequence[tuple[Mapping[str, Tensor], float]]) -> dict[str, Tensor]:
    """Average each tensor of `uploads` = [(tensors, n_examples), ...] weighted by n_examples.

    Every upload must hold the same keys. Returns new tensors (no aliasing of the inputs).
    """
    if not uploads:
        raise ValueError("weighted_mean needs at least one upload")
    total = float(sum(n for _, n in uploads))
    if total <= 0:
        raise ValueError("weighted_mean needs a positive total weight")
    keys = list(uploads[0][0])
    return {
        key: torch.stack([tensors[key] * (n / total) for tensors, n in uploads]).sum(dim=0)
        for key in keys
    }
