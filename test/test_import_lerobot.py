"""`dp-ros import lerobot`: checkpoints saved by the real LeRobot (0.3.3 and 0.4.4, fixtures
made by test/fixtures/make_lerobot_fixtures.py) predict what LeRobot predicted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dp_ros.cli import main as cli_main
from dp_ros.policy.checkpoint import load_config
from dp_ros.policy.importers import ImportRefused, import_lerobot, stats_from_unnormalize
from dp_ros.policy.importers.lerobot import camera_name
from dp_ros.policy.inference import load_policy
from dp_ros.policy.normalizer import Normalizer
from fixtures.fixture_weights import materialize_safetensors

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot"
NAMES = ["v03_old_defaults_ddpm", "v04_new_defaults_ddim"]
TOL = 1e-4


def _materialize(name: str, dest: Path) -> Path:
    fx = FIXTURES / name
    dest.mkdir(parents=True)
    for f in fx.iterdir():
        if not f.name.startswith("model.") and f.name not in ("expected.npz", "FIXTURE.json"):
            shutil.copy(f, dest / f.name)
    materialize_safetensors(fx / "model.skeleton.safetensors", fx / "model.recipe.json", dest / "model.safetensors")
    return dest


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot_src")
    return {n: _materialize(n, root / n) for n in NAMES}


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot_imported")
    return {n: import_lerobot(sources[n], root / n) for n in NAMES}


def _expected(name: str):
    e = np.load(FIXTURES / name / "expected.npz")
    meta = json.loads((FIXTURES / name / "FIXTURE.json").read_text())
    obs = {"state": e["state"], "images": {camera_name(k): e[f"image:{k}"] for k in meta["cameras"]}}
    return e, obs


def _predict(policy, e, obs) -> np.ndarray:
    if policy.config.schedule.sampler == "ddim":
        return policy.predict(obs, noise=e["noise"])
    # DDPM: replay the variance noise LeRobot (diffusers) drew at each step
    m = policy.model
    images = {n: torch.from_numpy(v)[None] for n, v in obs["images"].items()}
    cond = m.observation_condition(images, torch.from_numpy(obs["state"])[None])
    x = torch.from_numpy(e["noise"])[None]
    vn = torch.from_numpy(e["variance_noise"])[:, None]
    return m.sample(cond, x, variance_noise=vn)[0].numpy()


@pytest.mark.parametrize("name", NAMES)
def test_predictions_match_lerobot(imported, name):
    e, obs = _expected(name)
    policy = load_policy(imported[name].out, device="cpu")
    got = _predict(policy, e, obs)
    assert got.shape == e["actions"].shape
    err = np.abs(got - e["actions"]).max()
    assert err < TOL, f"{name}: max abs difference {err:g}"
    # the part LeRobot's predict_action_chunk returns (from the current observation on)
    start = policy.config.T_o - 1
    chunk = got[start:start + policy.config.T_a]
    assert np.abs(chunk - e["chunk"]).max() < TOL


def test_layouts_and_defaults_mapped(imported):
    old, new = imported[NAMES[0]], imported[NAMES[1]]
    assert "LeRobot <= 0.3" in old.notes[0] and "LeRobot >= 0.4" in new.notes[0]
    c = old.config
    assert [cam.name for cam in c.cameras] == ["image"] and (c.cameras[0].height, c.cameras[0].width) == (96, 96)
    assert (c.T_o, c.T_p, c.T_a) == (2, 16, 8)
    assert c.encoder.norm == "group" and c.encoder.shared and c.encoder.crop_shape == [84, 84]
    assert c.encoder.state_first and c.encoder.feature_activation == "relu"
    assert c.encoder.image_norm == "imagenet" and c.schedule.sampler == "ddpm"
    assert c.schedule.num_inference_steps == 100
    c = new.config
    assert [cam.name for cam in c.cameras] == ["top", "wrist"]
    assert (c.cameras[0].height, c.cameras[0].width) == (64, 96)
    assert (c.T_o, c.T_p, c.T_a) == (2, 64, 32)
    assert c.encoder.norm == "batch" and not c.encoder.shared and c.encoder.crop_shape is None
    assert c.encoder.feature_dim == 32 and c.schedule.sampler == "ddim"
    assert c.schedule.num_inference_steps == 10
    assert any("pretrained_backbone_weights" in n for n in new.notes)
    assert load_config(new.out).to_dict() == c.to_dict()


def test_constant_dimensions(imported):
    """LeRobot maps a constant state dimension to -1 (min_max) or 0 (mean_std); so does dp_ros."""
    for name, dim, value in ((NAMES[0], 1, -1.0), (NAMES[1], 2, 0.0)):
        e, obs = _expected(name)
        norm = Normalizer(imported[name].config.normalizer)
        y = norm.normalize("state", torch.from_numpy(obs["state"]).double())
        assert torch.allclose(y[:, dim], torch.full_like(y[:, dim], value), atol=1e-9)
        assert any("range below" in n for n in imported[name].notes)
    # an action dimension LeRobot recorded as constant unnormalises to its value at y = -1
    f64 = torch.float64
    st = stats_from_unnormalize(torch.tensor([0.5e-8, 1.0], dtype=f64), torch.tensor([3.0 + 0.5e-8, 0.0], dtype=f64),
                                torch.tensor([-1.0, -1.0], dtype=f64), "action", [])
    x = Normalizer({"action": st}).unnormalize("action", torch.tensor([[-1.0, 0.5]], dtype=torch.float64))
    assert abs(float(x[0, 0]) - 3.0) < 1e-9 and abs(float(x[0, 1]) - 0.5) < 1e-9


def _copy_src(src: Path, dest: Path) -> Path:
    """Cheap copy of a LeRobot directory: small files copied, the weights linked."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "model.safetensors":
            os.symlink(f, dest / f.name)
        else:
            shutil.copy(f, dest / f.name)
    return dest


def test_legacy_config_format(sources, imported, tmp_path):
    """config.json with input_shapes/input_normalization_modes (LeRobot before features)."""
    src = _copy_src(sources[NAMES[0]], tmp_path / "legacy")
    conf = json.loads((src / "config.json").read_text())
    feats = {**conf.pop("input_features"), **conf.pop("output_features")}
    conf.pop("normalization_mapping")
    conf["input_shapes"] = {k: v["shape"] for k, v in feats.items() if k != "action"}
    conf["output_shapes"] = {"action": feats["action"]["shape"]}
    conf["input_normalization_modes"] = {"observation.image": "mean_std", "observation.state": "min_max"}
    conf["output_normalization_modes"] = {"action": "min_max"}
    (src / "config.json").write_text(json.dumps(conf))
    res = import_lerobot(src, tmp_path / "out")
    assert res.config.to_dict() == imported[NAMES[0]].config.to_dict() | {"policy_id": res.config.policy_id}
    a = load_file(str(res.out / "model.safetensors"))
    b = load_file(str(imported[NAMES[0]].out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


REFUSALS = [
    ("env_state", lambda c: c["input_features"].update(
        {"observation.environment_state": {"type": "ENV", "shape": [4]}}), "observation.environment_state"),
    ("backbone", lambda c: c.update(vision_backbone="resnet34"), "resnet34"),
    ("resize", lambda c: c.update(resize_shape=[48, 64]), "resize_shape"),
    ("unknown_key", lambda c: c.update(use_lora_adapters=True), "use_lora_adapters"),
    ("scheduler", lambda c: c.update(noise_scheduler_type="PNDM"), "PNDM"),
    ("beta_schedule", lambda c: c.update(beta_schedule="sigmoid"), "sigmoid"),
    ("crop_rounding", lambda c: c.update(crop_shape=[57, 93]), "center crop"),
    ("norm_mode", lambda c: c["normalization_mapping"].update(STATE="QUANTILES"), "q01"),
    ("missing_default", lambda c: c.pop("crop_shape"), "crop_shape"),
    ("not_diffusion", lambda c: c.update(type="act"), "act"),
]


@pytest.mark.parametrize("case,edit,needle", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_unsupported_settings_refused_by_name(sources, tmp_path, case, edit, needle):
    src = _copy_src(sources[NAMES[1]], tmp_path / "src")
    _edit(src / "config.json", edit)
    with pytest.raises(ImportRefused, match=needle):
        import_lerobot(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_processor_steps_checked(sources, tmp_path):
    src = _copy_src(sources[NAMES[1]], tmp_path / "src")
    _edit(src / "policy_preprocessor.json",
          lambda c: c["steps"][0]["config"].update(rename_map={"observation.images.top": "observation.images.front"}))
    with pytest.raises(ImportRefused, match="rename_map"):
        import_lerobot(src, tmp_path / "out")
    src2 = _copy_src(sources[NAMES[1]], tmp_path / "src2")
    for f in src2.glob("policy_*"):
        f.unlink()
    with pytest.raises(ImportRefused, match="no normalisation statistics"):
        import_lerobot(src2, tmp_path / "out2")


def test_cli_import_lerobot(sources, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["import", "lerobot", str(sources[NAMES[1]]), "--out", str(out), "--dt", "0.05",
            "--state-names", "a", "b", "c", "d", "--action-names", "x", "y", "z"]
    assert cli_main(args) == 0
    cfg = load_config(out)
    assert cfg.dt == 0.05 and cfg.state_names == ["a", "b", "c", "d"] and cfg.action_names == ["x", "y", "z"]
    assert "DDIM x 10" in capsys.readouterr().out
    assert cli_main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["import", "lerobot", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
