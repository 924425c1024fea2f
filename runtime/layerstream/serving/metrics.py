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

import contextlib
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from ..engine.sweeps import SweepRecord
from ..inference.types import FinishReason, Mode, RequestStats

CANCELLED = "cancelled"  # the finish_reason label of a request whose client left
_MODEL = ("model_name", "model_version")  # as MLServer labels a model's custom metrics

REQUESTS = Counter(
    "layerstream_requests",
    "Requests by mode and finish reason",
    (*_MODEL, "mode", "finish_reason"),
)
ERRORS = Counter(
    "layerstream_request_errors",
    "Requests that ended with an error, by kind (error_type)",
    (*_MODEL, "error_type"),
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
EXPERTS_READ = Counter(
    "layerstream_experts_read",
    "Routed experts read alone from the chunk store (expert streaming; each once, however "
    "many requests shared it)",
    _MODEL,
)
EXPERT_BYTES = Counter(
    "layerstream_expert_bytes_streamed",
    "The bytes of those experts (a part of layerstream_bytes_streamed)",
    _MODEL,
)
EXPERTS_ROUTED = Counter(
    "layerstream_experts_routed",
    "Experts the routers of streamed blocks chose for the finished requests, summed over "
    "their block runs (over layerstream_experts_read: how often a read expert served)",
    _MODEL,
)
EXPERTS_PREDICTED = Counter(
    "layerstream_experts_predicted",
    "Experts read ahead on a guess of what the next block's router would choose (expert "
    "prefetch; a part of layerstream_experts_read)",
    _MODEL,
)
EXPERTS_PREDICTED_USED = Counter(
    "layerstream_experts_predicted_used",
    "Those of them the router then chose (over layerstream_experts_predicted: the guesses' "
    "precision)",
    _MODEL,
)
EXPERT_CACHE_HITS = Counter(
    "layerstream_expert_cache_hits",
    "Routed experts found in the expert cache instead of read from the chunk store "
    "(over it plus layerstream_experts_read: the cache's hit rate)",
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
PINNED = Gauge(
    "layerstream_pinned_bytes",
    "Bytes of the blocks the memory budget pins that are in memory (read in the background "
    "after the model is ready, pin_in_background)",
    _MODEL,
)
PINNED_TARGET = Gauge(
    "layerstream_pinned_bytes_target",
    "Bytes of every block the memory budget pins: layerstream_pinned_bytes once the fill is done",
    _MODEL,
)
# every metric labelled by the model alone
_PER_MODEL = (
    QUEUED,
    ACTIVE,
    TOKENS,
    BYTES,
    EXPERTS_READ,
    EXPERT_BYTES,
    EXPERTS_ROUTED,
    EXPERTS_PREDICTED,
    EXPERTS_PREDICTED_USED,
    EXPERT_CACHE_HITS,
    SWEEPS,
    SWEEP_SEQUENCES,
    SWEEP_TOKENS,
    BYTES_PER_TOKEN,
    RESIDENT_RUNS,
    STREAMED_RUNS,
    WEIGHT_WAIT,
    COMPUTE,
    TTFT,
    PINNED,
    PINNED_TARGET,
)


class ModelMetrics:
    """One loaded model's series, labelled as MLServer labels a model's custom metrics
    (``model_name``, ``model_version``; the version "" where the model has none)."""

    def __init__(self, name: str, version: str | None) -> None:
        self.labels = (name, version or "")
        # the (mode, finish_reason) and error_type label values this model has used, so
        # that forget() can remove exactly its series
        self._outcomes: set[tuple[str, str]] = set()
        self._error_types: set[str] = set()

    def declare(self) -> None:
        """The model's series exist from its load on (at zero), not from its first event:
        a rate over a series that appears late misses its first increase."""
        for metric in (TOKENS, BYTES, SWEEPS, RESIDENT_RUNS, STREAMED_RUNS, WEIGHT_WAIT, COMPUTE):
            metric.labels(*self.labels)
        QUEUED.labels(*self.labels).set(0)
        ACTIVE.labels(*self.labels).set(0)

    def watch_pinning(self, pinned: Callable[[], tuple[int, int]]) -> None:
        """The fill's progress, read at every scrape: (bytes pinned, bytes to pin)."""
        PINNED.labels(*self.labels).set_function(lambda: pinned()[0])
        PINNED_TARGET.labels(*self.labels).set_function(lambda: pinned()[1])

    def forget(self) -> None:
        """The model was unloaded: its series leave /metrics (Seldon loads each version
        under its own name, which would otherwise leave every old version's series behind
        for good)."""
        for metric in _PER_MODEL:
            with contextlib.suppress(KeyError):  # never created: nothing to remove
                metric.remove(*self.labels)
        for outcome in self._outcomes:
            with contextlib.suppress(KeyError):
                REQUESTS.remove(*self.labels, *outcome)
        for error_type in self._error_types:
            with contextlib.suppress(KeyError):
                ERRORS.remove(*self.labels, error_type)

    def record(self, mode: Mode, finish_reason: FinishReason, stats: RequestStats) -> None:
        """A request that finished (``stop`` or ``length``)."""
        labels = self.labels
        self._outcomes.add((mode.value, finish_reason.value))
        REQUESTS.labels(*labels, mode.value, finish_reason.value).inc()
        TOKENS.labels(*labels).inc(stats.tokens)
        RESIDENT_RUNS.labels(*labels).inc(stats.resident_runs)
        STREAMED_RUNS.labels(*labels).inc(stats.streamed_runs)
        EXPERTS_ROUTED.labels(*labels).inc(stats.experts_routed)
        WEIGHT_WAIT.labels(*labels).inc(stats.weight_wait_us / 1e6)
        COMPUTE.labels(*labels).inc(stats.compute_us / 1e6)
        if stats.ttft_us:
            TTFT.labels(*labels).observe(stats.ttft_us / 1e6)

    def record_error(self, mode: str, error_type: str) -> None:
        """A request that ended with an error, a refused one too: counted with finish_reason
        ``error`` beside the others, and by its kind (``mode`` is ``unparsed`` when the
        request did not parse)."""
        self._outcomes.add((mode, FinishReason.ERROR.value))
        self._error_types.add(error_type)
        REQUESTS.labels(*self.labels, mode, FinishReason.ERROR.value).inc()
        ERRORS.labels(*self.labels, error_type).inc()

    def record_cancelled(self, mode: str) -> None:
        """A request whose client left before it ended."""
        self._outcomes.add((mode, CANCELLED))
        REQUESTS.labels(*self.labels, mode, CANCELLED).inc()

    def set_queued(self, waiting: int) -> None:
        QUEUED.labels(*self.labels).set(waiting)

    def set_active(self, active: int) -> None:
        ACTIVE.labels(*self.labels).set(active)

    def record_sweep(self, sweep: SweepRecord) -> None:
        """A finished pass over the streamed blocks: the bytes are counted here, once, not
        per request (the requests on a sweep share them)."""
        labels = self.labels
        SWEEPS.labels(*labels).inc()
        SWEEP_SEQUENCES.labels(*labels).observe(sweep.sequences)
        SWEEP_TOKENS.labels(*labels).observe(sweep.tokens)
        BYTES.labels(*labels).inc(sweep.bytes_streamed)
        EXPERTS_READ.labels(*labels).inc(sweep.experts_read)
        EXPERT_BYTES.labels(*labels).inc(sweep.expert_bytes)
        EXPERTS_PREDICTED.labels(*labels).inc(sweep.experts_predicted)
        EXPERTS_PREDICTED_USED.labels(*labels).inc(sweep.experts_predicted_used)
        EXPERT_CACHE_HITS.labels(*labels).inc(sweep.expert_cache_hits)
        if sweep.tokens:
            BYTES_PER_TOKEN.labels(*labels).observe(sweep.bytes_streamed / sweep.tokens)
