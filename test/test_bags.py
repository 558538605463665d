"""rosbag2 reading / writing (dp_ros.data.bags), the recorder and the player nodes.

Without DDS: round trips in both storage formats with CDR produced by rclpy itself, the
metadata ``ros2 bag info`` reads, and every kind of bad bag giving one clear BagError.
Over DDS (real rclpy): the recorder stores the bytes a publisher sent; the player
publishes them unchanged, paces them, publishes /clock after the messages it covers,
remaps, selects and loops (time jumps back).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dp_ros.data.bags import (DEFAULT_QOS, LATCHED_QOS, SENSOR_DATA_QOS, STORAGES, BagError,
                              BagWriter, default_typestore, message_class, open_bag,
                              parse_remap, time_msg)

TIMEOUT = 20.0
T0 = 1_000_000_000_000  # bag time of the first message: 1000 s


def wait_for(condition, timeout=TIMEOUT, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or condition}")


def rclpy_messages():
    """(topic, msgtype, stamp_ns, CDR bytes serialized by rclpy, message) samples."""
    rclpy_serialization = pytest.importorskip("rclpy.serialization")
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CompressedImage, Image, JointState
    from std_msgs.msg import Float64MultiArray, String
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        t = T0 + i * 10_000_000
        stamp = Time(sec=t // 10**9, nanosec=t % 10**9)
        img = Image(height=4, width=5, encoding="rgb8", step=15,
                    data=rng.integers(0, 256, 60, dtype=np.uint8).tobytes())
        img.header.stamp, img.header.frame_id = stamp, "camera"
        js = JointState(name=["joint_1", "joint_2"], position=[0.1 * i, -0.2 * i],
                        velocity=[1.0, 2.0])
        js.header.stamp = stamp
        items = [("/camera/image_raw", "sensor_msgs/msg/Image", t, img),
                 ("/joint_states", "sensor_msgs/msg/JointState", t, js),
                 ("/chatter", "std_msgs/msg/String", t + 1, String(data=f"hello {i} ü")),
                 ("/clock", "rosgraph_msgs/msg/Clock", t, Clock(clock=stamp))]
        if i % 2 == 0:
            items += [("/commands", "std_msgs/msg/Float64MultiArray", t,
                       Float64MultiArray(data=[1.5, -2.5])),
                      ("/camera/compressed", "sensor_msgs/msg/CompressedImage", t,
                       CompressedImage(format="jpeg", data=b"\xff\xd8abc\xff\xd9")),
                      ("/traj", "trajectory_msgs/msg/JointTrajectory", t,
                       JointTrajectory(joint_names=["a"], points=[JointTrajectoryPoint(
                           positions=[float(i)])]))]
        out += [(topic, ty, st, rclpy_serialization.serialize_message(m), m)
                for topic, ty, st, m in items]
    return out


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("storage", STORAGES)
def test_round_trip_keeps_bytes_types_and_order(tmp_path, storage):
    samples = rclpy_messages()
    path = tmp_path / "bag"
    qos = {"/camera/image_raw": [SENSOR_DATA_QOS], "/chatter": [LATCHED_QOS]}
    with BagWriter(path, storage) as writer:
        for topic, ty, _, _, _ in samples:
            if not writer.has_topic(topic):
                writer.add_topic(topic, ty, qos.get(topic, [DEFAULT_QOS]))
        # written out of order: the reader returns bag-time order
        for topic, _, stamp, raw, _ in reversed(samples):
            writer.write(topic, stamp, raw)

    with open_bag(path) as bag:
        assert bag.storage == storage
        assert bag.message_count == len(samples)
        assert bag.start_ns == T0 and bag.end_ns == max(s[2] for s in samples)
        types = {t: i.msgtype for t, i in bag.topics.items()}
        assert types == {s[0]: s[1] for s in samples}
        assert bag.topics["/camera/image_raw"].qos[0].reliability.name == "BEST_EFFORT"
        assert bag.topics["/chatter"].qos[0].durability.name == "TRANSIENT_LOCAL"
        got = list(bag.messages())
        assert [m.stamp_ns for m in got] == sorted(m.stamp_ns for m in got)
        expected = sorted(((s[2], s[0], s[3]) for s in samples), key=lambda x: x[0])
        assert sorted((m.stamp_ns, m.topic, m.raw) for m in got) == sorted(expected)
        # rclpy's CDR decodes with rosbags to the same values: encoded again by rosbags
        # it decodes with rclpy to the original message (padding bytes may differ, and
        # serialize_message may leave bytes after the message: they are ignored)
        from rclpy.serialization import deserialize_message
        store = default_typestore()
        originals = {(s[0], s[2]): s[4] for s in samples}
        for m in got:
            assert isinstance(m.raw, bytes)
            again = bytes(store.serialize_cdr(bag.deserialize(m), m.msgtype))
            original = originals[(m.topic, m.stamp_ns)]
            assert deserialize_message(again, type(original)) == original, m.topic
        js = [bag.deserialize(m) for m in bag.messages(["/joint_states"])]
        assert [list(j.name) for j in js] == [["joint_1", "joint_2"]] * 6
        np.testing.assert_array_equal(js[3].position, [0.1 * 3, -0.2 * 3])
        strings = [bag.deserialize(m).data for m in bag.messages(["/chatter"])]
        assert strings == [f"hello {i} ü" for i in range(6)]
        # time window
        window = list(bag.messages(["/joint_states"], start_ns=T0 + 10_000_000,
                                   stop_ns=T0 + 30_000_000))
        assert [m.stamp_ns for m in window] == [T0 + 10_000_000, T0 + 20_000_000]

    # what `ros2 bag info` reads
    meta = yaml.safe_load((path / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert meta["version"] == 9
    assert meta["storage_identifier"] == storage
    assert meta["message_count"] == len(samples)
    assert all((path / f).exists() for f in meta["relative_file_paths"])
    listed = {t["topic_metadata"]["name"]: t for t in meta["topics_with_message_count"]}
    for topic, ty in types.items():
        tm = listed[topic]["topic_metadata"]
        assert tm["type"] == ty and tm["serialization_format"] == "cdr"
        assert tm["type_description_hash"] == default_typestore().hash_rihs01(ty)
        assert isinstance(tm["offered_qos_profiles"], list)


def test_rosbags_bytes_decode_with_rclpy(tmp_path):
    serialization = pytest.importorskip("rclpy.serialization")
    from sensor_msgs.msg import JointState
    JS = message_class("sensor_msgs/msg/JointState")
    Header = message_class("std_msgs/msg/Header")
    msg = JS(header=Header(stamp=time_msg(T0 + 5), frame_id="base"), name=["a", "b"],
             position=np.array([1.0, 2.0]), velocity=np.array([], dtype=np.float64),
             effort=np.array([], dtype=np.float64))
    with BagWriter(tmp_path / "bag") as writer:
        writer.add_topic("/js", "sensor_msgs/msg/JointState")
        writer.write_message("/js", T0, msg)
    with open_bag(tmp_path / "bag") as bag:
        (m,) = bag.messages()
    back = serialization.deserialize_message(m.raw, JointState)
    assert list(back.name) == ["a", "b"] and list(back.position) == [1.0, 2.0]
    assert back.header.stamp.nanosec == 5 and back.header.frame_id == "base"


def test_remap_and_parse_remap(tmp_path):
    with BagWriter(tmp_path / "bag", "sqlite3") as writer:
        writer.add_topic("/old", "std_msgs/msg/String")
        writer.write_message("/old", T0, message_class("std_msgs/msg/String")(data="x"))
    remap = parse_remap(["/old:=/new"])
    with open_bag(tmp_path / "bag", remap=remap) as bag:
        assert list(bag.topics) == ["/new"] and bag.topics["/new"].source_topic == "/old"
        assert [m.topic for m in bag.messages(["/new"])] == ["/new"]
    with pytest.raises(ValueError, match="FROM:=TO"):
        parse_remap(["/a=/b"])


def test_custom_type_from_the_bag_definition(tmp_path):
    with BagWriter(tmp_path / "bag") as writer:
        writer.add_topic("/custom", "my_pkg/msg/Reading", msgdef="int32 x\nstring label\n",
                         type_hash="RIHS01_" + "ab" * 32)
        writer.write("/custom", T0, bytes([0, 1, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 104, 105, 0]))
    with open_bag(tmp_path / "bag") as bag:
        (m,) = bag.messages()
        value = bag.deserialize(m)
    assert value.x == 7 and value.label == "hi"
    assert "my_pkg/msg/Reading" not in default_typestore().fielddefs  # shared store untouched


# ----------------------------------------------------------------------------- bad bags

def _good_bag(path: Path, storage: str = "mcap") -> Path:
    String = message_class("std_msgs/msg/String")
    with BagWriter(path, storage) as writer:
        writer.add_topic("/chatter", "std_msgs/msg/String")
        for i in range(200):
            writer.write_message("/chatter", T0 + i, String(data="x" * 100 + str(i)))
    return path


def _read_all(path: Path) -> None:
    with open_bag(path) as bag:
        for m in bag.messages():
            bag.deserialize(m)


def _storage_file(path: Path) -> Path:
    (f,) = [p for p in path.iterdir() if p.suffix in (".mcap", ".db3")]
    return f


def test_bad_bags_give_one_clear_error(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope", "no such bag")
    empty_dir = tmp_path / "not_a_bag"
    empty_dir.mkdir()
    cases["no metadata"] = (empty_dir, "not a rosbag2 bag")

    truncated = _good_bag(tmp_path / "truncated")
    f = _storage_file(truncated)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cases["truncated mcap"] = (truncated, "corrupt")

    garbage = _good_bag(tmp_path / "garbage", "sqlite3")
    _storage_file(garbage).write_bytes(b"this is not a database" * 100)
    cases["garbage sqlite3"] = (garbage, "corrupt")

    scribbled = _good_bag(tmp_path / "scribbled")
    f = _storage_file(scribbled)
    data = bytearray(f.read_bytes())
    data[:64] = b"\x07" * 64  # the magic and header record
    f.write_bytes(bytes(data))
    cases["scribbled mcap"] = (scribbled, "corrupt")

    future = _good_bag(tmp_path / "future")
    meta = (future / "metadata.yaml").read_text().replace("version: 9", "version: 10")
    (future / "metadata.yaml").write_text(meta)
    cases["metadata version"] = (future, "unsupported rosbag2 metadata version")

    bad_yaml = _good_bag(tmp_path / "bad_yaml")
    (bad_yaml / "metadata.yaml").write_text("rosbag2_bagfile_information: [unclosed")
    cases["broken metadata"] = (bad_yaml, "corrupt or unreadable")

    empty = tmp_path / "empty"
    with BagWriter(empty) as writer:
        writer.add_topic("/chatter", "std_msgs/msg/String")
    cases["empty"] = (empty, "empty bag")

    for name, (path, phrase) in cases.items():
        with pytest.raises(BagError) as err:
            _read_all(path)
        text = str(err.value)
        assert text.startswith(str(path)), (name, text)
        assert phrase in text, (name, text)
        assert "\n" not in text, (name, text)


def test_missing_topics_and_types_are_named(tmp_path):
    with open_bag(_good_bag(tmp_path / "bag")) as bag:
        with pytest.raises(BagError, match=r"no camera topic /camera/image_raw.*the bag has: "
                                           r"/chatter \(std_msgs/msg/String\)"):
            bag.require({"/camera/image_raw": "sensor_msgs/msg/Image"},
                        {"/camera/image_raw": "camera"})
        with pytest.raises(BagError, match="has type std_msgs/msg/String, expected "
                                           "sensor_msgs/msg/JointState"):
            bag.require({"/chatter": "sensor_msgs/msg/JointState"})
        with pytest.raises(BagError, match=r"no topic\(s\) \['/x'\]"):
            list(bag.messages(["/x"]))


def test_unknown_type_without_definition(tmp_path, monkeypatch):
    path = tmp_path / "bag"
    with BagWriter(path) as writer:
        writer.add_topic("/custom", "my_pkg/msg/Thing", msgdef="int32 x\n",
                         type_hash="RIHS01_" + "cd" * 32)
        writer.write("/custom", T0, bytes([0, 1, 0, 0, 1, 0, 0, 0]))
    with open_bag(path) as bag:
        (m,) = bag.messages()
        for conns in bag._connections.values():  # as if the bag carried no definitions
            conns[:] = [c._replace(msgdef=c.msgdef._replace(data="")) for c in conns]
        with pytest.raises(BagError, match="unknown message type my_pkg/msg/Thing on topic "
                                           "/custom"):
            bag.deserialize(m)


def test_writer_refuses_to_overwrite(tmp_path):
    path = _good_bag(tmp_path / "bag")
    with pytest.raises(BagError, match="already exists"):
        BagWriter(path)
    BagWriter(path, overwrite=True).open().close()
    with pytest.raises(ValueError, match="storage"):
        BagWriter(tmp_path / "other", storage="rosbag1")


def test_failed_write_leaves_no_bag(tmp_path):
    path = tmp_path / "bag"
    with pytest.raises(RuntimeError, match="boom"):
        with BagWriter(path) as writer:
            writer.add_topic("/chatter", "std_msgs/msg/String")
            raise RuntimeError("boom")
    assert not path.exists()


# ----------------------------------------------------------------------------- nodes over DDS

def _spin(ctx, *nodes):
    from rclpy.executors import SingleThreadedExecutor
    executor = SingleThreadedExecutor(context=ctx)
    for node in nodes:
        executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    return executor, thread


@pytest.mark.ros
def test_recorder_writes_the_received_bytes(ros_context, tmp_path):
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from dp_ros.nodes.bag_recorder import BagRecorder

    probe = Node("probe", context=ros_context)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    js_pub = probe.create_publisher(JointState, "/joint_states", 10)
    str_pub = probe.create_publisher(String, "/status", latched)
    str_pub.publish(String(data="latched before the recorder started"))
    out = tmp_path / "recorded"
    recorder = BagRecorder(context=ros_context, parameter_overrides=[
        Parameter("output", value=str(out)), Parameter("storage", value="sqlite3"),
        Parameter("topics", value=["/joint_states", "/status"]),
        Parameter("discovery_period", value=0.05)])  # types from the graph
    executor, thread = _spin(ros_context, recorder, probe)
    sent = []
    try:
        wait_for(lambda: len(recorder.subscribed) == 2, what="recorder subscriptions")
        wait_for(lambda: js_pub.get_subscription_count() > 0, what="matching")
        wait_for(lambda: recorder.counts["/status"] == 1, what="the latched message")
        for i in range(20):
            msg = JointState(name=["j1"], position=[float(i)])
            msg.header.stamp.sec = i
            sent.append(msg)
            js_pub.publish(msg)
            time.sleep(0.005)
        wait_for(lambda: recorder.counts["/joint_states"] == 20, what="20 joint states")
    finally:
        executor.shutdown()
        thread.join(timeout=5)
        recorder.destroy_node()
        probe.destroy_node()
    with open_bag(out) as bag:
        assert bag.storage == "sqlite3"
        assert {t: i.msgtype for t, i in bag.topics.items()} == {
            "/joint_states": "sensor_msgs/msg/JointState", "/status": "std_msgs/msg/String"}
        # the bytes as received decode to what was sent (rclpy's own decoder)
        recorded = [deserialize_message(m.raw, JointState)
                    for m in bag.messages(["/joint_states"])]
        assert recorded == sent
        (status,) = bag.messages(["/status"])
        assert bag.deserialize(status).data == "latched before the recorder started"
        assert bag.topics["/status"].qos[0].durability.name == "TRANSIENT_LOCAL"
        stamps = [m.stamp_ns for m in bag.messages()]
        assert stamps == sorted(stamps) and stamps[0] > 0  # receive times, node clock


def _player_bag(path: Path) -> list:
    """A bag with joint states every 10 ms and a string every 50 ms from T0."""
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String
    written = []
    with BagWriter(path) as writer:
        writer.add_topic("/joint_states", "sensor_msgs/msg/JointState")
        writer.add_topic("/chatter", "std_msgs/msg/String")
        for i in range(30):
            t = T0 + i * 10_000_000
            msg = JointState(name=["j"], position=[float(i)])
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(t, 10**9)
            written.append(("/joint_states", t, serialize_message(msg)))
            if i % 5 == 2:
                written.append(("/chatter", t + 3_000_000,
                                serialize_message(String(data=f"s{i}"))))
        for topic, t, raw in written:
            writer.write(topic, t, raw)
    return written


@pytest.mark.ros
def test_player_publishes_recorded_bytes_with_clock(ros_context, tmp_path):
    from rclpy.node import Node
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import JointState
    from std_msgs.msg import String

    from dp_ros.nodes.bag_player import BagPlayer

    written = _player_bag(tmp_path / "bag")
    probe = Node("probe", context=ros_context)
    received = {"/joint_states": [], "/talk": []}
    clocks = []
    lock = threading.Lock()

    def keep(topic, raw):
        with lock:
            received[topic].append(raw)

    probe.create_subscription(JointState, "/joint_states",
                              lambda raw: keep("/joint_states", raw), 100, raw=True)
    probe.create_subscription(String, "/talk", lambda raw: keep("/talk", raw), 100, raw=True)
    probe.create_subscription(Clock, "/clock", lambda m: clocks.append(
        m.clock.sec * 10**9 + m.clock.nanosec), 100)
    player_node = Node("bag_player", context=ros_context)
    published_at_clock = []
    player = BagPlayer(player_node, str(tmp_path / "bag"), rate=2.0, clock_hz=100.0,
                       remap={"/chatter": "/talk"},
                       before_clock=lambda t: published_at_clock.append(
                           (t, sum(player.published.values()))))
    executor, thread = _spin(ros_context, probe)
    try:
        assert player.wait_for_subscribers(TIMEOUT)
        wait_for(lambda: player.clock_pub.get_subscription_count() > 0, what="clock match")
        wall = time.monotonic()
        stats = player.play()
        elapsed = time.monotonic() - wall
        wait_for(lambda: len(received["/joint_states"]) == 30 and len(received["/talk"]) == 6,
                 what="all played messages")
        wait_for(lambda: len(clocks) == stats.clocks, what="all clock messages")
    finally:
        executor.shutdown()
        thread.join(timeout=5)
        player.close()
        probe.destroy_node()
        player_node.destroy_node()
    # bytes exactly as recorded, per topic in order; remapped topic
    assert received["/joint_states"] == [r for t, _, r in written if t == "/joint_states"]
    assert received["/talk"] == [r for t, _, r in written if t == "/chatter"]
    # recorded pace at rate 2: 0.29 s of bag time take >= 0.145 s
    assert elapsed >= 0.29 / 2 * 0.95
    # /clock: bag time on the 10 ms grid, and each tick after every message up to it
    assert clocks == sorted(clocks) and clocks[0] == T0 and clocks[-1] >= T0 + 290_000_000
    assert all(c % 10_000_000 == 0 for c in clocks)
    times = sorted(t for _, t, _ in written)
    for t, n_published in published_at_clock:
        assert n_published == sum(1 for s in times if s <= t), t


@pytest.mark.ros
def test_player_selects_offsets_and_loops(ros_context, tmp_path):
    from rclpy.node import Node

    from dp_ros.nodes.bag_player import BagPlayer

    _player_bag(tmp_path / "bag")
    node = Node("bag_player", context=ros_context)
    stop = threading.Event()
    ticks = []

    def on_clock(t):
        ticks.append(t)
        if len(ticks) > 1 and t < ticks[-2]:  # the loop jumped back: one is enough
            stop.set()

    player = BagPlayer(node, str(tmp_path / "bag"), rate=10.0, clock_hz=100.0, loop=True,
                       topics=["/chatter"], start_offset=0.1, before_clock=on_clock)
    try:
        assert player.topics == ["/chatter"]
        stats = player.play(stop)
    finally:
        player.close()
        node.destroy_node()
    assert stats.stopped and stats.loops >= 1
    assert ticks[0] == T0 + 100_000_000  # start offset 0.1 s
    jump = next(i for i in range(1, len(ticks)) if ticks[i] < ticks[i - 1])
    assert ticks[jump] == T0 + 100_000_000
    assert set(player.published) == {"/chatter"}
    assert player.published["/chatter"] >= 4  # s12, s17, s22, s27 at least once


def test_play_cli_bad_bag_is_one_line(tmp_path, capsys):
    from dp_ros.cli import main
    bad = _good_bag(tmp_path / "bag")
    f = _storage_file(bad)
    f.write_bytes(f.read_bytes()[:100])
    for path in (tmp_path / "missing", bad):
        assert main(["play", str(path)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(path) in err and "Traceback" not in err, err
