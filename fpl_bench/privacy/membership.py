"""Membership-inference attacks on a released model's class probabilities (pure functions).

The attacker queries a client's released model (its personalized prompt on the public frozen
CLIP) with an example x of true class y and gets p(x), the softmax over the trained classes.
It guesses whether x was one of that client's training examples. `Outputs` holds the answers
for a set of queries with the truth; what is queried, and why those examples, is
`fpl_bench/audit.py`'s business. Both attacks return an `AttackResult` whose metrics are
`attack_metrics`' (balanced accuracy, AUC, TPR at 1% FPR).

Loss threshold (`loss_threshold_attack`). Yeom, Giacomelli, Fredrikson, Jha (IEEE CSF 2018):
score -loss(x, y) = log p_y(x). The attacker picks the threshold with the best balanced
accuracy on a random half of the queries whose membership it knows (stratified by membership,
`calibration_half`) and the balanced accuracy is that threshold's on the other half; AUC and
TPR at 1% FPR need no threshold and are taken over all queries.

Shadow models per label (`shadow_model_attack`): the attack of the DP-FPL paper (Tran et al.,
"Privacy-Preserving Personalized Federated Prompt Learning for Multimodal Large Language
Models", ICLR 2025), after Shokri et al. (IEEE S&P 2017). The attacker trains shadow runs, runs
of the same method, budget and configuration whose members it knows, and records their
released models' probability vectors for members and non-members (`shadow`). For each label y
it fits a binary classifier from p(x) to membership on the shadow queries of label y, and
scores each target query of label y with that classifier: P(member), "member" at >= 1/2.

As read in the reference (linhhtran/DP-FPL: `mia_train.py`, `mia_test.py`; the script that
writes the shadow files is not in the repository): shadow data are 50 files
`shadow_{noise}_{seed}.pkl` (seeds 0-49) of tuples (softmax over all classes, membership,
label); members and non-members are truncated to the smaller count; per label, an MLP
Linear(n_classes, 32) -> ReLU -> Linear(32, 2) -> Sigmoid is trained with cross-entropy on the
sigmoid outputs, Adam lr 0.01, batch 1, 200 epochs; the target client's in/out samples of that
label are fed through the model (softmax of its logits) and the plain accuracy per label is
averaged over labels ("MIA success"). Departures here, each a choice the reference leaves
unsaid or gets wrong:

- one logit and binary cross-entropy (the reference feeds two sigmoid outputs in (0, 1) to
  softmax cross-entropy, which caps the logit gap at 1 and P(member) at e / (1 + e) = 0.73),
  full-batch Adam (same lr and epochs) from a seeded initialisation; members and non-members
  weighted to equal total weight instead of truncated, so no shadow query is dropped;
- the reference means to keep the epoch of least training loss but keeps a reference to the
  live module (`.cpu()` returns it), so the last epoch's model is used: as here;
- a label with no shadow member or no shadow non-member falls back to one classifier fitted
  on every label's shadow queries (the reference has no model for it and would fail);
- the reference's target (seed 1 by default; client `max_idx`, its in/out samples
  `mia_in`/`mia_out` built by code not in the repository) has its seed among the shadow seeds
  0-49, so unless the shadow files come from other runs its classifiers were fitted on the
  target's own answers; here a run never shadows itself;
- reported: balanced accuracy (not plain accuracy, so a member share other than 1/2 does not
  move chance off 0.5), pooled over the target's labels, with AUC and TPR at 1% FPR of the
  scores P(member).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fpl_bench.privacy.attack_metrics import (
    balanced_accuracy,
    held_out_accuracy,
    roc_auc,
    tpr_at_fpr,
)

LOW_FPR = 0.01  # TPR is reported at this FPR (Carlini et al. 2022)
MIN_PROB = 1e-12  # probabilities are clamped here before the log of the loss


class TooFewQueries(ValueError):
    """An attack was given too few members or non-members to be scored."""


@dataclass(frozen=True)
class Outputs:
    """A released model's answers to membership queries, with the truth.

    probs: [N, K] class probabilities over the K trained classes; labels: [N] the true class
    of each query as a position 0..K-1; is_member: [N] bool, True for a training example of
    the client whose model answered."""

    probs: np.ndarray
    labels: np.ndarray
    is_member: np.ndarray

    def __post_init__(self) -> None:
        probs = np.asarray(self.probs, dtype=np.float32)
        labels = np.asarray(self.labels, dtype=np.int64)
        members = np.asarray(self.is_member, dtype=bool)
        if probs.ndim != 2 or labels.shape != (len(probs),) or members.shape != labels.shape:
            raise ValueError(
                f"probs [N, K], labels [N], is_member [N]: got {probs.shape}, {labels.shape}, "
                f"{members.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
            raise ValueError(f"labels must be positions 0..{probs.shape[1] - 1}")
        object.__setattr__(self, "probs", probs)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "is_member", members)

    @staticmethod
    def concat(parts: Sequence[Outputs]) -> Outputs:
        """The queries of every part, in order (all over the same K classes)."""
        return Outputs(
            np.concatenate([p.probs for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.is_member for p in parts]),
        )

    @property
    def n_members(self) -> int:
        return int(np.count_nonzero(self.is_member))

    @property
    def n_nonmembers(self) -> int:
        return int(self.is_member.size - self.n_members)

    def losses(self) -> np.ndarray:
        """Cross-entropy of each query at its true class: -log p_y (p_y clamped at 1e-12)."""
        p_true = self.probs[np.arange(len(self.labels)), self.labels].astype(np.float64)
        return -np.log(np.maximum(p_true, MIN_PROB))


@dataclass(frozen=True)
class AttackResult:
    """One attack's success on one target: balanced accuracy of its hard guesses, AUC and TPR
    at 1% FPR of its scores, over n_members + n_nonmembers queries."""

    attack: str
    balanced_acc: float
    auc: float
    tpr_at_1fpr: float
    n_members: int
    n_nonmembers: int


def _result(attack: str, balanced: float, scores: np.ndarray, target: Outputs) -> AttackResult:
    return AttackResult(
        attack=attack,
        balanced_acc=float(balanced),
        auc=roc_auc(scores, target.is_member),
        tpr_at_1fpr=tpr_at_fpr(scores, target.is_member, max_fpr=LOW_FPR),
        n_members=target.n_members,
        n_nonmembers=target.n_nonmembers,
    )


def calibration_half(is_member: np.ndarray, *, seed: int) -> np.ndarray:
    """A boolean mask of about half the queries, drawn apart among members and non-members
    (each side's first floor(n/2) of a seeded permutation; at least one of each side is left
    on both halves when the side has two or more)."""
    members = np.asarray(is_member, dtype=bool)
    rng = np.random.default_rng(seed)
    mask = np.zeros(members.size, dtype=bool)
    for side in (np.flatnonzero(members), np.flatnonzero(~members)):
        chosen = rng.permutation(side)[: side.size // 2]
        mask[chosen] = True
    return mask


def loss_threshold_attack(target: Outputs, *, seed: int) -> AttackResult:
    """Yeom et al.'s attack on `target`: threshold on -loss chosen on `calibration_half`,
    balanced accuracy on the other half; AUC and TPR at 1% FPR over all queries. Needs at
    least two members and two non-members (one on each half)."""
    _check_sides(target, "target", minimum=2)
    scores = -target.losses()
    half = calibration_half(target.is_member, seed=seed)
    members = target.is_member
    balanced = held_out_accuracy(scores[half], members[half], scores[~half], members[~half])
    return _result("loss", balanced, scores, target)


Classifier = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # w1, b1, w2, b2
BATCH_ELEMENTS = 2**24  # inputs fitted in one batch of classifiers (floats, padding included)


@dataclass(frozen=True)
class AttackModel:
    """Training settings of the per-label classifiers: Linear(K, hidden) -> ReLU ->
    Linear(hidden, 1), full-batch Adam at `lr` for `epochs` steps (the reference: 32, 0.01,
    200)."""

    hidden: int = 32
    epochs: int = 200
    lr: float = 0.01

    def fit(
        self, data: Sequence[tuple[np.ndarray, np.ndarray]], *, seeds: Sequence[int]
    ) -> list[Classifier]:
        """One classifier per (x [n, K], y [n] bool) of `data`, each from its seed, by
        class-balanced binary cross-entropy (members and non-members each carry half the
        weight). They are fitted side by side in padded batches: the losses are independent
        and Adam acts per element, so that is fitting each alone."""
        out: list[Classifier] = []
        start = 0
        while start < len(data):
            stop = start + 1
            while stop < len(data) and self._elements(data[start : stop + 1]) <= BATCH_ELEMENTS:
                stop += 1
            out += self._fit_batch(data[start:stop], seeds[start:stop])
            start = stop
        return out

    @staticmethod
    def _elements(data: Sequence[tuple[np.ndarray, np.ndarray]]) -> int:
        return len(data) * max(len(x) for x, _ in data) * data[0][0].shape[1]

    def _fit_batch(
        self, data: Sequence[tuple[np.ndarray, np.ndarray]], seeds: Sequence[int]
    ) -> list[Classifier]:
        n_max, k = max(len(x) for x, _ in data), data[0][0].shape[1]
        inputs = torch.zeros(len(data), n_max, k)
        target = torch.zeros(len(data), n_max)
        balance = torch.zeros(len(data), n_max)  # 0 on padding
        for i, (x, y) in enumerate(data):
            members = torch.as_tensor(np.asarray(y, dtype=bool))
            inputs[i, : len(x)] = torch.as_tensor(np.asarray(x, dtype=np.float32))
            target[i, : len(x)] = members.float()
            n_pos, n_neg = int(members.sum()), int((~members).sum())
            balance[i, : len(x)] = torch.where(members, 0.5 / max(n_pos, 1), 0.5 / max(n_neg, 1))
        weights = [torch.stack(w) for w in zip(*(self._init(k, s) for s in seeds), strict=True)]
        for w in weights:
            w.requires_grad_(True)
        optimizer = torch.optim.Adam(weights, lr=self.lr)
        for _ in range(self.epochs):
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                self._logits(weights, inputs), target, weight=balance, reduction="sum"
            )
            loss.backward()
            optimizer.step()
        w1, b1, w2, b2 = (w.detach() for w in weights)
        return [(w1[i], b1[i], w2[i], b2[i]) for i in range(len(data))]

    def _init(self, k: int, seed: int) -> Classifier:
        gen = torch.Generator().manual_seed(seed)
        w1 = torch.randn(k, self.hidden, generator=gen) / k**0.5
        w2 = torch.randn(self.hidden, 1, generator=gen) / self.hidden**0.5
        return w1, torch.zeros(1, self.hidden), w2, torch.zeros(1, 1)

    @staticmethod
    def _logits(weights: Sequence[torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        """[..., n] logits of inputs [..., n, K] (weights with the same leading dims)."""
        w1, b1, w2, b2 = weights
        return (torch.relu(inputs @ w1 + b1) @ w2 + b2).squeeze(-1)

    def member_probability(self, classifier: Classifier, x: np.ndarray) -> np.ndarray:
        """P(member) [n] of queries x [n, K]."""
        with torch.no_grad():
            logits = self._logits(classifier, torch.as_tensor(np.asarray(x, dtype=np.float32)))
        return torch.sigmoid(logits).double().numpy()


def shadow_model_attack(
    shadow: Outputs, target: Outputs, *, seed: int, model: AttackModel | None = None
) -> AttackResult:
    """The DP-FPL paper's attack: per label y, a classifier fitted on the shadow queries of
    label y (the pooled fallback where they lack a member or a non-member) scores the target
    queries of label y; guesses "member" at P(member) >= 1/2."""
    model = model or AttackModel()
    _check_sides(shadow, "shadow", minimum=1)
    _check_sides(target, "target", minimum=1)
    if shadow.probs.shape[1] != target.probs.shape[1]:
        raise ValueError(
            f"shadow and target answer over {shadow.probs.shape[1]} and "
            f"{target.probs.shape[1]} classes"
        )
    labels = np.unique(target.labels)
    own = []  # labels whose shadow queries hold both sides
    for label in labels:
        sides = shadow.is_member[shadow.labels == label]
        if sides.any() and not sides.all():
            own.append(int(label))
    data = [(shadow.probs[shadow.labels == y], shadow.is_member[shadow.labels == y]) for y in own]
    seeds = [_stream(seed, y) for y in own]
    if len(own) < len(labels):  # the pooled fallback
        data.append((shadow.probs, shadow.is_member))
        seeds.append(_stream(seed, -1))
    fitted = model.fit(data, seeds=seeds)
    by_label = dict(zip(own, fitted, strict=False))
    scores = np.zeros(len(target.labels))
    for label in labels:
        queried = target.labels == label
        classifier = by_label.get(int(label), fitted[-1])
        scores[queried] = model.member_probability(classifier, target.probs[queried])
    balanced = balanced_accuracy(scores >= 0.5, target.is_member)
    return _result("shadow", balanced, scores, target)


def _stream(seed: int, label: int) -> int:
    """A seed for the classifier of `label` (-1: the pooled one), independent across labels."""
    entropy = [int(seed) % 2**32, int(label) % 2**32]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _check_sides(outputs: Outputs, name: str, *, minimum: int) -> None:
    if outputs.n_members < minimum or outputs.n_nonmembers < minimum:
        raise TooFewQueries(
            f"the {name} queries need at least {minimum} member(s) and {minimum} "
            f"non-member(s), got {outputs.n_members} and {outputs.n_nonmembers}"
        )
