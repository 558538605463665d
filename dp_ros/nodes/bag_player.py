"""bag_player: publish a bag's messages on live topics at their recorded pace, with /clock.

What ``ros2 bag play --clock`` does, without a ROS install: messages leave as the CDR
bytes that were recorded (``Publisher.publish(bytes)``, no deserialize / serialize
round trip), in bag-time order, paced by the steady clock at ``rate`` times the
recorded speed. With ``clock_hz`` it publishes /clock (rosgraph_msgs/Clock) from bag
time on a grid of 1/clock_hz seconds, so nodes with ``use_sim_time`` run on bag time.
Ordering guarantee: every message with bag time <= T is published before the /clock
message carrying T, so a node evaluating time T has been sent everything up to T.

Options as ``ros2 bag play``: topic selection (recorded or remapped names), topic
remapping, start offset, rate, loop. Looping jumps /clock back to the start: nodes see
a backward time jump (obs_aggregator clears its buffers, the executor holds).

Publisher QoS: the recorded offered QoS (reliable / transient local only if every
recorded publisher was), depth at least 10.

CLI: ``dp-ros play BAG [--rate R] [--clock [HZ]] [--loop] [--topics T ...]
[--remap FROM:=TO ...] [--start-offset S] [--wait-for-subscribers S]``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock

from dp_ros.data.bags import BagError, BagReader, open_bag, parse_remap
from dp_ros.nodes.bag_recorder import message_type

NODE_NAME = "bag_player"
CLOCK_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
MIN_DEPTH = 10


def qos_from_bag(profiles) -> QoSProfile:
    """Recorded offered QoS profiles (rosbags Qos) -> the player's publisher QoS."""
    names = [(q.reliability.name, q.durability.name, int(q.depth)) for q in profiles]
    reliable = not names or all(r == "RELIABLE" for r, _, _ in names)
    latched = bool(names) and all(d == "TRANSIENT_LOCAL" for _, d, _ in names)
    depth = max([MIN_DEPTH] + [d for _, _, d in names])
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=(ReliabilityPolicy.RELIABLE if reliable
                                   else ReliabilityPolicy.BEST_EFFORT),
                      durability=(DurabilityPolicy.TRANSIENT_LOCAL if latched
                                  else DurabilityPolicy.VOLATILE))


@dataclass
class PlayStats:
    messages: int = 0
    clocks: int = 0
    loops: int = 0
    bag_seconds: float = 0.0
    stopped: bool = False


class BagPlayer:
    """Plays one bag through publishers of ``node`` (the node need not be spun).

    ``topics``: recorded or remapped names to play (None: all). ``before_clock``: called
    with the clock value (ns) right before each /clock message, after every message up
    to that time was published (tests use it to wait for delivery).
    """

    def __init__(self, node, bag: str, rate: float = 1.0, clock_hz: Optional[float] = None,
                 loop: bool = False, topics: Optional[Iterable[str]] = None,
                 remap: Optional[Mapping[str, str]] = None, start_offset: float = 0.0,
                 before_clock: Optional[Callable[[int], None]] = None):
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        if clock_hz is not None and not clock_hz > 0:
            raise ValueError(f"clock rate must be > 0 Hz, got {clock_hz}")
        if start_offset < 0:
            raise ValueError(f"start offset must be >= 0, got {start_offset}")
        self.node = node
        self.rate = float(rate)
        self.loop = loop
        self.before_clock = before_clock
        self.clock_period_ns = None if clock_hz is None else max(1, int(round(1e9 / clock_hz)))
        self.reader: BagReader = open_bag(bag, remap=remap)
        try:
            available = self.reader.topics
            if topics is None:
                chosen = list(available)
            else:
                by_source = {i.source_topic: t for t, i in available.items()}
                chosen, missing = [], []
                for t in topics:
                    name = t if t in available else by_source.get(t)
                    (chosen if name else missing).append(name or t)
                if missing:
                    raise BagError(f"{bag}: no topic(s) {missing} in the bag "
                                   f"(has {sorted(available)})")
            self.topics = chosen
            self.publishers = {}
            for topic in chosen:
                info = available[topic]
                try:
                    msg_type = message_type(info.msgtype)
                except ValueError as err:
                    raise BagError(f"{bag}: topic {topic}: {err}") from None
                self.publishers[topic] = node.create_publisher(msg_type, topic,
                                                               qos_from_bag(info.qos))
            self.clock_pub = (node.create_publisher(Clock, "/clock", CLOCK_QOS)
                              if self.clock_period_ns else None)
            self.start_ns = self.reader.start_ns + int(round(start_offset * 1e9))
            if self.start_ns > self.reader.end_ns:
                raise BagError(f"{bag}: start offset {start_offset} s is past the bag's end "
                               f"({(self.reader.end_ns - self.reader.start_ns) * 1e-9:.3f} s)")
        except BaseException:
            self.reader.close()
            raise
        self.published: Counter[str] = Counter()
        self.stats = PlayStats()

    def close(self) -> None:
        self.reader.close()

    def wait_for_subscribers(self, timeout: float, stop: Optional[threading.Event] = None
                             ) -> bool:
        """Wait (steady clock) until every topic has a subscriber; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if all(p.get_subscription_count() > 0 for p in self.publishers.values()):
                return True
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return False
            time.sleep(0.02)

    # ------------------------------------------------------------------ playback

    def _publish_clock(self, t_ns: int) -> None:
        if self.before_clock is not None:
            self.before_clock(t_ns)
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(int(t_ns), 1_000_000_000)
        self.clock_pub.publish(msg)
        self.stats.clocks += 1

    def play(self, stop: Optional[threading.Event] = None) -> PlayStats:
        """Play (blocking) until the end, or forever with ``loop``, or until ``stop``."""
        stop = stop or threading.Event()
        while True:
            self._play_once(stop)
            if stop.is_set() or not self.loop:
                break
            self.stats.loops += 1
        self.stats.stopped = stop.is_set()
        return self.stats

    def _play_once(self, stop: threading.Event) -> None:
        start = self.start_ns
        period = self.clock_period_ns
        wall0 = time.monotonic()  # pacing only: the player is the clock source

        def wait_until(t_ns: int) -> bool:
            delay = wall0 + (t_ns - start) * 1e-9 / self.rate - time.monotonic()
            if delay > 0:
                return not stop.wait(delay)
            return not stop.is_set()

        next_clock = None if period is None else -(-start // period) * period
        last = start
        for msg in self.reader.messages(self.topics, start_ns=start):
            # clock ticks strictly before this message: everything up to them is out
            while next_clock is not None and next_clock < msg.stamp_ns:
                if not wait_until(next_clock):
                    return
                self._publish_clock(next_clock)
                next_clock += period
            if not wait_until(msg.stamp_ns):
                return
            self.publishers[msg.topic].publish(msg.raw)
            self.published[msg.topic] += 1
            self.stats.messages += 1
            last = msg.stamp_ns
        if next_clock is not None and next_clock <= last + period:
            # a last tick covering the final messages
            if wait_until(next_clock):
                self._publish_clock(next_clock)
        self.stats.bag_seconds += (last - start) * 1e-9


def main_cli(args) -> int:
    """``dp-ros play`` (argparse namespace from dp_ros.cli)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.node import Node

    try:
        remap = parse_remap(args.remap or [])
        open_bag(args.bag, remap=remap).close()  # a bad bag: one line, before any ROS
    except ValueError as err:
        print(f"dp-ros play: {err}", file=sys.stderr)
        return 2
    except BagError as err:
        print(f"dp-ros play: {err}", file=sys.stderr)
        return 1
    rclpy.init(args=[])  # our options are not ROS arguments (FROM:=TO would be one)
    node = None
    player = None
    stop = threading.Event()
    executor = None
    spinner = None
    try:
        node = Node(NODE_NAME)
        try:
            player = BagPlayer(node, args.bag, rate=args.rate, clock_hz=args.clock,
                               loop=args.loop, topics=args.topics, remap=remap,
                               start_offset=args.start_offset)
        except (BagError, ValueError) as err:
            print(f"dp-ros play: {err}", file=sys.stderr)
            return 1
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        if args.wait_for_subscribers > 0:
            if not player.wait_for_subscribers(args.wait_for_subscribers, stop):
                quiet = [t for t, p in player.publishers.items()
                         if p.get_subscription_count() == 0]
                print(f"dp-ros play: no subscriber yet on {quiet}; playing anyway",
                      file=sys.stderr)
        print(f"playing {args.bag}: {len(player.topics)} topic(s), rate {args.rate:g}"
              + (f", /clock at {args.clock:g} Hz" if args.clock else "")
              + (", looping" if args.loop else ""), file=sys.stderr)
        try:
            stats = player.play(stop)
        except BagError as err:
            print(f"dp-ros play: {err}", file=sys.stderr)
            return 1
        print(f"played {stats.messages} messages ({stats.bag_seconds:.1f} s of bag time"
              + (f", {stats.loops} loops" if stats.loops else "") + ")", file=sys.stderr)
        return 0
    except (KeyboardInterrupt, ExternalShutdownException):
        stop.set()
        return 130
    finally:
        if player is not None:
            player.close()
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


def main(args=None) -> int:
    """``python -m dp_ros.nodes.bag_player BAG [options]`` (same options as dp-ros play)."""
    from dp_ros.cli import build_parser
    argv = list(sys.argv[1:] if args is None else args)
    return main_cli(build_parser().parse_args(["play", *argv]))


if __name__ == "__main__":
    sys.exit(main())
