"""End to end: a real ``mlserver start`` serving layerstream models, checked against the fully
loaded transformers model on the same weights (REST SSE, gRPC and unary ``/infer``)."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from mlserver_proc import (
    BERT,
    GATED,
    GPT2,
    LLAMA,
    LLAMA_25,
    MAX_NEW_TOKENS_LIMIT,
    ids_input,
    joined,
    labels,
    metric_samples,
    prompt_input,
    raw_sse,
    wait_idle,
    wait_until,
)
from reference import Reference

from layerstream_client import Final, GRPCClient, HiddenState, SSEClient, Token

pytest_plugins = ["mlserver_proc"]
pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
STATS = (
    "prompt_tokens",
    "tokens",
    "ttft_us",
    "total_us",
    "weight_wait_us",
    "compute_us",
    "bytes_streamed",
    "chunks_streamed",
    "cache_hits",
    "cache_misses",
    "sweeps",
    "sweep_sequences",
    "experts_routed",
    "experts_read",
    "expert_bytes",
)
NUM_BLOCKS = 12  # every fixture model in conftest has 12 blocks
TRANSPORTS = ("sse", "grpc")


@pytest.fixture(scope="module")
def server(layerstream_server):
    return layerstream_server


@pytest.fixture(scope="module")
def reference(layerstream_reference):
    return layerstream_reference


def client(server, transport: str):
    if transport == "sse":
        return SSEClient(server.http_url, timeout=60.0)
    return GRPCClient(server.grpc_target, timeout=60.0)


def split(events: list) -> tuple[list[Token], list[HiddenState], Final]:
    """Tokens, hidden states and the final event; the final event must come last, once."""
    assert events, "the stream carried no events"
    *body, final = events
    assert isinstance(final, Final), events
    assert not any(isinstance(e, Final) for e in body), events
    tokens = [e for e in body if isinstance(e, Token)]
    hidden = [e for e in body if isinstance(e, HiddenState)]
    assert len(tokens) + len(hidden) == len(body)
    return tokens, hidden, final


def array(event: HiddenState) -> np.ndarray:
    return np.asarray(event.values, dtype=np.float32).reshape(event.shape)


def check_stats(final: Final, prompt_tokens: int, tokens: int) -> None:
    stats = final.stats
    assert set(STATS) <= set(stats), stats
    for key in STATS:
        assert type(stats[key]) is int and stats[key] >= 0, (key, stats[key])
    assert stats["prompt_tokens"] == prompt_tokens
    assert stats["tokens"] == tokens
    assert stats["total_us"] > 0
    assert stats["compute_us"] == max(stats["total_us"] - stats["weight_wait_us"], 0)
    if tokens:
        assert 0 < stats["ttft_us"] <= stats["total_us"]


# -- 1. greedy tokens ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("model", [LLAMA, LLAMA_25, GPT2])
def test_greedy_tokens_match_resident_generate(server, reference, model, transport):
    ref = reference(model)
    n = 12
    ids = ref.encode(PROMPT)
    expected = ref.greedy(ids, n)

    tokens, hidden, final = split(
        list(client(server, transport).generate(model, PROMPT, max_new_tokens=n))
    )

    assert not hidden
    assert [t.token_id for t in tokens] == expected
    assert final.finish_reason == ref.finish_reason(expected, n)
    assert final.error is None
    check_stats(final, prompt_tokens=len(ids), tokens=len(expected))
    stats = final.stats
    # Each generated token is one forward pass over every block.
    assert stats["cache_hits"] + stats["cache_misses"] == NUM_BLOCKS * len(expected)
    if model == LLAMA_25:
        assert stats["cache_misses"] > 0
        assert stats["bytes_streamed"] > 0 and stats["chunks_streamed"] > 0
    else:
        assert stats["cache_misses"] == 0
        assert stats["bytes_streamed"] == 0 and stats["chunks_streamed"] == 0
        assert stats["weight_wait_us"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("model", [LLAMA, LLAMA_25, GPT2])
def test_greedy_text_matches_tokenizer_decode(server, reference, model, transport):
    ref = reference(model)
    n = 12
    expected = ref.greedy(ref.encode(PROMPT), n)

    tokens, _, final = split(
        list(client(server, transport).generate(model, PROMPT, max_new_tokens=n))
    )

    assert [t.token_id for t in tokens] == expected
    text = "".join(t.text for t in tokens) + final.text
    assert text == ref.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("transport", [*TRANSPORTS, "infer"])
def test_more_than_16_new_tokens_all_arrive(server, reference, transport):
    """Every other test asks for 16 tokens or fewer: a silent cap would hide there."""
    ref = reference(LLAMA)
    n = 40
    ids = ref.encode(PROMPT)
    expected = ref.greedy(ids, n)
    assert ref.finish_reason(expected, n) == "length"  # no EOS: all n must come

    if transport == "infer":
        body = SSEClient(server.http_url).infer(
            LLAMA, {"inputs": [prompt_input(PROMPT)], "parameters": {"max_new_tokens": n}}
        )
        outputs = {o["name"]: o for o in body["outputs"]}
        got, reason = outputs["token_ids"]["data"], body["parameters"]["finish_reason"]
        assert body["parameters"]["tokens"] == n
    else:
        tokens, _, final = split(
            list(client(server, transport).generate(LLAMA, PROMPT, max_new_tokens=n))
        )
        got, reason = [t.token_id for t in tokens], final.finish_reason
        assert final.stats["tokens"] == n
    assert len(got) == n
    assert got == expected
    assert reason == "length"


# -- 2. seeded sampling ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("model", [LLAMA_25, GPT2])
def test_seeded_sampling_matches_resident_generate(server, reference, model, transport):
    ref = reference(model)
    n, seed, top_k = 16, 1234, 40
    ids = ref.encode(PROMPT)
    expected = ref.sample(ids, n, seed, temperature=0.8, top_k=top_k)
    assert expected != ref.greedy(ids, n)  # otherwise the test would not show sampling

    events = client(server, transport).generate(
        model,
        PROMPT,
        max_new_tokens=n,
        do_sample=True,
        temperature="0.8",  # a string: gRPC has no float parameters
        top_k=top_k,
        seed=seed,
    )
    tokens, _, final = split(list(events))

    assert [t.token_id for t in tokens] == expected
    assert final.finish_reason == ref.finish_reason(expected, n)


# -- 3. input_ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_input_ids_instead_of_prompt(server, reference, transport):
    ref = reference(LLAMA_25)
    ids = [7, 42, 99, 150, 200, 11, 11, 300, 5]
    n = 8
    expected = ref.greedy(ids, n)

    events = client(server, transport).generate(LLAMA_25, input_ids=ids, max_new_tokens=n)
    tokens, _, final = split(list(events))

    assert [t.token_id for t in tokens] == expected
    assert final.stats["prompt_tokens"] == len(ids)
    assert final.finish_reason == ref.finish_reason(expected, n)


def test_input_ids_same_answer_as_the_prompt_they_encode(server, reference):
    ref = reference(GPT2)
    sse = SSEClient(server.http_url)
    by_prompt = [t.token_id for t in split(list(sse.generate(GPT2, PROMPT, max_new_tokens=6)))[0]]
    ids = ref.encode(PROMPT)
    by_ids = [
        t.token_id for t in split(list(sse.generate(GPT2, input_ids=ids, max_new_tokens=6)))[0]
    ]
    assert by_prompt == by_ids == ref.greedy(ids, 6)


def test_input_ids_shape_1_by_n_flat(server, reference):
    ref = reference(LLAMA)
    ids = ref.encode(PROMPT)
    request = {
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": ids}],
        "parameters": {"max_new_tokens": 4},
    }
    body = httpx.post(f"{server.http_url}/v2/models/{LLAMA}/infer", json=request, timeout=60)
    assert body.status_code == 200, body.text
    outputs = {o["name"]: o for o in body.json()["outputs"]}
    assert outputs["token_ids"]["data"] == ref.greedy(ids, 4)


def test_input_ids_shape_1_by_n_nested(server, reference):
    ref = reference(LLAMA)
    ids = ref.encode(PROMPT)
    request = {
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": [ids]}
        ],
        "parameters": {"max_new_tokens": 4},
    }
    body = httpx.post(f"{server.http_url}/v2/models/{LLAMA}/infer", json=request, timeout=60)
    assert body.status_code == 200, body.text
    outputs = {o["name"]: o for o in body.json()["outputs"]}
    assert outputs["token_ids"]["data"] == ref.greedy(ids, 4)


# -- 4. hidden states ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transport", "layers", "expected_layers"),
    [
        ("sse", "0,-1", [0, NUM_BLOCKS]),
        ("grpc", "0,-1", [0, NUM_BLOCKS]),
        ("sse", [0, 3, -1], [0, 3, NUM_BLOCKS]),  # a JSON list over REST
        ("grpc", [-1, 3, 0], [0, 3, NUM_BLOCKS]),  # any order in, ascending out
    ],
)
def test_bert_hidden_states_match_output_hidden_states(
    server, reference, transport, layers, expected_layers
):
    ref = reference(BERT)
    ids = ref.encode(PROMPT)
    states = ref.hidden_states(ids)
    assert len(states) == NUM_BLOCKS + 1

    events = client(server, transport).hidden_states(BERT, PROMPT, layers=layers)
    tokens, hidden, final = split(list(events))

    assert not tokens
    assert [h.layer for h in hidden] == expected_layers
    for event in hidden:
        assert event.shape == (len(ids), 64)
        np.testing.assert_allclose(array(event), states[event.layer], rtol=0, atol=1e-5)
    assert final.finish_reason == "stop"
    assert final.embedding is not None
    np.testing.assert_allclose(
        np.asarray(final.embedding, dtype=np.float32), states[-1].mean(axis=0), rtol=0, atol=1e-5
    )
    check_stats(final, prompt_tokens=len(ids), tokens=0)


@pytest.mark.parametrize(
    ("model", "transport", "layers"),
    [(LLAMA_25, "sse", None), (LLAMA, "grpc", [0, 5, -1])],
)
def test_causal_lm_hidden_states_match_output_hidden_states(
    server, reference, model, transport, layers
):
    ref = reference(model)
    ids = ref.encode(PROMPT)
    states = ref.hidden_states(ids)  # resident.model(ids, output_hidden_states=True)
    wanted = list(range(NUM_BLOCKS + 1)) if layers is None else [0, 5, NUM_BLOCKS]

    params: dict[str, Any] = {}
    if layers is not None:
        params["layers"] = layers
    _, hidden, final = split(list(client(server, transport).hidden_states(model, PROMPT, **params)))

    assert [h.layer for h in hidden] == wanted
    for event in hidden:
        np.testing.assert_allclose(array(event), states[event.layer], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(final.embedding, dtype=np.float32), states[-1].mean(axis=0), rtol=0, atol=1e-5
    )
    if model == LLAMA_25:
        assert final.stats["cache_misses"] > 0 and final.stats["bytes_streamed"] > 0


@pytest.mark.parametrize("mode", ["hidden_states", "embedding", "tokens"])
def test_request_without_max_new_tokens_on_a_model_with_a_limit(server, reference, mode):
    ref = reference(LLAMA_25)
    ids = ref.encode(PROMPT)
    events = SSEClient(server.http_url).stream(
        LLAMA_25, {"inputs": [prompt_input(PROMPT)], "parameters": {"mode": mode}}
    )
    tokens, hidden, final = split(list(events))
    if mode == "tokens":
        assert 1 <= len(tokens) <= MAX_NEW_TOKENS_LIMIT
        assert [t.token_id for t in tokens] == ref.greedy(ids, len(tokens))
    else:
        states = ref.hidden_states(ids)
        assert [h.layer for h in hidden] == (
            list(range(NUM_BLOCKS + 1)) if mode == "hidden_states" else []
        )
        np.testing.assert_allclose(
            np.asarray(final.embedding, dtype=np.float32), states[-1].mean(0), rtol=0, atol=1e-5
        )


def test_hidden_states_wire_format_raw_sse(server, reference):
    """Plain httpx + httpx_sse: one ``hidden_state`` FP32 [seq, hidden] event per layer with an
    integer ``layer`` parameter, then a final event with ``embedding`` and integer stats."""
    ref = reference(BERT)
    ids = ref.encode(PROMPT)
    states = ref.hidden_states(ids)
    request = {
        "inputs": [prompt_input(PROMPT)],
        "parameters": {"mode": "hidden_states", "layers": "1,-1"},
    }

    events = raw_sse(server.http_url, BERT, request)

    assert len(events) == 3
    for event, layer in zip(events[:2], [1, NUM_BLOCKS], strict=True):
        assert event["model_name"] == BERT
        assert event["parameters"]["layer"] == layer
        assert "finish_reason" not in event["parameters"]
        (output,) = event["outputs"]
        assert output["name"] == "hidden_state"
        assert output["datatype"] == "FP32"
        assert output["shape"] == [len(ids), 64]
        values = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
        np.testing.assert_allclose(values, states[layer], rtol=0, atol=1e-5)
    final = events[-1]
    assert final["parameters"]["finish_reason"] == "stop"
    assert all(type(final["parameters"][k]) is int for k in STATS)
    (embedding,) = final["outputs"]
    assert (embedding["name"], embedding["datatype"], embedding["shape"]) == (
        "embedding",
        "FP32",
        [64],
    )
    np.testing.assert_allclose(embedding["data"], states[-1].mean(axis=0), rtol=0, atol=1e-5)


# -- 5. unary /infer -------------------------------------------------------------------------


def test_unary_infer_tokens_equal_streamed(server, reference):
    ref = reference(LLAMA_25)
    n = 10
    tokens, _, final = split(
        list(SSEClient(server.http_url).generate(LLAMA_25, PROMPT, max_new_tokens=n))
    )

    body = SSEClient(server.http_url).infer(
        LLAMA_25, {"inputs": [prompt_input(PROMPT)], "parameters": {"max_new_tokens": n}}
    )

    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == {"text", "token_ids"}
    assert outputs["token_ids"]["datatype"] == "INT64"
    assert outputs["token_ids"]["data"] == [t.token_id for t in tokens]
    assert outputs["token_ids"]["data"] == ref.greedy(ref.encode(PROMPT), n)
    assert outputs["text"]["datatype"] == "BYTES"
    assert outputs["text"]["data"] == ["".join(t.text for t in tokens) + final.text]
    params = body["parameters"]
    assert params["finish_reason"] == final.finish_reason
    assert params["tokens"] == len(tokens)
    assert all(type(params[k]) is int for k in STATS)


@pytest.mark.parametrize("pooling", [None, "mean", "cls", "last", "pooler"])
def test_unary_infer_embedding_on_bert(server, reference, pooling):
    ref = reference(BERT)
    ids = ref.encode(PROMPT)
    out = ref.forward(ids)
    last = out.last_hidden_state[0].numpy()
    expected = {
        None: last.mean(axis=0),
        "mean": last.mean(axis=0),
        "cls": last[0],
        "last": last[-1],
        "pooler": out.pooler_output[0].numpy(),
    }[pooling]
    request: dict[str, Any] = {"inputs": [prompt_input(PROMPT)]}
    if pooling is not None:
        request["parameters"] = {"pooling": pooling}  # no mode: embedding is bert's default

    body = SSEClient(server.http_url).infer(BERT, request)

    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == {"embedding"}
    assert outputs["embedding"]["shape"] == [64]
    np.testing.assert_allclose(outputs["embedding"]["data"], expected, rtol=0, atol=1e-5)
    assert body["parameters"]["finish_reason"] == "stop"
    assert body["parameters"]["prompt_tokens"] == len(ids)


def test_unary_infer_hidden_states_stacked(server, reference):
    ref = reference(BERT)
    ids = ref.encode(PROMPT)
    states = ref.hidden_states(ids)
    request = {
        "inputs": [prompt_input(PROMPT)],
        "parameters": {"mode": "hidden_states", "layers": [0, 3, -1]},
    }

    body = SSEClient(server.http_url).infer(BERT, request)

    outputs = {o["name"]: o for o in body["outputs"]}
    stacked = outputs["hidden_states"]
    assert stacked["shape"] == [3, len(ids), 64]
    values = np.asarray(stacked["data"], dtype=np.float32).reshape(stacked["shape"])
    for row, layer in zip(values, [0, 3, NUM_BLOCKS], strict=True):
        np.testing.assert_allclose(row, states[layer], rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        outputs["embedding"]["data"], states[-1].mean(axis=0), rtol=0, atol=1e-5
    )
    assert body["parameters"]["layers"] == f"0,3,{NUM_BLOCKS}"


@pytest.mark.parametrize(
    "layers",
    [[-1, 0], [0, 0], [2, -(NUM_BLOCKS - 1)], "3,1,3"],
    ids=["back", "twice", "alias", "text"],
)
def test_unary_hidden_states_keep_the_requests_order_and_count(server, reference, layers):
    """``[-1, 0]`` came back as layer 0 first, ``[0, 0]`` and ``[2, -7]`` as one layer, with
    no error: the stacked states now follow the request, entry by entry."""
    ref = reference(BERT)
    ids = ref.encode(PROMPT)
    states = ref.hidden_states(ids)
    asked = layers if isinstance(layers, list) else [int(k) for k in layers.split(",")]
    expected = [k % (NUM_BLOCKS + 1) for k in asked]
    request = {
        "inputs": [prompt_input(PROMPT)],
        "parameters": {"mode": "hidden_states", "layers": layers},
    }

    body = SSEClient(server.http_url).infer(BERT, request)

    stacked = {o["name"]: o for o in body["outputs"]}["hidden_states"]
    assert stacked["shape"] == [len(expected), len(ids), 64]
    values = np.asarray(stacked["data"], dtype=np.float32).reshape(stacked["shape"])
    for row, layer in zip(values, expected, strict=True):
        np.testing.assert_allclose(row, states[layer], rtol=0, atol=1e-5)
    assert body["parameters"]["layers"] == ",".join(map(str, expected))


# -- 6. concurrency --------------------------------------------------------------------------


def test_concurrent_streams_each_get_their_own_answer(server, reference):
    ref = reference(LLAMA_25)
    prompts = [PROMPT, "The quick brown fox", "Layer streaming trades memory"]
    n = 10
    expected = [ref.greedy(ref.encode(p), n) for p in prompts]
    assert len({tuple(e) for e in expected}) > 1  # distinct answers, so a mix-up would show
    start = threading.Barrier(len(prompts))

    def run(prompt: str) -> list[int]:
        start.wait(timeout=30)
        events = SSEClient(server.http_url, timeout=60).generate(LLAMA_25, prompt, max_new_tokens=n)
        tokens, _, final = split(list(events))
        assert final.finish_reason in ("length", "stop")
        return [t.token_id for t in tokens]

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        results = list(pool.map(run, prompts))

    assert results == expected


def test_four_sse_and_grpc_streams_share_sweeps_and_stay_exact(gated_layerstream_server, reference):
    """Two SSE and two gRPC streams at once on the 25% model, greedy and seeded sampling
    with different prompts and lengths: each equals the resident model alone, and they rode
    shared sweeps (their stats and the server's metrics say so).

    They are in flight together by construction, not by being sent at once: the gated
    server's store holds every block read until all four have joined the sweeps (its hook
    logs each join), so none can finish, or even produce a token, before the last one is in.
    """
    server, gate = gated_layerstream_server, gated_layerstream_server.gate
    ref = reference(LLAMA_25)  # GATED serves the same llama weights
    plan = [
        ("sse", PROMPT, {"max_new_tokens": 12, "temperature": 0}),
        ("grpc", "The quick brown fox", {"max_new_tokens": 9, "temperature": 0}),
        (
            "sse",
            "Layer streaming trades memory",
            {"max_new_tokens": 10, "seed": 11, "temperature": 0.8, "top_p": 0.9},
        ),
        ("grpc", "Many users, one pass", {"max_new_tokens": 11, "seed": 3, "temperature": 1.1}),
    ]
    expected = []
    for _, prompt, params in plan:
        ids, n = ref.encode(prompt), params["max_new_tokens"]
        if "seed" in params:
            expected.append(
                ref.sample(
                    ids,
                    n,
                    params["seed"],
                    temperature=params["temperature"],
                    **({"top_p": params["top_p"]} if "top_p" in params else {}),
                )
            )
        else:
            expected.append(ref.greedy(ids, n))
    wait_idle(server, GATED)  # nothing an earlier test started is counted below
    before = metric_samples(server.metrics_url)
    joins_before = joined(server)

    def run(step) -> tuple[list[int], Final]:
        transport, prompt, params = step
        tokens, _, final = split(list(client(server, transport).generate(GATED, prompt, **params)))
        return [t.token_id for t in tokens], final

    def all_in_or_one_ended() -> bool:
        return joined(server) - joins_before >= len(plan) or any(f.done() for f in futures)

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        gate.close()
        try:
            futures = [pool.submit(run, step) for step in plan]
            wait_until(all_in_or_one_ended, "all four requests to join the sweeps")
            assert not any(f.done() for f in futures)  # none ended while the reads were held
        finally:
            gate.open()
        results = [future.result() for future in futures]

    assert [ids for ids, _ in results] == expected
    finals = [final for _, final in results]
    assert all(f.stats["sweeps"] > 0 for f in finals)
    assert any(f.stats["sweep_sequences"] > f.stats["sweeps"] for f in finals)  # shared
    after = metric_samples(server.metrics_url)  # each sweep is counted before its last final
    label = labels(GATED)

    def grew(name: str) -> float:
        return after[(name, label)] - before.get((name, label), 0.0)

    sweeps = grew("layerstream_sweeps_total")
    assert 0 < sweeps < sum(f.stats["sweeps"] for f in finals)  # fewer passes than alone
    # more sequences than sweeps: some sweeps carried several
    assert grew("layerstream_sweep_sequences_sum") > grew("layerstream_sweep_sequences_count")
    assert grew("layerstream_sweep_tokens_sum") == sum(f.stats["tokens"] for f in finals)


# -- 7. client disconnect --------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_disconnect_mid_stream(server, reference, transport):
    ref = reference(LLAMA_25)
    ids = ref.encode(PROMPT)
    stream = client(server, transport).generate(LLAMA_25, PROMPT, max_new_tokens=32)
    first = next(stream)
    stream.close()  # closes the HTTP connection / cancels the gRPC call after one token
    assert isinstance(first, Token)
    assert first.token_id == ref.greedy(ids, 1)[0]

    assert httpx.get(f"{server.http_url}/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{server.http_url}/v2/models/{LLAMA_25}/ready", timeout=10).status_code == 200
    # The next request (queued behind the abandoned one if it still runs) is exact.
    events = client(server, transport).generate(LLAMA_25, PROMPT, max_new_tokens=6)
    tokens, _, final = split(list(events))
    assert [t.token_id for t in tokens] == ref.greedy(ids, 6)
    assert final.finish_reason == ref.finish_reason([t.token_id for t in tokens], 6)
    # That the engine stops the abandoned request early (rather than finishing its 32
    # tokens) is asserted where a held store read makes it certain, not a race against the
    # engine's speed: test_overload.py::test_a_client_that_leaves_stops_the_engine...


# -- 8. metrics ------------------------------------------------------------------------------


def test_metrics_count_requests_and_tokens(server):
    requested = labels(GPT2, finish_reason="length", mode="tokens")
    before = metric_samples(server.metrics_url)
    n = 5
    events = list(SSEClient(server.http_url).generate(GPT2, input_ids=[3, 4, 5], max_new_tokens=n))
    tokens, _, final = split(events)
    assert final.finish_reason == "length" and len(tokens) == n
    list(SSEClient(server.http_url).hidden_states(BERT, PROMPT, layers="0"))

    text = httpx.get(server.metrics_url, timeout=10).text
    after = metric_samples(server.metrics_url)

    assert "layerstream_requests_total" in text
    requests = ("layerstream_requests_total", requested)
    assert after[requests] == before.get(requests, 0.0) + 1
    generated = ("layerstream_generated_tokens_total", labels(GPT2))
    assert after[generated] == before.get(generated, 0.0) + n
    hidden = (
        "layerstream_requests_total",
        labels(BERT, finish_reason="stop", mode="hidden_states"),
    )
    assert after[hidden] == before.get(hidden, 0.0) + 1


def test_metrics_report_streamed_bytes_of_the_small_budget_model(server):
    list(SSEClient(server.http_url).generate(LLAMA_25, PROMPT, max_new_tokens=2))
    list(SSEClient(server.http_url).generate(LLAMA, PROMPT, max_new_tokens=2))
    after = metric_samples(server.metrics_url)
    assert after[("layerstream_bytes_streamed_total", labels(LLAMA_25))] > 0
    assert after[("layerstream_bytes_streamed_total", labels(LLAMA))] == 0
    assert after[("layerstream_block_cache_misses_total", labels(LLAMA))] == 0
    # every block of the 100% model pinned (the fill is done: the fixture waited for it)
    pinned = after[("layerstream_pinned_bytes", labels(LLAMA))]
    assert pinned == after[("layerstream_pinned_bytes_target", labels(LLAMA))] > 0
    assert after[("layerstream_pinned_bytes", labels(LLAMA_25))] <= pinned
    compute = ("layerstream_compute_seconds_total", labels(LLAMA_25))
    wait = ("layerstream_weight_wait_seconds_total", labels(LLAMA_25))
    assert after[compute] > 0 and wait in after


def test_request_log_says_whether_it_waited_on_weights_or_compute(server):
    list(SSEClient(server.http_url).generate(LLAMA_25, PROMPT, max_new_tokens=2))
    lines = [
        line
        for line in server.log_path.read_text().splitlines()
        if f"{LLAMA_25} tokens:" in line and "weights waited" in line
    ]
    assert lines, "no per-request log line"
    log = server.log_path.read_text()
    assert "--- Logging error ---" not in log  # a record whose format and arguments disagree
    assert re.search(
        rf"\[{LLAMA_25}\] INFO - loaded .* blocks pinned, .* I/O thread\(s\), reader", log
    )
    assert re.search(
        r"compute [0-9.]+s, weights waited [0-9.]+s \(\d+% waiting: (I/O|compute) bound\)",
        lines[-1],
    )


# -- 9. parameters as strings, raw wire format -----------------------------------------------


def test_string_parameters_and_token_wire_format_raw_sse(server, reference):
    """Plain httpx + httpx_sse, JSON parsed here: every parameter sent as a string."""
    ref = reference(LLAMA_25)
    ids = ref.encode(PROMPT)
    n = 5
    expected = ref.greedy(ids, n)
    request = {
        "id": "string-params",
        "inputs": [prompt_input(PROMPT)],
        "parameters": {
            "mode": "tokens",
            "max_new_tokens": "5",
            "do_sample": "false",
            "top_k": "0",  # off: with do_sample false, a top_k would be refused
            "repetition_penalty": "1.0",
        },
    }

    events = raw_sse(server.http_url, LLAMA_25, request)

    assert len(events) == n + 1
    for event, token_id in zip(events[:n], expected, strict=True):
        assert event["model_name"] == LLAMA_25
        assert event["id"] == "string-params"
        assert "finish_reason" not in event["parameters"]
        outputs = {o["name"]: o for o in event["outputs"]}
        assert set(outputs) == {"text", "token_id"}
        assert outputs["token_id"]["datatype"] == "INT64"
        assert outputs["token_id"]["shape"] == [1]
        assert outputs["token_id"]["data"] == [token_id]
        assert outputs["text"]["datatype"] == "BYTES"
        assert outputs["text"]["shape"] == [1]
        assert isinstance(outputs["text"]["data"][0], str)
    final = events[-1]
    params = final["parameters"]
    assert params["finish_reason"] == ref.finish_reason(expected, n)
    for key in STATS:
        assert type(params[key]) is int, (key, params[key])
    assert params["tokens"] == n and params["prompt_tokens"] == len(ids)
    assert "error" not in params
    texts = [next(o for o in e["outputs"] if o["name"] == "text")["data"][0] for e in events[:n]]
    tail = [o["data"][0] for o in final["outputs"] if o["name"] == "text"]
    assert "".join(texts + tail) == ref.tokenizer.decode(expected, skip_special_tokens=True)


def test_string_parameters_over_unary_infer(server, reference):
    ref = reference(GPT2)
    ids = ref.encode(PROMPT)
    expected = ref.sample(ids, 6, 99, temperature=0.8, top_k=20)
    request = {
        "inputs": [ids_input(ids)],
        "parameters": {
            "max_new_tokens": "6",
            "do_sample": "true",
            "temperature": "0.8",
            "top_k": "20",
            "seed": "99",
        },
    }
    body = SSEClient(server.http_url).infer(GPT2, request)
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["token_ids"]["data"] == expected


# -- stop strings ----------------------------------------------------------------------------


def _stop_case(ref: Reference) -> tuple[list[int], str, int]:
    """Greedy ids, a stop string taken from their text, and the index of the token that
    completes it (the text cut before it is what the client must see)."""
    n = 16
    ids = ref.greedy(ref.encode(PROMPT), n)
    for k in range(1, len(ids)):
        before = ref.tokenizer.decode(ids[:k], skip_special_tokens=True)
        piece = ref.tokenizer.decode(ids[: k + 1], skip_special_tokens=True)[len(before) :]
        if piece.strip() and piece not in before:
            return ids, piece, k
    pytest.skip("the greedy output has no token whose text is new")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_single_stop_string(server, reference, transport):
    ref = reference(LLAMA)
    ids, stop, k = _stop_case(ref)
    events = client(server, transport).generate(LLAMA, PROMPT, max_new_tokens=16, stop=stop)
    tokens, _, final = split(list(events))
    assert final.finish_reason == "stop"
    assert [t.token_id for t in tokens] == ids[: k + 1]
    text = "".join(t.text for t in tokens) + final.text
    assert text == ref.tokenizer.decode(ids[:k], skip_special_tokens=True)
    assert stop not in text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stop_string_list(server, reference, transport):
    """A list of stop strings; over gRPC it travels as a JSON string."""
    ref = reference(LLAMA)
    ids, stop, k = _stop_case(ref)
    events = client(server, transport).generate(
        LLAMA, PROMPT, max_new_tokens=16, stop=["never-in-the-output", stop]
    )
    tokens, _, final = split(list(events))
    assert final.finish_reason == "stop"
    assert [t.token_id for t in tokens] == ids[: k + 1]


# -- clients nobody in this project wrote ----------------------------------------------------


@pytest.mark.filterwarnings("ignore:The `construct` method is deprecated")  # MLServer's own
def test_mlservers_own_streaming_example_decodes_every_event(server, reference):
    """MLServer's streaming docs decode ``outputs[0]`` of every event with StringCodec,
    over SSE and over gRPC ModelStreamInfer: every event, the final one too, must carry an
    output it can decode, and the decoded texts add up to the generated text."""
    import grpc
    from httpx_sse import connect_sse
    from mlserver import grpc as mlserver_grpc
    from mlserver.codecs import StringCodec
    from mlserver.grpc import converters
    from mlserver.types import InferenceRequest, InferenceResponse

    ref = reference(LLAMA_25)

    def request(use_bytes: bool) -> InferenceRequest:  # built as the example builds it
        return InferenceRequest(
            inputs=[StringCodec.encode_input("prompt", [PROMPT], use_bytes=use_bytes)],
            parameters={"max_new_tokens": 6, "temperature": 0},
        )

    expected = ref.tokenizer.decode(ref.greedy(ref.encode(PROMPT), 6), skip_special_tokens=True)

    texts: list[str] = []
    url = f"{server.http_url}/v2/models/{LLAMA_25}/generate_stream"
    with (
        httpx.Client(timeout=60) as http,
        connect_sse(http, "POST", url, json=request(use_bytes=False).model_dump()) as source,
    ):
        for sse in source.iter_sse():
            response = InferenceResponse.model_validate_json(sse.data)
            texts.extend(StringCodec.decode_output(response.outputs[0]))
    assert len(texts) == 7  # six tokens and the final event
    assert "".join(texts) == expected

    texts = []
    stub_module = mlserver_grpc.dataplane_pb2_grpc
    message = converters.ModelInferRequestConverter.from_types(
        request(use_bytes=True), model_name=LLAMA_25, model_version=None
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = stub_module.GRPCInferenceServiceStub(channel)
        for reply in stub.ModelStreamInfer(iter([message]), timeout=60):
            response = converters.ModelInferResponseConverter.to_types(reply)
            texts.extend(StringCodec.decode_output(response.outputs[0]))
    assert len(texts) == 7
    assert "".join(texts) == expected


@pytest.mark.filterwarnings("ignore:The `construct` method is deprecated")  # MLServer's own
def test_a_second_request_on_one_grpc_stream_is_refused_not_dropped(server, reference):
    """Two requests on one ModelStreamInfer stream: the first is answered in full, then the
    call ends INVALID_ARGUMENT naming the second (it ended OK with one answer before)."""
    import grpc
    from mlserver import grpc as mlserver_grpc
    from mlserver.codecs import StringCodec
    from mlserver.grpc import converters
    from mlserver.types import InferenceRequest

    ref = reference(LLAMA_25)
    expected = ref.greedy(ref.encode(PROMPT), 4)
    messages = [
        converters.ModelInferRequestConverter.from_types(
            InferenceRequest(
                id=f"r{k}",
                inputs=[StringCodec.encode_input("prompt", [PROMPT], use_bytes=True)],
                parameters={"max_new_tokens": 4, "temperature": 0},
            ),
            model_name=LLAMA_25,
            model_version=None,
        )
        for k in (1, 2)
    ]
    ids: list[int] = []
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = mlserver_grpc.dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            for reply in stub.ModelStreamInfer(iter(messages), timeout=60):
                response = converters.ModelInferResponseConverter.to_types(reply)
                assert response.id == "r1"
                ids.extend(o.data[0] for o in response.outputs if o.name == "token_id")
    assert ids == expected
    assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "carries one request" in excinfo.value.details()


def test_openai_embeddings_of_an_encoder_are_its_v2_embedding(server, reference):
    """``/v1/embeddings`` on BERT (an encoder: it serves no completions): each vector is the
    V2 ``embedding`` mode's, the mean of transformers' last hidden state."""
    from openai import OpenAI

    ref = reference(BERT)
    texts = [PROMPT, "a second text"]
    answer = OpenAI(base_url=f"{server.http_url}/v1", api_key="unused").embeddings.create(
        model=BERT, input=texts
    )
    assert answer.usage.prompt_tokens == sum(len(ref.encode(t)) for t in texts)
    for item, text in zip(answer.data, texts, strict=True):
        request = {"inputs": [prompt_input(text)], "parameters": {"mode": "embedding"}}
        final = raw_sse(server.http_url, BERT, request)[-1]
        (v2,) = [o["data"] for o in final["outputs"] if o["name"] == "embedding"]
        got = np.asarray(item.embedding, dtype=np.float32)
        assert np.array_equal(got, np.asarray(v2, dtype=np.float32))
        states = ref.hidden_states(ref.encode(text))
        np.testing.assert_allclose(got, states[-1].mean(axis=0), rtol=0, atol=1e-5)
