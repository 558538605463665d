"""The life of a bench helper process (the sensor source, the no-work floor): one node,
SIGINT/SIGTERM to stop, spun on rclpy's cheapest executor."""

from __future__ import annotations

import signal
import threading


def start_node(name: str, priority: int):
    """rclpy up and a node `name`; SIGINT/SIGTERM set the returned stop event. With
    `priority` > 0 the calling thread and the DDS threads go real-time first, so the
    executor's threads inherit it (dp_ros.nodes.realtime.apply_realtime_priority)."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from dp_ros.nodes.realtime import apply_realtime_priority
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(name)
    apply_realtime_priority(node, priority)
    return node, stop


def spin_until_stopped(node, stop: threading.Event) -> None:
    """Spin `node` until `stop` is set, then tear it and rclpy down."""
    import rclpy

    from dp_ros.nodes.run import process_executor
    executor = process_executor()  # the cheapest to spin: a driver's CPU is not ours to spend
    executor.add_node(node)
    try:
        while not stop.is_set():
            executor.spin_once(timeout_sec=0.05)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
