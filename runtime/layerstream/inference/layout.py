"""Which module call hands over each hidden state, learned from transformers itself.

Hidden states are numbered as transformers' own ``output_hidden_states``. Which tensor is
hidden state k is the model's own business: most models return the first block's input,
then every block's output with the last one replaced by the final norm's; Mamba has no
embeddings entry (index k is the output of block k, the last the final norm); ALBERT
applies one shared layer ``num_hidden_layers`` times and numbers its states by
application; a model may make its last state with a plain tensor op (a reshape) after its
last module. So nothing here assumes a layout.

Once per engine, the base model runs on the meta device (a second skeleton: no weights, no
I/O, no memory) with ``output_hidden_states=True`` while the inputs and outputs of every
module call are observed. Each entry of the tuple transformers returns is matched by
identity (``is``) with the first module call that handed that very tensor over: its
*source* (module, which call of it, input or output, where inside). The meta pass also
gives the number of hidden states, which requests are validated against (capabilities.py).
An entry no module call handed over, or one changed in place after it was (its version
counter moved), has no source. hidden.py streams the states of a request from the layout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from ..engine.engine import Engine
from ..engine.writes import META_TOKENS, MetaReads, meta_runnable

log = logging.getLogger(__name__)

# Where inside a module call's inputs ((args, kwargs)) or output a tensor sits: tuple
# indexes and dict / ModelOutput keys. Hidden states are never nested deeper.
Path = tuple[int | str, ...]
_MAX_DEPTH = 3


@dataclass(frozen=True)
class StateSource:
    """The module call that hands a hidden state over."""

    module: str  # qualified name inside the base model ("" is the base model itself)
    call: int  # which call of that module in one forward (a shared block runs many times)
    output: bool  # its output, or its inputs (a block's input: the embeddings' state)
    path: Path

    def describe(self) -> str:
        side = "output" if self.output else "input"
        return f"{side} {list(self.path)} of call {self.call} of {self.module or 'the model'}"


@dataclass(frozen=True)
class HiddenLayout:
    """What ``output_hidden_states`` returns for this model: ``count`` states, and for each
    the module call it comes from (None: taken from transformers' tuple after the forward)."""

    count: int
    sources: tuple[StateSource | None, ...]


class LayoutUnknown(Exception):
    """The meta pass could not learn the hidden-state layout; the model serves no
    ``hidden_states`` mode (capabilities.py logs why). Never reaches a client."""


def _tensors_in(value: object, path: Path = ()) -> Iterator[tuple[Path, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif len(path) < _MAX_DEPTH:
        if isinstance(value, dict):  # ModelOutput is a dict too
            for key, item in value.items():
                yield from _tensors_in(item, (*path, key))
        elif isinstance(value, tuple | list):
            for i, item in enumerate(value):
                yield from _tensors_in(item, (*path, i))


def value_at(value: object, path: Path) -> object:
    for key in path:
        value = value[key]  # type: ignore[index]
    return value


class _Watcher:
    """One thread's interest in one module's calls, counted per side."""

    def __init__(self, name: str, inputs: bool, outputs: bool, seen: Callable[..., None]):
        self.name, self.inputs, self.outputs, self.seen = name, inputs, outputs, seen
        self.calls = [0, 0]


class _Taps:
    """A module's hooks, registered once and kept; each call looks up its own thread's
    watcher. Hooks registered and removed per request would change the module's hook
    dicts while another thread's forward may iterate them (torch's error path runs the
    always-call hooks from the live dict)."""

    def __init__(self, module: nn.Module):
        self._local = threading.local()
        module.register_forward_pre_hook(self._pre, with_kwargs=True)
        module.register_forward_hook(self._post)

    def watch(self, watcher: _Watcher | None) -> None:
        self._local.watcher = watcher

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        watcher = getattr(self._local, "watcher", None)
        if watcher is not None and watcher.inputs:
            watcher.seen(watcher.name, watcher.calls[0], False, (args, kwargs))
            watcher.calls[0] += 1

    def _post(self, module: nn.Module, args: tuple, output: object) -> None:
        watcher = getattr(self._local, "watcher", None)
        if watcher is not None and watcher.outputs:
            watcher.seen(watcher.name, watcher.calls[1], True, output)
            watcher.calls[1] += 1


_TAPS: weakref.WeakKeyDictionary[nn.Module, _Taps] = weakref.WeakKeyDictionary()
_TAPS_LOCK = threading.Lock()


def _taps(module: nn.Module) -> _Taps:
    with _TAPS_LOCK:
        taps = _TAPS.get(module)
        if taps is None:
            taps = _TAPS[module] = _Taps(module)
        return taps


@contextlib.contextmanager
def on_calls(
    base: nn.Module,
    names: dict[str, tuple[bool, bool]],
    seen: Callable[[str, int, bool, object], None],
) -> Iterator[None]:
    """Call ``seen(name, call, output, value)`` for every call of the named modules: with
    ``(args, kwargs)`` before it runs and its output after, as ``names[name]`` = (inputs,
    outputs) asks. Calls are counted per module and side, the same way while learning and
    while serving. Only the calling thread's calls count: requests on other threads run
    the same modules meanwhile (engine/sweeps.py)."""
    watched: list[_Taps] = []
    try:
        for name, (inputs, outputs) in names.items():
            taps = _taps(base.get_submodule(name))
            taps.watch(_Watcher(name, inputs, outputs, seen))
            watched.append(taps)
        yield
    finally:
        for taps in watched:
            taps.watch(None)


def learn_layout(config: PretrainedConfig, architecture: str, dtype: str) -> HiddenLayout:
    """The meta pass (step 1 of the module docstring)."""
    base = meta_runnable(config, architecture, dtype).base_model
    seen: list[tuple[StateSource, torch.Tensor, int]] = []
    first: dict[int, int] = {}  # id(tensor) -> its first sighting (tensors kept alive in seen)

    def record(name: str, call: int, output: bool, value: object) -> None:
        for path, tensor in _tensors_in(value):
            if id(tensor) not in first:
                first[id(tensor)] = len(seen)
                seen.append((StateSource(name, call, output, path), tensor, tensor._version))

    everything = {name: (True, True) for name, _ in base.named_modules()}
    ids = torch.zeros((1, META_TOKENS), dtype=torch.long, device="meta")
    # no_grad, not inference_mode: inference tensors have no version counter. With the
    # all-ones mask requests pass (hidden.py): a model may apply it to a state after the
    # module that made it (ESM-1b multiplies its embeddings' layer norm output by it), and
    # MetaReads answers the values transformers' mask code reads of it.
    # The failure is kept as text: the exception's traceback holds the meta forward's frames
    # (its cache, its tensors) for as long as the exception lives (a log record, a cache).
    failure = None
    try:
        with torch.no_grad(), MetaReads(), on_calls(base, everything, record):
            states = base(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
            ).hidden_states
    except Exception as exc:  # any failure of transformers' forward on meta means the same
        failure = f"its forward pass on the meta device failed ({exc!r})"
    if failure is not None:
        raise LayoutUnknown(failure)
    if not isinstance(states, tuple) or not states:
        raise LayoutUnknown("its base model returns no hidden_states")
    sources: list[StateSource | None] = []
    for state in states:
        where = first.get(id(state))
        source = None
        if where is not None:
            found, tensor, version = seen[where]
            if tensor is state and tensor._version == version:
                source = found
        sources.append(source)
    return HiddenLayout(count=len(states), sources=tuple(sources))


_LAYOUTS: weakref.WeakKeyDictionary[Engine, HiddenLayout | LayoutUnknown] = (
    weakref.WeakKeyDictionary()
)
_LAYOUTS_LOCK = threading.Lock()


def hidden_layout(engine: Engine) -> HiddenLayout:
    """The engine's layout, learned on first use; raises LayoutUnknown if it cannot be."""
    with _LAYOUTS_LOCK:
        known = _LAYOUTS.get(engine)
        if known is None:
            try:
                known = learn_layout(
                    engine.config, engine.manifest.architecture, engine.manifest.dtype
                )
                late = [k for k, s in enumerate(known.sources) if s is None]
                log.debug(
                    "%s: %d hidden states; sent when the forward ends: %s",
                    engine.manifest.name,
                    known.count,
                    late or "none",
                )
            except LayoutUnknown as exc:
                known = LayoutUnknown(str(exc))  # without the traceback of the meta pass
            _LAYOUTS[engine] = known
    if isinstance(known, LayoutUnknown):
        raise LayoutUnknown(str(known))
    return known
