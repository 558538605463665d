"""`dp-ros demo`: generate demonstrations, train a small policy on the CPU, sample plans.

At this stage the demo runs open loop on a generated point-mass task: it shows the whole
training path and the inference API, and that the policy's plans commit to one of the two
ways around the obstacle instead of averaging them.
"""

from __future__ import annotations

import shutil
import statistics
import time

import numpy as np

from .data import synthetic
from .data.store import EpisodeStore
from .paths import cache_dir, config_file
from .policy import load_policy
from .policy.train import load_train_config, train


def run_demo(fresh: bool = False, minutes: float = 1.0, episodes: int = 40, samples: int = 20) -> int:
    cache = cache_dir()
    store_path, run_dir = cache / "synthetic.zarr", cache / "demo_policy"
    if fresh:
        shutil.rmtree(store_path, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    if not (store_path / "zarr.json").exists() and not (store_path / ".zgroup").exists():
        print(f"[1/3] generating {episodes} demonstrations -> {store_path}")
        synthetic.make_synthetic_store(store_path, episodes=episodes, seed=0, overwrite=True)
    else:
        print(f"[1/3] using cached demonstrations {store_path}")
    store = EpisodeStore.open(store_path)
    labels = store.episode_labels
    print(f"      {store.n_episodes} episodes, {store.n_steps} ticks, "
          f"{labels.count('left')} left / {labels.count('right')} right")

    checkpoint = run_dir / "latest"
    if not (checkpoint / "model.safetensors").exists():
        print(f"[2/3] training a small policy for up to {minutes:g} min on the CPU -> {run_dir}")
        policy_cfg, train_cfg = load_train_config(config_file("train_small.yaml"))
        train_cfg.max_minutes = minutes
        checkpoint = train(store_path, (policy_cfg, train_cfg), run_dir)
    else:
        print(f"[2/3] using cached policy {checkpoint} (--fresh retrains)")

    policy = load_policy(checkpoint, seed=0)
    cfg = policy.config
    print(f"[3/3] sampling plans with {policy.policy_id} on {policy.device}: T_o={cfg.T_o} "
          f"T_p={cfg.T_p} T_a={cfg.T_a} dt={cfg.dt}s, {cfg.schedule.sampler.upper()} "
          f"{cfg.schedule.num_inference_steps} steps")
    ep = store.episode(0)
    obs = {"images": {n: ep["images"][n][:cfg.T_o] for n in cfg.camera_names},
           "state": ep["state"][:cfg.T_o]}
    plan = policy.predict(obs)
    demo_actions = ep["action"][:cfg.T_p]
    print("\n  k   time   plan x   plan y   demo x   demo y")
    for k in range(cfg.T_o - 1, cfg.T_p):
        t = (k - (cfg.T_o - 1)) * cfg.dt
        print(f"{k:3d} {t:6.1f} {plan[k, 0]:8.3f} {plan[k, 1]:8.3f} {demo_actions[k, 0]:8.3f} {demo_actions[k, 1]:8.3f}")

    # the same first window, different initial noise: a multimodal policy picks a side per plan
    latency, sides = [], []
    for _ in range(samples):
        t0 = time.perf_counter()
        p = policy.predict(obs)
        latency.append((time.perf_counter() - t0) * 1e3)
        sides.append("left" if p[-1, 0] < obs["state"][-1, 0] - 0.02 else
                     "right" if p[-1, 0] > obs["state"][-1, 0] + 0.02 else "middle")
    print(f"\nplan latency over {samples} plans: median {statistics.median(latency):.1f} ms, "
          f"p90 {np.percentile(latency, 90):.1f} ms")
    print(f"plans from the first window heading left / right / straight: "
          f"{sides.count('left')} / {sides.count('right')} / {sides.count('middle')}")
    return 0
