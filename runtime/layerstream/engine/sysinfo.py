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


def _meminfo() -> dict[str, int]:
    meminfo = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        meminfo[key] = int(value.split()[0]) * 1024
    return meminfo


CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def cgroup_dirs(
    controller: str, proc_cgroup: str | None = None, root: Path = CGROUP_ROOT
) -> tuple[list[Path], bool]:
    """The directories of this process's cgroup for ``controller`` and of its ancestors up
    to the hierarchy's root, innermost first, and whether they are cgroup v2. Read from
    /proc/self/cgroup, so a process in a nested cgroup (a benchmark's, a systemd slice's)
    sees its own limits; inside a container's cgroup namespace its path is "/" and this is
    the mount's root. ``([], False)`` without such a controller."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return [], False
    v2_path = None
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controller in controllers.split(","):  # v1 (takes precedence on hybrid hosts)
            for name in (controller, controllers):
                if (root / name).is_dir():
                    return _up_to(root / name, path), False
        if hierarchy == "0" and controllers == "":
            v2_path = path
    if v2_path is not None and (root / "cgroup.controllers").exists():
        return _up_to(root, v2_path), True
    return [], False


def _up_to(mount: Path, path: str) -> list[Path]:
    here = mount / path.strip("/")
    if not here.is_dir():  # a path from outside our cgroup namespace: only the mount is ours
        return [mount]
    dirs = [here]
    while here != mount:
        here = here.parent
        dirs.append(here)
    return dirs


def _memory_files(v2: bool) -> tuple[str, str]:
    return (
        ("memory.max", "memory.current")
        if v2
        else ("memory.limit_in_bytes", "memory.usage_in_bytes")
    )


def memory_limit() -> int:
    """Bytes of memory this process's cgroup may hold in all (its page cache included): the
    tightest limit on it and its ancestors, or the machine's RAM where none is set."""
    total = _meminfo().get("MemTotal", NO_LIMIT)
    dirs, v2 = cgroup_dirs("memory")
    limit_file, _ = _memory_files(v2)
    for directory in dirs:
        limit = _read_int(str(directory / limit_file))
        if limit is not None and limit < NO_LIMIT:
            total = min(total, limit)
    return total


def available_memory() -> int:
    """Bytes this process could still allocate: min(MemAvailable, cgroup limit - usage) over
    its cgroup and ancestors."""
    meminfo = _meminfo()
    free = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    dirs, v2 = cgroup_dirs("memory")
    limit_file, usage_file = _memory_files(v2)
    for directory in dirs:
        limit = _read_int(str(directory / limit_file))
        usage = _read_int(str(directory / usage_file))
        if limit is not None and usage is not None and limit < NO_LIMIT:
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


def _cpu_quota(proc_cgroup: str | None = None, root: Path = CGROUP_ROOT) -> int | None:
    """CPUs the tightest cgroup quota on this process allows, rounded up; None without one."""
    dirs, v2 = cgroup_dirs("cpu", proc_cgroup, root)
    quotas = []
    for directory in dirs:
        if v2:  # "max 100000" or "200000 100000"
            try:
                quota, period = (directory / "cpu.max").read_text().split()
            except (OSError, ValueError):
                continue
            if quota != "max":
                quotas.append(math.ceil(int(quota) / int(period)))
        else:  # cfs_quota_us is -1 without a quota
            quota_us = _read_int(str(directory / "cpu.cfs_quota_us"))
            period_us = _read_int(str(directory / "cpu.cfs_period_us"))
            if quota_us and period_us:
                quotas.append(math.ceil(quota_us / period_us))
    return min(quotas) if quotas else None


def resident_set() -> int:
    """This process's resident set size in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")
