"""Put a block's tensors into its module just before it runs, and take them out after.

The module keeps its meta tensors as placeholders; installing swaps in views of the chunk
buffer (no copy), releasing swaps the placeholders back so the buffer can be reused.
"""

from __future__ import annotations

import collections

import torch
from torch import nn

from ..errors import ChunkIntegrityError


class BlockSlots:
    """Where each of a block's tensors lives (submodule, attribute, parameter or buffer)."""

    def __init__(self, prefix: str, module: nn.Module):
        self.prefix = prefix
        self.module = module
        state = module.state_dict(keep_vars=True)  # parameters + persistent buffers
        self.slots: dict[str, tuple[nn.Module, str, bool]] = {}
        for key in state:
            owner, _, name = key.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            self.slots[key] = (sub, name, name in sub._parameters)
        self.placeholders = dict(state)
        by_id: dict[int, list[str]] = collections.defaultdict(list)
        for key, value in state.items():
            by_id[id(value)].append(key)
        # keys inside this block that share one tensor (tied within the block)
        self.aliases = {k: keys for keys in by_id.values() if len(keys) > 1 for k in keys}

    def install(self, tensors: dict[str, torch.Tensor]) -> None:
        """``tensors`` are keyed by full state-dict names (``prefix.sub.weight``)."""
        base = self.prefix + "."
        installed: dict[str, nn.Parameter | torch.Tensor] = {}
        for key, (sub, name, is_param) in self.slots.items():
            value = tensors.get(base + key)
            if value is None:
                source = next((a for a in self.aliases.get(key, ()) if base + a in tensors), None)
                if source is None:
                    raise ChunkIntegrityError(f"tensor {base + key} is missing from its chunk")
                value = installed.get(source)
                if value is None:
                    value = tensors[base + source]
            if is_param and not isinstance(value, nn.Parameter):
                # the skeleton keeps from_pretrained's flag: torch.matmul decomposes
                # differently on it alone, which changes decode-step rounding on CPU
                value = nn.Parameter(value, requires_grad=self.placeholders[key].requires_grad)
            installed[key] = value
            if is_param:
                sub._parameters[name] = value
            else:
                sub._buffers[name] = value

    def release(self) -> None:
        for key, (sub, name, is_param) in self.slots.items():
            if is_param:
                sub._parameters[name] = self.placeholders[key]
            else:
                sub._buffers[name] = self.placeholders[key]
