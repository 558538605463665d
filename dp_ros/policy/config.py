"""Policy configuration: dataclasses with the paper's defaults, validated on load.

A checkpoint's ``config.json`` is ``PolicyConfig.to_dict()``; ``PolicyConfig.from_dict``
rejects unknown keys and bad values with one message naming the field, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class CameraConfig:
    """One camera stream. Raw frames are resized to (height, width) before cropping."""

    name: str = "image"
    height: int = 96
    width: int = 96


@dataclass
class EncoderConfig:
    """Image encoder: ResNet-18 -> spatial softmax -> Linear, one per camera or shared."""

    backbone: str = "resnet18"
    width: int = 64  # first-stage channels; 64 = torchvision's ResNet-18, 16 = a CPU-sized trunk
    norm: str = "group"  # "group" (GroupNorm, channels/16 groups) or "batch"
    num_keypoints: int = 32
    feature_dim: int = 64
    shared: bool = False
    crop_shape: Optional[list[int]] = field(default_factory=lambda: [84, 84])
    random_crop: bool = True  # training only; inference always center-crops
    # pixels scaled to [0, 1], then: "symmetric" -> [-1, 1] (the reference code),
    # "unit" -> left in [0, 1], "imagenet" -> mean/std with ImageNet statistics (LeRobot),
    # "custom" -> (x - image_mean) / image_std per RGB channel (imported checkpoints)
    image_norm: str = "symmetric"
    image_mean: Optional[list[float]] = None  # only with image_norm "custom"
    image_std: Optional[list[float]] = None
    # "spatial_softmax" -> keypoints then Linear to feature_dim (robomimic, LeRobot);
    # "avg" -> global average pool, features = backbone channels (the reference code's
    # MultiImageObsEncoder with a torchvision ResNet whose fc is removed), no Linear
    pool: str = "spatial_softmax"
    # ReLU after the keypoint Linear: LeRobot, and robomimic's ObservationEncoder (the reference
    # code's hybrid policies: feature_activation=nn.ReLU by default); the native default is none
    feature_activation: str = "none"  # or "relu"
    # order of the per-step conditioning vector: reference = images then state; LeRobot = state first
    state_first: bool = False


@dataclass
class UnetConfig:
    """ConditionalUnet1D (Janner et al. temporal U-Net with FiLM conditioning)."""

    down_dims: list[int] = field(default_factory=lambda: [256, 512, 1024])
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 128
    cond_predict_scale: bool = True
    # groups of the GroupNorm in the final Conv1dBlock; None -> n_groups. The reference code
    # and LeRobot always use 8 there, whatever n_groups is (importers set it)
    final_n_groups: Optional[int] = None


@dataclass
class TransformerConfig:
    """Time-series diffusion transformer (minGPT-style, causal, cross-attention to obs)."""

    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 256
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.3
    causal_attn: bool = True
    n_cond_layers: int = 0


@dataclass
class ScheduleConfig:
    """DDPM training schedule and sampler settings (diffusers-compatible semantics)."""

    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"  # or "linear", "scaled_linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # or "sample"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    sampler: str = "ddim"  # or "ddpm"
    num_inference_steps: int = 10
    # DDIM timestep spacing as in diffusers ("leading" is its default)
    timestep_spacing: str = "leading"


@dataclass
class NormStats:
    """Per-dimension statistics for one normalised quantity."""

    mode: str = "min_max"  # "min_max" -> [-1, 1], or "mean_std"
    min: Optional[list[float]] = None
    max: Optional[list[float]] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a policy: architecture, shapes, names, timing."""

    cameras: list[CameraConfig] = field(default_factory=lambda: [CameraConfig()])
    state_names: list[str] = field(default_factory=lambda: ["joint_0", "joint_1"])
    action_names: list[str] = field(default_factory=lambda: ["joint_0", "joint_1"])
    T_o: int = 2  # observation steps in a window
    T_p: int = 16  # predicted action steps (horizon)
    T_a: int = 8  # executed action steps between plans
    dt: float = 0.1  # period of the observation/action grid, seconds
    denoiser: str = "unet"  # or "transformer"
    # "diffusion": the denoiser samples action sequences; "regression": an MSE head on the
    # same encoder (the explicit-policy baseline of the paper, averages modes)
    head: str = "diffusion"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # "state" and "action" -> NormStats; filled from the data before training
    normalizer: dict[str, NormStats] = field(default_factory=dict)
    policy_id: str = ""  # free text, shown in diagnostics

    # -- derived -----------------------------------------------------------------------
    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def action_dim(self) -> int:
        return len(self.action_names)

    @property
    def camera_names(self) -> list[str]:
        return [c.name for c in self.cameras]

    @property
    def executable_horizon(self) -> int:
        """A plan's steps from its stamp on (action indices T_o - 1 .. T_p - 1): the most
        that can be executed, replanned over, or kept by a warm start."""
        return self.T_p - self.T_o + 1

    @property
    def obs_feature_dim(self) -> int:
        """Per-step conditioning width: image features of every camera + state."""
        return len(self.cameras) * self.encoder.feature_dim + self.state_dim

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicyConfig":
        cfg = _build(cls, data, "config")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.T_o >= 1, f"T_o must be >= 1, got {self.T_o}")
        need(self.T_p >= self.T_o, f"T_p ({self.T_p}) must be >= T_o ({self.T_o})")
        need(1 <= self.T_a <= self.executable_horizon,
             f"T_a must be in [1, T_p - T_o + 1] = [1, {self.executable_horizon}], got {self.T_a}")
        need(math.isfinite(self.dt) and self.dt > 0, f"dt must be a positive number, got {self.dt}")
        need(self.action_dim >= 1, "action_names must name at least one action dimension")
        need(len(set(self.action_names)) == self.action_dim, "action_names has duplicates")
        need(len(set(self.state_names)) == self.state_dim, "state_names has duplicates")
        need(len(set(self.camera_names)) == len(self.cameras), "camera names have duplicates")
        need(bool(self.cameras) or self.state_dim > 0, "a policy needs at least one camera or state")
        need(self.head in ("diffusion", "regression"),
             f"head must be 'diffusion' or 'regression', got {self.head!r}")
        need(self.denoiser in ("unet", "transformer"),
             f"denoiser must be 'unet' or 'transformer', got {self.denoiser!r}")
        for cam in self.cameras:
            need(cam.height > 0 and cam.width > 0, f"camera {cam.name!r}: size must be positive")
            if self.encoder.crop_shape is not None:
                ch, cw = self.encoder.crop_shape
                need(0 < ch <= cam.height and 0 < cw <= cam.width,
                     f"encoder.crop_shape {self.encoder.crop_shape} does not fit camera "
                     f"{cam.name!r} of {cam.height}x{cam.width}")
        enc = self.encoder
        need(enc.backbone == "resnet18", f"encoder.backbone {enc.backbone!r} is not supported (resnet18)")
        need(enc.norm in ("group", "batch"), f"encoder.norm must be 'group' or 'batch', got {enc.norm!r}")
        need(enc.image_norm in ("symmetric", "unit", "imagenet", "custom"),
             f"encoder.image_norm must be 'symmetric', 'unit', 'imagenet' or 'custom', got {enc.image_norm!r}")
        if enc.image_norm == "custom":
            for n in ("image_mean", "image_std"):
                v = getattr(enc, n)
                need(v is not None and len(v) == 3 and all(math.isfinite(x) for x in v),
                     f"encoder.{n} must be 3 finite numbers with image_norm 'custom', got {v!r}")
            need(all(x > 0 for x in enc.image_std), f"encoder.image_std must be positive, got {enc.image_std}")
        need(enc.pool in ("spatial_softmax", "avg"),
             f"encoder.pool must be 'spatial_softmax' or 'avg', got {enc.pool!r}")
        if enc.pool == "avg":
            need(enc.feature_dim == 8 * enc.width,
                 f"encoder.pool 'avg' outputs the backbone's {8 * enc.width} channels: "
                 f"encoder.feature_dim must be {8 * enc.width}, got {enc.feature_dim}")
        need(enc.feature_activation in ("none", "relu"),
             f"encoder.feature_activation must be 'none' or 'relu', got {enc.feature_activation!r}")
        need(enc.num_keypoints > 0 and enc.feature_dim > 0, "encoder sizes must be positive")
        need(enc.width >= 16 and enc.width % 16 == 0,
             f"encoder.width must be a positive multiple of 16 (GroupNorm uses channels/16 groups), got {enc.width}")
        need(enc.crop_shape is None or len(enc.crop_shape) == 2, "encoder.crop_shape must be [h, w]")
        u = self.unet
        need(len(u.down_dims) >= 1 and all(d > 0 for d in u.down_dims), "unet.down_dims must be positive")
        need(all(d % u.n_groups == 0 for d in u.down_dims),
             f"unet.down_dims {u.down_dims} must be divisible by unet.n_groups {u.n_groups}")
        need(u.kernel_size % 2 == 1, f"unet.kernel_size must be odd, got {u.kernel_size}")
        need(u.final_n_groups is None or (u.final_n_groups > 0 and u.down_dims[0] % u.final_n_groups == 0),
             f"unet.final_n_groups {u.final_n_groups} must divide unet.down_dims[0] {u.down_dims[0]}")
        if self.denoiser == "unet":
            factor = 2 ** (len(u.down_dims) - 1)
            need(self.T_p % factor == 0,
                 f"T_p ({self.T_p}) must be divisible by {factor} for a U-Net with "
                 f"{len(u.down_dims)} levels")
        t = self.transformer
        need(t.n_emb % t.n_head == 0, f"transformer.n_emb {t.n_emb} must be divisible by n_head {t.n_head}")
        s = self.schedule
        need(s.num_train_timesteps >= 1, "schedule.num_train_timesteps must be >= 1")
        need(s.beta_schedule in ("squaredcos_cap_v2", "linear", "scaled_linear"),
             f"schedule.beta_schedule {s.beta_schedule!r} is not supported")
        need(s.prediction_type in ("epsilon", "sample"),
             f"schedule.prediction_type must be 'epsilon' or 'sample', got {s.prediction_type!r}")
        need(s.sampler in ("ddim", "ddpm"), f"schedule.sampler must be 'ddim' or 'ddpm', got {s.sampler!r}")
        need(1 <= s.num_inference_steps <= s.num_train_timesteps,
             f"schedule.num_inference_steps must be in [1, {s.num_train_timesteps}]")
        need(s.timestep_spacing in ("leading", "trailing", "linspace"),
             f"schedule.timestep_spacing {s.timestep_spacing!r} is not supported")
        for key, st in self.normalizer.items():
            need(key in ("state", "action"), f"normalizer key {key!r} is not 'state' or 'action'")
            dim = self.state_dim if key == "state" else self.action_dim
            need(st.mode in ("min_max", "mean_std"), f"normalizer.{key}.mode {st.mode!r} is not supported")
            names = ("min", "max") if st.mode == "min_max" else ("mean", "std")
            for n in names:
                v = getattr(st, n)
                need(v is not None and len(v) == dim,
                     f"normalizer.{key}.{n} must have {dim} values, got {None if v is None else len(v)}")
                need(all(math.isfinite(x) for x in v), f"normalizer.{key}.{n} has a non-finite value")


def _build(cls, data: Any, where: str):
    """Recursively build a dataclass from plain data, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}"
        kwargs[name] = _convert(fields[name].type, value, sub)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature errors
        raise ConfigError(f"{where}: {exc}") from None


_NESTED = {
    "EncoderConfig": EncoderConfig,
    "UnetConfig": UnetConfig,
    "TransformerConfig": TransformerConfig,
    "ScheduleConfig": ScheduleConfig,
}


def _convert(type_str: Any, value: Any, where: str) -> Any:
    t = str(type_str)
    if t in _NESTED:
        return _build(_NESTED[t], value, where)
    if t == "list[CameraConfig]":
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list")
        return [_build(CameraConfig, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if t == "dict[str, NormStats]":
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping")
        return {k: _build(NormStats, v, f"{where}.{k}") for k, v in value.items()}
    scalar = {"int": int, "float": float, "bool": bool, "str": str}.get(t)
    if scalar is not None:
        if scalar is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, scalar) or (scalar is int and isinstance(value, bool)):
            raise ConfigError(f"{where} must be {t}, got {value!r}")
        return value
    if t.startswith("list[") or t.startswith("Optional[list["):
        if value is None and t.startswith("Optional"):
            return None
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return list(value)
    return value
