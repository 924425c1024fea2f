"""Models whose forward writes to their own weights, found on the meta device.

transformers' RWKV divides some block weights in place on its first forward in eval mode,
then sets a flag so it never does again. A streamed block's weights are read from the store
for every use, so the division is lost for every streamed block after its first install,
and two first requests at once divide the pinned ones twice: every answer after that is
wrong, with no error. So before serving, the model's forward runs on the meta device (a
second skeleton: no weights, no I/O) twice, while every in-place aten op is watched: an op
that writes into the storage of a parameter or a stored buffer (through the tensor itself,
a view or ``.data``) is such a write.

- writes on the first forward only (RWKV): served exactly when every block stays in memory,
  the engine running one forward at load so that the write happens once, before any
  request, as from_pretrained's first forward would do it;
- writes on every forward: each output would depend on the requests before it; refused.

The same pass finds a model that cannot run in the chunk's dtype at all (XLNet in half
precision multiplies its half-precision queries by float32 positions it makes in forward):
an op given two floating dtypes where it takes one fails on every device, so transformers'
own forward fails too, and the chunker refuses it instead of writing a store that fails
every request.
"""

from __future__ import annotations

import logging

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PretrainedConfig, PreTrainedModel

from ..format.manifest import WeightWrites
from .skeleton import build_skeleton

log = logging.getLogger(__name__)

# a few tokens: enough for every stage of Funnel's pooling (4 are not)
META_TOKENS = 8


class WritesEveryForward(Exception):
    """The model writes to its weights on every forward: not served (the message says so)."""


class DtypeMismatch(Exception):
    """The forward passes two floating dtypes to an op that takes one (the message says
    which): it fails in this dtype on the CPU, as transformers' own forward does."""


class MetaReads(TorchDispatchMode):
    """Answers the values a forward reads on the meta device (``.item()``, as transformers'
    mask code asks whether an all-ones mask is all ones) with 1 / True, the answer for the
    ordinary inputs of a meta pass, so the forward goes on down their path (the config flag
    is process-wide, but only meta tensors ever read it). What a meta pass
    learns is checked where it is used (hidden.py checks every state against transformers'
    own).

    An op given two floating dtypes is tried on the CPU, where requests run: the meta
    kernels do not check dtypes as the CPU's do (``mm`` of float16 by float32 runs on meta,
    and fails on the CPU). If it fails there and runs given one dtype, it raises
    MixedDtypes here as it would there."""

    def __enter__(self):
        # likewise ``nonzero`` (of a router's choices): every element taken as non-zero
        from torch.fx.experimental import _config

        self._nonzero = _config.patch(meta_nonzero_assume_all_nonzero=True)
        self._nonzero.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._nonzero.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 1
        kwargs = kwargs or {}
        reason = _cpu_refuses_the_mix(func, args, kwargs)
        if reason is not None:
            raise MixedDtypes(reason)
        return func(*args, **kwargs)


class MixedDtypes(RuntimeError):
    """What the CPU raises for an op of a meta pass (a RuntimeError, as the CPU's own, so
    that a model catching it goes on as it would on the CPU)."""


def mixed_dtypes(exc: BaseException | None) -> str | None:
    """Why a failed meta pass failed on mixed dtypes, if ``exc`` or an error it was raised
    from is MixedDtypes."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, MixedDtypes):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


# the most an op's arguments may take to be tried on the CPU (a meta pass's activations are
# a few tokens; only a weight could be larger, and mixes with weights fail on meta too)
_CPU_TRY_BYTES = 256 * 2**20


def _cpu_refuses_the_mix(func, args: tuple, kwargs: dict) -> str | None:
    """Why ``func`` fails on the CPU, when it is given two floating dtypes and fails there
    with them but runs given one (so the mix, not a shape or a value, is the cause)."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    dtypes = list(dict.fromkeys(t.dtype for t in tensors if t.is_floating_point()))
    if len(dtypes) < 2 or sum(t.nbytes for t in tensors) > _CPU_TRY_BYTES:
        return None

    def on_cpu(floats_as: torch.dtype | None):
        def made(value):
            if not isinstance(value, torch.Tensor):
                return value
            dtype = floats_as if floats_as and value.is_floating_point() else value.dtype
            return torch.zeros(value.shape, dtype=dtype)

        return made

    try:
        func(*pytree.tree_map(on_cpu(None), args), **pytree.tree_map(on_cpu(None), kwargs))
    except RuntimeError as exc:
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    else:
        return None
    one = on_cpu(dtypes[0])
    try:
        func(*pytree.tree_map(one, args), **pytree.tree_map(one, kwargs))
    except Exception:
        return None
    names = " and ".join(str(d).removeprefix("torch.") for d in dtypes)
    return f"{func} is given {names} tensors and fails ({error})"


class _WatchWrites(MetaReads):
    """Records the stored tensors that in-place ops write into, by storage."""

    def __init__(self, owners: dict[int, str]):
        super().__init__()
        self.owners = owners
        self.written: dict[str, None] = {}  # insertion-ordered set

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            values = value if isinstance(value, (list, tuple)) else (value,)
            for tensor in values:
                if isinstance(tensor, torch.Tensor):
                    name = self.owners.get(tensor.untyped_storage()._cdata)
                    if name is not None:
                        self.written[name] = None
        return super().__torch_dispatch__(func, types, args, kwargs)


def meta_runnable(config: PretrainedConfig, architecture: str, dtype: str) -> PreTrainedModel:
    """A skeleton whose forward runs on the meta device (as far as the model's code allows:
    a forward that reads values, ``.item()``, cannot)."""
    import copy

    config = copy.deepcopy(config)
    # MoE experts: the default (grouped_mm) has a meta kernel for bf16 only, the eager loop
    # branches on which experts got tokens (values); batched_mm reads no values.
    config._experts_implementation = "batched_mm"
    model = build_skeleton(config, architecture, dtype, buffers=False)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            # It only logs a warning, after reading the ids' values (a meta tensor has none).
            module.warn_if_padding_and_no_attention_mask = lambda *args, **kwargs: None
    return model


def forward_inputs(model: PreTrainedModel, device: str) -> dict[str, torch.Tensor]:
    """The smallest inputs the whole model's forward takes: a few token ids (and as many
    decoder ids for an encoder-decoder)."""
    ids = torch.zeros((1, META_TOKENS), dtype=torch.long, device=device)
    inputs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


class BlocksNeverRun(Exception):
    """Blocks whose forward the model never calls: hooks on them would never fire."""


def learn_weight_writes(
    config: PretrainedConfig, architecture: str, dtype: str, blocks: list[str] = ()
) -> WeightWrites:
    """What the model's forward writes of its stored tensors (``unchecked`` when its forward
    cannot run on the meta device); WritesEveryForward when it writes on a second forward
    too, BlocksNeverRun when one of ``blocks`` (module names) is never called,
    DtypeMismatch when the forward cannot run in ``dtype`` at all."""
    try:
        model = meta_runnable(config, architecture, dtype)
        owners: dict[int, str] = {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            owners.setdefault(tensor.untyped_storage()._cdata, name)
        inputs = forward_inputs(model, "meta")
        ran: set[str] = set()
        hooks = [
            model.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: ran.add(name))
            for name in blocks
        ]
        try:
            first = _written(model, inputs, owners)
        finally:
            for hook in hooks:
                hook.remove()
        again = _written(model, inputs, owners) if first else ()
    except DtypeMismatch as exc:
        raise DtypeMismatch(
            f"{architecture} cannot run in {dtype}: in its forward, {exc}, as it does on a "
            f"CPU in transformers' own from_pretrained(dtype={dtype}). Chunk it in another "
            "dtype (--dtype float32)"
        ) from None
    except Exception as exc:  # any other failure of transformers' forward on meta
        # text only: the exception's traceback holds the meta forward's frames and cache
        unchecked = f"its forward on the meta device failed ({exc!r:.200})"
    else:
        unchecked = None
    if unchecked is not None:
        log.warning(
            "%s: could not learn whether its forward writes to its weights (%s)",
            architecture,
            unchecked,
        )
        return WeightWrites(unchecked=unchecked)
    idle = [name for name in blocks if name not in ran]
    if idle:
        raise BlocksNeverRun(
            f"{architecture}: its blocks {_some(tuple(idle))} never run as modules in its "
            "forward, so layerstream cannot install their weights when they are needed"
        )
    if again:
        raise WritesEveryForward(
            f"{architecture} writes to its weights on every forward ({_some(again)}): each "
            "answer would depend on the requests before it, so layerstream does not serve it"
        )
    return WeightWrites(first=first)


def _written(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], owners: dict[int, str]
) -> tuple[str, ...]:
    # no_grad, as the engine's inference_mode: the same code paths of the model run
    with torch.no_grad(), _WatchWrites(owners) as watch:
        try:
            model(**inputs)
        except RuntimeError as exc:
            # text only, as below: the traceback holds the forward's frames
            failure = mixed_dtypes(exc)
            if failure is None:
                raise
        else:
            failure = None
    if failure is not None:
        raise DtypeMismatch(failure)
    return tuple(watch.written)


def _some(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def served_only_resident(architecture: str, writes: WeightWrites) -> str:
    """Why a model that writes on its first forward keeps every block in memory."""
    return (
        f"{architecture} writes to its weights on its first forward ({_some(writes.first)}), "
        "which a streamed block would lose (it is read again from the store for each use): "
        "it is served only with every block in memory"
    )
