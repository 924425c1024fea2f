"""The runtime's settings, validated once at load.

Read from ``parameters.extra`` in model-settings.json (Seldon Core v2 keeps only that block
when it rewrites the file, and passes every value as a string), with environment variables
``MLSERVER_MODEL_LAYERSTREAM_<FIELD>`` as fallback.

The field descriptions are the settings' documentation: ``docs/settings.md`` is rendered from
them by ``scripts/settings_table.py``, and tests/test_docs.py fails when the two disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..errors import SettingsError
from ..stores import StoreOptions, is_remote
from ..units import parse_size


@dataclass(frozen=True)
class Shown:
    """How the settings table names a value's form where its Python type says too little
    (pydantic keeps this metadata and ignores it)."""

    text: str


Seconds = Annotated[float, Field(gt=0, le=86400), Shown("seconds")]
ByteSize = Annotated[str, Shown("bytes: `8MiB`, `2GB`, `1048576`")]


class LayerStreamSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MLSERVER_MODEL_LAYERSTREAM_", extra="forbid", protected_namespaces=()
    )

    chunk_store: str = Field(
        description="Where the chunks are: a directory (relative paths resolve against the "
        "model folder), `file://` URL, `s3://bucket/prefix` or `http(s)://host/path`."
    )
    memory_budget: Annotated[str, Shown("bytes (`2GiB`, `512MB`), `25%` or `auto`")] = Field(
        default="auto",
        description="Bytes of weights held in memory: non-block weights, pinned blocks and "
        "the streaming buffers. `25%` is a share of the model; `auto` is the whole model if "
        "it takes at most 60% of the memory this process can still use (cgroup limit "
        "included), else 60% of that memory. The smallest workable budget is the non-block "
        "weights plus one block (the load error names it).",
    )
    read_ahead: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Streamed blocks read ahead of the one computing; `auto` is 1, or 0 "
        "with expert streaming where every streamed block's non-expert part can be pinned "
        "without a read-ahead and `expert_prefetch` is not `true` (a block read ahead would "
        "then hold only guessed experts; its buffer serves as expert cache instead: 0.22-0.73x "
        "the time per token at 25% in the runs measured, local disk and HTTP, but 1.18x for "
        "gpt-oss-2b MXFP4, whose routing the cache held less of: docs/benchmarks.md). "
        "Lowered, "
        "with a warning, when the budget cannot hold `1 + read_ahead` streaming buffers "
        "beside the non-block weights. With the `mmap` reader, blocks already in the page "
        "cache are mapped when needed instead of read ahead. `0` suits a token whose compute "
        "is shorter than one block's read (a slow remote store, a small model): the overlap "
        "is then worth less than the block it would pin (docs/design.md, Read-ahead).",
    )
    io_threads: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Threads reading chunks; each read in flight blocks one. `auto` is the "
        "read-ahead the budget allows, at least 1.",
    )
    torch_threads: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default="auto",
        description="torch intra-op threads; `auto` is the CPUs this process may use: its "
        "CPU affinity capped by the cgroup CPU quota (a pod's `limits.cpu`), which torch's "
        "own default ignores (on a 64-core node with `limits.cpu: 4` it starts 32+ threads).",
    )
    verify_checksums: Literal["once", "always", "off"] = Field(
        default="once",
        description="sha256 of each local chunk against the manifest: `once` (on first read, "
        "and again whenever its file changes: new inode, size, mtime or ctime), `always` "
        "(every read: a core's worth of hashing per streamed byte), `off` (sizes only; "
        "refused for remote stores). Remote chunks are hashed on every read whatever this says.",
    )
    verify_in_background: bool = Field(
        default=True,
        description="After load, hash every streamed chunk of a local store once, on a thread "
        "of the lowest CPU priority: a damaged chunk then takes the model out of readiness "
        "before a request finds it, and the first requests need not hash. Off with "
        "`verify_checksums: off`. Remote stores are hashed on every read instead.",
    )
    reader: Literal["auto", "mmap", "read"] = Field(
        default="auto",
        description="How streamed blocks are read: `mmap` maps local chunk files (no copy; "
        "chunk files must then be replaced by rename, as the chunker does, never rewritten "
        "in place: truncating a mapped file ends the process, docs/integrity.md), `read` "
        "copies them into reusable buffers; `auto` maps local stores unless "
        "`verify_checksums` is `always`.",
    )
    expert_streaming: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Mixture-of-experts models: a streamed block reads its non-expert weights, "
        "then only the experts its router chose for the tokens at hand (each read once per "
        "pass for every request on it), instead of the whole block. `on`: so, and a store "
        "chunked without its experts' byte ranges is a load error; `off`: every block "
        "streams whole; `auto`: `on` where the store lists them and the bytes come from a "
        "disk or a network, whole blocks where a local store's chunks stay in the page "
        "cache (mapped whole, no copy: faster there). Needs the `read` reader (`auto` "
        "picks it).",
    )
    expert_prefetch: Literal["auto"] | bool = Field(
        default="auto",
        description="With expert streaming: while a block computes, guess the experts the "
        "next block's router will choose (its router applied to the hidden state at hand) "
        "and read them ahead. A wrong guess costs bytes (and, quantized, a dequantization), "
        "never correctness: a block always computes with exactly the experts its router "
        "chose, read then if not ahead. `auto`: passes over the streamed blocks are timed "
        "with guesses and without, and the faster way is kept (tried again now and then): "
        "from a local disk guesses were faster, over a rate-limited network slower "
        "(docs/benchmarks.md). `true`/`false`: always, never. Guesses need a block read "
        "ahead, which `read_ahead: auto` leaves out where every non-expert part fits without "
        "one "
        "unless this is `true`. The final event reports `experts_predicted` and "
        "`experts_predicted_used` (precision).",
    )
    expert_cache_in_place: Literal["auto"] | bool = Field(
        default="auto",
        description="With expert streaming and an expert cache: `true`: a block computes on "
        "the experts the cache keeps where they lie, in memory of the block's own (a hit "
        "costs nothing, but each expert read and not kept takes fresh pages from the system "
        "and gives them back); `false`: it computes in a streaming buffer, the kept experts "
        "it routes to copied in (a hit costs a copy; a miss lands on the buffer's pages). "
        "`auto`: what a copied byte and a byte's page taken and given back cost is measured "
        "while serving, with the hit rate, and the cheaper way is taken. Either way the "
        "output is the same.",
    )
    pin_in_background: bool = Field(
        default=True,
        description="Report ready once the non-block weights are in memory, and read the "
        "blocks the budget pins (and, with expert streaming, the pinned non-expert parts of "
        "streamed blocks) in the background: until a block has arrived, requests wait for it "
        "as for a streamed block's read (a part not yet pinned is read with its block), and "
        "it is hashed before its first use as at load. The first token then needs one pass "
        "over the blocks, not the whole budget read first. A damaged pinned block takes the "
        "model out of readiness when its read "
        "finds it (where `false` fails the load). `false`: ready once every pinned block is "
        "in memory. Progress: the log, `layerstream_pinned_bytes` against "
        "`layerstream_pinned_bytes_target`, and the model's metadata.",
    )
    max_new_tokens_limit: int = Field(
        default=1024, ge=1, description="Largest `max_new_tokens` a request may ask for."
    )
    default_max_new_tokens: int = Field(
        default=64, ge=1, description="`max_new_tokens` when a request does not say."
    )
    max_queued_requests: int = Field(
        default=64,
        ge=1,
        description="Requests waiting for admission before new ones are refused as "
        "`overloaded` (SSE error event, `/infer` 503, gRPC `RESOURCE_EXHAUSTED`).",
    )
    max_active_sequences: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Requests the model runs at once. They share every pass over the streamed "
        "blocks (a block is read once for all of them) and each still gets exactly its "
        "output alone; the others wait, admitted in arrival order. `1` serves one request "
        "at a time.",
    )
    kv_cache_budget: Annotated[str, Shown("bytes (`512MiB`) or `auto`")] = Field(
        default="auto",
        description="Bytes the KV caches of the requests in flight may take, each estimated "
        "from the config (2 x blocks x KV heads x head size x dtype bytes per token, for the "
        "prompt plus `max_new_tokens`; a text prompt counts as its UTF-8 length), and the "
        "float32 hidden states of `hidden_states` and `embedding` requests, held until their "
        "client has read them. A request waits rather than exceed it; one that could never "
        "fit is refused. `auto`: "
        "`max_active_sequences` sequences of the full context, at most a quarter of the "
        "memory available at load.",
    )
    request_timeout_s: Seconds = Field(
        default=600.0,
        description="Seconds a request may take from arrival, queue wait included; then the "
        "engine stops at the next block and the client gets error_type `timeout` (SSE event, "
        "`/infer` 504, gRPC `DEADLINE_EXCEEDED`). It bounds work a client abandoned where "
        "the transport cannot say so (an HTTP/1.1 `/infer` client that timed out), and "
        "delivery: what a client that stopped reading has not read by then is dropped. A "
        "request's own `timeout` parameter (microseconds, as tritonclient sends it) can only "
        "shorten it.",
    )
    max_prompt_bytes: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="Largest prompt, in UTF-8 bytes, refused before it is tokenized; `auto` "
        "is (context length + 1) x the longest vocabulary entry (a longer prompt cannot fit "
        "the context), or 1 MiB for a model without a context length. A tokenizer that drops "
        "text (WordPiece's one `[UNK]` for an over-long word) could fit a longer prompt: set "
        "it explicitly then.",
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
        "with full jitter on throttling, 5xx, resets, timeouts, truncated bodies); then the "
        "request fails with the last cause.",
    )
    store_max_concurrency: Annotated[int, Field(ge=1, le=256)] = Field(
        default=8,
        description="Ranged GETs in flight per remote store; one chunk is split into this "
        "many parts, so a store that caps each connection's rate is read this many times "
        "faster.",
    )
    store_part_size: ByteSize = Field(
        default="8MiB",
        description="Largest ranged GET of a remote chunk: a chunk is read in parts of its "
        "size / `store_max_concurrency`, at least 1 MiB and at most this; a block's routed "
        "experts (byte ranges) in parts of their total / `store_max_concurrency`, at least 256 "
        "KiB and at most this.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, Ceph RGW, R2, GCS with HMAC keys); "
        "none is AWS.",
    )
    s3_region: str | None = Field(default=None, description="S3 region; none: from AWS config.")
    s3_profile: str | None = Field(
        default=None,
        description="Profile in `~/.aws/config`; none: the standard credential chain "
        "(environment, profile, IAM role).",
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto",
        description="`path` (bucket in the path, typical for MinIO) or `virtual` (bucket in "
        "the host name); `auto` lets botocore choose.",
    )
    http_headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP headers for an http(s) store, a JSON object.",
    )
    http_bearer_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for an http(s) store, never logged; prefer the environment "
        "variable `MLSERVER_MODEL_LAYERSTREAM_HTTP_BEARER_TOKEN` (a Kubernetes secret) to the "
        "file. A token over plain `http://` is logged as a warning.",
    )
    http_verify_tls: bool = Field(
        default=True,
        description="Verify the https store's certificate. `false` exists for tests and is "
        "logged loudly.",
    )
    http_ca_bundle: str | None = Field(
        default=None,
        description="CA bundle (PEM) that signed the https store's certificate; none: the "
        "system CAs.",
    )
    cache_dir: str | None = Field(
        default=None,
        description="Local disk cache in front of a remote store (content-addressed, shared "
        "by processes and models, survives restarts; docs/remote-stores.md); none by default.",
    )
    cache_size: ByteSize = Field(
        default="10GiB",
        description="Byte budget of the disk cache; least recently used entries go first.",
    )

    @field_validator("memory_budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        if value != "auto":
            parse_size(value, reference=1)  # raises ValueError with the accepted forms
        return value

    @field_validator("kv_cache_budget")
    @classmethod
    def _check_kv_budget(cls, value: str) -> str:
        if value != "auto" and parse_size(value) < 1:
            raise ValueError("must be at least 1 byte, or 'auto'")
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
