"""Warm start: the next plan starts from the previous plan shifted onto its time grid,
noised to an intermediate level and denoised with fewer steps (dp_ros.policy.warm_start)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from dp_ros.policy.inference import Policy
from dp_ros.policy.normalizer import action_range
from dp_ros.policy.runner import PlanJob, PlanRunner
from dp_ros.policy.swap import LoadOutcome
from dp_ros.policy.warm_start import (FOLLOW_TOLERANCE, PreviousPlan, check_keep_steps,
                                      check_warm_start_steps, departure, shift_plan)
from helpers_policy import random_noise, random_obs

DT_NS = 100_000_000  # small_config's dt is 0.1 s


def _policy(cfg, model, warm: int) -> Policy:
    return Policy(cfg, model, torch.device("cpu"), seed=0, warm_start_steps=warm)


def _on_plan(obs: dict, cfg, shifted: np.ndarray) -> dict:
    """`obs` with the newest state where the (shifted) previous plan put the arm: the
    robot followed it (small_config's state and action are the same joints)."""
    obs["state"][-1] = shifted[cfg.T_o - 1]
    return obs


def test_shift_on_the_grid_reuses_the_remainder_and_pads_with_the_last_action():
    prev = np.arange(16, dtype=np.float32).reshape(8, 2)  # action i = (2i, 2i + 1)
    plan = PreviousPlan(prev, stamp_ns=5 * DT_NS)
    same = shift_plan(plan, 5 * DT_NS, 0.1, 8)
    np.testing.assert_array_equal(same, prev)
    k = 3  # a plan stamped 3 ticks later: its index j is the previous plan's j + 3
    shifted = shift_plan(plan, (5 + k) * DT_NS, 0.1, 8)
    np.testing.assert_array_equal(shifted[:8 - k], prev[k:])
    np.testing.assert_array_equal(shifted[8 - k:], np.repeat(prev[-1:], k, axis=0))


def test_shift_between_grid_points_interpolates_and_refuses_what_does_not_overlap():
    prev = np.stack([np.linspace(0, 7, 8), -np.linspace(0, 7, 8)], axis=1).astype(np.float32)
    plan = PreviousPlan(prev, stamp_ns=0)
    half = shift_plan(plan, DT_NS // 2, 0.1, 8)  # half a tick later
    np.testing.assert_allclose(half[:7, 0], np.arange(7) + 0.5, atol=1e-6)
    assert half[7, 0] == pytest.approx(7.0)  # past the end: the last action
    assert shift_plan(plan, -DT_NS, 0.1, 8) is None  # clock went back
    assert shift_plan(plan, 8 * DT_NS, 0.1, 8) is None  # previous plan over before this one
    assert shift_plan(PreviousPlan(prev[:5], 0), DT_NS, 0.1, 8) is None  # other horizon


def test_warm_start_steps_are_validated_with_the_reason(cfg, model):
    assert check_warm_start_steps(0, 10) == 0 and check_warm_start_steps(9, 10) == 9
    for bad in (-1, 10, 12):
        with pytest.raises(ValueError, match="warm_start_steps must be 0"):
            check_warm_start_steps(bad, 10)
    with pytest.raises(ValueError, match="warm_start_steps"):
        _policy(cfg, model, warm=10)


def test_first_plan_without_a_previous_one_equals_the_cold_plan(cfg, model):
    cold, warm = _policy(cfg, model, 0), _policy(cfg, model, 3)
    obs, noise = random_obs(cfg, 1), random_noise(cfg, 1)
    a = cold.predict(obs, noise=noise)
    b = warm.predict(obs, noise=noise, previous=None, plan_stamp_ns=10 * DT_NS)
    np.testing.assert_array_equal(a, b)
    assert warm.last_start_index == 0
    assert warm.engine.denoiser_calls == len(warm.sampler) == cfg.schedule.num_inference_steps


def test_warm_plan_denoises_the_shifted_previous_plan_with_fewer_calls(cfg, model):
    w, k = 3, 2
    policy = _policy(cfg, model, w)
    K = len(policy.sampler)
    prev = np.random.default_rng(5).uniform(-2, 0.5, (cfg.T_p, cfg.action_dim)).astype(np.float32)
    expected0 = np.concatenate([prev[k:], np.repeat(prev[-1:], k, axis=0)])
    obs, noise = _on_plan(random_obs(cfg, 2), cfg, expected0), random_noise(cfg, 2)
    seen = {}
    real_sample = policy.engine.sample

    def spy(feats, state, x, start_index, generator, inpaint=None):
        seen["x"], seen["start"] = x.clone(), start_index
        return real_sample(feats, state, x, start_index, generator, inpaint=inpaint)

    policy.engine.sample = spy
    before = policy.engine.denoiser_calls
    out = policy.predict(obs, noise=noise, previous=PreviousPlan(prev, 10 * DT_NS),
                         plan_stamp_ns=(10 + k) * DT_NS)
    assert policy.engine.denoiser_calls - before == w < K
    assert seen["start"] == policy.last_start_index == K - w
    # the initial sample is the previous plan from index k on (padded with its last
    # action), normalised, diffused with the given noise to the level of step K - w
    x0 = policy.model.normalizer.normalize("action", torch.from_numpy(expected0)[None])
    want = policy.sampler.add_noise_at(K - w, x0, torch.from_numpy(noise)[None])
    torch.testing.assert_close(seen["x"], want)
    assert out.shape == (cfg.T_p, cfg.action_dim) and np.all(np.isfinite(out))
    # a previous plan that does not overlap this one's grid: cold
    policy.predict(obs, noise=noise, previous=PreviousPlan(prev, 0), plan_stamp_ns=100 * DT_NS)
    assert seen["start"] == 0
    assert policy.cold_reason == "nothing of the previous plan lies ahead"


def test_keep_steps_are_validated_with_the_reason(cfg, model):
    assert check_keep_steps(0, 7) == 0 and check_keep_steps(7, 7) == 7
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="warm_start_keep_steps must be 0"):
            check_keep_steps(bad, 7)
    with pytest.raises(ValueError, match="warm_start_keep_steps"):
        Policy(cfg, model, torch.device("cpu"), warm_start_steps=3, warm_start_keep_steps=99)


@pytest.mark.parametrize("keep", [1, 3])
def test_warm_start_keeps_the_running_plan_where_it_still_executes(cfg, model, keep):
    """With warm_start_keep_steps N the new plan equals the shifted previous plan up to
    N - 1 steps after its stamp (the executor still runs those while it is computed), and
    goes its own way after them; without it the new plan moves off there too."""
    k = 2
    prev = np.random.default_rng(6).uniform(-2, 0.5, (cfg.T_p, cfg.action_dim)).astype(np.float32)
    shifted = np.concatenate([prev[k:], np.repeat(prev[-1:], k, axis=0)])
    obs, noise = _on_plan(random_obs(cfg, 3), cfg, shifted), random_noise(cfg, 3)
    plans = {}
    for n in (0, keep):
        policy = Policy(cfg, model, torch.device("cpu"), seed=0, warm_start_steps=3,
                        warm_start_keep_steps=n)
        plans[n] = policy.predict(obs, noise=noise, previous=PreviousPlan(prev, 10 * DT_NS),
                                  plan_stamp_ns=(10 + k) * DT_NS)
        assert policy.cold_reason is None
    kept = cfg.T_o - 1 + keep
    np.testing.assert_allclose(plans[keep][:kept], shifted[:kept], atol=1e-5)
    assert np.abs(plans[0][:kept] - shifted[:kept]).max() > 1e-3
    assert np.abs(plans[keep][kept:] - shifted[kept:]).max() > 1e-3


def test_departure_names_the_joint_the_robot_left_the_plan_on():
    rng = np.ones(2)
    shifted = np.zeros((8, 2))
    state = np.zeros(2)
    assert departure(shifted, state, ["a", "b"], ["a", "b"], rng, T_o=2) is None
    state[1] = FOLLOW_TOLERANCE * 1.5
    assert "b is 15% of its range away" in departure(shifted, state, ["a", "b"], ["a", "b"],
                                                      rng, T_o=2)
    # only joints that are both state and action are compared, by name, in any order
    assert "a is 15% of its range away" in departure(shifted, state, ["b", "a"], ["a", "b"],
                                                      rng, T_o=2)
    assert departure(shifted, np.array([0.0, 0.0, 9.0]), ["b", "a", "gripper"], ["a", "b"],
                     rng, T_o=2) is None
    assert departure(shifted, state, ["x", "y"], ["a", "b"], rng, T_o=2) is None  # cannot tell
    # the plan's action for the new stamp is index T_o - 1
    shifted[2, 0] = 1.0
    assert departure(shifted, np.zeros(2), ["a", "b"], ["a", "b"], rng, T_o=2) is None
    assert "a is 100%" in departure(shifted, np.zeros(2), ["a", "b"], ["a", "b"], rng, T_o=3)


def test_a_robot_off_the_previous_plan_gets_a_cold_plan(cfg, model):
    """An arm that did not follow the previous plan (disabled executor, a reset between
    episodes, a push) must not continue its mode: the plan starts cold, and says why."""
    policy = _policy(cfg, model, 3)
    prev = np.random.default_rng(6).uniform(-2, 0.5, (cfg.T_p, cfg.action_dim)).astype(np.float32)
    followed = _on_plan(random_obs(cfg, 4), cfg, prev)
    policy.predict(followed, noise=random_noise(cfg, 4), previous=PreviousPlan(prev, 0), plan_stamp_ns=0)
    assert policy.cold_reason is None and policy.last_start_index > 0
    moved = _on_plan(random_obs(cfg, 4), cfg, prev)
    moved["state"][-1, 0] += 2 * FOLLOW_TOLERANCE * action_range(cfg)[0]
    cold = policy.predict(moved, noise=random_noise(cfg, 4), previous=PreviousPlan(prev, 0),
                          plan_stamp_ns=0)
    assert policy.last_start_index == 0
    assert policy.cold_reason.startswith(cfg.action_names[0]) and "of its range away" in policy.cold_reason
    np.testing.assert_array_equal(cold, _policy(cfg, model, 0).predict(moved, noise=random_noise(cfg, 4)))


def test_warm_start_pulls_the_plan_towards_the_previous_one(cfg, model):
    """Fewer steps from a noised previous plan stay closer to it than a cold plan does."""
    policy = _policy(cfg, model, 2)
    prev = np.random.default_rng(9).uniform(-2.5, 0.5, (cfg.T_p, cfg.action_dim)).astype(np.float32)
    obs = _on_plan(random_obs(cfg, 3), cfg, prev)
    gaps_warm, gaps_cold = [], []
    for s in range(4):
        noise = random_noise(cfg, 10 + s)
        warm = policy.predict(obs, noise=noise, previous=PreviousPlan(prev, 0), plan_stamp_ns=0)
        cold = policy.predict(obs, noise=noise)
        gaps_warm.append(np.abs(warm - prev).mean())
        gaps_cold.append(np.abs(cold - prev).mean())
    assert np.mean(gaps_warm) < np.mean(gaps_cold)


class _OneSwap:
    """Stands in for a PolicyLoader: hands over `policy` once, when armed."""

    def __init__(self, policy):
        self.policy, self.armed = policy, False

    def take(self):
        if not self.armed:
            return None
        self.armed = False
        return LoadOutcome("other", self.policy, None, 0.0)


def test_plan_runner_hands_the_previous_plan_to_the_next_and_forgets_it_at_a_swap(cfg, model):
    policy, other = _policy(cfg, model, 4), _policy(cfg, model, 4)
    policy.warm_start_keep_steps = 2
    outcomes: list = []
    done = threading.Event()
    loader = _OneSwap(other)

    def on_outcome(outcome):
        outcomes.append((outcome, runner.policy.last_start_index))
        done.set()

    runner = PlanRunner(policy, on_outcome=on_outcome, loader=loader, seed=3)
    runner.start()
    try:
        for i, stamp in enumerate([10 * DT_NS, 14 * DT_NS, 18 * DT_NS]):
            if i == 2:
                loader.armed = True  # installed before the third plan
                while loader.armed:
                    threading.Event().wait(0.01)
            done.clear()
            obs = random_obs(cfg, 20 + i)
            if outcomes:  # the arm followed the plan before
                last = outcomes[-1][0]
                shifted = shift_plan(PreviousPlan(last.actions, last.job.plan_stamp_ns), stamp,
                                     cfg.dt, cfg.T_p)
                obs = _on_plan(obs, cfg, shifted)
            runner.submit(PlanJob(obs, stamp))
            assert done.wait(30)
        first, second, third = outcomes
        assert first[0].ok and second[0].ok and third[0].ok
        assert first[1] == 0  # nothing to start from
        assert second[1] == len(policy.sampler) - 4  # warm from the first plan
        kept = cfg.T_o - 1 + 2  # and on it where the first plan still runs (4 steps later)
        np.testing.assert_allclose(second[0].actions[:kept], first[0].actions[4:4 + kept], atol=1e-5)
        assert third[1] == 0  # another policy: its first plan starts cold
        assert runner.policy is other
        assert runner.previous.stamp_ns == 18 * DT_NS
        np.testing.assert_array_equal(runner.previous.actions, third[0].actions)
    finally:
        assert runner.stop()
    # with warm_start_steps 0 the runner hands nothing over (cold plans)
    policy.warm_start_steps = 0
    outcomes.clear()
    runner = PlanRunner(policy, on_outcome=on_outcome, seed=3)
    runner.start()
    try:
        for i, stamp in enumerate([10 * DT_NS, 14 * DT_NS]):
            done.clear()
            runner.submit(PlanJob(random_obs(cfg, 30 + i), stamp))
            assert done.wait(30)
        assert [o[1] for o in outcomes] == [0, 0]
    finally:
        assert runner.stop()
