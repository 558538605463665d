"""policy_node: observation windows in, receding-horizon plans out, hot-swappable policy.

Topics
- in: the aggregator's window topics under ``window_topic_prefix`` (dp_ros.nodes.window_msgs),
  joined by exact stamp.
- out: ``~/plan`` (trajectory_msgs/JointTrajectory): header.stamp = time of the newest
  observation of the window (window stamp + (T_o - 1) * dt); points from action index
  T_o - 1 on, time_from_start = k * dt, positions in ``joint_names``, finite-difference
  velocities.
- out: ``~/policy_id`` (std_msgs/String, transient local = latched): the id of the policy
  that computes the plans from now on, republished at every swap, before the first plan
  of the new policy.
- out: ``/diagnostics``.

Threads: subscription callbacks only join windows and decide whether a plan is due (the
ReplanScheduler: every ``replan_every`` steps, early by the measured plan latency +
``latency_margin``); inference runs on the PlanRunner's worker thread, which publishes
the plan. A due window that arrives while inference runs replaces the waiting one
(counted as dropped). Loads run on the PolicyLoader's thread; the worker installs the new
policy between two plans. With ``realtime_priority`` the spinning thread (its DDS threads
one below) runs under SCHED_FIFO, so windows are taken in and handed over at once however
busy inference keeps the CPUs; the worker and loader threads stay at normal priority, and
the worker rises to the node's priority only to publish a finished plan.

Noise: with ``seed`` >= 0 each plan's noise is a function of (seed, plan stamp), see
dp_ros.policy.seeding, so offline evaluation reproduces the node's plans; -1 = random.

Swap: ``ros2 param set /policy_node policy_path /path/in/policy_dir/ckpt``. The set
fails with the reason when the checkpoint is missing, outside ``policy_dir`` or
incompatible; otherwise it loads in the background while the old policy keeps planning.
A failed load is logged and shown in diagnostics (swap_status, swap_last_error), the old
policy stays active; ``active_policy_path`` in diagnostics names the policy in use.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections import Counter
from typing import Optional

from rcl_interfaces.msg import (ParameterDescriptor,
                                ParameterType, SetParametersResult)
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from dp_ros.control.plan import plan_from_actions
from dp_ros.control.replan import ReplanScheduler
from dp_ros.nodes.diagnostics import ERROR, OK, WARN, CauseLog, DiagnosticsPublisher, make_status
from dp_ros.nodes.params import float_range, int_range
from dp_ros.nodes.realtime import REALTIME_PARAMETER, apply_realtime_priority
from dp_ros.nodes.trajectory_conv import plan_to_trajectory
from dp_ros.nodes.window_msgs import (STATE_PART, WINDOW_QOS, WindowFormatError, WindowJoiner,
                                      decode_window, window_image_topic,
                                      window_state_topic)
from dp_ros.policy import CheckpointError, Policy, PolicyConfig, load_policy
from dp_ros.policy.backends import check_backend
from dp_ros.policy.inference import resolve_device
from dp_ros.policy.runner import LatencyStats, PlanJob, PlanOutcome, PlanRunner
from dp_ros.policy.swap import LoadOutcome, PolicyLoader, SwapError, validate_swap
from dp_ros.policy.warm_start import check_keep_steps
from dp_ros.nodes.run import STARTUP_ERRORS, run_node
from dp_ros.sched import normal_priority_section, realtime_section

NODE_NAME = "policy_node"
PLAN_QOS = QoSProfile(depth=4, reliability=ReliabilityPolicy.RELIABLE)
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
MAX_REPLAN_EVERY = 1024
CLOCK_JUMP_BACK = 1.0  # s; a window this much older than the running plan restarts the schedule
PLAUSIBLE_AGE = 60.0  # s; a plan older than this on publication means unrelated clocks


# name -> (default or array type, descriptor). Read-only ones fix the graph at start;
# policy_dir is read-only because an allow-list settable through the same service that
# sets policy_path would protect nothing.
PARAMETERS = {
    "policy_path": ("", ParameterDescriptor(
        description="Checkpoint directory (config.json + model.safetensors). Set it at run "
                    "time to swap policies: validated at once, loaded in the background, "
                    "installed between two plans")),
    "policy_dir": ("", ParameterDescriptor(
        description="Allow-list: policy_path must resolve (symlinks followed) inside this "
                    "directory. Empty = any path (unsafe: development machines only)",
        read_only=True)),
    "device": ("auto", ParameterDescriptor(
        description="Inference device: auto (cuda when available, else cpu), cpu, cuda or "
                    "cuda:N", read_only=True)),
    "window_topic_prefix": ("/obs_aggregator", ParameterDescriptor(
        description="Namespace of the aggregator's window topics "
                    "(<prefix>/window/<camera>, <prefix>/window/state)", read_only=True)),
    "joint_names": (Parameter.Type.STRING_ARRAY, ParameterDescriptor(
        description="The arm's joint names for the plan's actions, in the policy's action "
                    "order. Empty = the policy's action names",
        type=ParameterType.PARAMETER_STRING_ARRAY, read_only=True)),
    "replan_every": (0, ParameterDescriptor(
        description="Plan every this many steps (dt). 0 = the policy's T_a. At most "
                    "T_p - T_o + 1 (the executable horizon)",
        integer_range=int_range(0, MAX_REPLAN_EVERY))),
    "latency_margin": (0.02, ParameterDescriptor(
        description="Start the next inference this much (s) earlier than the measured plan "
                    "latency requires", floating_point_range=float_range(0.0, 10.0))),
    "seed": (-1, ParameterDescriptor(
        description="Noise seed: >= 0 makes each plan a function of (seed, plan stamp) "
                    "(reproducible offline, see dp_ros.policy.seeding); -1 = random",
        integer_range=int_range(-1, 2**31 - 1))),
    "diagnostics_period": (1.0, ParameterDescriptor(
        description="Period of /diagnostics messages (s, steady clock)",
        floating_point_range=float_range(0.01, 60.0), read_only=True)),
    "backend": ("torch", ParameterDescriptor(
        description="Inference backend: torch (eager; on CUDA the denoising loop runs as a "
                    "CUDA graph) or onnxruntime (providers TensorRT -> CUDA -> CPU; the "
                    "ONNX export is cached per checkpoint)", read_only=True)),
    "precision": ("fp32", ParameterDescriptor(
        description="fp32; bf16 or fp16 weights (torch); int8 weights (onnxruntime). Reduced "
                    "precision is refused unless it passes the accuracy gate against fp32 "
                    "(max action difference <= 1% of the action range)", read_only=True)),
    "warm_start_steps": (0, ParameterDescriptor(
        description="0 = every plan starts from pure noise. N > 0: start from the running "
                    "plan shifted to the new time grid, noised to the level of sampler step "
                    "K - N, and denoise N steps (N < K, the policy's inference steps)",
        integer_range=int_range(0, 1000))),
    "warm_start_keep_steps": (0, ParameterDescriptor(
        description="With a warm start, N > 0 keeps the running plan as it is up to N - 1 "
                    "steps after the new plan's stamp (inpainted at every denoising step): "
                    "the part the executor still runs while the new plan is computed, so the "
                    "switch lands on the running plan instead of where the lagging arm was "
                    "measured. Cover the plan latency plus the executor's actuation_lead "
                    "(N >= (latency + lead) / dt + 1). 0 = keep nothing",
        integer_range=int_range(0, 1000))),
    **REALTIME_PARAMETER,
}


class PolicyNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        p = {name: self.declare_parameter(name, default, descriptor).value
             for name, (default, descriptor) in PARAMETERS.items()}
        self.policy_dir: str = p["policy_dir"]
        self.device: str = p["device"]
        resolve_device(self.device)  # ValueError: unknown device, or cuda without a GPU
        try:
            validate_swap(p["policy_path"], self.policy_dir, None)
        except SwapError as err:
            raise ValueError(f"policy_path: {err}") from None
        seed = int(p["seed"])
        check_backend(p["backend"], p["precision"])  # ValueError naming the bad value
        self._inference_options = {"backend": p["backend"], "precision": p["precision"]}
        self._warm_start_steps = int(p["warm_start_steps"])
        self._warm_start_keep_steps = int(p["warm_start_keep_steps"])
        try:
            with normal_priority_section():  # the pools a load makes must not inherit FIFO
                policy = load_policy(os.path.realpath(p["policy_path"]), device=self.device,
                                     seed=None if seed < 0 else seed, **self._inference_options)
        except CheckpointError as err:
            raise ValueError(f"policy_path: {err}") from None
        try:
            policy.warm_start_steps = self._warm_start_steps
            policy.warm_start_keep_steps = self._warm_start_keep_steps
        except ValueError as err:
            raise ValueError(str(err)) from None
        cfg = policy.config
        self.graph_config: PolicyConfig = cfg  # what every later policy must be compatible with
        self.joint_names = list(p["joint_names"] or cfg.action_names)
        if len(self.joint_names) != cfg.action_dim or len(set(self.joint_names)) != cfg.action_dim:
            raise ValueError(f"joint_names {self.joint_names} must name the policy's "
                             f"{cfg.action_dim} actions {cfg.action_names}, without duplicates")
        self._check_replan_every(int(p["replan_every"]), cfg)
        self._replan_every = int(p["replan_every"])
        self._margin = float(p["latency_margin"])

        self._lock = threading.Lock()  # scheduler, stats, swap status
        self.stats: Counter[str] = Counter()
        self._last_cold_reason: Optional[str] = None  # why the newest cold plan was cold
        self.window_problems = CauseLog(self.get_logger())
        self.plan_problems = CauseLog(self.get_logger())
        self.inference_latency = LatencyStats()
        self.plan_age = LatencyStats()  # node clock: plan stamp -> published
        self.queue_wait = LatencyStats()  # window due -> worker free (busy with a plan)
        self.active_path = str(p["policy_path"])
        self.swap_status = "idle"
        self.swap_last_error = ""
        self._last_plan_error: Optional[str] = None
        self.scheduler = self._make_scheduler(cfg)
        self.realtime_priority = 0  # set last (see below); the worker publishes at it

        self._plan_pub = self.create_publisher(JointTrajectory, "~/plan", PLAN_QOS)
        self._id_pub = self.create_publisher(String, "~/policy_id", LATCHED_QOS)
        self.loader = PolicyLoader(device=self.device, seed=None if seed < 0 else seed,
                                   load=functools.partial(load_policy, **self._inference_options))
        self.runner = PlanRunner(policy, on_outcome=self._on_outcome, loader=self.loader,
                                 seed=seed, on_start=self._on_start, on_swap=self._on_swap)

        prefix = p["window_topic_prefix"]
        self.joiner = WindowJoiner(cfg.camera_names)
        self._join_lock = threading.Lock()
        self._subs = [self.create_subscription(
            Image, window_image_topic(prefix, cam),
            lambda msg, c=cam: self._on_window_part(c, msg), WINDOW_QOS)
            for cam in cfg.camera_names]
        self._subs.append(self.create_subscription(
            JointTrajectory, window_state_topic(prefix),
            lambda msg: self._on_window_part(STATE_PART, msg), WINDOW_QOS))

        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._diagnostics = DiagnosticsPublisher(self, self._collect_diagnostics,
                                                 p["diagnostics_period"])
        self._publish_policy_id(policy)
        self.runner.start()
        # last: the threads started above (inference, loading) stay at normal priority
        self.realtime_priority = apply_realtime_priority(self, p["realtime_priority"])
        self.runner.wake_priority = self.realtime_priority  # a window's plan starts at once
        self.get_logger().info(
            f"policy {policy.policy_id!r} from {self.active_path} on {policy.device}: "
            f"cameras {cfg.camera_names}, T_o={cfg.T_o} T_p={cfg.T_p} T_a={cfg.T_a} "
            f"dt={cfg.dt}, replanning every {self._effective_replan_every(cfg)} steps; "
            f"windows from {window_state_topic(prefix)}")

    # ------------------------------------------------------------------ replanning

    @staticmethod
    def _check_replan_every(value: int, cfg: PolicyConfig) -> None:
        horizon = cfg.executable_horizon
        if not 0 <= value <= horizon:
            raise ValueError(f"replan_every must be 0 (= T_a) or 1..{horizon} (T_p - T_o + 1 "
                             f"of the running policy), got {value}")

    def _effective_replan_every(self, cfg: PolicyConfig) -> int:
        return self._replan_every or cfg.T_a

    def _make_scheduler(self, cfg: PolicyConfig,
                        previous: Optional[ReplanScheduler] = None) -> ReplanScheduler:
        """A scheduler for the current settings that keeps the running plan and latency
        estimate of `previous` (so a parameter change or swap does not plan at once)."""
        sched = ReplanScheduler(T_o=cfg.T_o, T_a=self._effective_replan_every(cfg), dt=cfg.dt,
                                margin=self._margin,
                                initial_latency=0.0 if previous is None else previous.latency)
        if previous is not None and previous.active_plan_stamp is not None:
            sched.plan_started(previous.active_plan_stamp)
        return sched

    # ------------------------------------------------------------------ windows

    def _on_window_part(self, part: str, msg) -> None:
        """Subscription callback: join by stamp; hand a due window to the worker."""
        with self._join_lock:
            joined = self.joiner.add(part, msg)
        if joined is None:
            return
        cfg = self.graph_config
        dt_ns = int(round(cfg.dt * 1e9))
        plan_stamp_ns = joined.stamp_ns + (cfg.T_o - 1) * dt_ns
        newest = plan_stamp_ns * 1e-9
        with self._lock:
            active = self.scheduler.active_plan_stamp
            if active is not None and newest < active - CLOCK_JUMP_BACK:
                # the clock went back (a looping bag): the old schedule would never be due
                self.scheduler = self._make_scheduler(cfg)
                self.stats["clock_jumps_back"] += 1
            # data time: the plan latency the scheduler learns is measured from the stamp too
            due = self.scheduler.should_start(newest, window_stamp=newest)
            self.stats["windows"] += 1
            if not due:
                self.stats["windows_skipped"] += 1  # not time to replan yet
        if not due:
            return
        try:  # decoded (copied) only when it will be planned on
            window = decode_window(joined.images, joined.state, cfg.T_o,
                                   camera_names=cfg.camera_names, state_names=cfg.state_names,
                                   dt=cfg.dt)
            for cam in cfg.cameras:
                size = window["images"][cam.name].shape[1:3]
                if size != (cam.height, cam.width):
                    raise WindowFormatError(f"camera {cam.name!r}: frames {size[0]}x{size[1]}, "
                                            f"policy expects {cam.height}x{cam.width}")
        except WindowFormatError as err:
            with self._lock:
                self.stats["bad_windows"] += 1
            self.window_problems.report("window", "bad_window", str(err))
            return
        # the policy's frame-feature cache then keys frames by their pixels, not stamps: a
        # stamp seen again after a clock jump may come with other pixels
        window.pop("stamps", None)
        self.runner.submit(PlanJob(window, plan_stamp_ns))

    # ------------------------------------------------------------------ worker callbacks

    def _on_start(self, job: PlanJob) -> None:
        with self._lock:
            self.scheduler.plan_started(job.plan_stamp_ns * 1e-9)

    def _on_outcome(self, outcome: PlanOutcome) -> None:
        self.inference_latency.add(outcome.latency)
        self.queue_wait.add(outcome.queue_wait)
        if not outcome.ok:
            cause, detail = outcome.error
            with self._lock:
                self.stats["plan_failures"] += 1
                self._last_plan_error = f"{outcome.policy_id}: {cause}: {detail}"
                self.scheduler.plan_failed(outcome.job.plan_stamp_ns * 1e-9)
            self.plan_problems.report(outcome.policy_id, cause, detail)
            return
        cfg = outcome.config
        with realtime_section(self.realtime_priority):  # the plan goes out at once
            plan = plan_from_actions(outcome.job.plan_stamp_ns, outcome.actions, cfg.T_o,
                                     cfg.dt, self.joint_names)
            self._plan_pub.publish(plan_to_trajectory(plan))
            published_ns = self.get_clock().now().nanoseconds  # before anything can delay it
        age = (published_ns - outcome.job.plan_stamp_ns) * 1e-9
        plausible = 0.0 <= age <= PLAUSIBLE_AGE
        if plausible:
            self.plan_age.add(age)
        with self._lock:
            self.stats["plans"] += 1
            self._last_plan_error = None
            if outcome.cold_reason is None:
                self.stats["warm_started_plans"] += 1
            else:
                self._last_cold_reason = outcome.cold_reason
            # stamp -> published is what makes a plan's first points stale; if the clocks
            # disagree (no use_sim_time on a replay), inference time is the best we know
            self.scheduler.observe_latency(age if plausible else outcome.latency)

    def _on_swap(self, loaded: LoadOutcome) -> None:
        if loaded.policy is None:
            with self._lock:
                self.swap_status = "failed"
                self.swap_last_error = f"{loaded.path}: {loaded.error}"
                self.stats["swap_failures"] += 1
            self.get_logger().error(f"policy swap to {loaded.path} failed, keeping "
                                    f"{self.runner.policy.policy_id!r}: {loaded.error}")
            return
        policy = loaded.policy
        # the node's warm start, within what the new policy's sampler allows
        policy.warm_start_steps = min(self._warm_start_steps, policy.max_warm_start_steps)
        policy.warm_start_keep_steps = min(self._warm_start_keep_steps,
                                           policy.config.executable_horizon)
        with self._lock:
            self.active_path = loaded.path
            self.swap_status = "ok"
            self.stats["swaps"] += 1
            self.scheduler = self._make_scheduler(policy.config, self.scheduler)  # T_a may differ
        self._publish_policy_id(policy)
        self.get_logger().info(f"swapped to policy {policy.policy_id!r} from {loaded.path} "
                               f"(loaded in {loaded.seconds:.2f} s)")

    def _publish_policy_id(self, policy: Policy) -> None:
        self._id_pub.publish(String(data=policy.policy_id))

    # ------------------------------------------------------------------ parameters

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Cheap checks only (config.json, no weights): runs in the parameter service."""
        cfg = self.runner.policy.config
        replan_every = self._replan_every
        for param in params:
            if param.name == "replan_every":
                replan_every = int(param.value)
        try:
            for param in params:
                if param.name == "policy_path":
                    cand = validate_swap(param.value, self.policy_dir, self.graph_config)
                    self._check_replan_every(replan_every, cand)
                elif param.name == "replan_every":
                    self._check_replan_every(replan_every, cfg)
                elif param.name == "latency_margin":
                    if not (math.isfinite(param.value) and param.value >= 0.0):
                        raise ValueError(f"latency_margin must be >= 0 s, got {param.value}")
                elif param.name == "seed":
                    if int(param.value) < -1:
                        raise ValueError(f"seed must be >= -1, got {param.value}")
                elif param.name == "warm_start_steps":
                    self.runner.policy.check_warm_start_steps(int(param.value))
                elif param.name == "warm_start_keep_steps":
                    check_keep_steps(int(param.value), cfg.executable_horizon)
        except (SwapError, ValueError) as err:
            self.get_logger().warning(f"parameter set refused: {err}")
            return SetParametersResult(successful=False, reason=str(err))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        for param in params:
            if param.name == "policy_path":
                path = str(param.value)
                with self._lock:
                    self.swap_status = f"loading {path}"
                self.loader.submit(path, validate=lambda p: validate_swap(
                    p, self.policy_dir, self.graph_config))
                self.get_logger().info(f"loading policy {path} (the current one keeps planning)")
            elif param.name in ("replan_every", "latency_margin"):
                with self._lock:
                    if param.name == "replan_every":
                        self._replan_every = int(param.value)
                    else:
                        self._margin = float(param.value)
                    self.scheduler = self._make_scheduler(self.runner.policy.config,
                                                          self.scheduler)
            elif param.name == "seed":
                self.runner.seed = int(param.value)
                self.loader.seed = None if param.value < 0 else int(param.value)
            elif param.name == "warm_start_steps":
                self._warm_start_steps = int(param.value)
                self.runner.policy.warm_start_steps = self._warm_start_steps  # from the next plan
            elif param.name == "warm_start_keep_steps":
                self._warm_start_keep_steps = int(param.value)
                self.runner.policy.warm_start_keep_steps = self._warm_start_keep_steps

    # ------------------------------------------------------------------ diagnostics

    def _collect_diagnostics(self):
        policy = self.runner.policy
        cfg = policy.config
        with self._lock:
            stats = dict(self.stats)
            swap_status, swap_error = self.swap_status, self.swap_last_error
            last_error = self._last_plan_error
            active = self.active_path
            replan_every = self._effective_replan_every(cfg)
        loading = self.loader.loading
        if loading is not None:
            swap_status = f"loading {loading}"
        lat = self.inference_latency.summary()
        age = self.plan_age.summary()
        if last_error is not None:
            level, message = ERROR, f"last plan failed: {last_error}"
        elif swap_status == "failed":
            level, message = WARN, f"policy swap failed (old policy kept): {swap_error}"
        elif stats.get("plans", 0) == 0:
            level, message = WARN, "no plan yet (waiting for windows)"
        else:
            level, message = OK, f"planning with {policy.policy_id}"
        values = {
            "policy_id": policy.policy_id, "active_policy_path": active,
            "device": str(policy.device), "T_o": cfg.T_o, "T_p": cfg.T_p, "T_a": cfg.T_a,
            "dt": cfg.dt, "replan_every": replan_every, "seed": self.runner.seed,
            "backend": getattr(policy, "backend", "torch"),
            "precision": getattr(policy, "precision", "fp32"),
            "warm_start_steps": getattr(policy, "warm_start_steps", 0),
            "plan_latency_last": lat["last"], "plan_latency_median": lat["median"],
            "plan_latency_p99": lat["p99"],
            "plan_queue_wait_last": self.queue_wait.summary()["last"],
            "plan_age_last": age["last"], "plan_age_median": age["median"],
            "plan_age_p99": age["p99"],
            "plans_published": stats.get("plans", 0),
            "warm_started_plans": stats.get("warm_started_plans", 0),
            "last_cold_start_reason": self._last_cold_reason or "",
            "plan_failures": stats.get("plan_failures", 0),
            "windows_received": stats.get("windows", 0),
            "windows_skipped": stats.get("windows_skipped", 0),
            "dropped_windows": self.runner.dropped,
            "bad_windows": stats.get("bad_windows", 0),
            "swaps": stats.get("swaps", 0), "swap_failures": stats.get("swap_failures", 0),
            "swap_status": swap_status, "swap_last_error": swap_error,
            "worker_errors": self.runner.callback_errors,
            "pending_window_stamps": self.joiner.pending,  # parts waiting to be joined
        }
        if self.runner.last_callback_error:
            values["last_worker_error"] = self.runner.last_callback_error
        values.update({f"failures/{k}": n for k, n in sorted(self.plan_problems.counts().items())})
        if self.window_problems.last("window"):
            values["last_bad_window"] = self.window_problems.last("window")
        return [make_status(f"{self.get_name()}: policy", level, message, values,
                            hardware_id=str(policy.device))]

    # ------------------------------------------------------------------ shutdown

    def destroy_node(self):
        # any of these is absent when the constructor refused a parameter or checkpoint
        if hasattr(self, "runner"):
            self.runner.stop()
        if hasattr(self, "loader"):
            self.loader.shutdown(wait=False)
        if hasattr(self, "_diagnostics"):
            self._diagnostics.destroy()
        return super().destroy_node()


def main(args=None) -> int:
    return run_node(PolicyNode, NODE_NAME, args,
                    startup_errors=STARTUP_ERRORS + (CheckpointError,))


if __name__ == "__main__":
    sys.exit(main())
