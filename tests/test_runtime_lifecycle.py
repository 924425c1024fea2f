"""The runtime's load and unload, in process: what load leaves for the garbage collector,
and what unload gives back."""

from __future__ import annotations

import asyncio
import gc
import weakref

from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest

from layerstream.serving.runtime import LayerStreamRuntime

REQUEST = {
    "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [3], "data": [5, 6, 7]}],
    "parameters": {"max_new_tokens": 2, "temperature": 0},
}


async def _one(payload: dict):
    yield InferenceRequest.model_validate(payload)


def test_load_freezes_the_heap_and_unload_frees_the_model(model_factory):
    """A full garbage collection would walk every object of the loaded model each time
    (hundreds of ms with a 1 GB Llama, no thread running meanwhile): load moves them out of
    its walks. Unload hands them back, so the model's objects (cycles included) are freed,
    and a request after unload is told the model is not loaded."""
    settings = ModelSettings(
        name="life",
        implementation=LayerStreamRuntime,
        parameters=ModelParameters(
            extra={"chunk_store": str(model_factory("llama").store), "torch_threads": 1}
        ),
    )
    runtime = LayerStreamRuntime(settings)

    async def main():
        runtime.ready = await runtime.load()
        frozen = gc.get_freeze_count()
        served = [r async for r in runtime.predict_stream(_one(REQUEST))]
        engine = weakref.ref(runtime._engine)
        model = weakref.ref(runtime._engine.model)
        await runtime.unload()
        gc.collect()
        after = [r async for r in runtime.predict_stream(_one(REQUEST))]
        return frozen, served, engine, model, after

    try:
        frozen, served, engine, model, (after,) = asyncio.run(main())
    finally:
        gc.unfreeze()  # leave the test process as it was
    assert frozen > 0
    assert served[-1].parameters.finish_reason in ("length", "stop")
    assert engine() is None and model() is None
    assert after.parameters.error_type == "invalid_request"
    assert "is not loaded" in after.parameters.error
