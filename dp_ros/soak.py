"""`dp-ros soak --minutes N`: run the node pipeline for a long time and check it stays sound.

Setup (the driver of `dp-ros bench ros`, dp_ros.bench.ros.Pipeline): a sensor process
publishes 2 cameras of 640x480 rgb8 at 30 Hz and joint states at 500 Hz; obs_aggregator,
policy_node and trajectory_executor (joint_trajectory output) each run in their own process
as `dp-ros up` starts them; this process records plans, commands and /diagnostics.
Policy: `--policy PATH`, else the demo policy when `dp-ros demo` has cached one, else a
small generated 2-camera policy (the summary says which). The policy is loaded through
the allow-list (`policy_dir` = its parent directory).

Figures and criteria (exit code 1 when one fails):
- resident memory (VmRSS from /proc/<pid>/status, sampled every second) of every node
  process: median of the first 10% of the measurement (after warm-up) against the median
  of the last 10%; growth must stay below 5%;
- queues: the aggregator's per-stream sample buffers, the policy node's pending window
  parts and the executor's held plans, read from /diagnostics (every 0.5 s): the largest
  size in each half of the measurement is printed; bounded = never above the queue's hard
  bound (QUEUE_BOUNDS; the 500 Hz joint-state buffer also ages out samples older than the
  aggregator's horizon, so it stays far below). DDS queues are keep-last with a fixed
  depth (QoS) and cannot grow;
- dropped windows: a window is dropped only when a newer one replaces it while it waits
  for the policy worker. During an inference of L seconds at most ceil(L/dt) windows
  arrive and the last of them is kept, so at most sum over plans of max(0, ceil(L_i/dt)-1)
  drops are made necessary by inference time (L_i from the policy node's diagnostics;
  plans whose latency was not seen count with the largest latency seen). Dropped must
  not exceed that;
- safety contract (README "Safety contract", clauses 1-3) over every command, checked by
  dp_ros.control.contract.ContractChecker with the executor's source timestamps: zero.
Writes soak.json and soak_rss.png to --out.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dp_ros.bench import ros as bench

WIDTH, HEIGHT = 640, 480
COMMAND_TOPIC = "/soak/commands"
LIMIT = 3.0          # position limits +-LIMIT (the source's joint states stay within +-0.3)
MAX_VELOCITY = 2.0
LEAD = 0.02
STALE = 1.0
RSS_GROWTH_LIMIT = 0.05
CONTRACT_TIME_TOL = 0.1  # s: source timestamp vs the executor's clock reading (see contract.py)
CONTRACT_SLACK = 0.2     # s: plan arrival here vs at the executor
# s: plans and commands fed to the checker in time order (TimeOrdered), by their publish
# times: a reliable sample lost under the image load is resent seconds later (Fast DDS
# heartbeats), so the recorder may get a plan long after the executor did
REORDER_LAG = 4.0
CLOCK_JUMP = 5.0         # s: the system clock does not jump; out-of-order delivery does
# hard bounds of the queues the nodes report (bounded = never above them):
QUEUE_BOUNDS = {"buffered": 2048,            # StreamBuffer capacity (control/streams.py)
                "pending_window_stamps": 8,  # WindowJoiner.max_pending (nodes/window_msgs.py)
                "plans_held": 2}             # active plan + the one cross-faded from


def demo_policy() -> Optional[Path]:
    from dp_ros.paths import cache_dir
    ckpt = cache_dir() / "demo" / "policy_diffusion" / "latest"
    return ckpt if (ckpt / "model.safetensors").is_file() else None


def choose_policy(policy: Optional[str], tmp: Path) -> tuple[Path, str]:
    if policy:
        return Path(policy).expanduser().resolve(), f"given: {policy}"
    cached = demo_policy()
    if cached is not None:
        return cached.resolve(), f"the cached demo policy {cached}"
    path = bench.write_bench_policy(tmp / "policies" / "soak_policy")
    return path, ("a small generated 2-camera policy (no demo policy cached: run "
                  "`dp-ros demo` to soak the demo policy)")


def soak_parameters(policy: Path, cameras: list[str], joints: list[str], cam_hw: tuple[int, int],
                    T_o: int, rate_hz: float) -> dict:
    return {
        "obs_aggregator": {"ros__parameters": {
            "camera_names": cameras, "camera_topics": [f"/bench/{c}/image_raw" for c in cameras],
            "compressed": [False] * len(cameras), "camera_height": cam_hw[0],
            "camera_width": cam_hw[1], "joint_states_topic": "/bench/joint_states",
            "state_joint_names": list(joints), "rate_hz": rate_hz, "T_o": T_o,
            "camera_staleness": 0.1, "state_staleness": 0.05, "diagnostics_period": 0.5}},
        "policy_node": {"ros__parameters": {
            "policy_path": str(policy), "policy_dir": str(policy.parent), "device": "cpu",
            "joint_names": list(joints), "diagnostics_period": 0.1}},
        "trajectory_executor": {"ros__parameters": {
            "joint_names": list(joints), "joint_states_topic": "/bench/joint_states",
            "output_mode": "joint_trajectory", "command_topic": COMMAND_TOPIC,
            "position_lower": [-LIMIT] * len(joints), "position_upper": [LIMIT] * len(joints),
            "max_velocity": MAX_VELOCITY, "actuation_lead": LEAD, "stale_plan_timeout": STALE,
            "autostart": True, "diagnostics_period": 0.5}},
    }


@dataclass
class SoakRecorder:
    """Plans, commands (into the contract checker) and diagnostics of the running nodes."""

    checker: object
    lock: threading.Lock = field(default_factory=threading.Lock)
    plans: int = 0
    commands: int = 0
    diag: dict = field(default_factory=dict)          # status name -> latest values
    queues: dict = field(default_factory=lambda: defaultdict(list))  # name -> [(t, size)]
    latency: dict = field(default_factory=lambda: defaultdict(list))  # plan n -> [latency]

    def attach(self, node) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from trajectory_msgs.msg import JointTrajectory
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        node.create_subscription(JointTrajectory, "/policy_node/plan", self._on_plan, reliable)
        node.create_subscription(JointTrajectory, COMMAND_TOPIC, self._on_command, reliable)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 100)

    def _on_plan(self, msg, info) -> None:
        from dp_ros.control.plan import PlanRejected
        from dp_ros.nodes.trajectory_conv import trajectory_to_plan
        try:
            plan = trajectory_to_plan(msg)
        except PlanRejected:
            return
        with self.lock:
            self.plans += 1
            # the publish time: the executor got it then (within DDS latency), whenever
            # this recorder did
            self.checker.plan(info["source_timestamp"] * 1e-9, plan)

    def _on_command(self, msg, info) -> None:
        from dp_ros.nodes.trajectory_conv import duration_to_ns
        t = np.array([duration_to_ns(p.time_from_start) * 1e-9 for p in msg.points])
        p = np.array([list(pt.positions) for pt in msg.points], dtype=np.float64)
        v = np.array([list(pt.velocities) for pt in msg.points], dtype=np.float64)
        with self.lock:
            self.commands += 1
            self.checker.trajectory_command(info["source_timestamp"] * 1e-9, t, p,
                                            v if v.shape == p.shape else None)

    def _on_diagnostics(self, msg) -> None:
        now = time.monotonic()
        with self.lock:
            for status in msg.status:
                values = {kv.key: kv.value for kv in status.values}
                self.diag[status.name] = values
                for key in ("buffered", "pending_window_stamps", "plans_held"):
                    if key in values:
                        try:
                            self.queues[f"{status.name}: {key}"].append((now, int(values[key])))
                        except ValueError:
                            pass
                if "plans_published" in values and "plan_latency_last" in values:
                    try:
                        n, lat = int(values["plans_published"]), float(values["plan_latency_last"])
                    except ValueError:
                        continue
                    if n > 0 and math.isfinite(lat):
                        self.latency[n].append(lat)

    def policy_values(self) -> dict:
        with self.lock:
            for name, values in self.diag.items():
                if "plans_published" in values:
                    return dict(values)
        return {}

    def executor_values(self) -> dict:
        with self.lock:
            for name, values in self.diag.items():
                if name.endswith(": executor"):
                    return dict(values)
        return {}


def read_rss_kb(pid: int) -> Optional[int]:
    try:
        import psutil  # optional: faster, and portable beyond Linux
        return int(psutil.Process(pid).memory_info().rss // 1024)
    except ImportError:
        pass
    except Exception:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_growth(samples: list[tuple[float, int]], t0: float) -> tuple[float, float, float]:
    """(MiB at the start of the measurement, MiB at the end, growth fraction): medians of
    the first and last 10% of the samples taken after t0 (at least 3 samples each)."""
    vals = [kb for t, kb in samples if t >= t0]
    if len(vals) < 2:
        return float("nan"), float("nan"), float("nan")
    k = max(3, len(vals) // 10)
    start, end = float(np.median(vals[:k])), float(np.median(vals[-k:]))
    return start / 1024, end / 1024, (end - start) / start


def queue_bounded(samples: list[tuple[float, int]], t0: float, t1: float, bound: int
                  ) -> tuple[int, int, bool]:
    """(max in the first half, max in the second half, bounded: never above `bound`)."""
    vals = [(t, n) for t, n in samples if t >= t0]
    if not vals:
        return 0, 0, True
    mid = (t0 + t1) / 2
    first = max((n for t, n in vals if t < mid), default=0)
    second = max((n for t, n in vals if t >= mid), default=0)
    return first, second, max(first, second) <= bound


def necessary_drops(latency: dict, plans: int, dt: float) -> int:
    """Upper bound of the windows inference time forces the policy node to drop (module
    docstring)."""
    per_plan = {}
    for n, seen in latency.items():
        values, counts = np.unique(np.round(seen, 6), return_counts=True)
        per_plan[n] = float(values[np.argmax(counts)])  # the value seen most often for plan n
    worst = max(per_plan.values(), default=0.0)
    total = 0
    for n in range(1, plans + 1):
        L = per_plan.get(n, worst)
        total += max(0, math.ceil(L / dt - 1e-9) - 1)
    return total


def plot_rss(series: dict[str, list[tuple[float, int]]], t_start: float, warm: float,
             path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, samples in series.items():
        if samples:
            t = np.array([s[0] for s in samples]) - t_start
            ax.plot(t, np.array([s[1] for s in samples]) / 1024, label=name)
    ax.axvline(warm - t_start, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("dp-ros soak: resident memory per node")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(minutes: float = 10.0, warmup: float = 30.0, policy: Optional[str] = None,
        out: Optional[str] = None, progress: bool = True, domain_id: Optional[int] = None) -> int:
    from tqdm import tqdm

    from dp_ros.control.contract import ContractChecker, TimeOrdered
    from dp_ros.control.limits import JointLimits
    from dp_ros.policy.checkpoint import load_config

    out_dir = Path(out) if out else Path("soak")
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = minutes * 60.0
    with tempfile.TemporaryDirectory(prefix="dp_ros_soak_") as tmp:
        tmp_path = Path(tmp)
        ckpt, which = choose_policy(policy, tmp_path)
        cfg = load_config(ckpt)
        cameras = list(cfg.camera_names)
        extra = [f"extra{i}" for i in range(max(0, 2 - len(cameras)))]  # 2 cameras in
        joints = list(cfg.state_names)
        if list(cfg.action_names) != joints:
            print("dp-ros soak: the policy's state and action joints differ; the soak drives "
                  "one joint set", file=sys.stderr)
            return 2
        cam = cfg.cameras[0]
        params = soak_parameters(ckpt, cameras + extra, joints, (cam.height, cam.width),
                                 cfg.T_o, 1.0 / cfg.dt)
        limits = JointLimits.create(len(joints), [-LIMIT] * len(joints), [LIMIT] * len(joints),
                                    MAX_VELOCITY)
        checker = TimeOrdered(ContractChecker(joints, limits, LEAD, STALE, 0.01,
                                              time_tol=CONTRACT_TIME_TOL, slack=CONTRACT_SLACK,
                                              jump_threshold=CLOCK_JUMP),
                              lag=REORDER_LAG, jump=CLOCK_JUMP)
        checker.blind(0.0)  # until this recorder receives a plan (the executor may be first)
        rec = SoakRecorder(checker)
        source = bench.source_command(tmp_path / "frames.json", HEIGHT, WIDTH,
                                      tuple(cameras + extra), tuple(joints))
        print(f"dp-ros soak: {minutes:g} min after {warmup:g} s warm-up; policy: {which}; "
              f"{len(cameras + extra)} cameras {WIDTH}x{HEIGHT} rgb8 at 30 Hz, "
              f"{len(joints)} joints at 500 Hz", flush=True)
        rss: dict[str, list[tuple[float, int]]] = defaultdict(list)
        load_before = os.getloadavg()[0]
        try:
            with bench.Pipeline(tmp_path, params, source, rec.attach, domain_id,
                                node_name="soak_recorder") as pipe:
                pids = {n: p for n, p in pipe.pids().items() if n != "source"}
                t_start = time.monotonic()
                pipe.wait(lambda: rec.plans >= 3, 300.0, "the first plans")
                t_warm = time.monotonic() + warmup
                t_end = t_warm + seconds
                bar = tqdm(total=int(warmup + seconds), unit="s", disable=not progress,
                           desc="soak", file=sys.stdout)
                shown = 0
                next_sample = time.monotonic()

                def sample_and_check() -> bool:
                    nonlocal shown, next_sample
                    now = time.monotonic()
                    if now >= next_sample:
                        next_sample += 1.0
                        for name, pid in pids.items():
                            kb = read_rss_kb(pid)
                            if kb is not None:
                                rss[name].append((now, kb))
                        elapsed = int(now - (t_warm - warmup))
                        if elapsed > shown:
                            bar.update(min(elapsed, bar.total) - shown)
                            shown = min(elapsed, bar.total)
                            with rec.lock:
                                bar.set_postfix(plans=rec.plans, commands=rec.commands,
                                                violations=checker.total)
                    return now >= t_end
                pipe.wait(sample_and_check, warmup + seconds + 60.0, "the soak")
                bar.close()
                pol, exe = rec.policy_values(), rec.executor_values()
        except RuntimeError as err:
            print(f"dp-ros soak: {err}", file=sys.stderr)
            return 1

    # ---- figures
    ok = True
    lines = [f"policy: {which}",
             f"measured {seconds:.0f} s after {warmup:.0f} s warm-up; load average "
             f"(1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, "
             f"{os.cpu_count()} CPUs",
             "", f"  {'resident memory':<26}{'after warm-up':>14}{'at the end':>12}{'growth':>9}"]
    result: dict = {"policy": which, "minutes": minutes, "warmup_s": warmup, "rss": {},
                    "queues": {}}
    for name, samples in rss.items():
        start, end, growth = rss_growth(samples, t_warm)
        passed = math.isfinite(growth) and growth < RSS_GROWTH_LIMIT
        ok &= passed
        result["rss"][name] = {"start_mib": start, "end_mib": end, "growth": growth,
                               "ok": passed}
        lines.append(f"  {name:<26}{start:>10.1f} MiB{end:>8.1f} MiB{100 * growth:>8.2f}%"
                     f"{'' if passed else '   FAIL (>= 5%)'}")
    lines += ["", f"  {'queue (max size)':<58}{'1st half':>9}{'2nd half':>9}{'bound':>7}"]
    for name, samples in sorted(rec.queues.items()):
        bound = QUEUE_BOUNDS[name.rsplit(": ", 1)[1]]
        first, second, bounded = queue_bounded(samples, t_warm, t_end, bound)
        ok &= bounded
        result["queues"][name] = {"first_half_max": first, "second_half_max": second,
                                  "bound": bound, "bounded": bounded}
        lines.append(f"  {name:<58}{first:>9}{second:>9}{bound:>7}"
                     f"{'' if bounded else '   ABOVE ITS BOUND'}")
    lines.append("  DDS: keep-last QoS depths (windows 4, plans 4, commands 10): bounded")
    plans = int(pol.get("plans_published", 0) or 0)
    dropped = int(pol.get("dropped_windows", 0) or 0)
    allowed = necessary_drops(rec.latency, plans, cfg.dt)
    drops_ok = dropped <= allowed
    ok &= drops_ok
    lines += ["", f"  plans published {plans}, windows received {pol.get('windows_received')}, "
                  f"plan latency median {pol.get('plan_latency_median')} s, "
                  f"p99 {pol.get('plan_latency_p99')} s",
              f"  dropped windows {dropped}, made necessary by inference time <= {allowed} "
              f"(sum over plans of ceil(L/dt) - 1)" + ("" if drops_ok else "   FAIL"),
              f"  executor: {exe.get('status')}, plans accepted {exe.get('plans_accepted')}, "
              f"late points dropped {exe.get('late_points')}, commands sent "
              f"{exe.get('commands_sent')}",
              f"  contract: {checker.summary()}",
              f"    ({checker.holds_checked} commands had to hold)"]
    ok &= checker.total == 0 and checker.commands > 0
    result.update({"plans": plans, "dropped_windows": dropped, "necessary_drops": allowed,
                   "commands": checker.commands, "violations": checker.total,
                   "violations_by_clause": {str(c): n for c, n in checker.counts.items()},
                   "holds_checked": checker.holds_checked, "ok": bool(ok)})
    print("\n".join(lines))
    (out_dir / "soak.json").write_text(json.dumps(result, indent=2))
    plot_rss(rss, t_start, t_warm, out_dir / "soak_rss.png")
    print(f"wrote {out_dir / 'soak.json'} and {out_dir / 'soak_rss.png'}; "
          f"{'all criteria met' if ok else 'CRITERIA FAILED'}")
    return 0 if ok else 1
