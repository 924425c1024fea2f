"""Whether guessed experts are read ahead (``expert_prefetch: auto``): chosen by timing
passes over the streamed blocks both ways.

A guess (prediction.py) is free when the store and the cores have room for its reads while
a block computes, and costs time when they do not: a wrong guess's bytes, and a quantized
expert's dequantization, are taken from what the routed experts need. Which one holds
depends on the store, the format, the budget and the load: from a local disk guesses made
qwen3-moe-2b 1.3x faster, over a rate-limited network 1.57x slower (docs/benchmarks.md).
So under ``auto`` the engine measures. A pass is timed from its first streamed experts
module to its last; passes of one shape (the token rows through those modules: the requests
on it and their tokens) are compared with guesses on and off, a few each way first, then
the faster way, with the other tried again every so often, since which is faster changes
with the load and with what the expert cache holds. The choice only decides what is read
early: every block computes with exactly the experts its router chose.
"""

from __future__ import annotations

import collections
import logging
import statistics
import threading

from ..errors import SettingsError

log = logging.getLogger(__name__)

AUTO = "auto"
TRIALS = 3  # passes of one shape timed each way before choosing (the median of each)
RETRY_EVERY = 16  # passes the faster way between two trials of the other
SHAPES = 16  # pass shapes whose timings are kept (the least recently seen go first)


class GuessChoice:
    """Whether guesses are read ahead on the next pass: fixed (``expert_prefetch`` true or
    false), or chosen from timings (``auto``). ``observe`` is called by each streamed block's
    experts module as it runs."""

    def __init__(self, mode: bool | str = AUTO):
        if mode != AUTO and not isinstance(mode, bool):
            kind = type(mode).__name__
            raise SettingsError(
                f"expert_prefetch must be True, False or 'auto', not {mode!r} ({kind})"
            )
        self.fixed: bool | None = None if mode == AUTO else mode
        self.on = True if self.fixed is None else self.fixed
        # by shape: the last TRIALS pass times (s) with guesses off, and on
        self._times: collections.OrderedDict[int, tuple[collections.deque[float], ...]] = (
            collections.OrderedDict()
        )
        self._start: float | None = None
        self._end = 0.0
        self._last = -1  # the block that ran last
        self._rows = 0
        self._since_trial = 0
        self._chosen: bool | None = None  # the faster way, once known (for the log)
        self.passes = [0, 0]  # passes run with guesses off, and on
        self._lock = threading.Lock()

    def observe(self, block: int, rows: int, now: float) -> None:
        """Block ``block``'s experts module runs on ``rows`` token rows at ``now``: a block
        before the last one seen starts a new pass, and ends the one before."""
        if self.fixed is not None:
            return
        with self._lock:
            if block < self._last and self._start is not None:
                self._end_pass()
            if self._start is None:
                self._start = now
            self._last, self._end = block, now
            self._rows += rows

    def _end_pass(self) -> None:
        assert self._start is not None
        took, shape = self._end - self._start, self._rows
        self._start, self._rows = None, 0
        times = self._times.pop(shape, None) or tuple(
            collections.deque(maxlen=TRIALS) for _ in range(2)
        )
        self._times[shape] = times  # the most recently seen last
        while len(self._times) > SHAPES:
            self._times.popitem(last=False)
        times[self.on].append(took)
        self.passes[self.on] += 1
        self.on = self._next(*times)

    def _next(self, off: collections.deque[float], on: collections.deque[float]) -> bool:
        """The way to run the next pass, taken to be of the shape of the one that ended."""
        if len(off) < TRIALS or len(on) < TRIALS:
            return len(on) <= len(off)  # a trial of the way with fewer (guesses first)
        with_them, without = statistics.median(on), statistics.median(off)
        faster = with_them <= without
        if faster is not self._chosen:
            self._chosen = faster
            log.info(
                "expert guesses %s: a pass took %.1f ms with them, %.1f ms without (medians of %d)",
                "on" if faster else "off",
                with_them * 1e3,
                without * 1e3,
                TRIALS,
            )
        self._since_trial += 1
        if self._since_trial >= RETRY_EVERY:
            self._since_trial = 0
            return not faster
        return faster
