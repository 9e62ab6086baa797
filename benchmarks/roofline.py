"""How close a private step runs to this CPU core's matmul rate, and the least time the text
tower's training alone needs for a job at that rate.

    python benchmarks/roofline.py [--methods all] [--eps 0.5] [--cores 2] [--batch 32]
                                  [--target-min 6,10]

A private step of a text-prompt learner is B + 1 passes of the text tower (one forward, one
input-gradient backward per sample: privacy/per_sample.py), each about `TextTower.pass_flops`
= 24 W^2 FLOPs per token row and layer (the q, k, v, out and MLP products; attention scores,
layer norms and activations not counted). The script measures, on one thread, in fp32 (the
tower's precision on a CPU without AMX; forced here so that both rates are of one precision):

1. this core's matmul rate on the step's own products: the MLP's [B x R, W] x [W, 4W] and
   [B x R, 4W] x [4W, W] (R token rows per sample, the rows a private backward runs), their
   FLOPs over their summed time, the best of several repeats;
2. CoOp's private step on the embedded default (bench's synthetic federation, its 32 seen
   classes of 64, one client whose B examples are one Poisson batch of expected size B), its
   counted FLOPs per second and their share of (1);
3. the job `fpl-bench run --methods M --eps E` would run with the run's defaults: each preset's
   counted text-tower training (estimates.cell_training_flops on the job's own partition: the
   passes of its prompt components and priors; a tower per image, deep prompts and evaluation
   not counted; zero for zero-shot and FedCLIP, which train nothing through the text tower).
   Their sum over (cores x the rate of (1)) is a lower bound on the job's wall time.

With --whole-job, also:

4. every matmul the job executes, counted by torch's FlopCounterMode formulas while each preset runs
   its first --sampled-rounds rounds and one evaluation on the job's own data, seed and noise
   (`experiment.job_run`): the text tower's and the image tower's products, per image or per
   class, forward and backward, attention's products, evaluation and everything else a
   learner or scheme multiplies; elementwise work not counted. A run's training is its sampled
   rounds scaled to the run's rounds (rounds differ only by their Poisson batches), its
   evaluation one evaluation times the run's evaluations. Their sum over (cores x the rate of
   (1)) is a lower bound on the whole job's wall time. It runs about a tenth of the job.

Prints the CPU, the figures and the bound against each --target-min.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fpl_bench import bench
from fpl_bench.catalog import MethodChoice, method_names, resolve_method
from fpl_bench.compute import cpu_name
from fpl_bench.estimates import cell_training_flops
from fpl_bench.evaluate import evaluation_rounds
from fpl_bench.experiment import job_run, schedule_of
from fpl_bench.method import build_method
from fpl_bench.prepare import Prepared, federation, prepare
from fpl_bench.spec import build_spec

SEEN = bench.N_CLASSES // 2  # the classes bench's federation trains on


def best_seconds(fn: Callable[[], object], repeats: int = 7, inner: int = 10) -> float:
    """The best of `repeats` timings of `inner` calls, per call (after two warm-up calls)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def matmul_rate(rows: int, width: int) -> float:
    """FLOP/s of [rows, W] x [W, 4W] and [rows, 4W] x [4W, W] in fp32: their FLOPs over the sum
    of each one's best time."""
    seconds = 0.0
    for k, n in ((width, 4 * width), (4 * width, width)):
        a, b = torch.randn(rows, k), torch.randn(k, n)
        seconds += best_seconds(lambda a=a, b=b: a @ b)
    return 2 * (2.0 * rows * width * 4 * width) / seconds


def coop_step(batch: int, rounds: int = 12) -> tuple[float, float, int, int]:
    """(seconds, counted FLOPs, token rows, width) of CoOp's private step in fp32: the median
    of `rounds` rounds of one client with `batch` examples (one step each)."""
    device = torch.device("cpu")
    backbone = bench.bench_backbone("embedded", device)
    method = build_method(resolve_method("coop"))
    sizes = bench.Sizes(
        samples_per_client=batch, batch_size=batch, local_epochs=1, rounds=rounds + 1
    )
    run = bench.build_run(
        method,
        backbone,
        clients=1,
        total_clients=1,
        eps=0.5,
        config=bench.Config(bf16=False),
        sizes=sizes,
        device=device,
    )
    run.run_round(1)
    walls = []
    for rnd in range(2, 2 + rounds):
        t0 = time.perf_counter()
        run.run_round(rnd)
        walls.append(time.perf_counter() - t0)
    expected = run.expected_batch(run.rounds_schedule[1][0])
    flops = run.tower.pass_flops(SEEN) * (1 + expected)
    return statistics.median(walls), flops, run.tower.rows(SEEN), run.tower.width


@functools.cache
def prepared_job(methods: str, eps: float) -> tuple[list[MethodChoice], Prepared, int]:
    """(the presets, the prepared data, the first seed) of `run --methods M --eps E` with the
    run's defaults: prepared once for the script's two counts."""
    choices = [resolve_method(n) for n in method_names(methods)]
    spec = build_spec(methods=choices, eps=[eps])
    return choices, prepare(spec, log=lambda _: None), spec.seeds[0]


def job_bound(methods: str, eps: float) -> tuple[dict[str, float], list[int]]:
    """(each preset's counted text-tower training FLOPs in the job, the clients' training
    examples at the job's first seed)."""
    choices, prep, seed = prepared_job(methods, eps)
    flops = {c.label: cell_training_flops(prep, (seed, eps, c)) for c in choices}
    return flops, [len(idx) for idx in prep.partitions[seed][1].train]


class MatmulCounter(TorchDispatchMode):
    """The FLOPs of every op torch's FlopCounterMode counts (matmuls, batched matmuls,
    attention, convolutions), by its own formulas (`flop_registry`), without its module
    tracker (whose backward hooks torch.func's grad inside vmap refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


def job_counted(
    methods: str, eps: float, sampled_rounds: int = 2, log: Callable[[str], None] = print
) -> dict[str, tuple[float, float]]:
    """Each preset's (training, evaluation) matmul FLOPs in the job `run --methods M --eps E`,
    counted by `MatmulCounter`: training from the run's first `sampled_rounds` rounds scaled
    to its rounds, evaluation from one evaluation times its evaluations (one for a preset that
    trains nothing)."""
    choices, prep, seed = prepared_job(methods, eps)
    fed, schedule = federation(prep, seed), schedule_of(prep.spec)
    rounds = schedule.rounds
    scored = len(evaluation_rounds(rounds, schedule.eval_every, schedule.eval_last))
    out = {}
    for choice in choices:
        t0 = time.perf_counter()
        run, _ = job_run(prep, fed, choice, eps, seed)
        trains = run.method.trains
        sampled = min(sampled_rounds, rounds) if trains else 0
        with MatmulCounter() as counter:
            for rnd in range(sampled):
                run.run_round(rnd)
                run._average_views(rnd)
        training = counter.flops * rounds / sampled if sampled else 0.0
        with MatmulCounter() as counter:
            run.evaluate(max(sampled - 1, 0))
        evaluation = counter.flops * (scored if trains else 1)
        out[choice.label] = (float(training), float(evaluation))
        log(f"  {choice.label}: counted in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all")
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="B, the run's default batch")
    parser.add_argument("--target-min", default="6,10")
    parser.add_argument(
        "--whole-job", action="store_true", help="count every matmul of the job (slow)"
    )
    parser.add_argument("--sampled-rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    step_s, step_flops, rows, width = coop_step(args.batch)
    peak = matmul_rate(args.batch * rows, width)
    achieved = step_flops / step_s
    flops, _ = job_bound(args.methods, args.eps)
    total = sum(flops.values())
    trained = [name for name, f in flops.items() if f > 0]
    bound_s = total / (args.cores * peak)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, 1 thread per core, fp32")
    print(f"matmul, the private backward's products ({args.batch * rows} x {width} x {4 * width}):")
    print(f"  {peak / 1e9:.1f} GFLOP/s")
    print(f"CoOp private step (B = {args.batch}, {SEEN} classes, {rows} token rows per sample):")
    print(f"  {step_s * 1e3:.1f} ms, {step_flops / 1e9:.2f} GFLOP counted")
    print(f"  -> {achieved / 1e9:.1f} GFLOP/s, {achieved / peak:.0%} of the matmul rate")
    print(f"job: run --methods {args.methods} --eps {args.eps} (the run's defaults)")
    print(f"  CoOp's counted text-tower training: {flops.get('coop', 0.0) / 1e12:.2f} TFLOP")
    print(f"  {len(trained)} presets train through the text tower: {total / 1e12:.1f} TFLOP")
    print(f"  least wall time at the matmul rate on {args.cores} cores: {bound_s / 60:.1f} min")
    print(f"  at the step's measured rate: {total / (args.cores * achieved) / 60:.1f} min")
    targets = [float(t) for t in args.target_min.split(",")]
    for target in targets:
        print(f"  target {target:g} min: the bound is {bound_s / (60 * target):.0%} of it")
    if not args.whole_job:
        return 0
    print(f"whole job, every matmul counted (first {args.sampled_rounds} rounds of each run):")
    counted = job_counted(args.methods, args.eps, args.sampled_rounds)
    print(f"  {'preset':14s} {'training':>10s} {'evaluation':>11s}   (TFLOP)")
    for name, (train, evaluation) in sorted(counted.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {name:14s} {train / 1e12:10.2f} {evaluation / 1e12:11.2f}")
    train_sum = sum(t for t, _ in counted.values())
    eval_sum = sum(e for _, e in counted.values())
    whole = train_sum + eval_sum
    whole_s = whole / (args.cores * peak)
    print(
        f"  sum: {whole / 1e12:.1f} TFLOP ({train_sum / 1e12:.1f} training, "
        f"{eval_sum / 1e12:.1f} evaluation)"
    )
    print(f"  least wall time at the matmul rate on {args.cores} cores: {whole_s / 60:.1f} min")
    for target in targets:
        print(f"  target {target:g} min: the bound is {whole_s / (60 * target):.0%} of it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
