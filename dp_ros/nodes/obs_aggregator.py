"""obs_aggregator: cameras + joint states -> observation windows on the tick grid.

Callbacks only decode, preprocess and push into per-stream buffers
(dp_ros.control.observation.ObservationStreams); a node-clock timer evaluates ticks on the
dt grid, keeps the last T_o valid observations (dp_ros.control.window.WindowBuilder) and
publishes each complete window following dp_ros.nodes.window_msgs. Bad input is counted
per stream and cause in /diagnostics and logged once per cause; it never stops the node.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from typing import Optional

import numpy as np
from rcl_interfaces.msg import (ParameterDescriptor,
                                ParameterType)
from rclpy.clock import ClockChange, JumpThreshold, TimeJump
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from trajectory_msgs.msg import JointTrajectory

from dp_ros.control.observation import (STATE_STREAM, Invalid, ObservationStreams)
from dp_ros.control.streams import SampleRejected
from dp_ros.control.window import TickGrid, WindowBuilder
from dp_ros.nodes.diagnostics import ERROR, OK, WARN, CauseLog, DiagnosticsPublisher, make_status
from dp_ros.nodes.image_conv import compressed_to_numpy, image_to_numpy
from dp_ros.nodes.params import float_range, int_range
from dp_ros.nodes.window_msgs import (WINDOW_QOS, encode_window, stamp_to_ns,
                                      window_image_topic,
                                      window_state_topic)
from dp_ros.control.aggregator_config import DEFAULTS, AggregatorConfig
from dp_ros.nodes.realtime import REALTIME_PARAMETER, apply_realtime_priority
from dp_ros.nodes.run import run_node

NODE_NAME = "obs_aggregator"
POLLS_PER_TICK = 4  # before the clock runs, the timer polls this often per dt
MIN_REARM_NS = 200_000  # never re-arm the tick timer closer than this (0.2 ms)
JOINT_STATES_QOS = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT)


# name -> (default or array type, descriptor); all read-only: the graph is fixed at start
PARAMETERS = {
    "camera_names": (Parameter.Type.STRING_ARRAY, ParameterDescriptor(
        description="Camera names (window keys, topic tokens), in the policy's order",
        type=ParameterType.PARAMETER_STRING_ARRAY, read_only=True)),
    "camera_topics": (Parameter.Type.STRING_ARRAY, ParameterDescriptor(
        description="Camera topics, one per camera: sensor_msgs/Image (rgb8, bgr8, mono8) "
                    "or sensor_msgs/CompressedImage", type=ParameterType.PARAMETER_STRING_ARRAY,
        read_only=True)),
    "compressed": (Parameter.Type.BOOL_ARRAY, ParameterDescriptor(
        description="Per camera: true for CompressedImage. Empty: true for topics ending "
                    "in /compressed", type=ParameterType.PARAMETER_BOOL_ARRAY, read_only=True)),
    "camera_height": (DEFAULTS["camera_height"], ParameterDescriptor(
        description="Frame height after preprocessing (pixels; crop happens in the policy)",
        integer_range=int_range(1, 4096), read_only=True)),
    "camera_width": (DEFAULTS["camera_width"], ParameterDescriptor(
        description="Frame width after preprocessing (pixels)",
        integer_range=int_range(1, 4096), read_only=True)),
    "joint_states_topic": (DEFAULTS["joint_states_topic"], ParameterDescriptor(
        description="sensor_msgs/JointState topic", read_only=True)),
    "state_joint_names": (Parameter.Type.STRING_ARRAY, ParameterDescriptor(
        description="Joints of the state vector, in order (picked by name from joint states)",
        type=ParameterType.PARAMETER_STRING_ARRAY, read_only=True)),
    "rate_hz": (DEFAULTS["rate_hz"], ParameterDescriptor(
        description="Observation rate (Hz); ticks lie at multiples of dt = 1 / rate_hz",
        floating_point_range=float_range(0.1, 1000.0), read_only=True)),
    "T_o": (DEFAULTS["T_o"], ParameterDescriptor(
        description="Observations per window (consecutive valid ticks)",
        integer_range=int_range(1, 64), read_only=True)),
    "camera_staleness": (DEFAULTS["camera_staleness"], ParameterDescriptor(
        description="A camera frame older than this (s) at a tick invalidates the tick",
        floating_point_range=float_range(0.001, 10.0), read_only=True)),
    "state_staleness": (DEFAULTS["state_staleness"], ParameterDescriptor(
        description="A joint state older than this (s) at a tick invalidates the tick",
        floating_point_range=float_range(0.001, 10.0), read_only=True)),
    "stamp_future_tolerance": (DEFAULTS["stamp_future_tolerance"], ParameterDescriptor(
        description="Samples stamped more than this (s) after the node clock are rejected "
                    "(one bogus future stamp would otherwise block its stream)",
        floating_point_range=float_range(0.0, 3600.0), read_only=True)),
    "tick_delay": (DEFAULTS["tick_delay"], ParameterDescriptor(
        description="Wait up to tick_delay (s) after tick t for samples stamped at or "
                    "before t that are still in flight: the tick is built as soon as every "
                    "stream is settled (it has a sample stamped at or after t, or its newest "
                    "is less than half its period before t, so the next one will be after "
                    "t), at t + tick_delay at the latest",
        floating_point_range=float_range(0.0, 1.0), read_only=True)),
    "diagnostics_period": (DEFAULTS["diagnostics_period"], ParameterDescriptor(
        description="Period of /diagnostics messages (s, steady clock)",
        floating_point_range=float_range(0.01, 60.0), read_only=True)),
    **REALTIME_PARAMETER,
}


class ObsAggregator(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        values = {}
        for name, (default, descriptor) in PARAMETERS.items():
            values[name] = self.declare_parameter(name, default, descriptor).value
        self.cfg = AggregatorConfig.from_parameters(values)
        self.realtime_priority = apply_realtime_priority(self, values["realtime_priority"])
        self.grid = TickGrid.from_rate(self.cfg.rate_hz)
        self.dt = self.grid.dt
        self._delay_ns = int(round(self.cfg.tick_delay * 1e9))
        self._future_ns = int(round(self.cfg.stamp_future_tolerance * 1e9))
        # buffers must reach back over the ticks a late timer re-evaluates
        self.streams = ObservationStreams(self.cfg.spec(), horizon=self.cfg.horizon)
        self.builder = WindowBuilder(self.cfg.T_o, self.dt)
        self._lock = threading.RLock()  # callbacks vs tick vs clock jumps (any executor)

        self.rejects = CauseLog(self.get_logger())  # per stream: unusable messages
        self.invalid = CauseLog(self.get_logger())  # per stream: ticks it invalidated
        self.received: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()  # ticks, windows, invalid/missed ticks, clock_resets
        self._last_k: Optional[int] = None
        self._last_now_ns: Optional[int] = None
        self._last_invalid: Optional[Invalid] = None
        self._last_window_stamp: Optional[float] = None
        self._reported_rejects: dict[str, int] = {}

        self._window_pubs = {cam: self.create_publisher(Image, window_image_topic("~", cam),
                                                        WINDOW_QOS)
                             for cam in self.cfg.camera_names}
        self._state_pub = self.create_publisher(JointTrajectory, window_state_topic("~"),
                                                WINDOW_QOS)
        self._subs = []
        for cam, topic, compressed in zip(self.cfg.camera_names, self.cfg.camera_topics,
                                          self.cfg.compressed):
            msg_type = CompressedImage if compressed else Image
            decode = compressed_to_numpy if compressed else image_to_numpy
            self._subs.append(self.create_subscription(
                msg_type, topic, lambda msg, c=cam, d=decode: self._on_image(c, d, msg),
                qos_profile_sensor_data))
        self._subs.append(self.create_subscription(
            JointState, self.cfg.joint_states_topic, self._on_joint_state, JOINT_STATES_QOS))

        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(nanoseconds=-1),
                          on_clock_change=True),
            post_callback=self._on_clock_jump)
        self._timer = self.create_timer(self.dt / POLLS_PER_TICK, self._on_tick)  # node clock
        self._diagnostics = DiagnosticsPublisher(self, self._collect_diagnostics,
                                                 self.cfg.diagnostics_period)
        self.get_logger().info(
            f"{len(self.cfg.camera_names)} camera(s) {list(self.cfg.camera_names)}, "
            f"{len(self.cfg.state_joint_names)} state joints, {self.cfg.rate_hz} Hz, "
            f"T_o={self.cfg.T_o}, frames {self.cfg.camera_height}x{self.cfg.camera_width}")

    # ------------------------------------------------------------------ callbacks

    def _check_stamp(self, stamp_ns: int) -> None:
        now_ns = self.get_clock().now().nanoseconds
        if now_ns and stamp_ns > now_ns + self._future_ns:
            raise SampleRejected("stamp_future", f"stamp {stamp_ns * 1e-9:.6f} s is "
                                                 f"{(stamp_ns - now_ns) * 1e-9:.3f} s after "
                                                 "the node clock")

    def _on_image(self, camera: str, decode, msg) -> None:
        self.received[camera] += 1
        stamp_ns = stamp_to_ns(msg.header.stamp)
        try:
            self._check_stamp(stamp_ns)
            pixels, encoding = decode(msg)
            with self._lock:
                self.streams.push_image(camera, stamp_ns * 1e-9, pixels, encoding)
        except SampleRejected as err:
            self.rejects.report(camera, err.cause, str(err))
            return
        except Exception as err:  # untrusted bytes must never take the node down
            self.rejects.report(camera, "decode_error", f"{type(err).__name__}: {err}")
            return
        self._evaluate_if_settled()

    def _on_joint_state(self, msg: JointState) -> None:
        self.received[STATE_STREAM] += 1
        stamp_ns = stamp_to_ns(msg.header.stamp)
        try:
            self._check_stamp(stamp_ns)
            positions = np.frombuffer(msg.position, dtype=np.float64)
            with self._lock:
                self.streams.push_state(stamp_ns * 1e-9, msg.name, positions)
        except SampleRejected as err:
            self.rejects.report(STATE_STREAM, err.cause, str(err))
            return
        except Exception as err:
            self.rejects.report(STATE_STREAM, "decode_error", f"{type(err).__name__}: {err}")
            return
        self._evaluate_if_settled()

    def _evaluate_if_settled(self) -> None:
        """Within tick_delay after a tick, build it as soon as every stream is settled for
        it (the timer builds it at the deadline otherwise)."""
        if self._delay_ns <= 0:
            return
        now_ns = self.get_clock().now().nanoseconds
        if now_ns:
            self._evaluate_ticks(now_ns)

    def _on_clock_jump(self, jump: TimeJump) -> None:
        changed = jump.clock_change in (ClockChange.ROS_TIME_ACTIVATED,
                                        ClockChange.ROS_TIME_DEACTIVATED)
        if changed or jump.delta.nanoseconds < 0:
            with self._lock:
                self._restart("clock source changed" if changed else "clock jumped backwards")

    def _restart(self, why: str) -> None:
        """Old stamps mean nothing after the clock went back: forget all history."""
        self.streams.clear()
        self.builder.reset()
        self._last_k = None
        self._last_now_ns = None
        self.stats["clock_resets"] += 1
        self.rejects.report("clock", "jumped_back", f"{why}: buffers cleared")

    def _on_tick(self) -> None:
        now_ns = self.get_clock().now().nanoseconds
        if now_ns == 0:
            return  # simulated time has not started: keep polling
        try:
            self._evaluate_ticks(now_ns)
        finally:
            self._arm_next_tick(now_ns)

    def _arm_next_tick(self, now_ns: int) -> None:
        """Fire exactly at the next grid tick instead of polling, so a window leaves within
        the executor's jitter of its tick, not up to a poll late; with tick_delay, also at
        the deadline of a tick not built yet. At the tick itself every stream may already
        be settled (StreamBuffer.settled), with no sample left to arrive and trigger it."""
        due_ns = self.grid.stamp_ns(self.grid.index_at_or_before(now_ns) + 1)
        if self._delay_ns > 0:  # the oldest tick not built yet whose deadline is ahead
            pending = self.grid.index_at_or_before(now_ns - self._delay_ns) + 1
            if self._last_k is not None:
                pending = max(pending, self._last_k + 1)
            due_ns = min(due_ns, self.grid.stamp_ns(pending) + self._delay_ns)
        self._timer.timer_period_ns = max(due_ns - now_ns, MIN_REARM_NS)
        self._timer.reset()

    def _evaluate_ticks(self, now_ns: int) -> None:
        window = None
        with self._lock:
            if self._last_now_ns is not None and now_ns < self._last_now_ns:
                self._restart("clock went backwards")
            self._last_now_ns = now_ns
            k = self.grid.index_at_or_before(now_ns - self._delay_ns)
            k_now = self.grid.index_at_or_before(now_ns)
            if k_now > k and self.streams.settled(self.grid.time(k_now)):
                k = k_now  # inside tick_delay, but nothing for the tick can still arrive
            if self._last_k is not None and k <= self._last_k:
                return  # this grid tick is done
            # a late timer re-evaluates missed ticks from the buffers (data are stamped),
            # so timer jitter does not break the window
            first = k if self._last_k is None else max(self._last_k + 1, k - self.cfg.T_o + 1)
            if self._last_k is not None and first > self._last_k + 1:
                self.stats["missed_ticks"] += first - self._last_k - 1
            for kk in range(first, k + 1):
                t = self.grid.time(kk)
                obs = self.streams.observe(t)
                self.stats["ticks"] += 1
                if isinstance(obs, Invalid):
                    self._last_invalid = obs
                    self.stats["invalid_ticks"] += 1
                    self.invalid.report(obs.stream, obs.cause, f"ticks invalid: {obs.reason}")
                else:
                    self._last_invalid = None
                window = self.builder.push(t, obs)
            self._last_k = k
        if window is not None:
            self._publish(window)

    def _publish(self, window: dict) -> None:
        images, state = encode_window(window, self.cfg.camera_names,
                                      self.cfg.state_joint_names, self.dt)
        for cam, msg in images.items():
            self._window_pubs[cam].publish(msg)
        self._state_pub.publish(state)
        self.stats["windows"] += 1
        self._last_window_stamp = float(window["stamps"][-1])

    # ------------------------------------------------------------------ diagnostics

    def _collect_diagnostics(self):
        name = self.get_name()
        with self._lock:
            last_invalid = self._last_invalid
            stats = dict(self.stats)
            now = self.get_clock().now().nanoseconds * 1e-9
            ages = {}
            buffered = {}  # samples held per stream (bounded by horizon and capacity)
            for stream, buffer in self.streams.buffers.items():
                newest = buffer.newest_stamp
                ages[stream] = None if newest is None else now - newest
                buffered[stream] = len(buffer)
        if self._last_k is None:
            level, message = WARN, "no tick yet (waiting for the clock)"
        elif last_invalid is not None:
            level, message = WARN, f"tick invalid: {last_invalid}"
        else:
            level, message = OK, "publishing windows"
        values = {"rate_hz": self.cfg.rate_hz, "T_o": self.cfg.T_o,
                  "ticks": stats.get("ticks", 0), "windows": stats.get("windows", 0),
                  "invalid_ticks": stats.get("invalid_ticks", 0),
                  "missed_ticks": stats.get("missed_ticks", 0),
                  "clock_resets": stats.get("clock_resets", 0),
                  "last_window_tick": self._last_window_stamp}
        statuses = [make_status(f"{name}: window", level, message, values)]

        topics = dict(zip(self.cfg.camera_names, self.cfg.camera_topics))
        topics[STATE_STREAM] = self.cfg.joint_states_topic
        for stream in self.streams.buffers:
            rejected = self.rejects.counts(stream)
            invalid = self.invalid.counts(stream)
            total = sum(rejected.values())
            new_rejects = total - self._reported_rejects.get(stream, 0)
            self._reported_rejects[stream] = total
            if self.received[stream] == 0:
                s_level, s_message = ERROR, f"no message received on {topics[stream]}"
            elif last_invalid is not None and last_invalid.stream == stream:
                s_level, s_message = WARN, f"{last_invalid.cause}: {last_invalid.reason}"
            elif new_rejects:
                s_level, s_message = WARN, f"{new_rejects} message(s) rejected: " \
                                           f"{self.rejects.last(stream)}"
            else:
                s_level, s_message = OK, "ok"
            s_values = {"topic": topics[stream], "received": self.received[stream],
                        "rejected": total, "newest_sample_age": ages[stream],
                        "buffered": buffered[stream]}
            s_values.update({f"rejected/{c}": n for c, n in sorted(rejected.items())})
            s_values.update({f"invalid_ticks/{c}": n for c, n in sorted(invalid.items())})
            if self.rejects.last(stream):
                s_values["last_rejection"] = self.rejects.last(stream)
            statuses.append(make_status(f"{name}: {stream}", s_level, s_message, s_values,
                                        hardware_id=topics[stream]))
        return statuses

    def destroy_node(self):
        if hasattr(self, "_diagnostics"):  # absent when the constructor refused a parameter
            self._diagnostics.destroy()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(ObsAggregator, NODE_NAME, args)


if __name__ == "__main__":
    sys.exit(main())
