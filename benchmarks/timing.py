"""What every benchmark probe measures the same way: RSS from /proc and per-token times.

Imported by probe.py (layerstream's venv) and peers.py (the peers' venv): no layerstream
imports here.
"""

from __future__ import annotations

import time


def rss(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` in bytes. Not getrusage's ru_maxrss: Linux carries that over
    fork+exec, so a probe started by a big parent would inherit the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def clock(at_first_token=None):
    """A transformers streamer recording when each put() arrives: times[0] is the prompt,
    times[1] the first new token, then one per decode step. ``at_first_token()``, if given,
    is called when the first new token arrives and its result kept as ``first``."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.first = None

        def put(self, value) -> None:
            self.times.append(time.perf_counter())
            if len(self.times) == 2 and at_first_token is not None:
                self.first = at_first_token()

        def end(self) -> None:
            pass

    return Clock()


def io_counters() -> dict[str, int]:
    """Bytes this process made the block layer read, and its major page faults: beside the
    bytes the runtime asked for, they show pages read twice (reclaimed before use, refaulted)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    with open("/proc/self/stat") as f:
        majflt = int(f.read().rsplit(")", 1)[1].split()[9])
    return {"disk_read": int(fields["read_bytes"]), "major_faults": majflt}
