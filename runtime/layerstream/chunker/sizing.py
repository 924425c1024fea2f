"""The memory a served model needs: what `layerstream size` prints, and Seldon's
``Model.spec.memory``.

The terms follow what the server holds, each bounded the way the runtime bounds it:

- the process baseline: Python with MLServer, torch, transformers and the runtime imported
  (``BASELINE_BYTES``, measured; docs/seldon.md, "Size it", says how);
- the weights held for good at the budget: the non-block weights and the pinned blocks
  (engine/plan.py);
- the streaming buffers: one per block in flight (the block computing plus the read-ahead),
  each the largest block's chunk; they are inside ``memory_budget`` too;
- the working set: activations, the skeleton's buffers, the tokenizer and allocator slack,
  a constant that does not grow with the model (``WORKING_SET_BYTES``, the bound
  tests/test_memory.py holds a server to);
- the KV cache budget: ``kv_cache_budget`` bytes, or for ``auto`` the runtime's formula
  without its cap (``max_active_sequences`` sequences of the full context); the cap, a
  quarter of the memory available at load, only ever makes the runtime hold less;
- the KV growth slack, as much again: transformers' caches grow a token at a time by
  concatenation, and the allocator keeps the outgrown copies; a server running 1, 4 or 8
  long sequences at once held 1.0-1.9x their live KV beyond the other terms (measured in
  docs/seldon.md, "Size it").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..format.manifest import Manifest
from ..units import format_size, parse_size

if TYPE_CHECKING:
    from collections.abc import Mapping

    from transformers import PretrainedConfig

    from ..engine.held import HeldSizes
    from ..format.safetensors import TensorSpec

MiB = 2**20

# Measured with Python 3.11, torch 2.13 (CPU), transformers 5.24, mlserver 1.7.1: a process
# that imports mlserver.server, torch, transformers and layerstream.serving.runtime holds
# 412 MiB; a started `mlserver start` with the demo model loaded, 456.0 MiB, 445.3 MiB without
# the weights it pins. Rounded up over both (docs/seldon.md, "Size it").
BASELINE_BYTES = 448 * MiB
# Activations, the skeleton's buffers, the tokenizer, allocator slack: what tests/test_memory.py
# allows a server beyond its weight budget and KV caches (short prompts; a long prefill's
# activations grow with the prompt and are not in it).
WORKING_SET_BYTES = 64 * MiB
AUTO = "auto"


@dataclass(frozen=True)
class Sizing:
    """Each term of a model's memory, in bytes, and how it was reached."""

    model: str
    model_bytes: int
    budget: int  # memory_budget resolved
    budget_spec: str  # as given: "25%", "2GiB", "auto"
    pinned: int  # non-block weights + pinned blocks (+ a quantized chunk read in: staging)
    pinned_blocks: int
    n_blocks: int
    buffers: int  # streaming buffers x the largest block
    buffer_count: int
    kv: int
    kv_per_token: int
    kv_how: str
    baseline: int = BASELINE_BYTES
    working_set: int = WORKING_SET_BYTES
    # expert streaming: the streamed blocks' non-expert parts pinned, and the expert cache
    bases: int = 0
    based_blocks: int = 0
    expert_cache: int = 0
    dequantized: int = 0  # a quantized store's: the blocks in flight, dequantized
    staging: int = 0  # a quantized store's: one chunk read in before it is pinned (in pinned)
    expert_streaming: str = AUTO  # the setting the bases and cache were planned for

    @property
    def weights(self) -> int:
        return self.pinned + self.bases + self.expert_cache + self.buffers + self.dequantized

    @property
    def kv_slack(self) -> int:
        return self.kv

    @property
    def total(self) -> int:
        return sum(nbytes for _, nbytes, _ in self.terms())

    @property
    def spec_memory(self) -> str:
        """``total`` as a Kubernetes quantity, rounded up to a whole MiB."""
        return f"{math.ceil(self.total / MiB)}Mi"

    def terms(self) -> list[tuple[str, int, str]]:
        """(term, bytes, how) in the order they add up."""
        return [
            ("process baseline", self.baseline, "Python + MLServer + torch + transformers"),
            (
                "pinned weights",
                self.pinned,
                f"non-block weights + {self.pinned_blocks}/{self.n_blocks} blocks pinned"
                + (
                    f" (+ {format_size(self.staging)} to read one in, then dequantized)"
                    if self.staging
                    else ""
                ),
            ),
            *(
                [
                    (
                        "pinned bases",
                        self.bases,
                        f"the non-expert parts of {self.based_blocks} streamed blocks "
                        "(expert streaming"
                        + (
                            "; auto streams whole blocks instead where a local store's "
                            "chunks stay in the page cache)"
                            if self.expert_streaming == AUTO
                            else ")"
                        ),
                    ),
                    ("expert cache", self.expert_cache, "the most routed experts"),
                ]
                if self.based_blocks
                else []
            ),
            (
                "streaming buffers",
                self.buffers,
                f"{self.buffer_count} x the largest block (computing + read-ahead)",
            ),
            *(
                [("dequantized blocks", self.dequantized, "the blocks in flight, dequantized")]
                if self.dequantized
                else []
            ),
            ("working set", self.working_set, "activations, tokenizer, allocator slack"),
            ("KV cache budget", self.kv, self.kv_how),
            (
                "KV growth slack",
                self.kv_slack,
                "caches grow by concatenation; the heap keeps copies",
            ),
        ]

    def report(self) -> str:
        lines = [
            f"memory for {self.model} ({format_size(self.model_bytes)} of weights) at "
            f"memory_budget {self.budget_spec} ({format_size(self.budget)}):"
        ]
        for term, nbytes, how in self.terms():
            lines.append(f"  {term:<18} {format_size(nbytes):>10}  {how}")
        lines.append(f"  {'total':<18} {format_size(self.total):>10}")
        lines.append(
            f"Seldon Model spec.memory: {self.spec_memory} (and at least that as the mlserver "
            "container's memory request and limit)"
        )
        lines.append(
            f"spec.parameters to match: memory_budget={self.budget}, kv_cache_budget={self.kv}"
        )
        return "\n".join(lines)


def resolve_sizing_budget(spec: str, model_bytes: int) -> int:
    """``memory_budget`` for sizing: "auto" resolves against the pod's memory at load,
    which sizing is about to choose, so it is taken as the whole model (what auto picks
    when the pod has room for it)."""
    from ..engine.plan import resolve_budget

    if spec == AUTO:
        return model_bytes
    return min(resolve_budget(spec, model_bytes), max(model_bytes, 1))


def size_model(
    manifest: Manifest,
    config: PretrainedConfig,
    *,
    memory_budget: str = AUTO,
    read_ahead: int | str = AUTO,
    max_active_sequences: int = 8,
    kv_cache_budget: str = AUTO,
    context: int | None = None,
    expert_streaming: str = AUTO,
    expert_prefetch: bool | str = AUTO,
) -> Sizing:
    """The terms for ``manifest`` (with its transformers ``config``) served with these
    settings; ``context`` overrides the model's context length for the KV term. A store
    that lists its experts is planned as expert streaming pins it, unless
    ``expert_streaming`` is off."""
    from ..engine import tuning
    from ..engine.held import HeldSizes
    from ..engine.plan import plan_residency, plan_with_bases
    from ..engine.skeleton import context_length
    from ..inference.kv import full_kv_budget, kv_bytes_per_token

    if expert_streaming not in (AUTO, "on", "off"):
        raise ValueError(f"expert_streaming must be auto, on or off, not {expert_streaming!r}")
    shapes = quantized_shapes(manifest, config)
    held = HeldSizes.of(manifest, shapes)
    budget = resolve_sizing_budget(memory_budget, held.total)
    plan = plan_residency(manifest, budget, tuning.read_ahead(read_ahead), held=held)
    bases = expert_bases(manifest, shapes) if expert_streaming != "off" else {}
    if bases and not plan.fully_resident:  # as the engine plans once it streams experts
        ahead = tuning.read_ahead_with_bases(read_ahead, expert_prefetch)
        plan = plan_with_bases(manifest, budget, ahead, bases, held)
    per_token = kv_bytes_per_token(config, len(manifest.blocks), manifest.dtype)
    if kv_cache_budget == AUTO:
        context = context or context_length(config)
        kv = full_kv_budget(per_token, max_active_sequences, context)
        tokens = kv // (max_active_sequences * per_token)
        kv_how = (
            f"auto: {max_active_sequences} sequences x {tokens} tokens x "
            f"{format_size(per_token)} per token"
        )
    else:
        kv = parse_size(kv_cache_budget)
        kv_how = f"kv_cache_budget {kv_cache_budget} ({kv // max(per_token, 1)} tokens)"
    return Sizing(
        model=manifest.name,
        model_bytes=held.total,
        budget=budget,
        budget_spec=str(memory_budget),
        pinned=plan.pinned_bytes,
        pinned_blocks=len(plan.resident),
        n_blocks=plan.n_blocks,
        buffers=plan.pool_buffers * plan.buffer_bytes,
        buffer_count=plan.pool_buffers,
        bases=sum(plan.pinned_bases.values()),
        based_blocks=len(plan.pinned_bases),
        expert_cache=plan.expert_cache,
        dequantized=plan.pool_buffers * plan.dequantized,
        staging=plan.staging,
        expert_streaming=expert_streaming,
        kv=kv,
        kv_per_token=per_token,
        kv_how=kv_how,
    )


def quantized_shapes(manifest: Manifest, config: PretrainedConfig) -> dict[str, TensorSpec]:
    """By key, the dtype and shape each quantized tensor of ``manifest`` has dequantized: its
    model's, built from ``config`` (none for a plain store)."""
    if manifest.quantization is None:
        return {}
    from ..engine.skeleton import build_skeleton
    from ..format.safetensors import TensorSpec

    model = build_skeleton(config, manifest.architecture, manifest.dtype, buffers=False)
    return {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


def held_sizes(manifest: Manifest, config: PretrainedConfig) -> HeldSizes:
    """What each chunk of ``manifest`` holds pinned, as the engine plans it."""
    from ..engine.held import HeldSizes

    return HeldSizes.of(manifest, quantized_shapes(manifest, config))


def expert_bases(manifest: Manifest, shapes: Mapping[str, TensorSpec]) -> dict[int, int]:
    """By block, what each block's non-expert part holds once pinned, from the manifest (and
    for a quantized one its quantized tensors' ``shapes`` dequantized: quantized_shapes):
    empty for a dense model, or a store chunked before the sizes were recorded (planned
    whole then)."""
    from ..engine.expert_plan import base_quantized
    from ..engine.held import held_bytes

    bases = {}
    for j, block in enumerate(manifest.blocks):
        info = manifest.chunks[block.chunk]
        if info.experts is not None:
            if info.experts.base_bytes is None:
                return {}
            base = info.experts.base_bytes
            bases[j] = held_bytes(base, base_quantized(info), shapes, manifest.quantization)
    return bases


def config_from_json(text: str | bytes, where: str = "config.json") -> PretrainedConfig:
    """A transformers config from config.json's text, of the model type's own class (its
    attribute names: GPT-2's ``n_head`` read as ``num_attention_heads``)."""
    from transformers import AutoConfig

    data = json.loads(text)
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{where} has no 'model_type'; it is not a transformers config")
    return AutoConfig.for_model(data.pop("model_type"), **data)
