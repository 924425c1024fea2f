"""The runtime's settings, validated once at load.

Read from ``parameters.extra`` in model-settings.json (Seldon Core v2 keeps only that block
when it rewrites the file, and passes every value as a string), with environment variables
``MLSERVER_MODEL_LAYERSTREAM_<FIELD>`` as fallback.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import SettingsError
from ..stores import StoreOptions, is_remote
from ..units import parse_size

Seconds = Annotated[float, Field(gt=0, le=86400)]


class LayerStreamSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MLSERVER_MODEL_LAYERSTREAM_", extra="forbid", protected_namespaces=()
    )

    chunk_store: str = Field(
        description="Where the chunks are: a directory (relative paths resolve against the "
        "model folder), file:// URL, s3://bucket/prefix or http(s)://host/path."
    )
    memory_budget: str = Field(
        default="auto",
        description="Bytes of weights held in memory: '2GiB', '512MB', '25%' of the model, "
        "or 'auto' (the whole model if it takes at most 60% of the memory this process can "
        "still use, else 60% of that memory).",
    )
    read_ahead: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Streamed blocks read ahead of the one computing; 'auto' is 1 (lowered "
        "to 0 when the budget cannot hold two streaming buffers).",
    )
    io_threads: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Threads reading chunks; 'auto' is one per block read in flight.",
    )
    torch_threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default="auto",
        description="torch intra-op threads; 'auto' is the CPUs this process may use "
        "(affinity and cgroup CPU quota, which torch's own default ignores).",
    )
    verify_checksums: Literal["once", "always", "off"] = Field(
        default="once",
        description="sha256 of each chunk against the manifest: 'once' (on first read, and "
        "again whenever the store's file changes), 'always' (every read), 'off' (sizes only).",
    )
    verify_in_background: bool = Field(
        default=True,
        description="After load, hash every streamed chunk of a local store on a low-priority "
        "thread: a damaged chunk then takes the model out of readiness before a request "
        "finds it. Remote stores are hashed on every read instead.",
    )
    reader: Literal["auto", "mmap", "read"] = Field(
        default="auto",
        description="How streamed blocks are read: 'mmap' maps local chunk files (no copy), "
        "'read' copies them into reusable buffers; 'auto' maps local stores unless "
        "verify_checksums is 'always'.",
    )
    max_new_tokens_limit: int = Field(
        default=1024, ge=1, description="Largest max_new_tokens a request may ask for."
    )
    default_max_new_tokens: int = Field(
        default=64, ge=1, description="max_new_tokens when a request does not say."
    )
    max_queued_requests: int = Field(
        default=64,
        ge=1,
        description="Requests waiting for the model before new ones are refused as overloaded "
        "(SSE error event, /infer 503, gRPC RESOURCE_EXHAUSTED).",
    )
    request_timeout_s: Seconds = Field(
        default=600.0,
        description="Seconds a request may take from arrival, queue wait included; then the "
        "engine stops at the next block and the client gets error_type 'timeout' (SSE event, "
        "/infer 504, gRPC DEADLINE_EXCEEDED). It bounds work a client abandoned where the "
        "transport cannot say so (an HTTP/1.1 /infer client that timed out). A request's own "
        "'timeout' parameter (microseconds, as tritonclient sends it) can only shorten it.",
    )
    max_prompt_bytes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="Largest prompt, in UTF-8 bytes, refused before it is tokenized; 'auto' is "
        "the context length times the longest token of the vocabulary (a longer prompt "
        "cannot fit the context), or 1 MiB for a model without a context length.",
    )

    # -- remote stores ------------------------------------------------------------------
    store_connect_timeout_s: Seconds = Field(
        default=5.0, description="Seconds to open a connection to a remote store."
    )
    store_read_timeout_s: Seconds = Field(
        default=30.0, description="Seconds a remote store may stay silent mid-response."
    )
    store_deadline_s: Seconds = Field(
        default=120.0,
        description="Seconds one remote read may take, retries included (exponential backoff "
        "with jitter on throttling, 5xx, resets, truncated bodies); then the request fails.",
    )
    store_max_concurrency: Annotated[int, Field(ge=1, le=256)] = Field(
        default=8, description="Ranged GETs in flight per remote store."
    )
    store_part_size: str = Field(
        default="8MiB", description="Bytes per ranged GET of a remote chunk."
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, Ceph, R2, GCS HMAC); default AWS.",
    )
    s3_region: str | None = Field(default=None, description="S3 region; default from AWS config.")
    s3_profile: str | None = Field(
        default=None, description="Profile in ~/.aws/config; default the standard chain."
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="Bucket in the path or in the host name."
    )
    http_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP headers for an http(s) store, a JSON object.",
    )
    http_bearer_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for an http(s) store; prefer the environment variable "
        "MLSERVER_MODEL_LAYERSTREAM_HTTP_BEARER_TOKEN (a Kubernetes secret) to the file.",
    )
    http_verify_tls: bool = Field(
        default=True, description="Verify the https store's certificate (keep this on)."
    )
    http_ca_bundle: str | None = Field(
        default=None, description="CA bundle (PEM) that signed the https store's certificate."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Local disk cache in front of a remote store (shared by processes and "
        "models, survives restarts); none by default.",
    )
    cache_size: str = Field(default="10GiB", description="Byte budget of the disk cache.")

    @field_validator("memory_budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        if value != "auto":
            parse_size(value, reference=1)  # raises ValueError with the accepted forms
        return value

    @field_validator("store_part_size", "cache_size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        if parse_size(value) < 1:
            raise ValueError("must be at least 1 byte")
        return value

    @field_validator("http_headers", mode="before")
    @classmethod
    def _parse_headers(cls, value: Any) -> Any:
        if isinstance(value, str):  # Seldon passes every value as a string
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _check_store(self) -> LayerStreamSettings:
        if is_remote(self.chunk_store) and self.verify_checksums == "off":
            raise ValueError(
                "verify_checksums='off' is for local stores only: bytes from a remote store "
                "are always checked"
            )
        return self

    def store_options(self) -> StoreOptions:
        token = self.http_bearer_token
        return StoreOptions(
            connect_timeout_s=self.store_connect_timeout_s,
            read_timeout_s=self.store_read_timeout_s,
            deadline_s=self.store_deadline_s,
            max_concurrency=self.store_max_concurrency,
            part_bytes=parse_size(self.store_part_size),
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            profile=self.s3_profile,
            addressing_style=self.s3_addressing_style,
            headers=dict(self.http_headers),
            bearer_token=token.get_secret_value() if token else None,
            verify_tls=self.http_verify_tls,
            ca_bundle=self.http_ca_bundle,
            cache_dir=self.cache_dir,
            cache_bytes=parse_size(self.cache_size) if self.cache_dir else 0,
        )

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> LayerStreamSettings:
        try:
            return cls(**(extra or {}))
        except ValidationError as exc:
            # "read_ahead" may fail as an int and as "auto": one line per setting
            problems: dict[str, list[str]] = {}
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else "settings"
                problems.setdefault(name, []).append(err["msg"])
            text = "; ".join(f"{name}: {' or '.join(msgs)}" for name, msgs in problems.items())
            raise SettingsError(
                f"invalid layerstream settings in parameters.extra: {text}. "
                f"Known settings: {', '.join(cls.model_fields)}"
            ) from exc
