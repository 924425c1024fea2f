"""MLServer driven exactly as Seldon Core v2's agent drives it. What the agent does, read in
SeldonIO/seldon-core (paths there):

- the ``mlserver`` container of the stock ServerConfig
  (``k8s/helm-charts/seldon-core-v2-setup/templates/_components-statefulsets.tpl``) runs
  with ports 9000/9500 (free ports here), ``MLSERVER_MODELS_DIR=/mnt/agent/models``,
  ``MLSERVER_MODEL_PARALLEL_WORKERS=1``, ``MLSERVER_LOAD_MODELS_AT_STARTUP=false``,
  ``MLSERVER_GRPC_MAX_MESSAGE_LENGTH=1048576000`` and no settings.json; the server-level
  ``parallel_workers`` keeps MLServer's default, 1. Streaming needs
  ``MLSERVER_PARALLEL_WORKERS=0`` and ``MLSERVER_GZIP_ENABLED=false``, set in the Server's
  ``spec.podSpec`` (containers are merged by name).
- for each Model (``scheduler/pkg/agent/agent_svc_manager.go``,
  ``repository/model_repository.go``, ``repository/mlserver/mlserver.go``, ``pkg/util``):
  the storageUri folder is copied to ``<models dir>/<model>_<version>/1/``; its
  model-settings.json goes through a Go struct (unknown fields dropped), gets
  ``name = <model>_<version>`` and ``parameters.version = "1"`` (pinned), and
  ``spec.parameters`` as strings in ``parameters.extra``; then gRPC
  ``inference.GRPCInferenceService/RepositoryModelLoad``
  (``modelserver_controlplane/oip/v2.go``), later ``RepositoryModelUnload`` and the folder
  removed.

One Model goes through a rolling update, once with its chunk store in S3 (the moto server)
and once on a mounted directory: version 1 loads and streams exactly over SSE and gRPC,
models that cannot load are refused with a status that says why while version 1 keeps
serving, version 2 loads while a version 1 stream is in flight, version 1 unloads and gives
back its threads and mappings, the server's RSS back within 10% of what it was with one
model. The numbers are logged and written to ``seldon-agent-<store>.json`` in the test's
temporary folder. With the stock environment (parallel workers on) the load is refused at
once, naming the variable to set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import shutil
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import dataplane_pb2_grpc as pb_grpc
from mlserver.grpc import utils as grpc_utils
from mlserver.handlers.model_repository import ModelRepositoryHandlers
from mlserver.parallel.registry import InferencePoolRegistry
from mlserver.parallel.worker import Worker
from mlserver.settings import ModelSettings, Settings
from mlserver_proc import MLServerProcess, free_ports, metric_samples
from reference import Reference
from remote_servers import S3Server
from test_e2e import split

from layerstream.chunker.model_settings import IMPLEMENTATION
from layerstream.errors import (
    ChunkIntegrityError,
    ChunkStoreError,
    LayerStreamError,
    ManifestError,
    SettingsError,
)
from layerstream.serving import grpc_status, workers
from layerstream.serving.settings import LayerStreamSettings
from layerstream.stores.ranged import Transient
from layerstream_client import GRPCClient, SSEClient

pytest_plugins = ["mlserver_proc"]

log = logging.getLogger(__name__)

IDS = [7, 42, 99, 150, 200, 11, 11, 300, 5]
N = 8
LONG = 32  # the in-flight stream: max_new_tokens_limit below
S3_STORE = "s3://models/llama"
READY_TIMEOUT_S = 90.0
# bounds on waiting for an event (a stream's events, threads ending after an unload),
# reached only if the code under test hangs
WAIT_S = 120.0
SETTLE_TIMEOUT_S = 120.0
REPORT_SETTLE_S = 15.0  # the same wait for a number that is only reported
MiB = 1 << 20

# The Model's spec.parameters: strings, as the agent writes them
PARAMETERS = {"memory_budget": "25%", "torch_threads": "1", "max_new_tokens_limit": str(LONG)}
# What a user adds to the Server's spec.podSpec for streaming (Seldon Core 2.9's docs)
STREAMING_POD_ENV = {"MLSERVER_PARALLEL_WORKERS": "0", "MLSERVER_GZIP_ENABLED": "false"}
# The fields of the agent's Go ModelSettings struct (mlserver.go): all that survives a rewrite
GO_FIELDS = {"name", "inputs", "outputs", "platform", "versions", "parallel_workers"}
GO_FIELDS |= {"implementation", "parameters"}
GO_PARAMETERS = {"uri", "version", "format", "content_type", "extra", "environment_tarball"}


# -- the pod and the agent -------------------------------------------------------------------


def seldon_env(server: MLServerProcess, models_dir: Path) -> dict[str, str]:
    """The stock ServerConfig's mlserver container environment (ports: free ones here, 9000
    and 9500 there), plus a free metrics port and a loopback host (MLServer's defaults, 8082
    on all interfaces, may be taken on a shared machine)."""
    return {
        "MLSERVER_HTTP_PORT": str(server.http_port),
        "MLSERVER_GRPC_PORT": str(server.grpc_port),
        "MLSERVER_MODELS_DIR": str(models_dir),
        "MLSERVER_MODEL_PARALLEL_WORKERS": "1",
        "MLSERVER_LOAD_MODELS_AT_STARTUP": "false",
        "MLSERVER_GRPC_MAX_MESSAGE_LENGTH": "1048576000",
        "MLSERVER_METRICS_PORT": str(server.metrics_port),
        "MLSERVER_HOST": "127.0.0.1",
    }


class Agent:
    """What Seldon's agent does to MLServer: lays out model folders, loads, unloads."""

    def __init__(self, models_dir: Path, server: MLServerProcess, channel: grpc.Channel):
        self.models_dir, self.server = models_dir, server
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def place(self, model: str, version: int, parameters: dict[str, str]) -> str:
        """The storageUri folder (a model-settings.json naming the runtime) copied and
        rewritten as the agent does; returns the name MLServer knows the model by."""
        name = f"{model}_{version}"
        folder = self.models_dir / name / "1"
        folder.mkdir(parents=True)
        source = {"name": model, "implementation": IMPLEMENTATION}
        text = json.dumps(rewritten(source, name, parameters))
        (folder / "model-settings.json").write_text(text)
        return name

    def load(self, name: str, timeout: float = 120.0) -> None:
        request = pb.RepositoryModelLoadRequest(model_name=name)
        self.stub.RepositoryModelLoad(request, timeout=timeout)

    def unload(self, name: str) -> None:
        request = pb.RepositoryModelUnloadRequest(model_name=name)
        self.stub.RepositoryModelUnload(request, timeout=60)
        self.remove(name)

    def remove(self, name: str) -> None:
        shutil.rmtree(self.models_dir / name)


def rewritten(source: dict[str, Any], name: str, parameters: dict[str, str]) -> dict[str, Any]:
    """model-settings.json after the agent's round trip through its Go struct."""
    assert all(isinstance(v, str) for v in parameters.values()), "spec.parameters are strings"
    settings = {k: v for k, v in source.items() if k in GO_FIELDS}
    params = {k: v for k, v in settings.get("parameters", {}).items() if k in GO_PARAMETERS}
    params["version"] = "1"
    params["extra"] = {**params.get("extra", {}), **parameters}
    return {**settings, "name": name, "parameters": params}


@contextlib.contextmanager
def pod(root: Path, pod_env: dict[str, str], env: dict[str, str]) -> Iterator[Agent]:
    """``mlserver start $MLSERVER_MODELS_DIR`` (the image's command) with Seldon's
    environment plus ``pod_env``, and the agent beside it."""
    models_dir = root / "mnt" / "agent" / "models"
    models_dir.mkdir(parents=True)
    # MLServerProcess writes a repository with a settings.json of its own; the pod starts
    # on the models dir instead, which has none (MLServer would prefer it to the variables)
    server = MLServerProcess(root / "pod", [], env=env)
    server.repo = models_dir
    server.extra_env.update(seldon_env(server, models_dir) | pod_env)
    server.start()
    try:
        wait_serving(server)
        with grpc.insecure_channel(server.grpc_target) as channel:
            yield Agent(models_dir, server, channel)
    finally:
        server.stop()


def wait_serving(server: MLServerProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=5.0) as client:
        while True:
            if not server.alive():
                raise RuntimeError(f"mlserver exited; log tail:\n{server.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{server.http_url}/v2/health/ready").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlserver not serving; log tail:\n{server.log_tail()}")
            time.sleep(0.2)  # polling interval, not a timing assertion
    with grpc.insecure_channel(server.grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)


# -- what the server does --------------------------------------------------------------------


def stream(server: MLServerProcess, model: str, transport: str, n: int = N) -> list[int]:
    client = (
        SSEClient(server.http_url, timeout=60)
        if transport == "sse"
        else GRPCClient(server.grpc_target, timeout=60)
    )
    tokens, _, _ = split(list(client.generate(model, input_ids=IDS, max_new_tokens=n)))
    return [t.token_id for t in tokens]


class InFlight(threading.Thread):
    """An SSE stream on its own thread that reads its first event, then reads no further
    until ``go_on`` is set; ``arrivals`` are its events' monotonic times."""

    def __init__(self, server: MLServerProcess, model: str, n: int):
        super().__init__(daemon=True)
        self.server, self.model, self.n = server, model, n
        self.events: list[Any] = []
        self.arrivals: list[float] = []
        self.first = threading.Event()
        self.go_on = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = SSEClient(self.server.http_url, timeout=WAIT_S)
            for event in client.generate(self.model, input_ids=IDS, max_new_tokens=self.n):
                self.events.append(event)
                self.arrivals.append(time.monotonic())
                if not self.first.is_set():
                    self.first.set()
                    assert self.go_on.wait(WAIT_S), "the test never let the stream go on"
        except BaseException as exc:  # handed to the test thread, which raises it
            self.error = exc
        finally:
            self.first.set()

    def token_ids(self) -> list[int]:
        if self.error is not None:
            raise self.error
        tokens, _, _ = split(self.events)
        return [t.token_id for t in tokens]


@dataclass(frozen=True)
class ProcessState:
    rss_mib: float
    threads: int
    maps: tuple[str, ...]  # mapped file paths

    def mapping(self, folder: Path) -> list[str]:
        return [path for path in self.maps if path.startswith(f"{folder}/")]


def process_state(pid: int) -> ProcessState:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    maps = (line.split(maxsplit=5) for line in Path(f"/proc/{pid}/maps").read_text().splitlines())
    return ProcessState(
        rss_mib=int(status["VmRSS"].split()[0]) * 1024 / MiB,
        threads=int(status["Threads"]),
        maps=tuple(sorted({fields[5] for fields in maps if len(fields) == 6})),
    )


def settled(pid: int, threads_at_most: int, timeout: float = SETTLE_TIMEOUT_S) -> ProcessState:
    """The state once the server's thread count is down to ``threads_at_most`` (an unloaded
    engine's threads end after the call returns), or as it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (state := process_state(pid)).threads > threads_at_most:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)  # polling interval, not a timing assertion
    return state


def load_refused(agent: Agent, name: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        agent.load(name, timeout=60)
    agent.remove(name)
    return caught.value


# -- stores ----------------------------------------------------------------------------------


@dataclass
class Stores:
    """Where a Model's versions keep their chunks, as ``chunk_store`` parameters."""

    kind: str
    v1: str
    v2: str
    missing: str  # a chunk_store with nothing there
    parameters: dict[str, str]  # what every Model of this kind adds to PARAMETERS
    env: dict[str, str]  # the pod's environment (credentials)
    unreachable: dict[str, str] | None = None  # parameters of a store that never answers


@pytest.fixture(scope="module")
def llama(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="module")
def reference(llama) -> dict[int, list[int]]:
    ref = Reference(llama)
    return {N: ref.greedy(IDS, N), LONG: ref.greedy(IDS, LONG)}


@pytest.fixture(scope="module")
def s3_stores(llama, tmp_path_factory) -> Iterator[Stores]:
    s3 = S3Server(tmp_path_factory.mktemp("s3")).start()
    try:
        s3.chunk(llama.source, S3_STORE, "llama")
        (closed,) = free_ports(1)
        yield Stores(
            kind="s3",
            v1=S3_STORE,
            v2=S3_STORE,
            missing="s3://models/no-such-model",
            parameters={"s3_endpoint_url": s3.endpoint},
            env=s3.env(),
            unreachable={
                "chunk_store": S3_STORE,
                "s3_endpoint_url": f"http://127.0.0.1:{closed}",
                "store_connect_timeout_s": "0.5",
                "store_deadline_s": "1",
            },
        )
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def mounted_stores(llama, tmp_path_factory) -> Stores:
    """Volumes mounted into the pod, outside the models dir: one per version, so that the
    files version 1 maps are its own."""
    mounts = tmp_path_factory.mktemp("volumes")
    for version in ("v1", "v2"):
        shutil.copytree(llama.store, mounts / version / "llama")
    return Stores(
        kind="mounted",
        v1=str(mounts / "v1" / "llama"),
        v2=str(mounts / "v2" / "llama"),
        missing=str(mounts / "not-mounted" / "llama"),
        parameters={},
        env={},
    )


# -- the agent's path ------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["s3", "mounted"])
def test_a_model_version_loads_streams_is_replaced_and_unloads_as_seldon_drives_it(
    kind, request, reference, tmp_path
):
    stores: Stores = request.getfixturevalue(f"{kind}_stores")
    with pod(tmp_path, STREAMING_POD_ENV, stores.env) as agent:
        server = agent.server
        pid = server.proc.pid
        numbers: dict[str, Any] = {"store": kind, "empty": process_state(pid)}

        v1 = agent.place("llama", 1, settings(stores, stores.v1))
        agent.load(v1)
        for transport in ("sse", "grpc"):
            assert stream(server, v1, transport) == reference[N], transport
        # the agent's rewrite keeps no inputs or outputs: the runtime declares them at load
        metadata = httpx.get(f"{server.http_url}/v2/models/{v1}", timeout=10).json()
        assert [i["name"] for i in metadata["inputs"]] == ["prompt", "messages", "input_ids"]
        assert "token_id" in {o["name"] for o in metadata["outputs"]}
        refuse_broken_models(agent, stores, v1, reference[N])

        before = numbers["before v2 load"] = process_state(pid)
        v2 = agent.place("llama", 2, settings(stores, stores.v2))
        load_during_a_stream(agent, v2, v1, reference[LONG], numbers)
        for transport in ("sse", "grpc"):
            assert stream(server, v2, transport) == reference[N], transport
        two = numbers["v1 and v2"] = process_state(pid)

        agent.unload(v1)
        after = numbers["after v1 unload"] = settled(pid, before.threads)
        ready = httpx.get(f"{server.http_url}/v2/models/{v1}/ready", timeout=10)
        assert ready.status_code != 200
        assert stream(server, v2, "grpc") == reference[N]
        # version 1's series left /metrics with it; version 2's stay
        served = {
            dict(labels).get("model_name")
            for name, labels in metric_samples(server.metrics_url)
            if name.startswith("layerstream_")
        }
        assert v1 not in served and v2 in served, served

        agent.unload(v2)
        released = two.threads - after.threads  # as many as version 1 gave back
        # reported, not asserted: a short bound (version 2 may hold fewer threads)
        numbers["after v2 unload"] = settled(pid, after.threads - released, REPORT_SETTLE_S)
        report(tmp_path, numbers)

    # version 1 gave back what it held: the server is where it was with one model
    summary = describe(numbers)
    assert abs(after.rss_mib - before.rss_mib) <= 0.10 * before.rss_mib, summary
    assert after.threads <= before.threads, summary
    if kind == "mounted":  # a remote store maps no files
        v1_files, v2_files = Path(stores.v1), Path(stores.v2)
        assert two.mapping(v1_files) and two.mapping(v2_files), summary  # the probe sees them
        assert not after.mapping(v1_files), after.mapping(v1_files)
        assert after.mapping(v2_files), summary


def load_during_a_stream(
    agent: Agent, loading: str, serving: str, expected: list[int], numbers: dict[str, Any]
) -> None:
    """Load ``loading`` while a stream of ``serving`` is under way; the stream is exact.

    The stream is under way by construction, not by racing the engine: its client reads the
    first event, then nothing more until the load has returned, so the stream stays open
    across the whole load however fast the engine generates the rest. (Nothing can hold
    the engine of a mounted store: this is as much overlap as the test can make certain.)"""
    flight = InFlight(agent.server, serving, len(expected))
    flight.start()
    try:
        assert flight.first.wait(WAIT_S), "the stream never started"
        sent = time.monotonic()
        agent.load(loading)
        numbers["v2 load s"] = time.monotonic() - sent
    finally:
        flight.go_on.set()
    flight.join(WAIT_S)
    assert not flight.is_alive(), "the stream never ended"
    assert flight.token_ids() == expected
    late = numbers["v1 events after the v2 load was sent"] = sum(t > sent for t in flight.arrivals)
    assert late == len(flight.events) - 1  # all but the first: read once the load returned


def settings(stores: Stores, chunk_store: str) -> dict[str, str]:
    return {"chunk_store": chunk_store, **PARAMETERS, **stores.parameters}


def refuse_broken_models(agent: Agent, stores: Stores, serving: str, expected: list[int]):
    """Models that cannot load get a status that says why, and the server keeps serving."""
    broken = [
        ("missing", settings(stores, stores.missing), "does not exist"),
        (
            "bad-setting",
            {**settings(stores, stores.v1), "memory_budget": "lots"},
            "memory_budget",
        ),
    ]
    for model, parameters, words in broken:
        error = load_refused(agent, agent.place(model, 1, parameters))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
        assert words in error.details(), error.details()
        assert agent.server.alive()
        assert stream(agent.server, serving, "sse") == expected
    if stores.unreachable is not None:  # retrying may work: the one load error that says so
        name = agent.place("unreachable", 1, {**PARAMETERS, **stores.unreachable})
        error = load_refused(agent, name)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "gave up after" in error.details(), error.details()
        assert stream(agent.server, serving, "grpc") == expected


def report(folder: Path, numbers: dict[str, Any]) -> None:
    plain = {
        key: value.__dict__ | {"maps": len(value.maps)}
        if isinstance(value, ProcessState)
        else value
        for key, value in numbers.items()
    }
    path = folder / f"seldon-agent-{numbers['store']}.json"
    path.write_text(json.dumps(plain, indent=1))
    log.info("%s (%s)", describe(numbers), path)


def describe(numbers: dict[str, Any]) -> str:
    states = (
        f"{key}: {value.rss_mib:.0f} MiB, {value.threads} threads"
        for key, value in numbers.items()
        if isinstance(value, ProcessState)
    )
    return f"server with a {numbers['store']} store: " + "; ".join(states)


# -- parallel workers ------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_stock_parallel_workers_refuse_the_load_at_once_naming_the_variable(
    mounted_stores, tmp_path
):
    """Seldon's stock environment leaves MLServer's parallel workers on (its default, 1):
    the load used to wait for the client's deadline; now it fails with the fix."""
    with pod(tmp_path, {}, {}) as agent:
        name = agent.place("llama", 1, settings(mounted_stores, mounted_stores.v1))
        started = time.monotonic()
        error = load_refused(agent, name)  # a hang would end in DEADLINE_EXCEEDED
        took = time.monotonic() - started
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, (error.details(), took)
        assert "MLSERVER_PARALLEL_WORKERS=0" in error.details()
        assert error.details().startswith("configuration: ")
        assert "MLSERVER_PARALLEL_WORKERS=0" in agent.server.log_text()
        assert agent.server.alive()
        log.info("parallel workers: the load was refused in %.1fs", took)


def test_a_worker_process_refuses_the_model(monkeypatch):
    """A model with an environment_tarball is built only in the worker process."""
    worker = Worker(Settings(), multiprocessing.Queue())
    monkeypatch.setattr(multiprocessing, "current_process", lambda: worker)
    with pytest.raises(SettingsError, match=r"MLSERVER_PARALLEL_WORKERS=0"):
        workers.refuse_parallel_workers(model_settings())


@pytest.mark.parametrize(("handed_over", "refused"), [(True, True), (False, False)])
def test_the_server_process_refuses_models_it_hands_to_its_workers(handed_over, refused):
    """MLServer's own initialiser decides; a model it keeps in the server process (a
    model-level ``parallel_workers: 0``) is built as usual."""
    registry = types.SimpleNamespace(_should_load_model=lambda settings: handed_over)
    build = InferencePoolRegistry.model_initialiser
    if refused:
        with pytest.raises(SettingsError, match="parallel worker"):
            build(registry, model_settings())
    else:
        assert build(registry, model_settings()).name == "llama_1"


def model_settings() -> ModelSettings:
    return ModelSettings(
        name="llama_1",
        implementation=IMPLEMENTATION,
        parameters={"version": "1", "extra": {"chunk_store": "/nowhere"}},
    )


# -- load statuses ---------------------------------------------------------------------------


def gave_up() -> ChunkStoreError:
    try:
        raise ChunkStoreError("s3://b/manifest.json: gave up after 3 attempt(s)") from Transient()
    except ChunkStoreError as error:
        return error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SettingsError("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (ChunkStoreError("the store does not exist"), grpc.StatusCode.FAILED_PRECONDITION),
        (ManifestError("no manifest.json"), grpc.StatusCode.FAILED_PRECONDITION),
        (ChunkIntegrityError("sha256 mismatch"), grpc.StatusCode.FAILED_PRECONDITION),
        (gave_up(), grpc.StatusCode.UNAVAILABLE),
        (LayerStreamError("a bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_a_failed_load_says_whether_the_model_or_the_moment_is_wrong(error, code):
    assert grpc_status.load_status(error) == code


def test_only_errors_from_the_repository_load_get_load_statuses():
    """The same error keeps its inference status outside a load."""
    grpc_status.install()

    class Repository:
        async def find(self, name):
            raise ManifestError(f"{name}: no manifest.json")

    handlers = ModelRepositoryHandlers(repository=Repository(), model_registry=None)
    with pytest.raises(ManifestError) as caught:
        asyncio.run(handlers.load("llama_1"))
    assert grpc_utils._grpc_status_code(caught.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert grpc_utils._grpc_status_code(ManifestError("x")) == grpc.StatusCode.INTERNAL
    grpc_status.install()  # idempotent: the wrapper is not wrapped again
    assert grpc_utils._grpc_status_code.__wrapped__.__module__ == "mlserver.grpc.utils"


# -- settings as the agent writes them -------------------------------------------------------

AS_STRINGS = {
    "chunk_store": ("s3://models/llama", "s3://models/llama"),
    "memory_budget": ("25%", "25%"),
    "read_ahead": ("2", 2),
    "io_threads": ("3", 3),
    "torch_threads": ("1", 1),
    "verify_checksums": ("always", "always"),
    "verify_in_background": ("false", False),
    "reader": ("read", "read"),
    "expert_streaming": ("on", "on"),
    "expert_prefetch": ("false", False),
    "expert_cache_in_place": ("true", True),
    "pin_in_background": ("false", False),
    "max_new_tokens_limit": ("32", 32),
    "default_max_new_tokens": ("16", 16),
    "max_queued_requests": ("5", 5),
    "max_active_sequences": ("2", 2),
    "kv_cache_budget": ("1MiB", "1MiB"),
    "request_timeout_s": ("30.5", 30.5),
    "max_prompt_bytes": ("4096", 4096),
    "store_connect_timeout_s": ("1", 1.0),
    "store_read_timeout_s": ("2", 2.0),
    "store_deadline_s": ("3", 3.0),
    "store_max_concurrency": ("4", 4),
    "store_part_size": ("1MiB", "1MiB"),
    "s3_endpoint_url": ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    "s3_region": ("eu-west-1", "eu-west-1"),
    "s3_profile": ("serving", "serving"),
    "s3_addressing_style": ("path", "path"),
    "http_headers": ('{"X-Team": "ml"}', {"X-Team": "ml"}),
    "http_bearer_token": ("t0k3n", "t0k3n"),
    "http_verify_tls": ("false", False),
    "http_ca_bundle": ("/etc/ssl/ca.pem", "/etc/ssl/ca.pem"),
    "cache_dir": ("/cache", "/cache"),
    "cache_size": ("1GiB", "1GiB"),
}


def test_every_setting_takes_the_string_the_agent_writes():
    """Model.spec.parameters reach parameters.extra as strings: every setting reads its
    string form (a new setting must be added here)."""
    assert set(AS_STRINGS) == set(LayerStreamSettings.model_fields)
    read = LayerStreamSettings.from_extra({k: text for k, (text, _) in AS_STRINGS.items()})
    for name, (_, value) in AS_STRINGS.items():
        got = getattr(read, name)
        got = got.get_secret_value() if hasattr(got, "get_secret_value") else got
        assert got == value and type(got) is type(value), (name, got)
    auto = {k: "auto" for k in ("read_ahead", "io_threads", "torch_threads", "max_prompt_bytes")}
    read = LayerStreamSettings.from_extra({"chunk_store": "/x", **auto})
    assert all(getattr(read, name) == "auto" for name in auto)


def test_the_rewrite_keeps_only_what_the_agent_knows():
    source = {"name": "llama", "implementation": IMPLEMENTATION, "max_batch_size": 4}
    source["parameters"] = {"environment_path": "/env", "extra": {"reader": "read"}}
    assert rewritten(source, "llama_3", {"chunk_store": "/c"}) == {
        "name": "llama_3",
        "implementation": IMPLEMENTATION,
        "parameters": {"version": "1", "extra": {"reader": "read", "chunk_store": "/c"}},
    }
