"""The streamer's counters, read by attribute (serving reports them per request)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class StreamStats:
    """Counters since the engine started; requests report differences of two snapshots."""

    # Block runs and waits belong to a request (sweeps.Rider, filled in by
    # RequestContext.measure). Engine-wide, resident_runs stays 0, streamed_runs counts block
    # installs (each shared by every request on its sweep), wait_s their waits for reads.
    resident_runs: int = 0  # block runs served by a resident (pinned) block
    streamed_runs: int = 0  # block runs that needed a streamed block
    read_aheads: int = 0  # reads handed to an I/O thread (not those found in the page cache)
    bytes_read: int = 0  # for requests: streamed, and pinned at load
    chunks_read: int = 0
    # read by the background fill (fill.py), for no request in particular: not in bytes_read
    pinned_bytes_read: int = 0
    read_s: float = 0.0  # time spent in store reads (I/O threads)
    wait_s: float = 0.0  # time the compute thread waited for weights
    dequantize_s: float = 0.0  # time spent dequantizing a quantized store's tensors
    chunks_verified: int = 0
    refetches: int = 0  # chunks read again after failing their sha256 check
    # expert streaming (a part of bytes_read): routed experts read alone, and their bytes
    experts_read: int = 0
    expert_bytes: int = 0
    experts_routed: int = 0  # a request's: experts its streamed blocks' routers chose
    expert_cache_hits: int = 0  # experts found kept in memory instead of read
    # prefetch by prediction (engine/prediction.py), over the installs that had a guess:
    # experts guessed, those the router then chose (precision: used / predicted), and all
    # the routers chose there (recall: used / routed_predicted)
    experts_predicted: int = 0
    experts_predicted_used: int = 0
    experts_routed_predicted: int = 0

    def snapshot(self) -> StreamStats:
        return dataclasses.replace(self)

    def since(self, before: StreamStats) -> StreamStats:
        """The counts between ``before`` (an earlier snapshot) and now."""
        # every field, so a counter added later is reported too
        return StreamStats(
            **{
                f.name: getattr(self, f.name) - getattr(before, f.name)
                for f in dataclasses.fields(self)
            }
        )
