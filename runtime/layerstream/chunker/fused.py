"""fp8 weights that transformers fuses at load, kept fp8: the experts of a mixture-of-experts
checkpoint, one ``[I, H]`` weight and its scales per expert, become the model's ``[E, 2I, H]``
parameter and ``[E, 2I/128, H/128]`` scales.

transformers' own loader does the fusing, with the model's own converters: the fp8 values
load exactly into the skeleton's parameter (every e4m3 value is a bfloat16, float16 and
float32 value), and each converter gets a copy for the scales, which load into a parameter
registered beside the weight for the time of the block (as transformers does for a module
that keeps its scales, quantizers/base.py ``update_weight_conversions``). Only stacking and
concatenating converters are taken: they move whole blocks of the weight and their scales
alike, so dequantizing the fused tensor is dequantizing each expert's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..engine.skeleton import get_tensor
from ..format.quantization import FP8_DTYPE, SCALE_SUFFIX, Quantization
from .sinks import ChunkerError

# transformers' ops that only stack and concatenate (core_model_loading.py)
FUSING_OPS = ("MergeModulelist", "Concatenate")


def fuses_alike(converter: Any) -> bool:
    """Whether ``converter`` builds a parameter from ``.weight`` tensors by stacking and
    concatenating only, so that their scales can be fused the same way."""
    return all(type(op).__name__ in FUSING_OPS for op in converter.operations) and all(
        source.endswith(".weight") for source in converter._original_source_patterns
    )


def scale_converters(mapping: list) -> list:
    """A copy of each fusing converter of ``mapping`` for the scales of its weights."""
    from transformers.core_model_loading import WeightConverter

    return [
        c.copy(
            [s + SCALE_SUFFIX for s in c._original_source_patterns],
            [t + SCALE_SUFFIX for t in c._original_target_patterns],
            operations=list(c.operations),
        )
        for c in mapping
        if isinstance(c, WeightConverter) and fuses_alike(c)
    ]


@contextlib.contextmanager
def scale_parameters(
    model: nn.Module, keys: list[str], meta: dict[str, torch.Tensor], quant: Quantization
) -> Iterator[None]:
    """A float32 parameter on the meta device beside each of ``keys`` for its scales, for
    the loader to fill; gone afterwards."""
    added = []
    try:
        for key in keys:
            owner, _, name = quant.scale_key(key).rpartition(".")
            module = model.get_submodule(owner)
            shape = quant.scale_shape(tuple(meta[key].shape))
            placeholder = torch.empty(shape, dtype=torch.float32, device="meta")
            module.register_parameter(name, nn.Parameter(placeholder, requires_grad=False))
            added.append((module, name))
        yield
    finally:
        for module, name in added:
            del module._parameters[name]


def stored(
    model: nn.Module, tensors: dict[str, torch.Tensor], keys: list[str], quant: Quantization
) -> dict[str, torch.Tensor]:
    """``tensors`` (a block's, as loaded) with each of ``keys`` back in fp8 and its scales
    beside it, checked: a value the load changed is an error, never stored."""
    out = dict(tensors)
    for key in keys:
        value = tensors[key]
        weight = value.to(FP8_DTYPE)
        scales = get_tensor(model, quant.scale_key(key)).detach()
        if scales.device.type == "meta" or not torch.equal(weight.to(value.dtype), value):
            raise ChunkerError(
                f"{key}: its fp8 values or its scales did not load unchanged (scales that are "
                "not one per block of the weight_block_size grid do not); dequantize the "
                "checkpoint first (from_pretrained on a CPU dequantizes it; save_pretrained) "
                "and chunk that"
            )
        scale = scales.to(quant.scale_torch_dtype)
        if not torch.equal(scale.to(scales.dtype), scales):
            raise ChunkerError(f"{key}: its scales do not fit {quant.scale_torch_dtype}")
        out[key] = weight
        out[quant.scale_key(key)] = scale.contiguous()
    return out
