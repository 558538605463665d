"""bag_recorder: record topics into a rosbag2 bag without a ROS install.

What ``ros2 bag record`` does, for machines with only the pip wheels: subscribes to the
given topics with ``raw=True`` (the CDR bytes as they travelled, never deserialized) and
writes each message with its receive time on the node clock (sim time under
``use_sim_time``) through dp_ros.data.bags (MCAP by default, sqlite3 on request).

Message types come from the ``types`` parameter (one per topic) or, where it is empty,
from the ROS graph once a publisher appears. The subscription QoS follows the
publishers' offered QoS as ``ros2 bag record`` does (reliable only if every publisher is
reliable, transient local only if every publisher is), and the offered profiles go into
the bag's metadata. The bag is complete (metadata.yaml written) when the node is
destroyed; killing the process leaves it without metadata.

Run: ``python -m dp_ros.nodes.bag_recorder --ros-args -p output:=demo_bag
-p topics:="['/camera/image_raw', '/joint_states']"``; Ctrl-C ends the recording.
"""

from __future__ import annotations

import importlib
import queue
import shutil
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Sequence

import rclpy
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy)

from dp_ros.data.bags import STORAGES, BagError, BagWriter, default_typestore
from dp_ros.data.bags import make_qos as bag_qos
from dp_ros.nodes.params import float_range
from dp_ros.nodes.run import run_node

NODE_NAME = "bag_recorder"
RECORD_DEPTH = 100  # subscription queue: a slow disk must not drop messages at once

PARAMETERS = {
    "output": ("", ParameterDescriptor(
        description="Bag directory to create (must not exist)", read_only=True)),
    "storage": ("mcap", ParameterDescriptor(
        description=f"Storage format: one of {STORAGES}", read_only=True)),
    "topics": (Parameter.Type.STRING_ARRAY, ParameterDescriptor(
        description="Topics to record", type=ParameterType.PARAMETER_STRING_ARRAY,
        read_only=True)),
    "types": ([""], ParameterDescriptor(
        description="Message type per topic (e.g. sensor_msgs/msg/Image); empty: take it "
                    "from the graph when a publisher appears",
        type=ParameterType.PARAMETER_STRING_ARRAY, read_only=True)),
    "discovery_period": (0.5, ParameterDescriptor(
        description="How often (s, steady clock) to look for publishers of topics whose "
                    "type is not known yet",
        floating_point_range=float_range(0.01, 60.0),
        read_only=True)),
}


def message_type(name: str):
    """rclpy message class of "pkg/msg/Name" (the pip wheel or ROS package must be
    installed); ValueError naming the type otherwise."""
    parts = name.split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"not a message type name: {name!r} (expected pkg/msg/Name)")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.{parts[1]}"), parts[2])
    except (ImportError, AttributeError):
        raise ValueError(f"unknown message type {name} (its Python package is not "
                         "installed)") from None


def qos_to_bag(profile: QoSProfile):
    """rclpy QoSProfile -> the bag metadata's Qos (offered QoS)."""
    rel = {ReliabilityPolicy.RELIABLE: "reliable",
           ReliabilityPolicy.BEST_EFFORT: "best_effort"}.get(profile.reliability, "reliable")
    dur = {DurabilityPolicy.TRANSIENT_LOCAL: "transient_local"}.get(profile.durability,
                                                                    "volatile")
    hist = {HistoryPolicy.KEEP_ALL: "keep_all", HistoryPolicy.UNKNOWN: "unknown",
            HistoryPolicy.SYSTEM_DEFAULT: "system_default"}.get(profile.history, "keep_last")
    return bag_qos(rel, dur, int(profile.depth), hist)


def subscription_qos(offered: Sequence[QoSProfile]) -> QoSProfile:
    """What ``ros2 bag record`` subscribes with: reliable / transient local only when every
    publisher offers it (so each one matches), best effort / volatile otherwise."""
    reliable = bool(offered) and all(q.reliability == ReliabilityPolicy.RELIABLE
                                     for q in offered)
    latched = bool(offered) and all(q.durability == DurabilityPolicy.TRANSIENT_LOCAL
                                    for q in offered)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=RECORD_DEPTH,
                      reliability=(ReliabilityPolicy.RELIABLE if reliable
                                   else ReliabilityPolicy.BEST_EFFORT),
                      durability=(DurabilityPolicy.TRANSIENT_LOCAL if latched
                                  else DurabilityPolicy.VOLATILE))


class _WriterThread:
    """Owns the BagWriter: every disk operation happens on this one thread (sqlite3
    connections may not change threads, and the executor should not wait for the disk).
    Messages queue up in order; ``close`` drains the queue and finishes the bag."""

    def __init__(self, output: str, storage: str):
        self._queue: "queue.Queue" = queue.Queue()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self.path = Path(output)
        self._thread = threading.Thread(target=self._run, args=(output, storage),
                                        name="bag_writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self, output: str, storage: str) -> None:
        try:
            writer = BagWriter(output, storage).open()
        except BaseException as err:
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                op, args = item
                if op == "write":
                    writer.write(*args)
                elif op == "add":
                    writer.add_topic(*args)
                else:
                    writer.set_custom_data(*args)
            writer.close()
        except BaseException as err:  # reported by close()
            self._error = err
            writer.abort()

    def add_topic(self, topic: str, msgtype: str, qos) -> None:
        self._queue.put(("add", (topic, msgtype, qos)))

    def write(self, topic: str, stamp_ns: int, raw: bytes) -> None:
        self._queue.put(("write", (topic, stamp_ns, raw)))

    def set_custom_data(self, key: str, value: str) -> None:
        self._queue.put(("custom", (key, value)))

    def close(self) -> None:
        """Write what is queued and finish the bag; re-raises a write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise BagError(f"{self.path}: recording failed: {self._error}")

    def abort(self) -> None:
        """Stop and remove the partial bag."""
        self.close_quietly()
        shutil.rmtree(self.path, ignore_errors=True)

    def close_quietly(self) -> None:
        try:
            self.close()
        except BagError:
            pass


class BagRecorder(Node):
    """``qos``: optional topic -> QoSProfile of the publishers (Python API), used for the
    subscription and the metadata of topics whose publishers are not in the graph yet."""

    def __init__(self, qos: Optional[Mapping[str, QoSProfile]] = None, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        p = {name: self.declare_parameter(name, default, descriptor).value
             for name, (default, descriptor) in PARAMETERS.items()}
        topics = list(p["topics"] or [])
        types = [t for t in (p["types"] or [])]
        if types == [""]:
            types = []
        if not p["output"]:
            raise ValueError("output is empty: give the bag directory to create")
        if not topics:
            raise ValueError("topics is empty: name the topics to record")
        if len(set(topics)) != len(topics):
            raise ValueError(f"topics has duplicates: {topics}")
        if types and len(types) != len(topics):
            raise ValueError(f"types has {len(types)} entries for {len(topics)} topics")
        if p["storage"] not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {p['storage']!r}")
        self.topics = [self.resolve_topic_name(t) for t in topics]
        self._types = dict(zip(self.topics, types)) if types else {}
        self._qos = {self.resolve_topic_name(t): q for t, q in (qos or {}).items()}
        for name in self._types.values():
            if name:
                message_type(name)  # fail now on an unknown type
        self.writer = _WriterThread(p["output"], p["storage"])
        self.counts: Counter[str] = Counter()
        self.newest_ns: dict[str, int] = {}
        self.dropped_before_clock = 0
        self._subs = {}
        self._closed = False
        self._discovery = None
        self._subscribe_known()
        if len(self._subs) < len(self.topics):
            steady = rclpy.clock.Clock(clock_type=rclpy.clock.ClockType.STEADY_TIME)
            self._discovery = self.create_timer(p["discovery_period"], self._subscribe_known,
                                                clock=steady)
        self.get_logger().info(f"recording {self.topics} -> {self.writer.path} "
                               f"({p['storage']})")

    @property
    def subscribed(self) -> list[str]:
        return list(self._subs)

    def _subscribe_known(self) -> None:
        graph = dict(self.get_topic_names_and_types())
        for topic in self.topics:
            if topic in self._subs:
                continue
            type_name = self._types.get(topic) or ""
            if not type_name:
                found = graph.get(topic) or []
                if not found:
                    continue  # no publisher yet
                if len(found) > 1:
                    self.get_logger().error(f"{topic} has several types {found}: not recorded")
                    self._subs[topic] = None
                    continue
                type_name = found[0]
            self._subscribe(topic, type_name)
        if self._discovery is not None and len(self._subs) == len(self.topics):
            self.destroy_timer(self._discovery)
            self._discovery = None

    def _subscribe(self, topic: str, type_name: str) -> None:
        msg_type = message_type(type_name)
        if type_name not in default_typestore().fielddefs:
            self.get_logger().error(f"{topic}: {type_name} is not a standard ROS 2 type; "
                                    "not recorded")
            self._subs[topic] = None
            return
        offered = [i.qos_profile for i in self.get_publishers_info_by_topic(topic)]
        if not offered and topic in self._qos:
            offered = [self._qos[topic]]
        self.writer.add_topic(topic, type_name, [qos_to_bag(q) for q in offered])
        self._subs[topic] = self.create_subscription(
            msg_type, topic, lambda raw, t=topic: self._on_message(t, raw),
            subscription_qos(offered), raw=True)
        self.get_logger().info(f"recording {topic} ({type_name})")

    def _on_message(self, topic: str, raw: bytes) -> None:
        if self._closed:
            return
        now_ns = self.get_clock().now().nanoseconds
        if now_ns == 0:
            self.dropped_before_clock += 1  # sim time has not started: no time to record
            return
        self.writer.write(topic, now_ns, raw)
        self.counts[topic] += 1
        self.newest_ns[topic] = now_ns

    def close(self) -> None:
        """Finish the bag (metadata.yaml). Idempotent; called by destroy_node. BagError
        if writing failed."""
        if not self._closed:
            self._closed = True
            self.writer.close()
            self.get_logger().info(f"{self.writer.path}: {sum(self.counts.values())} messages")

    def destroy_node(self):
        try:
            self.close()
        except BagError as err:
            self.get_logger().error(str(err))
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(BagRecorder, NODE_NAME, args,
                    startup_errors=(ValueError, BagError))


if __name__ == "__main__":
    sys.exit(main())
