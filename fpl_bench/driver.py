"""The federated driver: rounds, client sampling, local steps, aggregation, evaluation.

One loop serves every method; it reads the method's declarations (`shared`, `sync`, `privacy`)
and never names a method. All randomness is drawn from the run seed: the clients sampled in each
round are drawn up front (so a method's own use of randomness cannot change who is sampled), and
each (round, client, step) gets its own generator for batches and noise.

Clients step in lockstep: local step s of every sampled client runs before step s + 1 of any. For
`sync="round"` methods this changes nothing (clients are independent within a round); for
`sync="step"` methods (DP-FPL) the server aggregates the shared gradient between steps, as the
reference does per batch. The lockstep loop is also the seam for batching many clients' prompts
through one text-tower forward.

Privacy (when `privacy` is given): Poisson sampling with rate q_i = min(1, B / n_i) per step,
per-sample gradients of the method's step parameters, clipped jointly to C; parameters the
method places on the client get N(0, (sigma C)^2) added by the client to its clipped sum, those
placed on the server get it added once by the server to the sum over clients of the clipped sums;
both are divided by the expected batch size (Abadi et al. 2016, Alg. 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fpl_bench.data.partition import ClientSplit
from fpl_bench.evaluate import ClientScores, client_metrics, mean_over_clients
from fpl_bench.methods.aggregate import weighted_mean
from fpl_bench.methods.base import EncodeContext, InitContext, Method, Params
from fpl_bench.privacy.mechanism import add_gaussian_noise, clipped_sum
from fpl_bench.privacy.per_sample import mean_grads, per_sample_grads
from fpl_bench.prompt import TextTower


@dataclass(frozen=True)
class FeatureSet:
    """Cached image features of one split: pooled [N, D], patch tokens [N, P, D] or None."""

    pooled: Tensor
    tokens: Tensor | None
    labels: Tensor  # [N] int64 class ids

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        tokens = None if self.tokens is None else self.tokens[idx].float()
        return self.pooled[idx], tokens, self.labels[idx]


@dataclass(frozen=True)
class Federation:
    """The data of one federated run: features, the client split, the class sets."""

    train: FeatureSet
    test: FeatureSet
    split: ClientSplit
    seen_classes: Tensor  # [n_seen] sorted class ids trained on (all, or the base classes)
    novel_classes: Tensor | None  # [n_novel] base2novel's novel classes


@dataclass(frozen=True)
class Schedule:
    rounds: int
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    client_fraction: float = 1.0
    eval_every: int = 1


@dataclass(frozen=True)
class NoisePlan:
    """What the driver needs to privatize: the noise multiplier sigma and the clipping norm C
    (sampling rates follow from the client sizes and the batch size)."""

    noise_multiplier: float
    clip_norm: float


@dataclass
class ClientState:
    params: Params
    momentum: Params = field(default_factory=dict)


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


def steps_per_round(n_train: int, *, batch_size: int, local_epochs: int) -> int:
    return local_epochs * max(1, math.ceil(n_train / batch_size))


def sample_rate(n_train: int, batch_size: int) -> float:
    """Poisson sampling rate q = B / n (capped at 1)."""
    return min(1.0, batch_size / n_train)


def epoch_batches(n: int, *, batch_size: int, steps: int, seed_keys: Sequence[int]) -> list[Tensor]:
    """Shuffled mini-batches (positions 0..n-1) for `steps` steps, reshuffled each epoch."""
    per_epoch = max(1, math.ceil(n / batch_size))
    out: list[Tensor] = []
    for epoch in range(math.ceil(steps / per_epoch)):
        perm = torch.randperm(n, generator=generator(*seed_keys, epoch))
        out.extend(perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
    return out[:steps]


def poisson_batch(n: int, *, rate: float, gen: torch.Generator) -> Tensor:
    """Positions of a Poisson-sampled batch: each of n examples independently with prob `rate`."""
    return torch.nonzero(torch.rand(n, generator=gen) < rate).flatten()


def sgd_step(
    params: Params, grads: Mapping[str, Tensor], momentum: Params, *, lr: float, beta: float
) -> None:
    """In place: buf = beta * buf + g; p -= lr * buf (torch.optim.SGD's rule, dampening 0)."""
    for name, grad in grads.items():
        buf = momentum.get(name)
        buf = grad.clone() if buf is None else buf.mul_(beta).add_(grad)
        momentum[name] = buf
        params[name] = params[name] - lr * buf


@dataclass
class RunOutput:
    history: list[dict[str, float]]  # one dict per evaluation, with "round"
    schedule: list[list[int]]
    per_client: list[list[dict[str, float]]]


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
        ctx_init: str | None = None,
    ) -> None:
        self.method, self.tower, self.fed, self.sched, self.seed, self.noise = (
            method,
            tower,
            fed,
            schedule,
            seed,
            noise,
        )
        n_clients = fed.split.n_clients
        init = InitContext(tower=tower, generator=generator(seed, _INIT), ctx_init=ctx_init)
        self.consts = method.constants(init)
        base = method.init_params(init)
        # Every client starts from the same initial values (a shared starting point, as FedAvg).
        self.server: Params = {k: base[k].clone() for k in method.shared}
        self.clients = [
            ClientState({k: v.clone() for k, v in base.items()}) for _ in range(n_clients)
        ]
        self.server_momentum: Params = {}
        self.n_train = [len(idx) for idx in fed.split.train]
        self.train_idx = [torch.tensor(idx, dtype=torch.long) for idx in fed.split.train]
        self.rounds_schedule = client_schedule(
            n_clients, rounds=schedule.rounds, fraction=schedule.client_fraction, seed=seed
        )
        self.steps = [
            steps_per_round(n, batch_size=schedule.batch_size, local_epochs=schedule.local_epochs)
            for n in self.n_train
        ]
        # Labels as positions in the seen class set (the logits' columns).
        position = torch.full((int(fed.seen_classes.max()) + 1,), -1, dtype=torch.long)
        position[fed.seen_classes] = torch.arange(len(fed.seen_classes))
        self.train_targets = position[fed.train.labels.clamp(max=len(position) - 1)]
        self.ctx_seen = EncodeContext(tower=tower, class_idx=fed.seen_classes, consts=self.consts)
        if noise is not None:
            self.enable_privacy(noise)
        if set(method.privacy.server) - set(method.shared) or (
            method.sync == "round" and method.privacy.server
        ):
            raise RuntimeError(
                f"{method.name}: server-noised parameters must be shared, step-synced"
            )

    def enable_privacy(self, noise: NoisePlan) -> None:
        """Turn DP on: Poisson batches, per-sample clipping, noise where the method places it."""
        missing = set(self._trainable()) - set(self.method.privacy.names)
        if missing:
            raise RuntimeError(
                f"{self.method.name}: step parameters {sorted(missing)} have no DP placement"
            )
        self.noise = noise

    # -- helpers ----------------------------------------------------------------------------
    def _trainable(self) -> list[str]:
        view = self.view(0)
        step, _ = self.method.step_params(view, generator(self.seed, _PARAMS, 0, 0, 0))
        return list(step)

    def view(self, client: int, *, evaluation: bool = False) -> Params:
        """The parameters client `client` computes with.

        Step-synchronised methods (and every evaluation) use the server's current shared values;
        within a round, a round-synchronised client trains its own copy of them.
        """
        if self.method.sync == "round" and not evaluation:
            return dict(self.clients[client].params)
        return {**self.clients[client].params, **self.server}

    def budget(self) -> list[tuple[float, int]]:
        """(sampling rate, number of noisy steps) that touch each client's data over the run."""
        rounds_in = [sum(c in r for r in self.rounds_schedule) for c in range(len(self.clients))]
        return [
            (sample_rate(n, self.sched.batch_size), rounds_in[c] * self.steps[c])
            for c, n in enumerate(self.n_train)
        ]

    # -- one local step -----------------------------------------------------------------------
    def _batch(self, client: int, rnd: int, step: int, epoch_plan: list[Tensor] | None) -> Tensor:
        if self.noise is None:
            assert epoch_plan is not None
            return epoch_plan[step]
        rate = sample_rate(self.n_train[client], self.sched.batch_size)
        return poisson_batch(
            self.n_train[client], rate=rate, gen=generator(self.seed, _BATCH, rnd, client, step)
        )

    def local_gradients(
        self, client: int, rnd: int, step_no: int, positions: Tensor
    ) -> tuple[Params, Params, Params, float]:
        """Gradients of one local step of one client.

        Returns (step params, client-side grads of the step params, the server-bound part, loss):
        without DP the server-bound part is the mean gradient of the shared step parameters;
        with DP it is their clipped per-sample SUM (the server adds the noise).
        """
        method, view = self.method, self.view(client)
        step, aux = method.step_params(view, generator(self.seed, _PARAMS, rnd, client, step_no))
        step = {k: v.detach() for k, v in step.items()}
        idx = self.train_idx[client][positions]
        pooled, tokens, _ = self.fed.train.take(idx)
        targets = self.train_targets[idx]
        if tokens is None:
            tokens = pooled.new_zeros(len(idx), 0)
        ctx = self.ctx_seen

        def encode(p: Mapping[str, Tensor]) -> object:
            return method.encode(p, aux, ctx)

        def loss_one(z: object, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return method.sample_loss(z, x, t, y, ctx)

        to_server = set(method.shared) if method.sync == "step" else set()
        if self.noise is None:
            grads, losses = mean_grads(encode, loss_one, step, (pooled, tokens, targets))
            server_part = {k: g for k, g in grads.items() if k in to_server}
            client_part = {k: g for k, g in grads.items() if k not in to_server}
            return step, client_part, server_part, float(losses.mean()) if len(losses) else math.nan
        plan = self.noise
        expected = sample_rate(self.n_train[client], self.sched.batch_size) * self.n_train[client]
        if len(idx):
            per_sample, losses = per_sample_grads(encode, loss_one, step, (pooled, tokens, targets))
            sums = clipped_sum(per_sample, clip_norm=plan.clip_norm)
        else:
            sums, losses = {k: torch.zeros_like(v) for k, v in step.items()}, torch.zeros(0)
        client_names = [k for k in method.privacy.client if k in sums]
        noisy = add_gaussian_noise(
            {k: sums[k] for k in client_names},
            noise_multiplier=plan.noise_multiplier,
            clip_norm=plan.clip_norm,
            generator=generator(self.seed, _NOISE, rnd, client, step_no),
        )
        client_part = {k: v / expected for k, v in noisy.items()}
        server_part = {k: sums[k] for k in method.privacy.server}
        return step, client_part, server_part, float(losses.mean()) if len(losses) else math.nan

    # -- rounds ---------------------------------------------------------------------------------
    def run_round(self, rnd: int) -> float:
        """Train one round; returns the mean training loss over the round's steps."""
        method, sched = self.method, self.sched
        sampled = self.rounds_schedule[rnd]
        plans = {
            c: None
            if self.noise is not None
            else epoch_batches(
                self.n_train[c],
                batch_size=sched.batch_size,
                steps=self.steps[c],
                seed_keys=(self.seed, _BATCH, rnd, c),
            )
            for c in sampled
        }
        if method.sync == "round":
            for c in sampled:  # clients start the round from the server's shared values
                self.clients[c].params.update({k: v.clone() for k, v in self.server.items()})
        losses: list[float] = []
        for s in range(max(self.steps[c] for c in sampled)):
            active = [c for c in sampled if s < self.steps[c]]
            uploads: list[tuple[Params, float]] = []
            for c in active:
                positions = self._batch(c, rnd, s, plans[c])
                step, client_part, server_part, loss = self.local_gradients(c, rnd, s, positions)
                losses.append(loss)
                state = self.clients[c]
                grads = method.param_grads(self.view(c), step, client_part)
                if method.sync == "round":
                    grads.update(server_part)  # nothing goes to the server mid-round
                    sgd_step(state.params, grads, state.momentum, lr=sched.lr, beta=sched.momentum)
                else:
                    local = {k: g for k, g in grads.items() if k not in self.server}
                    sgd_step(state.params, local, state.momentum, lr=sched.lr, beta=sched.momentum)
                    weight = float(len(positions)) if self.noise is None else 1.0
                    uploads.append((server_part, weight))
            if method.sync == "step" and uploads and self.server:
                self.server_step(uploads, rnd, s, active)
        if method.sync == "round" and self.server:
            self.server.update(
                weighted_mean(
                    [
                        ({k: self.clients[c].params[k] for k in self.server}, self.n_train[c])
                        for c in sampled
                    ]
                )
            )
        finite = [x for x in losses if not math.isnan(x)]
        return float(np.mean(finite)) if finite else math.nan

    def server_step(
        self, uploads: list[tuple[Params, float]], rnd: int, step_no: int, active: list[int]
    ) -> None:
        """Apply the clients' shared gradients: a batch-size weighted mean, or under DP the
        noisy sum of the clipped per-sample sums over the expected total batch size."""
        if self.noise is None:
            nonempty = [(u, w) for u, w in uploads if w > 0]
            if not nonempty:
                return
            grad = weighted_mean(nonempty)
        else:
            total = {k: torch.stack([u[k] for u, _ in uploads]).sum(0) for k in uploads[0][0]}
            noisy = add_gaussian_noise(
                total,
                noise_multiplier=self.noise.noise_multiplier,
                clip_norm=self.noise.clip_norm,
                generator=generator(self.seed, _NOISE, rnd, -1, step_no),
            )
            expected = sum(
                sample_rate(self.n_train[c], self.sched.batch_size) * self.n_train[c]
                for c in active
            )
            grad = {k: v / expected for k, v in noisy.items()}
        sgd_step(
            self.server, grad, self.server_momentum, lr=self.sched.lr, beta=self.sched.momentum
        )

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, rnd: int) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Each client with its own prompt; returns (mean over clients, per-client metrics)."""
        fed, method = self.fed, self.method
        test = fed.test
        seen_mask = torch.isin(test.labels, fed.seen_classes)
        seen_idx = torch.nonzero(seen_mask).flatten()
        seen_labels = test.labels[seen_idx]
        seen_targets = torch.searchsorted(fed.seen_classes, seen_labels)
        pooled, tokens, _ = test.take(seen_idx)
        novel = None
        if fed.novel_classes is not None:
            novel_idx = torch.nonzero(torch.isin(test.labels, fed.novel_classes)).flatten()
            n_pooled, n_tokens, n_labels = test.take(novel_idx)
            novel = (n_pooled, n_tokens, torch.searchsorted(fed.novel_classes, n_labels))
            ctx_novel = EncodeContext(
                tower=self.tower, class_idx=fed.novel_classes, consts=self.consts
            )
        # Map each client's local test indices (into the test pool) to positions in seen_idx.
        pos_of = torch.full((len(test.labels),), -1, dtype=torch.long)
        pos_of[seen_idx] = torch.arange(len(seen_idx))
        per_client = []
        for c in range(len(self.clients)):
            view = self.view(c, evaluation=True)
            step, aux = method.step_params(view, generator(self.seed, _PARAMS, rnd, c, -1))
            z = method.encode(step, aux, self.ctx_seen)
            seen_correct = self._correct(z, pooled, tokens, seen_targets, self.ctx_seen)
            novel_correct = None
            if novel is not None:
                zn = method.encode(step, aux, ctx_novel)
                novel_correct = self._correct(zn, *novel, ctx_novel)
            local = pos_of[torch.tensor(fed.split.test[c], dtype=torch.long)]
            scores = ClientScores(seen_correct=seen_correct, novel_correct=novel_correct)
            per_client.append(
                client_metrics(
                    scores,
                    seen_labels=seen_labels.numpy(),
                    local_idx=local[local >= 0].numpy(),
                    client_classes=np.asarray(fed.split.classes[c]),
                )
            )
        protocol = "base2novel" if fed.novel_classes is not None else "personalized"
        return mean_over_clients(per_client, protocol), per_client

    def _correct(
        self,
        z: object,
        pooled: Tensor,
        tokens: Tensor | None,
        targets: Tensor,
        ctx: EncodeContext,
        chunk: int = 128,
    ) -> np.ndarray:
        out = []
        for i in range(0, len(targets), chunk):
            t = None if tokens is None else tokens[i : i + chunk]
            logits = self.method.logits(z, pooled[i : i + chunk], t, ctx)
            out.append((logits.argmax(-1) == targets[i : i + chunk]).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=bool)

    def run(
        self,
        *,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> RunOutput:
        history, per_client = [], []
        rounds = self.sched.rounds if self.method.trains else 0
        for rnd in range(rounds):
            loss = self.run_round(rnd)
            if (rnd + 1) % self.sched.eval_every == 0 or rnd == rounds - 1:
                metrics, clients = self.evaluate(rnd)
                metrics = {"round": rnd + 1, "train_loss": loss, **metrics}
                history.append(metrics)
                per_client.append(clients)
                if on_eval:
                    on_eval(rnd + 1, metrics)
            if progress:
                progress(rnd + 1)
        if not self.method.trains:
            metrics, clients = self.evaluate(0)
            history.append({"round": 0, **metrics})
            per_client.append(clients)
            if on_eval:
                on_eval(0, history[-1])
        return RunOutput(history=history, schedule=self.rounds_schedule, per_client=per_client)
