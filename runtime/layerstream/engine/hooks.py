"""Put a block's tensors into its module just before it runs, and take them out after.

The module keeps its meta tensors as placeholders; binding swaps in views of the chunk's
bytes (no copy), unbinding swaps the placeholders back so the bytes can be reused. Each
block has one hook object, registered and removed as one unit: a resident block's only
counts its runs, a streamed block's leases the block's tensors from the streamer for the
run and holds what it has bound in between.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import ChunkIntegrityError
from .readers import Lease
from .skeleton import tied_groups
from .streamer import WeightStreamer


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
    """The forward hooks of one block. ``check_cancel`` raises when the request running
    has been cancelled: a block boundary is where a request stops."""

    def __init__(
        self,
        index: int,
        binding: BlockBinding,
        streamer: WeightStreamer,
        check_cancel: Callable[[], None],
    ):
        self.index = index
        self.binding = binding
        self.streamer = streamer
        self._check_cancel = check_cancel
        self._handles: list[RemovableHandle] = []

    @abstractmethod
    def attach(self) -> None:
        """Register the hooks on the block's module."""

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def abort(self) -> None:
        """Give back what a failed or cancelled forward left behind."""
        return None  # a resident block holds nothing per run


class ResidentBlockHook(BlockHook):
    """A pinned block's tensors are bound for good: its hook only counts its runs."""

    def attach(self) -> None:
        self._handles = [self.binding.module.register_forward_pre_hook(self._pre)]

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self._check_cancel()
        self.streamer.hit()


class StreamedBlockHook(BlockHook):
    """Leases the block's tensors before each run and gives them back after it. Tensors of
    a kept lease stay bound between runs: binding them again each time would cost more than
    their views, which stay valid."""

    _lease: Lease | None = None  # the lease of the run in progress
    _bound: dict[str, torch.Tensor] | None = None  # kept tensors bound between runs

    def attach(self) -> None:
        module = self.binding.module
        self._handles = [
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post, always_call=True),
        ]

    def detach(self) -> None:
        super().detach()
        if self._bound is not None:
            self._unbind()  # the views go first, so the reader can unmap the mappings

    def abort(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._unbind()
            lease.release()

    def _pre(self, module: nn.Module, args: tuple) -> None:
        self._check_cancel()
        lease = self.streamer.acquire(self.index)
        self._lease = lease
        if self._bound is not lease.tensors:
            self.binding.bind(lease.tensors)
            if lease.kept:
                self._bound = lease.tensors

    def _post(self, module: nn.Module, args: tuple, output: object) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            self._unbind()
            return
        try:
            lease.confirm()
        finally:
            if not lease.kept:
                self._unbind()
            lease.release()

    def _unbind(self) -> None:
        self.binding.unbind()
        self._bound = None
