"""Prometheus metrics on MLServer's /metrics endpoint.

MLServer's own ``mlserver.register``/``log`` never reach /metrics with parallel_workers=0
(which streaming needs), so these use prometheus_client's global registry directly.

They are created once, when this module is first imported. MLServer imports the
implementation module (``layerstream``) and then reloads it: that re-runs
``layerstream/__init__.py`` only, which imports nothing eagerly, so this module is never
executed twice in a process, and a second registration (``Duplicated timeseries``) cannot
happen. The metric names are the contract; keep them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from ..engine.sweeps import SweepRecord
from ..inference.types import FinishReason, Mode, RequestStats

_MODEL = ("model",)

REQUESTS = Counter(
    "layerstream_requests",
    "Requests by mode and finish reason",
    ("model", "mode", "finish_reason"),
)
ERRORS = Counter(
    "layerstream_request_errors",
    "Requests that ended with an error, by kind (error_type)",
    ("model", "error_type"),
)
QUEUED = Gauge(
    "layerstream_queued_requests",
    "Requests waiting for admission (queue depth)",
    _MODEL,
)
ACTIVE = Gauge(
    "layerstream_active_sequences",
    "Requests admitted and running (sharing the passes over the streamed blocks)",
    _MODEL,
)
TOKENS = Counter("layerstream_generated_tokens", "Generated tokens", _MODEL)
BYTES = Counter(
    "layerstream_bytes_streamed",
    "Bytes read from the chunk store while requests ran (each byte once, however many "
    "requests shared it)",
    _MODEL,
)
SWEEPS = Counter(
    "layerstream_sweeps",
    "Passes over the streamed blocks (each shared by the requests on it)",
    _MODEL,
)
SWEEP_SEQUENCES = Histogram(
    "layerstream_sweep_sequences",
    "Requests that shared a sweep",
    _MODEL,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
SWEEP_TOKENS = Histogram(
    "layerstream_sweep_tokens",
    "Tokens generated in a sweep",
    _MODEL,
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BYTES_PER_TOKEN = Histogram(
    "layerstream_sweep_bytes_per_token",
    "Bytes streamed per generated token, per sweep that generated tokens",
    _MODEL,
    buckets=tuple(2**k for k in range(16, 36, 2)),
)
# "cache" in the names: the contract from before block runs were told apart by residency
RESIDENT_RUNS = Counter("layerstream_block_cache_hits", "Block runs served from memory", _MODEL)
STREAMED_RUNS = Counter(
    "layerstream_block_cache_misses", "Block runs that streamed weights", _MODEL
)
WEIGHT_WAIT = Counter("layerstream_weight_wait_seconds", "Time compute waited for weights", _MODEL)
COMPUTE = Counter(
    "layerstream_compute_seconds", "Request time not spent waiting for weights", _MODEL
)
TTFT = Histogram("layerstream_time_to_first_token_seconds", "Time to first token", _MODEL)


def record(model: str, mode: Mode, finish_reason: FinishReason, stats: RequestStats) -> None:
    REQUESTS.labels(model, mode.value, finish_reason.value).inc()
    TOKENS.labels(model).inc(stats.tokens)
    RESIDENT_RUNS.labels(model).inc(stats.resident_runs)
    STREAMED_RUNS.labels(model).inc(stats.streamed_runs)
    WEIGHT_WAIT.labels(model).inc(stats.weight_wait_us / 1e6)
    COMPUTE.labels(model).inc(stats.compute_us / 1e6)
    if stats.ttft_us:
        TTFT.labels(model).observe(stats.ttft_us / 1e6)


def record_error(model: str, mode: str, error_type: str) -> None:
    """A request that ended with an error: counted with finish_reason ``error`` beside the
    others, and by its kind (``mode`` is ``unparsed`` when the request did not parse)."""
    REQUESTS.labels(model, mode, FinishReason.ERROR.value).inc()
    ERRORS.labels(model, error_type).inc()


def declare(model: str) -> None:
    """The model's series exist from its load on (at zero), not from its first event: a
    rate over a series that appears late misses its first increase."""
    for metric in (TOKENS, BYTES, SWEEPS, RESIDENT_RUNS, STREAMED_RUNS, WEIGHT_WAIT, COMPUTE):
        metric.labels(model)
    QUEUED.labels(model).set(0)
    ACTIVE.labels(model).set(0)


def set_queued(model: str, waiting: int) -> None:
    QUEUED.labels(model).set(waiting)


def set_active(model: str, active: int) -> None:
    ACTIVE.labels(model).set(active)


def record_sweep(model: str, sweep: SweepRecord) -> None:
    """A finished pass over the streamed blocks: the bytes are counted here, once, not per
    request (the requests on a sweep share them)."""
    SWEEPS.labels(model).inc()
    SWEEP_SEQUENCES.labels(model).observe(sweep.sequences)
    SWEEP_TOKENS.labels(model).observe(sweep.tokens)
    BYTES.labels(model).inc(sweep.bytes_streamed)
    if sweep.tokens:
        BYTES_PER_TOKEN.labels(model).observe(sweep.bytes_streamed / sweep.tokens)
