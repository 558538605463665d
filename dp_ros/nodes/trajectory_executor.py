"""trajectory_executor: the policy's plans in, safe arm commands out.

Thin wiring around dp_ros.control.executor.PlanExecutor (which holds all the logic and
the safety contract): plans from `plan_topic`, joint states for the position to start
from, a control timer on the node clock (use_sim_time works) and one of two outputs:
  joint_trajectory  trajectory_msgs/JointTrajectory to a joint_trajectory_controller: the
                    remaining horizon re-timed to now (header.stamp 0, first
                    time_from_start > 0, velocities filled), resent at
                    joint_trajectory_rate_hz, on every new plan and when it starts holding;
  position_stream   std_msgs/Float64MultiArray at control_rate_hz for a forward position
                    controller.
Starts disabled and sends nothing until `~/enable` (std_srvs/SetBool) or `autostart`;
enabling needs a recent joint state. Rejected input is logged once per cause and counted
in /diagnostics.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from rcl_interfaces.msg import (ParameterDescriptor,
                                ParameterType, SetParametersResult)
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import SetBool
from trajectory_msgs.msg import JointTrajectory

from dp_ros.control.executor import DISABLED, HOLDING, TRACKING, PlanExecutor, TrajectoryPoints
from dp_ros.control.limits import JointLimits
from dp_ros.control.plan import PlanRejected
from dp_ros.nodes.diagnostics import OK, WARN, CauseLog, DiagnosticsPublisher, make_status
from dp_ros.nodes.params import float_range, int_range
from dp_ros.nodes.trajectory_conv import (JointStateReader, JointStateRejected,
                                          command_trajectory, position_command,
                                          trajectory_to_plan)
from dp_ros.nodes.realtime import REALTIME_PARAMETER, apply_realtime_priority
from dp_ros.nodes.run import run_node

NODE_NAME = "trajectory_executor"
JOINT_TRAJECTORY, POSITION_STREAM = "joint_trajectory", "position_stream"
DEFAULT_COMMAND_TOPIC = {JOINT_TRAJECTORY: "/arm_controller/joint_trajectory",
                         POSITION_STREAM: "/forward_position_controller/commands"}
PLAN_QOS = QoSProfile(depth=4, reliability=ReliabilityPolicy.RELIABLE)  # as policy_node's
COMMAND_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
SWITCH_MEMORY = 1000  # plan switches kept for the velocity-jump figures


# name -> (default or type, descriptor). Read-only ones fix the graph and the safety
# envelope at start; the tunables may be changed at run time (validated first).
PARAMETERS: dict[str, tuple[Any, ParameterDescriptor]] = {
    "joint_names": (Parameter.Type.STRING_ARRAY, ParameterDescriptor(
        description="The controller's joints, in its order (plans and joint states are "
                    "matched by name)", type=ParameterType.PARAMETER_STRING_ARRAY,
        read_only=True)),
    "plan_topic": ("/policy_node/plan", ParameterDescriptor(
        description="trajectory_msgs/JointTrajectory plans of the policy node",
        read_only=True)),
    "joint_states_topic": ("/joint_states", ParameterDescriptor(
        description="sensor_msgs/JointState: the arm's position, needed to enable",
        read_only=True)),
    "output_mode": (JOINT_TRAJECTORY, ParameterDescriptor(
        description="joint_trajectory (JointTrajectory to a joint_trajectory_controller) or "
                    "position_stream (Float64MultiArray at control_rate_hz)",
        additional_constraints="one of: joint_trajectory, position_stream", read_only=True)),
    "command_topic": ("", ParameterDescriptor(
        description="Command topic; empty: /arm_controller/joint_trajectory "
                    "(joint_trajectory) or /forward_position_controller/commands "
                    "(position_stream)", read_only=True)),
    "control_rate_hz": (100.0, ParameterDescriptor(
        description="Control loop rate (Hz, node clock); position_stream sends at this rate",
        floating_point_range=float_range(1.0, 1000.0), read_only=True)),
    "joint_trajectory_rate_hz": (10.0, ParameterDescriptor(
        description="joint_trajectory mode: resend the remaining horizon at this rate (Hz), "
                    "besides on every new plan", floating_point_range=float_range(0.1, 100.0),
        read_only=True)),
    "position_lower": (Parameter.Type.DOUBLE_ARRAY, ParameterDescriptor(
        description="Per-joint lower position limits (unset: unlimited, warned)",
        type=ParameterType.PARAMETER_DOUBLE_ARRAY, read_only=True)),
    "position_upper": (Parameter.Type.DOUBLE_ARRAY, ParameterDescriptor(
        description="Per-joint upper position limits (unset: unlimited, warned)",
        type=ParameterType.PARAMETER_DOUBLE_ARRAY, read_only=True)),
    "max_velocity": (1.0, ParameterDescriptor(
        description="Velocity limit (joint units/s): one number for all joints or one per "
                    "joint; every command moves at most this fast", dynamic_typing=True)),
    "actuation_lead": (0.02, ParameterDescriptor(
        description="Seconds between sending a command and the arm acting on it: a command "
                    "sent at t is for plan time t + lead; points earlier are dropped",
        floating_point_range=float_range(0.0, 1.0))),
    "stale_plan_timeout": (1.0, ParameterDescriptor(
        description="A plan older than this (s, from its stamp) is no longer executed: the "
                    "executor holds the last commanded position",
        floating_point_range=float_range(0.01, 10.0))),
    "crossfade_steps": (0, ParameterDescriptor(
        description="Blend old and new plan over this many control steps at a switch (0: "
                    "off; the switch is continuous and velocity-limited either way)",
        integer_range=int_range(0, 100))),
    "autostart": (False, ParameterDescriptor(
        description="Enable at the first usable joint state instead of waiting for ~/enable",
        read_only=True)),
    "joint_state_timeout": (0.5, ParameterDescriptor(
        description="Enabling needs a joint state received within this many seconds",
        floating_point_range=float_range(0.001, 60.0), read_only=True)),
    "diagnostics_period": (1.0, ParameterDescriptor(
        description="Period of /diagnostics messages (s, steady clock)",
        floating_point_range=float_range(0.01, 60.0), read_only=True)),
    **REALTIME_PARAMETER,
}
RUNTIME_TUNABLE = ("max_velocity", "actuation_lead", "stale_plan_timeout", "crossfade_steps")


@dataclass(frozen=True)
class ExecutorNodeConfig:
    joint_names: tuple[str, ...]
    plan_topic: str
    joint_states_topic: str
    output_mode: str
    command_topic: str
    control_rate_hz: float
    joint_trajectory_rate_hz: float
    limits: JointLimits
    actuation_lead: float
    stale_plan_timeout: float
    crossfade_steps: int
    autostart: bool
    joint_state_timeout: float
    diagnostics_period: float

    @classmethod
    def build(cls, values: dict[str, Any]) -> "ExecutorNodeConfig":
        """Validated config; ValueError naming the parameter otherwise."""
        joints = tuple(values["joint_names"] or ())
        if not joints:
            raise ValueError("joint_names is empty: name the controller's joints in its order")
        if len(set(joints)) != len(joints) or not all(joints):
            raise ValueError(f"joint_names must be unique and non-empty, got {list(joints)}")
        mode = values["output_mode"]
        if mode not in DEFAULT_COMMAND_TOPIC:
            raise ValueError(f"output_mode must be one of {list(DEFAULT_COMMAND_TOPIC)}, "
                             f"got {mode!r}")
        for key in ("plan_topic", "joint_states_topic"):
            if not values[key]:
                raise ValueError(f"{key} is empty")
        limits = limits_from_parameters(len(joints), values["position_lower"],
                                        values["position_upper"], values["max_velocity"])
        check_tunables(values)
        return cls(joint_names=joints, plan_topic=values["plan_topic"],
                   joint_states_topic=values["joint_states_topic"], output_mode=mode,
                   command_topic=values["command_topic"] or DEFAULT_COMMAND_TOPIC[mode],
                   control_rate_hz=float(values["control_rate_hz"]),
                   joint_trajectory_rate_hz=float(values["joint_trajectory_rate_hz"]),
                   limits=limits, actuation_lead=float(values["actuation_lead"]),
                   stale_plan_timeout=float(values["stale_plan_timeout"]),
                   crossfade_steps=int(values["crossfade_steps"]),
                   autostart=bool(values["autostart"]),
                   joint_state_timeout=float(values["joint_state_timeout"]),
                   diagnostics_period=float(values["diagnostics_period"]))


def _velocity_value(value: Any) -> float | list[float]:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"max_velocity must be a number or an array of numbers, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"max_velocity must be a number or an array of numbers, "
                         f"got {value!r}") from None


def limits_from_parameters(n_joints: int, lower, upper, max_velocity) -> JointLimits:
    lower = None if lower is None or len(lower) == 0 else list(lower)
    upper = None if upper is None or len(upper) == 0 else list(upper)
    try:
        return JointLimits.create(n_joints, lower, upper, _velocity_value(max_velocity))
    except ValueError as err:
        raise ValueError(f"limits: {err}") from None


def check_tunables(values: dict[str, Any]) -> None:
    lead, timeout = values.get("actuation_lead"), values.get("stale_plan_timeout")
    if lead is not None and not (math.isfinite(lead) and lead >= 0.0):
        raise ValueError(f"actuation_lead must be >= 0 s, got {lead}")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0.0):
        raise ValueError(f"stale_plan_timeout must be > 0 s, got {timeout}")
    if lead is not None and timeout is not None and lead >= timeout:
        raise ValueError(f"actuation_lead ({lead} s) must be below stale_plan_timeout "
                         f"({timeout} s): no plan point could ever be executed")


class TrajectoryExecutorNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        values = {name: self.declare_parameter(name, default, descriptor).value
                  for name, (default, descriptor) in PARAMETERS.items()}
        self.cfg = ExecutorNodeConfig.build(values)
        self.realtime_priority = apply_realtime_priority(self, values["realtime_priority"])
        cfg = self.cfg
        self.control_dt = 1.0 / cfg.control_rate_hz
        self._jt_period_ns = int(round(1e9 / cfg.joint_trajectory_rate_hz))
        self.plan_executor = PlanExecutor(cfg.joint_names, cfg.limits, cfg.actuation_lead,
                                          cfg.stale_plan_timeout, cfg.crossfade_steps,
                                          self.control_dt)
        self._lock = threading.Lock()  # executor state vs callbacks (any rclpy executor)
        self._reader = JointStateReader(cfg.joint_names)
        self._joint_state: Optional[tuple[np.ndarray, int]] = None  # (positions, received ns)
        self.stats: Counter[str] = Counter()
        self.switch_jumps: deque[tuple[float, float]] = deque(maxlen=SWITCH_MEMORY)
        self.problems = CauseLog(self.get_logger())  # rejected input, once per cause
        self._status = DISABLED
        self._last_reason = ""
        self._last_traj_ns: Optional[int] = None
        self._send_now = False  # joint_trajectory: a new plan or a status change to send
        self._rejected_reported = 0  # plans_rejected at the last diagnostics message

        if not (np.all(np.isfinite(cfg.limits.lower)) and np.all(np.isfinite(cfg.limits.upper))):
            self.get_logger().warning("position_lower/position_upper not set for every joint: "
                                      "those joints have no position limits")
        if cfg.output_mode == JOINT_TRAJECTORY:
            self._cmd_pub = self.create_publisher(JointTrajectory, cfg.command_topic,
                                                  COMMAND_QOS)
        else:
            self._cmd_pub = self.create_publisher(Float64MultiArray, cfg.command_topic,
                                                  COMMAND_QOS)
        self._plan_sub = self.create_subscription(JointTrajectory, cfg.plan_topic,
                                                  self._on_plan, PLAN_QOS)
        self._js_sub = self.create_subscription(JointState, cfg.joint_states_topic,
                                                self._on_joint_state, qos_profile_sensor_data)
        self._enable_srv = self.create_service(SetBool, "~/enable", self._on_enable)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self._timer = self.create_timer(self.control_dt, self._on_tick)  # node clock
        self._diagnostics = DiagnosticsPublisher(self, self._collect_diagnostics,
                                                 cfg.diagnostics_period)
        self.get_logger().info(
            f"{len(cfg.joint_names)} joints {list(cfg.joint_names)}, {cfg.output_mode} on "
            f"{cfg.command_topic} at {cfg.control_rate_hz} Hz, plans from {cfg.plan_topic}; "
            f"disabled until ~/enable" + (" (autostart)" if cfg.autostart else ""))

    # ------------------------------------------------------------------ time
    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    # ------------------------------------------------------------------ inputs
    def _on_plan(self, msg: JointTrajectory) -> None:
        now_ns = self._now_ns()
        if now_ns == 0:  # use_sim_time and no /clock yet: nothing can be judged
            self.problems.report("plan", "no_clock", "plan before the first /clock message")
            return
        try:
            plan = trajectory_to_plan(msg)
        except PlanRejected as err:
            status, cause, reason = "rejected", err.cause, err.reason
        else:
            with self._lock:
                result = self.plan_executor.submit(plan, now_ns * 1e-9)
                self.stats["late_points"] += result.late_points
                self.stats["skipped_points"] += result.skipped_points
                if result.accepted:
                    self._send_now = True
                if result.velocity_jump is not None:
                    self.switch_jumps.append((now_ns * 1e-9, result.velocity_jump))
            status, cause, reason = result.status, result.cause, result.reason
        with self._lock:
            self.stats["plans_received"] += 1
            self.stats[f"plans_{status}"] += 1
            if status != "accepted":
                self.stats[f"plans_{status}/{cause}"] += 1
        if status == "rejected":
            self.problems.report("plan", cause, f"plan rejected: {reason}")
        elif status == "ignored" and cause != "not_newer":  # duplicates are routine
            self.problems.report("plan", cause, f"plan ignored: {reason}")
        elif cause:  # accepted with a note (e.g. catching up)
            self.problems.report("plan", cause, reason)

    def _on_joint_state(self, msg: JointState) -> None:
        try:
            q = self._reader.read(msg)
        except JointStateRejected as err:
            with self._lock:
                self.stats["joint_states_rejected"] += 1
            self.problems.report("joint_states", err.cause, str(err))
            return
        now_ns = self._now_ns()
        with self._lock:
            self._joint_state = (q, now_ns)
            if self.cfg.autostart and self.stats["autostarts"] == 0 \
                    and not self.plan_executor.enabled and now_ns:
                refused = self._enable_locked(now_ns)
                if refused:
                    self.problems.report("enable", "autostart_refused", refused)
                else:
                    self.stats["autostarts"] += 1
                    self.get_logger().info("autostart: enabled at the current joint position")

    def _enable_locked(self, now_ns: int) -> Optional[str]:
        """Enable from the latest joint state; the reason when that is not possible."""
        if self._joint_state is None:
            return f"no joint state received on {self.cfg.joint_states_topic} yet"
        q, received_ns = self._joint_state
        age = (now_ns - received_ns) * 1e-9
        if age > self.cfg.joint_state_timeout:
            return (f"last joint state is {age:.3f} s old "
                    f"(> joint_state_timeout {self.cfg.joint_state_timeout} s)")
        try:
            self.plan_executor.enable(q, now_ns * 1e-9)
        except ValueError as err:
            return str(err)
        self._status = HOLDING
        self._send_now = True
        return None

    def _on_enable(self, request: SetBool.Request, response: SetBool.Response):
        now_ns = self._now_ns()
        with self._lock:
            if request.data:
                if self.plan_executor.enabled:
                    response.success, response.message = True, "already enabled"
                    return response
                refused = self._enable_locked(now_ns) if now_ns else "node clock not started"
                response.success = refused is None
                response.message = refused or "enabled: holding the current position until a " \
                                              "plan arrives"
            else:
                if self.plan_executor.enabled:
                    self._send_hold_locked()  # joint_trajectory: stop the running horizon
                self.plan_executor.disable("disabled through ~/enable")
                self._status = DISABLED
                response.success, response.message = True, "disabled"
        with self._lock:
            self.stats["enable_calls"] += 1
            self.stats["enable_refused"] += int(request.data and not response.success)
        if request.data and not response.success:
            self.get_logger().warning(f"enable refused: {response.message}")
        else:
            self.get_logger().info(f"~/enable {request.data}: {response.message}")
        return response

    # ------------------------------------------------------------------ control loop
    def _on_tick(self) -> None:
        now_ns = self._now_ns()
        if now_ns == 0:
            return
        with self._lock:
            cmd = self.plan_executor.command(now_ns * 1e-9)
            if cmd.status == DISABLED:
                self._status = DISABLED
                return
            changed = cmd.status != self._status
            self._status = cmd.status
            if cmd.status == HOLDING and (changed or cmd.reason != self._last_reason) \
                    and self.plan_executor.cause != "no_plan":  # waiting after enable: normal
                self.problems.report("executor", f"holding/{self.plan_executor.cause}", cmd.reason)
            self._last_reason = cmd.reason
            if self.cfg.output_mode == POSITION_STREAM:
                self._cmd_pub.publish(position_command(cmd.positions))
                self.stats["commands_sent"] += 1
            elif (changed or self._send_now or self._last_traj_ns is None
                  or now_ns - self._last_traj_ns >= self._jt_period_ns
                  or now_ns < self._last_traj_ns):
                self._publish_trajectory_locked(now_ns)

    def _publish_trajectory_locked(self, now_ns: int) -> None:
        points = self.plan_executor.remaining_trajectory(now_ns * 1e-9)
        if len(points.times_from_now) == 0:
            return
        self._cmd_pub.publish(command_trajectory(self.cfg.joint_names, points))
        self.stats["commands_sent"] += 1
        self._last_traj_ns = now_ns
        self._send_now = False

    def _send_hold_locked(self) -> None:
        """joint_trajectory mode: replace the controller's running horizon by a hold at the
        last command (a forward position controller holds its last value by itself)."""
        if self.cfg.output_mode != JOINT_TRAJECTORY or self.plan_executor.last_command is None:
            return
        q = self.plan_executor.last_command
        points = TrajectoryPoints(np.array([self.control_dt]), q[None], np.zeros((1, len(q))))
        self._cmd_pub.publish(command_trajectory(self.cfg.joint_names, points))
        self.stats["commands_sent"] += 1

    def stop(self) -> None:
        """Hold and go silent (call before shutdown while the context is still valid)."""
        with self._lock:
            if self.plan_executor.enabled:
                self._send_hold_locked()
            self.plan_executor.disable("node stopped")
            self._status = DISABLED

    # ------------------------------------------------------------------ parameters
    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Cheap checks of a proposed parameter set; refused sets say why."""
        proposed = {name: self.get_parameter(name).value for name in RUNTIME_TUNABLE}
        proposed.update({p.name: p.value for p in params if p.name in RUNTIME_TUNABLE})
        try:
            if any(p.name == "max_velocity" for p in params):
                limits_from_parameters(len(self.cfg.joint_names), None, None,
                                       proposed["max_velocity"])
            check_tunables(proposed)
        except (ValueError, TypeError) as err:
            return SetParametersResult(successful=False, reason=str(err))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        changes = {p.name: p.value for p in params if p.name in RUNTIME_TUNABLE}
        if not changes:
            return
        if "max_velocity" in changes:
            changes["max_velocity"] = _velocity_value(changes["max_velocity"])
        with self._lock:
            self.plan_executor.configure(**changes)
        self.get_logger().info(f"parameters changed: {changes}")

    # ------------------------------------------------------------------ diagnostics
    def _collect_diagnostics(self):
        with self._lock:
            status, reason = self.plan_executor.status, self.plan_executor.reason
            stamp = self.plan_executor.active_plan_stamp
            stats = dict(self.stats)
        problems = self.problems.counts()
        rejected = stats.get("plans_rejected", 0)
        # WARN while holding, or when plans were rejected since the last report
        level = WARN if status == HOLDING or rejected > self._rejected_reported else OK
        self._rejected_reported = rejected
        message = {TRACKING: "tracking", DISABLED: f"disabled ({reason})",
                   HOLDING: f"holding: {reason}"}[status]
        values = {"status": status, "reason": reason, "output_mode": self.cfg.output_mode,
                  "command_topic": self.cfg.command_topic,
                  "active_plan_stamp": "" if stamp is None else f"{stamp:.6f}",
                  "last_plan_problem": self.problems.last("plan") or ""}
        for key in ("plans_received", "plans_accepted", "plans_rejected", "plans_ignored",
                    "late_points", "skipped_points", "commands_sent", "joint_states_rejected",
                    "enable_refused"):
            values[key] = stats.get(key, 0)
        values.update({k: v for k, v in stats.items() if "/" in k})
        values.update({f"problems/{k}": v for k, v in problems.items()})
        jumps = [j for _, j in self.switches_since(-math.inf)]
        values["plan_switches"] = len(jumps)  # of the last SWITCH_MEMORY
        values["switch_velocity_jump_last"] = jumps[-1] if jumps else ""
        values["switch_velocity_jump_mean"] = float(np.mean(jumps)) if jumps else ""
        values["switch_velocity_jump_max"] = max(jumps) if jumps else ""
        values["clock_jumps"] = self.plan_executor.clock_jumps
        values["plans_held"] = self.plan_executor.plans_held
        return [make_status(f"{self.get_fully_qualified_name()}: executor", level, message,
                            values)]

    def switches_since(self, t: float) -> list[tuple[float, float]]:
        """(node time s, velocity jump rad/s) of the plan switches after `t`, oldest first."""
        with self._lock:
            return [(when, jump) for when, jump in self.switch_jumps if when > t]

    def destroy_node(self) -> None:
        if hasattr(self, "_diagnostics"):  # absent when the constructor refused a parameter
            self._diagnostics.destroy()
        super().destroy_node()


def main(args=None) -> int:
    return run_node(TrajectoryExecutorNode, NODE_NAME, args)


if __name__ == "__main__":
    sys.exit(main())
