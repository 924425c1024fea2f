"""Quantized checkpoints: the formats a store keeps quantized, and how their tensors become
the weights a model computes with.

Block-wise FP8 (``quant_method: "fp8"``, the DeepSeek-V3 and Qwen3 ``-FP8`` layout): a
weight is stored as ``float8_e4m3fn`` beside ``<key>_scale_inv``, one scale per block of
``weight_block_size``. On a CPU transformers dequantizes such a checkpoint at load (its FP8
kernels need a GPU): each weight becomes ``weight × scale`` computed in float32, cast to the
parameter's dtype. A store keeps the quantized bytes and their scales, so a token reads the
quantized bytes, and the engine dequantizes a block once it is read: with a faster route to
the same exact product (``dequantize``), checked bit-identical to transformers' routine,
which stays the fallback, so the weights it computes with are from_pretrained's.

MXFP4 (``quant_method: "mxfp4"``, gpt-oss): experts stored as 4-bit values with a power
of two per 32 (``Mxfp4``). On a CPU without triton kernels, transformers dequantizes them at
load with its own routine; the engine computes the same values from a table of that
routine's results, on each block (or each expert) read.

Every other ``quantization_config`` is refused, by the chunker and by the engine: read as
plain weights it would be served silently wrong.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

FP8 = "fp8"
MXFP4 = "mxfp4"
MXFP4_GROUP = 32  # values per scale
MXFP4_LAYOUT = "transposed"  # the manifest's name for Mxfp4's stored order
FP8_DTYPE = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # transformers' name: `x.weight` -> `x.weight_scale_inv`
SCALE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# where each dequantized tensor starts: a fresh torch allocation's alignment, as
# from_pretrained's dequantized weights are (CPU kernels round by the address mod 64)
DEQUANTIZED_ALIGNMENT = 64


def aligned(size: int) -> int:
    """``size`` rounded up to the next DEQUANTIZED_ALIGNMENT boundary."""
    return size + (-size % DEQUANTIZED_ALIGNMENT)


# what a user can do with a checkpoint in a format layerstream does not serve: the formats
# whose transformers config can dequantize at load, and bitsandbytes, which can after it
_DEQUANTIZING_CONFIGS = {
    "fp8": "FineGrainedFP8Config",
    "compressed-tensors": "CompressedTensorsConfig",
}


def what_to_do(method: object) -> str:
    """How to turn a checkpoint quantized with ``method`` into one layerstream serves."""
    served = (
        "layerstream serves block-wise fp8 checkpoints (quant_method 'fp8', float scales) "
        "and mxfp4 experts as gpt-oss ships them"
    )
    config = _DEQUANTIZING_CONFIGS.get(str(method))
    if config is not None:
        return (
            f"{served}; dequantize this one where transformers runs it "
            f"(`AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16, "
            f"quantization_config={config}(dequantize=True)).save_pretrained(out)`) and "
            "chunk `out`"
        )
    if method == "bitsandbytes":
        return (
            f"{served}; dequantize this one where bitsandbytes runs "
            "(`from_pretrained(dir).dequantize().save_pretrained(out)`) and chunk `out`"
        )
    return f"{served}; chunk the unquantized checkpoint this one was made from"


class UnsupportedQuantization(ValueError):
    """A checkpoint quantized in a format or layout layerstream cannot serve exactly."""


class Quantization(ABC):
    """How a store's quantized tensors are stored (the manifest's ``quantization``) and how
    each becomes the weight a model computes with. A quantized tensor is stored under the
    model's key, its scales under ``scale_key(key)``."""

    method: ClassVar[str]
    # the checkpoint's names: `<key><weight_suffix>` holds the quantized values
    weight_suffix: ClassVar[str] = ""
    scale_suffix: ClassVar[str]

    def scale_key(self, key: str) -> str:
        """The key of ``key``'s scales (transformers' naming)."""
        return key + self.scale_suffix

    @property
    @abstractmethod
    def stored_dtype(self) -> torch.dtype:
        """The dtype the quantized values are stored in."""

    @property
    @abstractmethod
    def scale_torch_dtype(self) -> torch.dtype: ...

    @abstractmethod
    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The stored values' shape for a model tensor of ``shape``."""

    @abstractmethod
    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scales' shape for a model tensor of ``shape``."""

    def stored_order(self, ndim: int) -> tuple[int, ...] | None:
        """How a checkpoint's quantized tensor (values or scales) of ``ndim`` dimensions is
        permuted into the store's (None: stored as the checkpoint holds it). The first
        dimension stays first, so each of its slices is a byte range in both layouts."""
        return None

    def checkpoint_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint's quantized values' shape for a model tensor of ``shape``."""
        return self._unpermuted(self.stored_shape(shape))

    def checkpoint_scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The checkpoint's scales' shape for a model tensor of ``shape``."""
        return self._unpermuted(self.scale_shape(shape))

    def _unpermuted(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        order = self.stored_order(len(stored))
        if order is None:
            return stored
        shape = [0] * len(stored)
        for axis, size in zip(order, stored, strict=True):
            shape[axis] = size
        return tuple(shape)

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes a model tensor of ``shape`` takes stored: its values and its scales."""
        return (
            math.prod(self.stored_shape(shape)) * self.stored_dtype.itemsize
            + math.prod(self.scale_shape(shape)) * self.scale_torch_dtype.itemsize
        )

    @abstractmethod
    def tileable(self, shape: tuple[int, ...]) -> bool:
        """Whether a model tensor of ``shape`` can be stored in this format."""

    @abstractmethod
    def takes(self, key: str) -> bool:
        """Whether transformers loads a tensor of the format into the model's ``key``."""

    @abstractmethod
    def dequantize(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weight in ``dtype`` (into ``out`` if given), bit-identical to what
        from_pretrained computes from it on a CPU."""

    @abstractmethod
    def describe(self) -> str:
        """Model metadata's stored_format."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Fp8Blocks(Quantization):
    """Block-wise fp8: ``float8_e4m3fn`` values, one scale per ``weight_block_size`` block."""

    weight_block_size: tuple[int, int]
    scale_dtype: str  # one of SCALE_DTYPES

    method: ClassVar[str] = FP8
    scale_suffix: ClassVar[str] = SCALE_SUFFIX

    @property
    def stored_dtype(self) -> torch.dtype:
        return FP8_DTYPE

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale grid (leading dimensions, e.g. experts, kept)."""
        rows, cols = self.weight_block_size
        return (*shape[:-2], shape[-2] // rows, shape[-1] // cols)

    def tileable(self, shape: tuple[int, ...]) -> bool:
        rows, cols = self.weight_block_size
        return len(shape) >= 2 and shape[-2] % rows == 0 and shape[-1] % cols == 0

    def takes(self, key: str) -> bool:
        return key.endswith(".weight")  # a linear module's, which its fp8 layer replaces

    def dequantize(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return dequantize(weight, scales, dtype, out)

    def describe(self) -> str:
        """E.g. ``fp8 (128x128 blocks, float32 scales)``."""
        rows, cols = self.weight_block_size
        return f"{self.method} ({rows}x{cols} blocks, {self.scale_dtype} scales)"

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "weight_block_size": list(self.weight_block_size),
            "scale_dtype": self.scale_dtype,
        }


@dataclass(frozen=True)
class Mxfp4(Quantization):
    """MXFP4 as gpt-oss ships its experts: a ``[E, A, B]`` parameter is stored as
    ``<key>_blocks`` ``[E, B, A/32, 16]`` uint8 (two fp4 e2m1 values a byte, low nibble
    first) and ``<key>_scales`` ``[E, B, A/32]`` uint8 (a power of two, biased by 127), one
    scale per 32 values. transformers dequantizes it on a CPU (no triton kernels there) with
    ``convert_moe_packed_tensors``: each value from a table, times its power of two, then
    the last two dimensions transposed. Every step is elementwise or a per-expert transpose,
    so an expert's slice dequantized alone equals its slice of the whole; here each value
    comes from a table of that routine's own results, by nibble and scale.

    A store keeps the blocks ``[E, A/32, 16, B]`` and scales ``[E, A/32, B]``: the
    checkpoint's bytes, each expert's transposed the way the routine transposes its values
    (``stored_order``). A value is then looked up straight into its place with contiguous
    passes only; transposing at every read cost more than the lookups (docs/quantization.md)."""

    method: ClassVar[str] = MXFP4
    weight_suffix: ClassVar[str] = "_blocks"
    scale_suffix: ClassVar[str] = "_scales"

    @property
    def stored_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return torch.uint8

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, a, b = shape
        return (*lead, a // MXFP4_GROUP, MXFP4_GROUP // 2, b)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, a, b = shape
        return (*lead, a // MXFP4_GROUP, b)

    def stored_order(self, ndim: int) -> tuple[int, ...] | None:
        return (0, *range(2, ndim), 1)  # the checkpoint's [E, B, ...] -> [E, ..., B]

    def tileable(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 3 and shape[-2] % MXFP4_GROUP == 0

    def takes(self, key: str) -> bool:
        # what transformers' mxfp4 quantizer deserializes (Mxfp4HfQuantizer.serialized_names)
        return key.rpartition(".")[2] in ("gate_up_proj", "down_proj")

    def dequantize(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        dtype: torch.dtype,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is None:
            with torch.inference_mode(False):  # weights like from_pretrained's, in any mode
                out = torch.empty(self.dequantized_shape(tuple(weight.shape)), dtype=dtype)
        # a piece of an expert's rows at a time keeps the working memory to a few MiB
        # (transformers' routine on a whole tensor holds ~4 temporaries of its size)
        _, groups, half, b = weight.shape
        rows = groups * half  # of bytes, two values each
        step = max(PIECE // (2 * b * half), 1) * half  # whole groups
        for e in range(weight.shape[0]):
            values = weight[e].reshape(rows, b)
            target = out[e].view(rows, 2, b)
            for r in range(0, rows, step):
                n = min(step, rows - r)
                _mxfp4_piece(
                    values[r : r + n],
                    scales[e, r // half : (r + n) // half],
                    target[r : r + n],
                )
        return out

    def dequantized_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The model tensor's shape for stored values of shape ``stored``."""
        *lead, groups, half, b = stored
        return (*lead, groups * half * 2, b)

    def describe(self) -> str:
        return f"{self.method} (blocks of {MXFP4_GROUP}, e8m0 scales)"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "layout": MXFP4_LAYOUT}


def of_config(config: Any) -> dict[str, Any] | None:
    """A config's ``quantization_config`` as a dict, or None for an unquantized model."""
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else vars(raw)
    return dict(raw)


def supported(
    raw: dict[str, Any], scale_dtypes: Callable[[str], set[torch.dtype]], where: str
) -> Quantization:
    """The store layout of a checkpoint's ``quantization_config``, if layerstream serves it
    exactly (``scale_dtypes``: the dtypes of the checkpoint's tensors named with a suffix);
    UnsupportedQuantization saying why and what to do otherwise."""
    method = raw.get("quant_method")
    if method == MXFP4:
        found = scale_dtypes(Mxfp4.scale_suffix)
        if not found:
            raise UnsupportedQuantization(
                f"{where} says mxfp4, but the checkpoint holds no `{Mxfp4.scale_suffix}` "
                "tensors: none of its weights is 4-bit. If they are plain, remove "
                "quantization_config from config.json"
            )
        if found != {torch.uint8}:
            raise UnsupportedQuantization(
                f"{where}: mxfp4 with scales in {sorted(map(str, found))}, not uint8 (e8m0)"
            )
        return Mxfp4()
    if method != FP8:
        raise UnsupportedQuantization(
            f"{where} is quantized with quant_method {method!r}; {what_to_do(method)}"
        )
    block = raw.get("weight_block_size")
    if not (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise UnsupportedQuantization(
            f"{where}: fp8 with weight_block_size {block!r} (per-tensor or per-channel "
            f"scales) is not served yet; {what_to_do(FP8)}"
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
                f"{what_to_do(FP8)}"
            )
    found = scale_dtypes(SCALE_SUFFIX)
    if len(found) != 1:
        raise UnsupportedQuantization(
            f"{where}: its weights have scales in {len(found)} dtypes "
            f"({sorted(map(str, found))}), not one"
        )
    scale_dtype = found.pop()
    names = {v: k for k, v in SCALE_DTYPES.items()}
    if scale_dtype not in names:
        raise UnsupportedQuantization(
            f"{where}: fp8 scales in {scale_dtype} are not served (float32, bfloat16 or "
            f"float16 only); {what_to_do(FP8)}"
        )
    return Fp8Blocks((block[0], block[1]), names[scale_dtype])


def dequantize_reference(
    weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """transformers' own routine, the one from_pretrained runs on a CPU: what ``dequantize``
    must equal bit for bit."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scales, output_dtype=dtype)


# Rows are dequantized a piece at a time, so a piece's intermediates stay in the CPU's
# caches rather than going through memory at each of the passes transformers' routine makes
# over a whole tensor (docs/quantization.md). An fp8 piece takes 6 MiB of scratch: pieces
# smaller than the last-level cache's share ran slower, each pass's fixed cost repeating.
PIECE = 1 << 19
FP8_PIECE = 1 << 20
_scratch = threading.local()
# a tensor, made once: a Python number would be wrapped in a fresh tensor at every call
with torch.inference_mode(False):
    _SHIFT_7 = torch.tensor(128, dtype=torch.int16)


def _piece_buffers() -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's scratch: the float16 bits and their float32 values of one fp8 piece."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        with torch.inference_mode(False):  # normal tensors, usable in and out of that mode
            buffers = _scratch.buffers = (
                torch.empty(FP8_PIECE, dtype=torch.int16),
                torch.empty(FP8_PIECE, dtype=torch.float32),
            )
    return buffers


def dequantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``weight`` (fp8) times its block ``scales``, in ``dtype`` (into ``out`` if given):
    bit-identical to ``dequantize_reference``, several times faster.

    transformers computes ``float32(weight) × float32(scale)``, rounded once to float32, then
    to ``dtype``. Here the fp8 bits are moved into a float16's (sign to bit 15, exponent and
    mantissa to bits 13..7: the same number times 2^-8, exact for every finite e4m3 value,
    subnormals included) and multiplied by ``scale × 256`` (exact: a power of two) in
    float32: the same exact product, rounded the same way. The rare inputs this cannot hold
    (a NaN byte, a scale × 256 past float32, subnormals flushed to zero) take
    transformers' routine."""
    rows, cols = weight.shape[-2:]
    scale_rows, scale_cols = scales.shape[-2:]
    if rows % scale_rows or cols % scale_cols or weight.dtype != FP8_DTYPE:
        return _into(dequantize_reference(weight, scales, dtype), out)
    raw = weight.contiguous().view(torch.uint8)
    scaled = scales.to(torch.float32) * 256.0
    nan = int(raw.max()) == 0xFF or int(raw.view(torch.int8).max()) == 0x7F
    if nan or not bool(torch.isfinite(scaled).all()) or _flushes_subnormals():
        return _into(dequantize_reference(weight, scales, dtype), out)
    block_rows, block_cols = rows // scale_rows, cols // scale_cols
    signed = raw.view(torch.int8).reshape(-1, cols)
    scaled = scaled.reshape(-1, scale_cols)  # by block row (of every expert, in order)
    if out is None:
        with torch.inference_mode(False):  # weights like from_pretrained's, in any mode
            out = torch.empty(weight.shape, dtype=dtype)
    target = out.view(-1, cols)
    # A piece is whole block rows, or part of one: its scales are then a view, broadcast.
    # Nothing is allocated per piece: under the engine's fixed mmap threshold (allocator.py)
    # each temporary is a fresh mapping, faulted in and unmapped, 5x slower beside compute.
    step = max(FP8_PIECE // cols, 1)
    step -= step % block_rows if step >= block_rows else 0
    bits_buffer, values_buffer = _piece_buffers()
    if step * cols > FP8_PIECE:  # a row longer than a piece
        bits_buffer, values_buffer = torch.empty(cols, dtype=torch.int16), torch.empty(cols)
    r, total = 0, signed.shape[0]
    while r < total:
        n = min(step, total - r, block_rows - r % block_rows if step < block_rows else step)
        bits = bits_buffer[: n * cols].view(n, cols)
        bits.copy_(signed[r : r + n])  # sign-extended: bits 15 and 14 hold the sign
        # << 7 as a multiply (in range: -128 * 128 fits), which torch vectorizes and its
        # shift is not, on int16; then bit 14 cleared
        bits.mul_(_SHIFT_7).bitwise_and_(-(1 << 14) - 1)
        # Every pass on one dtype, in place: a multiply of mixed dtypes takes a scalar path
        # (10x slower on float16 subnormals) and, to an output of another dtype, a temporary
        k = min(n, block_rows)  # rows a scale covers in this piece
        shape = (n // k, k, scale_cols, block_cols)
        values = values_buffer[: n * cols].view(shape)
        values.copy_(bits.view(torch.float16).view(shape))
        first = r // block_rows
        scale = scaled[first : first + n // k].view(n // k, 1, scale_cols, 1)
        piece = target[r : r + n]
        if piece.dtype == torch.float32:
            torch.mul(values, scale, out=piece.view(shape))
        else:  # the float32 product, rounded once more to dtype as transformers' .to(dtype)
            piece.copy_(values.mul_(scale).view(n, cols))
        r += n
    return out


def _flushes_subnormals() -> bool:
    """Whether float16 subnormals read as zero here (torch.set_flush_denormal(True)): the
    bit move above makes fp8's subnormals float16 subnormals."""
    smallest = torch.tensor([1], dtype=torch.int16).view(torch.float16)
    return float(smallest.to(torch.float32)) == 0.0


def _into(value: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return value
    return out.copy_(value)


_MXFP4_TABLES: dict[torch.dtype, torch.Tensor] = {}
# A byte's two values sit in two rows of the dequantized tensor: its low nibble's in the
# first (table entries from 0), its high nibble's in the second (from _HIGH)
_HIGH = 256 * 256
_HALVES = torch.tensor([0, _HIGH], dtype=torch.int32).view(1, 2, 1)


def _mxfp4_table(dtype: torch.dtype) -> torch.Tensor:
    """Every value MXFP4 can hold, in ``dtype``, by ``half * _HIGH + scale * 256 + byte``:
    the byte's low (half 0) or high (half 1) nibble, computed by ``torch.ldexp`` of the fp4
    value in ``dtype`` by ``scale - 127``, the elementwise step of transformers'
    ``convert_moe_packed_tensors``, so each entry is the value that routine gives for that
    nibble and scale."""
    table = _MXFP4_TABLES.get(dtype)
    if table is None:
        from transformers.integrations.mxfp4 import FP4_VALUES

        with torch.inference_mode(False):
            values = torch.tensor(FP4_VALUES, dtype=dtype).repeat(256, 1)
            exponents = torch.arange(256, dtype=torch.int32)[:, None] - 127
            torch.ldexp(values, exponents, out=values)  # [scale, nibble]
            byte = torch.arange(256)
            halves = (values[:, byte & 0x0F], values[:, byte >> 4])  # [scale, byte] each
            table = torch.stack(halves).contiguous().view(-1)
        table = _MXFP4_TABLES.setdefault(dtype, table)
    return table


def _mxfp4_piece(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    """Stored ``blocks`` ``[R, B]`` (R rows of bytes, 16 per group) and their ``scales``
    ``[R/16, B]`` dequantized into ``out`` ``[R, 2, B]`` (contiguous): each value looked up
    by its half, scale and byte, already where transformers' routine puts it. Bit-identical
    to that routine for every byte and every scale, with contiguous passes only."""
    rows, b = blocks.shape
    groups = rows // (MXFP4_GROUP // 2)
    scratch = _int32_scratch(3 * rows * b + groups * b)  # nothing allocated per piece
    index = scratch[: rows * b].view(rows, b)
    index.copy_(blocks)
    offsets = scratch[3 * rows * b : 3 * rows * b + groups * b].view(groups, 1, b)
    offsets.copy_(scales.unsqueeze(1)).mul_(256)
    index.view(groups, MXFP4_GROUP // 2, b).add_(offsets)
    both = scratch[rows * b : 3 * rows * b].view(rows, 2, b)
    torch.add(index.unsqueeze(1), _HALVES, out=both)
    torch.index_select(_mxfp4_table(out.dtype), 0, both.view(-1), out=out.view(-1))


def _int32_scratch(n: int) -> torch.Tensor:
    """This thread's int32 scratch of at least ``n`` elements (a fresh allocation of this
    size each piece would fault in its pages every time)."""
    buffer = getattr(_scratch, "int32", None)
    if buffer is None or buffer.numel() < n:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of that mode
            # a piece: its index and its two values' indices (3/2 PIECE at most), its scales
            buffer = _scratch.int32 = torch.empty(max(n, 13 * PIECE // 8), dtype=torch.int32)
    return buffer
