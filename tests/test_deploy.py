"""deploy/ as a cluster would take it: every manifest valid against its kind's schema (Seldon
Core v2's CRDs, prometheus-operator's, Kubernetes' own; tests/data/seldon/README.md), the
Models sized by `layerstream size`, and the image installed exactly as CI installs."""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from referencing import Registry, Resource

from layerstream.chunker.sizing import config_from_json, size_model
from layerstream.serving.settings import LayerStreamSettings
from layerstream.units import parse_size

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATA = Path(__file__).with_name("data") / "seldon"
K8S_VERSION = "1.30.0"
K8S_DEFS = "https://kubernetes.io/api/_definitions.json"
SELDON = "mlops.seldon.io/v1alpha1"

# (apiVersion, kind) -> the file in tests/data/seldon holding its schema; a CRD file is
# read at the version named by apiVersion, a *.schema.yaml file is the schema itself
CUSTOM_KINDS = {
    (SELDON, "Model"): "mlops.seldon.io_models.yaml",
    (SELDON, "Server"): "mlops.seldon.io_servers.schema.yaml",
    (SELDON, "ServerConfig"): "mlops.seldon.io_serverconfigs.schema.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
# the Kubernetes kinds deploy/ may use, validated against kubernetes-validate's schemas
STANDARD_KINDS = {
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "ServiceAccount"),
    ("apps/v1", "DaemonSet"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
}


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                found.append((f"{path.relative_to(ROOT)}#{i}", doc))
    return found


MANIFESTS = _manifests()


def _of(kind: str, api_version: str = SELDON) -> list[dict[str, Any]]:
    return [d for _, d in MANIFESTS if d.get("kind") == kind and d["apiVersion"] == api_version]


# -- schemas ----------------------------------------------------------------------------------


def _k8s_dir():
    return (
        importlib.resources.files(kubernetes_validate)
        / "kubernetes-json-schema"
        / f"v{K8S_VERSION}-local-strict"
    )


@functools.cache
def _registry() -> Registry:
    definitions = json.loads((_k8s_dir() / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


def _strict(schema: Any) -> Any:
    """An OpenAPI v3 CRD schema as JSON Schema that refuses unknown fields, as `kubectl
    apply --validate=strict` (its default) does: an object that lists its properties takes
    no others unless it says x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern[1:]:
        # Go's RE2 takes a flag mid-pattern (prometheus-operator's "^(?i)(abort|warn)?$");
        # Python's re only at the start
        out["pattern"] = "(?i)" + pattern.replace("(?i)", "")
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _custom_schema(api_version: str, kind: str) -> dict[str, Any]:
    data = yaml.safe_load((DATA / CUSTOM_KINDS[api_version, kind]).read_text())
    if data.get("kind") == "CustomResourceDefinition":
        group, version = api_version.split("/")
        assert data["spec"]["group"] == group and data["spec"]["names"]["kind"] == kind
        (served,) = [v for v in data["spec"]["versions"] if v["name"] == version]
        data = served["schema"]["openAPIV3Schema"]
    schema = _strict(copy.deepcopy(data))
    # the API server checks a custom resource's metadata as any object's
    schema["properties"]["metadata"] = {
        "$ref": f"{K8S_DEFS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _validate(doc: dict[str, Any]) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_KINDS:
        validator = jsonschema.Draft202012Validator(_custom_schema(*key), registry=_registry())
        validator.validate(doc)
    elif key in STANDARD_KINDS:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    else:
        known = sorted(f"{a} {k}" for a, k in [*CUSTOM_KINDS, *STANDARD_KINDS])
        pytest.fail(
            f"no schema for {key[0]} {key[1]}: add its schema (tests/data/seldon/README.md) "
            f"and its kind to tests/test_deploy.py; known: {known}"
        )


# -- every manifest validates -----------------------------------------------------------------


def test_deploy_has_the_manifests_the_docs_walk_through():
    kinds = {(d["apiVersion"], d["kind"]) for _, d in MANIFESTS}
    assert {
        (SELDON, "Server"),
        (SELDON, "Model"),
        ("v1", "Secret"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
    } <= kinds


@pytest.mark.parametrize(("where", "doc"), MANIFESTS, ids=[w for w, _ in MANIFESTS])
def test_manifest_is_valid_against_its_kinds_schema(where, doc):
    _validate(doc)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "extraCapabilites"), ["typo"]),  # an unknown Seldon field
        (("spec", "memory"), "lots"),  # not a quantity
        (("spec", "parameters"), [{"name": "chunk_store"}]),  # a parameter without value
        (("spec", "replicas"), "2"),
        (("metadata", "labels"), {"app": 1}),  # metadata is an ObjectMeta
    ],
)
def test_the_validation_catches_what_a_cluster_would_refuse(path, value):
    model = copy.deepcopy(_of("Model")[0])
    model[path[0]][path[1]] = value
    with pytest.raises(jsonschema.ValidationError):
        _validate(model)


def test_the_validation_catches_a_bad_server_pod_spec():
    server = copy.deepcopy(_of("Server")[0])
    server["spec"]["podSpec"]["containers"][0]["envv"] = []
    with pytest.raises(jsonschema.ValidationError):
        _validate(server)
    server = copy.deepcopy(_of("Server")[0])
    server["spec"]["podSpec"]["os"] = {"name": "linux"}  # v1.PodSpec has it, Seldon's not
    with pytest.raises(jsonschema.ValidationError):
        _validate(server)


@pytest.mark.parametrize("key", sorted(CUSTOM_KINDS), ids=lambda k: k[1])
def test_every_vendored_schema_is_a_schema_with_its_references_resolved(key):
    schema = _custom_schema(*key)  # checked against the metaschema
    validator = jsonschema.Draft202012Validator(schema, registry=_registry())
    # a bare object of the kind: whatever it lacks is said, no reference is left unresolved
    errors = list(validator.iter_errors({"apiVersion": key[0], "kind": key[1], "spec": {}}))
    assert all(e.validator == "required" for e in errors), [e.message for e in errors]


def test_a_serverconfig_like_the_stock_one_validates():
    """Seldon's stock `mlserver` ServerConfig, cut down (operator/config/serverconfigs)."""
    _validate(
        {
            "apiVersion": SELDON,
            "kind": "ServerConfig",
            "metadata": {"name": "mlserver"},
            "spec": {
                "podSpec": {
                    "containers": [
                        {
                            "name": "mlserver",
                            "image": "mlserver:latest",
                            "env": [{"name": "MLSERVER_PARALLEL_WORKERS", "value": "1"}],
                            "resources": {"requests": {"cpu": "0.1", "memory": "1G"}},
                        }
                    ],
                    "securityContext": {"fsGroup": 2000, "runAsUser": 1000},
                },
                "volumeClaimTemplates": [
                    {
                        "name": "mlserver-models",
                        "spec": {
                            "accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": "1Gi"}},
                        },
                    }
                ],
            },
        }
    )


def test_an_unknown_kind_fails_rather_than_going_unchecked():
    with pytest.raises(pytest.fail.Exception, match="no schema for"):
        _validate({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject"})


# -- what Seldon and the runtime need of them -------------------------------------------------


def _params(model: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["value"] for p in model["spec"].get("parameters", [])}


def _mlserver_container(server: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in server["spec"]["podSpec"]["containers"] if c["name"] == "mlserver"]
    return container


@pytest.mark.parametrize("model", _of("Model"), ids=lambda m: m["metadata"]["name"])
def test_model_parameters_are_settings_the_runtime_takes(model):
    """Seldon passes spec.parameters as parameters.extra, every value a string."""
    settings = LayerStreamSettings.from_extra(_params(model))
    assert settings.chunk_store


@pytest.mark.parametrize("model", _of("Model"), ids=lambda m: m["metadata"]["name"])
def test_model_lands_on_a_server_that_can_stream_it(model):
    servers = {s["metadata"]["name"]: s for s in _of("Server")}
    server = servers[model["spec"]["server"]]
    assert set(model["spec"]["requirements"]) <= set(server["spec"]["extraCapabilities"])
    container = _mlserver_container(server)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLSERVER_PARALLEL_WORKERS"] == "0"
    assert env["MLSERVER_GZIP_ENABLED"] == "false"
    # the agent offers the container's memory request to Seldon's scheduler
    memory = parse_size(model["spec"]["memory"].replace("Mi", "MiB").replace("Gi", "GiB"))
    for bound in ("requests", "limits"):
        quantity = container["resources"][bound]["memory"]
        assert parse_size(quantity.replace("Mi", "MiB").replace("Gi", "GiB")) >= memory


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """The model the manifests describe: the llama-demo preset, chunked."""
    from layerstream.chunker.convert import chunk_checkpoint
    from layerstream.chunker.presets import write_random_checkpoint

    root = tmp_path_factory.mktemp("demo")
    source = write_random_checkpoint("llama-demo", root / "source")
    manifest = chunk_checkpoint(source, root / "chunks", "demo", progress=False)
    return manifest, config_from_json((root / "chunks" / "config.json").read_text())


@pytest.mark.parametrize("model", _of("Model"), ids=lambda m: m["metadata"]["name"])
def test_model_memory_is_what_layerstream_size_says(model, demo_store):
    manifest, config = demo_store
    settings = LayerStreamSettings.from_extra(_params(model))
    sizing = size_model(
        manifest,
        config,
        memory_budget=settings.memory_budget,
        read_ahead=settings.read_ahead,
        max_active_sequences=settings.max_active_sequences,
        kv_cache_budget=settings.kv_cache_budget,
    )
    assert model["spec"]["memory"] == sizing.spec_memory, sizing.report()


def test_secrets_the_servers_read_are_in_deploy():
    secrets = {s["metadata"]["name"]: s for s in _of("Secret", "v1")}
    for server in _of("Server"):
        for env in _mlserver_container(server).get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["stringData"]
    for model in _of("Model"):
        if "secretName" in model["spec"]:
            assert model["spec"]["secretName"] in secrets


def test_autoscalers_scale_a_model_and_its_server_on_the_runtimes_metrics():
    """Seldon's HPA recipe: two HPAs, one on the Model and one on its Server, the same Object
    metrics of the Model and the same bounds; the metrics are the recorded series
    prometheus-adapter serves."""
    (rule,) = _of("PrometheusRule", "monitoring.coreos.com/v1")
    recorded = {r["record"] for g in rule["spec"]["groups"] for r in g["rules"]}
    served = {"layerstream_" + name.split(":")[1] for name in recorded}
    assert served == {"layerstream_queued_requests", "layerstream_active_sequences"}
    for name in ("layerstream_queued_requests", "layerstream_active_sequences"):
        assert any(name in r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    hpas = _of("HorizontalPodAutoscaler", "autoscaling/v2")
    by_target = {h["spec"]["scaleTargetRef"]["kind"]: h for h in hpas}
    assert set(by_target) == {"Model", "Server"}
    model_hpa, server_hpa = by_target["Model"], by_target["Server"]
    assert model_hpa["spec"]["metrics"] == server_hpa["spec"]["metrics"]
    for bound in ("minReplicas", "maxReplicas"):
        assert model_hpa["spec"][bound] == server_hpa["spec"][bound]
    for metric in model_hpa["spec"]["metrics"]:
        assert metric["object"]["metric"]["name"] in served
        assert metric["object"]["target"]["type"] == "AverageValue"  # Seldon's requirement
    model = {m["metadata"]["name"]: m for m in _of("Model")}[
        model_hpa["spec"]["scaleTargetRef"]["name"]
    ]
    assert "replicas" in model["spec"]
    assert "minReplicas" not in model["spec"] and "maxReplicas" not in model["spec"]
    assert model["spec"]["server"] == server_hpa["spec"]["scaleTargetRef"]["name"]


# -- the image installs what CI installs ------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_installs_with_the_script_and_pyproject_ci_uses():
    steps = _instructions(DEPLOY / "Dockerfile")
    runs = [args for word, args in steps if word == "RUN"]
    installs = [args for args in runs if "scripts/install.sh" in args]
    assert len(installs) == 1, "the image installs layerstream through scripts/install.sh once"
    assert not re.search(r"\bscripts/install\.sh\s+dev\b", installs[0])
    for args in runs:  # no second requirements source beside pyproject.toml
        assert not re.search(r"\bpip3?\b|\bconda\b|requirements", args.replace(installs[0], ""))
    copied = " ".join(args for word, args in steps if word == "COPY")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [
        "pyproject.toml",
        pyproject["project"]["readme"],
        "scripts/install.sh",
        *pyproject["tool"]["setuptools"]["packages"]["find"]["where"],
    ]
    for path in needed:
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copied), f"COPY {path}"
    # what the build context lets through (BuildKit reads Dockerfile.dockerignore)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for path in needed:
        assert any(rule.rstrip("/") == f"!{path}" for rule in ignore), path
    # CI: .ci/run -> scripts/test.sh -> scripts/install.sh dev, the same script
    assert re.search(r"^scripts/test\.sh\b", (ROOT / ".ci" / "run").read_text(), re.M)
    assert re.search(r"^scripts/install\.sh dev$", (ROOT / "scripts" / "test.sh").read_text(), re.M)


def test_the_base_image_is_an_mlserver_the_package_accepts():
    steps = _instructions(DEPLOY / "Dockerfile")
    (base,) = [args for word, args in steps if word == "ARG" and args.startswith("MLSERVER_")]
    match = re.fullmatch(r"MLSERVER_IMAGE=seldonio/mlserver:(\d+\.\d+\.\d+)(-slim)?", base)
    assert match, base
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (mlserver,) = [
        Requirement(r)
        for r in pyproject["project"]["optional-dependencies"]["server"]
        if r.startswith("mlserver")
    ]
    assert Version(match.group(1)) in mlserver.specifier
    # the official image's Python is 3.10: the oldest the package declares
    assert pyproject["project"]["requires-python"] == ">=3.10"


def test_the_image_sets_what_streaming_needs():
    env = " ".join(args for word, args in _instructions(DEPLOY / "Dockerfile") if word == "ENV")
    assert "MLSERVER_PARALLEL_WORKERS=0" in env
    assert "MLSERVER_GZIP_ENABLED=false" in env
