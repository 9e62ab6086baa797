"""What runs fast on this machine: the tower's precision and the number of CPU threads.

Both are choices of how to compute, never of what: bf16 changes results by rounding only
(tests/test_speed.py bounds it), threads not at all.

- Precision. bf16 autocast pays where the hardware multiplies bf16 natively: CUDA GPUs with
  bf16 support, and CPUs with AMX tiles (Sapphire Rapids and later), where a bf16 matmul at
  prompt-learning shapes runs several times faster than fp32. Without AMX (e.g. AVX2 only)
  oneDNN emulates bf16 and a matmul ran 20x SLOWER than fp32 here (AMD EPYC, AVX2: 31-39 vs
  1.1-1.9 GFLOP/s on [12288, 64] x [64, 64..256]), so "auto" keeps fp32 there. AVX512-BF16
  without AMX (AMD Zen 4) multiplies bf16 natively, a [4096, 64] x [64, 256] matmul 3.8x
  faster than fp32 (0.63 vs 2.41 ms, 1 thread), but the elementwise ops around it slow down and
  a private round is not faster overall (`fpl-bench bench --eps 0.5 --clients 10 --rounds 2`,
  s per round fp32 / bf16: CoOp 1.72 / 1.82, CoCoOp 5.32 / 7.01, PLOT 7.33 / 6.37, MaPLe 6.43 /
  5.31), so "auto" keeps fp32 there too; `--precision bf16` asks for it.
- Threads. Intra-op threads pay only when an op is large enough, and OpenMP threads that spin
  against other busy processes cost far more than they give (measured here with two other jobs
  on two cores: a private step took 27x longer on 2 threads than on 1). So a step gets more
  than one thread only when its work is large AND cores are idle, counting the cores that other
  processes keep busy at the moment the run starts. Other jobs that start later can still
  collide with a second thread; OMP_WAIT_POLICY=PASSIVE (idle threads sleep instead of
  spinning) turns that collision from 27x slower into ~1.1x (measured: 144 vs 131 ms per
  private step on 2 threads vs 1 with both cores busy elsewhere). The command line and the
  worker processes set it (fpl_bench/process.py); importing the package does not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch

Precision = Literal["fp32", "bf16"]

# Work (FLOPs of one local step) from which a second intra-op thread pays for itself.
PARALLEL_FLOPS = 1e9


_PER_SAMPLE_BACKWARD: ContextVar[bool] = ContextVar("per_sample_backward", default=False)


@contextmanager
def per_sample_backward() -> Iterator[None]:
    """Marks forwards whose backward runs once per sample (vmapped over B cotangents, for DP
    clipping): there the text tower builds its hand-written, sample-batched backward
    (fpl_bench/text_tower/backward.py). A single backward (no DP) stays with autograd's engine,
    which is faster for one cotangent (no Python per op)."""
    token = _PER_SAMPLE_BACKWARD.set(True)
    try:
        yield
    finally:
        _PER_SAMPLE_BACKWARD.reset(token)


def per_sample_backward_ahead() -> bool:
    """Whether the current forward is under `per_sample_backward`."""
    return _PER_SAMPLE_BACKWARD.get()


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 or wider: bf16/fp16 become fp32, fp32 and fp64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fast_precision(device: torch.device) -> Precision:
    """bf16 where the device multiplies bf16 natively (CUDA with bf16, CPU with AMX), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "bf16" if amx is not None and amx() else "fp32"


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """'fp32' or 'bf16' as given; 'auto' -> `fast_precision(device)`."""
    if choice == "auto":
        return fast_precision(device)
    if choice not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16; got {choice!r}")
    return choice  # type: ignore[return-value]


def pick_threads(step_flops: float, *, cores: int, busy_elsewhere: float) -> int:
    """Intra-op threads for steps of `step_flops` FLOPs: 1 below PARALLEL_FLOPS, otherwise
    every core that other processes leave idle (at least 1; never more than `cores`)."""
    if step_flops < PARALLEL_FLOPS:
        return 1
    idle = int(cores - busy_elsewhere + 0.5)
    return max(1, min(cores, idle))


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else `platform.processor()`), which the
    benchmark scripts print beside their figures."""
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores_elsewhere(interval: float = 0.25) -> float:
    """Cores kept busy by OTHER processes over `interval` seconds (Linux /proc/stat minus this
    process's own CPU time); the 1-minute load average where /proc/stat is missing."""
    try:
        before, own_before = _proc_stat_busy(), _own_cpu_seconds()
        time.sleep(interval)
        after, own_after = _proc_stat_busy(), _own_cpu_seconds()
    except OSError:
        return float(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0.0
    others = (after - before) - (own_after - own_before)
    return max(0.0, others / interval)


def _proc_stat_busy() -> float:
    """Busy CPU seconds summed over all cores since boot (user .. steal, not idle or iowait)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
