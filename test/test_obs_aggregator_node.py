"""obs_aggregator over real DDS: a driver node stands in for the simulated clock, an rgb8
camera, a jpeg CompressedImage camera and the joint-state driver; a test subscriber joins
and decodes the windows. Checks window contents and stamps, bad input (each reported,
the tick skipped, the node still publishing afterwards), and clock jumps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import cv2
import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.clock import Clock, ClockType  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rosgraph_msgs.msg import Clock as ClockMsg  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from dp_ros.control.observation import preprocess_image  # noqa: E402
from dp_ros.nodes.image_conv import compressed_to_numpy  # noqa: E402
from dp_ros.nodes.obs_aggregator import ObsAggregator  # noqa: E402
from dp_ros.nodes.window_msgs import (STATE_PART, WINDOW_QOS, WindowJoiner,  # noqa: E402
                                      decode_window, ns_to_stamp, window_image_topic,
                                      window_state_topic)

pytestmark = pytest.mark.ros

H, W = 48, 64
DT_NS = 100_000_000
STEP_NS = 10_000_000  # driver step: joint states at 100 Hz, cameras every 3rd step
CAMERAS = ["front", "wrist"]
STATE_NAMES = ["j1", "j2"]
CAM_STALE, STATE_STALE = 0.1, 0.05
SIM_START_NS = 1_000 * 1_000_000_000


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Driver:
    """Clock + cameras + joint states, one step every 10 ms of wall time; faults are
    switched on by name. Also the test's subscriber for windows and diagnostics."""

    def __init__(self, ctx, sim_time: bool, stamp_offset_ns: int = 0):
        self.node = rclpy.create_node("driver", context=ctx)
        self.sim_time = sim_time
        self.stamp_offset_ns = stamp_offset_ns  # samples are stamped this long before now
        self.lock = threading.Lock()
        self.sim_ns = SIM_START_NS
        self.step_count = 0
        self.fault: Optional[str] = None
        self.expected = {c: {} for c in CAMERAS}  # camera -> stamp_ns -> preprocessed frame
        self.expected_state: dict[int, np.ndarray] = {}
        self.windows: list[tuple[int, dict]] = []  # (oldest tick ns, decoded window)
        self.window_clock: list[int] = []  # the driver's clock when each window arrived
        self.decode_errors: list[str] = []
        self.diagnostics: list[tuple[float, dict]] = []  # (sim seconds, name -> status)
        self.rng = np.random.default_rng(0)

        n = self.node
        self.clock_pub = n.create_publisher(ClockMsg, "/clock", 10)
        self.front_pub = n.create_publisher(Image, "/cam/front/image_raw", qos_profile_sensor_data)
        self.wrist_pub = n.create_publisher(CompressedImage, "/cam/wrist/image_raw/compressed",
                                            qos_profile_sensor_data)
        self.js_pub = n.create_publisher(JointState, "/joint_states", 10)
        self.joiner = WindowJoiner(CAMERAS)
        for part in CAMERAS:
            n.create_subscription(Image, window_image_topic("/obs_aggregator", part),
                                  lambda m, p=part: self._on_part(p, m), WINDOW_QOS)
        n.create_subscription(JointTrajectory, window_state_topic("/obs_aggregator"),
                              lambda m: self._on_part(STATE_PART, m), WINDOW_QOS)
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        n.create_timer(STEP_NS * 1e-9, self.step, clock=Clock(clock_type=ClockType.STEADY_TIME))

    # ------------------------------------------------------------------ sources

    def now_ns(self) -> int:
        with self.lock:
            return self.sim_ns if self.sim_time else self.node.get_clock().now().nanoseconds

    def step(self):
        with self.lock:
            if self.sim_time:
                self.sim_ns += STEP_NS
                self.clock_pub.publish(ClockMsg(clock=ns_to_stamp(self.sim_ns)))
                now = self.sim_ns
            else:
                now = self.node.get_clock().now().nanoseconds
            self.step_count += 1
            fault = self.fault
            self._publish_joint_state(now - self.stamp_offset_ns, fault)
            if self.step_count % 3 == 0:
                self._publish_cameras(now - self.stamp_offset_ns, fault)

    def _publish_joint_state(self, now: int, fault: Optional[str]):
        s = (now - SIM_START_NS) * 1e-9 % 100.0
        names = ["extra", "j2", "gripper", "j1"]  # another order, extra joints
        positions = [float("nan"), 2.0 + s, 0.5, 1.0 + s]  # a NaN in an unused joint is fine
        if fault == "nan_joint":
            positions[3] = float("nan")
        if fault == "missing_joint":
            del names[1], positions[1]
        else:
            self.expected_state[now] = np.array([1.0 + s, 2.0 + s], np.float32)
        msg = JointState(name=names, position=positions)
        msg.header.stamp = ns_to_stamp(now)
        self.js_pub.publish(msg)

    def _publish_cameras(self, now: int, fault: Optional[str]):
        stamp = ns_to_stamp(now - 1_000_000_000 if fault == "stamps_backwards" else now)
        if fault != "camera_stops":
            raw = self.rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
            msg = Image(height=96, width=128, encoding="rgb8", step=128 * 3, data=raw.tobytes())
            msg.header.stamp = stamp
            if fault == "wrong_encoding":
                msg.encoding = "yuv422"
            elif fault == "bad_size":
                msg.data = raw.tobytes()[:-10]
            elif fault != "stamps_backwards":
                self.expected["front"][now] = preprocess_image(raw, "rgb8", H, W)
            self.front_pub.publish(msg)

        y, x = np.mgrid[0:60, 0:80]  # smooth content: jpeg keeps it recognisable
        bgr = np.stack([(x * 3 + self.step_count) % 256, (y * 4) % 256,
                        np.full_like(x, self.step_count % 256)], -1).astype(np.uint8)
        data = cv2.imencode(".jpg", bgr)[1].tobytes()
        msg = CompressedImage(format="jpeg", data=data if fault != "corrupt_jpeg"
                              else b"\xff\xd8" + bytes(50) + b"\x12" * 200)
        msg.header.stamp = ns_to_stamp(now)
        if fault != "corrupt_jpeg":
            self.expected["wrist"][now] = preprocess_image(*compressed_to_numpy(msg), H, W)
        self.wrist_pub.publish(msg)

    # ------------------------------------------------------------------ sinks

    def _on_part(self, part: str, msg):
        joined = self.joiner.add(part, msg)
        if joined is None:
            return
        try:
            window = decode_window(joined.images, joined.state, 2, CAMERAS, STATE_NAMES,
                                   (H, W), DT_NS * 1e-9)
        except ValueError as err:
            self.decode_errors.append(str(err))
            return
        with self.lock:
            self.windows.append((joined.stamp_ns, window))
            self.window_clock.append(self.now_ns_unlocked())

    def _on_diag(self, msg: DiagnosticArray):
        statuses = {s.name: s for s in msg.status if s.name.startswith("obs_aggregator")}
        if statuses:
            with self.lock:
                self.diagnostics.append((self.now_ns_unlocked(), statuses))

    def now_ns_unlocked(self) -> int:
        return self.sim_ns if self.sim_time else self.node.get_clock().now().nanoseconds

    # ------------------------------------------------------------------ queries

    def set_fault(self, fault: Optional[str]) -> int:
        """Switch the fault; returns the time of the first message published with it."""
        with self.lock:
            self.fault = fault
            return (self.sim_ns + STEP_NS) if self.sim_time else \
                self.node.get_clock().now().nanoseconds

    def window_ticks(self) -> list[int]:
        with self.lock:
            return [t0 for t0, _ in self.windows]

    def latest_tick_after(self, t_ns: int) -> bool:
        return any(t0 > t_ns for t0 in self.window_ticks())

    def status_value(self, stream: str, key: str) -> int:
        with self.lock:
            if not self.diagnostics:
                return 0
            status = self.diagnostics[-1][1].get(f"obs_aggregator: {stream}")
        if status is None:
            return 0
        values = {kv.key: kv.value for kv in status.values}
        return int(values.get(key, 0))


class System:
    def __init__(self, ctx, sim_time: bool = True, stamp_offset_ns: int = 0, **params):
        overrides = dict(
            camera_names=CAMERAS,
            camera_topics=["/cam/front/image_raw", "/cam/wrist/image_raw/compressed"],
            camera_height=H, camera_width=W, state_joint_names=STATE_NAMES, rate_hz=10.0,
            T_o=2, camera_staleness=CAM_STALE, state_staleness=STATE_STALE,
            diagnostics_period=0.1, use_sim_time=sim_time)
        overrides.update(params)
        self.agg = ObsAggregator(context=ctx, parameter_overrides=[
            Parameter(k, value=v) for k, v in overrides.items()])
        self.driver = Driver(ctx, sim_time, stamp_offset_ns)
        self.executors = []
        self.threads = []
        for node in (self.agg, self.driver.node):
            ex = SingleThreadedExecutor(context=ctx)
            ex.add_node(node)
            th = threading.Thread(target=ex.spin, daemon=True)
            th.start()
            self.executors.append(ex)
            self.threads.append(th)

    def close(self):
        for ex in self.executors:
            ex.shutdown(timeout_sec=2.0)
        for th in self.threads:
            th.join(timeout=5.0)  # no callback may run on a destroyed node
        self.agg.destroy_node()
        self.driver.node.destroy_node()


@pytest.fixture
def system_factory(ros_context):
    systems = []

    def make(**kw) -> System:
        s = System(ros_context, **kw)
        systems.append(s)
        return s

    yield make
    for s in systems:
        s.close()


def check_window_contents(driver: Driver, t0: int, window: dict):
    """Each frame / state equals what the driver published for a sample at or before its
    tick and within the staleness limit."""
    assert t0 % DT_NS == 0, "window stamp off the tick grid"
    ticks = [t0, t0 + DT_NS]
    np.testing.assert_allclose(window["stamps"], np.array(ticks) * 1e-9, rtol=0, atol=1e-6)
    with driver.lock:
        expected = {c: dict(driver.expected[c]) for c in CAMERAS}
        expected_state = dict(driver.expected_state)
    for i, tick in enumerate(ticks):
        for cam in CAMERAS:
            candidates = [s for s in expected[cam] if tick - CAM_STALE * 1e9 <= s <= tick]
            assert any(np.array_equal(window["images"][cam][i], expected[cam][s])
                       for s in candidates), f"{cam} frame {i} of window {t0} not published"
        candidates = [s for s in expected_state if tick - STATE_STALE * 1e9 <= s <= tick]
        assert any(np.array_equal(window["state"][i], expected_state[s]) for s in candidates)


@pytest.mark.parametrize("sim_time", [True, False])
def test_windows_match_published_data(system_factory, sim_time):
    system = system_factory(sim_time=sim_time)
    driver = system.driver
    wait_for(lambda: len(driver.window_ticks()) >= 6, 15.0, "six windows")
    assert not driver.decode_errors
    with driver.lock:
        windows = list(driver.windows)
    for t0, window in windows:
        check_window_contents(driver, t0, window)
    ticks = [t0 for t0, _ in windows]
    assert ticks == sorted(set(ticks))
    wait_for(lambda: driver.status_value("front", "received") > 0, 5.0, "diagnostics")
    with driver.lock:
        window_status = driver.diagnostics[-1][1]["obs_aggregator: window"]
    assert window_status.level == window_status.OK


def test_tick_is_built_as_soon_as_every_stream_is_settled(system_factory):
    """tick_delay is a deadline: the window for tick t leaves as soon as every stream has a
    sample stamped at or after t (nothing for t can still come), long before t + 0.5 s, and
    it holds the samples a window built at the deadline would hold."""
    system = system_factory(sim_time=True, tick_delay=0.5)
    driver = system.driver
    wait_for(lambda: len(driver.window_ticks()) >= 6, 30.0, "six windows")
    with driver.lock:
        windows, arrived = list(driver.windows), list(driver.window_clock)
    for (t0, window), clock_ns in zip(windows, arrived):
        newest_tick = t0 + DT_NS
        assert clock_ns < newest_tick + 400_000_000, \
            f"window of tick {newest_tick} arrived {(clock_ns - newest_tick) * 1e-9:.3f} s late"
        check_window_contents(driver, t0, window)
    # the frame stamped on a tick (every third tick here) is in the window, not the one before
    with driver.lock:
        front = dict(driver.expected["front"])
    on_tick = [(t0, w) for t0, w in windows if t0 + DT_NS in front]
    assert on_tick, "no camera frame was stamped on a tick"
    for t0, w in on_tick:
        assert np.array_equal(w["images"]["front"][1], front[t0 + DT_NS])


def test_a_tick_is_built_before_any_sample_after_it_when_every_stream_is_regular(
        system_factory):
    """Samples stamped 3 ms before each 10 ms step: the joint state 3 ms before a tick is
    the last one at or before it (the next is due 7 ms after), so the aggregator need not
    wait for it. Windows whose newest frames are that close too are built while the clock
    still reads their tick, not a step later, and hold the same samples."""
    system = system_factory(sim_time=True, tick_delay=0.5, stamp_offset_ns=3_000_000)
    driver = system.driver
    wait_for(lambda: len(driver.window_ticks()) >= 8, 30.0, "eight windows")
    with driver.lock:
        windows, arrived = list(driver.windows), list(driver.window_clock)
    on_time = [t0 for (t0, _), clock_ns in zip(windows, arrived) if clock_ns == t0 + DT_NS]
    assert on_time, "no window was built before a sample stamped after its tick came"
    for t0, window in windows:
        check_window_contents(driver, t0, window)


FAULTS = [  # fault, stream, diagnostic key counted, staleness of the stream
    ("wrong_encoding", "front", "rejected/unsupported_encoding", CAM_STALE),
    ("bad_size", "front", "rejected/bad_size", CAM_STALE),
    ("corrupt_jpeg", "wrist", "rejected/corrupt_image", CAM_STALE),
    ("nan_joint", "state", "rejected/non_finite", STATE_STALE),
    ("missing_joint", "state", "rejected/missing_joint", STATE_STALE),
    ("camera_stops", "front", "invalid_ticks/stale", CAM_STALE),
    ("stamps_backwards", "front", "rejected/stamp_backwards", CAM_STALE),
]


def test_bad_input_reported_tick_skipped_node_recovers(system_factory):
    system = system_factory(sim_time=True)
    driver = system.driver
    wait_for(lambda: len(driver.window_ticks()) >= 2, 15.0, "first windows")
    for fault, stream, key, staleness in FAULTS:
        before = driver.status_value(stream, key)
        start = driver.set_fault(fault)
        wait_for(lambda: driver.now_ns() >= start + 800_000_000, 10.0, f"{fault} phase")
        end = driver.set_fault(None)
        # node alive: windows again once good data resume
        wait_for(lambda: driver.latest_tick_after(end), 10.0, f"windows after {fault}")
        # reported: counted in diagnostics for the right stream and cause
        wait_for(lambda: driver.status_value(stream, key) > before, 5.0,
                 f"{stream} {key} in diagnostics")
        # skipped: no window holds a tick at which the stream had no fresh good sample
        bad = [t0 for t0 in driver.window_ticks() for t in (t0, t0 + DT_NS)
               if start + staleness * 1e9 < t < end]
        assert not bad, f"{fault}: windows published for invalid ticks {bad}"
        # the window status named the stream while the fault lasted
        with driver.lock:
            messages = [d["obs_aggregator: window"].message for t, d in driver.diagnostics
                        if start + 300_000_000 < t < end and "obs_aggregator: window" in d]
        assert any(f"{stream}:" in m for m in messages), (fault, messages)
    assert system.threads[0].is_alive()
    assert not driver.decode_errors


def test_clock_jump_back_clears_buffers(system_factory):
    system = system_factory(sim_time=True)
    driver = system.driver
    wait_for(lambda: len(driver.window_ticks()) >= 3, 15.0, "first windows")
    with driver.lock:
        jump_from = driver.sim_ns
        driver.sim_ns -= 5_000_000_000  # a bag replay looping back 5 s
    # without clearing, every new sample would be "backwards" for 5 s
    wait_for(lambda: any(t0 < jump_from - 4_000_000_000 for t0 in driver.window_ticks()),
             10.0, "windows after the jump")
    wait_for(lambda: driver.status_value("window", "clock_resets") >= 1, 5.0,
             "clock_resets in diagnostics")
    with driver.lock:
        after = [(t0, w) for t0, w in driver.windows if t0 < jump_from - 4_000_000_000]
    for t0, window in after:
        check_window_contents(driver, t0, window)


def test_bad_parameters_rejected_with_clear_errors(ros_context):
    base = dict(camera_names=["front"], camera_topics=["/a"], state_joint_names=["j1"])
    cases = [
        (dict(camera_topics=["/a", "/b"]), "camera_topics"),
        (dict(state_joint_names=[]), "state_joint_names"),
        (dict(camera_names=["state"], camera_topics=["/a"]), "reserved"),
        (dict(compressed=[True, False]), "compressed"),
        (dict(camera_names=["front", "front"], camera_topics=["/a", "/b"]), "duplicates"),
        (dict(rate_hz=0.0), "rate_hz"),
    ]
    for change, match in cases:
        params = {**base, **change}
        overrides = [Parameter(k, value=v) if v != [] else
                     Parameter(k, Parameter.Type.STRING_ARRAY, []) for k, v in params.items()]
        with pytest.raises(Exception, match=match):
            node = ObsAggregator(context=ros_context, parameter_overrides=overrides)
            node.destroy_node()


def test_executable_stops_cleanly_on_ctrl_c(ros_context):
    """The installed entry point: runs as its own process and exits 0 on SIGINT."""
    listener = rclpy.create_node("listener", context=ros_context)
    seen = []
    listener.create_subscription(DiagnosticArray, "/diagnostics", seen.append, 10)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(listener)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dp_ros.nodes.obs_aggregator", "--ros-args",
         "-p", "state_joint_names:=[j1]", "-p", "camera_names:=[front]",
         "-p", "camera_topics:=[/front/image]", "-p", "diagnostics_period:=0.1"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ), text=True)
    try:
        # spinning once it publishes diagnostics: Ctrl-C now hits rclpy.spin
        deadline = time.monotonic() + 30.0
        while not seen and time.monotonic() < deadline and proc.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        assert seen, "the node published no diagnostics"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20.0)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        executor.shutdown()
        listener.destroy_node()
