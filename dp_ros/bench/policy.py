"""`dp-ros bench policy`: parameters, GFLOP per plan, plan latency and the machine's bound,
per backend (torch, onnxruntime), precision, warm start, and against LeRobot.

A plan here encodes both frames of its window (plans every T_a ticks share no frame with
the previous window, so the feature cache does not help), then denoises. The bound of a
plan is max(FLOPs / measured matmul rate, weight bytes / measured read bandwidth) for a
cold fp32 plan, with the rates measured before and after the timing (the faster of each);
reduced precision and warm start are reported against that same bound.

The variants (and LeRobot) take turns in blocks of plans (time_plans), so that drift of
the machine hits all alike, and no timed plan follows another runtime's plan.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..policy.config import CameraConfig, EncoderConfig, PolicyConfig, TransformerConfig
from ..policy.inference import Policy, resolve_device
from ..policy.model import build_model
from ..policy.normalizer import fit_stats
from ..policy.warm_start import PreviousPlan, shared_joints, shift_plan
from .machine import MachineRates, measure_machine

BLOCK = 5    # plans a variant runs in a row before the next one's turn
WARM_UP = 3  # a variant's first plans, not timed
LEROBOT_VERSION = "0.4.4"
LEROBOT_PINS = [f"lerobot=={LEROBOT_VERSION}", "torch==2.9.1", "torchvision==0.24.1"]
EQUAL_TOL = 1e-4


def paper_cnn_config() -> PolicyConfig:
    """The paper's real-world CNN setting: 1 camera 96x96 cropped to 84, ResNet-18-GN,
    U-Net [256, 512, 1024], T_o 2, T_p 16, DDIM 10, state and action dim 2."""
    return _with_stats(PolicyConfig(cameras=[CameraConfig("image", 96, 96)],
                                    encoder=EncoderConfig(crop_shape=[84, 84])))


def paper_transformer_config() -> PolicyConfig:
    """Same observation and horizon with the time-series diffusion transformer
    (8 layers, 4 heads, 256 wide)."""
    return _with_stats(PolicyConfig(denoiser="transformer", transformer=TransformerConfig(),
                                    encoder=EncoderConfig(crop_shape=[84, 84])))


def _with_stats(cfg: PolicyConfig) -> PolicyConfig:
    rng = np.random.default_rng(0)
    cfg.normalizer = {"state": fit_stats(rng.uniform(-1, 1, (64, cfg.state_dim))),
                      "action": fit_stats(rng.uniform(-1, 1, (64, cfg.action_dim)))}
    return cfg


@dataclass
class Variant:
    """One way of running the policy: backend, precision, warm start."""

    backend: str = "torch"
    precision: str = "fp32"
    warm_start_steps: int = 0

    @property
    def label(self) -> str:
        s = f"{self.backend} {self.precision}"
        return s + (f" warm {self.warm_start_steps}" if self.warm_start_steps else "")


def _windows(cfg: PolicyConfig, count: int, seed: int = 0, stride: Optional[int] = None):
    """(obs, noise, plan stamp ns) for plans every `stride` ticks (default T_a): windows
    that share no frame when stride >= T_o, as when the node replans every T_a ticks."""
    stride = stride or cfg.T_a
    rng = np.random.default_rng(seed)
    n_frames = (count - 1) * stride + cfg.T_o
    frames = {c.name: rng.integers(0, 256, (n_frames, c.height, c.width, 3), dtype=np.uint8)
              for c in cfg.cameras}
    dt_ns = int(round(cfg.dt * 1e9))
    lo, hi = -1.0, 1.0
    for i in range(count):
        first = i * stride
        obs = {"images": {n: f[first:first + cfg.T_o] for n, f in frames.items()},
               "state": rng.uniform(lo, hi, (cfg.T_o, cfg.state_dim)).astype(np.float32)}
        noise = rng.standard_normal((cfg.T_p, cfg.action_dim)).astype(np.float32)
        yield obs, noise, (first + cfg.T_o - 1) * dt_ns


def make_policy(cfg: PolicyConfig, model, variant: Variant, device: str = "cpu",
                onnx_dir: Optional[str] = None) -> Policy:
    """A Policy for `variant` sharing nothing mutable with `model` (precision casts a copy).
    Reduced precision is built without the gate refusing it: the bench reports its cost."""
    m = model if variant.precision == "fp32" else copy.deepcopy(model)
    return Policy(cfg, m, resolve_device(device), seed=0, backend=variant.backend,
                  precision=variant.precision, warm_start_steps=variant.warm_start_steps,
                  onnx_dir=onnx_dir, gate=False)


@dataclass
class PlanCost:
    """Work of one fp32 plan: encoder (both frames) + `steps` network calls."""

    params: int
    step_params: int  # read at every network call (the U-Net's FiLM encoders once per plan)
    encoder_flops: float
    step_flops: float
    steps: int

    def flops(self, steps: Optional[int] = None) -> float:
        return self.encoder_flops + self.step_flops * (self.steps if steps is None else steps)

    def weight_bytes(self, steps: Optional[int] = None) -> float:
        steps = self.steps if steps is None else steps
        return 4.0 * (self.step_params * steps + self.params - self.step_params)

    def bound_ms(self, rates: MachineRates, steps: Optional[int] = None) -> float:
        return rates.bound_seconds(self.flops(steps), self.weight_bytes(steps)) * 1e3


def plan_cost(policy: Policy) -> PlanCost:
    """FLOPs (counted) and weight reads of a cold fp32 plan of `policy`."""
    model = policy.model
    params = sum(p.numel() for p in model.parameters())
    den = model.denoiser if model.denoiser is not None else model.regressor
    film = [] if model.denoiser is None or not hasattr(den, "film_blocks") else \
        [p for blk in den.film_blocks() for p in blk.cond_encoder.parameters()]
    den_params = sum(p.numel() for p in den.parameters()) - sum(p.numel() for p in film)
    steps = len(policy.sampler) if model.denoiser is not None else 1
    obs, noise, _ = next(_windows(policy.config, 1, seed=99))
    policy.cache.clear()
    with FlopCounterMode(display=False) as total:
        policy.predict(obs, noise=noise)  # both frames encoded
    policy.cache.clear()
    with FlopCounterMode(display=False) as enc, torch.inference_mode():
        policy._frame_features(obs)
    enc_flops = enc.get_total_flops()
    return PlanCost(params, den_params, enc_flops, (total.get_total_flops() - enc_flops) / steps, steps)


def switch_velocity_jump(previous: PreviousPlan, actions: np.ndarray, stamp_ns: int,
                         cfg: PolicyConfig) -> float:
    """Open-loop proxy of the jump at a plan switch: the largest change of the
    finite-difference velocity (action units / s) at the new plan's first executable
    point, new plan against the previous plan at the same time."""
    k = int(round((stamp_ns - previous.stamp_ns) * 1e-9 / cfg.dt))
    i = cfg.T_o - 1
    if i + k + 1 >= cfg.T_p:
        return float("nan")
    v_new = (actions[i + 1] - actions[i]) / cfg.dt
    v_old = (previous.actions[i + k + 1] - previous.actions[i + k]) / cfg.dt
    return float(np.abs(v_new - v_old).max())


def followed(obs: dict, previous: Optional[PreviousPlan], stamp_ns: int, cfg: PolicyConfig) -> dict:
    """`obs` with its newest state where the previous plan put the robot at `stamp_ns`, on
    the joints that are both state and action: the robot followed the plan, as on a real
    arm, so a warm start is not refused for departing from it (``warm_start.departure``)."""
    if previous is None:
        return obs
    shifted = shift_plan(previous, stamp_ns, cfg.dt, cfg.T_p)
    shared = shared_joints(cfg.state_names, cfg.action_names)
    if shifted is None or not shared:
        return obs
    state = obs["state"].copy()
    for a, j in shared:
        state[-1, j] = shifted[cfg.T_o - 1, a]
    return {**obs, "state": state}


def time_plans(policies: dict[str, Policy], cfg: PolicyConfig, iterations: int,
               progress=None, lerobot=None, encoder_ms: Optional[dict] = None,
               jumps: Optional[dict] = None, cold_starts: Optional[dict] = None,
               block: int = BLOCK) -> dict[str, list[float]]:
    """Plan latencies (ms) of the variants (and LeRobot): `iterations` each, timed in
    blocks of `block` consecutive plans, the variants taking turns block by block. All walk
    the same windows in order; warm-start variants chain each plan to their own previous
    one, on windows whose state followed it. Each variant's first WARM_UP plans, and the
    first plan of each later block, are not timed: right after another runtime's plan a
    plan ran up to 45 % slower (LeRobot 398 against 275 ms, plan by plan in alternation),
    which a deployment running one policy never sees; taking turns still spreads drift of
    the machine over all variants alike. `encoder_ms` (a dict) receives the encoder's
    share of each timed plan per variant, `cold_starts` the reasons a warm-start variant
    planned cold after all."""
    encoder_ms = {} if encoder_ms is None else encoder_ms
    labels = list(policies) + (["lerobot"] if lerobot is not None else [])
    out: dict[str, list[float]] = {k: [] for k in labels}
    windows = list(_windows(cfg, WARM_UP + iterations + -(-iterations // block), seed=2))
    position = dict.fromkeys(labels, 0)
    previous: dict[str, Optional[PreviousPlan]] = dict.fromkeys(policies)

    def plan(label: str, timed: bool) -> None:
        obs, noise, stamp = windows[position[label]]
        position[label] += 1
        if label == "lerobot":
            ms = lerobot.plan(obs, noise)[1]
            if timed:
                out[label].append(ms)
            return
        policy = policies[label]
        window = followed(obs, previous[label], stamp, cfg) if policy.warm_start_steps else obs
        policy.cache.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            policy._frame_features(window)  # the encoder; predict then finds both frames cached
        t1 = time.perf_counter()
        actions = policy.predict(window, noise=noise, previous=previous[label], plan_stamp_ns=stamp)
        t2 = time.perf_counter()
        if timed:
            out[label].append((t2 - t0) * 1e3)
            encoder_ms.setdefault(label, []).append((t1 - t0) * 1e3)
            if previous[label] is not None and jumps is not None:
                jumps.setdefault(label, []).append(switch_velocity_jump(previous[label], actions, stamp, cfg))
            if policy.warm_start_steps and policy.cold_reason is not None and cold_starts is not None:
                cold_starts.setdefault(label, []).append(policy.cold_reason)
        previous[label] = PreviousPlan(actions, stamp)

    while any(len(v) < iterations for v in out.values()):
        for label in labels:
            todo = min(block, iterations - len(out[label]))
            if not todo:
                continue
            for _ in range(WARM_UP if position[label] == 0 else 1):
                plan(label, timed=False)
            for _ in range(todo):
                plan(label, timed=True)
                if progress:
                    progress()
    return out


# ---------------------------------------------------------------------------- LeRobot

class LeRobotError(RuntimeError):
    pass


def default_lerobot_venv() -> Path:
    from ..paths import cache_dir
    return cache_dir() / f"lerobot-{LEROBOT_VERSION}-venv"


def ensure_lerobot_venv(venv: Path, log=print) -> Path:
    """The venv's python, creating the venv with LeRobot's pins when it has no LeRobot."""
    python = Path(venv) / "bin" / "python"
    check = [str(python), "-c", "import lerobot; print(lerobot.__version__)"]
    if python.exists():
        r = subprocess.run(check, capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == LEROBOT_VERSION:
            return python
    log(f"creating a LeRobot {LEROBOT_VERSION} virtual environment in {venv} "
        f"(pip install {' '.join(LEROBOT_PINS)}; several GB, minutes) ...")
    base = _python311()
    steps = [[base, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", *LEROBOT_PINS]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
            raise LeRobotError(f"could not set up LeRobot in {venv}: `{' '.join(cmd)}` failed:\n  "
                               + "\n  ".join(tail) + "\nLeRobot 0.4.4 needs Python 3.11 and "
                               "network access to PyPI; or pass --lerobot-venv PATH of a "
                               "virtual environment where it is installed")
    r = subprocess.run(check, capture_output=True, text=True)
    if r.returncode != 0:
        raise LeRobotError(f"LeRobot still does not import in {venv}: {r.stderr.strip()[-300:]}")
    return python


def _python311() -> str:
    found = shutil.which("python3.11")
    if found:
        return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise LeRobotError("LeRobot 0.4.4 needs Python 3.11: no python3.11 found on PATH "
                       "(install it, or pass --lerobot-venv PATH of an existing environment)")


class LeRobotServer:
    """LeRobot's DiffusionPolicy in a subprocess of its own virtual environment."""

    SCRIPT = Path(__file__).with_name("lerobot_side.py")

    def __init__(self, python: Path, src: Path, threads: int, workdir: Path):
        self.workdir = workdir
        self.count = 0
        self.proc = subprocess.Popen([str(python), str(self.SCRIPT), "serve", str(src),
                                      "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._read()

    def _read(self) -> dict:
        while True:  # LeRobot may print its own lines: ours are JSON objects
            line = self.proc.stdout.readline()
            if not line:
                raise LeRobotError("the LeRobot subprocess ended (see its output above)")
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    pass
            print(f"  [lerobot] {line.rstrip()}", file=sys.stderr)

    def plan(self, obs: dict, noise: np.ndarray) -> tuple[np.ndarray, float]:
        path = self.workdir / f"req{self.count % 4}.npz"
        self.count += 1
        (image,) = obs["images"].values()
        np.savez(path, state=obs["state"], image=image, noise=noise)
        self.proc.stdin.write(json.dumps({"npz": str(path)}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        return np.load(reply["out"]), float(reply["ms"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def lerobot_policy(python: Path, workdir: Path, threads: int, seed: int = 0):
    """Make LeRobot's randomly initialised paper-config policy and import it: (dir, ckpt)."""
    from ..policy.importers import import_lerobot
    src, ours = workdir / "lerobot", workdir / "dp_ros"
    r = subprocess.run([str(python), str(LeRobotServer.SCRIPT), "make", str(src), "--seed",
                        str(seed), "--threads", str(threads)], capture_output=True, text=True)
    if r.returncode != 0:
        raise LeRobotError(f"LeRobot could not build its policy:\n{r.stderr.strip()[-2000:]}")
    import_lerobot(src, ours, dt=0.1)
    return src, ours


# ---------------------------------------------------------------------------- command

def _row(label, med, p90, bound, fp32_bound):
    return (f"  {label:<28}{med:>10.1f}{p90:>9.1f}{bound / med:>13.2f}"
            f"{fp32_bound / med:>14.2f}")


def run(iterations: int = 20, device: str = "cpu", which: tuple[str, ...] = ("cnn", "transformer"),
        backends: tuple[str, ...] = ("torch",), precisions: tuple[str, ...] = ("fp32",),
        warm_start_steps: tuple[int, ...] = (), compare: Optional[str] = None,
        lerobot_venv: Optional[str] = None, threads: Optional[int] = None) -> int:
    from ..policy.backends import PRECISIONS

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    variants = [Variant(b, p) for b in backends for p in precisions if p in PRECISIONS[b]]
    variants += [Variant(b, "fp32", w) for b in backends for w in warm_start_steps if w]
    if not variants:
        print("dp-ros bench policy: no backend offers the requested precisions", file=sys.stderr)
        return 2
    print(f"measuring the machine ({device}) ...", flush=True)
    rates = measure_machine(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"  {rates.line()}, torch threads {threads}, load average {load:.2f}")

    tmp = Path(tempfile.mkdtemp(prefix="dp_ros_bench_"))  # exports, LeRobot's files
    try:
        return _run(iterations, device, which, backends, precisions, variants, compare,
                    lerobot_venv, threads, rates, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(iterations, device, which, backends, precisions, variants, compare, lerobot_venv,
         threads, rates, tmp: Path) -> int:
    from tqdm import tqdm

    from ..policy.backends.precision import accuracy_gate
    from ..policy.inference import load_policy

    configs = {"cnn": ("CNN (U-Net)", paper_cnn_config), "transformer": ("transformer", paper_transformer_config)}
    lerobot = None
    if compare == "lerobot":
        if which != ("cnn",):
            print("  --compare lerobot runs the CNN configuration only")
            which = ("cnn",)
        try:
            python = ensure_lerobot_venv(Path(lerobot_venv) if lerobot_venv else default_lerobot_venv())
            _, ours = lerobot_policy(python, tmp, threads)
        except LeRobotError as exc:
            print(f"dp-ros bench policy: {exc}", file=sys.stderr)
            return 2
    status = 0
    for key in which:
        label, make = configs[key]
        if compare == "lerobot":
            base = load_policy(ours, device="cpu", seed=0)
            cfg, model = base.config, base.model
            label = "CNN (U-Net), LeRobot's weights"
        else:
            cfg = make()
            torch.manual_seed(0)
            model = build_model(cfg)
        reference = Policy(cfg, model, resolve_device(device), seed=0)
        cost = plan_cost(reference)
        onnx_dir = None
        if "onnxruntime" in backends:
            from ..policy.export import export_policy
            onnx_dir = str(tmp / f"onnx_{key}")
            print(f"exporting {label} to ONNX ...", flush=True)
            export_policy(reference if device == "cpu" else Policy(cfg, copy.deepcopy(model).cpu(),
                                                                   torch.device("cpu"), seed=0),
                          onnx_dir, int8="int8" in precisions, log=lambda m: print(m, flush=True))
        policies = {}
        for v in variants:
            policies[v.label] = make_policy(cfg, model, v, device, onnx_dir)
        print(f"\n{label}: {cost.params / 1e6:.1f} M parameters ({cost.step_params / 1e6:.1f} M "
              f"read at every denoising step), {cost.flops() / 1e9:.2f} GFLOP ({cost.encoder_flops / 1e9:.2f} in the "
              f"encoder) and {cost.weight_bytes() / 1e9:.2f} GB of weight reads per cold fp32 "
              f"plan", flush=True)
        if compare == "lerobot":
            lerobot = LeRobotServer(python, tmp / "lerobot", threads, tmp)
            print(f"  LeRobot {lerobot.info['lerobot']} (torch {lerobot.info['torch']}, "
                  f"{lerobot.info['threads']} threads) in a subprocess")
            worst = {}
            for i, (obs, noise, _) in enumerate(_windows(cfg, 3, seed=7)):
                theirs, _ = lerobot.plan(obs, noise)
                for name, p in policies.items():
                    if p.precision == "fp32" and not p.warm_start_steps:
                        mine = p.predict(obs, noise=noise)
                        worst[name] = max(worst.get(name, 0.0), float(np.abs(mine - theirs).max()))
            for name, w in worst.items():
                ok = w <= EQUAL_TOL
                status |= 0 if ok else 1
                print(f"  same actions as LeRobot ({name}): max |difference| {w:.2e} over 3 windows "
                      f"({'OK' if ok else 'FAIL'}, tolerance {EQUAL_TOL:g})")
        gates = {}
        for name, p in policies.items():
            if p.precision != "fp32":
                gates[name] = accuracy_gate(reference, p, p.precision)
        enc_ms: dict = {}
        jumps: dict = {}
        cold: dict = {}
        try:
            with tqdm(total=iterations * (len(policies) + (lerobot is not None)), desc="plans",
                      unit="plan", leave=False) as bar:
                lat = time_plans(policies, cfg, iterations, progress=bar.update, lerobot=lerobot,
                                 encoder_ms=enc_ms, jumps=jumps, cold_starts=cold)
        finally:
            if lerobot is not None:
                lerobot.close()
        after = measure_machine(device)
        print(f"  machine after the timing: {after.line()}")
        rates = rates.best(after)
        bound = cost.bound_ms(rates)
        print(f"  machine bound {bound:.1f} ms per cold fp32 plan (the faster rate of each "
              f"measurement)")
        print(f"\n  {'variant':<28}{'median ms':>10}{'p90 ms':>9}{'of bound':>13}{'of fp32 bound':>14}"
              f"{'encoder ms':>12}{'per step ms':>13}")
        for name, values in lat.items():
            med, p90 = statistics.median(values), float(np.percentile(values, 90))
            p = policies.get(name)
            warm = p.warm_start_steps if p is not None and p.warm_start_steps else None
            extra = ""
            if name in enc_ms:
                e = statistics.median(enc_ms[name])
                steps = warm or len(p.sampler)
                extra = f"{e:>12.1f}{(med - e) / steps:>13.1f}"
            print(_row(name, med, p90, cost.bound_ms(rates, warm), bound) + extra)
        if lerobot is not None:
            ler = statistics.median(lat["lerobot"])
            for name in policies:
                print(f"  {name}: {statistics.median(lat[name]) / ler:.3f} x LeRobot's median "
                      f"({ler / statistics.median(lat[name]):.1f} x faster), same run, taking turns")
        if any(p.warm_start_steps for p in policies.values()):
            print("  switch jump (open loop, consecutive plans every T_a ticks on random windows, "
                  "warm starts' state on their previous plan; velocity change at the switch, "
                  "action units/s): " + "; ".join(
                      f"{name} mean {np.nanmean(v):.2f} max {np.nanmax(v):.2f}"
                      for name, v in jumps.items() if v))
        for name, reasons in cold.items():
            print(f"  {name}: {len(reasons)} of {iterations} plans started cold after all "
                  f"(first reason: {reasons[0]}); its row mixes warm and cold plans")
        for name, g in gates.items():
            print(f"  accuracy ({name}): {g.line().strip()}")
    print(f"\nThe variants took turns in blocks of {BLOCK} plans, the first plan of each block "
          "not timed. of bound = machine bound / median latency (1.0 = at the bound); the bound is "
          "max(FLOPs / matmul rate, weight bytes / read bandwidth), both measured above. "
          "Each plan encodes both frames of its window (plans every T_a ticks), batch 1. "
          "Warm-start rows: bound of the fewer network calls; 'of fp32 bound' compares with "
          "a cold fp32 plan's bound.")
    return status
