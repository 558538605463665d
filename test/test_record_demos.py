"""`dp-ros record-demos` and `dp-ros dataset BAG...` end to end.

record-demos runs sim_arm, the expert and the recorder over real rclpy topics on
lock-step sim time; the bag must hold what `ros2 bag info` expects, in both storage
formats, reproducibly from the seed. The dataset built from it must carry exactly the
recorded observations and actions on the tick grid, and bad input must give one clear
error line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy")

from dp_ros.cli import main as cli  # noqa: E402
from dp_ros.control.observation import preprocess_image  # noqa: E402
from dp_ros.data.bags import open_bag, stamp_ns  # noqa: E402
from dp_ros.data.from_bags import load_sources  # noqa: E402
from dp_ros.data.store import EpisodeStore  # noqa: E402
from dp_ros.paths import config_file  # noqa: E402

pytestmark = pytest.mark.ros
CONFIG = config_file("demo_robot.yaml")
TOPICS = {"/camera/image_raw": "sensor_msgs/msg/Image",
          "/joint_states": "sensor_msgs/msg/JointState",
          "/expert/action": "sensor_msgs/msg/JointState",
          "/episode": "std_msgs/msg/String"}
EPISODES = 2
SEED = 5


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """The same seed recorded in both storage formats through the CLI."""
    root = tmp_path_factory.mktemp("demos")
    out = {}
    for storage in ("mcap", "sqlite3"):
        path = root / storage
        assert cli(["record-demos", "--episodes", str(EPISODES), "--out", str(path),
                    "--storage", storage, "--seed", str(SEED), "--quiet"]) == 0
        out[storage] = path
    return out


def events(bag_path: Path) -> list[dict]:
    with open_bag(bag_path) as bag:
        return [json.loads(bag.deserialize(m).data) for m in bag.messages(["/episode"])]


def test_bag_is_a_standard_rosbag2(bags):
    for storage, path in bags.items():
        meta = yaml.safe_load((path / "metadata.yaml").read_text())
        info = meta["rosbag2_bagfile_information"]
        assert info["version"] == 9 and info["storage_identifier"] == storage
        assert info["custom_data"]["dp_ros.seed"] == str(SEED)
        listed = {t["topic_metadata"]["name"]: t["topic_metadata"]["type"]
                  for t in info["topics_with_message_count"]}
        assert listed == TOPICS
        qos = {t["topic_metadata"]["name"]: t["topic_metadata"]["offered_qos_profiles"]
               for t in info["topics_with_message_count"]}
        assert qos["/camera/image_raw"][0]["reliability"] == "best_effort"  # sensor data
        assert qos["/episode"][0]["durability"] == "transient_local"
        with open_bag(path) as bag:
            counts = {t: i.count for t, i in bag.topics.items()}
            assert counts["/episode"] == 2 * EPISODES
            seconds = (bag.end_ns - bag.start_ns) * 1e-9
            assert counts["/joint_states"] == pytest.approx(seconds * 100, rel=0.05)
            assert counts["/camera/image_raw"] == pytest.approx(seconds * 30, rel=0.05)
            # lock-step sim time: every message was received at the time it was stamped
            for m in bag.messages(["/camera/image_raw", "/joint_states", "/expert/action"]):
                assert stamp_ns(bag.deserialize(m).header.stamp) == m.stamp_ns


def test_episodes_and_actions(bags):
    evs = events(bags["mcap"])
    assert [e["event"] for e in evs] == ["start", "end"] * EPISODES
    assert [e["episode"] for e in evs] == [0, 0, 1, 1]
    for start, end in zip(evs[::2], evs[1::2]):
        assert start["label"] == end["label"] in ("left", "right")
        assert end["success"] is True and end["collision"] is False
        assert end["side"] == start["label"]  # the sim saw the side the expert chose
        assert (end["stamp_ns"] - start["stamp_ns"]) // 100_000_000 == start["steps"] - 1
    with open_bag(bags["mcap"]) as bag:
        actions = [(m.stamp_ns, bag.deserialize(m)) for m in bag.messages(["/expert/action"])]
    assert len(actions) == sum(e["steps"] for e in evs[::2])
    for t, a in actions:
        assert t % 100_000_000 == 0  # on the 10 Hz tick grid
        assert list(a.name) == ["joint_1", "joint_2"] and len(a.position) == 2


def test_recording_is_reproducible_in_both_formats(bags):
    assert [(e["event"], e["label"], e["seed"]) for e in events(bags["mcap"])] == \
        [(e["event"], e["label"], e["seed"]) for e in events(bags["sqlite3"])]
    values = {}
    for storage, path in bags.items():
        with open_bag(path) as bag:
            values[storage] = np.array([bag.deserialize(m).position
                                        for m in bag.messages(["/expert/action"])])
            assert bag.storage == storage
    np.testing.assert_array_equal(values["mcap"], values["sqlite3"])


def test_dataset_from_bags_holds_the_recorded_ticks(bags, tmp_path, capsys):
    store_path = tmp_path / "store"
    assert cli(["dataset", str(bags["mcap"]), str(bags["sqlite3"]), "--config", str(CONFIG),
                "--out", str(store_path), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"{2 * EPISODES} episodes" in printed

    obs_src, _ = load_sources(CONFIG)
    store = EpisodeStore.open(store_path)
    assert store.n_episodes == 2 * EPISODES
    assert store.camera_names == ["image"] and store.camera_shapes["image"] == (64, 64)
    assert store.state_names == store.action_names == ["joint_1", "joint_2"]
    assert store.dt == pytest.approx(0.1)
    evs = events(bags["mcap"])
    assert store.episode_labels == [e["label"] for e in evs[::2]] * 2

    # episode 0 against the raw messages
    with open_bag(bags["mcap"]) as bag:
        msgs = {t: [(stamp_ns(d.header.stamp), d) for d in
                    (bag.deserialize(m) for m in bag.messages([t]))]
                for t in ("/camera/image_raw", "/joint_states", "/expert/action")}
    ep = store.episode(0)
    start, end = evs[0]["stamp_ns"], evs[1]["stamp_ns"]
    ticks = np.arange(start, end + 1, 100_000_000)
    assert len(ep["timestamp"]) == len(ticks) == evs[0]["steps"]
    np.testing.assert_array_equal(ep["timestamp"], [t * 1e-9 for t in ticks.tolist()])

    def latest(topic, t):
        return [d for s, d in msgs[topic] if s <= t][-1]

    for i, t in enumerate(ticks.tolist()):
        np.testing.assert_array_equal(ep["action"][i], np.float32(
            latest("/expert/action", t).position))
        js = latest("/joint_states", t)
        np.testing.assert_array_equal(ep["state"][i], np.float32(js.position))
        img = latest("/camera/image_raw", t)
        pixels = np.asarray(img.data).reshape(img.height, img.width, 3)
        np.testing.assert_array_equal(ep["images"]["image"][i],
                                      preprocess_image(pixels, img.encoding, 64, 64))
    # the arm moves and the images change during an episode
    assert np.abs(ep["state"][-1] - ep["state"][0]).max() > 0.5
    assert not np.array_equal(ep["images"]["image"][0], ep["images"]["image"][-1])


def _write_config(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(CONFIG.read_text())
    data["obs_aggregator"]["ros__parameters"].update(changes)
    path = tmp_path / f"config_{'_'.join(changes)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_dataset_bad_input_is_one_clear_line(bags, tmp_path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bags["mcap"], corrupt)
    (mcap,) = corrupt.glob("*.mcap")
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 3])
    cases = [
        ("corrupt bag", [str(corrupt)], CONFIG, "corrupt"),
        ("missing topic", [str(bags["mcap"])],
         _write_config(tmp_path, camera_topics=["/camera/front"]),
         "no camera 'image' topic /camera/front"),
        ("joint names", [str(bags["sqlite3"])],
         _write_config(tmp_path, state_joint_names=["joint_1", "wrist"]),
         "joint names do not match on /joint_states"),
        ("compressed", [str(bags["mcap"])], _write_config(tmp_path, compressed=[True]),
         "has type sensor_msgs/msg/Image, expected sensor_msgs/msg/CompressedImage"),
        ("missing bag", [str(tmp_path / "nope")], CONFIG, "no such bag"),
    ]
    for name, bag_args, config, phrase in cases:
        out = tmp_path / f"store_{name.replace(' ', '_')}"
        code = cli(["dataset", *bag_args, "--config", str(config), "--out", str(out),
                    "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 1, (name, err)
        assert err.count("\n") == 0 and "Traceback" not in err, (name, err)
        assert phrase in err and bag_args[0] in err, (name, err)
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    # action joints that are not in the action messages
    code = cli(["dataset", str(bags["mcap"]), "--config", str(CONFIG), "--out",
                str(tmp_path / "s"), "--action-joints", "joint_1", "gripper", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "joint names do not match on action topic /expert/action" in err


def test_bag_without_episode_topic_is_one_episode(bags, tmp_path):
    from dp_ros.data.from_bags import build_dataset
    summary = build_dataset([bags["mcap"]], CONFIG, tmp_path / "store",
                            episode_topic="/no_such_topic")
    store = EpisodeStore.open(tmp_path / "store")
    # without boundaries the bag is one episode, split where no action was commanded
    # (while the expert resets the sim and waits for it to settle)
    assert store.n_episodes == EPISODES and store.episode_labels == [None] * EPISODES
    assert summary.episodes == EPISODES
    assert summary.skipped["episodes split at invalid ticks"] == 1
    evs = events(bags["mcap"])
    assert store.n_steps >= sum(e["steps"] for e in evs[::2])


def test_dataset_reads_exactly_the_aggregator_parameters():
    """The bag readers build the aggregator's own settings class; every parameter the node
    declares must be one that class knows (but the thread priority, which changes no
    observation), and the other way round."""
    from dp_ros.control.aggregator_config import DEFAULTS
    from dp_ros.nodes.obs_aggregator import PARAMETERS
    from dp_ros.nodes.realtime import REALTIME_PARAMETER
    assert set(DEFAULTS) == set(PARAMETERS) - set(REALTIME_PARAMETER)


def test_dataset_synthetic_still_works(tmp_path, capsys):
    assert cli(["dataset", "--synthetic", "2", "--out", str(tmp_path / "syn")]) == 0
    assert "2 episodes" in capsys.readouterr().out
    assert cli(["dataset", "--out", str(tmp_path / "x")]) == 2


def test_dataset_section_selects_action_joints_by_name(bags, tmp_path):
    from dp_ros.data.from_bags import build_dataset
    data = yaml.safe_load(CONFIG.read_text())
    data["dataset"] = {"ros__parameters": {"action_topic": "/expert/action",
                                           "action_joint_names": ["joint_2", "joint_1"],
                                           "episode_topic": "/episode"}}
    config = tmp_path / "with_dataset.yaml"
    config.write_text(yaml.safe_dump(data))
    build_dataset([bags["mcap"]], config, tmp_path / "swapped")
    build_dataset([bags["mcap"]], CONFIG, tmp_path / "plain")
    swapped, plain = EpisodeStore.open(tmp_path / "swapped"), EpisodeStore.open(tmp_path / "plain")
    assert swapped.action_names == ["joint_2", "joint_1"]
    np.testing.assert_array_equal(np.asarray(swapped.action[:]),
                                  np.asarray(plain.action[:])[:, ::-1])
    np.testing.assert_array_equal(np.asarray(swapped.state[:]), np.asarray(plain.state[:]))
