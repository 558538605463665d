"""Policy swap validation and background loading (no ROS)."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest

from dp_ros.policy import load_policy
from dp_ros.policy.config import CameraConfig
from dp_ros.policy.seeding import plan_noise, seeded_predict
from dp_ros.policy.swap import PolicyLoader, SwapError, validate_swap

from helpers_policy import make_checkpoint, random_obs, small_config, write_config_only


@pytest.fixture(scope="module")
def loadable(tmp_path_factory):
    """Two real checkpoints, built once (building a model takes a while)."""
    root = tmp_path_factory.mktemp("loadable")
    make_checkpoint(root / "running", small_config(policy_id="running"))
    make_checkpoint(root / "candidate", small_config(policy_id="candidate", T_a=2), torch_seed=1)
    return root


@pytest.fixture
def policies(tmp_path):
    """An allow-listed policy directory with a running policy and a compatible candidate."""
    root = tmp_path / "policies"
    running = small_config(policy_id="running")
    write_config_only(root / "running", running)
    write_config_only(root / "candidate", small_config(policy_id="candidate", T_a=2))
    return root, running


def test_valid_swap_returns_candidate_config(policies):
    root, running = policies
    cfg = validate_swap(root / "candidate", root, running)
    assert cfg.policy_id == "candidate" and cfg.T_a == 2  # T_a may differ


def test_relative_path_and_empty_policy_dir(policies, monkeypatch):
    root, running = policies
    monkeypatch.chdir(root)
    assert validate_swap("candidate", str(root), running).policy_id == "candidate"
    assert validate_swap(root / "candidate", "", running).policy_id == "candidate"  # unrestricted


def test_missing_path(policies):
    root, running = policies
    with pytest.raises(SwapError, match="does not exist"):
        validate_swap(root / "nope", root, running)
    with pytest.raises(SwapError, match="empty"):
        validate_swap("", root, running)


def test_outside_policy_dir(policies, tmp_path):
    root, running = policies
    outside = write_config_only(tmp_path / "elsewhere" / "p", small_config())
    with pytest.raises(SwapError, match="outside policy_dir"):
        validate_swap(outside, root, running)
    with pytest.raises(SwapError, match="outside policy_dir"):
        validate_swap(root / ".." / "elsewhere" / "p", root, running)
    # a sibling whose name merely starts with the allow-listed one is outside too
    sibling = write_config_only(tmp_path / "policies2" / "p", small_config())
    with pytest.raises(SwapError, match="outside policy_dir"):
        validate_swap(sibling, root, running)


def test_symlink_escaping_policy_dir_is_refused(policies, tmp_path):
    root, running = policies
    outside = write_config_only(tmp_path / "elsewhere" / "p", small_config())
    os.symlink(outside, root / "link")
    with pytest.raises(SwapError, match="outside policy_dir"):
        validate_swap(root / "link", root, running)
    # a symlink that stays inside is fine
    os.symlink(root / "candidate", root / "inner_link")
    assert validate_swap(root / "inner_link", root, running).policy_id == "candidate"


@pytest.mark.parametrize("overrides, reason", [
    ({"action_names": ["a", "b"]}, "action_names"),
    ({"state_names": ["joint_1", "joint_0"]}, "state_names"),
    ({"dt": 0.05}, "dt"),
    ({"T_o": 1}, "T_o"),
    ({"cameras": [CameraConfig(name="wrist", height=32, width=32)]}, "cameras"),
    ({"cameras": [CameraConfig(name="image", height=48, width=48)]}, "48x48"),
])
def test_incompatible_candidates(policies, overrides, reason):
    root, running = policies
    write_config_only(root / "other", small_config(**overrides))
    with pytest.raises(SwapError, match="incompatible") as err:
        validate_swap(root / "other", root, running)
    assert reason in str(err.value)


def test_invalid_config_and_missing_weights(policies):
    root, running = policies
    bad = write_config_only(root / "bad", small_config())
    (bad / "config.json").write_text("{not json")
    with pytest.raises(SwapError, match="not valid JSON"):
        validate_swap(bad, root, running)
    noweights = write_config_only(root / "noweights", small_config())
    (noweights / "model.safetensors").unlink()
    with pytest.raises(SwapError, match="model.safetensors"):
        validate_swap(noweights, root, running)
    afile = root / "file.txt"
    afile.write_text("x")
    with pytest.raises(SwapError, match="not a checkpoint directory"):
        validate_swap(afile, root, running)


def test_replan_every_must_fit_the_horizon(policies):
    root, running = policies
    validate_swap(root / "candidate", root, running, replan_every=7)  # T_p 8 - T_o 2 + 1
    with pytest.raises(SwapError, match="replan_every 8"):
        validate_swap(root / "candidate", root, running, replan_every=8)


def test_loader_success_and_failure(loadable, tmp_path):
    root, running = loadable, small_config(policy_id="running")
    loader = PolicyLoader(device="cpu", seed=0)
    try:
        assert loader.take() is None
        out = loader.submit(root / "candidate").result(timeout=60)
        assert out.ok and out.policy.policy_id == "candidate"
        taken = loader.take()
        assert taken is out and loader.take() is None and loader.loading is None

        corrupt = tmp_path / "corrupt"
        shutil.copytree(root / "running", corrupt)
        data = (corrupt / "model.safetensors").read_bytes()
        (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
        out = loader.submit(corrupt).result(timeout=60)
        assert not out.ok and "model.safetensors" in out.error
        assert loader.take() is out

        # validation repeated on the worker: a file removed after the parameter was set
        out = loader.submit(root / "gone", validate=lambda p: validate_swap(p, root, running)).result(60)
        assert not out.ok and "does not exist" in out.error
    finally:
        loader.shutdown()


def test_loader_newest_request_wins(loadable):
    root = loadable
    gate = threading.Event()
    calls = []

    def slow_load(path, device, seed):
        calls.append(os.path.basename(path))
        gate.wait(10)
        return load_policy(path, device=device, seed=seed)

    loader = PolicyLoader(device="cpu", load=slow_load)
    try:
        first = loader.submit(root / "running")
        while not calls:  # the first load has started
            threading.Event().wait(0.01)
        second = loader.submit(root / "running")  # queued behind the first: superseded
        third = loader.submit(root / "candidate")
        gate.set()
        assert first.result(60) is not None  # started before the others were queued
        assert second.result(60) is None
        assert third.result(60).ok
        assert loader.take().policy.policy_id == "candidate"
        assert calls == ["running", "candidate"]
    finally:
        loader.shutdown()


def test_seeded_noise_convention(loadable):
    root = loadable
    policy = load_policy(root / "running", device="cpu")
    obs = random_obs(policy.config, seed=3)
    a = seeded_predict(policy, obs, seed=7, plan_stamp_ns=1_000_000_000)
    policy.predict(obs)  # advances the policy's own generator: must not matter
    b = seeded_predict(policy, obs, seed=7, plan_stamp_ns=1_000_000_000)
    c = seeded_predict(policy, obs, seed=7, plan_stamp_ns=1_100_000_000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    pn = plan_noise(7, 1_000_000_000, policy.config.T_p, policy.config.action_dim)
    np.testing.assert_array_equal(a, policy.predict(obs, noise=pn.noise))  # DDIM: noise decides
    with pytest.raises(ValueError):
        plan_noise(-1, 0, 8, 2)


def test_config_json_is_all_that_validation_reads(policies):
    root, running = policies
    cand = root / "candidate"
    (cand / "model.safetensors").write_bytes(b"garbage")  # weights are the loader's business
    payload = json.loads((cand / "config.json").read_text())
    assert validate_swap(cand, root, running).policy_id == payload["policy"]["policy_id"]
