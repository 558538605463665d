"""Closed-loop evaluation of a policy on the simulated arm, through real DDS topics.

``run_closed_loop(policy_path, episodes=20)`` starts the node set of ``dp-ros up`` with
the demo robot's parameter file, every node on ``use_sim_time``: policy_node in a process
of its own (as ``dp-ros up`` runs it: inference never shares a GIL with the control
loop), sim_arm, obs_aggregator and trajectory_executor in this process under one
single-threaded executor, plus a small supervisor node. Then it runs seeded episodes:

    disable the executor -> ~/reset the sim (next seed) -> wait until the policy has
    planned on observations of the new episode only -> enable the executor -> watch
    sim_arm/~/task until success, collision or the time limit

The supervisor publishes ``/clock`` in 10 ms steps: simulated time runs at up to
``speed`` times the wall clock when inference keeps up (a plan arrives within
AGE_BUDGET of its stamp), slows down to real time when it does not, and never runs
ahead of the simulated arm (it waits when the arm's joint states fall behind, e.g. on a
loaded machine). Plan latency on that clock is the speed times the wall-clock inference
time: the receding-horizon schedule copes with it as it would on a robot.

Per episode it records success, collision, side, the time from enable to the goal, the
executed end-effector and joint paths, and whether the arm changed sides after
committing to one (mode commitment). Plan latency comes from the policy node's
/diagnostics. The DDS domain is the caller's choice (``domain_id``; ``dp-ros demo`` uses a
domain of its own, localhost only); the runner refuses to run when anything else on that
domain publishes /clock, /joint_states or arm commands (a real arm must never be driven
by the demo, and a second clock would corrupt the run).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from dp_ros.sim.task import Episode, lateral_offset

DEFAULT_PARAMS = "demo_robot.yaml"
CLOCK_START = 100.0       # s; simulated time starts here (0 means "no clock yet" to nodes)
CLOCK_STEP = 0.01         # s of simulated time per /clock message (100 Hz timers fire)
ARM_LAG_LIMIT = 0.05      # s; the clock waits while the arm's joint states lag more
AGE_BUDGET = 0.3          # s of sim time from a plan's stamp to its arrival, at most
SETTLE = 0.2              # s of sim time between disabling the executor and the reset
COMMIT_OFFSET = 0.2       # m from the start -> goal axis: the arm has committed to a side
WALL_TIMEOUT = 60.0       # s of wall time without progress before giving up


class ClosedLoopError(RuntimeError):
    """The system did not come up or stopped responding (names what is missing)."""


# ----------------------------------------------------------------------------- results

@dataclass
class EpisodeRecord:
    index: int
    episode: Episode
    success: bool
    collision: bool
    timed_out: bool
    side: Optional[str]
    time: Optional[float]          # s of sim time from enable to the goal (None: not reached)
    duration: float                # s of sim time from enable to the end of the episode
    min_clearance: Optional[float]
    switched_sides: bool           # crossed to the other side after committing
    wall_seconds: float
    times: np.ndarray = field(repr=False)    # (M,) sim s from enable
    ee: np.ndarray = field(repr=False)       # (M, 2) end-effector path
    joint_times: np.ndarray = field(repr=False)  # (M,) the same times
    joints: np.ndarray = field(repr=False)       # (M, n) joint positions (/joint_states)
    # per plan switch while the executor ran: the largest change (over joints) of the
    # commanded reference velocity at the takeover, rad/s (PlanExecutor.submit)
    switch_jumps: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def seed(self) -> int:
        return self.episode.seed

    def to_dict(self, with_paths: bool = False) -> dict:
        d = {"index": self.index, "seed": self.seed, "success": self.success,
             "collision": self.collision, "timed_out": self.timed_out, "side": self.side,
             "time": self.time, "duration": self.duration, "min_clearance": self.min_clearance,
             "switched_sides": self.switched_sides, "wall_seconds": self.wall_seconds,
             "switch_jumps": self.switch_jumps.tolist()}
        if with_paths:
            d.update(episode=self.episode.to_dict(), times=self.times.tolist(),
                     ee=self.ee.tolist(), joint_times=self.joint_times.tolist(),
                     joints=self.joints.tolist())
        return d


@dataclass
class ClosedLoopResult:
    policy_path: str
    policy_id: str
    episodes: list[EpisodeRecord]
    plan_latency: dict[str, Optional[float]]   # wall s: median, p99 (policy diagnostics)
    plan_age: dict[str, Optional[float]]       # sim s, stamp -> received: median, p99
    speed: float                               # achieved sim s per wall s while running
    wall_seconds: float
    diagnostics: dict[str, str] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.episodes)

    def rate(self, predicate: Callable[[EpisodeRecord], bool]) -> float:
        return sum(1 for e in self.episodes if predicate(e)) / max(1, self.n)

    @property
    def success_rate(self) -> float:
        return self.rate(lambda e: e.success)

    def side_share(self, side: str) -> float:
        """Share of all episodes that succeeded on ``side``."""
        return self.rate(lambda e: e.success and e.side == side)

    @property
    def collisions(self) -> int:
        return sum(e.collision for e in self.episodes)

    @property
    def side_switches(self) -> int:
        return sum(e.switched_sides for e in self.episodes)

    @property
    def switch_jumps(self) -> np.ndarray:
        return np.concatenate([e.switch_jumps for e in self.episodes] or [np.zeros(0)])

    def summary(self) -> dict[str, Any]:
        return {"policy": self.policy_id, "episodes": self.n,
                "success_rate": self.success_rate, "left": self.side_share("left"),
                "right": self.side_share("right"), "collisions": self.collisions,
                "timeouts": sum(e.timed_out for e in self.episodes),
                "side_switches": self.side_switches,
                "plan_latency_median_ms": _ms(self.plan_latency.get("median")),
                "plan_latency_p99_ms": _ms(self.plan_latency.get("p99")),
                "plan_age_median_ms": _ms(self.plan_age.get("median")),
                "switch_jump_mean": _mean_or_none(self.switch_jumps, np.mean),
                "switch_jump_max": _mean_or_none(self.switch_jumps, np.max),
                "speed": self.speed, "wall_seconds": self.wall_seconds}

    def to_json(self, with_paths: bool = False) -> str:
        return json.dumps({"summary": self.summary(),
                           "episodes": [e.to_dict(with_paths) for e in self.episodes]})


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else 1e3 * seconds


def _mean_or_none(values: np.ndarray, reduce) -> Optional[float]:
    return float(reduce(values)) if len(values) else None


def switched_sides(ee: np.ndarray, episode: Episode, commit: float = COMMIT_OFFSET) -> bool:
    """True when the end effector, once more than ``commit`` m to one side of the line from
    where it started (``ee[0]``) to the goal centre, later gets more than ``commit`` m to
    the other side. The line through the start, not the arm's base: a start up to ~0.17 m
    off the base -> goal axis would otherwise count a small first move as a commitment."""
    ee = np.asarray(ee, dtype=float).reshape(-1, 2)
    if len(ee) == 0:
        return False
    off = lateral_offset(ee, episode, origin=ee[0])
    beyond = np.abs(off) > commit
    if not beyond.any():
        return False
    first = int(np.argmax(beyond))
    sign = np.sign(off[first])
    return bool(np.any(off[first:] * sign < -commit))


# ----------------------------------------------------------------------------- runner

def policy_overrides(policy_path: str | Path) -> dict[str, dict[str, Any]]:
    """Aggregator and policy-node settings that must agree with the checkpoint (image
    size, T_o, rate, joint names): read from its config.json, so any checkpoint trained
    on the demo arm runs with the demo parameter file."""
    from dp_ros.policy.checkpoint import load_config
    cfg = load_config(policy_path)
    if len(cfg.cameras) != 1:
        raise ValueError(f"{policy_path}: the demo arm has one camera, the policy expects "
                         f"{len(cfg.cameras)} ({cfg.camera_names})")
    cam = cfg.cameras[0]
    return {"obs_aggregator": {"camera_names": [cam.name], "camera_height": cam.height,
                               "camera_width": cam.width, "T_o": cfg.T_o,
                               "rate_hz": 1.0 / cfg.dt,
                               "state_joint_names": list(cfg.state_names)},
            "policy_node": {"joint_names": list(cfg.action_names)}}


class _Supervisor:
    """The supervising node: /clock, episode resets, executor enable, observation of the
    task, paths, plans and diagnostics. Callbacks only store data under a lock."""

    def __init__(self, context, speed: float, age_budget: float):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import JointState
        from std_msgs.msg import String
        from std_srvs.srv import SetBool, Trigger
        from trajectory_msgs.msg import JointTrajectory

        self._Clock = Clock
        self.node = rclpy.create_node("closed_loop_supervisor", context=context)
        n = self.node
        self.lock = threading.Lock()
        self.max_speed = self.speed = max(1.0, float(speed))
        self.age_budget = float(age_budget)
        self.watchdog: Callable[[], None] = lambda: None
        self.sim_time = CLOCK_START
        self.wall_running = 0.0   # wall s the clock was advancing
        self.sim_advanced = 0.0   # sim s it advanced meanwhile
        self.task: Optional[dict] = None
        self.js_stamp: Optional[float] = None
        self.recording = False
        self.js_log: list[tuple[float, tuple[float, ...]]] = []
        self.plan_stamps: list[float] = []
        self.plan_ages: list[float] = []
        self.policy_status: dict[str, str] = {}
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.clock_pub = n.create_publisher(Clock, "/clock", 10)
        n.create_subscription(String, "/sim_arm/task", self._on_task, latched)
        n.create_subscription(JointState, "/joint_states", self._on_js, 100)
        n.create_subscription(JointTrajectory, "/policy_node/plan", self._on_plan,
                              QoSProfile(depth=4, reliability=ReliabilityPolicy.RELIABLE))
        n.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.reset_client = n.create_client(Trigger, "/sim_arm/reset")
        self.enable_client = n.create_client(SetBool, "/trajectory_executor/enable")
        self._Trigger, self._SetBool = Trigger, SetBool
        self._clock_thread = threading.Thread(target=self._clock_loop, name="sim_clock",
                                              daemon=True)
        self._stop = threading.Event()

    # -- clock
    def start_clock(self) -> None:
        self._clock_thread.start()

    def _clock_loop(self) -> None:
        """Steps of CLOCK_STEP sim seconds, one every CLOCK_STEP / speed wall seconds; a
        step is skipped while the arm lags (its joint states are not yet out for the
        current time). Time lost to a busy machine is not caught up in a burst."""
        step_ns = int(round(CLOCK_STEP * 1e9))
        t_ns = int(round(self.sim_time * 1e9))
        last = due = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            with self.lock:
                lagging = self.js_stamp is not None and \
                    self.sim_time - self.js_stamp > ARM_LAG_LIMIT
                self.wall_running += now - last
                if not lagging:
                    t_ns += step_ns
                    self.sim_time = t_ns * 1e-9
                    self.sim_advanced += CLOCK_STEP
                speed = self.speed
            last = now
            msg = self._Clock()
            msg.clock.sec, msg.clock.nanosec = divmod(t_ns, 1_000_000_000)
            try:
                self.clock_pub.publish(msg)
            except Exception:  # context shut down under us
                return
            due = max(due + CLOCK_STEP / speed, time.monotonic() - CLOCK_STEP / speed)
            self._stop.wait(max(0.0, due - time.monotonic()))

    def now(self) -> float:
        with self.lock:
            return self.sim_time

    def stop(self) -> None:
        self._stop.set()
        if self._clock_thread.is_alive():
            self._clock_thread.join(timeout=2.0)

    # -- subscriptions
    def _on_task(self, msg) -> None:
        data = json.loads(msg.data)
        with self.lock:
            self.task = data

    def _on_js(self, msg) -> None:
        t = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        with self.lock:
            self.js_stamp = t if self.js_stamp is None else max(self.js_stamp, t)
            if self.recording:
                self.js_log.append((t, tuple(msg.position)))

    def _on_plan(self, msg) -> None:
        t = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        with self.lock:
            self.plan_stamps.append(t)
            age = self.sim_time - t
            self.plan_ages.append(age)
            # plan latency on the sim clock is speed x the wall-clock inference time: slow
            # the clock down (to real time at the least) when plans come late, speed up
            # again when they are early
            if age > self.age_budget:
                self.speed = max(1.0, self.speed * 0.8)
            elif age < 0.5 * self.age_budget:
                self.speed = min(self.max_speed, self.speed * 1.1)

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name.startswith("policy_node"):
                with self.lock:
                    self.policy_status = {kv.key: kv.value for kv in status.values}

    # -- services (called from the orchestrating thread; the executor runs elsewhere)
    def call(self, client, request, what: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while not client.wait_for_service(timeout_sec=0.2):
            if time.monotonic() > deadline:
                raise ClosedLoopError(f"{what}: service {client.srv_name} not available")
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda f: done.set())
        if not done.wait(timeout):
            raise ClosedLoopError(f"{what}: no response from {client.srv_name} in {timeout} s")
        return future.result()

    def set_enabled(self, enabled: bool) -> str:
        req = self._SetBool.Request()
        req.data = bool(enabled)
        res = self.call(self.enable_client, req, "enable" if enabled else "disable")
        if not res.success:
            raise ClosedLoopError(f"trajectory_executor refused to "
                                  f"{'enable' if enabled else 'disable'}: {res.message}")
        return res.message

    def reset(self) -> Episode:
        res = self.call(self.reset_client, self._Trigger.Request(), "reset")
        if not res.success:
            raise ClosedLoopError(f"sim_arm reset failed: {res.message}")
        return Episode.from_dict(json.loads(res.message))

    def wait_sim(self, predicate: Callable[[], bool], what: str,
                 wall_timeout: float = WALL_TIMEOUT) -> None:
        """Block until predicate() (polled), or raise naming ``what``."""
        deadline = time.monotonic() + wall_timeout
        while not predicate():
            self.watchdog()
            if time.monotonic() > deadline:
                raise ClosedLoopError(f"timed out after {wall_timeout:.0f} s waiting for {what}")
            time.sleep(0.005)

    def destroy(self) -> None:
        self.stop()
        self.node.destroy_node()


def run_closed_loop(policy_path: str | Path, episodes: int = 20, seed: int = 0,
                    params_file: str | Path = DEFAULT_PARAMS, speed: float = 2.0,
                    time_limit: Optional[float] = None, noise_seed: int = 0,
                    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                    domain_id: Optional[int] = None,
                    separate_processes: Sequence[str] = ("policy_node",),
                    torch_threads: int = 1,
                    on_episode: Optional[Callable[[EpisodeRecord], None]] = None,
                    log: Callable[[str], None] = lambda s: None) -> ClosedLoopResult:
    """Run ``episodes`` seeded episodes (seeds ``seed`` .. ``seed + episodes - 1``) of the
    simulated task with the policy at ``policy_path`` closed loop through DDS.

    ``time_limit``: s of sim time from enabling the executor (default: the task's own);
    the task's limit, counted from the reset, applies too. ``speed``: simulated seconds
    per wall second at most (the clock slows down, to real time at the least, when plans
    arrive late). ``noise_seed``: the policy node's seed (reproducible plans).
    ``overrides``: extra parameters per node name, applied last. ``separate_processes``:
    nodes started as child processes (``python -m <module> --ros-args ...``, as
    ``dp-ros up``); by default the policy node, so inference does not share the GIL with
    the arm, the aggregator and the executor. ``torch_threads``: OMP_NUM_THREADS of the
    policy node (on a 2-core machine 1 is fastest). ``on_episode`` is called after each
    episode (progress output)."""
    import os

    import rclpy
    from rclpy.parameter import Parameter

    from dp_ros import bringup
    from dp_ros.policy.checkpoint import load_config

    started = time.monotonic()
    policy_path = str(Path(policy_path).expanduser().resolve())
    cfg = load_config(policy_path)
    params, specs, node_overrides = bringup.plan_up(params_file, policy_path, use_sim_time=True)
    names = [s.name for s in specs]
    if "sim_arm" not in names:
        raise ClosedLoopError(f"{params}: no sim_arm section: closed-loop evaluation needs the "
                              "simulated arm")
    for name, values in policy_overrides(policy_path).items():
        node_overrides[name].update(values)
    node_overrides["trajectory_executor"]["autostart"] = False
    node_overrides["policy_node"]["seed"] = int(noise_seed)
    node_overrides["policy_node"]["device"] = "cpu"
    for name, values in (overrides or {}).items():
        node_overrides.setdefault(name, {}).update(values)
    unknown = sorted(set(separate_processes) - set(names))
    if unknown:
        raise ValueError(f"separate_processes: {unknown} not in the node set {names}")
    local = [s for s in specs if s.name not in separate_processes]
    remote = [s for s in specs if s.name in separate_processes]
    if "sim_arm" not in [s.name for s in local]:
        raise ValueError("sim_arm must run in this process (the supervisor sets its seed)")

    if any(s.name == "policy_node" for s in local):
        import torch
        torch.set_num_threads(int(torch_threads))
    env = dict(os.environ)
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(int(domain_id))
    env["OMP_NUM_THREADS"] = str(int(torch_threads))
    group = bringup.ProcessGroup(
        [bringup.Child(s, bringup.process_command(s, params, node_overrides[s.name]))
         for s in remote], env=env)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    nodes, sup, executor, spin_thread = [], None, None, None
    try:
        sup = _Supervisor(context, speed, age_budget=AGE_BUDGET)
        sup.start_clock()
        nodes = bringup.create_nodes(local, params, node_overrides, context=context)
        group.start()
        by_name = {n.get_name(): n for n in nodes}
        # one thread: rclpy's multi-threaded executor costs several times more CPU per
        # callback, and nothing here blocks (services are called from this thread)
        executor = bringup.make_executor(context)
        for node in nodes + [sup.node]:
            executor.add_node(node)
        spin_thread = threading.Thread(target=executor.spin, name="closed_loop_spin",
                                       daemon=True)
        spin_thread.start()
        # episode k after setting the seed parameter is sample_episode(seed + k), k from 0
        by_name["sim_arm"].set_parameters([Parameter("seed", value=int(seed))])

        def alive() -> None:
            ended = group.poll()
            if ended:
                raise ClosedLoopError(f"{', '.join(c.spec.name for c in ended)} exited with "
                                      f"code {ended[0].returncode} (see its output above)")
        sup.watchdog = alive
        sup.wait_sim(lambda: sup.js_stamp is not None and sup.plan_stamps,
                     "the first joint state and plan (is the policy node planning?)",
                     wall_timeout=WALL_TIMEOUT + 60.0)
        _check_alone(sup.node, domain_id)
        log(f"running {episodes} episodes with {Path(policy_path).name} at up to "
            f"{speed:g}x real time")
        # plan switches (velocity jumps) are read from the executor node when it runs here
        executor_node = by_name.get("trajectory_executor")
        switches = executor_node.switches_since if executor_node is not None else lambda t: []
        records = []
        for k in range(episodes):
            records.append(_run_episode(sup, k, cfg.dt, cfg.T_o, time_limit,
                                        by_name["sim_arm"].geometry, switches))
            if on_episode is not None:
                on_episode(records[-1])
        sup.set_enabled(False)
        with sup.lock:
            status = dict(sup.policy_status)
            ages = np.asarray(sup.plan_ages) if sup.plan_ages else None
            achieved = sup.sim_advanced / max(sup.wall_running, 1e-9)
        latency = {key: _float(status.get(f"plan_latency_{key}")) for key in ("median", "p99")}
        age = {"median": None if ages is None else float(np.median(ages)),
               "p99": None if ages is None else float(np.percentile(ages, 99))}
        return ClosedLoopResult(policy_path=policy_path,
                                policy_id=status.get("policy_id") or Path(policy_path).name,
                                episodes=records, plan_latency=latency, plan_age=age,
                                speed=achieved, wall_seconds=time.monotonic() - started,
                                diagnostics=status)
    finally:
        if sup is not None:
            sup.stop()
        group.stop(grace=5.0)
        bringup.stop_nodes(nodes)
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        for node in reversed(nodes):
            node.destroy_node()
        if sup is not None:
            sup.node.destroy_node()
        rclpy.try_shutdown(context=context)
        if spin_thread is not None:
            spin_thread.join(timeout=5.0)


def _check_alone(node, domain_id: Optional[int]) -> None:
    """Another /clock or arm on this DDS domain would corrupt the run (or be driven by
    it): refuse, naming the topic."""
    import os
    for topic in ("/clock", "/joint_states", "/arm_controller/joint_trajectory"):
        ours = 1  # the supervisor's clock, the sim's joint states, the executor's commands
        count = node.count_publishers(topic)
        if count > ours:
            domain = domain_id if domain_id is not None else os.environ.get("ROS_DOMAIN_ID", 0)
            raise ClosedLoopError(
                f"{count - ours} other publisher(s) of {topic} on ROS domain {domain}: another "
                "robot or simulation is running there; use another domain (domain_id)")


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _run_episode(sup: _Supervisor, k: int, dt: float, T_o: int, time_limit: Optional[float],
                 geometry, switches: Callable[[float], list]) -> EpisodeRecord:
    wall0 = time.monotonic()
    sup.set_enabled(False)
    t_off = sup.now()
    sup.wait_sim(lambda: sup.now() >= t_off + SETTLE, "the clock (is /clock advancing?)")
    with sup.lock:
        sup.recording = False
        sup.js_log.clear()
    episode = sup.reset()
    t_reset = sup.now()
    # the first plan computed from observations of this episode only: its window's
    # oldest tick is after the reset
    clean = t_reset + T_o * dt + 1e-6
    sup.wait_sim(lambda: any(s >= clean for s in sup.plan_stamps[-3:]),
                 f"a plan for episode {k} (seed {episode.seed})")
    with sup.lock:
        sup.recording = True
    sup.set_enabled(True)
    t_enable = sup.now()
    limit = episode.time_limit if time_limit is None else float(time_limit)

    def finished() -> bool:
        task = sup.task
        if task is not None and task.get("seed") == episode.seed and task.get("done") \
                and task.get("episode") is not None:
            return True
        return sup.now() - t_enable > limit

    sup.wait_sim(finished, f"the end of episode {k} (seed {episode.seed})",
                 wall_timeout=WALL_TIMEOUT + 2 * limit / max(sup.speed, 1e-3))
    with sup.lock:
        sup.recording = False
        task = dict(sup.task or {})
        js = sup.js_log[:]
    t_end = sup.now()
    ours = task.get("seed") == episode.seed
    success = bool(ours and task.get("success"))
    reached = task.get("time_to_goal") if ours and success else None
    # task times count from the reset; report them from the enable
    time_to_goal = None if reached is None else round(max(0.0, reached - (t_enable - t_reset)), 3)
    j_t = np.array([t for t, _ in js])
    joints = np.array([q for _, q in js]).reshape(len(js), geometry.n_joints)
    keep = j_t >= t_enable
    j_t, joints = j_t[keep], joints[keep]
    ee = geometry.end_effector(joints).reshape(-1, 2)
    return EpisodeRecord(
        index=k, episode=episode, success=success,
        collision=bool(ours and task.get("collision")),
        timed_out=not (ours and task.get("done")) or bool(task.get("timed_out")),
        side=task.get("side") if ours else None, time=time_to_goal,
        duration=float(t_end - t_enable),
        min_clearance=task.get("min_clearance") if ours else None,
        switched_sides=switched_sides(ee, episode), wall_seconds=time.monotonic() - wall0,
        switch_jumps=np.array([jump for when, jump in switches(t_enable) if when <= t_end]),
        times=j_t - t_enable, ee=ee, joint_times=j_t - t_enable, joints=joints)
