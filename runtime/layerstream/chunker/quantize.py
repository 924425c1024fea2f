"""Write a block-wise FP8 checkpoint of a plain one (``layerstream chunk --quantize fp8``).

The layout is the one DeepSeek-V3 and the Qwen3 ``-FP8`` releases ship: the weight of every
linear module inside the transformer blocks whose shape ``weight_block_size`` tiles becomes
``float8_e4m3fn`` with one ``weight_scale_inv`` (float32) per block, and ``config.json``
gains ``quantization_config`` (quant_method "fp8"). Embeddings, norms, the output head,
the routers of mixture-of-experts blocks and weights the blocks do not tile stay as they
are. Each weight is quantized by transformers' own quantizer (``Fp8Quantize``, the one
``save_pretrained`` of an FP8 model runs), one tensor at a time.

The checkpoint is what a quantized store is exact to: ``from_pretrained`` of it on a CPU
dequantizes it to the same weights the engine computes with. It is not the original model:
quantizing changes the weights (``compare`` measures by how much).
"""

from __future__ import annotations

import json
import logging
import shutil
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from ..engine.experts import find_experts
from ..engine.prediction import find_router
from ..engine.skeleton import TORCH_DTYPES, block_prefixes, build_skeleton, model_class
from ..engine.sysinfo import available_memory
from ..format.quantization import FP8
from .sinks import ChunkerError
from .source import SIDE_FILES, Checkpoint

log = logging.getLogger(__name__)

BLOCK = (128, 128)  # the releases' weight_block_size
SHARD_BYTES = 1 << 30  # tensors per output file, held in memory while it is written
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In 1905, Albert Einstein published",
)


class Quantizable:
    """Which checkpoint tensors an fp8 release holds quantized: the weights of the linear
    modules inside the blocks, routers excluded, and each expert's weights (a checkpoint
    keeps them apart; transformers fuses them at load)."""

    def __init__(self, config: transformers.PretrainedConfig):
        from .convert import Conversion

        model = build_skeleton(config, config.architectures[0], "bfloat16", buffers=False)
        prefixes = tuple(p + "." for p in block_prefixes(model))
        routers, experts = set(), set()
        for module in find_experts(model):
            experts.update(module.tensors)
            router = find_router(model, module)
            if router is not None:
                routers.add(router.name)
        self.meta = model.state_dict(keep_vars=True)
        self.linear = {
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and name.startswith(prefixes)
            and name not in routers
        }
        self.experts = experts
        self._conversion = Conversion(model)

    def __call__(self, key: str) -> bool:
        if key in self.meta:
            return key in self.linear
        renamed, _ = self._conversion.rename(key, self.meta)
        if renamed not in self.meta:
            raise ChunkerError(
                f"tensor {key} is not one the model built from its config loads; --quantize "
                "reads checkpoints transformers loads without missing or unexpected weights"
            )
        return renamed in self.experts and key.endswith(".weight")


def write_fp8_checkpoint(source: Path, dest: Path, block: tuple[int, int] = BLOCK) -> Path:
    """``source`` (a safetensors checkpoint in the model's own keys) quantized to block-wise
    fp8 in ``dest``, with its side files; returns ``dest``."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = AutoConfig.from_pretrained(source)
    if getattr(config, "quantization_config", None) is not None:
        raise ChunkerError(
            f"{source} is quantized already; --quantize takes a plain checkpoint (chunk this "
            "one without --quantize: an fp8 one is kept fp8, another format is told what to do)"
        )
    wanted = Quantizable(config)
    qconfig = FineGrainedFP8Config(weight_block_size=list(block))
    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=qconfig))
    dest.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint.open(source)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    held, count, quantized = 0, 0, 0

    def flush() -> None:
        nonlocal shard, held, count
        if shard:
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(dest / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, held, count = {}, 0, count + 1

    considered = 0
    for key, tensor in _tensors(checkpoint):
        out = {key: tensor}
        if wanted(key) and tensor.is_floating_point():
            considered += 1
            out = quantizer._quantize_one(key, tensor)
            quantized += len(out) > 1  # an untileable weight comes back alone, as it was
        for k, v in out.items():
            shard[k] = v.contiguous()
            held += v.numel() * v.element_size()
        if held >= SHARD_BYTES:
            flush()
    flush()
    if not quantized:
        raise ChunkerError(
            f"{source}: no weight is tiled by weight_block_size {list(block)}; nothing to quantize"
        )
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    data = json.loads((source / "config.json").read_text())
    data["quantization_config"] = {
        "quant_method": FP8,
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": None,
    }
    (dest / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    for name in SIDE_FILES:
        if name != "config.json" and (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
    log.info("quantized %d of %d linear weights to fp8 into %s", quantized, considered, dest)
    return dest


def _tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint.files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)


@dataclass(frozen=True)
class Difference:
    """How far a quantized model's outputs are from the original's on ``PROMPTS``."""

    prompts: int
    positions: int
    max_logit_diff: float
    top1_agreement: float  # positions whose highest logit is the same token in both


def compare(original: Path, quantized: Path) -> Difference | None:
    """Both checkpoints' outputs (logits, or last hidden states) on ``PROMPTS``, loaded by
    from_pretrained; None, with the reason logged, when both do not fit in memory at once."""
    size = sum(f.stat().st_size for f in Checkpoint.open(original).files)
    if 3 * size > available_memory():  # the original, the fp8 model dequantized, slack
        log.warning(
            "not comparing the fp8 model with the original: both in memory need ~%.1f GiB; "
            "load both with from_pretrained where they fit to compare them",
            3 * size / 2**30,
        )
        return None
    config = AutoConfig.from_pretrained(original)
    dtype = getattr(config, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else TORCH_DTYPES.get(str(dtype), torch.float32)
    cls = model_class(config.architectures[0])
    outputs = []
    for path in (original, quantized):
        model = cls.from_pretrained(path, dtype=dtype).eval()
        with torch.inference_mode():
            outputs.append([_outputs(model, ids) for ids in _prompt_ids(original, config)])
        del model
    diff, same, positions = 0.0, 0, 0
    for a, b in zip(*outputs, strict=True):
        diff = max(diff, (a.float() - b.float()).abs().max().item())
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += a.shape[0]
    return Difference(len(PROMPTS), positions, diff, same / positions)


def _prompt_ids(source: Path, config: transformers.PretrainedConfig) -> list[torch.Tensor]:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):  # no tokenizer beside the weights: ids across the vocabulary
        step = max(config.vocab_size // 17, 1)
        return [torch.arange(1 + i, 1 + i + 16 * step, step)[None] for i in range(len(PROMPTS))]
    return [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]


def _outputs(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    out = model(ids, **kwargs)
    found = getattr(out, "logits", None)
    return (found if found is not None else out.last_hidden_state)[0]


def write_random_mxfp4_checkpoint(source: Path | str, dest: Path | str, seed: int = 0) -> Path:
    """A random-init MXFP4 checkpoint as gpt-oss ships one, from a plain random-init one:
    every tensor transformers' mxfp4 loader takes (the experts' ``gate_up_proj`` and
    ``down_proj``) replaced by random 4-bit values and scales of 2^-9 .. 2^-5 (weights of
    the order of a random init's), the rest as it was. For tests and benchmarks: there is
    no MXFP4 quantizer on a CPU (transformers' needs triton kernels)."""
    from ..format.quantization import MXFP4_GROUP, Mxfp4

    fmt = Mxfp4()
    source, dest = Path(source), Path(dest)
    config = json.loads((source / "config.json").read_text())
    checkpoint = Checkpoint.open(source)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in _tensors(checkpoint):
        if value.ndim == 3 and fmt.takes(key) and fmt.tileable(tuple(value.shape)):
            shape = tuple(value.shape)
            blocks = fmt.checkpoint_shape(shape)
            tensors[key + fmt.weight_suffix] = torch.randint(
                0, 256, blocks, dtype=torch.uint8, generator=generator
            )
            scales = torch.randint(118, 123, fmt.checkpoint_scale_shape(shape), generator=generator)
            tensors[fmt.scale_key(key)] = scales.to(torch.uint8)
        else:
            tensors[key] = value
    if not any(k.endswith(fmt.scale_suffix) for k in tensors):
        raise ChunkerError(f"{source}: no experts tensor of {MXFP4_GROUP}-divisible rows")
    dest.mkdir(parents=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }  # fmt: skip
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in SIDE_FILES:
        if (source / name).exists() and name != "config.json":
            shutil.copy(source / name, dest / name)
    return dest
