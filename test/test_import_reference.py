"""`dp-ros import diffusion-policy`: reference-code checkpoints (built from the reference's
layout by test/fixtures/make_reference_fixtures.py, with an independent re-implementation of
its maths for the expected actions), read through the restricted unpickler."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dp_ros.cli import main as cli_main
from dp_ros.policy.checkpoint import load_config
from dp_ros.policy.importers import ImportRefused, import_diffusion_policy
from dp_ros.policy.importers.reference import HydraConfig
from dp_ros.policy.importers.safe_unpickle import PickleRefused, load_torch_archive, to_plain
from dp_ros.policy.inference import load_policy
from fixtures.fixture_weights import materialize_torch_zip

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
NAMES = ["unet_hybrid_ddpm", "transformer_hybrid_ddim", "unet_image_ddim", "unet_lowdim_ddpm",
         "transformer_lowdim_ddim"]
TOL = 1e-4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_ckpt")
    out = {}
    for n in NAMES:
        out[n] = root / f"{n}.ckpt"
        materialize_torch_zip(FIXTURES / n / "latest.ckpt.skeleton.zip", FIXTURES / n / "latest.ckpt.recipe.json",
                              out[n])
    return out


@pytest.fixture(scope="module")
def imported(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_imported")
    return {n: import_diffusion_policy(ckpts[n], root / n, trust_pickle=True) for n in NAMES}


def _expected(name: str):
    e = np.load(FIXTURES / name / "expected.npz")
    meta = json.loads((FIXTURES / name / "FIXTURE.json").read_text())
    state = np.concatenate([e[f"obs:{k}"] for k in meta["state_order"]], axis=-1)
    return e, {"state": state, "images": {k: e[f"obs:{k}"] for k in meta["cameras"]}}


def _predict(policy, e, obs) -> np.ndarray:
    if policy.config.schedule.sampler == "ddim":
        return policy.predict(obs, noise=e["noise"])
    m = policy.model
    images = {n: torch.from_numpy(v)[None] for n, v in obs["images"].items()}
    cond = m.observation_condition(images, torch.from_numpy(obs["state"])[None])
    vn = torch.from_numpy(e["variance_noise"])[:, None]
    return m.sample(cond, torch.from_numpy(e["noise"])[None], variance_noise=vn)[0].numpy()


@pytest.mark.parametrize("name", NAMES)
def test_predictions_match_reference(imported, name):
    e, obs = _expected(name)
    policy = load_policy(imported[name].out, device="cpu")
    got = _predict(policy, e, obs)
    assert got.shape == e["actions"].shape
    err = np.abs(got - e["actions"]).max()
    assert err < TOL, f"{name}: max abs difference {err:g}"


def test_configs_mapped(imported):
    c = imported["unet_hybrid_ddpm"].config
    assert [cam.name for cam in c.cameras] == ["image"] and c.state_names == ["agent_pos_0", "agent_pos_1"]
    assert c.encoder.norm == "group" and c.encoder.feature_activation == "relu" and c.encoder.image_norm == "symmetric"
    assert c.encoder.crop_shape == [84, 84] and c.schedule.sampler == "ddpm" and c.dt == 0.1
    c = imported["unet_image_ddim"].config
    assert [cam.name for cam in c.cameras] == ["camera_0", "camera_1"]  # MultiImageObsEncoder sorts keys
    assert c.encoder.pool == "avg" and c.encoder.feature_dim == 512 and c.encoder.image_norm == "custom"
    c = imported["transformer_hybrid_ddim"].config
    assert c.denoiser == "transformer" and c.encoder.norm == "batch" and c.transformer.n_cond_layers == 1
    assert c.state_names == ["robot_eef_0", "robot_eef_1", "robot_eef_2", "gripper_0", "gripper_1"]
    assert any("reordered" in n for n in imported["transformer_hybrid_ddim"].notes)
    c = imported["unet_lowdim_ddpm"].config
    assert not c.cameras and c.T_a == 8 and c.state_dim == 5  # T_a from an unresolved ${eval:...}
    assert "no EMA" in imported["unet_lowdim_ddpm"].notes[0]
    assert "EMA" in imported["transformer_lowdim_ddim"].notes[0]
    assert any("prediction_type 'sample'" in n for n in imported["transformer_lowdim_ddim"].notes)


def test_ema_preferred_and_no_ema_option(ckpts, imported, tmp_path):
    name = "transformer_lowdim_ddim"
    res = import_diffusion_policy(ckpts[name], tmp_path / "model", trust_pickle=True, use_ema=False)
    e, obs = _expected(name)
    ema = load_policy(imported[name].out, device="cpu").predict(obs, noise=e["noise"])
    raw = load_policy(res.out, device="cpu").predict(obs, noise=e["noise"])
    assert np.abs(ema - e["actions"]).max() < TOL
    assert np.abs(raw - e["actions"]).max() > 1e-3  # the training weights are not the EMA's


def test_pickle_needs_trust(ckpts, tmp_path):
    with pytest.raises(ImportRefused, match="--trust-pickle"):
        import_diffusion_policy(ckpts["unet_lowdim_ddpm"], tmp_path / "out")
    assert cli_main(["import", "diffusion-policy", str(ckpts["unet_lowdim_ddpm"]), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"cfg": {"policy": {}}, "state_dicts": {"model": {"w": torch.zeros(2)}}, "x": _Evil(marker)}, path)
    with pytest.raises(PickleRefused, match="system"):
        load_torch_archive(path)
    with pytest.raises(ImportRefused, match="refusing to load"):
        import_diffusion_policy(path, tmp_path / "out", trust_pickle=True)
    assert not marker.exists()
    # a legacy (non-zip) torch.save file and a file that is not an archive at all
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"a": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(PickleRefused, match="legacy"):
        load_torch_archive(legacy)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PickleRefused):
        load_torch_archive(junk)


def test_restricted_unpickler_bounds(tmp_path):
    """A tensor whose size reaches past its storage record is refused, not read."""
    path = tmp_path / "t.ckpt"
    torch.save({"w": torch.arange(6, dtype=torch.float32)}, path)
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    data_name = next(n for n in records if n.endswith("/data/0"))
    records[data_name] = records[data_name][:8]  # two floats left
    bad = tmp_path / "bad.ckpt"
    with zipfile.ZipFile(bad, "w") as z:
        for n, d in records.items():
            z.writestr(n, d)
    with pytest.raises(PickleRefused, match="bytes"):
        load_torch_archive(bad)
    assert torch.equal(load_torch_archive(path)["w"], torch.arange(6, dtype=torch.float32))
    # parameters, views sharing a storage, other dtypes
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    ok = tmp_path / "ok.ckpt"
    torch.save({"p": torch.nn.Parameter(torch.ones(2, 3)), "view": base[1:, ::2], "base": base,
                "i": torch.tensor([1, 2], dtype=torch.int64), "h": torch.ones(2, dtype=torch.float16),
                "s": {1, 2}, "t": (1.5, None, "x", b"raw")}, ok)
    got = load_torch_archive(ok)
    assert torch.equal(got["p"], torch.ones(2, 3)) and torch.equal(got["view"], base[1:, ::2])
    assert got["i"].dtype == torch.int64 and got["h"].dtype == torch.float16
    assert got["s"] == {1, 2} and got["t"] == (1.5, None, "x", b"raw")


def test_config_read_as_plain_data(ckpts):
    payload = to_plain(load_torch_archive(ckpts["unet_hybrid_ddpm"]))
    cfg = payload["cfg"]
    assert type(cfg) is dict and type(cfg["policy"]["down_dims"]) is list
    assert cfg["policy"]["noise_scheduler"]["_target_"].endswith("DDPMScheduler")
    assert isinstance(payload["pickles"]["global_step"], bytes)  # dill blobs stay bytes
    assert "omegaconf" not in str(type(cfg))


def test_hydra_interpolations():
    c = HydraConfig({"a": 2, "flag": True, "n": 8, "lat": 1,
                     "p": {"h": "${a}", "x": "${eval:'${n}+${lat}'}", "y": "${.h}", "z": "r_${a}_${p.h}",
                           "c": "${eval:'${a} if ${flag} else ${n}'}", "bad": "${now:%Y}", "loop": "${p.loop}"}})
    p = c.get("p")
    assert (p["h"], p["x"], p["y"], p["z"], p["c"]) == (2, 9, 2, "r_2_2", 2)
    with pytest.raises(ImportRefused, match="now"):
        c.get("p.bad")
    with pytest.raises(ImportRefused, match="loop"):
        c.get("p.loop")
    with pytest.raises(ImportRefused, match="evaluate"):
        HydraConfig({"x": "${eval:'__import__(\"os\")'}"}).get("x")


def _rewrite(ckpt: Path, dest: Path, edit, keep_weights: bool = True) -> Path:
    """Re-save a checkpoint's payload (plain data, standard pickle) after editing it; without
    its weights when the refusal comes from the config alone (keeps the test fast)."""
    payload = to_plain(load_torch_archive(ckpt))
    if not keep_weights:
        payload["state_dicts"] = {"model": {}}
    edit(payload)
    torch.save(payload, dest)
    return dest


def _policy(p):
    return p["cfg"]["policy"]


REFUSALS = [
    ("unet_lowdim_ddpm", lambda p: _policy(p).update(
        _target_="diffusion_policy.policy.bet_lowdim_policy.BETLowdimPolicy"), "BETLowdimPolicy"),
    ("unet_lowdim_ddpm", lambda p: _policy(p).update(oa_step_convention=False), "oa_step_convention"),
    ("unet_lowdim_ddpm", lambda p: _policy(p).update(obs_as_global_cond=False), "obs_as_global_cond"),
    ("unet_lowdim_ddpm", lambda p: _policy(p)["noise_scheduler"].update(variance_type="learned_range"),
     "learned_range"),
    ("unet_lowdim_ddpm", lambda p: _policy(p)["noise_scheduler"].update(
        _target_="diffusers.schedulers.scheduling_pndm.PNDMScheduler"), "PNDMScheduler"),
    ("transformer_lowdim_ddim", lambda p: _policy(p).update(eta=0.5), "eta"),
    ("transformer_lowdim_ddim", lambda p: _policy(p)["model"].update(time_as_cond=False), "time_as_cond"),
    ("unet_image_ddim", lambda p: _policy(p)["obs_encoder"].update(resize_shape=[60, 80]), "resize_shape"),
    ("unet_image_ddim", lambda p: _policy(p)["obs_encoder"]["rgb_model"].update(name="resnet34"), "resnet34"),
    ("unet_hybrid_ddpm", lambda p: _policy(p)["shape_meta"]["obs"].update(
        depth={"shape": [1, 96, 96], "type": "depth"}), "depth"),
]


@pytest.mark.parametrize("name,edit,needle", REFUSALS, ids=[f"{r[0]}-{r[2]}" for r in REFUSALS])
def test_unsupported_settings_refused_by_name(ckpts, tmp_path, name, edit, needle):
    path = _rewrite(ckpts[name], tmp_path / "edited.ckpt", edit, keep_weights=False)
    with pytest.raises(ImportRefused, match=needle):
        import_diffusion_policy(path, tmp_path / "out", trust_pickle=True)
    assert not (tmp_path / "out").exists()


WEIGHT_REFUSALS = [
    (lambda sd: sd.update({"model.extra_head.weight": torch.zeros(2)}), "model.extra_head.weight"),
    (lambda sd: sd.update({"model.final_conv.1.weight": torch.zeros(2, 64, 1)}), "model.final_conv.1.weight"),
    (lambda sd: sd.update({"normalizer.params_dict.action.scale": torch.tensor([1.0, -1.0])}), "positive"),
    (lambda sd: sd.update({"model.local_cond_encoder.0.residual_conv.weight": torch.zeros(1)}), "local"),
]


@pytest.mark.parametrize("edit,needle", WEIGHT_REFUSALS, ids=[r[1] for r in WEIGHT_REFUSALS])
def test_unexpected_weights_refused_by_name(ckpts, tmp_path, edit, needle):
    path = _rewrite(ckpts["unet_lowdim_ddpm"], tmp_path / "edited.ckpt",
                    lambda p: edit(p["state_dicts"]["model"]))
    with pytest.raises(ImportRefused, match=needle):
        import_diffusion_policy(path, tmp_path / "out", trust_pickle=True)
    assert not (tmp_path / "out").exists()


def test_random_eval_crop_is_noted(ckpts, tmp_path):
    path = _rewrite(ckpts["unet_hybrid_ddpm"], tmp_path / "e.ckpt", lambda p: _policy(p).update(eval_fixed_crop=False))
    res = import_diffusion_policy(path, tmp_path / "out", trust_pickle=True)
    assert any("random crop" in n for n in res.notes)


def test_cli_import_diffusion_policy(ckpts, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["import", "diffusion-policy", str(ckpts["unet_lowdim_ddpm"]), "--out", str(out),
                     "--trust-pickle", "--dt", "0.2"]) == 0
    assert load_config(out).dt == 0.2
    printed = capsys.readouterr().out
    assert "DDPM x 100" in printed and "no EMA" in printed
