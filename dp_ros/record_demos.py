"""`dp-ros record-demos`: demonstrations of the scripted expert on the simulated arm,
recorded through ROS topics into a rosbag2 bag.

sim_arm, the expert and the bag recorder run in this process on real rclpy topics,
services and the ROS graph, all on simulated time (``use_sim_time``) driven here in
lock step: advance the time by ``clock_step`` (10 ms), then run every callback that
became ready (timers that fell due, the messages they published, the recorder taking
them) until nothing is left, then advance again. So sim time runs as fast as the nodes
can work (about 3-5x real time on 2 cores), nothing is ever late or dropped, and a
recording is reproducible from its seed: every message is received at the sim time it
was stamped with (bag time = header stamp).

The bag holds the camera (sensor_msgs/Image), /joint_states (sensor_msgs/JointState),
the expert's commands as actions (/expert/action, sensor_msgs/JointState stamped with
their tick) and the episode boundaries (/episode, std_msgs/String JSON with label
left/right, see dp_ros.sim.expert_node). Sim time starts at the wall-clock second the
recording began, so bag dates read normally.

By default the nodes are invisible to other processes (ROS discovery off for this
process's context): a running robot or a second recording on the same ROS_DOMAIN_ID is
not disturbed, and does not disturb this one. ``visible=True`` lets rqt & co watch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dp_ros.data.bags import STORAGES, BagError
from dp_ros.data.from_bags import ParamsError, load_node_parameters

SIM_SECTION = "sim_arm"
SIM_PARAMETERS = ("link_lengths", "max_joint_velocity", "joint_state_rate_hz", "camera_width",
                  "camera_height", "camera_rate_hz", "task_rate_hz", "interpolation",
                  "interpolate_from_desired_state")
ACTION_TOPIC = "/expert/action"
EPISODE_TOPIC = "/episode"
MAX_EPISODE_SECONDS = 120.0  # sim time; an expert episode takes about 5 s


@dataclass
class RecordSummary:
    bag: Path
    storage: str
    episodes: int
    labels: list = field(default_factory=list)
    successes: int = 0
    collisions: int = 0
    sim_seconds: float = 0.0
    wall_seconds: float = 0.0
    messages: dict = field(default_factory=dict)

    @property
    def left(self) -> int:
        return self.labels.count("left")

    @property
    def right(self) -> int:
        return self.labels.count("right")

    def lines(self) -> list[str]:
        speed = self.sim_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0
        return [
            f"{self.bag} ({self.storage}): {self.episodes} episodes, {self.left} left / "
            f"{self.right} right, expert successes {self.successes}/{self.episodes}"
            + (f", collisions {self.collisions}" if self.collisions else ""),
            f"  {self.sim_seconds:.1f} s of sim time in {self.wall_seconds:.1f} s "
            f"({speed:.1f}x real time); messages: "
            + ", ".join(f"{t} {n}" for t, n in sorted(self.messages.items())),
        ]


@contextlib.contextmanager
def _discovery_range(value: Optional[str]):
    """Set ROS_AUTOMATIC_DISCOVERY_RANGE while a context initialises (rcl reads it then)."""
    if value is None:
        yield
        return
    old = os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE")
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ROS_AUTOMATIC_DISCOVERY_RANGE", None)
        else:
            os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = old


class LockstepClock:
    """Sim time in lock step: set the time, then run every ready callback until idle.

    The time reaches the nodes as their /clock subscription would deliver it (it sets
    the ROS time override of each node's clock, which use_sim_time nodes follow), but
    directly: a /clock message per step would cost every node a callback and the
    executor a wait pass. With ``publish_clock`` /clock is published as well, for
    observers in other processes.
    """

    MAX_PASSES = 200  # per step: a node that keeps itself busy forever is a bug

    def __init__(self, nodes, executor, start_ns: int, step_ns: int,
                 publisher_node=None):
        self.executor = executor
        self.now_ns = int(start_ns)
        self.step_ns = int(step_ns)
        self._clocks = [n.get_clock() for n in nodes]
        self._pub = None
        if publisher_node is not None:
            from rosgraph_msgs.msg import Clock
            self._Clock = Clock
            self._pub = publisher_node.create_publisher(Clock, "/clock", 10)

    def set_time(self) -> None:
        from rclpy.time import Time
        now = Time(nanoseconds=self.now_ns)
        for clock in self._clocks:
            clock.set_ros_time_override(now)
        if self._pub is not None:
            msg = self._Clock()
            msg.clock.sec, msg.clock.nanosec = divmod(self.now_ns, 1_000_000_000)
            self._pub.publish(msg)

    def drain(self) -> int:
        """Run ready callbacks until a whole wait pass finds nothing; returns the count."""
        from rclpy.executors import TimeoutException
        ran = 0
        worked = False
        passes = 0
        while passes < self.MAX_PASSES:
            try:
                handler, _, _ = self.executor.wait_for_ready_callbacks(timeout_sec=0)
            except TimeoutException:  # the end of one wait pass
                passes += 1
                if not worked:
                    break
                worked = False
                continue
            handler()
            error = handler.exception()
            if error is not None:
                raise error
            worked = True
            ran += 1
        return ran

    def step(self) -> None:
        self.now_ns += self.step_ns
        self.set_time()
        self.drain()


def _settings(config: Optional[str]) -> tuple[dict, float]:
    """(sim_arm parameters, the expert's dt = the aggregator's tick period) from the
    parameter file."""
    if config is None:
        from dp_ros.paths import config_file
        path = config_file("demo_robot.yaml")
        if not path.is_file():
            return {}, 0.1
    else:
        path = Path(config)
    params = load_node_parameters(path, SIM_SECTION, required=False)
    rate = float(load_node_parameters(path, "obs_aggregator", required=False)
                 .get("rate_hz", 10.0))
    if not rate > 0:
        raise ParamsError(f"{path}: obs_aggregator rate_hz must be > 0, got {rate}")
    return {k: v for k, v in params.items() if k in SIM_PARAMETERS}, 1.0 / rate


def record_demos(out, episodes: int, storage: str = "mcap", seed: int = 0,
                 config: Optional[str] = None, clock_step: float = 0.01,
                 settle_time: float = 0.5, progress: bool = True, visible: bool = False,
                 overwrite: bool = False) -> RecordSummary:
    """Record ``episodes`` expert demonstrations into the bag directory ``out``.

    ``config``: a parameter file whose ``sim_arm`` section configures the arm and camera
    (default: the demo robot's config/demo_robot.yaml). ``seed`` seeds the sim's
    episodes and the expert's side draws. Raises BagError / ParamsError / ValueError for
    bad arguments; the bag is removed if recording fails.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import qos_profile_sensor_data

    from dp_ros.nodes.bag_recorder import BagRecorder
    from dp_ros.sim.expert_node import EPISODE_QOS, ExpertNode
    from dp_ros.sim.sim_arm_node import SimArmNode

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if not clock_step > 0:
        raise ValueError(f"clock_step must be > 0, got {clock_step}")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise BagError(f"{out}: already exists (choose another --out or remove it)")
        import shutil
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    sim_params, dt = _settings(config)
    link_lengths = [float(v) for v in sim_params.get("link_lengths", [0.5, 0.5])]

    with _discovery_range(None if visible else "OFF"):
        context = rclpy.Context()
        rclpy.init(context=context)
    nodes = []
    recorder = None
    wall0 = time.monotonic()  # progress reporting only
    try:
        sim_time = [Parameter("use_sim_time", value=True)]
        # nobody can call parameter services here; fewer entities make each wait cheaper
        lean = dict(context=context, start_parameter_services=False,
                    enable_rosout=visible)
        sim = SimArmNode(**lean, parameter_overrides=sim_time + [
            Parameter(k, value=v) for k, v in sim_params.items()] + [
            Parameter("seed", value=int(seed))])
        nodes.append(sim)
        expert = ExpertNode(**lean, parameter_overrides=sim_time + [
            Parameter("episodes", value=int(episodes)),
            Parameter("seed", value=int(seed)),
            Parameter("settle_time", value=float(settle_time)),
            # commands on the observation ticks; the poll timer was created at time 0
            # with period dt, so it fires exactly on them
            Parameter("dt", value=dt), Parameter("poll_period", value=dt),
            Parameter("link_lengths", value=link_lengths),
            Parameter("max_joint_velocity",
                      value=float(sim_params.get("max_joint_velocity", 2.0))),
            Parameter("action_topic", value=ACTION_TOPIC),
            Parameter("episode_topic", value=EPISODE_TOPIC)])
        nodes.append(expert)
        from rclpy.qos import QoSProfile
        topics = {"/camera/image_raw": ("sensor_msgs/msg/Image", qos_profile_sensor_data),
                  "/joint_states": ("sensor_msgs/msg/JointState", QoSProfile(depth=10)),
                  ACTION_TOPIC: ("sensor_msgs/msg/JointState", QoSProfile(depth=10)),
                  EPISODE_TOPIC: ("std_msgs/msg/String", EPISODE_QOS)}
        recorder = BagRecorder(
            **lean, qos={t: q for t, (_, q) in topics.items()},
            parameter_overrides=sim_time + [
                Parameter("output", value=str(out)), Parameter("storage", value=storage),
                Parameter("topics", value=list(topics)),
                Parameter("types", value=[ty for ty, _ in topics.values()])])
        nodes.append(recorder)
        for key, value in (("episodes", episodes), ("seed", seed),
                           ("recorded_by", "dp-ros record-demos")):
            recorder.writer.set_custom_data(f"dp_ros.{key}", str(value))
        driver = Node("record_demos_clock", **lean)
        nodes.append(driver)
        executor = SingleThreadedExecutor(context=context)
        for node in nodes:
            executor.add_node(node)

        # sim time starts at a whole second of the wall clock: bag dates read normally
        start_ns = (time.time_ns() // 1_000_000_000) * 1_000_000_000
        clock = LockstepClock([sim, expert, recorder], executor, start_ns,
                              int(round(clock_step * 1e9)),
                              publisher_node=driver if visible else None)
        clock.set_time()
        clock.drain()

        bar = _progress(episodes, progress)
        done = 0
        episode_start_ns = clock.now_ns
        limit_ns = int(MAX_EPISODE_SECONDS * 1e9)
        while not expert.done:
            clock.step()
            finished = len(expert.finished)
            if finished != done:
                if bar is not None:
                    bar.update(finished - done)
                    labels = [e.label for e in expert.finished]
                    bar.set_postfix(left=labels.count("left"), right=labels.count("right"))
                done = finished
                episode_start_ns = clock.now_ns
            if clock.now_ns - episode_start_ns > limit_ns:
                raise RuntimeError(f"episode {done} did not finish within "
                                   f"{MAX_EPISODE_SECONDS:.0f} s of sim time")
        # one more step: the last messages reach the recorder
        clock.step()
        if bar is not None:
            bar.close()
        recorder.close()
        finished = expert.finished
        return RecordSummary(
            bag=out, storage=storage, episodes=len(finished),
            labels=[e.label for e in finished],
            successes=sum(e.success for e in finished),
            collisions=sum(bool(e.result.get("collision")) for e in finished),
            sim_seconds=(clock.now_ns - start_ns) * 1e-9,
            wall_seconds=time.monotonic() - wall0,
            messages=dict(recorder.counts))
    except BaseException:
        if recorder is not None:
            recorder.writer.abort()
        raise
    finally:
        for node in reversed(nodes):
            try:
                node.destroy_node()
            except Exception:
                pass
        rclpy.try_shutdown(context=context)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="episode", desc="recording", file=sys.stderr)


def main(args) -> int:
    """CLI entry (argparse namespace from dp_ros.cli)."""
    try:
        summary = record_demos(args.out, args.episodes, storage=args.storage, seed=args.seed,
                               config=args.config, progress=not args.quiet,
                               visible=args.visible, overwrite=args.overwrite)
    except (BagError, ParamsError, ValueError, RuntimeError) as err:
        print(f"dp-ros record-demos: {err}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    return 0
