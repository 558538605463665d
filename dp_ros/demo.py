"""`dp-ros demo`: the whole path on the simulated arm, closed loop through ROS.

1. demonstrations: the scripted expert drives the simulated arm through ROS topics and
   ``dp-ros record-demos`` records them into a rosbag2 (cached);
2. dataset: the bag becomes an episode store with the aggregator's own observation code
   and parameters (``dp-ros dataset``; cached);
3. training: a small image + state diffusion policy on the CPU (config/train_demo.yaml;
   cached); ``--baseline`` also trains the MSE regression head on the same data;
4. evaluation: N held-out episodes through sim_arm + obs_aggregator + policy_node +
   trajectory_executor on real DDS topics (dp_ros.sim.closed_loop): per-episode results,
   a summary table, a PNG of the executed end-effector paths over the scene and a GIF
   of one episode.

Everything cached lives in ``dp_ros.paths.cache_dir()/demo``; ``--fresh`` rebuilds it.
``--policy CKPT`` skips 1-3 and evaluates that checkpoint. The demo's ROS traffic stays
on this machine, on a DDS domain of its own, so it cannot reach a real robot.

``synthesize_store`` makes the same kind of store without ROS (the expert rolled out on
the arm model, frames rendered, observations built with the aggregator's functions): the
test suite uses it to train quickly.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from .paths import cache_dir, config_file

PARAMS_FILE = "demo_robot.yaml"
TRAIN_CONFIG = "train_demo.yaml"
DEMONSTRATIONS = 100       # expert episodes recorded for training
EVAL_SEED = 10_000         # evaluation seeds start here: never among the training seeds
DEMO_DOMAIN = 197          # DDS domain of the demo's closed loop (localhost only)


def _say(text: str = "") -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- parameters

# ----------------------------------------------------------------------------- demonstrations

def synthesize_store(out: str | os.PathLike, episodes: int, seed: int = 0,
                     params_file: str | os.PathLike = PARAMS_FILE,
                     overwrite: bool = True, progress: bool = False):
    """Expert demonstrations without ROS, into a new episode store.

    What ``record-demos`` + ``dataset`` produce, computed directly: the expert's plan
    for episode ``seed + 1 + k`` (as the recorder numbers them) is sent as position
    commands on the tick grid after a settle time at rest; the arm model steps at the
    joint-state rate, the camera renders at its rate, and every sample goes through the
    aggregator's ObservationStreams with the aggregator's parameters from
    ``params_file`` (resize, joints, staleness). Action of tick t = the command of t."""
    from .control.observation import ObservationSpec, ObservationStreams
    from .data.store import EpisodeStore
    from .sim.arm import ArmGeometry, SimulatedArm
    from .sim.expert import ExpertConfig, ScriptedExpert
    from .sim.render import render_scene, view_for
    from .sim.task import sample_episode

    sections = {k: (v or {}).get("ros__parameters", {}) for k, v in
                (yaml.safe_load(config_file(str(params_file)).read_text()) or {}).items()}
    sim, agg = sections.get("sim_arm", {}), sections.get("obs_aggregator", {})
    geometry = ArmGeometry(link_lengths=tuple(sim.get("link_lengths", (0.5, 0.5))),
                           max_velocity=float(sim.get("max_joint_velocity", 2.0)))
    view = view_for(geometry, int(sim.get("camera_width", 96)), int(sim.get("camera_height", 96)))
    js_period = 1.0 / float(sim.get("joint_state_rate_hz", 100.0))
    cam_period = 1.0 / float(sim.get("camera_rate_hz", 30.0))
    dt = 1.0 / float(agg.get("rate_hz", 10.0))
    camera = (agg.get("camera_names") or ["image"])[0]
    joints = list(agg.get("state_joint_names") or geometry.joint_names)
    spec = ObservationSpec((camera,), tuple(joints), int(agg.get("camera_height", 96)),
                           int(agg.get("camera_width", 96)),
                           float(agg.get("camera_staleness", 0.1)),
                           float(agg.get("state_staleness", 0.1)))
    store = EpisodeStore.create(out, {camera: (spec.image_height, spec.image_width)}, joints,
                                geometry.joint_names, dt, overwrite=overwrite)
    expert = ScriptedExpert(geometry, ExpertConfig(dt=dt), seed=seed)
    settle_ticks = int(math.ceil(0.5 / dt))
    steps_per_tick = max(1, int(round(dt / js_period)))
    h = dt / steps_per_tick
    bar = _bar(episodes, "demonstrations") if progress else None
    for k in range(episodes):
        episode = sample_episode(seed + 1 + k, geometry)
        plan = expert.plan(episode)
        arm = SimulatedArm(geometry, episode.start_positions)
        arm.reset(episode.start_positions, now=0.0)
        streams = ObservationStreams(spec)
        images, states, actions, stamps = [], [], [], []
        next_frame = 0.0
        n_ticks = settle_ticks + len(plan.positions)
        for tick in range(n_ticks):
            j = tick - settle_ticks
            command = plan.positions[min(max(j, 0), len(plan.positions) - 1)]
            for s in range(steps_per_tick):
                t = tick * dt + s * h
                if s == 0 and j >= 0:
                    arm.command_positions(command, t)
                q = arm.step(t).positions
                streams.push_state(t, geometry.joint_names, q)
                if t >= next_frame - 1e-9:
                    streams.push_image(camera, t, render_scene(geometry, q, episode, view),
                                       "rgb8")
                    next_frame += cam_period
                if s == 0 and j >= 0:
                    obs = streams.observe(t)
                    images.append(obs.images[camera])
                    states.append(obs.state)
                    actions.append(command)
                    stamps.append(t)
        store.add_episode({camera: np.stack(images)}, np.stack(states), np.stack(actions),
                          np.asarray(stamps), label=plan.side)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return store


def _bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="episode", file=sys.stderr, dynamic_ncols=True)


def record_demonstrations(bag: Path, store: Path, episodes: int, params: Path,
                          seed: int = 0) -> None:
    """Steps 1-2: record the expert through ROS into ``bag``, then build ``store`` from it
    with the aggregator's code and the parameters in ``params``."""
    from .data.from_bags import build_dataset
    from .record_demos import record_demos

    if not (bag / "metadata.yaml").exists():
        shutil.rmtree(bag, ignore_errors=True)
        _say(f"[1/4] recording {episodes} expert demonstrations on the simulated arm -> {bag}")
        summary = record_demos(bag, episodes, seed=seed, config=str(params), overwrite=True)
        _say(f"      {summary.episodes} episodes ({summary.left} left, {summary.right} right) "
             f"in {summary.wall_seconds:.0f} s")
    else:
        _say(f"[1/4] using cached demonstrations {bag}")
    _say(f"[2/4] dataset (the aggregator's observation code, {params.name}) -> {store}")
    summary = build_dataset([bag], params, store, overwrite=True)
    for line in summary.lines():
        _say(f"      {line}")


# ----------------------------------------------------------------------------- training

def train_policy(store: Path, run_dir: Path, head: str = "diffusion",
                 train_config: str | os.PathLike = TRAIN_CONFIG,
                 minutes: Optional[float] = None, progress: bool = True,
                 threads: Optional[int] = None) -> Path:
    """Train ``train_config`` (with ``head``) on ``store``; returns the checkpoint."""
    import torch

    from .policy.train import load_train_config, train

    torch.set_num_threads(threads or _threads())
    policy_cfg, train_cfg = load_train_config(config_file(str(train_config)))
    policy_cfg = dict(policy_cfg, head=head, policy_id=f"demo-{head}")
    if minutes is not None:
        train_cfg.max_minutes = minutes
    shutil.rmtree(run_dir, ignore_errors=True)
    return train(store, (policy_cfg, train_cfg), run_dir, resume=False, progress=progress)


def _threads() -> int:
    """Intra-op threads: one per two cores (measured on 2 cores under load, two threads
    were several times slower than one)."""
    return max(1, (os.cpu_count() or 2) // 2)


# ----------------------------------------------------------------------------- reporting

def episode_line(r) -> str:
    if r.success:
        outcome = f"success  {r.side:<5}  {r.time:5.1f} s"
    else:
        why = "collision" if r.collision else "time limit"
        outcome = f"FAILED   {(r.side or '-'):<5}  {why}"
    switch = "  side switch" if r.switched_sides else ""
    return f"  {r.index + 1:3d}  seed {r.seed:<6d} {outcome}{switch}"


def summary_table(results: Sequence, labels: Sequence[str]) -> str:
    w = max([6] + [len(label) for label in labels])
    head = (f"  {'policy':<{w}} {'success':>8} {'left':>6} {'right':>6} {'collisions':>10} "
            f"{'switches':>8} {'plan ms (median/p99)':>21} {'jump rad/s (mean/max)':>22}")
    rows = [head, "  " + "-" * (len(head) - 2)]
    for label, res in zip(labels, results):
        s = res.summary()
        lat = (f"{s['plan_latency_median_ms']:.0f} / {s['plan_latency_p99_ms']:.0f}"
               if s["plan_latency_median_ms"] is not None else "-")
        jump = (f"{s['switch_jump_mean']:.3f} / {s['switch_jump_max']:.3f}"
                if s["switch_jump_mean"] is not None else "-")
        rows.append(f"  {label:<{w}} {100 * s['success_rate']:7.0f}% {100 * s['left']:5.0f}% "
                    f"{100 * s['right']:5.0f}% {s['collisions']:>10d} {s['side_switches']:>8d} "
                    f"{lat:>21} {jump:>22}")
    return "\n".join(rows)


def plot_paths(result, path: Path, title: str = "", geometry=None) -> Path:
    """PNG: every episode's executed end-effector path over the scene (obstacles and
    goals of all episodes, lightly), coloured by outcome and side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Rectangle

    from .sim.arm import ArmGeometry

    geometry = geometry or ArmGeometry()
    reach = geometry.reach
    fig, ax = plt.subplots(figsize=(6.4, 6.4), dpi=110)
    ax.set_facecolor((0.94, 0.94, 0.92))
    ax.add_patch(Circle((0, 0), reach, fill=False, ls=":", color="0.6", lw=0.8))
    for r in result.episodes:
        ep = r.episode
        ax.add_patch(Circle(ep.obstacle, ep.obstacle_radius, color=(0.84, 0.14, 0.14),
                            alpha=0.12, lw=0))
        ax.add_patch(Circle(ep.goal, ep.goal_radius, color=(0.16, 0.75, 0.27), alpha=0.10,
                            lw=0))
    ax.add_patch(Rectangle((-0.035, -0.035), 0.07, 0.07, color="0.45"))
    colours = {"left": (0.12, 0.31, 0.82), "right": (0.95, 0.55, 0.0)}
    seen = set()
    for r in result.episodes:
        if len(r.ee) < 2:
            continue
        if r.success:
            key, colour, style = f"success ({r.side})", colours.get(r.side, "k"), "-"
        else:
            key, colour, style = "failure", (0.8, 0.0, 0.0), "--"
        ax.plot(r.ee[:, 0], r.ee[:, 1], style, color=colour, lw=1.3, alpha=0.85,
                label=None if key in seen else key)
        seen.add(key)
        ax.plot(r.ee[0, 0], r.ee[0, 1], "o", color="0.2", ms=2.5)
    lim = 1.1 * reach
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    s = result.summary()
    ax.set_title(title or f"{s['policy']}: {100 * s['success_rate']:.0f}% success over "
                          f"{s['episodes']} episodes ({100 * s['left']:.0f}% left, "
                          f"{100 * s['right']:.0f}% right)", fontsize=10)
    if seen:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_gif(record, path: Path, geometry=None, size: int = 240, fps: float = 10.0) -> Path:
    """GIF of one episode: the scene re-rendered from the recorded joint states (the
    camera's view, larger) with the end-effector trail."""
    from PIL import Image

    from .sim.arm import ArmGeometry
    from .sim.render import draw_path, render_scene, view_for

    geometry = geometry or ArmGeometry()
    view = view_for(geometry, size, size)
    t, q = record.joint_times, record.joints
    if len(t) == 0:
        raise ValueError("the episode has no recorded joint states")
    frames = []
    for ft in np.arange(0.0, t[-1] + 1e-9, 1.0 / fps):
        i = min(int(np.searchsorted(t, ft, side="right")) - 1, len(t) - 1)
        img = render_scene(geometry, q[max(i, 0)], record.episode, view)
        trail = record.ee[record.times <= ft]
        if len(trail) >= 2:
            draw_path(img, view, trail, (255, 120, 0), 1)
        frames.append(Image.fromarray(img))
    frames += [frames[-1]] * int(fps)  # hold the last frame for a second
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:],
                   duration=int(round(1000 / fps)), loop=0, optimize=True)
    return path


def evaluate(policy: Path, episodes: int, label: str, params: Path, speed: float,
             seed: int = EVAL_SEED, time_limit: Optional[float] = None,
             warm_start_steps: int = 0, warm_start_keep_steps: int = 0):
    from .sim.closed_loop import run_closed_loop

    _say(f"\n  {label}: {episodes} episodes closed loop through ROS (sim_arm, obs_aggregator, "
         f"policy_node, trajectory_executor), seeds {seed}..{seed + episodes - 1}")
    return run_closed_loop(policy, episodes=episodes, seed=seed, params_file=params,
                           speed=speed, time_limit=time_limit, domain_id=DEMO_DOMAIN,
                           overrides={"policy_node": {
                               "warm_start_steps": warm_start_steps,
                               "warm_start_keep_steps": warm_start_keep_steps}},
                           on_episode=lambda r: _say(episode_line(r)))


# ----------------------------------------------------------------------------- the demo

def run_demo(episodes: int = 20, policy: Optional[str] = None, fresh: bool = False,
             demos: int = DEMONSTRATIONS, baseline: bool = False, speed: float = 2.0,
             minutes: Optional[float] = None, out: Optional[str] = None,
             warm_start_steps: Sequence[int] = (), warm_start_keep_steps: int = 0) -> int:
    # the demo's DDS traffic stays on this host (set before rclpy is initialised)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    started = time.monotonic()
    cache = cache_dir() / "demo"
    results_dir = Path(out) if out else cache / "results"
    if fresh and policy is None:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    params = config_file(PARAMS_FILE)
    policies: list[tuple[str, Path]] = []
    if policy is not None:
        ckpt = Path(policy).expanduser()
        if not (ckpt / "config.json").exists():
            _say(f"dp-ros demo: {ckpt} is not a checkpoint directory (no config.json)")
            return 2
        _say(f"evaluating {ckpt} (skipping demonstrations and training)")
        policies.append((ckpt.name, ckpt))
    else:
        bag, store = cache / "demos_bag", cache / "demos.zarr"
        if not (store / ".zgroup").exists() and not (store / "zarr.json").exists():
            record_demonstrations(bag, store, demos, params)
        else:
            _say(f"[1/4] [2/4] using cached demonstrations {store} (--fresh re-records)")
        heads = ["diffusion"] + (["regression"] if baseline else [])
        for head in heads:
            run_dir = cache / f"policy_{head}"
            ckpt = run_dir / "latest"
            if not (ckpt / "model.safetensors").exists():
                _say(f"[3/4] training the {head} policy ({TRAIN_CONFIG}) on the CPU -> {run_dir}")
                t0 = time.monotonic()
                ckpt = train_policy(store, run_dir, head, minutes=minutes)
                _say(f"      trained in {time.monotonic() - t0:.0f} s")
            else:
                _say(f"[3/4] using cached {head} policy {ckpt} (--fresh retrains)")
            policies.append((f"{head} ({TRAIN_CONFIG})", ckpt))
    # the diffusion policy again with each warm start (the policy node's warm_start_steps)
    # (label, checkpoint, warm_start_steps, warm_start_keep_steps)
    runs = [(label, ckpt, 0, 0) for label, ckpt in policies]
    keep = warm_start_keep_steps
    runs += [(f"{policies[0][0]}, warm start {n}" + (f", keep {keep}" if keep else ""),
              policies[0][1], n, keep) for n in warm_start_steps if n > 0]
    _say(f"[4/4] closed-loop evaluation at up to {speed:g}x real time")
    results = []
    for label, ckpt, warm, kept in runs:
        res = evaluate(ckpt, episodes, label, params, speed, warm_start_steps=warm,
                       warm_start_keep_steps=kept)
        results.append(res)
        stem = Path(ckpt).parent.name if Path(ckpt).name == "latest" else Path(ckpt).name
        stem += (f"_warm{warm}" if warm else "") + (f"_keep{kept}" if kept else "")
        png = plot_paths(res, results_dir / f"{stem}_paths.png")
        shown = next((r for r in res.episodes if r.success), res.episodes[0])
        gif = write_gif(shown, results_dir / f"{stem}_episode.gif")
        _say(f"  paths: {png}\n  episode {shown.index + 1} (seed {shown.seed}): {gif}")
    _say("\nsummary (success = goal reached within the time limit without touching the "
         "obstacle; left/right: share of episodes that succeeded on that side;\n"
         "switches: episodes that changed sides after committing to one; plan ms: "
         "inference wall time per plan;\njump: largest change of the executor's commanded "
         "velocity at each plan switch)")
    _say(summary_table(results, [label for label, *_ in runs]))
    _say(f"\ndone in {time.monotonic() - started:.0f} s; cached in {cache}")
    return 0
