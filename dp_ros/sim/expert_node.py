"""expert: the scripted expert (dp_ros.sim.expert) driving the simulated arm via topics.

Per episode it calls the sim's reset service, plans a motion round the obstacle on a side
drawn at random (left / right, 50/50; ``seed`` makes the draws reproducible), waits
``settle_time`` so every sensor shows the new scene, then commands the planned joint
positions on the tick grid (multiples of ``dt`` on the node clock, so the commands
line up with the observation ticks of the same rate).

Publishes
- ``command_topic`` (std_msgs/Float64MultiArray, joint order; default
  /forward_position_controller/commands): the command the arm executes
- ``action_topic`` (sensor_msgs/JointState; default /expert/action): the same command as
  the recorded action, named joints in ``position``, ``header.stamp`` = its tick. The
  dataset builder takes the action of tick t from here (the latest stamped <= t)
- ``episode_topic`` (std_msgs/String, JSON; default /episode; reliable, transient local):
  episode boundaries, ``{"event": "start", "episode": i, "label": "left"|"right",
  "stamp_ns": first tick, "seed": episode seed, "steps": n}`` and
  ``{"event": "end", "episode": i, "label": ..., "stamp_ns": last tick, "success": ...,
  "collision": ..., "side": side the sim saw, "seed": ...}``. Rows of episode i are the
  ticks start.stamp_ns <= t <= end.stamp_ns

Uses the sim's ``reset_service`` (std_srvs/Trigger; its reply is the episode as JSON) and
``task_topic`` (the sim's JSON status: success, collision, side) for the end event.
All timing on the node clock (use_sim_time follows /clock).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Optional

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray, String
from std_srvs.srv import Trigger

from dp_ros.nodes.params import float_range, int_range
from dp_ros.sim.arm import ArmGeometry
from dp_ros.sim.expert import ExpertConfig, ExpertPlan, ScriptedExpert
from dp_ros.sim.task import Episode
from dp_ros.nodes.run import run_node

NODE_NAME = "expert"
EPISODE_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
TASK_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)


PARAMETERS = {
    "dt": (0.1, ParameterDescriptor(
        description="Command period (s); commands lie on multiples of dt of the node clock",
        floating_point_range=float_range(0.001, 10.0), read_only=True)),
    "poll_period": (0.01, ParameterDescriptor(
        description="Timer period (s) checking for the next tick (<= dt)",
        floating_point_range=float_range(0.0005, 1.0), read_only=True)),
    "settle_time": (0.5, ParameterDescriptor(
        description="Seconds between a reset and the episode's first tick; must exceed the "
                    "observation staleness limits so no sample shows the previous scene",
        floating_point_range=float_range(0.0, 60.0), read_only=True)),
    "episodes": (0, ParameterDescriptor(
        description="Stop after this many episodes (0: run until stopped)",
        integer_range=int_range(0, 1_000_000),
        read_only=True)),
    "seed": (0, ParameterDescriptor(
        description="Seed of the side and arc-radius draws (-1: fresh randomness)",
        integer_range=int_range(-1, 2**31 - 1),
        read_only=True)),
    "link_lengths": ([0.5, 0.5], ParameterDescriptor(
        description="Link lengths (m) of the arm being driven (as sim_arm's)",
        read_only=True)),
    "max_joint_velocity": (2.0, ParameterDescriptor(
        description="The arm's joint velocity limit (rad/s), as sim_arm's",
        floating_point_range=float_range(0.01, 100.0), read_only=True)),
    "command_topic": ("/forward_position_controller/commands", ParameterDescriptor(
        description="std_msgs/Float64MultiArray position commands to the arm", read_only=True)),
    "action_topic": ("/expert/action", ParameterDescriptor(
        description="sensor_msgs/JointState: each command, stamped with its tick",
        read_only=True)),
    "episode_topic": ("/episode", ParameterDescriptor(
        description="std_msgs/String JSON episode boundaries", read_only=True)),
    "reset_service": ("/sim_arm/reset", ParameterDescriptor(
        description="std_srvs/Trigger starting the sim's next episode", read_only=True)),
    "task_topic": ("/sim_arm/task", ParameterDescriptor(
        description="std_msgs/String JSON task status of the sim", read_only=True)),
}


@dataclass
class EpisodeRecord:
    index: int
    label: str
    seed: int
    start_ns: int
    steps: int
    end_ns: Optional[int] = None
    result: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return bool(self.result.get("success"))


class ExpertNode(Node):
    def __init__(self, **kwargs):
        super().__init__(NODE_NAME, **kwargs)
        p = {name: self.declare_parameter(name, default, descriptor).value
             for name, (default, descriptor) in PARAMETERS.items()}
        if p["poll_period"] > p["dt"]:
            raise ValueError(f"poll_period {p['poll_period']} must be <= dt {p['dt']}")
        self.dt_ns = int(round(p["dt"] * 1e9))
        self.settle_ns = int(round(p["settle_time"] * 1e9))
        self.max_episodes = int(p["episodes"])
        self.geometry = ArmGeometry(link_lengths=tuple(p["link_lengths"]),
                                    max_velocity=p["max_joint_velocity"])
        self.joint_names = list(self.geometry.joint_names)
        seed = None if p["seed"] < 0 else int(p["seed"])
        self.expert = ScriptedExpert(self.geometry, ExpertConfig(dt=self.dt_ns * 1e-9), seed)

        self.episodes: list[EpisodeRecord] = []  # finished and running
        self._state = "reset"  # reset -> waiting -> settle -> run -> reset ... -> done
        self._future = None
        self._plan: Optional[ExpertPlan] = None
        self._current: Optional[EpisodeRecord] = None
        self._start_k = 0
        self._last_k: Optional[int] = None
        self._task: dict = {}
        self._warned_service = False

        self._cmd_pub = self.create_publisher(Float64MultiArray, p["command_topic"], 10)
        self._action_pub = self.create_publisher(JointState, p["action_topic"], 10)
        self._episode_pub = self.create_publisher(String, p["episode_topic"], EPISODE_QOS)
        self.create_subscription(String, p["task_topic"], self._on_task, TASK_QOS)
        self._reset = self.create_client(Trigger, p["reset_service"])
        self._timer = self.create_timer(p["poll_period"], self._on_poll)  # node clock
        self.get_logger().info(
            f"scripted expert: dt {p['dt']} s, {self.max_episodes or 'unlimited'} episode(s), "
            f"commands on {p['command_topic']}, actions on {p['action_topic']}")

    # ------------------------------------------------------------------ status

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def finished(self) -> list[EpisodeRecord]:
        return [e for e in self.episodes if e.end_ns is not None]

    def _on_task(self, msg: String) -> None:
        try:
            self._task = json.loads(msg.data)
        except ValueError:
            pass

    # ------------------------------------------------------------------ the loop

    def _on_poll(self) -> None:
        now_ns = self.get_clock().now().nanoseconds
        if now_ns == 0:
            return  # simulated time has not started
        if self._state == "reset":
            self._request_reset()
        elif self._state == "waiting":
            self._check_reset(now_ns)
        elif self._state in ("settle", "run"):
            k = now_ns // self.dt_ns
            if self._last_k is not None and k <= self._last_k:
                if k < self._last_k:  # the clock went back: this episode is void
                    self.get_logger().warning("clock jumped backwards: episode abandoned")
                    if self._current in self.episodes and self._current.end_ns is None:
                        self.episodes.remove(self._current)
                    self._state = "reset"
                return
            self._last_k = k
            if self._state == "settle" and k >= self._start_k:
                self._begin(k)
            if self._state == "run":
                self._command(k)

    def _request_reset(self) -> None:
        if not self._reset.service_is_ready():
            if not self._warned_service:
                self.get_logger().info(f"waiting for {self._reset.srv_name}")
                self._warned_service = True
            return
        self._future = self._reset.call_async(Trigger.Request())
        self._state = "waiting"

    def _check_reset(self, now_ns: int) -> None:
        if not self._future.done():
            return
        response = self._future.result()
        self._future = None
        if response is None or not response.success:
            self.get_logger().error("sim reset failed; retrying")
            self._state = "reset"
            return
        episode = Episode.from_dict(json.loads(response.message))
        self._plan = self.expert.plan(episode)
        # the first tick at least settle_time after the reset
        self._start_k = -(-(now_ns + self.settle_ns) // self.dt_ns)
        self._current = EpisodeRecord(index=len(self.episodes), label=self._plan.side,
                                      seed=episode.seed, start_ns=self._start_k * self.dt_ns,
                                      steps=len(self._plan.positions))
        self._last_k = None
        self._state = "settle"

    def _begin(self, k: int) -> None:
        ep = self._current
        ep.start_ns = k * self.dt_ns
        self._start_k = k
        self.episodes.append(ep)
        self._publish_event("start", ep, ep.start_ns)
        self._state = "run"

    def _command(self, k: int) -> None:
        ep, plan = self._current, self._plan
        j = k - self._start_k
        positions = plan.positions[min(j, len(plan.positions) - 1)]
        stamp_ns = k * self.dt_ns
        self._cmd_pub.publish(Float64MultiArray(data=[float(v) for v in positions]))
        action = JointState(name=self.joint_names, position=[float(v) for v in positions])
        sec, nanosec = divmod(stamp_ns, 1_000_000_000)
        action.header.stamp.sec, action.header.stamp.nanosec = sec, nanosec
        self._action_pub.publish(action)
        if j >= len(plan.positions) - 1:
            ep.end_ns = stamp_ns
            task = self._task if self._task.get("seed") == ep.seed else {}
            ep.result = {key: task.get(key) for key in ("success", "collision", "side",
                                                        "time_to_goal", "min_clearance")}
            self._publish_event("end", ep, stamp_ns, **ep.result)
            self.get_logger().info(
                f"episode {ep.index}: {ep.label}, {ep.steps} steps, "
                f"success={ep.result.get('success')}")
            if self.max_episodes and len(self.finished) >= self.max_episodes:
                self._state = "done"
            else:
                self._state = "reset"

    def _publish_event(self, event: str, ep: EpisodeRecord, stamp_ns: int, **extra) -> None:
        payload = {"event": event, "episode": ep.index, "label": ep.label,
                   "stamp_ns": int(stamp_ns), "seed": ep.seed}
        if event == "start":
            payload["steps"] = ep.steps
        payload.update(extra)
        self._episode_pub.publish(String(data=json.dumps(payload)))


def main(args=None) -> int:
    return run_node(ExpertNode, NODE_NAME, args, until=lambda node: node.done)


if __name__ == "__main__":
    sys.exit(main())
