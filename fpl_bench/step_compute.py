"""How a local step's gradients are computed: the speed tactics, apart from the federated loop.

`FederatedRun` (fpl_bench/driver.py) decides what a step computes (whose parameters, which
examples, under which privacy); `StepComputer` decides how, and never changes the result beyond
float rounding (tests/test_speed.py compares every tactic with the plain computation):

- clients of a step go through ONE tower forward and ONE vmapped backward
  (`privacy.per_sample.client_step_gradients`), in groups whose activations stay under a bound
  (`groups`);
- clients whose step inputs are equal bit for bit share one encoder forward (`_forward`,
  `_same_inputs`): under step synchronisation every client encodes the same global prompt;
- `Compute` switches each tactic off for ablation (`fpl-bench bench --compare-reference`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fpl_bench.learners._base import Params
from fpl_bench.privacy.per_sample import (
    Forward,
    StepGrads,
    client_step_gradients,
    encode_once,
    step_gradients,
)

if TYPE_CHECKING:
    from fpl_bench.driver import FederatedRun

__all__ = ["Compute", "StepComputer", "equal_values"]


@dataclass(frozen=True)
class Compute:
    """How local steps are computed (module docstring); results agree to float rounding.

    batch_clients: the step's clients through one tower forward and one vmapped backward.
    per_sample_loop: per-sample gradients by one forward + backward per sample (ablation).
    group_elements: bound on one activation tensor of a batched step (clients x samples x
        tower rows x MLP width elements; on CPU without the samples factor: there the
        per-sample backward runs in calls of a few prompts, text_tower.backward.CPU_ROWS_PER_CALL);
        the step's clients are split into groups under it. None: 2^28 on CUDA (memory),
        2^20 on a CPU (cache: non-private steps ran 3-4x faster batched; a private step,
        whose per-sample backward as one call for 10 clients ran 1.1-1.7x slower than one
        client at a time, now shares the forward, the loss and the noise calls of its
        clients and runs their backward in chunks).
    """

    batch_clients: bool = True
    per_sample_loop: bool = False
    group_elements: int | None = None

    def group_bound(self, device: torch.device) -> int:
        if self.group_elements is not None:
            return self.group_elements
        return 2**28 if device.type == "cuda" else 2**20


def equal_values(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Same names, and tensors equal bit for bit (shape, dtype and values)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _stack(dicts: Sequence[Mapping[str, Tensor]]) -> Params:
    """{name: [K, *shape]} from K dicts with the same names."""
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    """t [n, ...] padded with zero rows to [rows, ...]."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class StepComputer:
    """The gradients of a run's local steps, one client (`one`) or a group at once
    (`batched`), and how a step's clients are grouped (`groups`)."""

    def __init__(self, run: FederatedRun) -> None:
        self.run = run
        # the last step forward: ((round, step), its params and aux (copies), (Z, vjp_fn))
        self._last_forward: tuple[tuple[int, int], Params, Params, Forward] | None = None

    def one(self, client: int, rnd: int, step_no: int, idx: Tensor) -> tuple[Params, StepGrads]:
        """One client's step by `step_gradients`, on train-feature indices `idx`."""
        run = self.run
        method = run.method
        step, aux, batch = run.step_inputs(client, rnd, step_no, idx)
        ctx, anchor = run.ctx_seen, run.clients[client].anchor

        def encode(p: Mapping[str, Tensor]) -> object:
            return method.encode(p, aux, ctx)

        def prior(z: object, p: Mapping[str, Tensor]) -> Tensor | None:
            return method.prior(p, z, ctx, anchor)

        loss_one, constants = self._loss_fns()

        grads = step_gradients(
            encode,
            loss_one,
            step,
            batch,
            per_sample=run.private,
            prior=prior if method.has_prior else None,
            per_sample_loop=run.compute.per_sample_loop,
            constants=constants if method.has_batch_constants else None,
            forward=self._forward(rnd, step_no, step, aux, encode),
            combine=self._combine(),
        )
        return step, grads

    def _forward(
        self, rnd: int, step_no: int, step: Params, aux: Params, encode: Callable[..., object]
    ) -> Forward:
        """The encoder forward (Z, vjp_fn) of a client's step, computed once for the clients of
        a step whose step parameters and aux equal the previous client's bit for bit.

        Under step synchronisation every client of a step encodes the same global prompt
        (PromptFL, FedProx, FedKgCoOp, and any shared-only scheme); where a step's clients run
        one at a time (groups of one, `_groups`: a tower too large to batch them, or a single
        active client) each forward was ~15% of a private step. The encoder is a deterministic
        function of (params, aux) and the scored classes, so the shared forward is the one
        each client would compute; its vjp_fn serves every client's cotangents."""
        run = self.run
        batched = run.private or run.method.has_several_losses  # backward of several rows
        if not self._shares_forwards(step):
            return encode_once(encode, step, math_attention=batched)
        last = self._last_forward
        if (
            last is not None
            and last[0] == (rnd, step_no)
            and equal_values(last[1], step)
            and equal_values(last[2], aux)
        ):
            return last[3]
        forward = encode_once(encode, step, math_attention=batched)
        copies = ({k: v.clone() for k, v in step.items()}, {k: v.clone() for k, v in aux.items()})
        self._last_forward = ((rnd, step_no), *copies, forward)
        return forward

    def _shares_forwards(self, step: Params) -> bool:
        """Whether clients with equal step inputs may share one encoder forward: part of
        client batching (with `batch_clients` off, the reference compute pattern of bench.py,
        every client computes its own), and on CPU only (comparing the inputs is a host sync
        on other devices)."""
        run = self.run
        return run.compute.batch_clients and all(v.device.type == "cpu" for v in step.values())

    def _same_inputs(self, inputs: Sequence[tuple[Params, Params, Any]]) -> bool:
        """Whether the clients of a batched non-private step encode the same (step params,
        aux), bit for bit: at a round's first step every client starts from the global prompt
        (`client_step_gradients(shared=True)` then runs one forward, 15-20% of a PromptFL
        round of 2 steps; `_shares_forwards`). Not for private steps, whose per-sample
        backward ran 1.3x slower through a shared forward."""
        run = self.run
        step0, aux0, _ = inputs[0]
        if run.private or not self._shares_forwards(step0):
            return False
        return all(
            equal_values(step, step0) and equal_values(aux, aux0) for step, aux, _ in inputs[1:]
        )

    def _loss_fns(self) -> tuple[Callable[..., Tensor], Callable[..., Tensor | None]]:
        """(per-sample loss, batch constants) as `privacy.per_sample` calls them: on
        (Z, pooled, tokens, target[, the sample's constants]) and (Z, *batch). The loss is the
        stacked `sample_losses` [L] of a learner that has several (`_combine`)."""
        run = self.run
        method, ctx = run.method, run.ctx_seen
        several = method.has_several_losses

        def loss_one(z: object, x: Tensor, t: Tensor, y: Tensor, *given: Tensor) -> Tensor:
            return method.sample_loss(z, x, t, y, ctx, *given, several=several)

        def constants(z: object, x: Tensor, t: Tensor, y: Tensor) -> Tensor | None:
            return method.batch_constants(z, t, ctx)

        return loss_one, constants

    def _combine(self) -> Callable[[dict[str, Tensor]], Params] | None:
        """The learner's rule for the gradients of its several losses, or None (one loss)."""
        method = self.run.method
        return method.combine_sample_grads if method.has_several_losses else None

    def batched(
        self, clients: Sequence[int], rnd: int, step_no: int, indices: Sequence[Tensor]
    ) -> list[tuple[Params, StepGrads]]:
        """(step params, StepGrads) of each client in `clients`, from one tower forward and one
        vmapped backward for all of them; indices[i] are client i's training examples."""
        run = self.run
        method, ctx = run.method, run.ctx_seen
        inputs = [
            run.step_inputs(c, rnd, step_no, idx) for c, idx in zip(clients, indices, strict=True)
        ]
        sizes = [len(idx) for idx in indices]
        width = max(sizes)
        params = _stack([step for step, _, _ in inputs])
        extra = {
            "aux": _stack([aux for _, aux, _ in inputs]),
            "anchor": _stack([run.clients[c].anchor for c in clients]),
        }
        batch = tuple(
            torch.stack([_pad_rows(b[j], width) for _, _, b in inputs]) for j in range(3)
        )  # [K, B_max, ...]

        def encode(p: Mapping[str, Tensor], e: Mapping[str, Params]) -> object:
            return method.encode(p, e["aux"], ctx)

        loss_one, constants = self._loss_fns()

        def prior(z: object, p: Mapping[str, Tensor], e: Mapping[str, Params]) -> Tensor | None:
            return method.prior(p, z, ctx, e["anchor"])

        g = client_step_gradients(
            encode,
            loss_one,
            params,
            extra,
            batch,
            sizes,
            per_sample=run.private,
            prior=prior if method.has_prior else None,
            constants=constants if method.has_batch_constants else None,
            shared=self._same_inputs(inputs),
            combine=self._combine(),
        )
        out = []
        for i, n in enumerate(sizes):
            data = {k: v[i, :n] if run.private else v[i] for k, v in g.data.items()}
            prior_i = None if g.prior is None else {k: v[i] for k, v in g.prior.items()}
            out.append((inputs[i][0], StepGrads(data=data, losses=g.losses[i, :n], prior=prior_i)))
        return out

    def groups(self, clients: Sequence[int]) -> list[list[int]]:
        """The step's clients in groups whose batched activations stay under the bound (one by
        one without client batching, and for the per-sample loop, a per-client pattern)."""
        run = self.run
        if not run.compute.batch_clients or (run.compute.per_sample_loop and run.private):
            return [[c] for c in clients]
        rows = run.tower.rows(len(run.ctx_seen.class_idx))
        device = run.fed.train.labels.device
        samples = run.sched.batch_size if run.private and device.type != "cpu" else 1
        per_client = rows * 4 * run.tower.width * samples
        bound = run.compute.group_bound(device)
        size = max(1, bound // max(1, per_client))
        return [list(clients[i : i + size]) for i in range(0, len(clients), size)]
