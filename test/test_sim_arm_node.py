"""sim_arm over real DDS: joint states, camera, commands, reset, sim time."""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Callable

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from builtin_interfaces.msg import Duration as DurationMsg  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import (DurabilityPolicy, QoSProfile, ReliabilityPolicy,  # noqa: E402
                       qos_profile_sensor_data)
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint  # noqa: E402

from dp_ros.sim.sim_arm_node import SimArmNode  # noqa: E402

pytestmark = pytest.mark.ros
TIMEOUT = 15.0


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or condition}")


class Harness:
    """The node under test plus a probe node, spun by one executor in a thread."""

    def __init__(self, ctx, params: dict):
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        self.sim = SimArmNode(context=ctx, parameter_overrides=overrides)
        self.probe = Node("probe", context=ctx)
        self.joint_states: list[JointState] = []
        self.images: list[Image] = []
        self.tasks: list[dict] = []
        self.probe.create_subscription(JointState, "/joint_states", self.joint_states.append, 50)
        self.probe.create_subscription(Image, "/camera/image_raw", self.images.append,
                                       qos_profile_sensor_data)
        task_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                              durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.probe.create_subscription(String, "/sim_arm/task",
                                       lambda m: self.tasks.append(json.loads(m.data)), task_qos)
        self.traj_pub = self.probe.create_publisher(JointTrajectory,
                                                    "/arm_controller/joint_trajectory", 10)
        self.cmd_pub = self.probe.create_publisher(Float64MultiArray,
                                                   "/forward_position_controller/commands", 10)
        self.clock_pub = self.probe.create_publisher(Clock, "/clock", 10)
        self.reset = self.probe.create_client(Trigger, "/sim_arm/reset")
        self.executor = SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.sim)
        self.executor.add_node(self.probe)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self):
        self.executor.shutdown()
        self.thread.join(timeout=5)
        self.sim.destroy_node()
        self.probe.destroy_node()

    def connected(self, pub) -> bool:
        return pub.get_subscription_count() > 0

    def position(self) -> np.ndarray:
        return np.array(self.joint_states[-1].position)

    def send_trajectory(self, names, points, stamp=(0, 0)):
        msg = JointTrajectory(joint_names=names)
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
        for t, pos in points:
            msg.points.append(JointTrajectoryPoint(
                positions=[float(v) for v in pos],
                time_from_start=DurationMsg(sec=int(t), nanosec=int(round((t % 1) * 1e9)))))
        self.traj_pub.publish(msg)


@pytest.fixture
def harness_factory(ros_context):
    made = []

    def make(**params):
        h = Harness(ros_context, params)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


NAMES = ["joint_1", "joint_2"]


def test_joint_states_camera_and_task(harness_factory):
    h = harness_factory(joint_state_rate_hz=50.0, camera_width=64, camera_height=48,
                        camera_rate_hz=20.0, seed=7)
    wait_for(lambda: len(h.joint_states) >= 60 and len(h.images) >= 5 and h.tasks,
             what="joint states, images and task state")
    js = h.joint_states[-1]
    assert list(js.name) == NAMES and len(js.position) == 2 and len(js.velocity) == 2
    stamps = np.array([m.header.stamp.sec + m.header.stamp.nanosec * 1e-9
                       for m in h.joint_states[-50:]])
    period = float(np.median(np.diff(stamps)))
    assert 0.7 * 0.02 < period < 1.4 * 0.02, period   # the configured 50 Hz
    img = h.images[-1]
    assert (img.encoding, img.height, img.width, img.step) == ("rgb8", 48, 64, 64 * 3)
    assert len(img.data) == 48 * 64 * 3
    pixels = np.frombuffer(img.data, np.uint8).reshape(48, 64, 3)
    assert (pixels[..., 0] > 180).sum() > 0 and (pixels[..., 1] > 150).sum() > 0
    task = h.tasks[-1]
    assert task["seed"] == 7 and task["episode"] == 0 and not task["done"]
    for key in ("goal", "obstacle", "success", "collision", "side", "end_effector"):
        assert key in task
    np.testing.assert_allclose(h.position(), task["start_positions"], atol=1e-9)


def test_trajectory_moves_the_arm_and_bad_ones_are_rejected(harness_factory):
    h = harness_factory()
    wait_for(lambda: h.joint_states and h.connected(h.traj_pub) and h.connected(h.cmd_pub),
             what="discovery")
    target = [0.6, -0.4]
    h.send_trajectory(NAMES, [(0.3, [0.3, -0.2]), (0.6, target)])
    wait_for(lambda: np.allclose(h.position(), target, atol=1e-6), what="arm at the target")

    # a trajectory given in the other joint order means the same
    h.send_trajectory(["joint_2", "joint_1"], [(0.3, [0.1, 0.2])])
    wait_for(lambda: np.allclose(h.position(), [0.2, 0.1], atol=1e-6), what="reordered target")

    held = h.position()
    bad = [
        (NAMES, [(0.5, [math.nan, 0.0])]),                      # NaN
        (["joint_1", "wrist"], [(0.5, [1.0, 1.0])]),            # wrong joint names
        (NAMES, [(0.5, [1.0, 1.0]), (0.4, [1.2, 1.2])]),        # times not increasing
        (NAMES, [(0.5, [1.0, 1.0, 1.0])]),                      # wrong length
    ]
    for names, points in bad:
        h.send_trajectory(names, points)
    h.cmd_pub.publish(Float64MultiArray(data=[1.0, 1.0, 1.0]))  # wrong length command
    h.cmd_pub.publish(Float64MultiArray(data=[math.inf, 1.0]))
    wait_for(lambda: h.sim.rejected == len(bad) + 2, what="all bad commands rejected")
    n = len(h.joint_states)
    wait_for(lambda: len(h.joint_states) > n + 20, what="more joint states")
    np.testing.assert_allclose(h.position(), held, atol=1e-12)  # the arm held
    assert all(np.isfinite(m.position).all() for m in h.joint_states)

    # the forward position controller input still works afterwards
    h.cmd_pub.publish(Float64MultiArray(data=[-0.3, 0.5]))
    wait_for(lambda: np.allclose(h.position(), [-0.3, 0.5], atol=1e-6), what="command target")


def test_reset_samples_the_next_episode(harness_factory):
    h = harness_factory(seed=3)
    assert h.reset.wait_for_service(timeout_sec=TIMEOUT)
    h.cmd_pub.publish(Float64MultiArray(data=[0.5, 0.5]))
    future = h.reset.call_async(Trigger.Request())
    wait_for(future.done, what="reset response")
    response = future.result()
    assert response.success
    episode = json.loads(response.message)
    assert episode["seed"] == 4
    wait_for(lambda: h.tasks and h.tasks[-1]["episode"] == 1, what="task state of episode 1")
    assert h.tasks[-1]["seed"] == 4
    wait_for(lambda: h.joint_states and np.allclose(h.position(), episode["start_positions"]),
             what="arm at the new start")

    # a new seed applies at the next reset: that episode is the seed itself
    result = h.sim.set_parameters([Parameter("seed", value=11)])[0]
    assert result.successful
    future = h.reset.call_async(Trigger.Request())
    wait_for(future.done, what="reset response")
    assert json.loads(future.result().message)["seed"] == 11
    # invalid live parameter values are refused
    assert not h.sim.set_parameters([Parameter("interpolation", value="spline")])[0].successful
    assert h.sim.set_parameters([Parameter("interpolation", value="cubic")])[0].successful


def test_runs_on_sim_time_faster_than_real_time(harness_factory):
    h = harness_factory(use_sim_time=True)
    wait_for(lambda: h.connected(h.clock_pub) and h.connected(h.traj_pub), what="discovery")
    t_sim = 100.0

    def tick(seconds: float, step: float = 0.01) -> None:
        nonlocal t_sim
        for _ in range(int(round(seconds / step))):
            t_sim += step
            msg = Clock()
            msg.clock.sec, msg.clock.nanosec = int(t_sim), int(round((t_sim % 1) * 1e9))
            h.clock_pub.publish(msg)
            time.sleep(0.0005)

    tick(0.2)
    wait_for(lambda: h.joint_states, what="joint states on sim time")
    start = h.position()
    # a 20 s trajectory (sim time) stamped with the sim clock
    stamp = h.joint_states[-1].header.stamp
    h.send_trajectory(NAMES, [(20.0, [1.0, 1.0])], stamp=(stamp.sec, stamp.nanosec))
    tick(10.0, step=0.02)
    wait_for(lambda: abs(h.joint_states[-1].header.stamp.sec - int(t_sim)) <= 1,
             what="joint states caught up with the sim clock")
    half = h.position()
    assert np.all(half > start + 0.2) and np.all(half < 0.8), half  # about halfway
    tick(12.0, step=0.02)
    wait_for(lambda: np.allclose(h.position(), [1.0, 1.0], atol=1e-6), what="sim-time target")
    last = h.joint_states[-1].header.stamp
    assert 100.0 < last.sec + last.nanosec * 1e-9 <= t_sim + 1e-6  # stamps are sim time
