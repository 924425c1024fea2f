"""Mixture-of-experts modules as transformers builds them, found without per-architecture code.

transformers 5 keeps a block's experts in fused tensors ``[num_experts, ...]`` inside one
module whose class is wrapped by ``use_experts_implementation`` (every experts
implementation, eager, grouped_mm and batched_mm, goes through it). Its forward takes
``(hidden_states, routed expert indices, routing weights)`` and computes only the routed
experts' slices, so a block whose router has chosen needs only those slices' bytes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ..format.quantization import Quantization

# What use_experts_implementation sets on every instance of a class it wraps.
_MARKS = ("has_gate", "is_transposed", "_is_expert_parallel")


@dataclass(frozen=True)
class ExpertsModule:
    """One experts module: its name, expert count and the tensors indexed by expert."""

    name: str  # module path, e.g. "model.layers.3.mlp.experts"
    count: int
    tensors: list[str]  # full state-dict keys of its ``[count, ...]`` parameters
    index_arg: str  # the forward's parameter that carries the routed expert indices


def is_experts_module(module: nn.Module) -> bool:
    return isinstance(getattr(module, "num_experts", None), int) and all(
        hasattr(module, mark) for mark in _MARKS
    )


def _index_arg(module: nn.Module) -> str | None:
    """The name of the forward's second argument (after hidden_states), following the
    decorator's ``functools.wraps`` to the class's own signature."""
    params = list(inspect.signature(type(module).forward).parameters)
    return params[2] if len(params) >= 4 else None


def find_experts(model: nn.Module) -> list[ExpertsModule]:
    """Every experts module of ``model`` whose parameters are all indexed by expert (a
    module with any other parameter is not one whose bytes split by expert)."""
    found = []
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        count = module.num_experts
        params = list(module.named_parameters(recurse=False))
        index_arg = _index_arg(module)
        if not params or index_arg is None or count < 2:
            continue
        if any(p.dim() < 1 or p.shape[0] != count for _, p in params):
            continue
        found.append(ExpertsModule(name, count, [f"{name}.{k}" for k, _ in params], index_arg))
    return found


def routed(args: tuple[Any, ...], kwargs: dict[str, Any], module: ExpertsModule) -> list[int]:
    """The experts a call of the module routes to, from its arguments (indices at or above
    the count are expert-parallel sentinels, which compute nothing)."""
    index = kwargs.get(module.index_arg)
    if index is None and len(args) >= 2:
        index = args[1]
    if not isinstance(index, torch.Tensor):
        raise TypeError(
            f"{module.name} was called without its routed expert indices "
            f"({module.index_arg}); cannot tell which experts it needs"
        )
    return chosen(index, module.count)


def chosen(index: torch.Tensor, count: int) -> list[int]:
    """The experts ``index`` (routed expert indices, any shape) names, sorted, without the
    expert-parallel sentinels (``count`` and above)."""
    # a Python set: torch.unique costs more than the handful of indices a decode step has
    return sorted(e for e in set(index.reshape(-1).tolist()) if 0 <= e < count)


def with_scales(
    module: ExpertsModule, quantized: Collection[str], quant: Quantization
) -> ExpertsModule:
    """``module`` with the scales of its ``quantized`` tensors among its tensors (each
    ``[count, ...]`` too): how a store lists an experts group, so an expert read alone
    brings its scales."""
    scales = [quant.scale_key(k) for k in module.tensors if k in quantized]
    return dataclasses.replace(module, tensors=module.tensors + scales)
