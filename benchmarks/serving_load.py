"""N concurrent clients against one real ``mlserver start``: the harness concurrency.py drives.

The server is the e2e tests' harness (tests/mlserver_proc.py: its own process group, a
temporary model repository, free ports) whose process can join a memory cgroup before it
execs. The clients stream one request each over REST SSE or gRPC ``ModelStreamInfer``, all
released together by a barrier, and record when each token arrived (time to first token and
inter-token time are measured at the client). Beside them: the server's Prometheus counters,
fields of its /proc status and io, the end of its background verification, and a poller of
``GET /v2/health/ready``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.serving_load")
ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))  # the e2e tests' server harness
from mlserver_proc import MLServerProcess, ModelSpec  # noqa: E402

MODEL = "bench"
READY_POLL_S = 0.05
VERIFIED = re.compile(r"verified \d+ streamed chunks|background verification stopped")


@dataclass
class ClientResult:
    index: int
    started: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of each token event
    ids: list[int] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    finish_reason: str | None = None
    error: str | None = None


# -- the server --------------------------------------------------------------------------


class Server(MLServerProcess):
    """The tests' ``mlserver start`` harness, whose process can join a memory cgroup before
    it execs: memory charged before a move would stay outside the cgroup's limit."""

    def __init__(self, root: Path, models: list[ModelSpec], cgroup_procs: Path | None):
        super().__init__(root, models)
        if cgroup_procs is not None:

            def enter() -> None:  # in the child, before exec
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))

            self.before_exec = enter


def wait_verified(server: Server, timeout: float) -> None:
    """Until the background sha256 pass over the streamed chunks has ended: it would take
    CPU and disk from the row (and read chunks into a cold row's page cache)."""
    deadline = time.monotonic() + timeout
    while not VERIFIED.search(server.log_text()):
        if not server.alive():
            raise RuntimeError(f"mlserver exited; log tail:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            log.warning("no end of background verification after %.0fs: row starts anyway", timeout)
            return
        time.sleep(0.2)


def metric_totals(url: str) -> dict[str, float]:
    """``{sample name: value}`` of the layerstream samples for MODEL (prometheus_client
    appends ``_total`` to counters)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10.0).raise_for_status().text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("layerstream_") and sample.labels.get("model_name") == MODEL:
                if "le" in sample.labels:
                    continue  # histogram buckets: only _sum and _count are used
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def proc_field(pid: int, name: str, field_name: str) -> int:
    """A field of /proc/PID/status (kB, returned in bytes) or /proc/PID/io (bytes)."""
    with open(f"/proc/{pid}/{name}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == field_name:
                number = int(value.split()[0])
                return number * 1024 if name == "status" else number
    raise KeyError(f"no {field_name} in /proc/{pid}/{name}")


# -- clients -----------------------------------------------------------------------------

Event = tuple[int | None, dict[str, Any]]  # (token id or None, the response's parameters)


def request_body(ids: list[int], tokens: int) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input_ids", "shape": [len(ids)], "datatype": "INT64", "data": ids}],
        "parameters": {"max_new_tokens": tokens, "temperature": 0},
    }


@contextlib.contextmanager
def sse_transport(server: Server, timeout: float) -> Iterator[Callable[[dict], Iterator[Event]]]:
    """REST SSE with plain httpx + httpx_sse: every ``data:`` line is one InferenceResponse."""
    import httpx
    from httpx_sse import connect_sse

    url = f"{server.http_url}/v2/models/{MODEL}/generate_stream"
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0)) as client:

        def stream(body: dict) -> Iterator[Event]:
            with connect_sse(client, "POST", url, json=body) as source:
                if source.response.status_code != 200:
                    raise RuntimeError(
                        f"HTTP {source.response.status_code}: {source.response.read()!r}"
                    )
                for sse in source.iter_sse():
                    event = json.loads(sse.data)
                    token = next(
                        (
                            o["data"][0]
                            for o in event.get("outputs") or []
                            if o["name"] == "token_id"
                        ),
                        None,
                    )
                    yield token, event.get("parameters") or {}

        yield stream


@contextlib.contextmanager
def grpc_transport(server: Server, timeout: float) -> Iterator[Callable[[dict], Iterator[Event]]]:
    """``ModelStreamInfer`` through MLServer's own stubs and converters."""
    import grpc
    from mlserver import types
    from mlserver.grpc import dataplane_pb2_grpc
    from mlserver.grpc.converters import ModelInferRequestConverter, ModelInferResponseConverter

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)

        def stream(body: dict) -> Iterator[Event]:
            request = ModelInferRequestConverter.from_types(
                types.InferenceRequest.model_validate(body), model_name=MODEL
            )
            for message in stub.ModelStreamInfer(iter([request]), timeout=timeout):
                response = ModelInferResponseConverter.to_types(message)
                params = (
                    response.parameters.model_dump(exclude_none=True) if response.parameters else {}
                )
                token = next(
                    (o.data.root[0] for o in response.outputs if o.name == "token_id"), None
                )
                yield token, params

        yield stream


TRANSPORTS = {"sse": sse_transport, "grpc": grpc_transport}


def run_client(
    server: Server,
    transport: str,
    body: dict,
    barrier: threading.Barrier,
    result: ClientResult,
    timeout: float,
) -> None:
    """One client: connect, wait for the others, stream; every outcome lands in ``result``."""
    try:
        with TRANSPORTS[transport](server, timeout) as stream:
            barrier.wait(timeout=60)
            result.started = time.perf_counter()
            for token, params in stream(body):
                now = time.perf_counter()
                if token is not None:
                    result.times.append(now)
                    result.ids.append(int(token))
                reason = params.get("finish_reason")
                if reason == "error":
                    result.error = f"{params.get('error_type')}: {params.get('error')}"
                elif reason is not None:
                    result.finish_reason = reason
                    result.stats = {
                        k: int(v) for k, v in params.items() if str(v).lstrip("-").isdigit()
                    }
    except Exception as exc:  # a client's failure is the row's finding, not the benchmark's
        barrier.abort()  # the others stop waiting for a client that will not come
        result.error = result.error or f"{type(exc).__name__}: {exc}"


_POLLER = """
import json, sys, threading, time
import httpx
url, every = sys.argv[1], float(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies, failures = [], 0
with httpx.Client(timeout=5.0) as client:
    while True:  # one poll at once: a row shorter than the interval still gets one
        start = time.perf_counter()
        try:
            ok = client.get(url).status_code == 200
        except httpx.HTTPError:
            ok = False
        latencies.append(time.perf_counter() - start)
        failures += not ok
        if stop.wait(every):
            break
print(json.dumps({"latencies": latencies, "failures": failures}))
"""


class ReadyPoller:
    """``GET /v2/health/ready`` every 50 ms from a process of its own: the slowest answer,
    and how many were not 200 (a busy model must not starve the server's event loop). Not a
    thread of the benchmark: its client threads would hold the GIL the poller needs to
    read its answer, and their delays would count as the server's."""

    def __init__(self, url: str):
        self.url = f"{url}/v2/health/ready"
        self.latencies: list[float] = []
        self.failures = 0
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> ReadyPoller:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _POLLER, self.url, str(READY_POLL_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        out, _ = self._proc.communicate(input="", timeout=30)  # closing stdin stops it
        result = json.loads(out)
        self.latencies, self.failures = result["latencies"], result["failures"]


def run_clients(
    server: Server, prompts: list[list[int]], tokens: int, transport: str, timeout: float
) -> list[ClientResult]:
    """One thread per prompt, released together; each bounded by the request ``timeout``."""
    clients = len(prompts)
    barrier = threading.Barrier(clients)
    results = [ClientResult(i) for i in range(clients)]
    threads = [
        threading.Thread(
            target=run_client,
            args=(
                server,
                transport,
                request_body(prompts[i], tokens),
                barrier,
                results[i],
                timeout,
            ),
            name=f"client-{i}",
            daemon=True,  # one stuck past its deadline must not keep the benchmark alive
        )
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 90
    for thread, result in zip(threads, results, strict=True):
        thread.join(timeout=max(deadline - time.monotonic(), 0))
        if thread.is_alive():
            result.error = result.error or "still running past the request timeout"
    return results


def warm_up(server: Server, prompt: list[int], timeout: float) -> None:
    """One short request outside the row: first-request costs (thread pools, first mappings)
    are not what the row measures. Its prompt should be no client's."""
    body = request_body(prompt, 2)
    result = ClientResult(-1)
    run_client(server, "sse", body, threading.Barrier(1), result, timeout)
    if result.error:
        raise RuntimeError(f"warm-up request failed: {result.error}")
