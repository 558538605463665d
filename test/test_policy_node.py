"""policy_node: the planning worker without ROS, then the node over real DDS (windows in,
plans out, slow inference, failing policies, hot swaps through the parameter service)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np
import pytest

from dp_ros.policy import load_policy
from dp_ros.policy.runner import LatencyStats, LatestSlot, PlanJob, PlanRunner
from dp_ros.policy.seeding import seeded_predict
from dp_ros.policy.swap import PolicyLoader

from helpers_policy import (StubPolicy, make_checkpoint, random_obs, small_config,
                            write_config_only)

SEED = 5
DT_NS = 100_000_000  # small_config's dt = 0.1 s


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """policy_dir with policy A (running), B (compatible), an incompatible one, a corrupt
    one; and a valid checkpoint outside policy_dir."""
    root = tmp_path_factory.mktemp("ckpts")
    pdir = root / "policies"
    make_checkpoint(pdir / "A", small_config(policy_id="A"), torch_seed=0)
    make_checkpoint(pdir / "B", small_config(policy_id="B", T_a=2), torch_seed=1)
    write_config_only(pdir / "incompatible", small_config(action_names=["x", "y"]))
    shutil.copytree(pdir / "A", pdir / "corrupt")
    weights = pdir / "corrupt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    write_config_only(root / "outside" / "C", small_config(policy_id="C"))
    return pdir


@pytest.fixture(scope="module")
def offline(ckpts):
    """The same checkpoints loaded outside the node, to reproduce its plans."""
    return {name: load_policy(ckpts / name, device="cpu") for name in ("A", "B")}


# ------------------------------------------------------------------ worker, no ROS

def test_latest_slot_replaces_waiting_item():
    slot = LatestSlot()
    assert slot.put(1) is None and slot.put(2) == 1 and slot.replaced == 1
    assert slot.take(0) == 2 and slot.take(0.01) is None
    slot.close()
    assert slot.take(10) is None  # returns at once when closed


def test_latency_stats():
    stats = LatencyStats(capacity=3)
    assert stats.summary()["median"] is None
    for v in (5.0, 1.0, 2.0, 3.0):
        stats.add(v)
    s = stats.summary()
    assert s["last"] == 3.0 and s["median"] == 2.0 and stats.count == 4  # 5.0 fell out


def test_runner_plans_swaps_between_plans_and_survives_failures(ckpts, offline):
    outcomes, swaps = [], []
    loader = PolicyLoader(device="cpu")
    runner = PlanRunner(load_policy(ckpts / "A", device="cpu"), on_outcome=outcomes.append,
                        loader=loader, seed=SEED, on_swap=swaps.append)
    runner.start()
    try:
        obs = random_obs(offline["A"].config, seed=1)
        runner.submit(PlanJob(obs, 10 * DT_NS))
        wait_for(lambda: len(outcomes) == 1, what="first plan")
        np.testing.assert_allclose(outcomes[0].actions,
                                   seeded_predict(offline["A"], obs, SEED, 10 * DT_NS), atol=1e-5)

        original = runner.policy.predict
        runner.policy.predict = lambda o, noise=None: np.full((8, 2), np.nan, np.float32)
        runner.submit(PlanJob(obs, 11 * DT_NS))
        wait_for(lambda: len(outcomes) == 2, what="NaN outcome")
        assert outcomes[1].error[0] == "non_finite_actions" and outcomes[1].actions is None
        runner.policy.predict = lambda o, noise=None: 1 / 0
        runner.submit(PlanJob(obs, 12 * DT_NS))
        wait_for(lambda: len(outcomes) == 3, what="exception outcome")
        assert outcomes[2].error[0] == "predict_ZeroDivisionError"
        runner.policy.predict = original

        loader.submit(ckpts / "B")
        wait_for(lambda: swaps, what="swap")
        assert swaps[0].ok and runner.policy.policy_id == "B"
        runner.submit(PlanJob(obs, 13 * DT_NS))
        wait_for(lambda: len(outcomes) == 4, what="plan from B")
        assert outcomes[3].policy_id == "B"
        np.testing.assert_allclose(outcomes[3].actions,
                                   seeded_predict(offline["B"], obs, SEED, 13 * DT_NS), atol=1e-5)
    finally:
        assert runner.stop()
        loader.shutdown()


def test_queue_wait_is_the_wait_for_the_previous_plan_not_the_worker_waking():
    outcomes = []
    runner = PlanRunner(StubPolicy(0.3), on_outcome=outcomes.append)
    runner.start()
    try:
        runner.submit(PlanJob({}, 1))
        wait_for(lambda: runner.busy, what="first plan running")
        runner.submit(PlanJob({}, 2))  # waits for the rest of plan 1
        wait_for(lambda: len(outcomes) == 2, what="two plans")
        runner.submit(PlanJob({}, 3))  # the worker is idle: nothing to wait for
        wait_for(lambda: len(outcomes) == 3, what="third plan")
    finally:
        assert runner.stop()
    assert [o.job.plan_stamp_ns for o in outcomes] == [1, 2, 3]
    assert 0.1 < outcomes[1].queue_wait < 0.3 + 0.2
    assert outcomes[2].queue_wait == 0.0  # however long the thread took to wake


# ------------------------------------------------------------------ the node over DDS

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.parameter_client import AsyncParameterClient  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from dp_ros.nodes.policy_node import LATCHED_QOS, PLAN_QOS, PolicyNode  # noqa: E402
from dp_ros.nodes.trajectory_conv import duration_to_ns, time_to_ns  # noqa: E402
from dp_ros.nodes.window_msgs import (WINDOW_QOS, encode_window, window_image_topic,  # noqa: E402
                                      window_state_topic)

PREFIX = "/agg"
JOINTS = ["arm_1", "arm_2"]


class Rig:
    """A PolicyNode plus a tester node that publishes windows and records the node's
    plans, policy ids and diagnostics; both spin on one executor thread."""

    def __init__(self, ctx, ckpts, **params):
        values = {"policy_path": str(ckpts / "A"), "policy_dir": str(ckpts), "device": "cpu",
                  "window_topic_prefix": PREFIX, "joint_names": JOINTS, "seed": SEED,
                  "replan_every": 1, "latency_margin": 0.0, "diagnostics_period": 0.2}
        values.update(params)
        self.node = PolicyNode(context=ctx, parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        self.cfg = self.node.graph_config
        self.tester = rclpy.create_node("tester", context=ctx)
        self.lock = threading.Lock()
        self.plans: list[JointTrajectory] = []
        self.ids: list[str] = []
        self.diag: dict[str, str] = {}
        t = self.tester
        self.image_pubs = {c: t.create_publisher(Image, window_image_topic(PREFIX, c), WINDOW_QOS)
                           for c in self.cfg.camera_names}
        self.state_pub = t.create_publisher(JointTrajectory, window_state_topic(PREFIX), WINDOW_QOS)
        t.create_subscription(JointTrajectory, "/policy_node/plan", self._on_plan, PLAN_QOS)
        t.create_subscription(String, "/policy_node/policy_id",
                              lambda m: self._record(self.ids, m.data), LATCHED_QOS)
        t.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.params = AsyncParameterClient(t, "policy_node")
        self.executor = SingleThreadedExecutor(context=ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(t)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        self.k = time.time_ns() // DT_NS  # window ticks near the node clock: plausible ages
        wait_for(lambda: all(p.get_subscription_count() for p in self.image_pubs.values())
                 and self.state_pub.get_subscription_count()
                 and t.count_publishers("/policy_node/plan"), what="discovery")
        wait_for(lambda: self.ids, what="latched policy id")

    def _record(self, into: list, item) -> None:
        with self.lock:
            into.append(item)

    def _on_plan(self, msg: JointTrajectory) -> None:
        self._record(self.plans, msg)

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == "policy_node: policy":
                with self.lock:
                    self.diag = {kv.key: kv.value for kv in status.values}
                    self.diag["_message"] = status.message

    def diagnostics(self) -> dict[str, str]:
        with self.lock:
            return dict(self.diag)

    def publish_window(self, seed: int = 0, realtime: bool = False) -> tuple[dict, int]:
        """A random window on the next tick (`realtime`: whose newest observation is now on
        the wall clock, so plan ages are real); returns it and its plan's stamp (ns)."""
        self.k += 1
        if realtime:
            self.k = max(self.k, time.time_ns() // DT_NS - (self.cfg.T_o - 1))
        window = random_obs(self.cfg, seed=seed)
        window["stamps"] = (self.k + np.arange(self.cfg.T_o)) * DT_NS * 1e-9
        images, state = encode_window(window, self.cfg.camera_names, self.cfg.state_names,
                                      self.cfg.dt)
        for cam, msg in images.items():
            self.image_pubs[cam].publish(msg)
        self.state_pub.publish(state)
        return window, (self.k + self.cfg.T_o - 1) * DT_NS

    def plan_for(self, seed: int = 0, timeout: float = 20.0):
        """Publish a window and wait for its plan; (window, plan stamp ns, plan msg)."""
        window, stamp_ns = self.publish_window(seed)
        found = []

        def arrived():
            with self.lock:
                found[:] = [p for p in self.plans if time_to_ns(p.header.stamp) == stamp_ns]
            return bool(found)

        wait_for(arrived, timeout, what=f"plan stamped {stamp_ns}")
        return window, stamp_ns, found[0]

    def set(self, **params):
        """Set parameters through the node's parameter service (what `ros2 param set` does)."""
        assert self.params.wait_for_services(timeout_sec=10.0)
        future = self.params.set_parameters([Parameter(k, value=v) for k, v in params.items()])
        wait_for(future.done, what="set_parameters response")
        return future.result().results

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(10.0)
        self.node.destroy_node()
        self.tester.destroy_node()


@pytest.fixture
def rig_factory(ros_context, ckpts):
    rigs = []

    def make(**params) -> Rig:
        rigs.append(Rig(ros_context, ckpts, **params))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def plan_positions(msg: JointTrajectory) -> np.ndarray:
    return np.array([list(p.positions) for p in msg.points])


def offline_plan(policy, window: dict, stamp_ns: int) -> np.ndarray:
    """What the node should plan (its noise convention, seed SEED). Without the window's
    stamps the frame cache keys by pixels: tests reuse stamps with other pixels."""
    window = {k: v for k, v in window.items() if k != "stamps"}
    return seeded_predict(policy, window, SEED, stamp_ns)


def source_of(msg: JointTrajectory, window: dict, stamp_ns: int, offline: dict) -> str:
    """Which offline policy reproduces this plan."""
    got = plan_positions(msg)
    for name, policy in offline.items():
        expected = offline_plan(policy, window, stamp_ns)[policy.config.T_o - 1:]
        if got.shape == expected.shape and np.allclose(got, expected, atol=1e-4):
            return name
    raise AssertionError("the plan matches none of the offline policies")


def test_plans_follow_the_contract_and_reproduce_offline(rig_factory, offline):
    rig = rig_factory()
    assert rig.ids[-1] == "A"
    cfg = offline["A"].config
    for seed in (1, 2):
        window, stamp_ns, msg = rig.plan_for(seed)
        expected = offline_plan(offline["A"], window, stamp_ns)
        assert msg.joint_names == JOINTS
        assert time_to_ns(msg.header.stamp) == stamp_ns  # newest observation of the window
        n = cfg.executable_horizon
        assert len(msg.points) == n
        assert [duration_to_ns(p.time_from_start) for p in msg.points] == \
            [k * DT_NS for k in range(n)]
        np.testing.assert_allclose(plan_positions(msg), expected[cfg.T_o - 1:], atol=1e-5)
        velocities = np.array([list(p.velocities) for p in msg.points])
        np.testing.assert_allclose(velocities, np.gradient(expected, cfg.dt, axis=0)[cfg.T_o - 1:],
                                   atol=1e-3)
    wait_for(lambda: int(rig.diagnostics().get("plans_published", 0)) >= 2, what="diagnostics")
    d = rig.diagnostics()
    assert d["policy_id"] == "A" and float(d["plan_latency_median"]) > 0.0
    assert d["plan_latency_p99"] != "None" and d["dropped_windows"] == "0"


def test_default_replanning_skips_windows_between_plans(rig_factory):
    rig = rig_factory(replan_every=0)  # = T_a = 4 steps, margin 0
    for i in range(12):  # one window at each tick, as the aggregator sends them
        time.sleep((DT_NS - time.time_ns() % DT_NS) * 1e-9)
        rig.publish_window(i, realtime=True)
    wait_for(lambda: int(rig.diagnostics().get("windows_received", 0)) >= 12, what="windows")
    time.sleep(0.3)
    with rig.lock:
        stamps = [time_to_ns(p.header.stamp) for p in rig.plans]
    # the next plan starts on the last window before the running plan's 4 steps minus the
    # plan latency end: every 3 ticks for a fast policy, 2 when slower, 1 only when a plan
    # takes over 2 ticks (a heavily loaded machine); test_replan.py checks the exact rule
    steps = [(b - a) // DT_NS for a, b in zip(stamps, stamps[1:])]
    assert len(stamps) >= 2 and max(steps) >= 2 and len(stamps) < 12, steps
    assert int(rig.diagnostics()["windows_skipped"]) >= 1


def test_window_burst_while_inference_is_slow_keeps_only_the_newest(rig_factory):
    rig = rig_factory()
    policy = rig.node.runner.policy
    fast = policy.predict
    started = threading.Event()

    def slow(obs, noise=None):
        started.set()
        time.sleep(0.5)
        return fast(obs, noise=noise)

    policy.predict = slow
    first_stamp = rig.publish_window(0)[1]
    assert started.wait(20.0)
    stamps = [rig.publish_window(i)[1] for i in range(1, 7)]  # all arrive during inference
    wait_for(lambda: any(time_to_ns(p.header.stamp) == stamps[-1] for p in list(rig.plans)),
             what="plan on the newest window")
    time.sleep(0.7)  # anything queued would show up now
    with rig.lock:
        planned = [time_to_ns(p.header.stamp) for p in rig.plans]
    assert planned[0] == first_stamp and planned[-1] == stamps[-1]
    assert len(planned) < 1 + len(stamps)
    assert rig.node.runner.dropped >= 1
    wait_for(lambda: int(rig.diagnostics().get("dropped_windows", 0)) >= 1, what="diagnostics")


def test_failing_policy_publishes_nothing_and_recovers(rig_factory):
    rig = rig_factory()
    policy = rig.node.runner.policy
    good = policy.predict
    policy.predict = lambda obs, noise=None: (_ for _ in ()).throw(RuntimeError("boom"))
    rig.publish_window(1)
    wait_for(lambda: rig.diagnostics().get("failures/A/predict_RuntimeError") == "1",
             what="exception counted")
    policy.predict = lambda obs, noise=None: np.full((8, 2), np.nan, np.float32)
    rig.publish_window(2)
    wait_for(lambda: rig.diagnostics().get("failures/A/non_finite_actions") == "1",
             what="NaN counted")
    d = rig.diagnostics()
    assert d["plan_failures"] == "2" and "non_finite_actions" in d["_message"]
    assert rig.plans == []
    policy.predict = good
    rig.plan_for(3)  # the node lives on, and the failed plans did not block the schedule


def test_valid_swap_takes_effect_between_plans(rig_factory, ckpts, offline):
    rig = rig_factory()
    real_load = rig.node.loader._load
    rig.node.loader._load = lambda *a, **kw: (time.sleep(1.5), real_load(*a, **kw))[1]
    sources = [source_of(m, w, s, offline) for w, s, m in (rig.plan_for(1),)]
    assert [r.successful for r in rig.set(policy_path=str(ckpts / "B"))] == [True]
    during_load = 0
    seed = 2
    while rig.ids[-1] != "B":  # plans keep flowing from A while B loads
        window, stamp, msg = rig.plan_for(seed)
        seed += 1
        sources.append(source_of(msg, window, stamp, offline))
        during_load += rig.node.loader.loading is not None
        assert seed < 500, "the swap never happened"
    for _ in range(2):
        window, stamp, msg = rig.plan_for(seed)
        seed += 1
        sources.append(source_of(msg, window, stamp, offline))
    assert during_load >= 1
    switch = sources.index("B")
    assert set(sources[:switch]) == {"A"} and set(sources[switch:]) == {"B"}  # atomic
    assert sources[-2:] == ["B", "B"]  # the first plan after the new id is from B
    wait_for(lambda: rig.diagnostics().get("swap_status") == "ok", what="swap diagnostics")
    d = rig.diagnostics()
    assert d["policy_id"] == "B" and d["active_policy_path"] == str(ckpts / "B")
    assert rig.node.get_parameter("policy_path").value == str(ckpts / "B")


def test_refused_swaps_and_parameters_keep_the_old_policy(rig_factory, ckpts, offline):
    rig = rig_factory()
    cases = {
        str(ckpts / "missing"): "does not exist",
        str(ckpts.parent / "outside" / "C"): "outside policy_dir",
        str(ckpts / ".." / "outside" / "C"): "outside policy_dir",
        str(ckpts / "incompatible"): "incompatible",
    }
    os.symlink(ckpts.parent / "outside" / "C", ckpts / "escape")
    try:
        cases[str(ckpts / "escape")] = "outside policy_dir"
        for path, reason in cases.items():
            [result] = rig.set(policy_path=path)
            assert not result.successful and reason in result.reason, (path, result.reason)
    finally:
        os.unlink(ckpts / "escape")
    for params, reason in [({"latency_margin": -0.1}, "latency_margin"),
                           ({"replan_every": 8}, "replan_every"),
                           ({"policy_dir": "/"}, "read-only"),
                           ({"seed": -2}, "seed"),
                           ({"warm_start_steps": 1000}, "warm_start_steps"),
                           ({"warm_start_keep_steps": 1000}, "warm_start_keep_steps")]:
        [result] = rig.set(**params)
        assert not result.successful and reason in result.reason, (params, result.reason)
    assert rig.node.get_parameter("policy_path").value == str(ckpts / "A")
    assert [r.successful for r in rig.set(latency_margin=0.05, replan_every=2)] == [True, True]
    window, stamp, msg = rig.plan_for(1)
    assert source_of(msg, window, stamp, offline) == "A" and rig.ids == ["A"]
    assert [r.successful for r in rig.set(warm_start_steps=2, warm_start_keep_steps=2)] == [True, True]
    policy = rig.node.runner.policy
    assert (policy.warm_start_steps, policy.warm_start_keep_steps) == (2, 2)  # from the next plan on


def test_corrupt_weights_fail_the_load_not_the_set(rig_factory, ckpts, offline):
    rig = rig_factory()
    assert [r.successful for r in rig.set(policy_path=str(ckpts / "corrupt"))] == [True]
    wait_for(lambda: rig.diagnostics().get("swap_status") == "failed", what="failed load")
    d = rig.diagnostics()
    assert "model.safetensors" in d["swap_last_error"] and d["swap_failures"] == "1"
    assert d["policy_id"] == "A" and d["active_policy_path"] == str(ckpts / "A")
    window, stamp, msg = rig.plan_for(1)
    assert source_of(msg, window, stamp, offline) == "A" and rig.ids == ["A"]


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux only")
def test_realtime_priority_raises_the_spinning_thread_and_the_plan_publish_only(rig_factory):
    from dp_ros.sched import request_realtime
    from test_sched import in_thread

    if not in_thread(lambda: request_realtime(7) is None):
        pytest.skip("SCHED_FIFO not permitted here")
    # built on a thread of its own (which the node raises), as `dp-ros up` builds it on the
    # thread that then spins it; the rig's spinning thread inherits the priority
    rig = in_thread(lambda: rig_factory(realtime_priority=7))
    assert rig.node.realtime_priority == 7
    assert os.sched_getscheduler(rig.thread.native_id) == os.SCHED_FIFO

    publish_policies = []

    class RecordingPublisher:
        def __init__(self, inner):
            self.inner = inner

        def publish(self, msg):
            publish_policies.append(os.sched_getscheduler(0))
            self.inner.publish(msg)
    rig.node._plan_pub = RecordingPublisher(rig.node._plan_pub)
    rig.plan_for(0)
    rig.plan_for(1)
    worker = rig.node.runner._thread
    assert publish_policies == [os.SCHED_FIFO, os.SCHED_FIFO]  # the plan goes out at once
    # and back to normal for inference (the plan may arrive before the worker has dropped)
    wait_for(lambda: os.sched_getscheduler(worker.native_id) == os.SCHED_OTHER,
             what="the worker back at normal priority")


@pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux only")
def test_a_node_built_on_a_realtime_thread_loads_its_policy_at_normal_priority(
        ros_context, ckpts, monkeypatch):
    # `dp-ros up --single-process` builds every node on one thread, which the aggregator
    # raises first: the thread pools a policy load makes must not inherit SCHED_FIFO
    import dp_ros.nodes.policy_node as policy_node_module
    from dp_ros.sched import ensure_normal_priority, request_realtime
    from test_sched import in_thread

    seen = []

    def recording_load(*args, **kwargs):
        seen.append(os.sched_getscheduler(0))
        return load_policy(*args, **kwargs)
    monkeypatch.setattr(policy_node_module, "load_policy", recording_load)

    def body():
        if request_realtime(9) is not None:
            return None
        node = PolicyNode(context=ros_context, parameter_overrides=[
            Parameter("policy_path", value=str(ckpts / "A")),
            Parameter("policy_dir", value=str(ckpts)), Parameter("device", value="cpu")])
        try:
            return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
        finally:
            node.destroy_node()
            ensure_normal_priority()
    after = in_thread(body)
    if after is None:
        pytest.skip("SCHED_FIFO not permitted here")
    assert seen == [os.SCHED_OTHER]
    assert after == (os.SCHED_FIFO, 9)  # the thread's own priority given back


def test_bad_start_parameters_are_refused(ros_context, ckpts):
    base = {"policy_dir": str(ckpts), "device": "cpu"}
    for params, reason in [({"policy_path": ""}, "empty"),
                           ({"policy_path": str(ckpts / "corrupt")}, "model.safetensors"),
                           ({"policy_path": str(ckpts / "A"), "joint_names": ["only_one"]},
                            "joint_names"),
                           ({"policy_path": str(ckpts / "A"), "replan_every": 8}, "replan_every"),
                           ({"policy_path": str(ckpts / "A"), "warm_start_keep_steps": 99},
                            "warm_start_keep_steps must be")]:
        with pytest.raises(ValueError, match=reason):
            PolicyNode(context=ros_context, parameter_overrides=[
                Parameter(k, value=v) for k, v in {**base, **params}.items()])


def test_executable_stops_cleanly_on_ctrl_c(ros_context, ckpts):
    listener = rclpy.create_node("listener", context=ros_context)
    ids = []
    listener.create_subscription(String, "/policy_node/policy_id", ids.append, LATCHED_QOS)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(listener)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dp_ros.nodes.policy_node", "--ros-args",
         "-p", f"policy_path:={ckpts / 'A'}", "-p", "device:=cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ), text=True)
    try:
        deadline = time.monotonic() + 60.0
        while not ids and time.monotonic() < deadline and proc.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        assert ids and ids[0].data == "A", proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.5)  # into rclpy.spin
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30.0)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        executor.shutdown()
        listener.destroy_node()
