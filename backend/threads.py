"""How many CPU threads torch and the CRF processes get, from the cores this process may use.

``os.cpu_count()`` counts the machine's cores, not the process's: a container limited
to 4 of 64 cores (by CPU affinity or by a cgroup CPU quota) that starts 64 torch
threads and 64 CRF processes runs many times slower than with 4, because torch's
threads spin while they wait for each other. So everything is sized from the cores
available to the process:

- on the CPU, torch gets every core: the models are nearly all of a prediction's time
  there and run faster with more threads, while the CRF at the working resolution is a
  sliver of it. The CRF processes (half the cores) share the cores with torch only for
  the moments they run (docs/benchmarks.md, "Big photos, precision, threads", has the figures);
- on CUDA the models run on the GPU: torch keeps one core, the CRF takes the others.

``OMP_NUM_THREADS`` (or ``FREESEG_TORCH_THREADS``) and ``FREESEG_CRF_PROCESSES`` set
either number, for several processes on one machine (``WORKERS``, queue workers).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    cores: int  # available to this process
    torch_threads: int  # torch's intra-op threads, for the inference thread's models
    crf_processes: int  # CRF child processes (0: the CRF runs on the thread that waits for it)


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (v2 or v1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(cores, 1)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs' worth of time per period the cgroup allows, or None for no limit (or no cgroup file)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # v1: -1 for no limit
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def plan_threads(cores: int, device_type: str, crf_processes: int | None,
                 torch_threads: int | None = None) -> ThreadPlan:
    """Share ``cores`` between torch and the CRF processes; None: the default for the device (see the module)."""
    if crf_processes is None:
        crf_processes = max(cores - 1, 1) if device_type == "cuda" else max(cores // 2, 1)
    if torch_threads is None:
        torch_threads = max(cores - crf_processes, 1) if device_type == "cuda" else cores
    return ThreadPlan(cores=cores, torch_threads=torch_threads, crf_processes=crf_processes)


def configure_threads(device_type: str, crf_processes: int | None, torch_threads: int | None = None) -> ThreadPlan:
    """Set torch's intra-op threads for this process and log the plan; returns it."""
    plan = plan_threads(available_cores(), device_type, crf_processes, torch_threads)
    torch.set_num_threads(plan.torch_threads)
    log.info("CPU threads: %d cores available; torch %d threads (OMP_NUM_THREADS), %d CRF processes "
             "(FREESEG_CRF_PROCESSES)", plan.cores, plan.torch_threads, plan.crf_processes)
    return plan
