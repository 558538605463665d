"""Normaliser: [min, max] -> [-1, 1], mean/std, constant dimensions, dtype and device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dp_ros.policy.config import NormStats, PolicyConfig
from dp_ros.policy.normalizer import Normalizer, fit_stats


def _data(n=200, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform([-3.0, 0.5, 10.0], [2.0, 0.7, 40.0], size=(n, 3)).astype(np.float32)


def test_fit_stats_fills_python_floats():
    x = _data()
    s = fit_stats(x)
    assert s.mode == "min_max"
    for name in ("min", "max", "mean", "std"):
        v = getattr(s, name)
        assert isinstance(v, list) and len(v) == 3 and all(type(e) is float for e in v)
    assert np.allclose(s.min, x.min(0)) and np.allclose(s.max, x.max(0))
    assert np.allclose(s.mean, x.mean(0), atol=1e-5) and np.allclose(s.std, x.std(0), atol=1e-5)
    assert fit_stats(x, "mean_std").mode == "mean_std"
    # statistics are accepted by the checkpoint config as they are
    PolicyConfig.from_dict({"state_names": ["a", "b", "c"], "action_names": ["a", "b", "c"],
                            "normalizer": {"action": s.__dict__}})


@pytest.mark.parametrize("bad", [np.zeros((0, 2)), np.zeros(3), np.array([[0.0, np.nan]])])
def test_fit_stats_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        fit_stats(bad)
    with pytest.raises(ValueError, match="mode"):
        fit_stats(_data(), "zscore")


def test_min_max_maps_range_to_unit_interval_and_round_trips():
    x = torch.from_numpy(_data())
    norm = Normalizer({"action": fit_stats(x.numpy())})
    y = norm.normalize("action", x)
    assert torch.allclose(y.min(0).values, torch.full((3,), -1.0), atol=1e-6)
    assert torch.allclose(y.max(0).values, torch.full((3,), 1.0), atol=1e-6)
    # an affine map: the midpoint of the range goes to 0
    mid = (x.min(0).values + x.max(0).values) / 2
    assert torch.allclose(norm.normalize("action", mid), torch.zeros(3), atol=1e-6)
    assert torch.allclose(norm.unnormalize("action", y), x, atol=1e-5)
    # leading dims are free: (B, T, D)
    xb = x[:32].reshape(2, 16, 3)
    assert torch.allclose(norm.normalize("action", xb).reshape(32, 3), y[:32])


def test_constant_dimension_does_not_divide_by_zero_and_round_trips_exactly():
    x = _data()
    x[:, 1] = 0.25  # a joint that never moved in the demonstrations
    x[:, 2] = 3.0
    x[:5, 2] += 5e-5  # a range below the threshold counts as constant too
    norm = Normalizer({"state": fit_stats(x)})
    y = norm.normalize("state", torch.from_numpy(x))
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 1], torch.zeros(len(x)))  # the middle of [-1, 1], as the reference
    assert torch.allclose(y[:5, 2] - y[5:6, 2], torch.full((5,), 5e-5), atol=1e-6)  # scale 1
    back = norm.unnormalize("state", y)
    assert torch.equal(back[:, 1], torch.from_numpy(x[:, 1]))
    # unnormalising the model's output for a constant dim lands on the constant
    assert norm.unnormalize("state", torch.zeros(1, 3))[0, 1].item() == 0.25


def test_mean_std():
    x = torch.from_numpy(_data(1000)).double()
    x[:, 0] = -7.0  # constant: std 0 is treated as 1
    norm = Normalizer({"state": fit_stats(x.numpy(), "mean_std")})
    y = norm.normalize("state", x)
    assert torch.allclose(y[:, 1:].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(y[:, 1:].std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-9)
    assert torch.equal(y[:, 0], torch.zeros(1000, dtype=torch.float64))
    assert torch.allclose(norm.unnormalize("state", y), x, atol=1e-12)


def test_missing_key_is_identity_and_has():
    norm = Normalizer({"action": fit_stats(_data())})
    x = torch.randn(4, 5)
    assert norm.has("action") and not norm.has("state")
    assert norm.normalize("state", x) is x and norm.unnormalize("state", x) is x
    assert len(Normalizer({}).state_dict()) == 0


def test_dtype_and_device_follow_the_input():
    norm = Normalizer({"action": fit_stats(_data())})
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = torch.ones(2, 3, dtype=dtype)
        assert norm.normalize("action", x).dtype == dtype
        assert norm.unnormalize("action", x).dtype == dtype
    meta = torch.empty(2, 3, device="meta")  # stands in for an accelerator
    assert norm.normalize("action", meta).device.type == "meta"


def test_buffers_are_non_persistent_and_move_with_the_module():
    norm = Normalizer({"action": fit_stats(_data()), "state": fit_stats(_data(seed=1), "mean_std")})
    assert norm.state_dict() == {}  # the config holds the statistics, not the weights file
    assert {n for n, _ in norm.named_buffers()} == {"action_scale", "action_offset",
                                                    "state_scale", "state_offset"}
    norm.to(torch.float32)
    assert norm.action_scale.dtype == torch.float32


def test_shape_mismatch_and_bad_stats_are_reported():
    norm = Normalizer({"action": fit_stats(_data())})
    with pytest.raises(ValueError, match="3 dimensions"):
        norm.normalize("action", torch.zeros(2, 4))
    with pytest.raises(ValueError, match="'std'"):
        Normalizer({"state": NormStats(mode="mean_std", mean=[0.0])})
    with pytest.raises(ValueError, match="identifier"):
        Normalizer({"a.b": fit_stats(_data())})


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (20, 4), elements=st.floats(-1e3, 1e3)), st.sampled_from(["min_max", "mean_std"]))
def test_round_trip_property(x, mode):
    norm = Normalizer({"action": fit_stats(x, mode)})
    t = torch.from_numpy(x)
    y = norm.normalize("action", t)
    assert torch.isfinite(y).all()
    if mode == "min_max":
        assert (y >= -1 - 1e-9).all() and (y <= 1 + 1e-9).all()
    assert torch.allclose(norm.unnormalize("action", y), t, rtol=1e-9, atol=1e-9)
