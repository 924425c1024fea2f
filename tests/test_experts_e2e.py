"""Expert streaming served by a real ``mlserver start``: SSE and gRPC streams of a
mixture-of-experts model whose blocks stream as base + routed experts equal
from_pretrained's greedy ids, and the final event and /metrics report the experts read."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from architectures import PROMPT, build, reference_model
from mlserver_proc import ModelSpec, labels, metric_samples, serve
from test_architectures import streaming_budget

from layerstream_client import Final, GRPCClient, SSEClient, Token

pytestmark = pytest.mark.e2e

MODEL = "moe"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory):
    source, store = build("olmoe", tmp_path_factory.mktemp("olmoe"))
    spec = ModelSpec(
        MODEL,
        store,
        {
            "memory_budget": str(streaming_budget(store)),
            "read_ahead": 1,
            "torch_threads": 1,
            "expert_streaming": "on",
        },
    )
    with serve(tmp_path_factory.mktemp("mlserver-moe"), [spec]) as server:
        server.source = source
        yield server


def _greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def _run(server, transport: str, ids: list[int]) -> tuple[list[int], Final]:
    client = (
        SSEClient(server.http_url, timeout=120.0)
        if transport == "sse"
        else GRPCClient(server.grpc_target, timeout=120.0)
    )
    events = list(client.generate(MODEL, input_ids=ids, max_new_tokens=NEW_TOKENS))
    *tokens, final = events
    assert isinstance(final, Final) and all(isinstance(t, Token) for t in tokens)
    return [t.token_id for t in tokens], final


def test_sse_and_grpc_streams_at_once_are_exact_and_report_experts(moe_server):
    reference = reference_model(moe_server.source)
    prompts = [PROMPT, PROMPT[::-1], PROMPT[3:], PROMPT[:6]]
    expected = [_greedy(reference, p, NEW_TOKENS) for p in prompts]
    before = metric_samples(moe_server.metrics_url)
    plan = [("sse" if i % 2 else "grpc", p) for i, p in enumerate(prompts)]
    start = threading.Barrier(len(plan))

    def run(step: tuple[str, list[int]]) -> tuple[list[int], Final]:
        start.wait(timeout=60)
        return _run(moe_server, *step)

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        results = list(pool.map(run, plan))
    assert [ids for ids, _ in results] == expected
    for _, final in results:
        stats = final.stats
        assert stats["experts_routed"] > 0
        # every base is pinned at this budget: what streams is experts
        assert 0 < stats["expert_bytes"] <= stats["bytes_streamed"]
        assert stats["experts_read"] > 0
        assert 0 <= stats["experts_predicted_used"] <= stats["experts_predicted"]
        assert stats["expert_cache_hits"] >= 0  # reported (its value: test_expert_cache.py)
    after = metric_samples(moe_server.metrics_url)
    label = labels(MODEL)

    def grew(name: str) -> float:
        return after[(name, label)] - before.get((name, label), 0.0)

    read, routed = grew("layerstream_experts_read_total"), grew("layerstream_experts_routed_total")
    guessed = grew("layerstream_experts_predicted_total")
    # read on demand: each expert once per install, whoever it served; the rest on a guess
    assert 0 < read - guessed <= routed
    assert 0 <= grew("layerstream_experts_predicted_used_total") <= guessed
    assert (
        0
        < grew("layerstream_expert_bytes_streamed_total")
        <= grew("layerstream_bytes_streamed_total")
    )
