"""Defaults for the knobs a user may leave at "auto", computed from the machine and the plan.

Read-ahead 1: one block read while the previous one computes is all the overlap there is to
have (a block's read or its compute, whichever is longer, sets the pace), and each deeper
buffer is a block that cannot be pinned; the measurements behind it, and where read-ahead 0
wins instead, are in docs/design-notes-engine.md ("Read-ahead depth"). Each block read in
flight blocks one I/O thread, so the threads follow the depth. torch gets every CPU the
process may use (cgroup quota included): the I/O threads mostly wait on the disk or the
network.
"""

from __future__ import annotations

import torch

from ..errors import SettingsError
from ..format.manifest import Manifest
from .plan import ResidencyPlan
from .sysinfo import cpu_count, memory_limit, resident_set

AUTO = "auto"
DEFAULT_READ_AHEAD = 1


def _explicit(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a whole number or 'auto', not {value!r}") from None
    if number < 0:
        raise SettingsError(f"{name} must not be negative, not {number}")
    return number


def read_ahead(value: int | str) -> int:
    """Blocks read ahead of the one computing (the residency plan may lower it to fit)."""
    return DEFAULT_READ_AHEAD if value == AUTO else _explicit("read_ahead", value)


def read_ahead_with_bases(value: int | str, expert_prefetch: bool | str) -> int | None:
    """An expert-streamed plan's read-ahead: the one set, or None where plan_with_bases
    chooses it (``auto``, guesses not asked for)."""
    return None if value == AUTO and expert_prefetch is not True else read_ahead(value)


def io_threads(value: int | str, planned_read_ahead: int) -> int:
    """One thread per block read in flight."""
    if value == AUTO:
        return max(1, planned_read_ahead)
    return max(1, _explicit("io_threads", value))


def torch_threads(value: int | str) -> int:
    return cpu_count() if value == AUTO else max(1, _explicit("torch_threads", value))


def compute_slots(value: int | str) -> int:
    """Requests computing at once: as many as the CPUs hold beside torch's intra-op threads
    (one when torch has them all), so concurrent requests never oversubscribe the cores."""
    if value == AUTO:
        return max(1, cpu_count() // max(torch.get_num_threads(), 1))
    return max(1, _explicit("compute_slots", value))


def evict_after_use(manifest: Manifest, plan: ResidencyPlan) -> bool:
    """Whether streamed chunks should leave the page cache as soon as they have run: when
    this process's memory (its cgroup's, page cache included) cannot hold them besides what
    it holds already, each would be evicted before its next use anyway."""
    if plan.fully_resident:
        return False
    sizes = manifest.block_bytes
    streamed = sum(sizes[j] for j in plan.streamed)
    return resident_set() + plan.weight_bytes() + streamed > memory_limit()
