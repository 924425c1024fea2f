"""Which blocks stay in memory and how many stream through the buffer pool.

Every token sweeps all blocks in order, so the access pattern is cyclic and LRU never hits
once the budget is below the model size. Pinning a fixed set of blocks (the first ones that
fit) and streaming the rest gives the optimal hit rate, pinned/total. The budget covers the
non-block weights, the pinned blocks and the pool of streaming buffers (the block being
computed plus the read-ahead).

With expert streaming, a block's base (every byte outside its experts) is read by every
token while its experts are read a few at a time: a byte of base pinned saves a byte read
per token, a byte of whole block pinned saves less (only the share of its experts a token
routes to). So the bases of the streamed blocks are pinned first, as many as fit, then the
blocks without experts whole, and the room left holds the most routed experts
(expert_cache.py): a whole block pinned would hold its experts whatever the routing.

Once every streamed block's base is pinned, a block read ahead reads nothing but guessed
experts (its base is in memory already), while the same buffer as expert cache saves reads
on every token: where every base fits without a read-ahead, an `auto` read-ahead is 0,
unless guesses are asked for (`expert_prefetch: true`), and the buffer goes to the bases
and the cache (plan_with_bases).

A quantized store's block is read at its stored size and dequantized right after, on the
thread that read it (format/quantization.py): each streaming buffer has room for a block's
bytes and its dequantized tensors. A pinned block keeps its tensors dequantized only
(held.py), so blocks are planned at what they hold pinned (HeldSizes), and a percentage
budget is a share of the whole model held that way.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from ..errors import SettingsError
from ..format.manifest import Manifest
from ..units import format_size, parse_size
from .held import HeldSizes
from .sysinfo import available_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidencyPlan:
    budget: int
    resident: frozenset[int]  # block indexes held in memory for good
    pool_buffers: int  # streaming buffers: 1 for the block computing + the read-ahead
    buffer_bytes: int  # each: the largest block's chunk
    n_blocks: int
    rest_bytes: int
    # streamed blocks whose base (non-expert part) is held in memory for good, and its bytes
    pinned_bases: dict[int, int] = field(default_factory=dict)
    expert_cache: int = 0  # bytes for the most routed experts of the streamed blocks
    # a quantized store's: room beside each buffer for a block's tensors dequantized
    dequantized: int = 0
    held: tuple[int, ...] = ()  # what each block holds pinned (HeldSizes.blocks)
    cache_over_read_ahead: bool = False  # the read-ahead's buffer went to the expert cache
    # room to read a quantized chunk pinned where no streaming buffer takes it (HeldSizes)
    staging: int = 0

    @property
    def read_ahead(self) -> int:
        return max(self.pool_buffers - 1, 0)

    @property
    def streamed(self) -> list[int]:
        return [j for j in range(self.n_blocks) if j not in self.resident]

    @property
    def fully_resident(self) -> bool:
        return len(self.resident) == self.n_blocks

    @property
    def pinned_bytes(self) -> int:
        """The pinned blocks' bytes held, with the non-block weights and their staging."""
        return self.rest_bytes + sum(self.held[j] for j in self.resident) + self.staging

    def weight_bytes(self) -> int:
        """Bytes of weights this plan holds in memory at most."""
        return (
            self.pinned_bytes
            + sum(self.pinned_bases.values())
            + self.expert_cache
            + self.pool_buffers * (self.buffer_bytes + self.dequantized)
        )

    def describe(self) -> str:
        if self.fully_resident:
            return f"all {self.n_blocks} blocks resident ({format_size(self.weight_bytes())})"
        bases = (
            f" (the non-expert parts of {len(self.pinned_bases)} of them pinned, "
            f"{format_size(sum(self.pinned_bases.values()))}; an expert cache of "
            f"{format_size(self.expert_cache)})"
            if self.pinned_bases
            else ""
        )
        return (
            f"{len(self.resident)}/{self.n_blocks} blocks pinned, {len(self.streamed)} streamed"
            f"{bases} "
            f"through {self.pool_buffers} x {format_size(self.buffer_bytes)} buffers "
            f"(read-ahead {self.read_ahead})"
            + (
                f", each with {format_size(self.dequantized)} for its block dequantized"
                if self.dequantized
                else ""
            )
            + "; weights in memory <= "
            f"{format_size(self.weight_bytes())} of a {format_size(self.budget)} budget"
        )


AUTO_SHARE = 0.6  # of the memory this process can still use, for memory_budget="auto"


def resolve_budget(spec: str | int, model_bytes: int) -> int:
    """``"auto"``, ``"25%"`` (of the model), ``"2GiB"`` or bytes -> bytes."""
    if spec == "auto":
        return min(model_bytes, int(available_memory() * AUTO_SHARE))
    try:
        return parse_size(spec, reference=model_bytes)
    except ValueError as exc:
        raise SettingsError(f"memory_budget: {exc}") from exc


def plan_residency(
    manifest: Manifest,
    budget: int,
    read_ahead: int,
    bases: dict[int, int] | None = None,
    held: HeldSizes | None = None,
) -> ResidencyPlan:
    """Pin the first blocks that fit beside the non-block weights and the streaming pool;
    with ``bases`` (by block, the bytes of an expert-streamed block's non-expert part), pin
    the first bases that fit before any whole block (module docstring). ``held``: what each
    chunk holds pinned, which a quantized store needs (HeldSizes.of); a plain store's are
    its chunks' sizes."""
    if held is None:
        if manifest.quantization is not None:
            raise TypeError("a quantized store is planned with what its blocks hold pinned")
        held = HeldSizes.of(manifest, {})
    sizes = held.blocks
    n, rest = len(sizes), held.rest
    if budget >= held.total:
        everything = frozenset(range(n))
        return ResidencyPlan(budget, everything, 0, 0, n, rest, held=sizes, staging=held.staging)
    largest = max(manifest.block_bytes)  # a streaming buffer
    dequantized = max(manifest.chunks[b.chunk].dequantized_room for b in manifest.blocks)
    per_buffer = largest + dequantized
    # a block's chunk is read through a streaming buffer; a non-block one larger than that
    # through room of its own
    staging = held.staging if held.staging > per_buffer else 0
    fixed = rest + staging  # held whatever else is pinned
    minimum = fixed + per_buffer
    if budget < minimum:
        working = f" + its tensors dequantized {format_size(dequantized)}" if dequantized else ""
        reading = f" + room to read them in {format_size(staging)}" if staging else ""
        raise SettingsError(
            f"memory_budget {format_size(budget)} is below this model's minimum of "
            f"{format_size(minimum)} (non-block weights {format_size(rest)}{reading} + one "
            f"block {format_size(largest)}{working}); raise memory_budget"
        )
    buffers = 1 + max(read_ahead, 0)
    while buffers > 1 and fixed + buffers * per_buffer > budget:
        buffers -= 1
    if buffers < 1 + read_ahead and not bases:  # a plan with bases follows one without: told
        log.warning(
            "memory_budget %s leaves room for a read-ahead of %d blocks, not %d",
            format_size(budget),
            buffers - 1,
            read_ahead,
        )
    room = budget - fixed - buffers * per_buffer
    pinned_bases: dict[int, int] = {}
    for j, size in sorted((bases or {}).items()):
        if size > room:
            break
        pinned_bases[j] = size
        room -= size
    resident: list[int] = []
    if bases:  # the blocks without experts whole, the rest for the expert cache
        for j, size in enumerate(sizes):
            if j not in bases and size <= room:
                resident.append(j)
                room -= size
        cache = room if len(pinned_bases) == len(bases) else 0
    else:
        for j, size in enumerate(sizes):
            if size > room:
                break
            resident.append(j)
            room -= size
        cache = 0
    streamed = n - len(resident)
    return ResidencyPlan(
        budget,
        frozenset(resident),
        min(buffers, streamed),
        largest,
        n,
        rest,
        pinned_bases,
        cache,
        dequantized,
        sizes,
        staging=staging,
    )


def plan_with_bases(
    manifest: Manifest,
    budget: int,
    read_ahead: int | None,
    bases: dict[int, int],
    held: HeldSizes | None = None,
) -> ResidencyPlan:
    """The plan of an expert-streamed model once its ``bases`` are known. ``read_ahead`` None
    (auto, guesses not asked for): 1, or 0 where every streamed block's base is pinned
    without a read-ahead, its buffer going to the bases and the expert cache (module
    docstring)."""
    plan = plan_residency(manifest, budget, 1 if read_ahead is None else read_ahead, bases, held)
    if read_ahead is None and plan.read_ahead:
        lean = plan_residency(manifest, budget, 0, bases, held)
        if set(lean.streamed) <= set(lean.pinned_bases):
            log.info(
                "read-ahead 0: without one, every streamed block's non-expert part is pinned, "
                "and its buffer holds the most routed experts instead of guesses (set "
                "read_ahead to read ahead)"
            )
            return dataclasses.replace(lean, cache_over_read_ahead=True)
    return plan
