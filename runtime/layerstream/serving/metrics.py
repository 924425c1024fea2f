"""Prometheus metrics on MLServer's /metrics endpoint.

MLServer's own ``mlserver.register``/``log`` never reach /metrics with parallel_workers=0
(which streaming needs), so these use prometheus_client's global registry directly. They are
created on first use and looked up afterwards, because MLServer imports the implementation
module and then reloads it: a second registration would raise ``Duplicated timeseries``.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

_lock = threading.Lock()
_metrics: dict[str, Counter | Gauge | Histogram] = {}

_SPECS = {
    "requests": (
        Counter,
        "layerstream_requests",
        "Requests by mode and finish reason",
        ("model", "mode", "finish_reason"),
    ),
    "errors": (
        Counter,
        "layerstream_request_errors",
        "Requests that ended with an error, by kind (error_type)",
        ("model", "error_type"),
    ),
    "queued": (
        Gauge,
        "layerstream_queued_requests",
        "Requests waiting for the model (not counting the one it runs)",
        ("model",),
    ),
    "tokens": (Counter, "layerstream_generated_tokens", "Generated tokens", ("model",)),
    "bytes": (Counter, "layerstream_bytes_streamed", "Bytes read from the chunk store", ("model",)),
    "hits": (Counter, "layerstream_block_cache_hits", "Block runs served from memory", ("model",)),
    "misses": (
        Counter,
        "layerstream_block_cache_misses",
        "Block runs that streamed weights",
        ("model",),
    ),
    "wait": (
        Counter,
        "layerstream_weight_wait_seconds",
        "Time compute waited for weights",
        ("model",),
    ),
    "compute": (
        Counter,
        "layerstream_compute_seconds",
        "Request time not spent waiting for weights",
        ("model",),
    ),
    "ttft": (
        Histogram,
        "layerstream_time_to_first_token_seconds",
        "Time to first token",
        ("model",),
    ),
}


def metric(key: str) -> Counter | Gauge | Histogram:
    with _lock:
        if key not in _metrics:
            kind, name, doc, labels = _SPECS[key]
            existing = REGISTRY._names_to_collectors.get(name)  # registered by an earlier import
            _metrics[key] = existing if existing is not None else kind(name, doc, labels)
        return _metrics[key]


def record(model: str, mode: str, finish_reason: str, stats: dict[str, int]) -> None:
    metric("requests").labels(model, mode, finish_reason).inc()
    metric("tokens").labels(model).inc(stats.get("tokens", 0))
    metric("bytes").labels(model).inc(stats.get("bytes_streamed", 0))
    metric("hits").labels(model).inc(stats.get("cache_hits", 0))
    metric("misses").labels(model).inc(stats.get("cache_misses", 0))
    metric("wait").labels(model).inc(stats.get("weight_wait_us", 0) / 1e6)
    metric("compute").labels(model).inc(stats.get("compute_us", 0) / 1e6)
    if stats.get("ttft_us"):
        metric("ttft").labels(model).observe(stats["ttft_us"] / 1e6)


def record_error(model: str, mode: str, error_type: str) -> None:
    """A request that ended with an error: counted with finish_reason ``error`` beside the
    others, and by its kind (``mode`` is ``unknown`` when the request did not parse)."""
    metric("requests").labels(model, mode, "error").inc()
    metric("errors").labels(model, error_type).inc()


def set_queued(model: str, waiting: int) -> None:
    metric("queued").labels(model).set(waiting)
