"""`dp-ros bench policy`: parameters, GFLOP per plan, plan latency and the machine's bound."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ..policy.config import CameraConfig, EncoderConfig, PolicyConfig, TransformerConfig
from ..policy.inference import Policy, resolve_device
from ..policy.model import build_model
from ..policy.normalizer import fit_stats
from .machine import MachineRates, measure_machine


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
class PolicyBenchResult:
    name: str
    params: int
    denoiser_params: int
    gflop_per_plan: float
    weight_gb_per_plan: float
    latency_ms: list[float]
    bound_ms: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.latency_ms)

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.latency_ms, 90))


def _windows(cfg: PolicyConfig, count: int, seed: int = 0):
    """Consecutive windows as the aggregator makes them: each shares T_o - 1 frames with the last."""
    rng = np.random.default_rng(seed)
    frames = {c.name: rng.integers(0, 256, (count + cfg.T_o, c.height, c.width, 3), dtype=np.uint8)
              for c in cfg.cameras}
    for i in range(count):
        yield {"images": {n: f[i:i + cfg.T_o] for n, f in frames.items()},
               "state": rng.uniform(-1, 1, (cfg.T_o, cfg.state_dim)).astype(np.float32),
               "stamps": (np.arange(i, i + cfg.T_o) * cfg.dt)}


def bench_policy(name: str, cfg: PolicyConfig, rates: MachineRates, iterations: int = 20,
                 device: str = "cpu", progress=None) -> PolicyBenchResult:
    torch.manual_seed(0)
    policy = Policy(cfg, build_model(cfg), resolve_device(device), seed=0)
    model = policy.model
    params = sum(p.numel() for p in model.parameters())
    den = model.denoiser if model.denoiser is not None else model.regressor
    den_params = sum(p.numel() for p in den.parameters())
    enc_params = params - den_params
    steps = len(policy.sampler)
    first = next(_windows(cfg, 1, seed=99))
    with FlopCounterMode(display=False) as counter:
        policy.predict(first)  # a cold window: every frame encoded, as the worst case
    flops = counter.get_total_flops()
    weight_bytes = 4 * (den_params * steps + enc_params)
    for obs in _windows(cfg, 3, seed=1):  # warm-up: allocator, thread pools
        policy.predict(obs)
    latency = []
    for obs in _windows(cfg, iterations, seed=2):
        t0 = time.perf_counter()
        policy.predict(obs)
        latency.append((time.perf_counter() - t0) * 1e3)
        if progress:
            progress()
    return PolicyBenchResult(name, params, den_params, flops / 1e9, weight_bytes / 1e9, latency,
                             rates.bound_seconds(flops, weight_bytes) * 1e3)


def run(iterations: int = 20, device: str = "cpu", which: tuple[str, ...] = ("cnn", "transformer")) -> None:
    from tqdm import tqdm

    configs = {"cnn": ("CNN (U-Net)", paper_cnn_config), "transformer": ("transformer", paper_transformer_config)}
    print(f"measuring the machine ({device}) ...", flush=True)
    rates = measure_machine(device)
    print(f"  matmul {rates.matmul_flops / 1e9:.0f} GFLOP/s fp32, memory read {rates.read_bytes / 1e9:.1f} GB/s, "
          f"torch threads {torch.get_num_threads()}")
    results = []
    for key in which:
        label, make = configs[key]
        with tqdm(total=iterations, desc=f"plans ({label})", unit="plan") as bar:
            results.append(bench_policy(label, make(), rates, iterations, device, progress=bar.update))
    header = f"{'config':<14}{'params':>9}{'denoiser':>10}{'GFLOP/plan':>12}{'weights GB/plan':>17}" \
             f"{'median ms':>11}{'p90 ms':>9}{'bound ms':>10}{'x bound':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        print(f"{r.name:<14}{r.params / 1e6:>8.1f}M{r.denoiser_params / 1e6:>9.1f}M{r.gflop_per_plan:>12.2f}"
              f"{r.weight_gb_per_plan:>17.2f}{r.median_ms:>11.1f}{r.p90_ms:>9.1f}{r.bound_ms:>10.1f}"
              f"{r.median_ms / r.bound_ms:>9.2f}")
    print("\nbound = max(FLOPs / matmul rate, weight bytes / read bandwidth), both measured above; "
          "fp32, batch 1, torch eager, one new camera frame per plan (the other comes from the feature cache)")
