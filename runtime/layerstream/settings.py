"""The runtime's settings, validated once at load.

Read from ``parameters.extra`` in model-settings.json (Seldon Core v2 keeps only that block
when it rewrites the file, and passes every value as a string), with environment variables
``MLSERVER_MODEL_LAYERSTREAM_<FIELD>`` as fallback.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import SettingsError
from .units import parse_size


class LayerStreamSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MLSERVER_MODEL_LAYERSTREAM_", extra="forbid", protected_namespaces=()
    )

    chunk_store: str = Field(
        description="Where the chunks are: a directory (relative paths resolve against the "
        "model folder) or file:// URL."
    )
    memory_budget: str = Field(
        default="auto",
        description="Bytes of weights held in memory: '2GiB', '512MB', '25%' of the model, "
        "or 'auto' (the whole model if it takes at most 60% of the memory this process can "
        "still use, else 60% of that memory).",
    )
    read_ahead: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="Streamed blocks read ahead of the one computing; 'auto' is 2 (lowered "
        "when the budget cannot hold that many streaming buffers).",
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
        default=64, ge=1, description="Requests waiting for the model before new ones get 503."
    )

    @field_validator("memory_budget")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        if value != "auto":
            parse_size(value, reference=1)  # raises ValueError with the accepted forms
        return value

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
