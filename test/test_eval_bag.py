"""dp-ros eval-bag: offline evaluation of a policy on recorded bags (dp_ros.evaluate_bag).

One real demo bag (dp_ros.record_demos: sim arm + scripted expert, two episodes, one
left and one right) is recorded once per test session and cached under pytest's base
temp directory (test_offline_online.py reuses it); the sqlite3 copy is the same
messages rewritten byte for byte with BagWriter.

Good vs bad policy: the "good" policy is a tiny state-only diffusion policy trained
briefly (600 steps; at 300 its MAE was 0.31-0.41 in three runs and once, in CI, over
the test's 0.6 limit; at 600, 0.09-0.12) on the dataset built from that very bag
(dp_ros.data.from_bags + dp_ros.policy.train), so it fits the recorded actions; the "bad"
one has the same architecture and the same normaliser but untrained (random) weights. The
metric must rank them far apart.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dp_ros.data.bags import BagWriter, open_bag  # noqa: E402

EVAL_CONFIG = """\
obs_aggregator:
  ros__parameters:
    camera_names: [image]
    camera_topics: [/camera/image_raw]
    compressed: [false]
    camera_height: 32
    camera_width: 32
    joint_states_topic: /joint_states
    state_joint_names: [joint_1, joint_2]
    rate_hz: 10.0
    T_o: 2
    camera_staleness: 0.1
    state_staleness: 0.1
policy_node:
  ros__parameters:
    joint_names: [joint_1, joint_2]
"""
TINY_POLICY = {"T_o": 2, "T_p": 8, "T_a": 4, "cameras": [],
               "unet": {"down_dims": [32, 64], "step_embed_dim": 32},
               "schedule": {"sampler": "ddim", "num_inference_steps": 10}}


def _cached(base: Path, name: str, make):
    """Build once per session (shared by the test modules through the base temp dir)."""
    path = base / name
    if not (base / (name + ".done")).exists():
        make(path)
        (base / (name + ".done")).write_text("ok")
    return path


def copy_bag(src: Path, dst: Path, storage: str = "mcap", rename=None, drop=(),
             retype=None) -> Path:
    """Rewrite a bag's messages (raw bytes) into a new bag, renaming or dropping topics."""
    rename, retype = dict(rename or {}), dict(retype or {})
    with open_bag(src) as bag, BagWriter(dst, storage) as writer:
        infos = bag.topics
        for topic, info in infos.items():
            if topic in drop:
                continue
            if topic in retype:
                writer.add_topic(rename.get(topic, topic), retype[topic], msgdef="int32 x\n",
                                 type_hash="RIHS01_" + "cd" * 32)
            else:
                writer.add_topic(rename.get(topic, topic), info.msgtype, qos=info.qos)
        for msg in bag.messages([t for t in infos if t not in drop]):
            writer.write(rename.get(msg.topic, msg.topic), msg.stamp_ns, msg.raw)
    return dst


@pytest.fixture(scope="session")
def eval_assets(tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "eval_bag_assets"
    base.mkdir(exist_ok=True)
    config = base / "eval_config.yaml"
    config.write_text(EVAL_CONFIG)

    def record(path):
        from dp_ros.record_demos import record_demos
        summary = record_demos(path, episodes=2, seed=3, progress=False)
        assert summary.episodes == 2 and sorted(summary.labels) == ["left", "right"]

    mcap = _cached(base, "demo_mcap", record)
    sqlite = _cached(base, "demo_sqlite3", lambda p: copy_bag(mcap, p, "sqlite3"))

    def good(path):
        import torch

        from dp_ros.data.from_bags import build_dataset
        from dp_ros.policy.train import train
        build_dataset([mcap], config, base / "store", overwrite=True)
        torch.set_num_threads(1)  # session fixture: runs before the per-test thread fixture
        torch.manual_seed(0)
        tcfg = {"batch_size": 32, "lr": 2e-3, "warmup_steps": 20, "num_steps": 600,
                "ema_max": 0.99, "checkpoint_every": 0, "log_every": 1000,
                "device": "cpu", "seed": 0}
        ck = train(base / "store", {"policy": TINY_POLICY, "train": tcfg}, base / "train",
                   resume=False, progress=False)
        path.symlink_to(Path(ck).resolve())

    good_ck = _cached(base, "good", good)

    def bad(path):
        import torch

        from dp_ros.data.store import EpisodeStore
        from dp_ros.policy import save_checkpoint
        from dp_ros.policy.model import build_model
        from dp_ros.policy.train import resolve_policy_config
        cfg = resolve_policy_config(TINY_POLICY, EpisodeStore.open(base / "store"))
        torch.manual_seed(0)
        save_checkpoint(path, cfg, build_model(cfg))

    bad_ck = _cached(base, "untrained", bad)

    def image_policy(path):
        from helpers_policy import make_checkpoint, small_config
        make_checkpoint(path, small_config(state_names=["joint_1", "joint_2"],
                                           action_names=["joint_1", "joint_2"]))

    image_ck = _cached(base, "image_policy", image_policy)
    return {"mcap": mcap, "sqlite3": sqlite, "config": config, "good": good_ck,
            "bad": bad_ck, "image": image_ck, "base": base}


def run_eval(bags, policy, config, **kw):
    from dp_ros.evaluate_bag import run
    out, err = io.StringIO(), io.StringIO()
    kw.setdefault("progress", False)
    kw.setdefault("plots", False)
    code, report = run([str(b) for b in bags], str(policy), str(config), stdout=out,
                       stderr=err, **kw)
    return code, report, out.getvalue(), err.getvalue()


def test_good_policy_scores_well_untrained_badly_both_formats(eval_assets, tmp_path):
    a = eval_assets
    code, good, out, err = run_eval([a["mcap"], a["sqlite3"]], a["good"], a["config"],
                                    out=tmp_path / "good", plots=True)
    assert code == 0, err
    assert "demo_mcap" in out and "demo_sqlite3" in out and "overall" in out
    # both storage formats give the same plans
    m, s = good["bags"]
    assert m["storage"] == "mcap" and s["storage"] == "sqlite3"
    assert [p["predicted"] for p in m["plan_list"]] == [p["predicted"] for p in s["plan_list"]]
    assert m["episodes"] == 2 and m["plans"] >= 20
    # files: JSON (loadable, same numbers) and PNG plots per bag
    report = json.loads((tmp_path / "good" / "eval.json").read_text())
    assert report["overall"]["executed"]["mae_mean"] == pytest.approx(
        good["overall"]["executed"]["mae_mean"])
    for bag in ("demo_mcap", "demo_sqlite3"):
        for kind in ("joints", "errors"):
            png = tmp_path / "good" / f"{bag}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, bad, _, err = run_eval([a["mcap"]], a["bad"], a["config"])
    assert code == 0, err
    g, b = good["overall"], bad["overall"]
    for part in ("first", "executed", "horizon"):
        for joint in ("joint_1", "joint_2"):
            assert g[part]["mae"][joint] < 0.6, (part, joint, g[part])
            assert b[part]["mae"][joint] > 3 * g[part]["mae"][joint], (part, joint)
            assert g[part]["rmse"][joint] >= g[part]["mae"][joint]
    # the side (mode) of the good plans matches the demonstrations
    assert g["side"]["decided"] >= 10 and g["side"]["share"] >= 0.8
    assert g["latency_ms"]["max"] >= g["latency_ms"]["p50"] > 0


def test_side_rule_agrees_with_expert_labels(eval_assets):
    """The side definition read from the recorded expert actions gives the labels."""
    from dp_ros.data.from_bags import load_sources, read_actions, read_episodes
    from dp_ros.evaluate_bag import SideRule
    obs, act = load_sources(eval_assets["config"])
    rule = SideRule()
    j = list(act.joint_names).index(rule.joint)
    with open_bag(eval_assets["mcap"]) as bag:
        episodes, _ = read_episodes(bag, act.episode_topic)
        actions = read_actions(bag, act, obs.dt)
    for ep in episodes:
        inside = (actions.stamps_ns >= ep.start_ns) & (actions.stamps_ns <= ep.end_ns)
        v = actions.values[inside, j] - actions.values[inside][0, j]
        assert rule.side(float(v[np.argmax(np.abs(v))])) == ep.label


def test_deterministic_given_seed(eval_assets):
    a = eval_assets
    kw = dict(start=0.0, end=4.0)
    _, r1, _, _ = run_eval([a["mcap"]], a["image"], a["config"], seed=5, **kw)
    _, r2, _, _ = run_eval([a["mcap"]], a["image"], a["config"], seed=5, **kw)
    _, r3, _, _ = run_eval([a["mcap"]], a["image"], a["config"], seed=6, **kw)
    p1 = [p["predicted"] for p in r1["bags"][0]["plan_list"]]
    assert p1 and p1 == [p["predicted"] for p in r2["bags"][0]["plan_list"]]
    assert p1 != [p["predicted"] for p in r3["bags"][0]["plan_list"]]


def test_start_end_cut_and_topic_remapping(eval_assets, tmp_path):
    a = eval_assets
    _, full, _, _ = run_eval([a["mcap"]], a["image"], a["config"])
    with open_bag(a["mcap"]) as bag:
        t0 = bag.start_ns
    stamps = [p["stamp_ns"] for p in full["bags"][0]["plan_list"]]
    # --start/--end: only plans inside the cut, and fewer of them
    _, cut, _, _ = run_eval([a["mcap"]], a["image"], a["config"], start=1.0, end=4.0)
    cut_stamps = [p["stamp_ns"] for p in cut["bags"][0]["plan_list"]]
    assert cut_stamps and len(cut_stamps) < len(stamps)
    assert all(t0 + 1e9 <= s < t0 + 4e9 for s in cut_stamps)
    assert cut["start"] == 1.0 and cut["end"] == 4.0

    # a bag recorded with other topic names evaluates the same after --topics remapping
    renamed = copy_bag(a["mcap"], tmp_path / "renamed",
                       rename={"/joint_states": "/robot/joint_states",
                               "/camera/image_raw": "/front/image"})
    code, _, _, err = run_eval([renamed], a["image"], a["config"])
    assert code == 1 and "/joint_states" in err
    code, remapped, _, err = run_eval(
        [renamed], a["image"], a["config"],
        remap={"/robot/joint_states": "/joint_states", "/front/image": "/camera/image_raw"})
    assert code == 0, err
    assert [p["predicted"] for p in remapped["bags"][0]["plan_list"]] == \
        [p["predicted"] for p in full["bags"][0]["plan_list"]]


def test_bad_bags_one_line_each_others_still_evaluated(eval_assets, tmp_path):
    a = eval_assets
    cases = {}
    cases["missing topic"] = (copy_bag(a["mcap"], tmp_path / "no_joints",
                                       drop={"/joint_states"}), "/joint_states")
    cases["unknown type"] = (copy_bag(a["mcap"], tmp_path / "odd_type",
                                      retype={"/expert/action": "my_pkg/msg/Thing"}),
                             "my_pkg/msg/Thing")
    truncated = copy_bag(a["mcap"], tmp_path / "truncated")
    (f,) = truncated.glob("*.mcap")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cases["truncated"] = (truncated, "corrupt")
    garbage = copy_bag(a["mcap"], tmp_path / "garbage", "sqlite3")
    (f,) = garbage.glob("*.db3")
    f.write_bytes(b"this is not a database" * 100)
    cases["corrupt sqlite3"] = (garbage, "corrupt")
    future = copy_bag(a["mcap"], tmp_path / "future")
    meta = future / "metadata.yaml"
    meta.write_text(meta.read_text().replace("version: 9", "version: 10"))
    cases["metadata version"] = (future, "unsupported rosbag2 metadata version")
    empty = tmp_path / "empty"
    with BagWriter(empty) as writer:
        writer.add_topic("/joint_states", "sensor_msgs/msg/JointState")
    cases["empty"] = (empty, "empty bag")

    bags = [p for p, _ in cases.values()]
    bags.insert(3, a["mcap"])  # a good bag in the middle of the bad ones
    code, report, out, err = run_eval(bags, a["image"], a["config"], start=0.0, end=3.0)
    assert code == 1
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == len(cases) + 1, err  # one per bad bag + the summary line
    for name, (path, phrase) in cases.items():
        (line,) = [ln for ln in lines if ln.startswith(f"dp-ros eval-bag: {path}:")]
        assert phrase in line, (name, line)
    assert [b["bag"] for b in report["bags"]] == [str(a["mcap"])]
    assert report["bags"][0]["plans"] > 0
    assert {f["bag"] for f in report["failed"]} == {str(p) for p, _ in cases.values()}


def test_cli_usage_errors_and_entry(eval_assets, tmp_path, capsys):
    from dp_ros.cli import main
    a = eval_assets
    assert main(["eval-bag", str(a["mcap"]), "--policy", str(tmp_path / "nope"),
                 "--config", str(a["config"]), "--quiet", "--no-output"]) == 2
    assert "cannot load policy" in capsys.readouterr().err
    # a 32x32 policy against the 96x96 demo config: named mismatch, no traceback
    assert main(["eval-bag", str(a["mcap"]), "--policy", str(a["image"]),
                 "--quiet", "--no-output"]) == 2
    assert "32x32" in capsys.readouterr().err
    rc = main(["eval-bag", str(a["mcap"]), "--policy", str(a["image"]), "--config",
               str(a["config"]), "--end", "2.5", "--quiet", "--no-plots",
               "--out", str(tmp_path / "cli"), "--topics", "/x:=/y"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "first MAE" in out and (tmp_path / "cli" / "eval.json").exists()
