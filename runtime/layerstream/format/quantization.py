"""Quantized checkpoints: the formats a store keeps quantized, and how their tensors become
the weights a model computes with.

Block-wise FP8 (``quant_method: "fp8"``, the DeepSeek-V3 and Qwen3 ``-FP8`` layout): a
weight is stored as ``float8_e4m3fn`` beside ``<key>_scale_inv``, one scale per block of
``weight_block_size``. On a CPU transformers dequantizes such a checkpoint at load (its FP8
kernels need a GPU): each weight becomes ``weight × scale`` computed in float32, cast to the
parameter's dtype. A store keeps the quantized bytes and their scales, so a token reads the
quantized bytes, and the engine dequantizes a block when it installs it, with transformers'
own routine, so the weights it computes with are bit-identical to from_pretrained's.

Every other ``quantization_config`` is refused, by the chunker and by the engine: read as
plain weights it would be served silently wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

FP8 = "fp8"
FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # transformers' name: `x.weight` -> `x.weight_scale_inv`
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# what a user can do with a checkpoint in a format layerstream does not serve
_DEQUANTIZE_FIRST = (
    "layerstream serves block-wise fp8 checkpoints (quant_method 'fp8', float scales) as they "
    "are; for another format, dequantize it where transformers can run it "
    "(`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16, "
    "quantization_config=...(dequantize=True)).save_pretrained(out)`) and chunk `out`"
)


class UnsupportedQuantization(ValueError):
    """A checkpoint quantized in a format or layout layerstream cannot serve exactly."""


def scale_key(key: str) -> str:
    """The key of ``key``'s scales (transformers' naming, for `.weight` and fused tensors)."""
    return key + SCALE_SUFFIX


@dataclass(frozen=True)
class Quantization:
    """How a store's quantized tensors are stored: the manifest's ``quantization``."""

    method: str
    weight_block_size: tuple[int, int]
    scale_dtype: str  # one of SCALE_DTYPES

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale grid of a weight of ``shape`` (leading dimensions, e.g. experts, kept)."""
        rows, cols = self.weight_block_size
        return (*shape[:-2], shape[-2] // rows, shape[-1] // cols)

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a quantized weight of ``shape`` and of its scales."""
        scales = math.prod(self.scale_shape(shape)) * self.scale_torch_dtype.itemsize
        return math.prod(shape) * FP8_DTYPE.itemsize + scales

    def tileable(self, shape: tuple[int, ...]) -> bool:
        rows, cols = self.weight_block_size
        return len(shape) >= 2 and shape[-2] % rows == 0 and shape[-1] % cols == 0

    def describe(self) -> str:
        """E.g. ``fp8 (128x128 blocks, float32 scales)``: model metadata's stored_format."""
        rows, cols = self.weight_block_size
        return f"{self.method} ({rows}x{cols} blocks, {self.scale_dtype} scales)"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "weight_block_size": list(self.weight_block_size),
            "scale_dtype": self.scale_dtype,
        }


def of_config(config: Any) -> dict[str, Any] | None:
    """A config's ``quantization_config`` as a dict, or None for an unquantized model."""
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else vars(raw)
    return dict(raw)


def supported(raw: dict[str, Any], scale_dtype: torch.dtype, where: str) -> Quantization:
    """The store layout of a checkpoint's ``quantization_config``, if layerstream serves it
    exactly; UnsupportedQuantization saying why and what to do otherwise."""
    method = raw.get("quant_method")
    if method != FP8:
        raise UnsupportedQuantization(
            f"{where} is quantized with quant_method {method!r}; {_DEQUANTIZE_FIRST}"
        )
    block = raw.get("weight_block_size")
    if not (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise UnsupportedQuantization(
            f"{where}: fp8 with weight_block_size {block!r} (per-tensor or per-channel "
            f"scales) is not served yet; {_DEQUANTIZE_FIRST}"
        )
    details = {
        "activation_scheme": (raw.get("activation_scheme", "dynamic"), "dynamic"),
        "scale_fmt": (raw.get("scale_fmt", "float"), "float"),
        "expert_dtype": (raw.get("expert_dtype", "fp8"), "fp8"),
    }
    for name, (value, served) in details.items():
        if value != served:
            raise UnsupportedQuantization(
                f"{where}: fp8 with {name} {value!r} is not served yet (only {served!r}); "
                f"{_DEQUANTIZE_FIRST}"
            )
    names = {v: k for k, v in SCALE_DTYPES.items()}
    if scale_dtype not in names:
        raise UnsupportedQuantization(
            f"{where}: fp8 scales in {scale_dtype} are not served (float32, bfloat16 or "
            f"float16 only); {_DEQUANTIZE_FIRST}"
        )
    return Quantization(FP8, (block[0], block[1]), names[scale_dtype])


def dequantize(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` (fp8) times its block ``scales``, in ``dtype``: transformers' own routine,
    the one from_pretrained runs on a CPU, so the result is bit-identical to its weights."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scales, output_dtype=dtype)
