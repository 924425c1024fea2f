"""The model's own transformers classes, built on the meta device the way from_pretrained does.

Parameters stay on meta (no memory); non-persistent buffers (rotary ``inv_freq``, BERT
``position_ids``, ...) are materialised and recomputed by the model's own
``_init_weights``, because zero-filling them gives silently wrong outputs. Nothing here
knows any particular architecture: blocks are found as the homogeneous ``ModuleList`` s
that transformers itself marks as "do not split" (or, without that mark, the largest).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import ManifestError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# torch's default dtype is process-global; building two skeletons at once must not interleave.
_DEFAULT_DTYPE_LOCK = threading.Lock()


def model_class(architecture: str) -> type[PreTrainedModel]:
    """The transformers class named in a config's ``architectures`` (no remote code, ever)."""
    cls = getattr(transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ManifestError(
            f"architecture {architecture!r} is not a model class of transformers "
            f"{transformers.__version__}; upgrade transformers or re-chunk the model"
        )
    return cls


def build_skeleton(
    config: PretrainedConfig, architecture: str, dtype: str, buffers: bool = True
) -> PreTrainedModel:
    """Instantiate ``architecture`` with every parameter on meta and, with ``buffers``, real
    non-persistent buffers (the chunker, which never runs the model, skips computing them)."""
    from transformers import initialization as hf_init

    cls = model_class(architecture)
    with _DEFAULT_DTYPE_LOCK:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(TORCH_DTYPES[dtype])
        try:
            with torch.device("meta"), hf_init.meta_device_safe_creation_ops():
                model = cls(config)
            _keep_in_fp32(model, TORCH_DTYPES[dtype])
            if not buffers:
                return model.eval()
            for key, buf in list(model.named_non_persistent_buffers()):
                owner, _, name = key.rpartition(".")
                model.get_submodule(owner)._buffers[name] = torch.empty_like(buf, device="cpu")
            # Re-run the model's own init: parameters are meta (a no-op), buffers get their
            # real values (rotary frequencies, position ids, embed scales...).
            for module in model.modules():
                if hasattr(module, "_is_hf_initialized"):
                    del module._is_hf_initialized
            model.initialize_weights()
        finally:
            torch.set_default_dtype(previous)
    # Parameters keep requires_grad as the model's own init sets it (True), like those of a
    # from_pretrained model: ATen decomposes some products partly by it (torch.matmul of a
    # 2-D weight by a batched input), so with other flags the same weights give other
    # roundings (Mamba's dt_proj: logits 8e-5 apart after 16 steps, docs/exactness.md).
    # The engine runs every forward in inference_mode, so no graph is ever recorded.
    model.eval()
    return model


def _keep_in_fp32(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """The tensors from_pretrained(dtype=...) keeps in float32 (the model's
    ``_keep_in_fp32_modules``, in float16, and ``_keep_in_fp32_modules_strict``, in float16
    and bfloat16) made float32 here too, with transformers' own plan and key matching: the
    chunker then stores them in float32 and the engine checks every chunk against that."""
    plan = model._get_dtype_plan(dtype)
    if not plan:
        return
    from transformers.core_model_loading import build_glob_alternation

    pattern, groups, _ = build_glob_alternation(list(plan))
    changed: dict[int, torch.Tensor] = {}  # by the original's id: tied keys stay tied
    for key, tensor in model.state_dict(keep_vars=True).items():
        found = pattern.search(key)
        if found is None or not tensor.is_floating_point():
            continue
        want = plan[groups[found.lastgroup]]
        if tensor.dtype == want:
            continue
        if id(tensor) not in changed:
            wider = torch.empty_like(tensor, dtype=want, device="meta")
            if isinstance(tensor, nn.Parameter):
                wider = nn.Parameter(wider, requires_grad=tensor.requires_grad)
            changed[id(tensor)] = wider
        set_tensor(model, key, changed[id(tensor)])


def context_length(config: PretrainedConfig) -> int | None:
    """The longest sequence the model's positions cover, under whichever name its config uses."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def find_block_lists(model: PreTrainedModel) -> list[str]:
    """Qualified names of the ModuleLists that hold the repeated transformer blocks.

    transformers' ``_no_split_modules`` names the block classes (decoder/encoder layers): a
    ModuleList of them is a list of blocks, whether its children are of one class or of
    several (hybrid models mix attention and state-space layers). Without such a list, a
    candidate is a ModuleList of children of one class, and the class of the one holding
    the most parameters wins, in every list of it. A list of lists is no list of blocks:
    a ModuleList never runs as a module, so hooks on it would never fire. A list may hold
    a single child: a one-layer model, or ALBERT, whose one shared layer group is applied
    ``num_hidden_layers`` times (the block hooks run on every application, so such a block
    is pinned, or streamed once per application). Lists nested inside a chosen list (MoE
    experts inside a layer, ALBERT's layers inside a group) are not blocks of their own.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    preferred = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 1:
            if any(isinstance(child, _CONTAINERS) for child in module):
                continue  # containers never run as modules: their hooks would never fire
            classes = {type(child).__name__ for child in module}
            if classes <= no_split:
                # a list of the model's blocks, of one class or several (Jamba's attention
                # and Mamba layers): run in order all the same
                preferred.append((name, ",".join(sorted(classes)), _param_count(module)))
            elif len(classes) == 1:
                candidates.append((name, classes.pop(), _param_count(module)))
    if not preferred and candidates:
        # the block class holding the most parameters in one list, in every list of it
        # (Funnel keeps its encoder's layers in one list per stage)
        block_class = max(candidates, key=lambda c: c[2])[1]
        preferred = [c for c in candidates if c[1] == block_class]
    names = [c[0] for c in preferred]
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def block_prefixes(model: PreTrainedModel) -> list[str]:
    """``["model.layers.0", "model.layers.1", ...]`` in module order."""
    out = []
    for list_name in find_block_lists(model):
        for i in range(len(model.get_submodule(list_name))):
            out.append(f"{list_name}.{i}" if list_name else str(i))
    return out


def block_of(key: str, prefixes: list[str]) -> int | None:
    """Index of the block a state-dict key belongs to, or None for the rest of the model."""
    for j, prefix in enumerate(prefixes):
        if key.startswith(prefix + "."):
            return j
    return None


def tied_groups(state: Mapping[str, torch.Tensor] | nn.Module) -> list[list[str]]:
    """Tied weights, generically: keys of a state dict (``keep_vars=True``; a module's own
    when given a module) that resolve to the very same tensor, each group sorted."""
    if isinstance(state, nn.Module):
        state = state.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = collections.defaultdict(list)
    for key, value in state.items():
        by_id[id(value)].append(key)
    return [sorted(keys) for keys in by_id.values() if len(keys) > 1]


def get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if name in module._parameters:
        return module._parameters[name]
    return module._buffers[name]


def set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer ``key`` (no copy); a parameter
    keeps the ``requires_grad`` of the one it replaces (see build_skeleton)."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if name in module._parameters:
        if isinstance(tensor, nn.Parameter):
            module._parameters[name] = tensor
        else:
            placeholder = module._parameters[name]
            grad = placeholder is not None and placeholder.requires_grad
            module._parameters[name] = nn.Parameter(tensor, requires_grad=grad)
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(f"{key} is neither a parameter nor a buffer of the model")


def shared_state(model: nn.Module) -> str | None:
    """Why requests on this model cannot run at once and stay exact, or None. transformers'
    dynamic and longrope rotary embeddings rewrite their frequencies in forward (dynamic
    from the longest sequence seen so far), so a request's numbers would depend on the
    others in flight."""
    for name, module in model.named_modules():
        rope = getattr(module, "rope_type", None)
        if isinstance(rope, str) and ("dynamic" in rope or "longrope" in rope):
            return f"{name} uses {rope!r} rotary frequencies, rewritten by the sequences it runs"
    return None
