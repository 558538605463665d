"""Offline equals online: the windows dp_ros.data.from_bags builds from a bag are the
windows the live obs_aggregator publishes (use_sim_time) when the same bag is played
with /clock by dp_ros.nodes.bag_player.

The bag is a real recording (dp_ros.record_demos: sim arm + expert through topics). The
aggregator runs with the demo robot's parameter file, the same file the dataset builder
reads. Every window both sides produced must be identical (images byte for byte, state
exactly); the live side may miss a few at the start.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from dp_ros.data.from_bags import (ObsSource, bag_windows, load_node_parameters,  # noqa: E402
                                   load_sources)
from dp_ros.nodes.bag_player import BagPlayer  # noqa: E402
from dp_ros.nodes.obs_aggregator import ObsAggregator  # noqa: E402
from dp_ros.nodes.window_msgs import (STATE_PART, WINDOW_QOS, WindowJoiner,  # noqa: E402
                                      decode_window, window_image_topic,
                                      window_state_topic)
from dp_ros.paths import config_file  # noqa: E402
from dp_ros.record_demos import record_demos  # noqa: E402

pytestmark = pytest.mark.ros
CONFIG = config_file("demo_robot.yaml")
TIMEOUT = 30.0


def wait_for(condition, timeout=TIMEOUT, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what or condition}")


@pytest.fixture(scope="module")
def demo_bag(tmp_path_factory) -> Path:
    bag = tmp_path_factory.mktemp("equivalence") / "demo"
    summary = record_demos(bag, episodes=1, seed=3, progress=False)
    assert summary.episodes == 1
    return bag


class WindowProbe:
    """Collects the aggregator's windows, decoded like the policy node does."""

    def __init__(self, node: Node, src: ObsSource):
        self.src = src
        self.windows: dict[int, dict] = {}
        self.errors: list[str] = []
        self.joiner = WindowJoiner(src.camera_names)
        prefix = "/obs_aggregator"
        for cam in src.camera_names:
            node.create_subscription(Image, window_image_topic(prefix, cam),
                                     lambda m, c=cam: self._on(c, m), WINDOW_QOS)
        node.create_subscription(JointTrajectory, window_state_topic(prefix),
                                 lambda m: self._on(STATE_PART, m), WINDOW_QOS)

    def _on(self, part, msg):
        joined = self.joiner.add(part, msg)
        if joined is None:
            return
        try:
            window = decode_window(joined.images, joined.state, self.src.T_o,
                                   self.src.camera_names, self.src.state_joint_names,
                                   (self.src.camera_height, self.src.camera_width),
                                   self.src.dt)
        except ValueError as err:
            self.errors.append(str(err))
            return
        self.windows[joined.stamp_ns] = window


def test_bag_windows_equal_live_aggregator_windows(demo_bag, ros_context):
    src, _ = load_sources(CONFIG)
    offline = {int(round(w["stamps"][0] * 1e9 / (src.grid.dt_ns))) * src.grid.dt_ns: w
               for w in bag_windows(demo_bag, src)}
    assert len(offline) > 50  # one episode of ~6 s plus settling, at 10 Hz

    params = load_node_parameters(CONFIG, "obs_aggregator")
    overrides = [Parameter(k, value=v) for k, v in params.items()]
    overrides.append(Parameter("use_sim_time", value=True))
    aggregator = ObsAggregator(context=ros_context, parameter_overrides=overrides)
    probe_node = Node("equivalence_probe", context=ros_context)
    probe = WindowProbe(probe_node, src)
    player_node = Node("bag_player", context=ros_context)
    camera_topics = list(src.camera_topics)
    state_topic = src.joint_states_topic

    def delivered(_clock_ns: int) -> None:
        # every observation message published so far has reached the aggregator
        want = sum(player.published[t] for t in camera_topics + [state_topic])
        wait_for(lambda: sum(aggregator.received.values()) >= want, 10.0,
                 "the aggregator to receive the played messages")

    player = BagPlayer(player_node, str(demo_bag), rate=2.0, clock_hz=100.0,
                       topics=camera_topics + [state_topic], before_clock=delivered)
    executor = SingleThreadedExecutor(context=ros_context)
    for node in (aggregator, probe_node):
        executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert player.wait_for_subscribers(TIMEOUT), "aggregator never subscribed"
        wait_for(lambda: all(player_node.count_publishers(window_image_topic(
            "/obs_aggregator", c)) for c in src.camera_names), what="window publishers")
        stats = player.play()
        assert stats.messages > 0
        last = max(offline)
        wait_for(lambda: max(probe.windows, default=0) >= last,
                 what="the last window the bag yields")
    finally:
        executor.shutdown()
        spinner.join(timeout=5)
        player.close()
        for node in (aggregator, probe_node, player_node):
            node.destroy_node()

    assert not probe.errors
    live = probe.windows
    common = sorted(set(live) & set(offline))
    # the live side may lose a few windows at the start, never many
    assert len(common) >= len(offline) - 3, (len(common), len(offline), len(live))
    assert set(live) <= set(offline), sorted(set(live) - set(offline))[:5]
    for t0 in common:
        a, b = offline[t0], live[t0]
        np.testing.assert_array_equal(a["stamps"], b["stamps"])
        np.testing.assert_array_equal(a["state"], b["state"])
        for cam in src.camera_names:
            assert a["images"][cam].dtype == b["images"][cam].dtype == np.uint8
            np.testing.assert_array_equal(a["images"][cam], b["images"][cam], err_msg=cam)
    # the scene moves: the windows are not all alike
    first, final = offline[common[0]], offline[common[-1]]
    assert not np.array_equal(first["state"], final["state"])
    assert not np.array_equal(first["images"][src.camera_names[0]],
                              final["images"][src.camera_names[0]])
