"""The black-box one-run audit with input-space canaries (`fpl-bench audit --attacks input`).

Where `privacy/canary_audit.py` simulates the mechanism with white-box gradient canaries (the
strongest attacker a trust model allows), this audit trains the real method, through the real
driver and backbone, on data holding canary examples, and scores them with nothing but the
released models' answers (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023, Sec. 6: the black-box setting, mislabeled examples as canaries):

1. Canaries: m examples of the protocol's seen classes that no client was dealt (the train
   pool's, as the membership attacks' non-members; the test pool's where the partition deals
   every training example), each given to one client (a seeded shuffle, round robin) with a
   label drawn uniformly from that client's other classes (its own class where it has one).
2. Inclusion: S_j ~ Bernoulli(1/2), independent, from the seed; client c trains on its dealt
   examples plus its included canaries. The noise is calibrated for those client sizes at the
   target epsilon (`experiment.plan_run_privacy`), so the run is (eps, delta)-DP for every
   example, canaries included, and the bound below may not exceed eps.
3. One run of the method at the job's settings and seed (trust model, schedule, accountant).
4. Scores: Y_j = log p(canary label | canary image) under the model canary j's client releases
   (its prompt as evaluated at the last round): training on a canary raises it. The loss
   attack's score (`privacy/membership.py`), whose metrics audit.csv's row keeps as well.
5. Guesses and bound: `privacy/audit_bound.best_epsilon_lower_bound` (the k_+ highest scores
   guessed in, the k_- lowest out, Bonferroni over the fixed grid), at 95% confidence.

This module draws the canaries and grows the federation; `fpl_bench/audit.py`
(`input_canary_row`) trains, queries and bounds.

The attacker sees only the released models' outputs, under both trust models (it is the outsider
of `fpl_bench/audit.py`), so its bound is weaker than the white-box one; a run without DP gets a
bound too: what this attacker learns when nothing protects the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fpl_bench.data.partition import ClientSplit
from fpl_bench.driver import FeatureSet, Federation

INPUT_CANARIES = 1000  # m: at least 1000 in a CPU-sized run (the audit size)


@dataclass(frozen=True)
class Canaries:
    """m canaries: where their features come from (`source` rows), the client each is given
    to, the label it carries, and whether it is included (S_j)."""

    source: np.ndarray  # [m] int64 rows of the source FeatureSet
    client: np.ndarray  # [m] int64
    label: np.ndarray  # [m] int64 class ids (the canary's, not the image's)
    included: np.ndarray  # [m] bool

    @property
    def m(self) -> int:
        return len(self.source)


def draw_canaries(
    candidates: np.ndarray,
    candidate_labels: np.ndarray,
    client_classes: tuple[np.ndarray, ...],
    *,
    m: int,
    seed: int,
) -> Canaries:
    """min(m, len(candidates)) canaries from `candidates` (rows with true labels
    `candidate_labels`), dealt round robin after a seeded shuffle to the clients of
    `client_classes`, each relabeled to one of its client's classes other than its own (its
    client's only class where there is no other), included with probability 1/2."""
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(candidates))[:m]
    source = np.asarray(candidates, dtype=np.int64)[order]
    true = np.asarray(candidate_labels, dtype=np.int64)[order]
    client = np.arange(len(source), dtype=np.int64) % len(client_classes)
    label = np.empty(len(source), dtype=np.int64)
    for j, (c, y) in enumerate(zip(client, true, strict=True)):
        others = client_classes[c][client_classes[c] != y]
        label[j] = rng.choice(others) if others.size else client_classes[c][0]
    included = rng.random(len(source)) < 0.5
    return Canaries(source=source, client=client, label=label, included=included)


def with_canaries(fed: Federation, source: FeatureSet, canaries: Canaries) -> Federation:
    """`fed` whose train features gain the canaries as new rows (features of `source`, their
    canary labels) and whose clients train on their included canaries too."""
    idx = torch.as_tensor(canaries.source)
    train = fed.train

    def grown(ours: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
        if ours is None or theirs is None:
            return None
        return torch.cat([ours, theirs[idx].to(ours.dtype)])

    labels = torch.as_tensor(canaries.label, dtype=train.labels.dtype)
    features = FeatureSet(
        pooled=torch.cat([train.pooled, source.pooled[idx].to(train.pooled.dtype)]),
        tokens=grown(train.tokens, source.tokens),
        labels=torch.cat([train.labels, labels.to(train.labels.device)]),
        embedded=grown(train.embedded, source.embedded),
    )
    rows = canary_rows(fed, canaries)
    split = fed.split
    per_client = tuple(
        np.sort(np.concatenate([split.train[c], rows[canaries.included & (canaries.client == c)]]))
        for c in range(split.n_clients)
    )
    grown_split = ClientSplit(train=per_client, test=split.test, classes=split.classes)
    return Federation(train=features, test=fed.test, split=grown_split, protocol=fed.protocol)


def canary_rows(fed: Federation, canaries: Canaries) -> np.ndarray:
    """The canaries' rows in the features of `with_canaries(fed, ...)`."""
    return len(fed.train.labels) + np.arange(canaries.m, dtype=np.int64)
