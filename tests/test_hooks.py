"""A streamed block's tensors bound into its module (engine/hooks.py): a lease whose tensors
outlive it stays bound between installs, and a bind that fails leaves nothing taken for
bound."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from layerstream.engine.hooks import BlockBinding, StreamedBlockHook
from layerstream.errors import ChunkIntegrityError


def _block() -> nn.Module:
    with torch.device("meta"):  # as the skeleton holds it: placeholders until bound
        return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _lease(value: float, kept: bool, missing: str | None = None) -> SimpleNamespace:
    shapes = {"0.weight": (3, 4), "0.bias": (3,), "1.weight": (2, 3), "1.bias": (2,)}
    tensors = {f"block.{k}": torch.full(s, value) for k, s in shapes.items() if k != missing}
    return SimpleNamespace(tensors=tensors, kept=kept)


def _sum(tensor: torch.Tensor) -> float:
    return float(tensor.detach().sum())


def _hook(module: nn.Module) -> StreamedBlockHook:
    group = SimpleNamespace(streamer=SimpleNamespace(predictor=None))
    return StreamedBlockHook(0, BlockBinding("block", module), group)


def test_a_kept_lease_stays_bound_and_another_replaces_it():
    module = _block()
    hook = _hook(module)
    kept = _lease(1.0, kept=True)
    hook.install(kept)
    hook.uninstall(kept)
    assert _sum(module[0].weight) == 12.0  # still bound after its install
    other = _lease(2.0, kept=False)
    hook.install(other)
    assert _sum(module[0].weight) == 24.0
    hook.uninstall(other)
    assert module[0].weight.is_meta  # a lease that is not kept leaves no tensor behind
    hook.install(kept)
    assert _sum(module[1].bias) == 2.0


def test_after_a_bind_that_failed_a_kept_lease_is_bound_again():
    """A lease missing a tensor fails its bind part-way, with some of its tensors swapped
    in: the kept lease installed next must bind its own again, not take them for bound."""
    module = _block()
    hook = _hook(module)
    kept = _lease(1.0, kept=True)
    hook.install(kept)
    hook.uninstall(kept)
    with pytest.raises(ChunkIntegrityError, match="missing from its chunk"):
        hook.install(_lease(5.0, kept=False, missing="1.bias"))
    hook.install(kept)
    assert [_sum(p) for p in module.parameters()] == [12.0, 3.0, 6.0, 2.0]
