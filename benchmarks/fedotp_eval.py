"""Seconds per FedOTP evaluation: the OT learner's `predict` against the same learner and solver
of another git revision, measured in the same process, interleaved.

    python benchmarks/fedotp_eval.py [--baseline REV] [--dims 512,64] [--threads 1] [--clustered]

One evaluation is one client's prompts scored on the test images (`FederatedRun.evaluate` runs
it once per client with a local prompt: a round of 10 clients costs 10 of them). The default
sizes are those at which fpl-bench was timed against the official DP-FPL code: 200 images x 20
classes, 49 patch tokens (a 7 x 7 grid, ViT-B/32 at 224 px), FedOTP's 2 prompts, the card's
eps and top_percent, one thread, at feature dims 512 (ViT-B/16) and 64 (the embedded tiny
CLIP). Features are random unit vectors, patch tokens rounded to fp16 as the feature cache
keeps them (`fpl_bench.bench`'s synthetic federation): no class stands out, so every
(image, class) problem is solved. `--clustered` draws each image's patches around one class's
text feature instead (one class stands out, as in a trained model), and the argmax bound skips
most classes.

Prints one row per dim: the baseline's and this tree's median wall seconds per evaluation,
their ratio, the median CPU seconds of each, and whether both predict the same classes. The
machine may be shared: read the ratio, taken side by side, and the CPU seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor

from fpl_bench.compute import cpu_name
from fpl_bench.learners import LEARNERS
from fpl_bench.learners._base import EncodeContext
from fpl_bench.learners.ot import OTPatch

ROOT = Path(__file__).resolve().parents[1]
LOGIT_SCALE = 100.0  # CLIP's exp(log 100), the trained value


@dataclass(frozen=True)
class Scale:
    """What the OT learner reads of the text tower: its logit scale."""

    logit_scale: float


def baseline_learner(rev: str) -> type:
    """The OT learner class and its solver as of git revision `rev`, imported under other
    names (the registry is not touched)."""

    def source(path: str) -> str:
        shown = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return shown.stdout

    solver = types.ModuleType("fpl_bench_baseline_ot")
    learner = types.ModuleType("fpl_bench_baseline_learner")
    # both modules are importable while their code runs: dataclasses look their module up
    modules = {"fpl_bench.ot": solver, solver.__name__: solver, learner.__name__: learner}
    path = "fpl_bench/learners/ot.py"
    with (
        mock.patch.dict(sys.modules, modules),
        mock.patch.object(LEARNERS, "register", lambda name: lambda cls: cls),
    ):
        exec(compile(source("fpl_bench/ot.py"), f"{rev}:fpl_bench/ot.py", "exec"), solver.__dict__)
        exec(compile(source(path), f"{rev}:{path}", "exec"), learner.__dict__)
    return learner.OTPatch


def features(
    dim: int, *, images: int, classes: int, patches: int, prompts: int, clustered: bool, seed: int
) -> tuple[Tensor, Tensor]:
    """(text features [prompts, classes, dim], patch tokens [images, patches, dim]), unit norm."""
    gen = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(prompts, classes, dim, generator=gen), dim=-1)
    tokens = torch.randn(images, patches, dim, generator=gen)
    if clustered:
        labels = torch.randint(0, classes, (images,), generator=gen)
        tokens = text.mean(0)[labels].unsqueeze(1) + 3.0 * tokens / dim**0.5
    return text, F.normalize(tokens, dim=-1).half().float()


def timed(call: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare with")
    parser.add_argument("--dims", default="512,64", help="feature dims, comma-separated")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--patches", type=int, default=49)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--eps", type=float, default=0.1, help="the card's default")
    parser.add_argument("--top-percent", type=float, default=0.8, help="the card's default")
    parser.add_argument("--clustered", action="store_true", help="one class stands out per image")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    options = dict(eps=args.eps, top_percent=args.top_percent, max_iter=100, thresh=1e-3)
    learners = {"baseline": baseline_learner(args.baseline)(**options), "new": OTPatch(**options)}
    ctx = EncodeContext(tower=Scale(LOGIT_SCALE), class_idx=torch.arange(args.classes))
    print(
        f"# {cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
        f"{args.threads} thread(s); {args.images} images x {args.classes} classes, "
        f"{args.patches} patches, {args.prompts} prompts, eps {args.eps}, top_percent "
        f"{args.top_percent}, {'clustered' if args.clustered else 'random'} features; "
        f"baseline {args.baseline}"
    )
    print(
        "dim | baseline s/eval | new s/eval | baseline / new | CPU s/eval baseline, new | "
        "same predictions"
    )
    for dim in (int(d) for d in args.dims.split(",")):
        text, tokens = features(
            dim,
            images=args.images,
            classes=args.classes,
            patches=args.patches,
            prompts=args.prompts,
            clustered=args.clustered,
            seed=args.seed,
        )
        calls = {
            name: partial(learner.predict, text, tokens.mean(1), tokens, ctx)
            for name, learner in learners.items()
        }
        predictions = [call() for call in calls.values()]  # also the warm-up
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
        for _ in range(args.repeats):  # interleaved: both see the same load
            for name, call in calls.items():
                times[name].append(timed(call))
        wall = {name: statistics.median(t[0] for t in times[name]) for name in calls}
        cpu = {name: statistics.median(t[1] for t in times[name]) for name in calls}
        print(
            f"{dim} | {wall['baseline']:.4f} | {wall['new']:.4f} | "
            f"{wall['baseline'] / wall['new']:.1f}x | {cpu['baseline']:.4f}, {cpu['new']:.4f} | "
            f"{torch.equal(*predictions)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
