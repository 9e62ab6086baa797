"""Settings of a whole process: how its OpenMP threads wait and how its allocator keeps memory.

They belong to whoever owns the process, never to a library import or call: the command line
sets them at its entry (`fpl_bench.cli.main`), and a job's worker processes at their start
(fpl_bench/parallel.py). Neither changes what is computed, only how fast.

- `OMP_WAIT_POLICY=PASSIVE`: an idle intra-op thread sleeps instead of spinning. A thread that
  spins while another process needs its core slows both (fpl_bench/compute.py, "Threads").
  OpenMP reads the variable once, when torch loads it, so it is set before `import torch`; the
  fork server that worker processes are forked from imports torch itself, so it is started with
  the variable set (`parallel.warm_workers`).
- `retain_freed_memory`: freed tensors' memory stays with the process for the next allocation
  instead of going back to the kernel and faulting in again.
- `QUIET_WARNINGS`: torch's notes on a known, expected cost are not shown to the user (each is
  explained where the code incurs it).

Variables the environment already holds are left as they are.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["ENVIRONMENT", "QUIET_WARNINGS", "configure_process", "retain_freed_memory"]

# Read once by libraries when they load (OpenMP with torch): set before importing torch.
ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}

# Warning messages (regular expressions matched at the start) not shown. The fused attention
# kernels have no vmap batching rule, so torch loops over the vmapped dimension and says so;
# the text tower picks them under bf16 on purpose (text_tower/tower.py, TextTower.autocast).
QUIET_WARNINGS = (
    r"There is a performance drop because we have not yet implemented the batching rule for "
    r"aten::_scaled_dot_product",
)


def configure_process() -> None:
    """Set the `ENVIRONMENT` variables that are unset, hide the `QUIET_WARNINGS` and keep freed
    memory (`retain_freed_memory`), for this whole process. For a process's owner only (the CLI's
    entry, a worker's start), before torch is imported."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    retain_freed_memory()


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


def retain_freed_memory() -> bool:
    """On glibc, serve allocations below 1 GiB from the heap and keep what is freed (mallopt
    M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2 GiB, M_TOP_PAD 64 MiB), for this whole process.
    glibc's default maps every allocation above its threshold afresh, so a tensor's pages fault
    in on first touch and go back to the kernel when it is freed, at every local step; with
    this they are faulted in once. The process keeps its peak heap instead of returning it.
    Returns False where it does not apply (not Linux with glibc)."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = (
            (_M_MMAP_THRESHOLD, 1 << 30),
            (_M_TRIM_THRESHOLD, 1 << 31),
            (_M_TOP_PAD, 64 << 20),
        )
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):
        return False
