"""sim_arm: the simulated arm on ROS topics, shaped like a ros2_control arm.

Publishes (names relative to the node's namespace; absolute without one)
- joint_states (sensor_msgs/JointState, joint_1..joint_N, positions + velocities) at
  ``joint_state_rate_hz``, reliable
- camera/image_raw (sensor_msgs/Image rgb8, ``camera_width`` x ``camera_height``) at
  ``camera_rate_hz``, sensor-data QoS (best effort), frame "camera"
- ~/task (std_msgs/String, JSON; reliable, transient local: late joiners get the last):
  {"episode": k, "seed": s, "start_positions", "goal", "goal_radius", "obstacle",
   "obstacle_radius", "time_limit", "success", "collision", "reached", "timed_out",
   "side", "time_to_goal", "min_clearance", "elapsed", "done", "end_effector"}
  at ``task_rate_hz`` and on every reset
- ~/end_effector (geometry_msgs/PointStamped, frame "world") with each joint state

Subscribes
- arm_controller/joint_trajectory (trajectory_msgs/JointTrajectory): joint_trajectory_
  controller semantics (a new message replaces the running trajectory; header.stamp 0 =
  now; empty points = stop and hold)
- forward_position_controller/commands (std_msgs/Float64MultiArray, joint order)
The latest command of either kind wins. Invalid ones are rejected, one warning per
cause, and the arm keeps doing what it did.

Service ~/reset (std_srvs/Trigger): next episode (sample_episode(seed + k) for the k-th
episode since start or since ``seed`` was last set); the arm jumps to its start pose and
holds. The response message is the episode as JSON.

All timing is on the node clock: with use_sim_time the arm moves at /clock's pace.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from geometry_msgs.msg import PointStamped
from rcl_interfaces.msg import (ParameterDescriptor,
                                ParameterType, SetParametersResult)
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from dp_ros.nodes.params import float_range, int_range
from dp_ros.sim.arm import (INTERPOLATIONS, ArmGeometry, CommandRejected, SimulatedArm,
                            parse_position_command, parse_trajectory)
from dp_ros.sim.render import render_scene, view_for
from dp_ros.sim.task import Episode, EpisodeMonitor, sample_episode, task_for
from dp_ros.nodes.run import run_node

NODE_NAME = "sim_arm"
TRAJECTORY_TOPIC = "arm_controller/joint_trajectory"
COMMANDS_TOPIC = "forward_position_controller/commands"
JOINT_STATES_TOPIC = "joint_states"
CAMERA_TOPIC = "camera/image_raw"
TASK_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


# name -> (default, descriptor). Read-only ones shape the node; the others apply live.
PARAMETERS = {
    "link_lengths": ([0.5, 0.5], ParameterDescriptor(
        description="Link lengths (m), 2 or 3 values: the number of joints. The task "
                    "scene scales with their sum", type=ParameterType.PARAMETER_DOUBLE_ARRAY,
        read_only=True)),
    "max_joint_velocity": (2.0, ParameterDescriptor(
        description="Joint velocity limit (rad/s)", floating_point_range=float_range(0.01, 100.0),
        read_only=True)),
    "joint_state_rate_hz": (100.0, ParameterDescriptor(
        description="joint_states rate (Hz); the simulation steps at this rate",
        floating_point_range=float_range(1.0, 1000.0), read_only=True)),
    "camera_width": (96, ParameterDescriptor(
        description="Camera image width (pixels)", integer_range=int_range(8, 4096),
        read_only=True)),
    "camera_height": (96, ParameterDescriptor(
        description="Camera image height (pixels)", integer_range=int_range(8, 4096),
        read_only=True)),
    "camera_rate_hz": (30.0, ParameterDescriptor(
        description="Camera rate (Hz)", floating_point_range=float_range(0.1, 1000.0),
        read_only=True)),
    "task_rate_hz": (10.0, ParameterDescriptor(
        description="~/task rate (Hz)", floating_point_range=float_range(0.1, 1000.0),
        read_only=True)),
    "seed": (0, ParameterDescriptor(
        description="Episode seed: episode k after setting it (k = 0 at start) is "
                    "sample_episode(seed + k); a new value applies at the next ~/reset",
        integer_range=int_range(0, 2**31 - 1))),
    "interpolation": ("linear", ParameterDescriptor(
        description=f"Trajectory interpolation between points: one of {INTERPOLATIONS}")),
    "interpolate_from_desired_state": (True, ParameterDescriptor(
        description="A new trajectory starts from the controller's desired state (true) "
                    "or from the measured state (false)")),
}


def _seconds(duration) -> float:
    return duration.sec + duration.nanosec * 1e-9


class SimArmNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        values = {name: self.declare_parameter(name, default, descriptor).value
                  for name, (default, descriptor) in PARAMETERS.items()}
        problems = self._check({k: values[k] for k in ("interpolation",)})
        if problems:
            raise ValueError(problems)
        self.geometry = ArmGeometry(link_lengths=tuple(values["link_lengths"]),
                                    max_velocity=values["max_joint_velocity"])
        self.spec = task_for(self.geometry)
        self.view = view_for(self.geometry, values["camera_width"], values["camera_height"])
        self.joint_names = self.geometry.joint_names
        self.rejected = 0  # commands refused so far (tests and diagnostics read it)

        self._seed = int(values["seed"])
        self._episode_k = 0        # episodes since start or since ``seed`` was set
        self._episode_count = 0    # episodes since start
        self.episode: Episode = sample_episode(self._seed, self.geometry, self.spec)
        self.arm = SimulatedArm(self.geometry, self.episode.start_positions,
                                interpolation=values["interpolation"],
                                interpolate_from_desired_state=values[
                                    "interpolate_from_desired_state"])
        self.monitor = EpisodeMonitor(self.episode, self.geometry)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._joint_pub = self.create_publisher(JointState, JOINT_STATES_TOPIC, 10)
        self._ee_pub = self.create_publisher(PointStamped, "~/end_effector", 10)
        self._image_pub = self.create_publisher(Image, CAMERA_TOPIC, qos_profile_sensor_data)
        self._task_pub = self.create_publisher(String, "~/task", TASK_QOS)
        self.create_subscription(JointTrajectory, TRAJECTORY_TOPIC, self._on_trajectory, 10)
        self.create_subscription(Float64MultiArray, COMMANDS_TOPIC, self._on_commands, 10)
        self.create_service(Trigger, "~/reset", self._on_reset)
        # timers run on the node clock (ROS time: follows /clock under use_sim_time)
        self.create_timer(1.0 / values["joint_state_rate_hz"], self._on_joint_timer)
        self.create_timer(1.0 / values["camera_rate_hz"], self._on_camera_timer)
        self.create_timer(1.0 / values["task_rate_hz"], self._publish_task)
        self._publish_task()
        self.get_logger().info(
            f"{self.geometry.n_joints}-joint arm {list(self.geometry.link_lengths)} m, "
            f"episode seed {self.episode.seed}, camera {self.view.width}x{self.view.height}")

    # ------------------------------------------------------------------ parameters

    @staticmethod
    def _check(values: dict) -> str:
        if "interpolation" in values and values["interpolation"] not in INTERPOLATIONS:
            return f"interpolation must be one of {INTERPOLATIONS}, got {values['interpolation']!r}"
        return ""

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        problem = self._check({p.name: p.value for p in params})
        if problem:
            return SetParametersResult(successful=False, reason=problem)
        for p in params:
            if p.name == "interpolation":
                self.arm.interpolation = p.value      # applies to the next trajectory
            elif p.name == "interpolate_from_desired_state":
                self.arm.interpolate_from_desired_state = bool(p.value)
            elif p.name == "seed":
                self._seed, self._episode_k = int(p.value), -1  # next reset: episode `seed`
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ time and state

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _advance(self) -> float:
        """Step the simulation to the node clock and judge the new state."""
        now = self._now()
        state = self.arm.step(now)
        self.monitor.update(now, state.positions)
        return now

    def _on_joint_timer(self) -> None:
        self._advance()
        stamp = self.get_clock().now().to_msg()
        msg = JointState(name=self.joint_names, position=self.arm.positions.tolist(),
                         velocity=self.arm.velocities.tolist())
        msg.header.stamp = stamp
        self._joint_pub.publish(msg)
        ee = self.arm.end_effector()
        point = PointStamped()
        point.header.stamp, point.header.frame_id = stamp, "world"
        point.point.x, point.point.y = float(ee[0]), float(ee[1])
        self._ee_pub.publish(point)

    def _on_camera_timer(self) -> None:
        self._advance()
        pixels = render_scene(self.geometry, self.arm.positions, self.episode, self.view)
        msg = Image(height=self.view.height, width=self.view.width, encoding="rgb8",
                    is_bigendian=0, step=self.view.width * 3)
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = "camera"
        msg.data = pixels.tobytes()
        self._image_pub.publish(msg)

    def task_state(self) -> dict:
        state = {"episode": self._episode_count, **self.episode.to_dict(),
                 **self.monitor.result.to_dict(),
                 "end_effector": [float(v) for v in self.arm.end_effector()]}
        return state

    def _publish_task(self) -> None:
        self._task_pub.publish(String(data=json.dumps(self.task_state())))

    # ------------------------------------------------------------------ commands

    def _reject(self, what: str, err: CommandRejected) -> None:
        self.rejected += 1
        for cause in err.causes:
            self.get_logger().warning(f"{what} rejected, arm holds: {cause}")

    def _warn_if_clamped(self, positions) -> None:
        clipped = self.geometry.clip(positions)
        if (clipped != positions).any():
            self.get_logger().warning("command outside the joint limits: clamped",
                                      throttle_duration_sec=5.0)

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        stamp = msg.header.stamp
        start: Optional[float] = None if stamp.sec == 0 and stamp.nanosec == 0 else \
            stamp.sec + stamp.nanosec * 1e-9
        try:
            traj = parse_trajectory(
                self.joint_names, list(msg.joint_names), start,
                [_seconds(p.time_from_start) for p in msg.points],
                [list(p.positions) for p in msg.points],
                [list(p.velocities) for p in msg.points])
            self.arm.command_trajectory(traj, self._now())
        except CommandRejected as err:
            self._reject("trajectory", err)
            return
        if len(traj.times):
            self._warn_if_clamped(traj.positions)

    def _on_commands(self, msg: Float64MultiArray) -> None:
        try:
            target = parse_position_command(msg.data, self.geometry.n_joints)
        except CommandRejected as err:
            self._reject("position command", err)
            return
        self._warn_if_clamped(target)
        self.arm.command_positions(target, self._now())

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response):
        self._episode_k += 1
        self._episode_count += 1
        self.episode = sample_episode(self._seed + self._episode_k, self.geometry, self.spec)
        self.arm.reset(self.episode.start_positions, self._now())
        self.monitor = EpisodeMonitor(self.episode, self.geometry)
        self._publish_task()
        self.get_logger().info(f"episode {self._episode_count}: seed {self.episode.seed}")
        response.success = True
        response.message = self.episode.to_json()
        return response


def main(args=None) -> int:
    return run_node(SimArmNode, NODE_NAME, args)


if __name__ == "__main__":
    sys.exit(main())
