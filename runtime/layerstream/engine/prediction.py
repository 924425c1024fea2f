"""Which experts the next streamed block will route to, guessed before it runs.

A mixture-of-experts block's router is a small module beside its experts module (``gate``,
``router``: a ``[num_experts, hidden]`` weight, maybe a bias) whose output carries the routed
expert indices that the experts module receives. The residual stream changes little from one
block to the next, so block k's router applied to the hidden state entering block j's
experts (j the block before k) mostly picks what block k's router will pick when it runs.
That guess lets block k's experts be read while block j still computes.

A guess only decides which bytes are read early: block k's experts module still asks for
exactly the experts its router chose, and any that were not read ahead are read then. A
wrong guess costs bytes, never correctness.

Router weights come from each block's first install (copied out of its lease: a few KiB
per block); until a block has run once there is no guess for it.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .experts import ExpertsModule, chosen

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Router:
    """The router of one experts module."""

    name: str  # module path, e.g. "model.layers.3.mlp.gate"
    experts: ExpertsModule
    tensors: list[str]  # full state-dict keys of its parameters and persistent buffers


def find_router(model: nn.Module, experts: ExpertsModule) -> Router | None:
    """The one child of the experts module's parent (other than the experts module) whose own
    parameters include a ``[num_experts, hidden]`` matrix; None when there is not exactly one
    (such a model streams its routed experts without guesses)."""
    parent_name, _, own = experts.name.rpartition(".")
    parent = model.get_submodule(parent_name)
    found = []
    for child_name, child in parent.named_children():
        if child_name == own:
            continue
        params = list(child.named_parameters(recurse=False))
        if any(p.dim() == 2 and p.shape[0] == experts.count for _, p in params):
            found.append(child_name)
    if len(found) != 1:
        return None
    name = f"{parent_name}.{found[0]}"
    keys = parent.get_submodule(found[0]).state_dict(keep_vars=True)
    return Router(name, experts, [f"{name}.{key}" for key in keys])


class ExpertPredictor:
    """Guesses each streamed block's routed experts from the previous block's hidden state.

    ``groups``: by streamed block index, its experts modules in the order of its chunk's
    expert groups; ``prefixes``: every block's module path."""

    def __init__(
        self, model: nn.Module, prefixes: list[str], groups: dict[int, list[ExpertsModule]]
    ):
        self._model = model
        self._routers = {j: [find_router(model, m) for m in ms] for j, ms in groups.items()}
        # by block, its groups by their experts module's path inside the block ("mlp.experts")
        self._places = {
            j: {m.name.removeprefix(prefixes[j] + "."): g for g, m in enumerate(ms)}
            for j, ms in groups.items()
        }
        self._copies: dict[int, list[nn.Module | None]] = {}
        self._broken: set[str] = set()  # routers whose output holds no expert indices
        self._lock = threading.Lock()

    @property
    def routers(self) -> int:
        """How many experts modules have a router to guess with."""
        return sum(r is not None for rs in self._routers.values() for r in rs)

    def predicts(self, j: int) -> bool:
        return any(r is not None for r in self._routers.get(j, ()))

    def learn(self, j: int, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a copy of block j's routers from its installed tensors (the first time)."""
        if j in self._copies or not self.predicts(j):
            return
        copies = [None if r is None else self._copy(r, tensors) for r in self._routers[j]]
        with self._lock:
            self._copies.setdefault(j, copies)

    def _copy(self, router: Router, tensors: dict[str, torch.Tensor]) -> nn.Module:
        module = copy.deepcopy(self._model.get_submodule(router.name))
        prefix = router.name + "."
        for key in router.tensors:
            owner, _, attr = key.removeprefix(prefix).rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            value = tensors[key].detach().clone()  # the lease's buffer is reused
            if attr in sub._parameters:
                sub._parameters[attr] = nn.Parameter(value, requires_grad=False)
            else:
                sub._buffers[attr] = value
        return module.eval()

    def predict(
        self, j: int, group: int, k: int, hidden: torch.Tensor
    ) -> tuple[int, list[int]] | None:
        """Block k's guessed experts, as (its expert group, expert indices), for the experts
        module of block j's group ``group`` whose input is ``hidden``: the group of block k
        at the same place in its block. None without a guess."""
        copies, routers = self._copies.get(k), self._routers.get(k)
        places_j = self._places.get(j)
        if copies is None or routers is None or places_j is None:
            return None
        place = next((p for p, g in places_j.items() if g == group), None)
        target = self._places[k].get(place) if place is not None else None
        if target is None:
            return None
        module, router = copies[target], routers[target]
        if module is None or router is None or router.name in self._broken:
            return None
        with torch.inference_mode():
            output = module(hidden.reshape(-1, hidden.shape[-1]))
        index = _indices(output)
        if index is None:
            self._broken.add(router.name)
            log.info(
                "%s returns no expert indices: its block's experts are read when it routes",
                router.name,
            )
            return None
        return target, chosen(index, router.experts.count)


def _indices(output: object) -> torch.Tensor | None:
    """The integer tensor among a router's outputs (the routed expert indices)."""
    values = output if isinstance(output, tuple) else (output,)
    found = [
        v
        for v in values
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool
    ]
    return found[-1] if found else None
