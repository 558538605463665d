"""Inference API: ``policy = load_policy(path); policy.predict(obs, noise=None)``.

The encoder runs once per call and its features are reused by every denoising step. A small
per-frame feature cache means a frame shared by consecutive windows (T_o - 1 of every T_o
frames when planning each tick) is encoded once.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .checkpoint import load_config, load_weights
from .config import PolicyConfig
from .model import DiffusionPolicyModel, build_model
from .normalizer import action_range

if TYPE_CHECKING:
    from .warm_start import PreviousPlan


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unknown device {device!r} (expected auto, cpu or cuda[:N])")
    return torch.device(device)


class FrameFeatureCache:
    """Least-recently-used map (camera, frame key) -> encoded features."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Optional[torch.Tensor]:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def frame_key(frame: np.ndarray, stamp: Optional[float]) -> tuple:
    """A frame's identity: its stamp when the caller has one, else a digest of its pixels."""
    if stamp is not None:
        return ("stamp", float(stamp))
    return ("pixels", hashlib.blake2b(np.ascontiguousarray(frame).data, digest_size=16).digest())


class Policy:
    """A loaded policy in eval mode on one device."""

    def __init__(self, cfg: PolicyConfig, model: DiffusionPolicyModel, device: torch.device,
                 source: str = "", seed: Optional[int] = None, *, backend: str = "torch",
                 precision: str = "fp32", warm_start_steps: int = 0,
                 onnx_dir: Optional[str] = None, plan_graph: Optional[str] = None,
                 gate: bool = True, cuda_graph: bool = True, warm_start_keep_steps: int = 0):
        """`backend` torch | onnxruntime, `precision` fp32 | bf16 | fp16 (torch) | int8
        (onnxruntime): see dp_ros.policy.backends. Reduced precision is refused (ValueError)
        unless it passes the accuracy gate against fp32 (`gate=False` skips the check).
        `warm_start_steps` 0 = cold start, `warm_start_keep_steps` how much of the running
        plan a warm start keeps as it is; see dp_ros.policy.warm_start."""
        from .backends import check_backend
        from .backends.precision import accuracy_gate

        check_backend(backend, precision)
        self.config = cfg
        self.model = model.to(device).eval()
        self.device = device
        self.source = source
        self.backend = backend
        self.sampler = model.noise_schedule.sampler().to(device, torch.float32)
        self.cache = FrameFeatureCache(capacity=4 * max(cfg.T_o, 1) * max(len(cfg.cameras), 1))
        self.generator = torch.Generator(device=device)
        self.warm_start_steps = warm_start_steps
        self.warm_start_keep_steps = warm_start_keep_steps
        self.last_start_index = 0  # sampler step the last plan started from (0 = cold)
        self.cold_reason: Optional[str] = "warm start off"  # why the last plan started cold
        self._action_range = action_range(cfg)
        reference = None
        if precision != "fp32" and gate and backend == "torch":
            import copy
            reference = Policy(cfg, copy.deepcopy(model), device, seed=0, cuda_graph=False)
        self.engine = self._make_engine(backend, precision, onnx_dir, plan_graph, cuda_graph, gate)
        self.gate = None
        if reference is not None:
            self.gate = accuracy_gate(reference, self, precision)
            if not self.gate.passed:
                raise ValueError(f"precision {precision} refused by the accuracy gate: {self.gate.line()}")
            self.cache.clear()  # the gate's windows are no observations of this robot
        # seeded after the gate, which reseeds the generator for its fixed windows
        self.generator.manual_seed(seed if seed is not None else torch.seed() % (2**63))

    def _make_engine(self, backend, precision, onnx_dir, plan_graph, cuda_graph, gate):
        if backend == "torch":
            from .backends.torch_backend import TorchEngine
            return TorchEngine(self.model, self.sampler, self.device, precision, cuda_graph)
        from .backends.onnx_backend import OnnxEngine
        from .export import cached_onnx_dir, model_digest
        digest = model_digest(self.model)  # once: it reads every weight
        if onnx_dir is None:
            onnx_dir = cached_onnx_dir(self, int8=precision == "int8", digest=digest)
        return OnnxEngine(self.model, self.sampler.to("cpu"), onnx_dir, digest,
                          precision=precision, device=self.device.type, plan_graph=plan_graph,
                          require_gate=gate)

    @property
    def precision(self) -> str:
        return self.engine.precision

    @property
    def warm_start_steps(self) -> int:
        return self._warm_start_steps

    @warm_start_steps.setter
    def warm_start_steps(self, value: int) -> None:
        self._warm_start_steps = self.check_warm_start_steps(value)

    @property
    def warm_start_keep_steps(self) -> int:
        return self._warm_start_keep_steps

    @warm_start_keep_steps.setter
    def warm_start_keep_steps(self, value: int) -> None:
        from .warm_start import check_keep_steps
        self._warm_start_keep_steps = check_keep_steps(value, self.config.executable_horizon)

    @property
    def max_warm_start_steps(self) -> int:
        """The most denoising steps a warm start may take: fewer than the sampler's (0 for
        a regression head: nothing to denoise)."""
        return 0 if self.config.head == "regression" else len(self.sampler) - 1

    def check_warm_start_steps(self, value: int) -> int:
        """`value` as a valid warm_start_steps for this policy, else ValueError saying why."""
        from .warm_start import check_warm_start_steps
        if self.config.head == "regression":
            if int(value) != 0:
                raise ValueError("warm_start_steps must be 0 for a regression head (nothing to denoise)")
            return 0
        return check_warm_start_steps(value, len(self.sampler))

    @property
    def policy_id(self) -> str:
        return self.config.policy_id or os.path.basename(os.path.normpath(self.source)) or "policy"

    def check_observation(self, obs: dict) -> None:
        """Raise ValueError naming the first part of `obs` with the wrong shape or type."""
        cfg = self.config
        state = np.asarray(obs.get("state", np.zeros((cfg.T_o, 0), np.float32)))
        if state.shape != (cfg.T_o, cfg.state_dim):
            raise ValueError(f"obs['state'] has shape {state.shape}, expected {(cfg.T_o, cfg.state_dim)}")
        if not np.all(np.isfinite(state)):
            raise ValueError("obs['state'] has NaN or Inf values")
        images = obs.get("images", {})
        for cam in cfg.cameras:
            if cam.name not in images:
                raise ValueError(f"obs['images'] has no camera {cam.name!r}")
            frames = images[cam.name]
            want = (cfg.T_o, cam.height, cam.width, 3)
            if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.shape != want:
                got = (getattr(frames, "dtype", type(frames).__name__), getattr(frames, "shape", None))
                raise ValueError(f"obs['images'][{cam.name!r}] must be uint8 {want}, got {got}")

    def _frame_features(self, obs: dict) -> Optional[torch.Tensor]:
        """(T_o, cameras * feature_dim) features, encoding only frames not seen before."""
        cfg = self.config
        if not cfg.cameras:
            return None
        stamps = obs.get("stamps")
        per_camera = []
        for name in cfg.camera_names:
            frames = obs["images"][name]
            keys = [(name,) + frame_key(frames[i], None if stamps is None else stamps[i])
                    for i in range(cfg.T_o)]
            feats = [self.cache.get(k) for k in keys]
            todo = [i for i, f in enumerate(feats) if f is None]
            if todo:
                new = self.engine.encode_camera(name, np.ascontiguousarray(frames[todo]))
                for j, i in enumerate(todo):
                    feats[i] = new[j]
                    self.cache.put(keys[i], new[j])
            per_camera.append(torch.stack(feats))
        return torch.cat(per_camera, dim=-1)

    @torch.inference_mode()
    def predict(self, obs: dict, noise: Optional[np.ndarray] = None,
                previous: Optional["PreviousPlan"] = None,
                plan_stamp_ns: Optional[int] = None) -> np.ndarray:
        """One plan: the full (T_p, action_dim) horizon in action units (float32).

        `noise` is the initial sample x_K of shape (T_p, action_dim); with it (and a DDIM
        sampler, eta 0) the result is deterministic. With ``warm_start_steps`` > 0, a
        `previous` plan and this plan's stamp `plan_stamp_ns`, the previous plan shifted to
        this plan's time grid, diffused with `noise` to the level of step
        K - warm_start_steps, is denoised instead (fewer network calls); without them, or
        when nothing of the previous plan lies ahead, or the robot is not where the previous
        plan put it (``warm_start.departure``), the plan starts cold; ``cold_reason`` says
        which (None after a warm start). A warm start keeps the previous plan as it is up to
        ``warm_start_keep_steps`` steps from the stamp (``warm_start.kept_prefix``).
        """
        cfg = self.config
        self.check_observation(obs)
        state = torch.as_tensor(np.asarray(obs.get("state"), np.float32).reshape(cfg.T_o, cfg.state_dim),
                                device=self.device)
        feats = self._frame_features(obs)
        shape = (1, cfg.T_p, cfg.action_dim)
        if noise is None:
            x = torch.randn(shape, generator=self.generator, device=self.device)
        else:
            noise = np.asarray(noise, np.float32)
            if noise.shape != shape[1:]:
                raise ValueError(f"noise has shape {noise.shape}, expected {shape[1:]}")
            x = torch.from_numpy(noise)[None].to(self.device)
        start, inpaint = 0, None
        self.cold_reason = "warm start off"
        if self._warm_start_steps and previous is not None and plan_stamp_ns is not None:
            from .warm_start import departure, kept_prefix, shift_plan
            init = shift_plan(previous, plan_stamp_ns, cfg.dt, cfg.T_p)
            self.cold_reason = "nothing of the previous plan lies ahead" if init is None else \
                departure(init, state[-1].cpu().numpy(), cfg.state_names, cfg.action_names,
                          self._action_range, cfg.T_o)
            if self.cold_reason is None:
                start = len(self.sampler) - self._warm_start_steps
                x0 = self.model.normalizer.normalize(
                    "action", torch.from_numpy(init)[None].to(self.device))
                inpaint = kept_prefix(x0, x, cfg.T_o, self._warm_start_keep_steps)
                x = self.sampler.add_noise_at(start, x0, x)
        self.last_start_index = start
        actions = self.engine.sample(None if feats is None else feats[None], state[None], x, start,
                                     self.generator, inpaint=inpaint)
        return actions[0].float().cpu().numpy()


def load_policy(path: str | os.PathLike, device: str = "auto", seed: Optional[int] = None,
                **options) -> Policy:
    """Load a checkpoint directory (config.json + model.safetensors). Raises CheckpointError.
    `options`: Policy's backend, precision, warm_start_steps, onnx_dir, ..."""
    cfg = load_config(path)
    model = build_model(cfg)
    load_weights(path, model)
    return Policy(cfg, model, resolve_device(device), source=str(path), seed=seed, **options)
