"""Put a block's tensors into its module just before it runs, and take them out after.

The module keeps its meta tensors as placeholders; binding swaps in views of the chunk's
bytes (no copy), unbinding swaps the placeholders back so the bytes can be reused. Each
block has one hook object, registered and removed as one unit: a resident block's only
counts its runs, a streamed block's waits for the sweep group (sweeps.py) to install the
block, which leases the block's tensors from the streamer. A block the plan pins that the
background fill (fill.py) has not installed yet has a pending block's hook: a streamed
block's until its pinned copy is installed, a resident block's after.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import ChunkIntegrityError
from .expert_reader import ExpertLease
from .experts import ExpertsModule, routed
from .fill import PinFill
from .readers import Lease
from .skeleton import tied_groups
from .sweeps import SweepGroup


class BlockBinding:
    """Where each of a block's tensors lives (submodule, attribute, parameter or buffer)."""

    def __init__(self, prefix: str, module: nn.Module):
        self.prefix = prefix
        self.module = module
        state = module.state_dict(keep_vars=True)  # parameters + persistent buffers
        # key inside the block -> (owning submodule, attribute name, is a parameter)
        self.places: dict[str, tuple[nn.Module, str, bool]] = {}
        for key in state:
            owner, _, name = key.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            self.places[key] = (sub, name, name in sub._parameters)
        self.placeholders = dict(state)
        # keys inside this block that share one tensor (tied within the block)
        self.aliases = {k: group for group in tied_groups(state) for k in group}

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        """``tensors`` are keyed by full state-dict names (``prefix.sub.weight``)."""
        base = self.prefix + "."
        bound: dict[str, nn.Parameter | torch.Tensor] = {}
        for key, (sub, name, is_param) in self.places.items():
            value = tensors.get(base + key)
            if value is None:
                source = next((a for a in self.aliases.get(key, ()) if base + a in tensors), None)
                if source is None:
                    raise ChunkIntegrityError(f"tensor {base + key} is missing from its chunk")
                value = bound.get(source)
                if value is None:
                    value = tensors[base + source]
            if is_param and not isinstance(value, nn.Parameter):
                # the skeleton keeps from_pretrained's flag: torch.matmul decomposes
                # differently on it alone, which changes decode-step rounding on CPU
                value = nn.Parameter(value, requires_grad=self.placeholders[key].requires_grad)
            bound[key] = value
            if is_param:
                sub._parameters[name] = value
            else:
                sub._buffers[name] = value

    def unbind(self) -> None:
        for key, (sub, name, is_param) in self.places.items():
            if is_param:
                sub._parameters[name] = self.placeholders[key]
            else:
                sub._buffers[name] = self.placeholders[key]


class BlockHook(ABC):
    """The forward hooks of one block, registered and removed as one unit. The sweep group
    (sweeps.py) checks each request for cancellation before every block: a block boundary
    is where a request stops."""

    def __init__(self, index: int, binding: BlockBinding, group: SweepGroup):
        self.index = index
        self.binding = binding
        self.group = group
        self._handles: list[RemovableHandle] = []

    @abstractmethod
    def attach(self) -> None:
        """Register the hooks on the block's module."""

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class ResidentBlockHook(BlockHook):
    """A pinned block's tensors are bound for good: it never waits for weights."""

    def attach(self) -> None:
        self._handles = [self.binding.module.register_forward_pre_hook(self._pre)]

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self.group.resident_run()


class StreamedBlockHook(BlockHook):
    """Waits before each run until the sweep group has installed the block (one lease for
    every request that runs it then). Tensors of a kept lease stay bound between installs:
    binding them again each time would cost more than their views, which stay valid.

    With ``experts`` (the block's experts modules, by their group in the chunk), each experts
    module asks the installed lease for its routed experts just before it runs
    (expert_reader.py)."""

    _bound: dict[str, torch.Tensor] | None = None  # kept tensors bound between installs
    _lease: Lease | None = None  # the installed lease

    def __init__(
        self,
        index: int,
        binding: BlockBinding,
        group: SweepGroup,
        experts: Sequence[tuple[int, ExpertsModule]] = (),
    ):
        super().__init__(index, binding, group)
        self.experts = list(experts)

    def attach(self) -> None:
        module = self.binding.module
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post, always_call=True),
        ]
        base = self.binding.prefix + "."
        for g, spec in self.experts:
            sub = module.get_submodule(spec.name.removeprefix(base))
            pre = functools.partial(self._route, g, spec)
            self._handles.append(sub.register_forward_pre_hook(pre, with_kwargs=True))

    def _route(
        self, g: int, spec: ExpertsModule, module: nn.Module, args: tuple, kwargs: dict
    ) -> None:
        lease = self._lease
        if not isinstance(lease, ExpertLease):  # read whole (a lease of a dense reader)
            return
        self.group.fetch_experts(lease, g, routed(args, kwargs, spec))
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(hidden, torch.Tensor):
            # after this block's own experts: their read goes first
            self.group.streamer.guess_next(self.index, g, hidden)

    def detach(self) -> None:
        super().detach()
        if self._bound is not None:
            self._unbind()  # the views go first, so the reader can unmap the mappings

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self.group.enter(self.index)

    def _post(self, module: nn.Module, args: tuple, output: object) -> None:
        # always_call: also after a failed forward (output None), which must not confirm
        self.group.exit(ran=output is not None)

    def acquire(self) -> Lease:
        """The block's tensors for its next install (the sweep group calls it, nobody
        computing)."""
        return self.group.streamer.acquire(self.index)

    def install(self, lease: Lease) -> None:
        if self._bound is not lease.tensors:
            self._bound = None  # a bind that fails part-way leaves nothing known bound
            self.binding.bind(lease.tensors)
            self._bound = lease.tensors if lease.kept else None
        self._lease = lease
        if isinstance(lease, ExpertLease):
            lease.rebind = self.binding.bind  # it may move to its block's home and back
            predictor = self.group.streamer.predictor
            if predictor is not None:
                predictor.learn(self.index, lease.tensors)

    def uninstall(self, lease: Lease) -> None:
        self._lease = None
        if not lease.kept:
            self._unbind()

    def _unbind(self) -> None:
        self.binding.unbind()
        self._bound = None


class PendingBlockHook(StreamedBlockHook):
    """A block the plan pins, before the fill (fill.py) has installed it: a run waits in the
    sweeps as for a streamed block, for the fill's pinned copy; that copy, once installed,
    stays bound (its lease is kept) and later runs go as a pinned block's. A run that found
    the block pending just before it was installed still waits and is admitted with the
    same copy: either way every run computes on the same bytes."""

    def __init__(self, index: int, binding: BlockBinding, group: SweepGroup, fill: PinFill):
        super().__init__(index, binding, group)
        self.fill = fill
        self.pinned = False

    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self.pinned:
            self.group.resident_run()
        else:
            self.group.enter(self.index)

    def acquire(self) -> Lease:
        lease = self.fill.lease(self.index)
        # the streamed blocks after it start reading now, not once the first of them is
        # needed: the pinned ones before them come from the fill, not the read-ahead
        self.group.streamer.read_ahead(self.index)
        return lease

    def install(self, lease: Lease) -> None:
        super().install(lease)
        self.pinned = True
