"""Training: episode store + YAML config -> checkpoints of the EMA weights.

    python -m dp_ros.policy.train --data STORE --config config/train_small.yaml --out DIR
    torchrun --nproc_per_node N -m dp_ros.policy.train ...      (DistributedDataParallel)

The recipe is the reference's: AdamW, linear warm-up then cosine decay of the learning rate,
an EMA of the weights (the EMA is what gets deployed), gradient-norm clipping.

Output directory::

    latest/                 checkpoint (config.json + model.safetensors, EMA weights)
    checkpoints/step_<n>/   periodic checkpoints
    train_state/            everything needed to resume: raw weights, EMA, optimiser,
                            step and RNG states (safetensors + JSON, no pickle)
    run_config.json         the resolved policy and training configuration
    train_log.jsonl         loss, learning rate and speed every log_every steps

Resuming (the default when train_state/ exists) continues at the saved step with the same
optimiser state, learning-rate position, data order and RNG state, so an interrupted run
ends with the weights an uninterrupted one would have (single process, same device).
Under torchrun, batch_size is per process and only rank 0 writes files or shows progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..data.store import EpisodeStore
from ..data.windows import WindowDataset
from .checkpoint import save_checkpoint
from .config import ConfigError, PolicyConfig
from .ema import EMA, EmaConfig
from .model import build_model
from .normalizer import fit_stats

PathLike = Union[str, os.PathLike]
STATE_DIR = "train_state"
LATEST_DIR = "latest"
STATE_FORMAT = "dp_ros.train_state/1"


# -- configuration -----------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Optimisation settings. Defaults are the reference implementation's."""

    batch_size: int = 64  # per process under torchrun
    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    eps: float = 1.0e-8
    weight_decay: float = 1.0e-6
    warmup_steps: int = 500  # linear warm-up, then cosine decay to 0 at num_steps
    num_steps: int = 100_000  # optimiser steps in the whole run (resumes included)
    max_minutes: Optional[float] = None  # wall-clock budget of this invocation; stops early
    use_ema: bool = True  # False: checkpoints hold the raw weights
    ema_power: float = 0.75
    ema_max: float = 0.9999
    ema_min: float = 0.0
    ema_update_after: int = 0
    inv_gamma: float = 1.0
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    checkpoint_every: int = 1000  # steps between checkpoints + resume state; 0 = at the end only
    keep_checkpoints: int = 5  # newest checkpoints/step_<n>/ kept (0 = keep all); latest/ always
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda" or "cuda:<i>"
    num_workers: int = 0  # DataLoader worker processes
    load_in_memory: bool = True  # read the whole store into RAM first (small stores)
    log_every: int = 50

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "TrainConfig":
        data = dict(data or {})
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"train: unknown key(s) {', '.join(unknown)}")
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = _coerce(f"train.{name}", str(names[name].type), value)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"train.{msg}")

        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        need(self.max_minutes is None or self.max_minutes > 0,
             f"max_minutes must be > 0 (or null for no budget), got {self.max_minutes}")
        need(0.0 <= self.ema_min <= self.ema_max <= 1.0,
             f"ema_min/ema_max must satisfy 0 <= ema_min <= ema_max <= 1, got {self.ema_min}, {self.ema_max}")
        need(self.ema_power > 0, f"ema_power must be > 0, got {self.ema_power}")
        need(self.inv_gamma > 0, f"inv_gamma must be > 0, got {self.inv_gamma}")
        need(self.ema_update_after >= 0, f"ema_update_after must be >= 0, got {self.ema_update_after}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        need(self.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0 (0 = all), got {self.keep_checkpoints}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
             f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")

    def ema_config(self) -> EmaConfig:
        return EmaConfig(power=self.ema_power, max_decay=self.ema_max, min_decay=self.ema_min,
                         update_after_step=self.ema_update_after, inv_gamma=self.inv_gamma)


def _coerce(where: str, type_str: str, value: Any) -> Any:
    base = type_str.replace("Optional[", "").rstrip("]")
    if value is None:
        if type_str.startswith("Optional"):
            return None
        raise ConfigError(f"{where} must not be null")
    if base == "list[float":
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value  # pragma: no cover - every field type is handled above


def load_train_config(path: PathLike) -> tuple[dict, TrainConfig]:
    """YAML file with ``policy:`` (partial PolicyConfig dict) and ``train:`` sections."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping with 'policy' and 'train' sections")
    unknown = sorted(set(data) - {"policy", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)} (expected policy, train)")
    policy = data.get("policy") or {}
    if not isinstance(policy, dict):
        raise ConfigError(f"{path}: 'policy' must be a mapping")
    try:
        return policy, TrainConfig.from_dict(data.get("train"))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def resolve_policy_config(policy: Union[dict, PolicyConfig], store: EpisodeStore) -> PolicyConfig:
    """Complete a policy config from the store and fit the normaliser to the store's data.

    Cameras, state/action names and dt default to the store's; when given they must agree
    with it (an explicit ``cameras:`` may pick a subset, ``[]`` for a state-only policy).
    ``normalizer: {state: {mode: mean_std}}`` picks the statistics' mode (default min_max).
    """
    data = policy.to_dict() if isinstance(policy, PolicyConfig) else json.loads(json.dumps(policy))
    modes = {}
    norm = data.pop("normalizer", None) or {}
    if not isinstance(norm, dict):
        raise ConfigError("policy.normalizer must be a mapping")
    for key, st in norm.items():
        if key not in ("state", "action"):
            raise ConfigError(f"policy.normalizer: key {key!r} is not 'state' or 'action'")
        modes[key] = (st or {}).get("mode", "min_max") if isinstance(st, dict) else "min_max"
    data.setdefault("cameras", [{"name": n, "height": h, "width": w}
                                for n, (h, w) in store.camera_shapes.items()])
    data.setdefault("state_names", list(store.state_names))
    data.setdefault("action_names", list(store.action_names))
    data.setdefault("dt", store.dt)
    cfg = PolicyConfig.from_dict(data)
    where = f"policy config vs store {store.path}"
    for cam in cfg.cameras:
        if cam.name not in store.camera_shapes:
            raise ConfigError(f"{where}: camera {cam.name!r} is not in the store (cameras: {store.camera_names})")
        if tuple(store.camera_shapes[cam.name]) != (cam.height, cam.width):
            raise ConfigError(f"{where}: camera {cam.name!r} is {cam.height}x{cam.width} in the config "
                              f"but {store.camera_shapes[cam.name][0]}x{store.camera_shapes[cam.name][1]} "
                              f"in the store (record frames at the policy's size)")
    if cfg.state_names != store.state_names:
        raise ConfigError(f"{where}: state_names {cfg.state_names} != store's {store.state_names}")
    if cfg.action_names != store.action_names:
        raise ConfigError(f"{where}: action_names {cfg.action_names} != store's {store.action_names}")
    if abs(cfg.dt - store.dt) > 1e-9:
        raise ConfigError(f"{where}: dt {cfg.dt} != store's {store.dt} (the policy's timing must match the data)")
    n = store.n_steps
    if n == 0:
        raise ConfigError(f"{store.path}: the store has no episodes")
    cfg.normalizer = {"action": fit_stats(np.asarray(store.action[:n]), modes.get("action", "min_max"))}
    if cfg.state_dim:
        cfg.normalizer["state"] = fit_stats(np.asarray(store.state[:n]), modes.get("state", "min_max"))
    cfg.validate()
    return cfg


# -- learning rate -----------------------------------------------------------------------
def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base lr for update number step+1: linear warm-up, cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -- distributed -------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _setup_distributed(device_pref: str) -> tuple[_Dist, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: join the group (NCCL on CUDA, else gloo)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    cuda = device_pref.startswith("cuda") or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {device_pref!r} but CUDA is not available")
    if world <= 1 or "RANK" not in env:
        device = torch.device(device_pref if device_pref.startswith("cuda") else ("cuda" if cuda else "cpu"))
        return _Dist(), device
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        owns = True
    return _Dist(rank, world, local_rank, owns), device


class _LossModule(nn.Module):
    """DDP only synchronises gradients for work done inside forward(): route the loss there."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.compute_loss(batch)


def _gather_tensor(t: torch.Tensor, d: _Dist, device: torch.device) -> list[torch.Tensor]:
    if not d.active:
        return [t]
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    local = t.to(comm_device)
    out = [torch.empty_like(local) for _ in range(d.world)]
    dist.all_gather(out, local)
    return [o.cpu() for o in out]


# -- resume state --------------------------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, extra = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                extra.setdefault(str(idx), {})[k] = v
    groups = json.loads(json.dumps(sd["param_groups"], default=list))
    return tensors, {"param_groups": groups, "non_tensor_state": extra}


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, extra in meta.get("non_tensor_state", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _swap_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp` so readers see the old or the new directory, never half."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _save_train_state(out: Path, step: int, model: nn.Module, ema: Optional[EMA],
                      opt: torch.optim.Optimizer, rng: dict[str, torch.Tensor], info: dict) -> None:
    tmp = out / (STATE_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_cpu_state(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_cpu_state(ema.averaged), str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"))
    payload = {"format": STATE_FORMAT, "step": step,
               "ema_optimization_step": ema.optimization_step if ema is not None else None,
               "optimizer": opt_meta, **info}
    (tmp / "state.json").write_text(json.dumps(payload, indent=1))
    _swap_dir(tmp, out / STATE_DIR)


def _load_train_state(directory: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    meta_path = directory / "state.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"{meta_path}: cannot read resume state ({exc}); "
                           f"delete {directory} or train with resume=False") from None
    if meta.get("format") != STATE_FORMAT:
        raise RuntimeError(f"{meta_path}: not a dp_ros training state (format {meta.get('format')!r})")
    tensors = {}
    for name in ("model", "ema", "optimizer", "rng"):
        path = directory / f"{name}.safetensors"
        if not path.exists():
            if name == "ema":
                continue
            raise RuntimeError(f"{path}: missing from the resume state")
        try:
            tensors[name] = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise RuntimeError(f"{path}: unreadable ({exc})") from None
    return meta, tensors


# -- the loop ----------------------------------------------------------------------------
class _ResumableBatches:
    """Endless batches of indices, epoch after epoch, starting at optimiser step `start_step`.

    The order within epoch e is the DistributedSampler's permutation for (seed, e), so the
    batch of any step is known without replaying the ones before it: that is what lets a
    resumed run see exactly the batches the interrupted one would have.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, batches_per_epoch: int,
                 start_step: int = 0):
        self.sampler, self.batch_size = sampler, batch_size
        self.batches_per_epoch, self.start_step = batches_per_epoch, start_step

    def __iter__(self):
        epoch, skip = divmod(self.start_step, self.batches_per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            for i in range(skip, self.batches_per_epoch):
                yield order[i * self.batch_size:(i + 1) * self.batch_size]
            epoch, skip = epoch + 1, 0


@dataclass
class StepInfo:
    """Passed to the optional per-step callback (after the update, on every rank)."""

    step: int
    loss: float
    lr: float
    model: nn.Module  # raw weights (not the DDP wrapper)
    ema_model: Optional[nn.Module]
    rank: int = 0


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


def _resolve_configs(config: Any) -> tuple[Union[dict, PolicyConfig], TrainConfig]:
    if isinstance(config, (str, os.PathLike)):
        return load_train_config(config)
    if isinstance(config, dict):
        unknown = sorted(set(config) - {"policy", "train"})
        if unknown:
            raise ConfigError(f"config: unknown top-level key(s) {', '.join(unknown)}")
        tcfg = config.get("train") or {}
        return config.get("policy") or {}, tcfg if isinstance(tcfg, TrainConfig) else TrainConfig.from_dict(tcfg)
    if isinstance(config, tuple) and len(config) == 2:
        policy, tcfg = config
        if not isinstance(tcfg, TrainConfig):
            tcfg = TrainConfig.from_dict(tcfg)
        tcfg.validate()
        return policy, tcfg
    raise TypeError("config must be a YAML path, a {'policy': ..., 'train': ...} dict, "
                    "or a (policy, TrainConfig) tuple")


def train(store_path: PathLike, config: Any, out_dir: PathLike, resume: bool = True,
          progress: bool = True, callback: Optional[Callable[[StepInfo], None]] = None) -> Path:
    """Train a policy on the episode store; returns the final checkpoint (``out_dir/latest``).

    config: a YAML path, a dict with "policy" and "train" sections, or a (policy, train)
    tuple of dicts or config objects.
    """
    policy_spec, tcfg = _resolve_configs(config)
    out = Path(out_dir)
    d, device = _setup_distributed(tcfg.device)
    try:
        return _train(store_path, policy_spec, tcfg, out, resume, progress, callback, d, device)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(store_path, policy_spec, tcfg: TrainConfig, out: Path, resume: bool, progress: bool,
           callback, d: _Dist, device: torch.device) -> Path:
    started = time.monotonic()
    store = EpisodeStore.open(store_path, in_memory=tcfg.load_in_memory)
    pcfg = resolve_policy_config(policy_spec, store)
    dataset = WindowDataset(store, pcfg.T_o, pcfg.T_p, pcfg.T_a, cameras=pcfg.camera_names)
    if len(dataset) == 0:
        raise ConfigError(f"{store.path}: no training samples: every episode is shorter than "
                          f"T_p - (T_o - 1) - (T_a - 1) = {pcfg.T_p - pcfg.T_o - pcfg.T_a + 2} ticks")

    # same initial weights on every rank (DDP also broadcasts rank 0's)
    torch.manual_seed(tcfg.seed)
    model = build_model(pcfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas),
                                  eps=tcfg.eps, weight_decay=tcfg.weight_decay,
                                  foreach=True)  # multi-tensor kernels: far fewer ops per step
    ema = EMA(model, tcfg.ema_config()) if tcfg.use_ema else None
    # the data order is a function of (seed, epoch) only, so a resumed run can skip into it
    sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True,
                                 seed=tcfg.seed, drop_last=False)
    per_rank = len(sampler)
    drop_last = per_rank >= tcfg.batch_size  # tiny stores: one partial batch per epoch
    batches_per_epoch = per_rank // tcfg.batch_size if drop_last else 1

    step = 0
    torch.manual_seed(tcfg.seed + 1000 * d.rank)  # noise and crops differ between ranks
    state_dir = out / STATE_DIR
    # JSON round trip: compared against what a previous run wrote to state.json
    run_info = json.loads(json.dumps({"policy": pcfg.to_dict(), "dataset_size": len(dataset),
                                      "world_size": d.world}))
    if resume and state_dir.exists():
        meta, tensors = _load_train_state(state_dir)
        if meta.get("policy") != run_info["policy"] or meta.get("dataset_size") != len(dataset):
            raise RuntimeError(f"{state_dir}: saved by a run with another policy config or dataset; "
                               f"use another output directory or resume=False (--no-resume)")
        model.load_state_dict(tensors["model"])
        if ema is not None:
            if "ema" in tensors:
                ema.averaged.load_state_dict(tensors["ema"])
                ema.optimization_step = int(meta["ema_optimization_step"])
            else:  # the saved run had no EMA: start the average from the current weights
                ema = EMA(model, tcfg.ema_config())
        optimizer.load_state_dict(_optimizer_state_dict(tensors["optimizer"], meta["optimizer"]))
        step = int(meta["step"])
        rng = tensors["rng"]
        if meta.get("world_size") == d.world and f"torch_cpu.{d.rank}" in rng:
            torch.set_rng_state(rng[f"torch_cpu.{d.rank}"])
            if device.type == "cuda" and f"torch_cuda.{d.rank}" in rng:
                torch.cuda.set_rng_state(rng[f"torch_cuda.{d.rank}"], device)
        else:  # another world size: fresh but reproducible streams
            torch.manual_seed(tcfg.seed + 1000 * d.rank + step)

    net: nn.Module = _LossModule(model)
    if d.active:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
        if ema is not None and step == 0:
            ema = EMA(model, tcfg.ema_config())  # copy the broadcast weights

    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(
            {"store": str(store.path), "policy": run_info["policy"], "train": tcfg.to_dict(),
             "dataset_size": len(dataset), "world_size": d.world}, indent=1))

    def rng_tensors() -> dict[str, torch.Tensor]:
        states = {f"torch_cpu.{r}": s for r, s in enumerate(_gather_tensor(torch.get_rng_state(), d, device))}
        if device.type == "cuda":
            cuda = _gather_tensor(torch.cuda.get_rng_state(device), d, device)
            states.update({f"torch_cuda.{r}": s for r, s in enumerate(cuda)})
        return states

    def save() -> None:
        rng = rng_tensors()  # a collective: every rank takes part
        if d.is_main:
            weights = ema.averaged if ema is not None else model
            tmp = out / "checkpoints" / f".step_{step}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_checkpoint(tmp, pcfg, weights)
            _swap_dir(tmp, out / "checkpoints" / f"step_{step}")
            tmp_latest = out / (LATEST_DIR + ".tmp")
            if tmp_latest.exists():
                shutil.rmtree(tmp_latest)
            shutil.copytree(out / "checkpoints" / f"step_{step}", tmp_latest)
            _swap_dir(tmp_latest, out / LATEST_DIR)
            _save_train_state(out, step, model, ema, optimizer, rng, run_info)
            _prune_checkpoints(out / "checkpoints", tcfg.keep_checkpoints)
        if d.active:
            dist.barrier()

    bar = tqdm(total=tcfg.num_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and d.is_main), file=sys.stderr)
    log_path = out / "train_log.jsonl"
    loss_sum, loss_n, smooth = 0.0, 0, None
    last_log_time, last_log_step = time.monotonic(), step
    saved_at = step if step > 0 else -1  # a resumed step was saved by the run that reached it
    budget_s = None if tcfg.max_minutes is None else tcfg.max_minutes * 60.0
    model.train()
    batches = _ResumableBatches(sampler, tcfg.batch_size, batches_per_epoch, start_step=step)
    # one loader for the whole run (workers persist); its generator keeps it off the global RNG
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=tcfg.num_workers,
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(tcfg.seed))
    try:
        for batch in (loader if step < tcfg.num_steps else ()):
            lr = tcfg.lr * lr_factor(step, tcfg.warmup_steps, tcfg.num_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = net(_to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            step += 1
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at step {step}: lower lr "
                                         f"or check the data for outliers")
            loss_sum, loss_n = loss_sum + loss_value, loss_n + 1
            smooth = loss_value if smooth is None else 0.98 * smooth + 0.02 * loss_value
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if callback is not None:
                callback(StepInfo(step, loss_value, lr, model,
                                  ema.averaged if ema is not None else None, d.rank))
            if d.is_main and (step % tcfg.log_every == 0 or step == tcfg.num_steps):
                now = time.monotonic()
                entry = {"step": step, "loss": loss_sum / loss_n, "lr": lr,
                         "ema_decay": ema.last_decay if ema is not None else None,
                         "steps_per_s": (step - last_log_step) / max(now - last_log_time, 1e-9),
                         "elapsed_s": now - started}
                with log_path.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                loss_sum, loss_n, last_log_time, last_log_step = 0.0, 0, now, step
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < tcfg.num_steps:
                save()
                saved_at = step
            if step >= tcfg.num_steps or _out_of_time(budget_s, started, d, device):
                break
    finally:
        bar.close()
    if saved_at != step:
        save()
    return out / LATEST_DIR


def _prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the `keep` newest step_<n> directories (a full-size model each)."""
    if keep <= 0:
        return
    steps = sorted((int(p.name[5:]), p) for p in directory.glob("step_*") if p.name[5:].isdigit())
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _out_of_time(budget_s: Optional[float], started: float, d: _Dist, device: torch.device) -> bool:
    """Every rank must stop at the same step, so rank 0's clock decides."""
    if budget_s is None:
        return False
    flag = torch.tensor([1.0 if time.monotonic() - started >= budget_s else 0.0])
    if d.active:
        flag = flag.to(device if device.type == "cuda" else "cpu")
        dist.broadcast(flag, src=0)
    return bool(flag.item() > 0)


# -- command line ------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="dp_ros.policy.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="episode store (zarr directory)")
    p.add_argument("--config", required=True, help="training YAML (policy: and train: sections)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-resume", action="store_true", help="ignore OUT/train_state and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        path = train(args.data, args.config, args.out, resume=not args.no_resume,
                     progress=not args.no_progress)
    except (ConfigError, RuntimeError) as exc:
        print(f"dp_ros train: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
