"""Class splits: which classes a run trains on and which it only evaluates.

The base-to-novel protocol of CoOp and FedPGP sorts the class ids and cuts them at ceil(n / 2):
the first half are the *base* classes (trained and evaluated), the second half the *novel*
classes (evaluated only, with logits over the novel classes).

>>> base, novel = base_novel_split(5)
>>> base.tolist(), novel.tolist()
([0, 1, 2], [3, 4])
"""

from __future__ import annotations

import math

import numpy as np

from fpl_bench.errors import UsageError

__all__ = ["base_novel_split"]


def base_novel_split(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Split class ids ``0 .. n_classes - 1`` into (base, novel) at ``ceil(n_classes / 2)``.

    Reproduces CoOp's ``subsample_classes`` (KaiyangZhou/CoOp, ``datasets/oxford_pets.py``,
    ``OxfordPets.subsample_classes``: ``labels.sort(); m = math.ceil(n / 2)``; base =
    ``labels[:m]``, new = ``labels[m:]``), which FedPGP reuses for its base-to-novel results.
    CoOp then relabels each half to ``0 .. len - 1``; here the original class ids are kept and
    the evaluator restricts the logits to the half it evaluates, which gives the same accuracy.

    Args:
        n_classes: number of classes in the dataset, >= 1.

    Returns:
        ``(base, novel)``: sorted int64 arrays; ``base`` has ``ceil(n / 2)`` ids, ``novel`` the
        rest (empty when ``n_classes == 1``).
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer):
        raise UsageError(f"n_classes={n_classes!r}: must be an integer; pass the class count")
    if n_classes < 1:
        raise UsageError(
            f"n_classes={n_classes}: a dataset needs at least 1 class; check its labels"
        )
    ids = np.arange(int(n_classes), dtype=np.int64)
    m = math.ceil(int(n_classes) / 2)
    return ids[:m], ids[m:]
