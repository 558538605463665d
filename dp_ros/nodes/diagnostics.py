"""Shared diagnostics helpers for the dp_ros nodes.

- make_status / make_array: DiagnosticStatus / DiagnosticArray from plain values.
- CauseLog: counts problems per (source, cause) and logs each key once, so a bad stream
  at 500 Hz cannot flood the log; the counts go into diagnostics instead.
- DiagnosticsPublisher: publishes what a callback collects on /diagnostics periodically,
  on a steady-clock timer so diagnostics keep coming when a simulated clock stalls.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN,
                          DiagnosticStatus.ERROR, DiagnosticStatus.STALE)
DIAGNOSTICS_TOPIC = "/diagnostics"

Level = Union[bytes, int]


def as_level(level: Level) -> bytes:
    """DiagnosticStatus.level is a one-byte bytes field; accept ints too."""
    if isinstance(level, int):
        return bytes([level])
    if isinstance(level, (bytes, bytearray)) and len(level) == 1:
        return bytes(level)
    raise ValueError(f"bad diagnostic level {level!r}")


def worst(levels: Iterable[Level]) -> bytes:
    return bytes([max((as_level(l)[0] for l in levels), default=0)])


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def make_status(name: str, level: Level, message: str,
                values: Union[Mapping[str, Any], Iterable[tuple[str, Any]], None] = None,
                hardware_id: str = "") -> DiagnosticStatus:
    items = values.items() if isinstance(values, Mapping) else (values or ())
    return DiagnosticStatus(
        level=as_level(level), name=name, message=message, hardware_id=hardware_id,
        values=[KeyValue(key=str(k), value=_format(v)) for k, v in items])


def make_array(stamp, statuses: Iterable[DiagnosticStatus]) -> DiagnosticArray:
    msg = DiagnosticArray(status=list(statuses))
    msg.header.stamp = stamp
    return msg


class CauseLog:
    """Problem counter per (source, cause); the first occurrence of each key is logged
    (``logger.warning``), later ones only counted. Thread-safe."""

    def __init__(self, logger: Any):
        self._logger = logger
        self._counts: Counter[tuple[str, str]] = Counter()
        self._last: dict[str, str] = {}  # source -> last message
        self._lock = threading.Lock()

    def report(self, source: str, cause: str, detail: str) -> None:
        with self._lock:
            first = (source, cause) not in self._counts
            self._counts[(source, cause)] += 1
            self._last[source] = f"{cause}: {detail}"
        if first:
            self._logger.warning(f"{source}: {cause}: {detail} "
                                 "(logged once; counted in /diagnostics)")

    def counts(self, source: Optional[str] = None) -> dict[str, int]:
        """cause -> count for one source, or "source/cause" -> count for all."""
        with self._lock:
            if source is not None:
                return {c: n for (s, c), n in self._counts.items() if s == source}
            return {f"{s}/{c}": n for (s, c), n in self._counts.items()}

    def total(self, source: Optional[str] = None) -> int:
        return sum(self.counts(source).values())

    def last(self, source: str) -> Optional[str]:
        with self._lock:
            return self._last.get(source)


class DiagnosticsPublisher:
    """Publishes ``collect()`` on /diagnostics every ``period`` seconds (steady clock);
    the array is stamped with the node clock (sim time when use_sim_time is set)."""

    def __init__(self, node: Any, collect: Callable[[], Iterable[DiagnosticStatus]],
                 period: float = 1.0, qos_depth: int = 10):
        self._node = node
        self._collect = collect
        self._pub = node.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC, qos_depth)
        self._timer = node.create_timer(period, self.publish,
                                        clock=Clock(clock_type=ClockType.STEADY_TIME))

    def publish(self) -> None:
        msg = make_array(self._node.get_clock().now().to_msg(), self._collect())
        self._pub.publish(msg)

    def destroy(self) -> None:
        self._node.destroy_timer(self._timer)
        self._node.destroy_publisher(self._pub)
