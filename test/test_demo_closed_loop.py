"""The demo robot closed loop through real DDS (issue 4, "What must be shown").

A diffusion policy and the MSE regression baseline (same encoder, same data, same
config/train_demo.yaml except ``head``) are trained on 100 expert demonstrations of the
simulated task, then the diffusion policy runs 20 held-out seeded episodes (the baseline
10) through sim_arm + obs_aggregator + policy_node (its own process) + trajectory_executor
on DDS topics, under a simulated clock (dp_ros.sim.closed_loop). Shown:

- the diffusion policy succeeds in >= 90% of the episodes, using both ways round the
  obstacle (each >= 25% of the episodes);
- the regression baseline scores at least 30 points lower: it averages the two modes;
- mode commitment: no diffusion episode changes sides once the end effector is clearly
  on one side of the start -> goal axis.
- warm start keeping the running plan's next steps (warm_start_steps 3,
  warm_start_keep_steps 3, WARM_EPISODES episodes): as successful, faster plans, and a
  smaller velocity jump at plan switches than cold plans.

The demonstrations are made without ROS (dp_ros.demo.synthesize_store: the expert on the
arm model, observations built by the aggregator's functions with the demo robot's
parameters) because recording 100 episodes through the topics takes minutes.
test_synthesized_demos_equal_recorded_bag_dataset shows that this is the very data
`dp-ros record-demos` + `dp-ros dataset` produce. Both policies use
the same 10 s limit per episode (the expert needs about 6 s).

Budget (2 cores, nothing else running): demonstrations ~20 s, both trainings in
parallel ~1-2 min, evaluation ~1.5 min (diffusion) and ~1 min (baseline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from conftest import fresh_domain_id  # noqa: E402
from dp_ros.demo import (PARAMS_FILE,  # noqa: E402
                         summary_table, synthesize_store)
from dp_ros.paths import config_file  # noqa: E402
from dp_ros.sim.closed_loop import run_closed_loop  # noqa: E402

pytestmark = pytest.mark.ros

DEMOS = 100
EPISODES = 20
BASELINE_EPISODES = 10  # it fails nearly always: 10 episodes show the 30-point gap
WARM_EPISODES = 10      # the jump's margin is an order of magnitude (README: 0.028 -> <0.001)
EVAL_SEED = 10_000      # training episodes are seeds 1..DEMOS
TIME_LIMIT = 10.0       # s of sim time per episode, from enabling the executor
TIMINGS: dict[str, float] = {}


def _train_process(store: Path, out: Path, head: str) -> subprocess.Popen:
    code = ("import sys; from pathlib import Path; from dp_ros.demo import train_policy; "
            "print(train_policy(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], "
            "progress=False, threads=1))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, str(store), str(out), head], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("closed_loop")
    t0 = time.monotonic()
    params = config_file(PARAMS_FILE)  # the demo robot's aggregator makes train_demo's frames
    store = synthesize_store(root / "demos.zarr", DEMOS, seed=0, params_file=params)
    labels = store.episode_labels
    TIMINGS["demonstrations"] = time.monotonic() - t0
    assert 0.3 <= labels.count("left") / DEMOS <= 0.7  # the expert uses both sides
    t0 = time.monotonic()
    # one process per policy: on 2 cores the two trainings run side by side
    procs = {head: _train_process(root / "demos.zarr", root / head, head)
             for head in ("diffusion", "regression")}
    for head, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"training {head} failed:\n{out}"
    TIMINGS["training (both, in parallel)"] = time.monotonic() - t0
    return {head: root / head / "latest" for head in procs}


def _evaluate(policy: Path, name: str, speed: float, episodes: int, overrides=None):
    t0 = time.monotonic()
    result = run_closed_loop(policy, episodes=episodes, seed=EVAL_SEED, speed=speed,
                             time_limit=TIME_LIMIT, domain_id=fresh_domain_id(),
                             overrides=overrides)
    TIMINGS[f"closed loop {name}"] = time.monotonic() - t0
    (policy.parent / f"closed_loop_{name.replace(' ', '_')}.json").write_text(result.to_json())
    print(f"\n{name}:\n" + "\n".join(
        f"  seed {r.seed}: {'success' if r.success else 'FAILED'} {r.side} "
        f"{'' if r.time is None else f'{r.time:.1f} s'}"
        f"{' collision' if r.collision else ''}{' SIDE SWITCH' if r.switched_sides else ''}"
        for r in result.episodes))
    print(summary_table([result], [name]))
    print(json.dumps({k: round(v, 1) for k, v in TIMINGS.items()}))
    return result


@pytest.fixture(scope="module")
def diffusion(policies):
    return _evaluate(policies["diffusion"], "diffusion", speed=2.0, episodes=EPISODES)


@pytest.fixture(scope="module")
def warm_kept(policies):
    # real time: the kept prefix covers a plan that arrives within about 0.2 s of its stamp.
    # At 2x, sim latency is twice the wall latency and the clock slows only past 0.3 s
    # (closed_loop.AGE_BUDGET): a machine running at half speed (cold plans 103 instead of
    # 57 ms) put many plans past the prefix, and the jump was cut by 44 % instead of 15x
    return _evaluate(policies["diffusion"], "diffusion, warm start 3, keep 3", speed=1.0,
                     episodes=WARM_EPISODES, overrides={"policy_node": {
                         "warm_start_steps": 3, "warm_start_keep_steps": 3}})


@pytest.fixture(scope="module")
def regression(policies):
    # plans take milliseconds: the clock may run faster
    return _evaluate(policies["regression"], "regression", speed=4.0,
                     episodes=BASELINE_EPISODES)


def test_synthesized_demos_equal_recorded_bag_dataset(tmp_path):
    """3 episodes recorded through ROS into a bag, turned into a store by the dataset
    builder, equal synthesize_store's episodes exactly (frames, states, actions, labels)."""
    import numpy as np

    from dp_ros.data.from_bags import build_dataset
    from dp_ros.record_demos import record_demos

    params = config_file(PARAMS_FILE)
    record_demos(tmp_path / "bag", 3, seed=5, config=str(params), progress=False)
    build_dataset([tmp_path / "bag"], params, tmp_path / "bag.zarr")
    from dp_ros.data.store import EpisodeStore
    recorded = EpisodeStore.open(tmp_path / "bag.zarr")
    synthesized = synthesize_store(tmp_path / "synth.zarr", 3, seed=5, params_file=params)
    assert recorded.n_episodes == synthesized.n_episodes == 3
    assert recorded.episode_labels == synthesized.episode_labels
    for i in range(3):
        a, b = recorded.episode(i), synthesized.episode(i)
        assert np.array_equal(a["state"], b["state"])
        assert np.array_equal(a["action"], b["action"])
        for cam in a["images"]:
            assert np.array_equal(a["images"][cam], b["images"][cam])


@pytest.mark.slow
def test_diffusion_policy_succeeds_on_both_sides(diffusion):
    s = diffusion.summary()
    assert diffusion.n == EPISODES
    assert s["success_rate"] >= 0.9, s
    assert s["left"] >= 0.25 and s["right"] >= 0.25, s
    assert s["collisions"] <= 2, s


@pytest.mark.slow
def test_diffusion_policy_commits_to_one_side(diffusion):
    # sides are judged from the line through the start (closed_loop.switched_sides); from
    # the base -> goal axis, about 1 episode in 100 was flagged for a hesitation of a few
    # cm at a start already ~0.12 m off that axis
    switched = [r.seed for r in diffusion.episodes if r.switched_sides]
    assert not switched, f"episodes that changed sides after committing: seeds {switched}"
    for r in diffusion.episodes:
        if r.success:
            # the side the sim saw at the obstacle is the side the path committed to
            assert r.side in ("left", "right")
            assert len(r.ee) > 10


@pytest.mark.slow
def test_regression_baseline_is_at_least_30_points_worse(diffusion, regression):
    d, r = diffusion.success_rate, regression.success_rate
    print(summary_table([diffusion, regression], ["diffusion", "regression (MSE)"]))
    assert regression.n == BASELINE_EPISODES
    assert r <= d - 0.30, f"diffusion {d:.0%}, regression {r:.0%}"


@pytest.mark.slow
def test_warm_start_keeping_the_running_plan_cuts_latency_and_the_switch_jump(diffusion, warm_kept):
    cold, warm = diffusion.summary(), warm_kept.summary()
    print(summary_table([diffusion, warm_kept], ["cold", "warm start 3, keep 3"]))
    assert warm_kept.n == WARM_EPISODES
    assert warm["success_rate"] >= 0.9, warm
    assert not [r.seed for r in warm_kept.episodes if r.switched_sides]
    assert warm["plan_latency_median_ms"] < cold["plan_latency_median_ms"], (cold, warm)
    assert warm["switch_jump_mean"] < 0.5 * cold["switch_jump_mean"], (cold, warm)
