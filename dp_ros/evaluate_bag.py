"""Offline evaluation of a policy on recorded bags (``dp-ros eval-bag``).

For each bag, the observation windows are rebuilt in bag time with the aggregator's own
code (dp_ros.data.from_bags.BagObservations + dp_ros.control.window.WindowBuilder: the
windows obs_aggregator publishes when the bag is played with /clock). Within each
episode (the ``/episode`` topic; a bag without it is one episode) the policy plans at
the episode's first window and then every ``replan_every`` ticks (default: the
checkpoint's T_a), as the policy node does; when the due tick has no window (stale
stream, broken history) the plan is made at the next tick that has one, and the skip is
counted with its reason.

Each plan is ``seeded_predict(policy, window, seed, plan_stamp_ns)`` with the plan stamp
= the window's newest tick: exactly the plan policy_node publishes with parameter
``seed`` for the same window. Action index i of the plan belongs to time
``stamp + (i - (T_o - 1)) * dt`` and is compared with the recorded action of that tick
(dp_ros.data.from_bags.ActionTrack, the dataset's labels) inside the episode:

- ``first``: index T_o - 1 (the action for the present),
- ``executed``: the T_a steps from index T_o - 1 (what the robot would execute),
- ``horizon``: all T_p steps,

as per-joint MAE and RMSE in joint units (steps without a recorded action are left out).

Side (the demo task's mode, dp_ros.sim.task: the arm goes round the obstacle left or
right): the scripted expert picks the elbow branch by side (dp_ros.sim.expert.ELBOW:
right = elbow joint > 0). A plan's side is the sign of the largest excursion of
``SideRule.joint`` over the plan's executable part relative to that joint's value at the
episode's first tick; |excursion| < ``threshold`` leaves it undecided. The share counts
decided plans of labelled episodes.

This module never imports rclpy. Wall-clock readings (perf_counter) are only measured
latencies, never decisions.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dp_ros.control.observation import Invalid
from dp_ros.control.window import WindowBuilder
from dp_ros.data.bags import BagError, bag_error, open_bag
from dp_ros.data.from_bags import (ACTION_TYPES, ActionSource, BagObservations, ObsSource,
                                   ParamsError, load_sources, read_actions, read_episodes)
from dp_ros.policy.seeding import seeded_predict

PARTS = ("first", "executed", "horizon")


@dataclass(frozen=True)
class SideRule:
    """How a plan's side is read from it (defaults: the demo arm's elbow)."""

    joint: str = "joint_2"
    positive: str = "right"
    negative: str = "left"
    threshold: float = 0.2  # joint units

    def side(self, excursion: float) -> Optional[str]:
        if not math.isfinite(excursion) or abs(excursion) < self.threshold:
            return None
        return self.positive if excursion > 0 else self.negative


@dataclass
class Plan:
    episode: int
    label: Optional[str]
    stamp_ns: int
    predicted: np.ndarray   # (T_p, A)
    recorded: np.ndarray    # (T_p, A), NaN where no recorded action in the episode
    latency_s: float
    side: Optional[str] = None


@dataclass
class BagResult:
    bag: str
    storage: str = ""
    episodes: int = 0
    ticks: int = 0
    windows: int = 0
    plans: list = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)    # reason -> plan points skipped
    rejected: Counter = field(default_factory=Counter)   # "stream: cause" -> messages
    error: Optional[str] = None
    action_stamps_ns: Optional[np.ndarray] = None
    action_values: Optional[np.ndarray] = None


# ----------------------------------------------------------------------------- checks

def check_policy(cfg, obs: ObsSource, act: ActionSource) -> None:
    """ParamsError unless the checkpoint fits the aggregator's settings."""
    problems = []
    for cam in cfg.cameras:
        if cam.name not in obs.camera_names:
            problems.append(f"camera {cam.name!r} is not among the aggregator's camera_names "
                            f"{list(obs.camera_names)}")
        elif (cam.height, cam.width) != (obs.camera_height, obs.camera_width):
            problems.append(f"camera {cam.name!r} is {cam.height}x{cam.width}, aggregator "
                            f"produces {obs.camera_height}x{obs.camera_width}")
    if list(cfg.state_names) and len(cfg.state_names) != len(obs.state_joint_names):
        problems.append(f"state has {len(cfg.state_names)} values, aggregator "
                        f"state_joint_names {list(obs.state_joint_names)}")
    if len(cfg.action_names) != len(act.joint_names):
        problems.append(f"actions have {len(cfg.action_names)} values, action joints "
                        f"{list(act.joint_names)}")
    if cfg.T_o != obs.T_o:
        problems.append(f"T_o {cfg.T_o} != aggregator T_o {obs.T_o}")
    if abs(cfg.dt - obs.dt) > 1e-9:
        problems.append(f"dt {cfg.dt} != aggregator 1/rate_hz {obs.dt}")
    if problems:
        raise ParamsError("policy does not fit the configuration: " + "; ".join(problems))


# ----------------------------------------------------------------------------- one bag

def evaluate_bag(path, policy, obs: ObsSource, act: ActionSource, seed: int = 0,
                 remap: Optional[Mapping[str, str]] = None, start: Optional[float] = None,
                 end: Optional[float] = None, replan_every: Optional[int] = None,
                 side_rule: SideRule = SideRule(), progress: bool = False) -> BagResult:
    """Evaluate ``policy`` on one bag. ``start``/``end``: seconds from the bag's first
    message. Raises BagError (one line, naming the bag) for a bag that cannot be used."""
    cfg = policy.config
    T_o, T_p = cfg.T_o, cfg.T_p
    T_a = int(replan_every or cfg.T_a)
    dt_ns = obs.grid.dt_ns
    result = BagResult(bag=str(path))
    with open_bag(path, remap=remap) as bag:
        result.storage = bag.storage
        if bag.message_count == 0:
            raise bag_error(path, "empty bag (no messages)")
        walker = BagObservations(bag, obs)
        walker.check()
        bag.require({act.topic: ACTION_TYPES}, {act.topic: "action"})
        episodes, incomplete = read_episodes(bag, act.episode_topic)
        if incomplete:
            result.skipped["incomplete episodes (no end event)"] += incomplete
        start_ns = None if start is None else bag.start_ns + int(round(start * 1e9))
        stop_ns = None if end is None else bag.start_ns + int(round(end * 1e9))
        if start_ns is not None and stop_ns is not None and stop_ns <= start_ns:
            raise bag_error(path, f"--end {end} s is not after --start {start} s")
        lo = start_ns if start_ns is not None else bag.start_ns
        hi = stop_ns if stop_ns is not None else bag.end_ns + 1
        episodes = [e for e in episodes if e.end_ns >= lo and e.start_ns < hi]
        if not episodes:
            raise bag_error(path, "no complete episode" + (
                "" if start is None and end is None else " in the --start/--end range"))
        actions = read_actions(bag, act, obs.dt)
        if len(actions) == 0:
            raise bag_error(path, f"no usable action on {act.topic}")
        keep = (actions.stamps_ns >= lo) & (actions.stamps_ns < hi)
        result.action_stamps_ns = actions.stamps_ns[keep]
        result.action_values = actions.values[keep]
        try:
            side_index = list(obs.state_joint_names).index(side_rule.joint)
        except ValueError:
            side_index = None

        bar = None
        if progress:
            try:
                from tqdm import tqdm
                total = sum(bag.topics[t].count for t in walker.topics)
                bar = tqdm(total=total, unit="msg", desc=Path(path).name, file=sys.stderr,
                           leave=False)
            except ImportError:
                bar = None

        builder = WindowBuilder(T_o, obs.dt)
        ep_iter = iter(episodes)
        current = next(ep_iter, None)
        due_ns: Optional[int] = None      # next replanning tick in the current episode
        start_value: Optional[float] = None
        for tick_ns, ob in walker.ticks(progress=bar.update if bar else None,
                                        start_ns=start_ns, stop_ns=stop_ns):
            result.ticks += 1
            window = builder.push(tick_ns * 1e-9, ob)
            if window is not None:
                result.windows += 1
            while current is not None and tick_ns > current.end_ns:
                current, due_ns, start_value = next(ep_iter, None), None, None
            if current is None:
                break
            if tick_ns < current.start_ns:
                continue
            if due_ns is None:  # first tick of the episode
                result.episodes += 1
                due_ns = tick_ns
                if side_index is not None and not isinstance(ob, Invalid):
                    start_value = float(ob.state[side_index])
            if tick_ns < due_ns:
                continue
            if window is None:
                reason = (f"{ob.stream} {ob.cause}" if isinstance(ob, Invalid)
                          else "window history incomplete")
                result.skipped[f"plan points: {reason}"] += 1
                continue
            window = dict(window)
            window.pop("stamps", None)  # as policy_node: frames keyed by pixels
            t0 = time.perf_counter()
            predicted = seeded_predict(policy, window, seed, tick_ns)
            latency = time.perf_counter() - t0
            recorded = np.full((T_p, len(act.joint_names)), np.nan)
            for i in range(T_p):
                t = tick_ns + (i - (T_o - 1)) * dt_ns
                if current.start_ns <= t <= current.end_ns:
                    value = actions.at(t)
                    if value is not None:
                        recorded[i] = value
            side = None
            if side_index is not None and start_value is not None \
                    and side_index < predicted.shape[1]:
                excursion = predicted[T_o - 1:, side_index] - start_value
                side = side_rule.side(float(excursion[np.argmax(np.abs(excursion))]))
            result.plans.append(Plan(current.index, current.label, tick_ns,
                                     np.asarray(predicted, dtype=np.float64), recorded,
                                     latency, side))
            due_ns = tick_ns + T_a * dt_ns
            if bar is not None:
                bar.set_postfix(plans=len(result.plans))
        if bar is not None:
            bar.close()
        for (stream, cause), n in walker.rejected.items():
            result.rejected[f"{stream}: {cause}"] += n
    if not result.plans:
        raise bag_error(path, "no plan could be made (no valid window inside an episode; "
                              "skipped: " + (", ".join(f"{k}: {n}" for k, n in
                                                       sorted(result.skipped.items()))
                                             or "none") + ")")
    return result


# ----------------------------------------------------------------------------- metrics

def _part_slice(part: str, T_o: int, T_a: int, T_p: int) -> slice:
    if part == "first":
        return slice(T_o - 1, T_o)
    if part == "executed":
        return slice(T_o - 1, T_o - 1 + T_a)
    return slice(0, T_p)


def metrics(plans: Sequence[Plan], joint_names: Sequence[str], T_o: int, T_a: int,
            T_p: int) -> dict[str, Any]:
    """Per-part per-joint MAE/RMSE, side agreement and latency over ``plans``."""
    out: dict[str, Any] = {"plans": len(plans)}
    for part in PARTS:
        sl = _part_slice(part, T_o, T_a, T_p)
        if plans:
            err = np.concatenate([p.predicted[sl] - p.recorded[sl] for p in plans])
        else:
            err = np.zeros((0, len(joint_names)))
        entry = {"steps": int(np.sum(np.all(np.isfinite(err), axis=1)))}
        for name, fn in (("mae", lambda e: np.abs(e)), ("rmse", lambda e: e * e)):
            vals = []
            for j in range(len(joint_names)):
                e = err[:, j][np.isfinite(err[:, j])]
                if e.size == 0:
                    vals.append(None)
                    continue
                v = float(np.mean(fn(e)))
                vals.append(math.sqrt(v) if name == "rmse" else v)
            entry[name] = dict(zip(joint_names, vals))
            finite = [v for v in vals if v is not None]
            entry[name + "_mean"] = float(np.mean(finite)) if finite else None
        out[part] = entry
    labelled = [p for p in plans if p.label is not None]
    decided = [p for p in labelled if p.side is not None]
    matches = sum(p.side == p.label for p in decided)
    out["side"] = {"labelled_plans": len(labelled), "decided": len(decided),
                   "matches": matches,
                   "share": (matches / len(decided)) if decided else None}
    lat = np.array([p.latency_s for p in plans]) * 1e3
    out["latency_ms"] = ({"mean": float(lat.mean()), "p50": float(np.percentile(lat, 50)),
                          "p90": float(np.percentile(lat, 90)), "max": float(lat.max())}
                         if lat.size else None)
    return out


def bag_summary(result: BagResult, joint_names, T_o, T_a, T_p) -> dict[str, Any]:
    return {"bag": result.bag, "storage": result.storage, "episodes": result.episodes,
            "ticks": result.ticks, "windows": result.windows,
            "skipped": dict(sorted(result.skipped.items())),
            "rejected_messages": dict(sorted(result.rejected.items())),
            **metrics(result.plans, joint_names, T_o, T_a, T_p),
            "plan_list": [{"episode": p.episode, "label": p.label, "stamp_ns": p.stamp_ns,
                           "side": p.side, "latency_ms": p.latency_s * 1e3,
                           "predicted": p.predicted.tolist(),
                           "recorded": [[None if not math.isfinite(v) else v for v in row]
                                        for row in p.recorded.tolist()]}
                          for p in result.plans]}


# ----------------------------------------------------------------------------- output

def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: Sequence[dict], joint_names: Sequence[str]) -> list[str]:
    """Terminal table: one line per bag (and overall), MAE/RMSE mean over joints, plus
    per-joint executed MAE."""
    head = (f"{'bag':<24} {'plans':>5} {'first MAE':>9} {'exec MAE':>9} {'exec RMSE':>9} "
            f"{'hor MAE':>9} {'hor RMSE':>9} {'side':>9} {'lat ms':>7} {'skip':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        side = r["side"]
        side_s = "-" if side["share"] is None else f"{side['matches']}/{side['decided']}"
        lat = r["latency_ms"]
        lines.append(f"{Path(r['bag']).name[:24]:<24} {r['plans']:>5} "
                     f"{_fmt(r['first']['mae_mean']):>9} {_fmt(r['executed']['mae_mean']):>9} "
                     f"{_fmt(r['executed']['rmse_mean']):>9} "
                     f"{_fmt(r['horizon']['mae_mean']):>9} {_fmt(r['horizon']['rmse_mean']):>9} "
                     f"{side_s:>9} {_fmt(lat and lat['p50'], '.1f'):>7} "
                     f"{sum(r['skipped'].values()):>5}")
    lines.append("per joint (executed MAE / RMSE): " + "; ".join(
        f"{Path(r['bag']).name}: " + ", ".join(
            f"{j} {_fmt(r['executed']['mae'][j])}/{_fmt(r['executed']['rmse'][j])}"
            for j in joint_names) for r in rows))
    for r in rows:
        if r["skipped"]:
            lines.append(f"skipped in {Path(r['bag']).name}: " + ", ".join(
                f"{k}: {n}" for k, n in r["skipped"].items()))
    return lines


def plot(result: BagResult, joint_names, T_o: int, T_a: int, dt: float,
         out_dir: Path) -> list[Path]:
    """Per joint recorded vs predicted (executed part of each plan) over time, and a
    histogram of the executed-step errors. Returns the written files."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(result.bag).name
    t_ref = result.plans[0].stamp_ns if result.plans else 0
    files = []
    n = len(joint_names)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.4 * n), sharex=True, squeeze=False)
    for j, joint in enumerate(joint_names):
        ax = axes[j][0]
        if result.action_stamps_ns is not None and len(result.action_stamps_ns):
            ax.plot((result.action_stamps_ns - t_ref) * 1e-9, result.action_values[:, j],
                    color="black", lw=1.0, label="recorded")
        for k, p in enumerate(result.plans):
            idx = np.arange(T_o - 1, min(T_o - 1 + T_a, p.predicted.shape[0]))
            t = (p.stamp_ns - t_ref) * 1e-9 + (idx - (T_o - 1)) * dt
            ax.plot(t, p.predicted[idx, j], color="tab:orange", lw=1.2,
                    label="predicted (executed part)" if k == 0 else None)
        ax.set_ylabel(joint)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    axes[-1][0].set_xlabel("time since first plan (s)")
    fig.suptitle(f"{name}: recorded vs predicted")
    fig.tight_layout()
    f = out_dir / f"{name}_joints.png"
    fig.savefig(f, dpi=80)
    plt.close(fig)
    files.append(f)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    sl = _part_slice("executed", T_o, T_a, 0)
    for j, joint in enumerate(joint_names):
        e = np.concatenate([p.predicted[sl, j] - p.recorded[sl, j] for p in result.plans]) \
            if result.plans else np.zeros(0)
        e = e[np.isfinite(e)]
        if e.size:
            ax.hist(e, bins=40, alpha=0.6, label=joint)
    ax.set_xlabel("predicted - recorded (joint units), executed steps")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: error histogram")
    fig.tight_layout()
    f = out_dir / f"{name}_errors.png"
    fig.savefig(f, dpi=80)
    plt.close(fig)
    files.append(f)
    return files


# ----------------------------------------------------------------------------- CLI

def run(bags: Sequence[str], policy_path: str, config: str, seed: int = 0,
        remap: Optional[Mapping[str, str]] = None, start: Optional[float] = None,
        end: Optional[float] = None, out: Optional[Path] = None, plots: bool = True,
        progress: bool = True, replan_every: Optional[int] = None, device: str = "cpu",
        action_topic: Optional[str] = None, episode_topic: Optional[str] = None,
        stdout=None, stderr=None) -> tuple[int, dict]:
    """The whole ``eval-bag`` run: (exit code, report dict). Usage problems (policy,
    configuration) -> exit 2; any bad bag -> exit 1 after evaluating the others."""
    from dp_ros.policy import load_policy
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr

    def fail(msg: str) -> tuple[int, dict]:
        print(f"dp-ros eval-bag: {msg}", file=stderr)
        return 2, {}

    if seed < 0:
        return fail(f"--seed must be >= 0, got {seed}")
    try:
        obs, act = load_sources(config, action_topic=action_topic,
                                episode_topic=episode_topic)
    except (ParamsError, ValueError, OSError) as err:
        return fail(str(err))
    try:
        policy = load_policy(policy_path, device=device, seed=seed)
    except Exception as err:  # CheckpointError and friends: one line
        return fail(f"{policy_path}: cannot load policy ({type(err).__name__}: {err})"
                    .replace("\n", " "))
    cfg = policy.config
    try:
        check_policy(cfg, obs, act)
        if replan_every is not None and not 1 <= replan_every <= cfg.executable_horizon:
            raise ParamsError(f"--replan-every must be in [1, {cfg.executable_horizon}]")
    except ParamsError as err:
        return fail(f"{policy_path}: {err}")
    T_a = int(replan_every or cfg.T_a)
    joints = list(act.joint_names)
    results, rows, failed = [], [], []
    for path in bags:
        try:
            r = evaluate_bag(path, policy, obs, act, seed=seed, remap=remap, start=start,
                             end=end, replan_every=T_a, progress=progress)
        except BagError as err:
            msg = str(err).replace("\n", " ")
            failed.append({"bag": str(path), "error": msg})
            print(f"dp-ros eval-bag: {msg}", file=stderr)
            continue
        except Exception as err:  # never a traceback; name the bag and the problem
            msg = f"{path}: {type(err).__name__}: {err}".replace("\n", " ")
            failed.append({"bag": str(path), "error": msg})
            print(f"dp-ros eval-bag: {msg}", file=stderr)
            continue
        results.append(r)
        rows.append(bag_summary(r, joints, cfg.T_o, T_a, cfg.T_p))
    all_plans = [p for r in results for p in r.plans]
    overall = metrics(all_plans, joints, cfg.T_o, T_a, cfg.T_p)
    overall.update(bag="overall", skipped=dict(sum((r.skipped for r in results), Counter())))
    report = {"policy": str(policy_path), "policy_id": policy.policy_id, "config": str(config),
              "seed": seed, "T_o": cfg.T_o, "T_p": cfg.T_p, "T_a": T_a, "dt": cfg.dt,
              "joints": joints, "start": start, "end": end,
              "bags": rows, "overall": overall, "failed": failed}
    if rows:
        table_rows = rows + ([overall] if len(rows) > 1 else [])
        for line in table(table_rows, joints):
            print(line, file=stdout)
    if out is not None and rows:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        if plots:
            for r in results:
                written += plot(r, joints, cfg.T_o, T_a, obs.dt, out)
        (out / "eval.json").write_text(json.dumps(report, indent=1))
        written.append(out / "eval.json")
        print(f"wrote {', '.join(str(w) for w in written)}", file=stdout)
    if failed:
        print(f"dp-ros eval-bag: {len(failed)} of {len(bags)} bag(s) failed", file=stderr)
        return 1, report
    return 0, report


def main(args) -> int:
    """CLI entry for ``dp-ros eval-bag``."""
    from dp_ros.data.bags import parse_remap
    from dp_ros.paths import config_file
    try:
        remap = parse_remap(args.topics or [])
    except ValueError as err:
        print(f"dp-ros eval-bag: {err}", file=sys.stderr)
        return 2
    code, _ = run(args.bags, args.policy, str(config_file(args.config)), seed=args.seed,
                  remap=remap, start=args.start, end=args.end,
                  out=None if args.no_output else args.out, plots=not args.no_plots,
                  progress=not args.quiet, replan_every=args.replan_every,
                  device=args.device, action_topic=args.action_topic,
                  episode_topic=args.episode_topic)
    return code

