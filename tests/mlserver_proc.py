"""Run a real ``mlserver start`` subprocess on a temporary model repository.

Not a conftest: test modules load it with ``pytest_plugins = ["mlserver_proc"]``, which
registers :func:`layerstream_server` once for the whole session (importing the fixture into
two modules would start two servers), and import the helpers they need. The server is
started in its own process group and stopped by that group's id (SIGTERM, then SIGKILL),
never by name. Everything it writes (log, .metrics, .envs) stays in a temporary folder.

It also registers :func:`gated_layerstream_server`, for tests that must hold the engine
where they say (a request that cannot end before its client leaves, requests that are all in
flight before any can finish) instead of racing its speed: its store's block reads pass a
gate the test closes and opens, and a hook in the server logs each request joining the
sweeps.

PYTEST_DONT_REWRITE: the test modules import this module before pytest loads it as a
plugin, too late for assertion rewriting (pytest would warn about it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from layerstream.chunker.model_settings import model_settings

HOST = "127.0.0.1"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
WAIT_S = 120.0  # bound on waiting for an event; reached only if the code under test hangs
POLL_S = 0.05  # polling interval of bounded polls, not a timing assertion


@dataclass
class ModelSpec:
    """One model folder in the repository.

    ``store_mode``: ``"absolute"`` puts the store's absolute path in model-settings.json;
    ``"symlink"``/``"copy"`` place the store in the model folder as ``chunks`` and use the
    relative ``./chunks``; ``"raw"`` writes ``store`` as given (e.g. a missing path).
    """

    name: str
    store: Path | str
    extra: dict[str, Any] = field(default_factory=dict)
    store_mode: str = "absolute"
    version: str | None = None  # parameters.version; its folder is then NAME-vVERSION

    @property
    def folder(self) -> str:
        return self.name if self.version is None else f"{self.name}-v{self.version}"


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all bound at once, so never the same twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def mlserver_executable() -> str:
    """The ``mlserver`` console script of the interpreter running the tests."""
    path = os.path.join(os.path.dirname(sys.executable), "mlserver")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no mlserver console script next to {sys.executable}")
    return path


def write_repository(root: Path, models: list[ModelSpec], ports: tuple[int, int, int]) -> Path:
    """settings.json plus one ``NAME/model-settings.json`` per model; returns the repo dir."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    http_port, grpc_port, metrics_port = ports
    settings = {
        "debug": False,
        "parallel_workers": 0,
        "gzip_enabled": False,
        "host": HOST,
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
    }
    (repo / "settings.json").write_text(json.dumps(settings, indent=2))
    for spec in models:
        folder = repo / spec.folder
        folder.mkdir()
        if spec.store_mode == "absolute":
            uri = str(Path(spec.store).resolve())
        elif spec.store_mode == "symlink":
            (folder / "chunks").symlink_to(Path(spec.store).resolve(), target_is_directory=True)
            uri = "./chunks"
        elif spec.store_mode == "copy":
            shutil.copytree(spec.store, folder / "chunks")
            uri = "./chunks"
        elif spec.store_mode == "raw":
            uri = str(spec.store)
        else:
            raise ValueError(f"unknown store_mode {spec.store_mode!r}")
        content = model_settings(spec.name, uri, spec.extra)
        if spec.version is not None:
            content["parameters"]["version"] = spec.version
        (folder / "model-settings.json").write_text(json.dumps(content, indent=2))
    return repo


class MLServerProcess:
    """A started ``mlserver start REPO``; use :func:`serve` or :meth:`start` + :meth:`stop`."""

    def __init__(self, root: Path, models: list[ModelSpec], env: dict[str, str] | None = None):
        self.root = Path(root)
        self.extra_env = dict(env or {})  # e.g. credentials, as a pod gets them
        # run in the child before it execs mlserver (the benchmark joins a cgroup there)
        self.before_exec: Callable[[], None] | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self.models = models
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.repo = write_repository(
            self.root, models, (self.http_port, self.grpc_port, self.metrics_port)
        )
        self.log_path = self.root / "mlserver.log"
        self.proc: subprocess.Popen | None = None
        self.chunked: dict[str, Any] = {}  # served name -> conftest ChunkedModel, if known
        self.gate: Any = None  # the Gate of a gated server's store (gated_layerstream_server)

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def start(self) -> MLServerProcess:
        env = dict(os.environ)
        env.update(
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            # Never reach out: the fixture models are local and have a local tokenizer.
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        env.update(self.extra_env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [mlserver_executable(), "start", str(self.repo)],
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self.before_exec,
            )
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, names: list[str] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        """Until ``GET /v2/models/NAME/ready`` (``.../versions/VERSION/ready`` for a versioned
        model) is 200 for every model; fail with the log tail if the process exits or the
        timeout passes."""
        if names is None:
            names = [m.name + (f"/versions/{m.version}" if m.version else "") for m in self.models]
        pending = list(names)
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            while pending:
                if not self.alive():
                    raise RuntimeError(
                        f"mlserver exited with {self.proc.returncode if self.proc else None} "
                        f"before {pending} were ready; log tail:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{pending} not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}"
                    )
                name = pending[0]
                try:
                    ready = client.get(f"{self.http_url}/v2/models/{name}/ready")
                except httpx.TransportError:
                    ready = None
                if ready is not None and ready.status_code == 200:
                    pending.pop(0)
                else:
                    time.sleep(0.2)  # polling interval, not a timing assertion

    def wait_pinned(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every model's metadata says its pinned blocks, read in the background after
        it became ready, are all in memory (``pinned_bytes`` == ``pinned_bytes_target``)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5.0) as client:
            for model in self.models:
                while True:
                    params = client.get(f"{self.http_url}/v2/models/{model.name}").json()
                    params = params["parameters"]
                    if params["pinned_bytes"] == params["pinned_bytes_target"]:
                        break
                    assert time.monotonic() < deadline, f"{model.name}: the fill never ended"
                    time.sleep(0.2)  # polling interval, not a timing assertion

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if the process is still running after ``timeout``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the process group this object started, SIGKILL it after ``timeout``."""
        proc = self.proc
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session: the group id is the child's pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        # Children that outlived the leader (none expected with parallel_workers=0).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        return proc.returncode


@contextlib.contextmanager
def serve(
    root: Path,
    models: list[ModelSpec],
    timeout: float = READY_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> Iterator[MLServerProcess]:
    """Start a server for ``models``, wait until all are ready, stop it on exit."""
    server = MLServerProcess(root, models, env).start()
    try:
        server.wait_ready(timeout=timeout)
        yield server
    finally:
        server.stop()


# -- the shared server ---------------------------------------------------------------------

LLAMA = "llama"  # fully resident (100%), served from ./chunks (a symlink into the model folder)
LLAMA_25 = "llama-25"  # the same store at a 25% budget: most blocks stream on every request
GPT2 = "gpt2"
BERT = "bert"  # encoder: hidden_states and embedding modes only
MAX_NEW_TOKENS_LIMIT = 32  # configured on LLAMA_25
SOURCES = {LLAMA: "llama", LLAMA_25: "llama", GPT2: "gpt2", BERT: "bert"}


@pytest.fixture(scope="session")
def layerstream_server(model_factory, tmp_path_factory) -> Iterator[MLServerProcess]:
    """One ``mlserver start`` serving all four models for the e2e and error tests.

    ``server.chunked[name]`` is the conftest ChunkedModel behind each served model.
    torch_threads=1 keeps the server's reductions in the order of the in-process reference
    models (conftest sets one thread too), so results can be compared exactly.
    """
    chunked = {name: model_factory(source) for name, source in SOURCES.items()}
    specs = [
        ModelSpec(
            LLAMA,
            chunked[LLAMA].store,
            {"memory_budget": "100%", "torch_threads": 1},
            store_mode="symlink",
        ),
        ModelSpec(
            LLAMA_25,
            chunked[LLAMA_25].store,
            {
                "memory_budget": "25%",
                "read_ahead": 1,
                "torch_threads": 1,
                "max_new_tokens_limit": MAX_NEW_TOKENS_LIMIT,
            },
        ),
        ModelSpec(GPT2, chunked[GPT2].store, {"torch_threads": 1}),
        ModelSpec(BERT, chunked[BERT].store, {"torch_threads": 1}),
    ]
    with serve(tmp_path_factory.mktemp("mlserver"), specs) as server:
        server.chunked = chunked
        # the tests count block runs and bytes of the steady state, from the first request
        server.wait_pinned()
        yield server


# -- the gated server ------------------------------------------------------------------------

GATED = "llama-gated"  # LLAMA_25's weights and settings, streamed from a gated HTTP store
JOINED = "test hook: a request joined the sweeps"
# sitecustomize.py of the gated server: logs each request joining the sweeps (the engine's
# rendezvous, engine/sweeps.py), which nothing else in the server tells from outside
JOIN_HOOK = f"""
import logging

from layerstream.engine import sweeps

_join = sweeps.SweepGroup.join


def join(self, *args, **kwargs):
    rider = _join(self, *args, **kwargs)
    logging.getLogger("layerstream.tests").info("{JOINED} (%d in flight)", self.members)
    return rider


sweeps.SweepGroup.join = join
"""


@pytest.fixture(scope="session")
def gated_layerstream_server(model_factory, tmp_path_factory) -> Iterator[MLServerProcess]:
    """One ``mlserver start`` serving :data:`GATED`: the llama fixture model at a 25% budget,
    read-ahead 1, one torch thread (LLAMA_25's settings), its blocks read over HTTP through
    ``server.gate`` (tests/test_overload.py's Gate: closed, it holds every block read until
    opened, or lets ``allow`` more through first). Tests leave it open, and the model idle.
    Its log has a :data:`JOINED` line for each request that joins the sweeps."""
    from test_overload import GatedStore  # imported here: that module imports this one

    llama = model_factory("llama")
    store = GatedStore(llama.store).start()
    root = tmp_path_factory.mktemp("mlserver-gated")
    env = hooked(root, JOIN_HOOK)
    extra = {
        "memory_budget": "25%",
        "read_ahead": 1,
        "torch_threads": 1,
        "max_new_tokens_limit": MAX_NEW_TOKENS_LIMIT,
        # a held read must not time out: the test, not a clock, lets it go
        "store_read_timeout_s": 600,
        "store_deadline_s": 600,
    }
    spec = ModelSpec(GATED, store.url, extra, store_mode="raw")
    try:
        with serve(root / "server", [spec], env=env) as server:
            server.chunked = {GATED: llama}
            server.gate = store.gate
            yield server
    finally:
        store.stop()


def hooked(root: Path, code: str) -> dict[str, str]:
    """The environment of a server that runs ``code`` at startup (its sitecustomize.py,
    written under ``root``): test hooks the server has no other way to take."""
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """A bounded poll of something only the server can tell (a metric, a log line)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(POLL_S)


def log_lines(server: MLServerProcess, pattern: str) -> list[int]:
    """Indexes of the server log lines that match ``pattern``."""
    lines = server.log_text().splitlines()
    return [i for i, line in enumerate(lines) if re.search(pattern, line)]


def joined(server: MLServerProcess) -> int:
    """How many requests have joined the sweeps of the gated server (its hook's lines)."""
    return len(log_lines(server, re.escape(JOINED)))


def active(server: MLServerProcess, model: str) -> float:
    """``layerstream_active_sequences`` of ``model``: requests admitted and not yet ended."""
    samples = metric_samples(server.metrics_url)
    return samples.get(("layerstream_active_sequences", labels(model)), 0.0)


def wait_idle(server: MLServerProcess, model: str) -> None:
    """Until no request of ``model`` runs (one an earlier test left stops at a block)."""
    wait_until(lambda: active(server, model) == 0, f"{model} to be idle")


# -- raw wire helpers (independent of layerstream_client) -----------------------------------


@pytest.fixture(scope="session")
def layerstream_reference(layerstream_server):
    """``get(name)``: the fully loaded transformers model behind a model of
    :func:`layerstream_server` (tests/reference.py)."""
    from reference import reference_lookup

    return reference_lookup(layerstream_server.chunked, SOURCES)


def prompt_input(text: str) -> dict[str, Any]:
    return {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [text]}


def ids_input(ids: list[int]) -> dict[str, Any]:
    return {"name": "input_ids", "datatype": "INT64", "shape": [len(ids)], "data": list(ids)}


def raw_sse(base_url: str, model: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """POST generate_stream with plain httpx + httpx_sse; every event's JSON, in order."""
    url = f"{base_url}/v2/models/{model}/generate_stream"
    with (
        httpx.Client(timeout=60.0) as client,
        connect_sse(client, "POST", url, json=request) as source,
    ):
        assert source.response.status_code == 200, source.response.read()
        content_type = source.response.headers["content-type"]
        assert content_type.startswith("text/event-stream"), content_type
        return [json.loads(event.data) for event in source.iter_sse()]


def metric_samples(metrics_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=10.0).raise_for_status().text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(model: str, version: str = "", **more: str) -> tuple[tuple[str, str], ...]:
    """A layerstream series' labels as :func:`metric_samples` keys them: the model as MLServer
    labels it (``model_name``, ``model_version``) plus ``more``."""
    return tuple(sorted({"model_name": model, "model_version": version, **more}.items()))
