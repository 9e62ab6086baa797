"""The federated driver: rounds, client sampling, local steps, synchronisation, evaluation.

One loop serves every learner x scheme pair: it calls the method's hooks (fpl_bench/method.py,
fpl_bench/schemes/_base.py) and `privacy/` functions, and never names a learner or a scheme. All
randomness is drawn from the run seed: the clients of each round are drawn up front (so a
method's own use of randomness cannot change who is sampled), and each (round, client, step)
gets its own generator for batches, factorizations and noise.

Clients step in lockstep: local step s of every sampled client runs before step s + 1 of any.
Where shared parameters meet the server is decided once per run by
`privacy.placement.place_noise` (the scheme's own sync, or every step under DP with a trusted
server) and carried out by one of two synchronisers below, `RoundSync` (FedAvg: clients train
their copy, the scheme aggregates the uploads at the round's end) and `StepSync` (the server
holds the shared parameters and applies the aggregate of the clients' gradients every step).

Privacy (when a `NoisePlan` is given): Poisson sampling with rate q_i = min(1, B / n_i) per
step, per-sample gradients of the step parameters clipped jointly to C, noise where the
placement says: by the client on its clipped sum, or by the server once on the sum over the
step's clients, each divided by the expected batch size (Abadi et al. 2016, Alg. 1). A prior
(data-independent loss) is added outside clipping, without noise. Under DP no training loss is
recorded (it is computed from private records and not noised).

How a step's gradients are computed (never what, up to float rounding) is
`step_compute.StepComputer`'s business, switched by `Compute`: by default the active clients of
a step go through ONE text-tower forward and ONE vmapped backward, then each client's gradients
are clipped, noised and applied here with its own optimizer state, as one by one. The
step loop makes no host sync: batch indices of a round go to the device at the round's start,
and the training loss is accumulated on the device and read once per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fpl_bench.data.partition import ClientSplit
from fpl_bench.errors import FplError
from fpl_bench.evaluate import evaluation_rounds
from fpl_bench.learners._base import EncodeContext, InitContext, Params
from fpl_bench.method import Method
from fpl_bench.privacy.mechanism import clipped_sum, noisy_mean, secure_uniform
from fpl_bench.privacy.per_sample import (
    StepGrads,
)
from fpl_bench.privacy.placement import Placement, Trust, place_noise
from fpl_bench.privacy.planning import client_budgets, sample_rate, steps_per_round
from fpl_bench.protocols import Protocol
from fpl_bench.schemes._base import RoundEnd
from fpl_bench.step_compute import Compute, StepComputer, equal_values
from fpl_bench.text_tower import TextTower
from fpl_bench.vision import VisionTower

__all__ = [
    "Compute",
    "Diverged",
    "FeatureSet",
    "FederatedRun",
    "Federation",
    "NoisePlan",
    "Schedule",
    "client_schedule",
    "epoch_batches",
    "poisson_batch",
    "sample_rate",
    "sgd_step",
    "steps_per_round",
]


class Diverged(FplError):
    """A run's parameters went non-finite; it is recorded as `diverged`, not as accuracy."""

    def __init__(self, round_no: int) -> None:
        super().__init__(f"parameters became non-finite in round {round_no}")
        self.round_no = round_no


@dataclass(frozen=True)
class FeatureSet:
    """Cached image features of one split: pooled [N, D], patch tokens [N, P, D] or None, and
    the image tower's input tokens [N, T, W_v] or None (for learners that prompt it)."""

    pooled: Tensor
    tokens: Tensor | None
    labels: Tensor  # [N] int64 class ids
    embedded: Tensor | None = None

    def take(self, idx: Tensor, *, embedded: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """(pooled, tokens, labels) of examples `idx`; `embedded`: the image tower's input
        tokens in the tokens slot."""
        source = self.embedded if embedded else self.tokens
        tokens = None if source is None else source[idx].float()
        return self.pooled[idx], tokens, self.labels[idx]


@dataclass(frozen=True)
class Federation:
    """The data of one federated run: features, the client split, the protocol."""

    train: FeatureSet
    test: FeatureSet
    split: ClientSplit
    protocol: Protocol


@dataclass(frozen=True)
class Schedule:
    rounds: int
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    client_fraction: float = 1.0
    eval_every: int = 1
    # only the last k evaluations of the every-`eval_every` schedule (those the result
    # averages: evaluate.evaluation_rounds); None: all of them, a learning curve
    eval_last: int | None = None


@dataclass(frozen=True)
class NoisePlan:
    """What the driver needs to privatize: the noise multiplier sigma and the clipping norm C
    (sampling rates follow from the client sizes and the batch size)."""

    noise_multiplier: float
    clip_norm: float
    secure: bool = False  # draw noise and batches from the OS's secure source, not the run seed


@dataclass
class ClientState:
    params: Params
    momentum: Params = field(default_factory=dict)
    anchor: Params = field(default_factory=dict)  # the scheme's round-start values (FedProx)
    state: Params = field(default_factory=dict)  # the scheme's untrained state (SCAFFOLD's c_i)


@dataclass(frozen=True)
class Upload:
    """What one client sends the server in a step-synchronised step."""

    grads: Params  # mean gradient, client-noised gradient, or clipped per-sample SUM
    weight: float  # batch size, or expected batch size under DP
    prior: Params | None = None  # gradient of the prior on shared parameters (DP only)


def training_groups(n_clients: int, *, pooled: bool) -> list[list[int]]:
    """The clients whose data each trainer holds: one trainer per client, or (a scheme that
    pools clients: the centralised bound) one trainer for everyone's data."""
    return [list(range(n_clients))] if pooled else [[c] for c in range(n_clients)]


def stream_seed(*keys: int) -> int:
    """A 63-bit seed for one (seed, stream, round, client, step) tuple, independent across keys."""
    entropy = [int(k) % 2**32 for k in keys]  # -1 marks "no client" / "evaluation"
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*keys))


_BATCH, _NOISE, _PARAMS, _INIT = 1, 2, 3, 4


def client_schedule(n_clients: int, *, rounds: int, fraction: float, seed: int) -> list[list[int]]:
    """Clients sampled in each round, drawn up front from the seed: max(1, round(f * n)) each."""
    rng = np.random.default_rng(stream_seed(seed, 0))
    k = max(1, round(fraction * n_clients))
    return [sorted(rng.choice(n_clients, size=k, replace=False).tolist()) for _ in range(rounds)]


def epoch_batches(n: int, *, batch_size: int, steps: int, seed_keys: Sequence[int]) -> list[Tensor]:
    """Shuffled mini-batches (positions 0..n-1) for `steps` steps, reshuffled each epoch."""
    per_epoch = max(1, math.ceil(n / batch_size))
    out: list[Tensor] = []
    for epoch in range(math.ceil(steps / per_epoch)):
        perm = torch.randperm(n, generator=generator(*seed_keys, epoch))
        out.extend(perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
    return out[:steps]


def poisson_batch(n: int, *, rate: float, gen: torch.Generator | None) -> Tensor:
    """Positions of a Poisson-sampled batch: each of n examples independently with prob `rate`;
    `gen=None` draws from the OS's secure source (`secure_uniform`), not a seeded stream."""
    uniform = secure_uniform(n) if gen is None else torch.rand(n, generator=gen)
    return torch.nonzero(uniform < rate).flatten()


def sgd_step(
    params: Params, grads: Mapping[str, Tensor], momentum: Params, *, lr: float, beta: float
) -> None:
    """In place: buf = beta * buf + g; p -= lr * buf (torch.optim.SGD's rule, dampening 0)."""
    for name, grad in grads.items():
        buf = momentum.get(name)
        buf = grad.clone() if buf is None else buf.mul_(beta).add_(grad)
        momentum[name] = buf
        params[name] = params[name] - lr * buf


def _sum(tensors: Sequence[Params]) -> Params:
    return {k: torch.stack([t[k] for t in tensors]).sum(0) for k in tensors[0]}


class RoundSync:
    """FedAvg-style: the sampled clients copy the server's shared values when the round starts,
    train them like personal ones, and the scheme aggregates their uploads at the round's end."""

    def __init__(self, run: FederatedRun) -> None:
        self.run = run

    def view(self, client: int) -> Params:
        return dict(self.run.clients[client].params)

    def begin_round(self, sampled: Sequence[int]) -> None:
        run = self.run
        for c in sampled:
            state = run.clients[c]
            state.params.update({k: v.clone() for k, v in run.server.items()})
            if run.method.scheme.resets_shared_momentum:
                for k in run.server:
                    state.momentum.pop(k, None)

    def trains_locally(self, name: str) -> bool:
        return True

    def end_step(self, uploads: list[Upload], rnd: int, step_no: int, active: list[int]) -> None:
        """Nothing reaches the server mid-round."""

    def end_round(self, sampled: Sequence[int]) -> None:
        run = self.run
        if run.server:
            scheme = run.method.scheme
            upload = run.method.upload
            uploads = [(upload(run.clients[c].params), run.n_train[c]) for c in sampled]
            run.server, run.server_state = scheme.server_update(
                run.server, scheme.aggregate(uploads), run.server_state
            )


class StepSync:
    """The server holds the shared parameters; every local step it applies the aggregate of the
    clients' gradients of them (DP-FPL's reference syncs p_G's gradient every batch)."""

    def __init__(self, run: FederatedRun) -> None:
        self.run = run

    def view(self, client: int) -> Params:
        return {**self.run.clients[client].params, **self.run.server}

    def begin_round(self, sampled: Sequence[int]) -> None:
        """The server's values are read at every step; nothing to copy."""

    def trains_locally(self, name: str) -> bool:
        return name not in self.run.server

    def end_step(self, uploads: list[Upload], rnd: int, step_no: int, active: list[int]) -> None:
        """Server trust under DP: (sum of clipped sums + N(0, (sigma C)^2)) / sum E[B] plus the
        weighted prior gradients; otherwise the scheme's aggregate of the clients' gradients."""
        run = self.run
        if not uploads or not run.server:
            return
        if run.placement.server:
            total_weight = sum(u.weight for u in uploads)
            grad = noisy_mean(
                _sum([u.grads for u in uploads]),
                noise_multiplier=run.noise.noise_multiplier,
                clip_norm=run.noise.clip_norm,
                expected_batch=total_weight,
                generator=run.noise_generator(rnd, -1, step_no),
            )
            priors = [(u.prior, u.weight) for u in uploads if u.prior]
            if priors:
                prior = run.method.scheme.aggregate(priors)
                grad = {k: g + prior[k] if k in prior else g for k, g in grad.items()}
        else:
            nonempty = [(u.grads, u.weight) for u in uploads if u.weight > 0]
            if not nonempty:
                return
            grad = run.method.scheme.aggregate(nonempty)
        sgd_step(run.server, grad, run.server_momentum, lr=run.sched.lr, beta=run.sched.momentum)

    def end_round(self, sampled: Sequence[int]) -> None:
        """The server already holds the result."""


SYNCHRONISERS: dict[str, type] = {"round": RoundSync, "step": StepSync}


@dataclass
class RunOutput:
    history: list[dict[str, float]]  # one dict per evaluation, with "round"
    schedule: list[list[int]]
    per_client: list[list[dict[str, float]]]
    rounds_done: int = 0


class FederatedRun:
    """State and loop of one federated run of one method (one seed, one privacy setting)."""

    def __init__(
        self,
        method: Method,
        tower: TextTower,
        fed: Federation,
        *,
        schedule: Schedule,
        seed: int,
        noise: NoisePlan | None = None,
        trust: Trust = "server",
        ctx_init: str | None = None,
        compute: Compute | None = None,
        vision: VisionTower | None = None,
    ) -> None:
        self.method, self.tower, self.fed = method, tower, fed
        self.sched, self.seed, self.trust = schedule, seed, trust
        self.compute = compute or Compute()
        self.noise: NoisePlan | None = None
        # Who trains: one trainer per client, or one for the pooled data of all (central).
        groups = training_groups(fed.split.n_clients, pooled=method.scheme.pools_clients)
        self.trainer_of = [i for i, group in enumerate(groups) for _ in group]
        n_clients = len(groups)
        self.vision = vision  # the image tower, for a learner that prompts it
        init = InitContext(
            tower=tower, generator=generator(seed, _INIT), ctx_init=ctx_init, vision=vision
        )
        base, self.consts = method.init(init)
        client_state, self.server_state = method.scheme.init_state(base)
        # Every client starts from the same initial values (a shared starting point, as FedAvg).
        self.server: Params = {k: base[k].clone() for k in method.shared}
        self.clients = [
            ClientState(
                {k: v.clone() for k, v in base.items()},
                state={k: v.clone() for k, v in client_state.items()},
            )
            for _ in range(n_clients)
        ]
        self.server_momentum: Params = {}
        # each trainer's round-weighted average of its evaluation view and the weight so far,
        # for a learner that evaluates one (`PromptLearner.round_weight`); empty otherwise
        self.averaged: list[tuple[Params, float]] = []
        train = [np.concatenate([fed.split.train[c] for c in g]).astype(np.int64) for g in groups]
        self.n_train = [len(idx) for idx in train]
        self.train_idx = [torch.from_numpy(idx) for idx in train]
        self.rounds_schedule = client_schedule(
            n_clients, rounds=schedule.rounds, fraction=schedule.client_fraction, seed=seed
        )
        self.steps = [
            steps_per_round(n, batch_size=schedule.batch_size, local_epochs=schedule.local_epochs)
            for n in self.n_train
        ]
        device = fed.train.labels.device
        seen = torch.as_tensor(fed.protocol.seen_classes, dtype=torch.long, device=device)
        # Labels as positions in the seen class set (the logits' columns).
        position = torch.full((int(fed.train.labels.max()) + 1,), -1, dtype=torch.long)
        position[seen[seen < len(position)].cpu()] = torch.arange(int((seen < len(position)).sum()))
        self.train_targets = position.to(device)[fed.train.labels]
        self.ctx_seen = EncodeContext(
            tower=tower, class_idx=seen, consts=self.consts, vision=vision
        )
        self.steps_computer = StepComputer(self)
        self._set_placement()
        if noise is not None:
            self.enable_privacy(noise)

    def _set_placement(self) -> None:
        scheme = self.method.scheme
        self.placement: Placement = place_noise(
            step_names=self._step_names(),
            shared=self.method.shared,
            scheme_sync=scheme.sync,
            trust=self.trust,
            private=self.noise is not None,
        )
        self.sync = SYNCHRONISERS[self.placement.sync](self)

    def enable_privacy(self, noise: NoisePlan) -> None:
        """Turn DP on: Poisson batches, per-sample clipping, noise where the placement says."""
        self.noise = noise
        self._set_placement()

    @property
    def private(self) -> bool:
        return self.noise is not None

    # -- helpers ----------------------------------------------------------------------------
    def _step_names(self) -> list[str]:
        view = {**self.clients[0].params, **self.server}
        step, _ = self.method.step_params(view, generator(self.seed, _PARAMS, 0, 0, 0))
        return list(step)

    def view(self, client: int, *, evaluation: bool = False) -> Params:
        """The parameters client `client` computes with: its own, with the server's shared
        values when synchronised per step and at every evaluation. In training `client` is a
        trainer; in evaluation a client of the split (a pooled trainer serves them all)."""
        if evaluation:
            trainer = self.trainer_of[client]
            if self.averaged:
                return dict(self.averaged[trainer][0])
            return {**self.clients[trainer].params, **self.server}
        return self.sync.view(client)

    def _average_views(self, rnd: int) -> None:
        """After round `rnd` (0-based), fold each trainer's parameters into the average its
        learner evaluates with, if it asks for one: a_r = a_{r-1} + (w_r / W_r)(p_r - a_{r-1}),
        W_r = W_{r-1} + w_r, i.e. a_r = sum_t w_t p_t / W_r (kept as a running mean, so that
        tiny early weights neither underflow nor divide by zero)."""
        weight = self.method.learner.round_weight(rnd + 1, self.sched.rounds)
        if weight is None:
            return
        views = [{**state.params, **self.server} for state in self.clients]
        if not self.averaged:
            self.averaged = [({k: v.clone() for k, v in view.items()}, 0.0) for view in views]
        for t, view in enumerate(views):
            mean, total = self.averaged[t]
            total += weight
            if total > 0:
                share = weight / total
                mean = {k: a + share * (view[k] - a) for k, a in mean.items()}
            self.averaged[t] = (mean, total)

    def budget(self) -> list[tuple[float, int]]:
        """(sampling rate, number of noisy steps) that touch each client's data over the run."""
        return client_budgets(
            self.n_train,
            batch_size=self.sched.batch_size,
            local_epochs=self.sched.local_epochs,
            schedule=self.rounds_schedule,
        )

    def noise_generator(self, rnd: int, client: int, step_no: int) -> torch.Generator | None:
        """The seeded stream of one noise draw; None (the secure source) with `secure`.

        On a CUDA device the generator lives on the device (same seed): the noise is drawn
        there, with no host-to-device copy (a sync) per step. Reproducible per device; CPU and
        CUDA draw different numbers from the same seed.
        """
        if self.noise is not None and self.noise.secure:
            return None
        device = self.fed.train.labels.device
        if device.type != "cuda":
            return generator(self.seed, _NOISE, rnd, client, step_no)
        seed = stream_seed(self.seed, _NOISE, rnd, client, step_no)
        return torch.Generator(device=device).manual_seed(seed)

    def expected_batch(self, client: int) -> float:
        n = self.n_train[client]
        return sample_rate(n, self.sched.batch_size) * n

    # -- one local step -----------------------------------------------------------------------
    def _batch(self, client: int, rnd: int, step: int, epoch_plan: list[Tensor] | None) -> Tensor:
        if not self.private:
            assert epoch_plan is not None
            return epoch_plan[step]
        rate = sample_rate(self.n_train[client], self.sched.batch_size)
        # secure noise: the batches too (amplification by sampling needs them unknown, and the
        # seed is recorded with the run), as Opacus' secure_mode samples its batches
        secure = self.noise is not None and self.noise.secure
        gen = None if secure else generator(self.seed, _BATCH, rnd, client, step)
        return poisson_batch(self.n_train[client], rate=rate, gen=gen)

    def step_inputs(
        self, client: int, rnd: int, step_no: int, idx: Tensor
    ) -> tuple[Params, Params, tuple[Tensor, Tensor, Tensor]]:
        """(step params, aux, (pooled [B, D], tokens [B, P, D] or [B, 0], targets [B])) of one
        client's step on the training examples `idx` (indices into the train features)."""
        step, aux = self.method.step_params(
            self.view(client), generator(self.seed, _PARAMS, rnd, client, step_no)
        )
        step = {k: v.detach() for k, v in step.items()}
        pooled, tokens, _ = self.fed.train.take(idx, embedded=self.method.prompts_image_tower)
        if tokens is None:
            tokens = pooled.new_zeros(len(idx), 0)
        return step, aux, (pooled, tokens, self.train_targets[idx])

    def _gradients(
        self, client: int, rnd: int, step_no: int, positions: Tensor
    ) -> tuple[Params, StepGrads]:
        """One client's step on its examples `positions` (0 .. n_i - 1)."""
        idx = self.train_idx[client][positions].to(self.fed.train.labels.device)
        return self.steps_computer.one(client, rnd, step_no, idx)

    def local_gradients(
        self,
        client: int,
        rnd: int,
        step_no: int,
        positions: Tensor,
        computed: tuple[Params, StepGrads] | None = None,
    ) -> tuple[Params, Params, Upload | None, Tensor]:
        """Gradients of one local step of one client.

        Returns (step params, gradients applied by the client, what goes to the server (step
        sync only), mean loss as a 0-dim tensor on the device, NaN for an empty batch). Without
        DP the gradients are of mean loss + prior. With DP the per-sample gradients of all step
        parameters are clipped jointly; client-placed ones get the client's noise, server-placed
        ones go up as clipped sums (the server noises them). `computed`: the step's (params,
        StepGrads) when already computed (batched with other clients); `positions` (the client's
        examples, 0 .. n_i - 1) are then only counted.
        """
        step, g = computed or self._gradients(client, rnd, step_no, positions)
        loss = g.losses.mean()  # NaN for an empty batch; no host sync
        local, upload = self._privatize(client, rnd, step_no, g, len(positions))
        return step, local, upload, loss

    def _privatize(
        self, client: int, rnd: int, step_no: int, g: StepGrads, n_samples: int
    ) -> tuple[Params, Upload | None]:
        """(gradients the client applies, upload to the server or None) from a step's
        StepGrads: see `local_gradients`."""
        to_server = set(self.server) if self.placement.sync == "step" else set()
        if not self.private:
            local = {k: v for k, v in g.data.items() if k not in to_server}
            up = {k: v for k, v in g.data.items() if k in to_server}
            return local, Upload(up, float(n_samples)) if to_server else None
        plan = self.noise
        assert plan is not None
        sums = clipped_sum(g.data, clip_norm=plan.clip_norm)
        expected = self.expected_batch(client)
        noisy = noisy_mean(
            {k: sums[k] for k in self.placement.client},
            noise_multiplier=plan.noise_multiplier,
            clip_norm=plan.clip_norm,
            expected_batch=expected,
            generator=self.noise_generator(rnd, client, step_no),
        )
        prior = g.prior or {}
        client_grads = {k: v + prior[k] if k in prior else v for k, v in noisy.items()}
        upload = None
        if to_server:
            if self.placement.server:  # clipped sums; the server adds the noise
                shared = {k: sums[k] for k in self.placement.server}
                shared_prior = {k: prior[k] for k in self.placement.server if k in prior}
                upload = Upload(shared, expected, shared_prior or None)
            else:  # client trust: already noised by the client
                upload = Upload({k: client_grads[k] for k in to_server}, expected)
        local = {k: v for k, v in client_grads.items() if k not in to_server}
        return local, upload

    def _round_indices(
        self, sampled: Sequence[int], rnd: int, plans: Mapping[int, list[Tensor] | None]
    ) -> dict[tuple[int, int], Tensor]:
        """{(client, step): indices into the train features} for the whole round, moved to the
        features' device in one transfer (no host sync inside the step loop)."""
        keys, parts = [], []
        for c in sampled:
            for s in range(self.steps[c]):
                keys.append((c, s))
                parts.append(self.train_idx[c][self._batch(c, rnd, s, plans[c])])
        if not parts:
            return {}
        device = self.fed.train.labels.device
        flat = torch.cat(parts)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        split = flat.split([len(p) for p in parts])
        return dict(zip(keys, split, strict=True))

    # -- rounds ---------------------------------------------------------------------------------
    def run_round(self, rnd: int) -> float:
        """Train one round; returns the mean training loss over the round's steps (NaN under
        DP, where it is never released)."""
        sched, scheme = self.sched, self.method.scheme
        sampled = self.rounds_schedule[rnd]
        plans = {
            c: None
            if self.private
            else epoch_batches(
                self.n_train[c],
                batch_size=sched.batch_size,
                steps=self.steps[c],
                seed_keys=(self.seed, _BATCH, rnd, c),
            )
            for c in sampled
        }
        self.sync.begin_round(sampled)
        for c in sampled:  # what a scheme's server state hands the client (pFedMoAP's experts)
            state = self.clients[c]
            state.params = scheme.round_download(c, state.params, state.state, self.server_state)
        starts = {c: self.view(c) for c in sampled}  # what each client starts the round from
        for c in sampled:
            self.clients[c].anchor = scheme.round_start(self.clients[c].params, self.server)
        indices = self._round_indices(sampled, rnd, plans)
        loss_sum: Tensor | float = 0.0  # sum over steps of each step's mean loss, on the device
        n_losses = 0
        for s in range(max(self.steps[c] for c in sampled)):
            active = [c for c in sampled if s < self.steps[c]]
            uploads: list[Upload] = []
            for group in self.steps_computer.groups(active):
                idx = [indices[(c, s)] for c in group]
                if len(group) == 1:
                    results = [self.steps_computer.one(group[0], rnd, s, idx[0])]
                else:
                    results = self.steps_computer.batched(group, rnd, s, idx)
                for c, computed, batch in zip(group, results, idx, strict=True):
                    step, local, upload, loss = self.local_gradients(c, rnd, s, batch, computed)
                    if not self.private and len(batch):
                        loss_sum = loss_sum + loss
                        n_losses += 1
                    state = self.clients[c]
                    grads = self.method.param_grads(self.view(c), step, local)
                    mine = {k: v for k, v in grads.items() if self.sync.trains_locally(k)}
                    mine = scheme.correct_grads(mine, state.state, self.server_state)
                    sgd_step(state.params, mine, state.momentum, lr=sched.lr, beta=sched.momentum)
                    if upload is not None:
                        uploads.append(upload)
            self.sync.end_step(uploads, rnd, s, active)
        ends = {
            c: RoundEnd(
                starts[c],
                self.view(c),
                self.steps[c],
                sched.lr,
                sched.momentum,
                client=c,
                weight=float(self.n_train[c]),
            )
            for c in sampled
        }
        self.sync.end_round(sampled)
        self._end_states(ends)
        self._check_finite(rnd)
        return float(loss_sum) / n_losses if n_losses else math.nan

    def _end_states(self, ends: Mapping[int, RoundEnd]) -> None:
        """The scheme's state hooks at a round's end: each sampled client's, then the
        server's (nothing happens for a scheme without state)."""
        scheme, sent = self.method.scheme, []
        for c, done in ends.items():
            state = self.clients[c]
            state.state, message = scheme.client_round_end(done, state.state, self.server_state)
            sent.append(message)
        self.server_state = scheme.server_round_end(self.server_state, sent, len(self.clients))

    def _check_finite(self, rnd: int) -> None:
        tensors = [*self.server.values()]
        for state in self.clients:
            tensors.extend(state.params.values())
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            raise Diverged(rnd + 1)  # one host sync per round

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rnd: int) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Each client with its own prompt; returns (mean over clients, per-client metrics)."""
        fed, method, protocol = self.fed, self.method, self.fed.protocol
        device = fed.test.labels.device
        sets = []
        for es in protocol.eval_sets:
            classes = torch.as_tensor(es.classes, dtype=torch.long, device=device)
            images = torch.as_tensor(es.images, dtype=torch.long, device=device)
            pooled, tokens, labels = fed.test.take(images, embedded=method.prompts_image_tower)
            ctx = EncodeContext(
                tower=self.tower, class_idx=classes, consts=self.consts, vision=self.vision
            )
            sets.append((es.name, ctx, pooled, tokens, torch.searchsorted(classes, labels)))
        per_client = []
        done: list[tuple[Params, Params, dict[str, np.ndarray]]] = []  # (step, aux, correct)
        for c in range(len(self.trainer_of)):
            step, aux = self.eval_params(c, rnd)
            # clients that compute with the same values (a global prompt, a pooled trainer)
            # predict the same classes: score them once
            same = (hit for s, a, hit in done if equal_values(s, step) and equal_values(a, aux))
            correct = next(same, None)
            if correct is None:
                correct = {
                    name: self._correct(method.encode(step, aux, ctx), pooled, tokens, targets, ctx)
                    for name, ctx, pooled, tokens, targets in sets
                }
                done.append((step, aux, correct))
            per_client.append(
                protocol.client_metrics(
                    correct,
                    local_test=np.asarray(fed.split.test[c]),
                    client_classes=np.asarray(fed.split.classes[c]),
                )
            )
        return protocol.mean_over_clients(per_client), per_client

    def eval_params(self, client: int, rnd: int) -> tuple[Params, Params]:
        """The (step, aux) parameters client `client` is evaluated with at round `rnd`: its
        evaluation view, with the evaluation's own random stream (e.g. DP-FPL's factorization),
        so an audit queries exactly the model that was scored. The learner's draws (BPL's) are
        the round's, the same for every client: clients holding the same parameters are the
        same model, scored once (`evaluate`)."""
        view = self.view(client, evaluation=True)
        stream = generator(self.seed, _PARAMS, rnd, client, -1)
        return self.method.step_params(view, stream, generator(self.seed, _PARAMS, rnd, -1, -1))

    def _correct(
        self,
        z: object,
        pooled: Tensor,
        tokens: Tensor | None,
        targets: Tensor,
        ctx: EncodeContext,
    ) -> np.ndarray:
        """Whether each image's predicted class is its target (the learner chunks the images)."""
        return (self.method.predict(z, pooled, tokens, ctx) == targets).cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (tensors and plain values; `torch.save`-able and
        loadable with weights_only=True). Batches, factorizations and noise come from
        stateless per-(round, client, step) streams of the seed, so no RNG state is needed."""
        return {
            "server": dict(self.server),
            "server_momentum": dict(self.server_momentum),
            "server_state": dict(self.server_state),
            "clients": [
                {"params": c.params, "momentum": c.momentum, "anchor": c.anchor, "state": c.state}
                for c in self.clients
            ],
            "averaged": [{"params": mean, "weight": total} for mean, total in self.averaged],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.server = dict(state["server"])
        self.server_momentum = dict(state["server_momentum"])
        self.server_state = dict(state.get("server_state", {}))  # absent before scheme state
        if len(state["clients"]) != len(self.clients):
            raise ValueError("checkpoint holds a different number of clients")
        self.clients = [
            ClientState(
                dict(c["params"]), dict(c["momentum"]), dict(c["anchor"]), dict(c.get("state", {}))
            )
            for c in state["clients"]
        ]
        self.averaged = [
            (dict(a["params"]), float(a["weight"])) for a in state.get("averaged", [])
        ]  # absent before round-weighted averages

    def run(
        self,
        *,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
        progress: Callable[[int], None] | None = None,
        start: RunOutput | None = None,
        on_round_end: Callable[[int, RunOutput], None] | None = None,
        evaluate: bool = True,
    ) -> RunOutput:
        """Train the remaining rounds and evaluate on the schedule (never, without `evaluate`:
        an audit's run, queried by the audit itself). `start` (a checkpoint's output, with the
        state already loaded) resumes after its last round; `on_round_end(rounds done, output
        so far)` is where the caller checkpoints."""
        history = [] if start is None else list(start.history)
        per_client = [] if start is None else list(start.per_client)
        first = 0 if start is None else start.rounds_done
        rounds = self.sched.rounds if self.method.trains else 0
        scored = evaluation_rounds(rounds, self.sched.eval_every, self.sched.eval_last)
        scored = scored if evaluate else frozenset()
        for rnd in range(first, rounds):
            loss = self.run_round(rnd)
            self._average_views(rnd)
            if rnd + 1 in scored:
                metrics, clients = self.evaluate(rnd)
                released = {} if self.private else {"train_loss": loss}
                metrics = {"round": rnd + 1, **released, **metrics}
                history.append(metrics)
                per_client.append(clients)
                if on_eval:
                    on_eval(rnd + 1, metrics)
            if on_round_end:
                on_round_end(rnd + 1, RunOutput(history, self.rounds_schedule, per_client, rnd + 1))
            if progress:
                progress(rnd + 1)
        if not self.method.trains and evaluate:
            metrics, clients = self.evaluate(0)
            history.append({"round": 0, **metrics})
            per_client.append(clients)
            if on_eval:
                on_eval(0, history[-1])
        return RunOutput(history, self.rounds_schedule, per_client, rounds)
