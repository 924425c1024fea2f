"""The settings.json the project ships: what streaming needs, and nothing that stops the
MLServer way of configuring a server (``MLSERVER_*`` environment variables, as Seldon Core
and container setups use) from working."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlserver_proc import MLServerProcess, ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def test_settings_json_has_what_streaming_needs_and_pins_no_ports():
    settings = json.loads((ROOT / "settings.json").read_text())
    assert settings["parallel_workers"] == 0  # worker processes do not forward streams
    assert settings["gzip_enabled"] is False  # gzip holds every event back until the end
    # MLServer prefers settings.json to the environment: a port here would override
    # MLSERVER_HTTP_PORT and friends
    assert not {"host", "http_port", "grpc_port", "metrics_port"} & set(settings)
    assert (ROOT / "model-repo" / "settings.json").resolve() == ROOT / "settings.json"


@pytest.mark.e2e
def test_ports_are_set_by_mlserver_environment_variables(model_factory, tmp_path):
    server = MLServerProcess(tmp_path, [ModelSpec("llama", model_factory("llama").store)])
    shutil.copyfile(ROOT / "settings.json", server.repo / "settings.json")
    server.extra_env.update(
        MLSERVER_HOST="127.0.0.1",
        MLSERVER_HTTP_PORT=str(server.http_port),
        MLSERVER_GRPC_PORT=str(server.grpc_port),
        MLSERVER_METRICS_PORT=str(server.metrics_port),
    )
    server.start()
    try:
        server.wait_ready()  # on the ports the environment named
    finally:
        server.stop()
