"""Offline equals online, and a looping replay is survived.

The session's demo bag (test_eval_bag.eval_assets) is played by dp_ros.nodes.bag_player
with /clock, looping, into the live obs_aggregator + policy_node (use_sim_time, seed 7)
+ trajectory_executor, all in this process. Every plan the node publishes for a window
inside an episode must equal the plan eval-bag computes for that window (eval-bag
planning at every tick so each live window has its offline counterpart): max abs
difference <= 1e-4. The loop makes /clock jump back: the aggregator clears its buffers,
the policy node restarts its schedule, the executor holds, and plans flow again.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from dp_ros import bringup  # noqa: E402
from dp_ros.data.from_bags import load_node_parameters, load_sources  # noqa: E402
from dp_ros.evaluate_bag import evaluate_bag  # noqa: E402
from dp_ros.nodes.bag_player import BagPlayer  # noqa: E402
from dp_ros.nodes.obs_aggregator import ObsAggregator  # noqa: E402
from dp_ros.nodes.policy_node import PolicyNode  # noqa: E402
from dp_ros.nodes.trajectory_executor import TrajectoryExecutorNode  # noqa: E402
from dp_ros.paths import config_file  # noqa: E402
from dp_ros.policy import load_policy  # noqa: E402
from test_eval_bag import eval_assets  # noqa: E402,F401  (session fixture, cached bag)

pytestmark = pytest.mark.ros
SEED = 7
TIMEOUT = 60.0


def wait_for(condition, timeout=TIMEOUT, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what or condition}")


def test_replayed_bag_gives_eval_bag_plans_and_loops_are_survived(eval_assets,  # noqa: F811
                                                                   ros_context):
    a = eval_assets
    obs, act = load_sources(a["config"])
    policy = load_policy(a["image"], device="cpu", seed=SEED)
    offline = evaluate_bag(a["mcap"], policy, obs, act, seed=SEED, replan_every=1)
    T_o = policy.config.T_o
    offline_plans = {p.stamp_ns: p.predicted[T_o - 1:] for p in offline.plans}
    assert len(offline_plans) > 50

    sim = [Parameter("use_sim_time", value=True)]
    agg_params = load_node_parameters(a["config"], "obs_aggregator")
    aggregator = ObsAggregator(context=ros_context, parameter_overrides=sim + [
        Parameter(k, value=v) for k, v in agg_params.items()])
    policy_node = PolicyNode(context=ros_context, parameter_overrides=sim + [
        Parameter("policy_path", value=str(a["image"])), Parameter("device", value="cpu"),
        Parameter("seed", value=SEED), Parameter("joint_names", value=["joint_1", "joint_2"])])
    ex_params = load_node_parameters(config_file("demo_robot.yaml"), "trajectory_executor")
    executor_node = TrajectoryExecutorNode(context=ros_context, parameter_overrides=sim + [
        Parameter(k, value=v) for k, v in ex_params.items()])
    probe = Node("offline_online_probe", context=ros_context)
    live: list[tuple[int, np.ndarray]] = []
    probe.create_subscription(
        JointTrajectory, "/policy_node/plan",
        lambda m: live.append((m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec,
                               np.array([p.positions for p in m.points]))), 10)
    player_node = Node("bag_player", context=ros_context)
    topics = list(obs.camera_topics) + [obs.joint_states_topic]

    def delivered(_clock_ns: int) -> None:
        want = sum(player.published[t] for t in topics)
        wait_for(lambda: sum(aggregator.received.values()) >= want, 10.0,
                 "the aggregator to receive the played messages")

    player = BagPlayer(player_node, str(a["mcap"]), rate=2.0, clock_hz=100.0, loop=True,
                       topics=topics, before_clock=delivered)
    executor = bringup.make_executor(ros_context)
    for node in (aggregator, policy_node, executor_node, probe):
        executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    stop = threading.Event()
    stats = {}
    player_thread = threading.Thread(target=lambda: stats.update(s=player.play(stop)),
                                     daemon=True)
    try:
        assert player.wait_for_subscribers(TIMEOUT), "aggregator never subscribed"
        wait_for(lambda: policy_node.count_subscribers("/policy_node/plan") >= 0
                 and executor_node.count_publishers("/policy_node/plan") >= 1,
                 what="plan publisher")
        player_thread.start()

        def looped_and_planning_again():
            if aggregator.stats["clock_resets"] < 1 or not live:
                return False
            # plans of the second pass: stamps below the last stamp of the first pass
            first_max = max(s for s, _ in live[: max(1, len(live) // 2)])
            return any(s < first_max for s, _ in live[len(live) // 2:]) and len(live) > 20

        wait_for(looped_and_planning_again, 240.0, "a loop and plans after it")
        wait_for(lambda: executor_node.plan_executor.clock_jumps >= 1, 30.0,
                 "the executor to see the jump")
        n = len(live)
        wait_for(lambda: len(live) > n + 2, 60.0, "plans after the jump")
    finally:
        stop.set()
        player_thread.join(timeout=30)
        executor.shutdown()
        spinner.join(timeout=5)
        player.close()
        for node in (aggregator, policy_node, executor_node, probe, player_node):
            node.destroy_node()

    # offline equals online, for every live plan of a window inside an episode
    common = [(s, p) for s, p in live if s in offline_plans]
    assert len(common) >= 10, (len(common), len(live))
    worst = max(float(np.max(np.abs(p - offline_plans[s]))) for s, p in common)
    assert worst <= 1e-4, worst
    # the loop: every node noticed the backward jump and carried on
    assert aggregator.stats["clock_resets"] >= 1
    assert policy_node.stats["clock_jumps_back"] >= 1
    assert executor_node.plan_executor.clock_jumps >= 1
    # ... and the executor dropped its plan (holding) because of it, not for another reason
    assert "clock_jump" in executor_node.plan_executor.hold_causes
