"""`dp-ros bench ros`: the node pipeline's own cost, over real DDS between processes.

Setup (every part its own process, on a ROS domain of the bench's own, localhost only):
- source: 2 cameras 240x320 rgb8 at 30 Hz and 6-joint joint states at 500 Hz. Camera
  frames are stamped on the 30 Hz grid (every third one on a 10 Hz tick, like a camera
  triggered in step with the observation clock) and published by a timer due at the stamp;
  the source logs each frame's stamp and publish time. It stands in for the drivers: with
  --realtime-priority it runs at the aggregator's priority, as drivers do.
- obs_aggregator, policy_node (a small 2-camera policy so the run stays short, on
  onnxruntime by default, the faster CPU backend; it replans every 2 ticks) and
  trajectory_executor (position_stream at 100 Hz), started by the same machinery as
  `dp-ros up`.
- this process: a recorder subscribed to the plans, the commands, the windows and
  /diagnostics, using each message's DDS source timestamp (its publish time).

Figures
- pipeline overhead excluding inference, per plan: (plan published - stamp of the newest
  camera frame the window contains) - inference time - the time the window waited for the
  worker to finish the previous plan (inference too; shown on a row of its own). The
  newest frame is the newest one stamped at or before the plan's tick that was published
  before the aggregator published the window; each plan's inference time and wait come
  from the policy node's diagnostics (plan_latency_last, plan_queue_wait_last, with
  plans_published identifying the plan). Split into: camera stamp -> tick, tick -> window
  published (aggregator; of which the source's own delay in publishing the tick's frames,
  from its log), window -> plan published minus inference and wait (DDS hop +
  policy node).
- command period jitter: |period - 10 ms| between consecutive executor commands, from
  their source timestamps (and, for reference, from receive times here).
- the no-work floor (dp_ros.bench.floor, unless --no-floor): the same two figures for
  processes that only pass a stamp along the same hops at the same priorities, and for a
  bare timer, measured at the same time. What rclpy and DDS alone cost on this machine now;
  the pipeline cannot do better.
Targets (2-core machine): overhead p99 <= 5 ms, jitter p99 <= 1 ms. Printed, not asserted.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dp_ros import bringup
from dp_ros.bench import floor
from dp_ros.bench.cpu_time import read_cpu_times

CAMERAS = ("cam0", "cam1")
JOINTS = ("shoulder_pan_joint", "shoulder_lift_joint", "elbow_joint", "wrist_1_joint",
          "wrist_2_joint", "wrist_3_joint")
RAW_H, RAW_W = 240, 320
TICK_NS = 100_000_000               # observations at 10 Hz
CAMERA_PERIOD_NS = TICK_NS / 3      # 30 Hz, phase-locked to the ticks
JOINT_STATE_PERIOD = 0.002          # 500 Hz
CONTROL_PERIOD_NS = 10_000_000      # executor at 100 Hz
COMMAND_TOPIC = "/bench/commands"
TARGET_OVERHEAD_P99_MS = 5.0
TARGET_JITTER_P99_MS = 1.0
PIPELINE_PRIORITY_BELOW = 10  # the control loop comes first


def pipeline_priority(executor_priority: int) -> int:
    """The priority of the aggregator, the policy node's spinning thread and the sensor
    source: PIPELINE_PRIORITY_BELOW under the executor's."""
    return max(executor_priority - PIPELINE_PRIORITY_BELOW, 1) if executor_priority > 0 else 0


# ----------------------------------------------------------------------------- the policy

def bench_policy_config():
    """2 cameras 96x96 (crop 84), 6 joints, a narrow U-Net, DDIM 10: small enough that a
    plan takes tens of ms on a CPU, so the run stays short."""
    from dp_ros.policy.config import CameraConfig, EncoderConfig, PolicyConfig, UnetConfig
    from dp_ros.policy.normalizer import fit_stats
    cfg = PolicyConfig(cameras=[CameraConfig(name=c, height=96, width=96) for c in CAMERAS],
                       state_names=list(JOINTS), action_names=list(JOINTS),
                       encoder=EncoderConfig(crop_shape=[84, 84], num_keypoints=16,
                                             feature_dim=32),
                       unet=UnetConfig(down_dims=[64, 128], step_embed_dim=64))
    rng = np.random.default_rng(0)
    cfg.normalizer = {"state": fit_stats(rng.uniform(-1, 1, (64, cfg.state_dim))),
                      "action": fit_stats(rng.uniform(-1, 1, (64, cfg.action_dim)))}
    cfg.validate()
    return cfg


def write_bench_policy(directory: Path) -> Path:
    import torch

    from dp_ros.policy import save_checkpoint
    from dp_ros.policy.model import build_model
    cfg = bench_policy_config()
    torch.manual_seed(0)
    save_checkpoint(directory, cfg, build_model(cfg))
    return directory


def bench_parameters(policy_path: Path, device: str, realtime_priority: int = 0,
                     backend: str = "onnxruntime") -> dict:
    """The nodes' parameters; with `realtime_priority` the executor runs at it and the
    aggregator and the policy node's spinning thread PIPELINE_PRIORITY_BELOW lower, as in
    config/real_arm_template.yaml: at one priority the aggregator's image work, never
    preempted, held up the control loop."""
    return {
        "obs_aggregator": {"ros__parameters": {
            "camera_names": list(CAMERAS),
            "camera_topics": [f"/bench/{c}/image_raw" for c in CAMERAS],
            "compressed": [False] * len(CAMERAS), "camera_height": 96, "camera_width": 96,
            "joint_states_topic": "/bench/joint_states", "state_joint_names": list(JOINTS),
            "rate_hz": 1e9 / TICK_NS, "T_o": 2, "camera_staleness": 0.1, "state_staleness": 0.02,
            "tick_delay": 0.01,  # built as soon as the frame stamped on the tick is in
            "realtime_priority": pipeline_priority(realtime_priority)}},
        "policy_node": {"ros__parameters": {
            "policy_path": str(policy_path), "device": device, "joint_names": list(JOINTS),
            "replan_every": 2, "diagnostics_period": 0.02, "backend": backend,
            "realtime_priority": pipeline_priority(realtime_priority)}},
        "trajectory_executor": {"ros__parameters": {
            "joint_names": list(JOINTS), "joint_states_topic": "/bench/joint_states",
            "output_mode": "position_stream", "command_topic": COMMAND_TOPIC,
            "control_rate_hz": 1e9 / CONTROL_PERIOD_NS, "max_velocity": 10.0,
            "actuation_lead": 0.02, "autostart": True,
            "realtime_priority": realtime_priority}},
    }


# ----------------------------------------------------------------------------- the source

def run_source(log_path: str, height: int = RAW_H, width: int = RAW_W,
               cameras: tuple[str, ...] = CAMERAS, joints: tuple[str, ...] = JOINTS,
               realtime_priority: int = 0) -> int:
    """The sensor process: joint states at 500 Hz and camera frames (height x width rgb8)
    stamped on the 30 Hz grid, each on a timer of its own: the camera timer is re-armed for
    the next grid time, so a frame goes out as soon after its stamp as the executor wakes,
    like a driver that publishes on exposure. With `realtime_priority` > 0 it spins under
    SCHED_FIFO, as hardware drivers do. Runs until SIGINT/SIGTERM, then writes
    {camera: [[stamp_ns, publish_ns], ...]}."""
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState

    from dp_ros.bench.process import spin_until_stopped, start_node
    from dp_ros.nodes.window_msgs import ns_to_stamp

    node, stop = start_node("bench_source", realtime_priority)
    cam_pubs = {c: node.create_publisher(Image, f"/bench/{c}/image_raw", qos_profile_sensor_data)
                for c in cameras}
    js_pub = node.create_publisher(JointState, "/bench/joint_states", 10)
    rng = np.random.default_rng(0)
    images = {}
    for c in cameras:  # one message per camera, only the stamp changes
        msg = Image(height=height, width=width, encoding="rgb8", step=width * 3)
        msg.data = rng.integers(0, 256, (height, width, 3), dtype=np.uint8).tobytes()
        msg.header.frame_id = c
        images[c] = msg
    js = JointState(name=list(joints))
    phases = np.arange(len(joints), dtype=np.float64)
    log: dict[str, list[list[int]]] = {c: [] for c in cameras}
    clock = node.get_clock()

    def joint_state():
        now = clock.now().nanoseconds
        js.header.stamp = ns_to_stamp(now)
        t = (now % 10_000_000_000) * 1e-9
        js.position = 0.3 * np.sin(0.5 * t + phases)
        js_pub.publish(js)

    def slot_stamp(slot: int) -> int:
        return slot * TICK_NS // 3  # exact on every third slot = a tick

    def frame_slot(now_ns: int) -> int:
        """The newest slot whose stamp is at or before `now_ns` (integers: a timer that
        fires exactly at a stamp publishes that frame)."""
        return (3 * now_ns + 2) // TICK_NS

    last_slot = [frame_slot(clock.now().nanoseconds)]

    def frames():
        now = clock.now().nanoseconds
        slot = frame_slot(now)
        if slot != last_slot[0]:  # a timer a whole period late skips the missed frames
            last_slot[0] = slot
            stamp = slot_stamp(slot)
            for c, msg in images.items():
                msg.header.stamp = ns_to_stamp(stamp)
                cam_pubs[c].publish(msg)
                log[c].append([stamp, clock.now().nanoseconds])
        due = slot_stamp(last_slot[0] + 1)
        camera_timer.timer_period_ns = max(due - clock.now().nanoseconds, 100_000)
        camera_timer.reset()

    node.create_timer(JOINT_STATE_PERIOD, joint_state)
    camera_timer = node.create_timer(CAMERA_PERIOD_NS * 1e-9, frames)
    try:
        spin_until_stopped(node, stop)
    finally:
        Path(log_path).write_text(json.dumps(log))
    return 0


# ----------------------------------------------------------------------------- the recorder

@dataclass
class Recorder:
    """Subscriptions of the bench process; every entry keeps the DDS source timestamp."""

    plans: list[tuple[int, int, int]] = field(default_factory=list)  # (stamp, pub, recv) ns
    commands: list[tuple[int, int]] = field(default_factory=list)    # (pub, recv) ns
    windows: dict[int, int] = field(default_factory=dict)            # newest tick -> pub ns
    diagnostics: list[tuple[int, float, float]] = field(default_factory=list)  # (n, L, age)
    executor_status: dict[str, str] = field(default_factory=dict)
    floor_plans: list[tuple[int, int]] = field(default_factory=list)  # (tick stamp, pub) ns
    floor_windows: dict[int, int] = field(default_factory=dict)       # tick stamp -> pub ns
    floor_commands: list[int] = field(default_factory=list)           # pub ns
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, node) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import Float64MultiArray, Header
        from trajectory_msgs.msg import JointTrajectory

        from dp_ros.nodes.window_msgs import WINDOW_QOS, window_state_topic
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(JointTrajectory, "/policy_node/plan", self._on_plan, reliable)
        node.create_subscription(Float64MultiArray, COMMAND_TOPIC, self._on_command, reliable)
        node.create_subscription(JointTrajectory, window_state_topic("/obs_aggregator"),
                                 self._on_window, WINDOW_QOS)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 100)
        node.create_subscription(Header, floor.ECHO_TOPIC, self._on_floor_plan, reliable)
        node.create_subscription(Header, floor.RELAY_TOPIC, self._on_floor_window, WINDOW_QOS)
        node.create_subscription(Header, floor.TIMER_TOPIC, self._on_floor_command, reliable)

    @staticmethod
    def _stamp(msg) -> int:
        return Recorder._ns(msg.header.stamp)

    @staticmethod
    def _ns(stamp) -> int:
        from dp_ros.nodes.window_msgs import stamp_to_ns  # ROS messages: imported on use
        return stamp_to_ns(stamp)

    def _on_plan(self, msg, info) -> None:
        with self.lock:
            self.plans.append((self._stamp(msg), info["source_timestamp"],
                               info["received_timestamp"]))

    def _on_command(self, msg, info) -> None:
        with self.lock:
            self.commands.append((info["source_timestamp"], info["received_timestamp"]))

    def _on_floor_plan(self, msg, info) -> None:
        with self.lock:
            self.floor_plans.append((self._ns(msg.stamp), info["source_timestamp"]))

    def _on_floor_window(self, msg, info) -> None:
        with self.lock:
            self.floor_windows[self._ns(msg.stamp)] = info["source_timestamp"]

    def _on_floor_command(self, msg, info) -> None:
        with self.lock:
            self.floor_commands.append(info["source_timestamp"])

    def _on_window(self, msg, info) -> None:
        newest = self._stamp(msg) + (len(msg.points) - 1) * TICK_NS
        with self.lock:
            self.windows[newest] = info["source_timestamp"]

    def _on_diagnostics(self, msg) -> None:
        for status in msg.status:
            values = {kv.key: kv.value for kv in status.values}
            if status.name.startswith("policy_node") and "plans_published" in values:
                try:
                    entry = (int(values["plans_published"]), float(values["plan_latency_last"]),
                             float(values["plan_age_last"]),
                             float(values["plan_queue_wait_last"]))
                except ValueError:  # "None" before the first plan
                    continue
                with self.lock:
                    self.diagnostics.append(entry)
            elif "executor" in status.name:
                with self.lock:
                    self.executor_status = values


# ----------------------------------------------------------------------------- analysis

def percentiles(values, qs=(50, 99)) -> list[float]:
    return [float(np.percentile(values, q)) for q in qs] if len(values) else [float("nan")] * len(qs)


def inference_per_plan(diagnostics: list[tuple[int, float, float, float]]
                       ) -> dict[int, tuple[float, float, float]]:
    """plans_published n -> (inference s, plan age s, queue wait s) of plan n, from snapshots
    seen at least twice alike (a snapshot taken between the two updates of one plan is
    never repeated, so it is discarded)."""
    seen: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for n, *entry in diagnostics:
        seen[n].append(tuple(entry))
    out = {}
    for n, entries in seen.items():
        if len(entries) >= 2 and entries[-1] == entries[-2]:
            out[n] = entries[-1]
    return out


@dataclass
class BenchResult:
    overhead_ms: np.ndarray
    camera_to_tick_ms: np.ndarray
    aggregator_ms: np.ndarray
    camera_publish_ms: np.ndarray  # tick -> the window's newest frames published by the source
    policy_overhead_ms: np.ndarray
    inference_ms: np.ndarray
    queue_wait_ms: np.ndarray
    jitter_ms: np.ndarray
    jitter_recv_ms: np.ndarray
    commands: int
    missed_periods: int
    plans: int
    seconds: float
    floor_overhead_ms: np.ndarray  # the no-work floor (dp_ros.bench.floor): tick -> echoed
    floor_relay_ms: np.ndarray     # the no-work floor: tick -> relayed (the aggregator's part)
    floor_jitter_ms: np.ndarray    # the no-work floor: a bare timer's period jitter


def analyse(rec: Recorder, frames: dict[str, list[list[int]]], t_start: int, t_end: int
            ) -> BenchResult:
    with rec.lock:
        plans = list(rec.plans)
        commands = list(rec.commands)
        windows = dict(rec.windows)
        diag = list(rec.diagnostics)
        floor_plans = list(rec.floor_plans)
        floor_windows = dict(rec.floor_windows)
        floor_commands = list(rec.floor_commands)
    per_plan = inference_per_plan(diag)
    # plan n of the diagnostics is the n-th plan published; if the recorder matched the
    # policy node only after its first plan(s) (a slow start can take several), find that
    # offset from the plan ages
    def consistent(offset: int) -> int:
        return sum(1 for i, (stamp, pub, _) in enumerate(plans)
                   if (i + 1 + offset) in per_plan
                   and abs((pub - stamp) * 1e-9 - per_plan[i + 1 + offset][1]) <= 0.005)
    offset = max(range(max(per_plan, default=0) + 1), key=consistent)
    frame_arr = {c: np.array(v, dtype=np.int64).reshape(-1, 2) for c, v in frames.items()}
    overhead, cam_tick, agg, cam_pub, pol, inf, wait = [], [], [], [], [], [], []
    for n, (stamp, pub, _) in enumerate(plans, start=1 + offset):
        if not t_start <= pub <= t_end or n not in per_plan:
            continue
        latency, age, queue_wait = per_plan[n]
        if abs((pub - stamp) * 1e-9 - age) > 0.005:
            continue  # the diagnostics entry is not this plan (a plan the recorder missed)
        window_pub = windows.get(stamp)
        newest, published = None, None  # newest frame stamp; when the last frame used went out
        for arr in frame_arr.values():
            ok = arr[:, 0] <= stamp
            if window_pub is not None:
                ok &= arr[:, 1] < window_pub
            if ok.any():
                i = int(np.argmax(np.where(ok, arr[:, 0], np.iinfo(np.int64).min)))
                newest = int(arr[i, 0]) if newest is None else max(newest, int(arr[i, 0]))
                published = int(arr[i, 1]) if published is None else max(published, int(arr[i, 1]))
        if newest is None:
            continue
        busy = (latency + queue_wait) * 1e3  # inference, this plan's and the one before it
        overhead.append((pub - newest) * 1e-6 - busy)
        cam_tick.append((stamp - newest) * 1e-6)
        inf.append(latency * 1e3)
        wait.append(queue_wait * 1e3)
        if window_pub is not None:
            agg.append((window_pub - stamp) * 1e-6)
            cam_pub.append((published - stamp) * 1e-6)
            pol.append((pub - window_pub) * 1e-6 - busy)
    def periods(times) -> np.ndarray:  # between consecutive events, ns
        return np.diff(np.sort(np.array(list(times), np.int64)))

    def jitter(periods_ns: np.ndarray) -> np.ndarray:
        return np.abs(periods_ns - CONTROL_PERIOD_NS) * 1e-6

    inside = [(p, r) for p, r in commands if t_start <= p <= t_end]
    command_periods = periods(p for p, _ in inside)
    floor_inside = [(stamp, p) for stamp, p in floor_plans if t_start <= p <= t_end]
    return BenchResult(
        np.array(overhead), np.array(cam_tick), np.array(agg), np.array(cam_pub),
        np.array(pol), np.array(inf), np.array(wait), jitter(command_periods),
        jitter(periods(r for _, r in inside)), len(inside),
        int(np.sum(command_periods > 1.5 * CONTROL_PERIOD_NS)),
        sum(1 for _, p, _ in plans if t_start <= p <= t_end), (t_end - t_start) * 1e-9,
        np.array([(p - stamp) * 1e-6 for stamp, p in floor_inside]),
        np.array([(floor_windows[stamp] - stamp) * 1e-6 for stamp, _ in floor_inside
                  if stamp in floor_windows]),
        jitter(periods(t for t in floor_commands if t_start <= t <= t_end)))


def report(r: BenchResult, load: Optional[tuple[float, float]] = None,
           cpu: Optional[tuple[float, float]] = None, floor_ran: bool = True) -> str:
    def row(label, values, target=None):
        p50, p99 = percentiles(values)
        tail = f"   target p99 <= {target:g} ms" if target is not None else ""
        return f"  {label:<46}{p50:>8.2f}{p99:>9.2f}   (n={len(values)}){tail}"
    lines = [
        f"measured {r.seconds:.1f} s: {r.plans} plans, {r.commands} commands",
        f"  {'':<46}{'p50 ms':>8}{'p99 ms':>9}",
        row("pipeline overhead excl. inference", r.overhead_ms, TARGET_OVERHEAD_P99_MS),
        floor_ran and row("  no-work floor: same hops, nothing done", r.floor_overhead_ms),
        floor_ran and row("    of which tick -> relayed (the aggregator's hop)", r.floor_relay_ms),
        row("  camera stamp -> tick (frame age at the tick)", r.camera_to_tick_ms),
        row("  tick -> window published (aggregator)", r.aggregator_ms),
        row("    of which the camera: tick -> frames published", r.camera_publish_ms),
        row("  window -> plan published - inference - wait", r.policy_overhead_ms),
        row("inference (policy node diagnostics)", r.inference_ms),
        row("wait for the worker (previous plan running)", r.queue_wait_ms),
        row("command period jitter |T - 10 ms| (publish)", r.jitter_ms, TARGET_JITTER_P99_MS),
        row("  same, from receive times in this process", r.jitter_recv_ms),
        floor_ran and row("  no-work floor: a bare timer, same priority", r.floor_jitter_ms),
        f"  command periods > 15 ms: {r.missed_periods} of {max(r.commands - 1, 0)}",
    ]
    lines = [line for line in lines if line]
    if load is not None:
        lines.append(f"  load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
                     f"on {os.cpu_count()} CPUs (other work on the machine skews the figures)")
    if cpu is not None:
        lines.append(f"  CPU time while measuring: busy {cpu[0]:.0%}, stolen by the hypervisor "
                     f"{cpu[1]:.0%} (a vCPU taken away for milliseconds shows in every p99 "
                     "here, whatever the priority)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver

def _wait(cond, timeout: float, group: bringup.ProcessGroup, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for child in group.poll():
            raise RuntimeError(f"{child.spec.name} exited with code {child.returncode} "
                               f"while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Pipeline:
    """The driver shared by `dp-ros bench ros` and `dp-ros soak`: a sensor source and the
    dp_ros nodes each in their own process (the machinery of `dp-ros up`), on a ROS domain
    of their own (localhost only), plus a node in this process, spun on a thread, that
    `attach` callbacks subscribe with. `helpers`: more processes (name -> `python -m`
    command line) started with the source. Children's output goes to <tmp>/logs/<name>.log;
    on failure the last lines are printed. Use as a context manager."""

    def __init__(self, tmp_path: Path, params: dict, source_cmd: list[str],
                 attach, domain_id: Optional[int] = None,
                 nodes: tuple[str, ...] = ("obs_aggregator", "policy_node",
                                           "trajectory_executor"),
                 node_name: str = "bench_recorder",
                 helpers: Optional[dict[str, list[str]]] = None):
        import yaml
        self.domain = domain_id if domain_id is not None else 150 + os.getpid() % 80
        os.environ["ROS_DOMAIN_ID"] = str(self.domain)
        os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
        self.params = Path(tmp_path) / "pipeline.yaml"
        # rcl's parameter-file parser refuses YAML aliases: never emit them
        dumper = type("NoAliases", (yaml.SafeDumper,), {"ignore_aliases": lambda *_: True})
        self.params.write_text(yaml.dump(params, Dumper=dumper, sort_keys=False))
        self.logs = Path(tmp_path) / "logs"
        self.logs.mkdir(exist_ok=True)
        # each command is [python, -m, module, ...]
        children = [bringup.Child(bringup.NodeSpec(name, "", cmd[2], ""), cmd)
                    for name, cmd in {"source": source_cmd, **(helpers or {})}.items()]
        for spec in (bringup.node_spec(n) for n in nodes):
            children.append(bringup.Child(spec, bringup.process_command(spec, self.params)))
        self.group = bringup.ProcessGroup(children, env=bringup.child_env(), log_dir=self.logs)
        self._attach = attach
        self._node_name = node_name
        self._spinning = threading.Event()

    def __enter__(self) -> "Pipeline":
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        rclpy.init(domain_id=self.domain)
        self.node = rclpy.create_node(self._node_name)
        self._attach(self.node)
        self._executor = SingleThreadedExecutor()
        self._executor.add_node(self.node)
        self._spinning.set()

        def spin():
            while self._spinning.is_set():
                self._executor.spin_once(timeout_sec=0.05)
        self._spinner = threading.Thread(target=spin, daemon=True)
        self._spinner.start()
        self.group.start()
        return self

    def pids(self) -> dict[str, int]:
        return {c.spec.name: c.process.pid for c in self.group.children
                if c.process is not None and c.returncode is None}

    def wait(self, cond, timeout: float, what: str) -> None:
        """Until cond() holds; RuntimeError if a child exits or after timeout."""
        _wait(cond, timeout, self.group, what)

    def print_logs(self, lines: int = 15) -> None:
        for log in sorted(self.logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)

    def __exit__(self, exc_type, exc, tb) -> None:
        import rclpy
        try:
            self.group.stop()
        finally:
            self._spinning.clear()
            self._spinner.join(5)
            self._executor.shutdown()
            self.node.destroy_node()
            rclpy.try_shutdown()
        if exc_type is not None:
            self.print_logs()


def run(seconds: float = 30.0, device: str = "cpu", warmup: float = 5.0,
        domain_id: Optional[int] = None, realtime_priority: int = 0,
        backend: str = "onnxruntime", with_floor: bool = True) -> int:
    with tempfile.TemporaryDirectory(prefix="dp_ros_bench_") as tmp:
        tmp_path = Path(tmp)
        rt = "normal scheduling"
        if realtime_priority:
            rt = (f"executor at SCHED_FIFO {realtime_priority}; aggregator, policy node and "
                  f"source at {pipeline_priority(realtime_priority)}")
        print(f"bench ros: policy on {device} ({backend}), {rt}; writing a small 2-camera "
              "policy ...", flush=True)
        policy = write_bench_policy(tmp_path / "policy")
        frame_log = tmp_path / "frames.json"
        load_before = os.getloadavg()[0]
        rec = Recorder()
        try:
            params = bench_parameters(policy, device, realtime_priority, backend)
            source = source_command(frame_log,
                                    realtime_priority=pipeline_priority(realtime_priority))
            aggregator = params["obs_aggregator"]["ros__parameters"]
            helpers = None if not with_floor else floor.commands(
                aggregator["camera_topics"], aggregator["joint_states_topic"], TICK_NS,
                CONTROL_PERIOD_NS, pipeline_priority(realtime_priority), realtime_priority)
            with Pipeline(tmp_path, params, source, rec.attach, domain_id,
                          helpers=helpers) as pipe:
                print(f"ROS domain {pipe.domain} (localhost only); waiting for the first "
                      "plans ...", flush=True)
                pipe.wait(lambda: len(rec.plans) >= 5, 180.0, "plans")
                print(f"warming up {warmup:g} s, then measuring {seconds:g} s ...", flush=True)
                time.sleep(warmup)
                cpu_start = read_cpu_times()
                t_start = time.time_ns()  # measurement window on the system clock = the stamps'
                pipe.wait(lambda: time.time_ns() - t_start >= seconds * 1e9, seconds + 30,
                          "the measurement")
                t_end = time.time_ns()
                cpu_end = read_cpu_times()
        except RuntimeError as err:
            print(f"bench ros: {err}", file=sys.stderr)
            return 1
        frames = json.loads(frame_log.read_text()) if frame_log.exists() else {}
        if not frames:
            print("bench ros: the source wrote no frame log", file=sys.stderr)
            return 1
        result = analyse(rec, frames, t_start, t_end)
        cpu = cpu_end.share_since(cpu_start) if cpu_start and cpu_end else None
        print(report(result, (load_before, os.getloadavg()[0]), cpu, with_floor))
        status = rec.executor_status
        if status:
            print(f"  executor: {status.get('status')}, plans accepted "
                  f"{status.get('plans_accepted')}, late points dropped "
                  f"{status.get('late_points')}")
        return 0


def source_command(frame_log: Path, height: int = RAW_H, width: int = RAW_W,
                   cameras: tuple[str, ...] = CAMERAS, joints: tuple[str, ...] = JOINTS,
                   realtime_priority: int = 0) -> list[str]:
    return [sys.executable, "-m", "dp_ros.bench.ros", "source", str(frame_log), str(height),
            str(width), ",".join(cameras), ",".join(joints), str(realtime_priority)]


def main(argv: list[str]) -> int:
    if len(argv) == 7 and argv[0] == "source":
        return run_source(argv[1], int(argv[2]), int(argv[3]), tuple(argv[4].split(",")),
                          tuple(argv[5].split(",")), int(argv[6]))
    print("usage: python -m dp_ros.bench.ros source FRAME_LOG H W CAMS JOINTS PRIORITY  "
          "(use `dp-ros bench ros`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
