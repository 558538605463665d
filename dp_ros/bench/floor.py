"""The no-work floor of `dp-ros bench ros`: the same processes, topics, hops and priorities
as the pipeline, doing nothing but passing a stamp on.

- floor_relay stands in for the aggregator: it subscribes to the source's cameras and joint
  states with the aggregator's QoS and, as soon as every stream is settled for a tick (the
  aggregator's rule for a tick it may build), publishes that tick's stamp. No decoding,
  preprocessing, checks or window.
- floor_echo stands in for the policy node: it republishes each stamp it receives. No
  join, no hand-off to a worker thread, no inference, no plan.
- floor_timer stands in for the executor: a timer at the control period that publishes the
  time it fired. No plan, no limits, no command.

Each runs at its counterpart's priority while the real pipeline runs, so the bench can
print, beside each figure, what Python rclpy and DDS alone cost on this machine at that
moment: a target below the floor cannot be met by any work done in these nodes.
"""

from __future__ import annotations

import sys
from typing import Optional

from dp_ros.bench.process import spin_until_stopped, start_node
from dp_ros.control.streams import StreamBuffer

RELAY_TOPIC = "/bench/floor/window"
ECHO_TOPIC = "/bench/floor/plan"
TIMER_TOPIC = "/bench/floor/command"


class TickRelay:
    """The aggregator's settling rule with nothing else: stamps in (per stream), the ticks
    every stream is settled for out (StreamBuffer.settled, the rule the aggregator uses)."""

    def __init__(self, streams: int, tick_ns: int):
        self.tick_ns = tick_ns
        self.buffers = [StreamBuffer(str(i), staleness=1.0) for i in range(streams)]
        self.next_tick: Optional[int] = None  # index of the first tick not published yet

    def push(self, stream: int, stamp_ns: int) -> Optional[int]:
        """The newest tick (index) this sample settles, or None."""
        self.buffers[stream].push(stamp_ns * 1e-9, None)
        if self.next_tick is None:
            self.next_tick = stamp_ns // self.tick_ns + 1
        k = self.next_tick
        while all(b.settled(k * self.tick_ns * 1e-9) for b in self.buffers):
            k += 1
        if k == self.next_tick:
            return None
        self.next_tick = k
        return k - 1


def run_relay(camera_topics: list[str], joint_states_topic: str, tick_ns: int,
              priority: int) -> int:
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Header

    from dp_ros.nodes.obs_aggregator import JOINT_STATES_QOS
    from dp_ros.nodes.window_msgs import WINDOW_QOS, ns_to_stamp, stamp_to_ns
    node, stop = start_node("floor_relay", priority)
    pub = node.create_publisher(Header, RELAY_TOPIC, WINDOW_QOS)
    relay = TickRelay(len(camera_topics) + 1, tick_ns)

    def on_sample(i: int, msg) -> None:
        k = relay.push(i, stamp_to_ns(msg.header.stamp))
        if k is not None:
            pub.publish(Header(stamp=ns_to_stamp(k * tick_ns)))

    for i, topic in enumerate(camera_topics):
        node.create_subscription(Image, topic, lambda m, i=i: on_sample(i, m),
                                 qos_profile_sensor_data)
    node.create_subscription(JointState, joint_states_topic,
                             lambda m: on_sample(len(camera_topics), m), JOINT_STATES_QOS)
    spin_until_stopped(node, stop)
    return 0


def run_echo(priority: int) -> int:
    from std_msgs.msg import Header

    from dp_ros.nodes.trajectory_executor import PLAN_QOS  # the policy node's, without torch
    from dp_ros.nodes.window_msgs import WINDOW_QOS
    node, stop = start_node("floor_echo", priority)
    pub = node.create_publisher(Header, ECHO_TOPIC, PLAN_QOS)
    node.create_subscription(Header, RELAY_TOPIC, pub.publish, WINDOW_QOS)
    spin_until_stopped(node, stop)
    return 0


def run_timer(period_ns: int, priority: int) -> int:
    from std_msgs.msg import Header

    from dp_ros.nodes.trajectory_executor import COMMAND_QOS
    node, stop = start_node("floor_timer", priority)
    pub = node.create_publisher(Header, TIMER_TOPIC, COMMAND_QOS)
    clock = node.get_clock()
    node.create_timer(period_ns * 1e-9, lambda: pub.publish(Header(stamp=clock.now().to_msg())))
    spin_until_stopped(node, stop)
    return 0


def commands(camera_topics: list[str], joint_states_topic: str, tick_ns: int,
             control_period_ns: int, pipeline_priority: int, executor_priority: int
             ) -> dict[str, list[str]]:
    """process name -> command line, for the bench's process group."""
    base = [sys.executable, "-m", "dp_ros.bench.floor"]
    return {"floor_relay": base + ["relay", ",".join(camera_topics), joint_states_topic,
                                   str(tick_ns), str(pipeline_priority)],
            "floor_echo": base + ["echo", str(pipeline_priority)],
            "floor_timer": base + ["timer", str(control_period_ns), str(executor_priority)]}


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "relay":
        return run_relay(argv[1].split(","), argv[2], int(argv[3]), int(argv[4]))
    if len(argv) == 2 and argv[0] == "echo":
        return run_echo(int(argv[1]))
    if len(argv) == 3 and argv[0] == "timer":
        return run_timer(int(argv[1]), int(argv[2]))
    print("usage: python -m dp_ros.bench.floor relay|echo|timer ...  (started by "
          "`dp-ros bench ros`)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
