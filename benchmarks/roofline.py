"""How close a private step runs to this CPU core's matmul rate, and the least time the text
tower's training alone needs for a job at that rate.

    python benchmarks/roofline.py [--methods all] [--eps 0.5] [--cores 2] [--target-min 6,10]

A private step of a text-prompt learner is B + 1 passes of the text tower (one forward, one
input-gradient backward per sample: privacy/per_sample.py), each about `TextTower.pass_flops`
= 24 W^2 FLOPs per token row and layer (the q, k, v, out and MLP products; attention scores,
layer norms and activations not counted). The script measures, on one thread:

1. this core's matmul rate on the step's own products (the MLP's [B rows, W] x [W, 4W] and
   back, the rows a private backward runs), the best of several repeats;
2. CoOp's private step on the embedded default (bench's synthetic federation, its 32 seen
   classes of 64), its counted FLOPs per second and their share of (1);
3. the job `fpl-bench run --methods M --eps E` would run with the run's defaults: the counted
   text-tower training FLOPs of one CoOp run (estimates.cell_training_flops on the job's own
   partition), and how many of the job's presets do at least that work (every preset that
   trains a prompt through the text tower: CoOp's steps with one or more prompts, a per-image
   tower or deep prompts on top; not zero-shot, which trains nothing, nor FedCLIP, whose adapter
   reads the image features only). Their product over (cores x the rate of (1)) is a lower
   bound on the job's wall time: no evaluation, no attention scores, no per-image towers, every
   core at its matmul rate.

Prints the CPU, the three figures and the bound against each --target-min.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from fedotp_eval import cpu_name  # benchmarks/ is the script's path

from fpl_bench import bench
from fpl_bench.catalog import method_names, resolve_method
from fpl_bench.estimates import cell_training_flops
from fpl_bench.learners import LEARNERS
from fpl_bench.method import build_method
from fpl_bench.prepare import prepare
from fpl_bench.spec import build_spec

NO_TEXT_TOWER_TRAINING = {"fedclip_adapter"}  # learners whose trained part skips the text tower


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
    """FLOP/s of [rows, W] x [W, 4W] and [rows, 4W] x [4W, W], fp32: the best of each, averaged."""
    rates = []
    for k, n in ((width, 4 * width), (4 * width, width)):
        a, b = torch.randn(rows, k), torch.randn(k, n)
        rates.append(2.0 * rows * k * n / best_seconds(lambda a=a, b=b: a @ b))
    return statistics.fmean(rates)


def coop_step(batch: int) -> tuple[float, float, int, int]:
    """(seconds, counted FLOPs, token rows, width) of CoOp's private step, median of 12 rounds
    of one client with `batch` examples (one step each)."""
    device = torch.device("cpu")
    backbone = bench.bench_backbone("embedded", device)
    method = build_method(resolve_method("coop"))
    sizes = bench.Sizes(samples_per_client=batch, batch_size=batch, local_epochs=1, rounds=14)
    run = bench.build_run(
        method,
        backbone,
        clients=1,
        total_clients=1,
        eps=0.5,
        config=bench.Config(),
        sizes=sizes,
        device=device,
    )
    seen = bench.N_CLASSES // 2
    run.run_round(1)
    walls = []
    for rnd in range(2, 14):
        t0 = time.perf_counter()
        run.run_round(rnd)
        walls.append(time.perf_counter() - t0)
    expected = run.expected_batch(run.rounds_schedule[1][0])
    flops = run.tower.pass_flops(seen) * (1 + expected)
    return statistics.median(walls), flops, run.tower.rows(seen), run.tower.width


def job_bound(methods: str, eps: float) -> tuple[float, list[str], list[int]]:
    """(CoOp's counted training FLOPs in the job, the job's presets that do at least that, the
    clients' training examples at the job's first seed)."""
    choices = [resolve_method(n) for n in method_names(methods)]
    spec = build_spec(methods=choices, eps=[eps])
    prep = prepare(spec, log=lambda _: None)
    seed = spec.seeds[0]
    coop = cell_training_flops(prep, (seed, eps, resolve_method("coop")))
    heavy = [
        c.label
        for c in choices
        if LEARNERS.get(c.learner).trains and c.learner not in NO_TEXT_TOWER_TRAINING
    ]
    return coop, heavy, [len(idx) for idx in prep.partitions[seed][1].train]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all")
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--target-min", default="6,10")
    args = parser.parse_args()
    torch.set_num_threads(1)

    step_s, step_flops, rows, width = coop_step(batch=32)
    peak = matmul_rate(32 * rows, width)
    achieved = step_flops / step_s
    coop, heavy, _ = job_bound(args.methods, args.eps)
    total = coop * len(heavy)
    bound_s = total / (args.cores * peak)
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, 1 thread per core")
    print(f"matmul, the private backward's products ({32 * rows} x {width} x {4 * width}):")
    print(f"  {peak / 1e9:.1f} GFLOP/s")
    print(f"CoOp private step (B = 32, {bench.N_CLASSES // 2} classes, {rows} token rows):")
    print(f"  {step_s * 1e3:.1f} ms, {step_flops / 1e9:.2f} GFLOP counted")
    print(f"  -> {achieved / 1e9:.1f} GFLOP/s, {achieved / peak:.0%} of the matmul rate")
    print(f"job: run --methods {args.methods} --eps {args.eps} (the run's defaults)")
    print(f"  one CoOp run's counted text-tower training: {coop / 1e12:.2f} TFLOP")
    print(f"  presets doing at least that: {len(heavy)} -> {total / 1e12:.1f} TFLOP")
    print(f"  least wall time at the matmul rate on {args.cores} cores: {bound_s / 60:.1f} min")
    print(f"  at the step's measured rate: {total / (args.cores * achieved) / 60:.1f} min")
    for target in (float(t) for t in args.target_min.split(",")):
        need = bound_s / (60 * target)
        print(f"  target {target:g} min: the bound is {need:.0%} of it")


if __name__ == "__main__":
    main()
