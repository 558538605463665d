"""Training loop: configuration, LR schedule, EMA, checkpoints, exact resume, torchrun/DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dp_ros.data import EpisodeStore, make_synthetic_store
from dp_ros.policy import ConfigError, load_policy
from dp_ros.policy.ema import EMA, EmaConfig
from dp_ros.policy.model import build_model
from dp_ros.policy.train import (StepInfo, TrainConfig, load_train_config, lr_factor, main,
                                 resolve_policy_config, train)

REPO = Path(__file__).resolve().parents[1]
TINY_POLICY = {"T_o": 2, "T_p": 8, "T_a": 4, "unet": {"down_dims": [16, 32], "step_embed_dim": 16}}



def tiny_train(**overrides) -> dict:
    cfg = {"batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "num_steps": 12, "checkpoint_every": 0,
           "log_every": 5, "device": "cpu", "seed": 7}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def lowdim_store(tmp_path_factory) -> Path:
    """3 episodes of a 2-D state/action random walk, no cameras."""
    path = tmp_path_factory.mktemp("lowdim") / "walk.zarr"
    rng = np.random.default_rng(0)
    store = EpisodeStore.create(path, {}, ["q0", "q1"], ["q0", "q1"], dt=0.1)
    for n in (9, 12, 10):
        state = np.cumsum(rng.normal(0, 0.1, (n, 2)), axis=0)
        store.add_episode({}, state, state + 0.05, np.arange(n) * 0.1)
    return path


# -- pieces ------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert np.allclose(np.diff(f[:10]), 0.1)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 1e-3
    assert lr_factor(200, 10, 110) == 0.0 and lr_factor(0, 0, 5) == 1.0


def test_ema_decay_formula_and_update():
    cfg = EmaConfig(power=0.75, max_decay=0.9999, min_decay=0.0, update_after_step=0, inv_gamma=1.0)
    assert cfg.decay(0) == 0.0 and cfg.decay(1) == 0.0
    assert cfg.decay(2) == pytest.approx(1 - 2 ** -0.75)
    assert cfg.decay(101) == pytest.approx(1 - 101 ** -0.75)
    assert cfg.decay(10 ** 9) == 0.9999
    assert EmaConfig(update_after_step=5).decay(6) == 0.0
    assert EmaConfig(update_after_step=5).decay(8) == pytest.approx(1 - 3 ** -0.75)
    assert EmaConfig(min_decay=0.5).decay(2) == 0.5

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, cfg)
    expected = model[0].weight.detach().clone()
    for k in range(5):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].weight.add_(1.0)
            model[1].running_mean.add_(1.0)
        d = cfg.decay(k)
        expected = d * expected + (1 - d) * model[0].weight.detach()
        ema.update(model)
        assert ema.last_decay == d
    assert torch.allclose(ema.averaged[0].weight, expected)
    # BatchNorm parameters and buffers are copied, not averaged
    assert torch.equal(ema.averaged[1].weight, model[1].weight)
    assert torch.equal(ema.averaged[1].running_mean, model[1].running_mean)
    assert not ema.averaged[0].weight.requires_grad


@pytest.mark.parametrize("train_cfg, message", [
    ({"lr": -1.0}, "train.lr"),
    ({"betas": [0.9]}, "train.betas"),
    ({"batch_size": 0}, "train.batch_size"),
    ({"batch_size": 2.5}, "train.batch_size must be an integer"),
    ({"ema_max": 1.5}, "ema_max"),
    ({"device": "tpu"}, "train.device"),
    ({"max_minutes": 0}, "max_minutes"),
    ({"learning_rate": 1e-4}, "unknown key.*learning_rate"),
    ({"use_ema": "yes"}, "use_ema must be true or false"),
])
def test_train_config_validation(train_cfg, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(train_cfg)


def test_yaml_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: {}\ntrian: {}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*trian"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_train_config(tmp_path / "missing.yaml")
    store = make_synthetic_store(tmp_path / "pm.zarr", episodes=2, seed=0)
    for name in ("train_small.yaml", "train_paper_cnn.yaml"):
        policy, tcfg = load_train_config(REPO / "config" / name)
        cfg = resolve_policy_config(policy, store)
        assert cfg.camera_names == ["image"] and cfg.state_names == ["x", "y"] and cfg.dt == 0.1
        assert (cfg.T_o, cfg.T_p, cfg.T_a) == (2, 16, 8)
    assert cfg.unet.down_dims == [256, 512, 1024] and cfg.encoder.crop_shape == [84, 84]
    assert cfg.schedule.num_inference_steps == 10 and tcfg.lr == 1e-4 and tcfg.batch_size == 64


def test_resolve_policy_config_against_store(lowdim_store):
    store = EpisodeStore.open(lowdim_store)
    cfg = resolve_policy_config(TINY_POLICY, store)
    assert cfg.cameras == [] and cfg.state_names == ["q0", "q1"] and cfg.dt == 0.1
    acts = np.asarray(store.action[:])
    assert np.allclose(cfg.normalizer["action"].min, acts.min(0))
    assert np.allclose(cfg.normalizer["action"].max, acts.max(0))
    assert resolve_policy_config({**TINY_POLICY, "normalizer": {"state": {"mode": "mean_std"}}},
                                 store).normalizer["state"].mode == "mean_std"
    with pytest.raises(ConfigError, match="camera 'image' is not in the store"):
        resolve_policy_config({**TINY_POLICY, "cameras": [{"name": "image"}]}, store)
    with pytest.raises(ConfigError, match="state_names"):
        resolve_policy_config({**TINY_POLICY, "state_names": ["a", "b"]}, store)
    with pytest.raises(ConfigError, match="dt 0.05"):
        resolve_policy_config({**TINY_POLICY, "dt": 0.05}, store)
    with pytest.raises(ConfigError, match="unknown key"):
        resolve_policy_config({**TINY_POLICY, "horizon": 3}, store)


# -- the loop ----------------------------------------------------------------------------
def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_train_writes_checkpoints_of_the_ema_weights(lowdim_store, tmp_path):
    last: dict = {}

    def keep_last(info: StepInfo) -> None:
        last.update(step=info.step, ema={k: v.clone() for k, v in info.ema_model.state_dict().items()})

    out = tmp_path / "run"
    final = train(lowdim_store, (TINY_POLICY, tiny_train(checkpoint_every=5)), out,
                  progress=False, callback=keep_last)
    assert final == out / "latest" and last["step"] == 12
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_10", "step_12", "step_5"]
    saved = _weights(final / "model.safetensors")
    assert saved.keys() == last["ema"].keys()
    assert all(torch.equal(saved[k], last["ema"][k]) for k in saved)
    raw = _weights(out / "train_state" / "model.safetensors")
    assert any(not torch.equal(raw[k], saved[k]) for k in saved)  # EMA != raw weights
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["step"] == 12 and state["ema_optimization_step"] == 12
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [5, 10, 12] and all(math.isfinite(e["loss"]) for e in log)
    policy = load_policy(final)  # the checkpoint is a deployable policy
    plan = policy.predict({"images": {}, "state": np.zeros((2, 2), np.float32)})
    assert plan.shape == (8, 2) and np.isfinite(plan).all()
    # running again resumes at the end: nothing to do, the checkpoint stays
    before = (final / "model.safetensors").stat().st_mtime_ns
    assert train(lowdim_store, (TINY_POLICY, tiny_train(checkpoint_every=5)), out, progress=False) == final
    assert (final / "model.safetensors").stat().st_mtime_ns == before
    # a longer run continues from step 12 and keeps only the newest checkpoints
    train(lowdim_store, (TINY_POLICY, tiny_train(checkpoint_every=5, num_steps=16, keep_checkpoints=2)),
          out, progress=False, callback=keep_last)
    assert last["step"] == 16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_15", "step_16"]


def test_resume_after_crash_matches_uninterrupted_run(lowdim_store, tmp_path):
    # 3 epochs of 4 batches; state saved every 5 steps, crash at step 7 -> resume from 5 (mid-epoch)
    cfg = tiny_train(num_steps=12, checkpoint_every=5, batch_size=5, grad_clip=0.5)
    straight = tmp_path / "straight"
    train(lowdim_store, (TINY_POLICY, cfg), straight, progress=False)

    def crash(info: StepInfo) -> None:
        if info.step == 7:
            raise RuntimeError("simulated crash")

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(lowdim_store, (TINY_POLICY, cfg), crashed, progress=False, callback=crash)
    assert json.loads((crashed / "train_state" / "state.json").read_text())["step"] == 5
    steps = []
    train(lowdim_store, (TINY_POLICY, cfg), crashed, progress=False, callback=lambda i: steps.append(i.step))
    assert steps == list(range(6, 13))
    for name in ("model", "ema", "optimizer"):
        a = _weights(straight / "train_state" / f"{name}.safetensors")
        b = _weights(crashed / "train_state" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (name, k)
    # a resume with another architecture is refused instead of silently mixing runs
    other = {**TINY_POLICY, "unet": {"down_dims": [8, 16], "step_embed_dim": 16}}
    with pytest.raises(RuntimeError, match="another policy config"):
        train(lowdim_store, (other, cfg), crashed, progress=False)
    train(lowdim_store, (other, tiny_train(num_steps=2)), crashed, resume=False, progress=False)


def test_time_budget_stops_early_with_a_checkpoint(lowdim_store, tmp_path):
    out = tmp_path / "budget"
    train(lowdim_store, (TINY_POLICY, tiny_train(num_steps=100_000, max_minutes=0.0005)), out,
          progress=False)
    step = json.loads((out / "train_state" / "state.json").read_text())["step"]
    assert 1 <= step < 100_000 and (out / "latest" / "model.safetensors").exists()


def test_cli_main(lowdim_store, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"policy": TINY_POLICY, "train": tiny_train(num_steps=3)}))
    assert main(["--data", str(lowdim_store), "--config", str(cfg), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "o" / "latest")
    assert main(["--data", str(tmp_path / "none.zarr"), "--config", str(cfg),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "none.zarr" in capsys.readouterr().err


def test_image_policy_trains(tmp_path):
    """A few steps of a (tiny-crop) image + state policy on the generated dataset."""
    store = make_synthetic_store(tmp_path / "pm.zarr", episodes=2, seed=1, image_size=32)
    policy = {**TINY_POLICY, "encoder": {"crop_shape": [28, 28], "num_keypoints": 8, "feature_dim": 16}}
    out = train(store.path, (policy, tiny_train(num_steps=3, batch_size=4)), tmp_path / "img", progress=False)
    p = load_policy(out)
    assert p.config.camera_names == ["image"]
    obs = {"images": {"image": np.asarray(store.images("image")[:2])}, "state": np.asarray(store.state[:2])}
    assert p.predict(obs).shape == (8, 2)


# -- torchrun / DistributedDataParallel --------------------------------------------------
_DDP_WORKER = """
import os, sys
import torch
from safetensors.torch import save_file
from dp_ros.policy.train import train

store, out, dump = sys.argv[1:4]
policy = {policy!r}
cfg = {cfg!r}

def dump_weights(info):
    if info.step == cfg["num_steps"]:
        state = {{"model." + k: v for k, v in info.model.state_dict().items()}}
        state.update({{"ema." + k: v for k, v in info.ema_model.state_dict().items()}})
        save_file({{k: v.detach().contiguous() for k, v in state.items()}},
                  os.path.join(dump, f"rank{{info.rank}}.safetensors"))

path = train(store, (policy, cfg), out, progress=False, callback=dump_weights)
assert torch.distributed.is_initialized() is False
print("rank", os.environ["RANK"], "done", path)
"""


def test_torchrun_two_cpu_processes_stay_in_sync(lowdim_store, tmp_path):
    cfg = tiny_train(num_steps=6, checkpoint_every=3, batch_size=4)
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(_DDP_WORKER.format(policy=TINY_POLICY, cfg=cfg)))
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(lowdim_store), str(out), str(dump)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = _weights(dump / "rank0.safetensors"), _weights(dump / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    # rank 0 wrote the checkpoint: the EMA weights both ranks hold
    ckpt = _weights(out / "latest" / "model.safetensors")
    assert all(torch.equal(ckpt[k], r0["ema." + k]) for k in ckpt)
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]
    # the weights moved (training happened) yet agree: gradients were averaged across ranks
    torch.manual_seed(cfg["seed"])  # the run's initial weights
    fresh = build_model(load_policy(out / "latest").config).state_dict()
    assert any(not torch.equal(fresh[k], r0["model." + k]) for k in fresh)
