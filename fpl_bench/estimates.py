"""Cost estimates of a job's runs, and the CPU threads and worker order they decide.

set_threads(spec, ...)          the CPU threads of one run, by the FLOPs of one of its steps
training_flops(...)             FLOPs of one run's training (a suite's dry run uses it too)
cell_training_flops(prep, ...)  the same for one run of a prepared job, on its seed's partition
cell_cost(prep, cell)           a run's training FLOPs x its learner's relative cost
job_cost(prep, cells)           the sum over runs: whether worker processes pay
prepared_bytes(prep)            bytes of a prepared job's tensors: about what a worker holds
longest_first(prep, ...)        the order in which worker processes take runs
The measured thresholds and the machine's idle cores are fpl_bench/compute.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fpl_bench.catalog import MethodChoice
from fpl_bench.compute import (
    PARALLEL_FLOPS,
    busy_cores_elsewhere,
    pick_threads,
    usable_cores,
)
from fpl_bench.learners import LEARNERS
from fpl_bench.method import build_method
from fpl_bench.prepare import Prepared
from fpl_bench.privacy.planning import steps_per_round
from fpl_bench.schemes import SCHEMES
from fpl_bench.spec import ExperimentSpec
from fpl_bench.text_tower import TextTower

CPU_THREADS = torch.get_num_threads()


def set_threads(
    spec: ExperimentSpec,
    *,
    private: bool,
    device: torch.device,
    tower: TextTower | None = None,
    n_classes: int | None = None,
) -> None:
    """CPU threads for one run, by the measured size of its steps (fpl_bench/compute.py): the
    FLOPs of one local step (B tower passes when private, 1 otherwise) over `n_classes`;
    more than one thread only for large steps and only on cores other processes leave idle.
    Without a tower (callers that do not pass one): one thread, all when private."""
    if device.type != "cpu":
        return
    if spec.threads:
        torch.set_num_threads(spec.threads)
        return
    if tower is None:
        torch.set_num_threads(CPU_THREADS if private else 1)
        return
    flops = tower.pass_flops(n_classes or tower.n_classes) * (spec.batch_size if private else 2)
    cores = min(CPU_THREADS, usable_cores())
    busy = busy_cores_elsewhere() if flops >= PARALLEL_FLOPS else 0.0
    torch.set_num_threads(pick_threads(flops, cores=cores, busy_elsewhere=busy))


def prepared_bytes(prep: Prepared) -> float:
    """Bytes of a prepared job's tensors (features, tokens, the backbone's weights): about
    what each worker process holds."""
    seen: set[int] = set()
    total = 0.0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for features in (prep.train, prep.test):
        for value in vars(features).values():
            add(value)
    for p in prep.backbone.model.parameters():
        add(p)
    return total


def cell_training_flops(prep: Prepared, cell: tuple[int, float | None, MethodChoice]) -> float:
    """FLOPs of one run's training (`training_flops`) on its seed's partition and tower."""
    seed, eps, choice = cell
    protocol, split = prep.partitions[seed]
    return training_flops(
        spec=prep.spec,
        choice=choice,
        eps=eps,
        client_sizes=[len(idx) for idx in split.train],
        pass_flops=prep.tower.pass_flops(len(protocol.seen_classes)),
    )


def training_flops(
    *,
    spec: ExperimentSpec,
    choice: MethodChoice,
    eps: float | None,
    client_sizes: Sequence[int],
    pass_flops: float,
) -> float:
    """FLOPs of one run's training: client steps x tower passes per step x `pass_flops`, the
    FLOPs of one tower pass over the seen classes (`TextTower.pass_flops`). A step's forward is
    one pass per prompt component (FedOTP's global and local prompt, FedPGP's full and sigma
    prompt: 2); its backward one more without DP, and under DP one per sample for each
    component the loss reads (FedPGP's sigma feeds only its prior, whose per-sample cotangents
    are zero and skipped: text_tower.backward.tower_backward), plus one per component for a
    prior (KgCoOp, FedProx, FedPGP: its own backward, outside clipping). `client_sizes` are the
    clients' training examples; a suite's dry run estimates them from the dataset card. 0 for
    a learner that trains nothing (zero-shot) or nothing through the text tower (FedCLIP's
    adapter on the image features: `trains_text_tower`)."""
    learner = LEARNERS.get(choice.learner)
    if not (learner.trains and learner.trains_text_tower):
        return 0.0
    client_steps = sum(
        steps_per_round(n, batch_size=spec.batch_size, local_epochs=spec.local_epochs)
        for n in client_sizes
    )
    scheme = SCHEMES.get(choice.scheme)
    components = scheme.n_prompts + scheme.n_extra_prompts
    if eps is None:
        passes = 2 * components
    else:
        prior = components if build_method(choice).has_prior else 0
        passes = components + scheme.n_prompts * spec.batch_size + prior
    return spec.rounds * spec.client_fraction * client_steps * pass_flops * passes


def cell_cost(prep: Prepared, cell: tuple[int, float | None, MethodChoice]) -> float:
    """A run's training FLOPs (`cell_training_flops`, CoOp's passes) times its learner's
    `relative_cost` (e.g. N prompts: N; a tower per image: about 8; BPL's L draws: L x 8):
    about the FLOPs of CoOp runs that take as long."""
    return cell_training_flops(prep, cell) * build_method(cell[2]).learner.relative_cost()


def job_cost(prep: Prepared, cells: list[tuple[int, float | None, MethodChoice]]) -> float:
    """The sum of `cell_cost` over `cells`: what decides whether workers pay
    (fpl_bench/parallel.py), so that a few runs of a tower-per-image learner (BPL's seeds of a
    suite) use the cores that as many CoOp runs would not."""
    return sum(cell_cost(prep, cell) for cell in cells)


def longest_first(
    prep: Prepared, cells: list[tuple[int, float | None, MethodChoice]], pending: list[int]
) -> list[int]:
    """`pending` in the order worker processes should take them: most training FLOPs times the
    learner's `relative_cost` first (a tower per image, several prompts), and among equals a
    learner that scores patch tokens (FedOTP: a Sinkhorn problem per image, class and step on
    top of the tower) first; so the longest run does not start last and leave one worker
    running alone at the end."""

    return sorted(
        pending,
        key=lambda i: (
            -cell_cost(prep, cells[i]),
            not LEARNERS.get(cells[i][2].learner).needs_tokens,
        ),
    )
