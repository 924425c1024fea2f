"""What this process may use of the machine: memory and CPUs, cgroup limits included."""

from __future__ import annotations

import math
import os
from pathlib import Path


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int:
    """Bytes this process could still allocate: min(MemAvailable, cgroup limit - usage)."""
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        meminfo[key] = int(value.split()[0]) * 1024
    free = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        # cgroup v1 reports "no limit" as a huge number
        if limit is not None and usage is not None and limit < (1 << 60):
            free = min(free, max(limit - usage, 0))
    return free


def cpu_count() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a pod's
    ``limits.cpu``), which os.cpu_count() and torch's default thread count both ignore."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cpu_quota()
    return max(1, min(cpus, quota)) if quota else cpus


def _cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs a cgroup quota allows, rounded up; None without a quota."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (root / "cpu.max").read_text().split()
        if quota != "max":
            return math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    quota_us = _read_int(str(root / "cpu" / "cpu.cfs_quota_us"))  # v1: -1 means none
    period_us = _read_int(str(root / "cpu" / "cpu.cfs_period_us"))
    if quota_us and period_us:
        return math.ceil(quota_us / period_us)
    return None
