"""Per-stream ring buffers of stamped samples, the raw material of tick-grid alignment.

Times are seconds (float) taken from the data's own stamps, never from a wall clock, so
the same buffers serve the live node, bag replay and dataset building.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

T = TypeVar("T")

PERIOD_INTERVALS = 8  # the period is the median of this many recent sample intervals
SETTLE_FRACTION = 0.5  # a sample due this fraction of a period after the newest cannot be earlier


class SampleRejected(ValueError):
    """A sample (message) that cannot be used. ``cause`` is a short stable key used to
    count rejections per cause in diagnostics; the message says what was wrong."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


class StampOrderError(SampleRejected):
    """A sample stamped before the newest sample already in its stream."""

    def __init__(self, message: str):
        super().__init__("stamp_backwards", message)


@dataclass(frozen=True)
class Sample(Generic[T]):
    stamp: float  # seconds
    value: T


class StreamBuffer(Generic[T]):
    """Samples of one stream in stamp order.

    ``staleness``: a sample older than this (seconds) relative to a tick does not count.
    ``horizon``: samples more than this before the newest are dropped; it must cover the
    oldest tick that may still be evaluated (a late timer re-evaluates missed ticks).
    ``capacity``: hard bound on stored samples whatever the rate.
    """

    def __init__(self, name: str, staleness: float, horizon: float = 2.0, capacity: int = 2048):
        if not staleness > 0.0:
            raise ValueError(f"stream {name!r}: staleness must be > 0, got {staleness}")
        if not horizon >= staleness:
            raise ValueError(f"stream {name!r}: horizon {horizon} shorter than staleness")
        self.name = name
        self.staleness = float(staleness)
        self.horizon = float(horizon)
        self._samples: deque[Sample[T]] = deque(maxlen=max(1, int(capacity)))

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def newest_stamp(self) -> Optional[float]:
        return self._samples[-1].stamp if self._samples else None

    def period(self) -> Optional[float]:
        """The stream's sample period: the median of its last PERIOD_INTERVALS intervals
        (all > 0: an equal stamp replaces the sample); None until it has that many."""
        if len(self._samples) <= PERIOD_INTERVALS:
            return None
        stamps = [self._samples[-1 - i].stamp for i in range(PERIOD_INTERVALS + 1)]
        intervals = sorted(a - b for a, b in zip(stamps, stamps[1:]))
        return 0.5 * (intervals[(PERIOD_INTERVALS - 1) // 2] + intervals[PERIOD_INTERVALS // 2])

    def settled(self, t: float) -> bool:
        """No sample stamped at or before ``t`` can still arrive, so the one to use at t is
        final. Samples arrive in stamp order (one publisher per topic): true once one stamped
        at or after t is in, or once the newest is so close before t that the next, a period
        later give or take SETTLE_FRACTION of one (the interval jitter this rule tolerates),
        must be stamped after t. The second rule saves waiting most of a period for a sample
        that will not be used (2 ms of 500 Hz joint states, up to 33 ms of a free-running
        30 Hz camera)."""
        newest = self.newest_stamp
        if newest is None:
            return False
        if newest >= t:
            return True
        period = self.period()
        return period is not None and newest + (1.0 - SETTLE_FRACTION) * period > t

    def check_order(self, stamp: float) -> None:
        """Raise StampOrderError if ``stamp`` would go backwards in this stream. Callers
        use it before expensive work (image preprocessing) on a sample to be rejected."""
        newest = self.newest_stamp
        if newest is not None and stamp < newest:
            raise StampOrderError(
                f"stream {self.name!r}: stamp {stamp:.6f} s is {newest - stamp:.6f} s before "
                f"the newest sample ({newest:.6f} s)")

    def push(self, stamp: float, value: T) -> None:
        """Append a sample. A stamp equal to the newest replaces it (a re-sent sample);
        an earlier one raises StampOrderError and leaves the buffer unchanged."""
        stamp = float(stamp)
        self.check_order(stamp)
        if self._samples and self._samples[-1].stamp == stamp:
            self._samples.pop()
        self._samples.append(Sample(stamp, value))
        limit = stamp - self.horizon
        while len(self._samples) > 1 and self._samples[0].stamp < limit:
            self._samples.popleft()

    def latest_at_or_before(self, t: float) -> Optional[Sample[T]]:
        """The newest sample stamped at or before ``t`` (ignoring staleness), or None."""
        for sample in reversed(self._samples):  # the wanted sample is usually near the end
            if sample.stamp <= t:
                return sample
        return None

    def is_fresh(self, sample: Sample[Any], t: float) -> bool:
        # 1 ns slack: stamps of ~1e9 s carry float error, and a sample exactly at the
        # limit must not flip between fresh and stale
        return t - sample.stamp <= self.staleness + 1e-9

    def clear(self) -> None:
        """Forget everything (the clock jumped backwards: old stamps mean nothing now)."""
        self._samples.clear()
