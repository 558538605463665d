"""The policy core: layering, networks, checkpoints (incl. hostile ones), inference API."""

from __future__ import annotations

import ast
import json
import pathlib

import numpy as np
import pytest
import torch

from dp_ros.policy import CheckpointError, PolicyConfig, load_policy
from dp_ros.policy.config import ConfigError, UnetConfig
from dp_ros.policy.model import build_model
from dp_ros.policy.resnet import ResNet18Trunk

from helpers_policy import make_checkpoint, random_obs, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoint(tmp_path):
    return make_checkpoint(tmp_path / "ckpt")


def test_policy_and_control_never_import_rclpy():
    offenders = []
    for layer in ("policy", "control"):
        for path in (ROOT / "dp_ros" / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)} imports {n}" for n in names
                              if n.split(".")[0] == "rclpy"]
    assert offenders == []


def test_resnet_parameter_names_mirror_torchvision():
    keys = set(ResNet18Trunk(norm="batch").state_dict())
    # torchvision's resnet18 has 122 entries; without the classifier (fc.weight, fc.bias) 120
    assert len(keys) == 120
    for name in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
                 "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer4.1.conv2.weight"):
        assert name in keys
    gn = ResNet18Trunk(norm="group")
    assert gn.bn1.num_groups == 64 // 16 and gn.layer4[0].bn1.num_groups == 512 // 16


def test_trunk_output_size_matches_forward():
    trunk = ResNet18Trunk()
    for h, w in ((84, 84), (96, 128), (240, 320)):
        out = trunk(torch.zeros(1, 3, h, w))
        assert tuple(out.shape[-2:]) == ResNet18Trunk.output_size(h, w)


def test_paper_cnn_configuration_size():
    model = build_model(PolicyConfig())
    total = sum(p.numel() for p in model.parameters())
    unet = sum(p.numel() for p in model.denoiser.parameters())
    assert 74e6 < total < 78e6 and 63e6 < unet < 67e6  # ARCHITECTURE.md: ~76 M, 65 M in the U-Net


@pytest.mark.parametrize("denoiser", ["unet", "transformer"])
def test_training_loss_decreases_and_shapes(denoiser):
    from dp_ros.policy.config import TransformerConfig
    cfg = small_config(denoiser=denoiser,
                       transformer=TransformerConfig(n_layer=2, n_head=2, n_emb=32, p_drop_attn=0.0))
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = {"images": {"image": torch.randint(0, 256, (8, 2, 32, 32, 3), dtype=torch.uint8)},
             "state": torch.rand(8, 2, 2), "action": torch.rand(8, 8, 2) * 4 - 3}
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(30):
        loss = model.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.parametrize("cond_predict_scale", [True, False])
def test_unet_film_precomputed_for_a_plan_equals_the_per_step_forward(cond_predict_scale):
    from dp_ros.policy.unet import ConditionalUnet1D
    torch.manual_seed(0)
    net = ConditionalUnet1D(2, 20, UnetConfig(down_dims=[16, 32, 64], step_embed_dim=16,
                                              cond_predict_scale=cond_predict_scale)).eval()
    g, x = torch.randn(3, 20), torch.randn(3, 8, 2)
    steps = torch.tensor([99, 66, 33, 0])
    with torch.no_grad():
        film = net.film(g, steps)
        assert film.shape == (4, 3, sum(net.film_sizes))
        for t, row in zip(steps, film):
            assert (net.forward_film(x, row) - net(x, t, g)).abs().max() <= 1e-5


@pytest.mark.parametrize("cond_predict_scale", [True, False])
def test_plan_with_precomputed_film_equals_the_per_step_path(cond_predict_scale):
    """Policy.predict (FiLM for the plan up front) against model.sample (the network's plain
    forward at each step), cold and from a later start index (warm start)."""
    from dp_ros.policy.inference import Policy
    cfg = small_config()
    cfg.unet.cond_predict_scale = cond_predict_scale
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    policy = Policy(cfg, model, torch.device("cpu"), seed=0)
    obs = random_obs(cfg, 3)
    noise = np.random.default_rng(3).standard_normal((cfg.T_p, cfg.action_dim)).astype(np.float32)
    with torch.no_grad():
        images = {"image": torch.from_numpy(obs["images"]["image"])[None]}
        cond = model.observation_condition(images, torch.from_numpy(obs["state"])[None])
        x = torch.from_numpy(noise)[None]
        ref = model.sample(cond, x)[0].numpy()
        assert np.abs(policy.predict(obs, noise=noise) - ref).max() <= 1e-5
        feats = policy._frame_features(obs)[None]
        state = torch.from_numpy(obs["state"])[None]
        late = policy.engine.sample(feats, state, x, 2, None)
        ref_late = model.normalizer.unnormalize(
            "action", policy.sampler.run(model.model_fn(cond), x, start_index=2))
        assert (late - ref_late).abs().max() <= 1e-5


def test_unet_rejects_horizon_not_divisible():
    with pytest.raises(ConfigError, match="divisible"):
        PolicyConfig(T_p=10, T_a=4, unet=UnetConfig(down_dims=[8, 16, 32])).validate()


def test_checkpoint_round_trip_identical_predictions(checkpoint):
    a, b = load_policy(checkpoint, device="cpu"), load_policy(checkpoint, device="cpu")
    obs = random_obs(a.config)
    noise = np.random.default_rng(1).standard_normal((8, 2)).astype(np.float32)
    pa, pb = a.predict(obs, noise=noise), b.predict(obs, noise=noise)
    assert pa.shape == (8, 2) and pa.dtype == np.float32
    np.testing.assert_array_equal(pa, pb)
    # a different initial sample gives a different plan: noise really is used
    assert np.abs(a.predict(obs, noise=-noise) - pa).max() > 1e-4
    assert a.config.T_o == 2 and a.config.T_p == 8 and a.config.camera_names == ["image"]


def test_feature_cache_encodes_shared_frames_once(checkpoint):
    policy = load_policy(checkpoint, device="cpu")
    obs = random_obs(policy.config)
    noise = np.zeros((8, 2), np.float32)
    first = policy.predict(obs, noise=noise)
    assert policy.cache.misses == 2
    # the next window shares its oldest frame with this window's newest one
    nxt = random_obs(policy.config, seed=5)
    nxt["images"]["image"][0] = obs["images"]["image"][1]
    policy.predict(nxt, noise=noise)
    assert policy.cache.misses == 3 and policy.cache.hits == 1
    # cached features give exactly the same plan as a fresh encode
    fresh = load_policy(checkpoint, device="cpu")
    np.testing.assert_allclose(policy.predict(obs, noise=noise), fresh.predict(obs, noise=noise), atol=1e-6)
    np.testing.assert_allclose(first, fresh.predict(obs, noise=noise), atol=1e-6)


def test_predict_rejects_bad_observations(checkpoint):
    policy = load_policy(checkpoint, device="cpu")
    obs = random_obs(policy.config)
    bad_state = dict(obs, state=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="state"):
        policy.predict(bad_state)
    with pytest.raises(ValueError, match="NaN"):
        policy.predict(dict(obs, state=np.full((2, 2), np.nan, np.float32)))
    with pytest.raises(ValueError, match="camera 'image'"):
        policy.predict(dict(obs, images={}))
    with pytest.raises(ValueError, match="uint8"):
        policy.predict(dict(obs, images={"image": obs["images"]["image"].astype(np.float32)}))


def test_missing_files_named(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_policy(tmp_path / "nope")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_policy(checkpoint)


def test_truncated_safetensors_rejected(checkpoint):
    w = checkpoint / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_policy(checkpoint)


def test_garbage_safetensors_rejected(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_policy(checkpoint)


def test_wrong_shapes_rejected(checkpoint):
    cfg_path = checkpoint / "config.json"
    payload = json.loads(cfg_path.read_text())
    payload["policy"]["encoder"]["feature_dim"] = 32  # weights were saved with 16
    cfg_path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="has shape"):
        load_policy(checkpoint)


def test_unknown_architecture_rejected(checkpoint):
    cfg_path = checkpoint / "config.json"
    payload = json.loads(cfg_path.read_text())
    payload["policy"]["denoiser"] = "mamba"
    cfg_path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="config.json: denoiser must be 'unet' or 'transformer'"):
        load_policy(checkpoint)


def test_invalid_json_and_foreign_format(checkpoint):
    cfg_path = checkpoint / "config.json"
    cfg_path.write_text('{"policy": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_policy(checkpoint)
    cfg_path.write_text(json.dumps({"type": "diffusion", "horizon": 16}))  # e.g. a LeRobot config
    with pytest.raises(CheckpointError, match="not a dp_ros checkpoint"):
        load_policy(checkpoint)


def test_nan_weights_rejected(checkpoint):
    from safetensors.torch import load_file, save_file
    w = checkpoint / "model.safetensors"
    tensors = load_file(str(w))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name][...] = float("nan")
    save_file(tensors, str(w))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_policy(checkpoint)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key"):
        PolicyConfig.from_dict({"encoder": {"backbon": "resnet18"}})
    with pytest.raises(ConfigError, match="T_a"):
        PolicyConfig.from_dict({"T_a": 40})
    with pytest.raises(ConfigError, match="dt"):
        PolicyConfig.from_dict({"dt": -0.1})
    cfg = PolicyConfig.from_dict(PolicyConfig().to_dict())
    assert cfg == PolicyConfig()
