"""The runtime's last line of defence, in process: whatever fails, the client gets an answer
with a kind, the log gets the traceback, the metrics count it.

A real runtime is loaded from a real chunk store; a bug is simulated by breaking one piece
of its state (the tokenizer), the way the store tests corrupt a chunk file. The request
stream is a plain async generator (not MLServer's), so the transport is unknown and errors
must arrive as events, which reach every client as data.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import pickle

import pytest
from mlserver.errors import MLServerError
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest

from layerstream.errors import ChunkIntegrityError, InvalidRequest, LayerStreamError, ServerBusy
from layerstream.inference.request import Request
from layerstream.inference.types import FinalEvent, FinishReason, RequestStats
from layerstream.serving.accounting import RequestRecord
from layerstream.serving.runtime import LayerStreamRuntime

PROMPT_REQUEST = {
    "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["Once upon"]}],
    "parameters": {"max_new_tokens": 3},
}


class _BrokenTokenizer:
    """Stands where the tokenizer was: calling it fails as a bug would."""

    def __call__(self, text):
        raise KeyError("a bug in the tokenizer")


@pytest.fixture(scope="module")
def runtime(model_factory):
    store = model_factory("gpt2").store
    settings = ModelSettings(
        name="inproc",
        implementation=LayerStreamRuntime,
        parameters=ModelParameters(extra={"chunk_store": str(store), "torch_threads": 1}),
    )
    model = LayerStreamRuntime(settings)

    async def load():
        model.ready = await model.load()  # as MLServer's registry does
        assert model.ready

    asyncio.run(load())
    yield model
    asyncio.run(model.unload())


async def _one(payload: InferenceRequest):
    yield payload


def stream(runtime, request: dict) -> list:
    async def collect():
        payload = InferenceRequest.model_validate(request)
        return [r async for r in runtime.predict_stream(_one(payload))]

    return asyncio.run(collect())


def test_a_good_request_streams_tokens(runtime):
    responses = stream(runtime, PROMPT_REQUEST)
    assert [r.parameters.finish_reason for r in responses[-1:]] == ["length"]
    assert len(responses) == 4


def test_a_bad_request_from_an_unknown_transport_is_an_event(runtime):
    (response,) = stream(runtime, {**PROMPT_REQUEST, "parameters": {"temperature": "nan"}})
    params = response.parameters
    assert (params.finish_reason, params.error_type) == ("error", "invalid_request")
    assert "temperature must be a finite number" in params.error


def test_an_unexpected_exception_ends_the_stream_with_an_internal_error(
    runtime, caplog, monkeypatch
):
    monkeypatch.setattr(runtime._engine, "tokenizer", _BrokenTokenizer())
    with caplog.at_level(logging.ERROR, logger="layerstream"):
        (response,) = stream(runtime, PROMPT_REQUEST)
    params = response.parameters
    assert (params.finish_reason, params.error_type) == ("error", "internal")
    assert "KeyError" in params.error and "a bug in the tokenizer" in params.error
    (output,) = response.outputs
    assert (output.name, output.data.root) == ("error", [f"internal: {params.error}".encode()])
    (record,) = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert record.exc_info is not None  # the traceback is in the log


def test_an_unexpected_exception_in_a_unary_request_is_an_internal_500(runtime, monkeypatch):
    monkeypatch.setattr(runtime._engine, "tokenizer", _BrokenTokenizer())
    payload = InferenceRequest.model_validate(PROMPT_REQUEST)
    with pytest.raises(LayerStreamError) as caught:
        asyncio.run(runtime.predict(payload))
    assert caught.value.kind == "internal" and caught.value.status == 500
    assert str(caught.value).startswith("internal: KeyError")


def test_the_engine_serves_again_after_the_failures(runtime):
    responses = stream(runtime, PROMPT_REQUEST)
    assert responses[-1].parameters.finish_reason == "length"


@pytest.mark.parametrize("kind", [InvalidRequest, ChunkIntegrityError, ServerBusy])
def test_an_error_copied_for_each_request_it_fails_reads_as_the_original(kind):
    # engine/sweeps.py hands each waiting request its own copy of a block's error
    error = kind("chunk block_0003 failed its sha256 check")
    # MLServer is imported here, as in a server: MLServer's handlers map it by its status
    assert isinstance(error, MLServerError) and error.status_code == kind.status
    remade = type(error)(error.message)  # from the twin class: the same twin, not a new one
    assert type(remade) is type(error)
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error)), remade):
        assert type(clone) is type(error) and isinstance(clone, kind)
        assert (str(clone), clone.message, clone.kind) == (str(error), error.message, error.kind)


class _Counts:
    """What a RequestRecord told the metrics, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def record(self, *args) -> None:
        self.calls.append("finished")

    def record_error(self, *args) -> None:
        self.calls.append("error")

    def record_cancelled(self, *args) -> None:
        self.calls.append("cancelled")


def test_a_request_is_counted_once_however_it_ends():
    stats = RequestStats(*([0] * len(RequestStats.__dataclass_fields__)))
    final = FinalEvent(FinishReason.STOP, stats)

    # finished, then encoding the answer failed: counted as finished only
    counts = _Counts()
    record = RequestRecord("m", counts, "id")
    record.request = Request(mode="tokens")
    with pytest.raises(LayerStreamError), record.failures():
        record.finished(final)
        raise RuntimeError("the answer could not be encoded")
    assert counts.calls == ["finished"]

    # the client left mid-stream, then the generator was closed: counted as cancelled once
    counts = _Counts()
    record = RequestRecord("m", counts, "id")
    for _ in range(2):
        with pytest.raises(asyncio.CancelledError), record.failures():
            raise asyncio.CancelledError
    assert counts.calls == ["cancelled"]
