"""Import a LeRobot diffusion policy (``save_pretrained`` directory) as a dp_ros checkpoint.

Layouts read:
- LeRobot >= 0.4: ``config.json`` + ``model.safetensors`` (``diffusion.*``) + the processor
  files ``policy_preprocessor.json`` / ``policy_postprocessor.json`` and their
  ``*_normalizer_processor.safetensors`` / ``*_unnormalizer_processor.safetensors`` (keys
  ``<feature>.<stat>``);
- LeRobot <= 0.3: statistics inside ``model.safetensors`` (``normalize_inputs.buffer_<feature>.*``,
  ``unnormalize_outputs.buffer_action.*``);
- config.json with ``input_features``/``normalization_mapping`` (LeRobot >= 0.1) or the
  older ``input_shapes``/``input_normalization_modes``.

What LeRobot computes and how it maps: conditioning per observation step is
``[state, camera features...]`` (dp_ros ``state_first``); each camera feature is
ResNet-18 -> spatial softmax -> Linear -> ReLU; images are pixels/255 normalised per
channel; state/action use MIN_MAX, MEAN_STD, QUANTILES or IDENTITY statistics (all affine,
converted to dp_ros min-max statistics); DDPM or DDIM (eta 0) from diffusers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..checkpoint import save_checkpoint
from ..config import (CameraConfig, ConfigError, EncoderConfig, PolicyConfig, ScheduleConfig,
                      UnetConfig)
from ..model import build_model
from . import (ImportRefused, ImportResult, check_center_crop, fill_model, finite_float,
               image_norm_fields, names_or_default, resnet_children_key, resnet_width,
               same_image_norm, stats_from_normalize, stats_from_unnormalize)

STATE_KEY = "observation.state"
ACTION_KEY = "action"
ENV_STATE_KEY = "observation.environment_state"

# config.json keys that only matter for training, bookkeeping or devices
_IGNORED = {
    "type", "device", "use_amp", "use_peft", "push_to_hub", "repo_id", "private", "tags", "license",
    "pretrained_path", "drop_n_last_frames", "compile_model", "compile_mode", "do_mask_loss_for_padding",
    "optimizer_lr", "optimizer_betas", "optimizer_eps", "optimizer_weight_decay", "scheduler_name",
    "scheduler_warmup_steps", "crop_is_random", "pretrained_backbone_weights", "crop_ratio",
}
_HANDLED = {
    "n_obs_steps", "horizon", "n_action_steps", "input_features", "output_features",
    "normalization_mapping", "input_shapes", "output_shapes", "input_normalization_modes",
    "output_normalization_modes", "vision_backbone", "resize_shape", "crop_shape",
    "use_group_norm", "spatial_softmax_num_keypoints", "use_separate_rgb_encoder_per_camera",
    "down_dims", "kernel_size", "n_groups", "diffusion_step_embed_dim", "use_film_scale_modulation",
    "noise_scheduler_type", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
    "prediction_type", "clip_sample", "clip_sample_range", "num_inference_steps",
}
_AFFINE_MODES = ("MIN_MAX", "MEAN_STD", "QUANTILES", "QUANTILE10", "IDENTITY")
_RANGE_STATS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImportRefused(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ImportRefused(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ImportRefused(f"{path}: unreadable safetensors file ({exc})") from None


def camera_name(key: str) -> str:
    """'observation.images.top' -> 'top'; 'observation.image' -> 'image'."""
    if key.startswith("observation.images."):
        return key[len("observation.images."):]
    if key == "observation.image":
        return "image"
    return key[len("observation."):].replace(".", "_") if key.startswith("observation.") else key


def _features(conf: dict, src: Path) -> tuple[dict, dict]:
    """(feature key -> (type, shape)) and (type -> normalisation mode), either config style."""
    if "input_features" in conf:
        feats = {}
        for group in ("input_features", "output_features"):
            for key, ft in (conf.get(group) or {}).items():
                if not isinstance(ft, dict) or "type" not in ft or "shape" not in ft:
                    raise ImportRefused(f"{src}: {group}.{key} is not a {{type, shape}} feature")
                feats[key] = (str(ft["type"]), [int(s) for s in ft["shape"]])
        modes = {str(k): str(v) for k, v in (conf.get("normalization_mapping") or {}).items()}
        return feats, {k: ("type", v) for k, v in modes.items()}
    if "input_shapes" in conf:  # LeRobot before the features refactor
        feats = {}
        for key, shape in {**conf.get("input_shapes", {}), **conf.get("output_shapes", {})}.items():
            if key.startswith("observation.image"):
                kind = "VISUAL"
            elif key == STATE_KEY:
                kind = "STATE"
            elif key == ENV_STATE_KEY:
                kind = "ENV"
            elif key == ACTION_KEY:
                kind = "ACTION"
            else:
                raise ImportRefused(f"{src}: input {key!r} is not a LeRobot diffusion input")
            feats[key] = (kind, [int(s) for s in shape])
        modes = {**conf.get("input_normalization_modes", {}), **conf.get("output_normalization_modes", {})}
        return feats, {k: ("key", str(v).upper()) for k, v in modes.items()}
    raise ImportRefused(f"{src}: config.json has neither input_features nor input_shapes")


def _norm_mode(key: str, kind: str, modes: dict) -> str:
    for k, (how, mode) in modes.items():
        if (how == "type" and k == kind) or (how == "key" and k == key):
            return mode
    return "IDENTITY"


def _processor_stats(src: Path, prefix: str, kind: str) -> tuple[dict, float]:
    """Statistics (feature -> stat -> tensor) and eps of the (un)normalizer step of a pipeline."""
    pipeline = _read_json(src / f"{prefix}.json")
    registry = "normalizer_processor" if kind == "normalizer" else "unnormalizer_processor"
    steps = [s for s in pipeline.get("steps", []) if s.get("registry_name") == registry]
    if len(steps) != 1:
        raise ImportRefused(f"{src / (prefix + '.json')}: expected one {registry} step, found {len(steps)}")
    step = steps[0]
    state_file = step.get("state_file")
    if not state_file:
        raise ImportRefused(f"{src / (prefix + '.json')}: the {registry} step has no state_file")
    flat = _read_safetensors(src / state_file)
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        feature, _, stat = k.rpartition(".")
        stats.setdefault(feature, {})[stat] = v
    eps = finite_float(step.get("config", {}).get("eps", 1e-8), f"{prefix} eps")
    for other in pipeline.get("steps", []):
        name = other.get("registry_name")
        if name not in (registry, "rename_observations_processor", "to_batch_processor", "device_processor"):
            raise ImportRefused(f"{src / (prefix + '.json')}: processor step {name!r} is not supported")
        if name == "rename_observations_processor" and other.get("config", {}).get("rename_map"):
            raise ImportRefused(f"{src / (prefix + '.json')}: a non-empty rename_map is not supported "
                                f"(rename the features in the robot's topics instead)")
    return stats, eps


def _legacy_stats(weights: dict, feats: dict) -> tuple[dict, dict]:
    """LeRobot <= 0.3: buffers normalize_inputs.buffer_<key with _>.<stat> in the weights."""
    inputs, outputs = {}, {}
    for key in feats:
        buf = "buffer_" + key.replace(".", "_")
        for prefix, dest in (("normalize_inputs.", inputs), ("unnormalize_outputs.", outputs)):
            for stat in ("min", "max", "mean", "std"):
                name = f"{prefix}{buf}.{stat}"
                if name in weights:
                    dest.setdefault(key, {})[stat] = weights[name]
    return inputs, outputs


def _affine(stats: dict, key: str, mode: str, eps: float, legacy: bool, inverse: bool, src: str):
    """(scale, offset, anchor) of LeRobot's map for one feature, as it computes it.

    forward: y = scale * x + offset (anchor: a data value); inverse: x = scale * y + offset
    (anchor: the normalised value of the recorded constant)."""
    if mode == "IDENTITY":
        return None
    if mode not in _AFFINE_MODES:
        raise ImportRefused(f"{src}: normalisation mode {mode!r} for {key!r} is not supported")
    st = stats.get(key)
    if mode == "MEAN_STD":
        if st is None or "mean" not in st or "std" not in st:
            raise ImportRefused(f"{src}: no mean/std statistics for {key!r}")
        mean, std = st["mean"].double(), st["std"].double()
        if inverse:
            return std, mean, torch.zeros_like(mean)
        return 1.0 / (std + eps), -mean / (std + eps), mean
    lo_name, hi_name = _RANGE_STATS[mode]
    if st is None or lo_name not in st or hi_name not in st:
        raise ImportRefused(f"{src}: no {lo_name}/{hi_name} statistics for {key!r}")
    lo, hi = st[lo_name].double(), st[hi_name].double()
    if legacy:  # (x - min) / (max - min + 1e-8) * 2 - 1 ; inverse without the 1e-8
        denom = hi - lo + 1e-8
        if inverse:
            return (hi - lo) / 2, lo + (hi - lo) / 2, -torch.ones_like(lo)
    else:
        denom = torch.where(hi - lo == 0, torch.full_like(lo, eps), hi - lo)
        if inverse:
            return denom / 2, lo + denom / 2, -torch.ones_like(lo)
    return 2.0 / denom, -2.0 * lo / denom - 1.0, lo


def import_lerobot(src, out, *, dt: Optional[float] = None, state_names: Optional[Sequence[str]] = None,
                   action_names: Optional[Sequence[str]] = None, policy_id: Optional[str] = None
                   ) -> ImportResult:
    """Convert LeRobot's ``src`` directory into a dp_ros checkpoint directory ``out``."""
    src = Path(src)
    if not src.is_dir():
        raise ImportRefused(f"{src}: not a directory (expected a LeRobot save_pretrained directory)")
    for f in ("config.json", "model.safetensors"):
        if not (src / f).is_file():
            raise ImportRefused(f"{src}: missing {f}")
    conf = _read_json(src / "config.json")
    notes: list[str] = []
    if dt is None:
        dt = 0.1
        notes.append("dt 0.1 s (default: a LeRobot policy does not record its control rate; pass --dt)")
    if conf.get("type", "diffusion") != "diffusion":
        raise ImportRefused(f"{src}: policy type {conf.get('type')!r} is not a diffusion policy")
    unknown = sorted(set(conf) - _IGNORED - _HANDLED)
    if unknown:
        raise ImportRefused(f"{src}/config.json: unknown setting(s) {unknown}; refusing rather than "
                            f"guessing whether they change the computation")

    feats, modes = _features(conf, src)
    cams = [k for k, (kind, _) in feats.items() if kind == "VISUAL"]
    # defaults changed between LeRobot releases (crop 84 -> none, ...): never fill them in
    required = ["n_obs_steps", "horizon", "n_action_steps", "down_dims", "noise_scheduler_type"]
    if cams:
        required += ["crop_shape", "use_group_norm", "use_separate_rgb_encoder_per_camera",
                     "spatial_softmax_num_keypoints"]
    missing = [k for k in required if k not in conf]
    if missing:
        raise ImportRefused(f"{src}/config.json lacks {missing}; their defaults differ between LeRobot "
                            f"releases, so they must be stated")
    if ENV_STATE_KEY in feats:
        raise ImportRefused(f"{src}: input {ENV_STATE_KEY!r} is not supported (dp_ros conditions on "
                            f"cameras and one state vector)")
    if STATE_KEY not in feats or ACTION_KEY not in feats:
        raise ImportRefused(f"{src}: needs {STATE_KEY!r} and {ACTION_KEY!r} features")
    extra = [k for k, (kind, _) in feats.items() if kind not in ("VISUAL", "STATE", "ACTION")
             or (kind == "STATE" and k != STATE_KEY) or (kind == "ACTION" and k != ACTION_KEY)]
    if extra:
        raise ImportRefused(f"{src}: feature(s) {extra} are not supported")
    state_dim = feats[STATE_KEY][1][0]
    action_dim = feats[ACTION_KEY][1][0]

    if conf.get("vision_backbone", "resnet18") != "resnet18" and cams:
        raise ImportRefused(f"{src}: vision_backbone {conf.get('vision_backbone')!r} is not supported (resnet18)")
    resize = conf.get("resize_shape")
    if resize is not None and cams:
        raise ImportRefused(f"{src}: resize_shape {resize} (a resize inside the model) is not supported; "
                            f"dp_ros resizes camera frames before the policy")
    crop = conf.get("crop_shape")
    crop = [int(c) for c in crop] if crop is not None else None
    shapes = {k: feats[k][1] for k in cams}
    for k, shape in shapes.items():
        if len(shape) != 3 or shape[0] != 3:
            raise ImportRefused(f"{src}: camera {k!r} has shape {shape}; only RGB (3, H, W) is supported")
        check_center_crop(shape[1], shape[2], crop, f"{src}: camera {k!r}")
    if conf.get("pretrained_backbone_weights"):
        notes.append(f"pretrained_backbone_weights {conf['pretrained_backbone_weights']!r} only "
                     f"initialised training; the trained backbone weights are imported")

    # -- weights and statistics ----------------------------------------------------------------
    weights = _read_safetensors(src / "model.safetensors")
    weights = {k.replace("._orig_mod.", ".").replace("_orig_mod.", ""): v for k, v in weights.items()}
    legacy = any(k.startswith(("normalize_inputs.", "unnormalize_outputs.", "normalize_targets."))
                 for k in weights)
    if legacy:
        in_stats, out_stats = _legacy_stats(weights, feats)
        in_eps = out_eps = 1e-8
        layout = "LeRobot <= 0.3 (statistics in model.safetensors)"
    else:
        pre, post = src / "policy_preprocessor.json", src / "policy_postprocessor.json"
        if not pre.is_file() or not post.is_file():
            raise ImportRefused(f"{src}: no normalisation statistics: neither normalize_inputs.* weights "
                                f"(LeRobot <= 0.3) nor policy_preprocessor.json/policy_postprocessor.json "
                                f"(LeRobot >= 0.4)")
        in_stats, in_eps = _processor_stats(src, "policy_preprocessor", "normalizer")
        out_stats, out_eps = _processor_stats(src, "policy_postprocessor", "unnormalizer")
        layout = "LeRobot >= 0.4 (processor files)"
    where = str(src)

    state_mode = _norm_mode(STATE_KEY, "STATE", modes)
    action_mode = _norm_mode(ACTION_KEY, "ACTION", modes)
    normalizer = {}
    aff = _affine(in_stats, STATE_KEY, state_mode, in_eps, legacy, False, where)
    if aff is not None:
        normalizer["state"] = stats_from_normalize(*aff, what=f"{STATE_KEY} ({state_mode})", notes=notes)
    aff = _affine(out_stats, ACTION_KEY, action_mode, out_eps, legacy, True, where)
    if aff is not None:
        normalizer["action"] = stats_from_unnormalize(*aff, what=f"{ACTION_KEY} ({action_mode})", notes=notes)

    cam_names = [camera_name(k) for k in cams]
    enc_norm = {"image_norm": "unit"}
    if cams:
        per_cam = []
        for k in cams:
            mode = _norm_mode(k, "VISUAL", modes)
            aff = _affine(in_stats, k, mode, in_eps, legacy, False, where)
            if aff is None:
                per_cam.append({"image_norm": "unit"})
            else:
                scale, offset, _ = aff
                if scale.numel() not in (1, 3) or offset.numel() not in (1, 3):
                    raise ImportRefused(f"{src}: image statistics of {k!r} are not per channel "
                                        f"(shape {tuple(scale.shape)})")
                per_cam.append(image_norm_fields(scale, offset, f"{k} ({mode})"))
        enc_norm = same_image_norm(per_cam, cam_names)

    # -- architecture ----------------------------------------------------------------------------
    separate = bool(conf.get("use_separate_rgb_encoder_per_camera", False))
    enc_prefixes = ([f"diffusion.rgb_encoder.{i}." for i in range(len(cams))] if separate
                    else ["diffusion.rgb_encoder."]) if cams else []
    width = resnet_width(weights, enc_prefixes[0] + "backbone.0.weight", where) if cams else 64
    group_norm = bool(conf.get("use_group_norm", True))
    has_running = any(k.startswith("diffusion.rgb_encoder.") and k.endswith("running_mean") for k in weights)
    if cams and has_running == group_norm:
        raise ImportRefused(f"{src}: use_group_norm is {group_norm} but the backbone weights "
                            f"{'have' if has_running else 'lack'} BatchNorm running statistics")
    num_kp = int(conf.get("spatial_softmax_num_keypoints", 32))
    down_dims = [int(d) for d in conf.get("down_dims", (512, 1024, 2048))]
    sched_type = str(conf.get("noise_scheduler_type", "DDPM")).upper()
    if sched_type not in ("DDPM", "DDIM"):
        raise ImportRefused(f"{src}: noise_scheduler_type {sched_type!r} is not supported (DDPM, DDIM)")
    n_train = int(conf.get("num_train_timesteps", 100))
    n_inf = conf.get("num_inference_steps")
    n_inf = n_train if n_inf is None else int(n_inf)
    horizon = int(conf.get("horizon", 16))
    if horizon % (2 ** len(down_dims)) != 0:
        raise ImportRefused(f"{src}: horizon {horizon} is not a multiple of 2**len(down_dims)")

    try:
        cfg = PolicyConfig(
            cameras=[CameraConfig(name=n, height=shapes[k][1], width=shapes[k][2]) for n, k in zip(cam_names, cams)],
            state_names=names_or_default(state_names, state_dim, "state", "state names"),
            action_names=names_or_default(action_names, action_dim, "action", "action names"),
            T_o=int(conf.get("n_obs_steps", 2)), T_p=horizon, T_a=int(conf.get("n_action_steps", 8)),
            dt=float(dt), denoiser="unet",
            encoder=EncoderConfig(width=width, norm="group" if group_norm else "batch",
                                  num_keypoints=num_kp, feature_dim=2 * num_kp, shared=not separate,
                                  crop_shape=crop, random_crop=bool(conf.get("crop_is_random", True)),
                                  feature_activation="relu", state_first=True, **enc_norm),
            unet=UnetConfig(down_dims=down_dims, kernel_size=int(conf.get("kernel_size", 5)),
                            n_groups=int(conf.get("n_groups", 8)),
                            step_embed_dim=int(conf.get("diffusion_step_embed_dim", 128)),
                            cond_predict_scale=bool(conf.get("use_film_scale_modulation", True)),
                            final_n_groups=8),
            schedule=ScheduleConfig(
                num_train_timesteps=n_train, beta_schedule=str(conf.get("beta_schedule", "squaredcos_cap_v2")),
                beta_start=finite_float(conf.get("beta_start", 1e-4), "beta_start"),
                beta_end=finite_float(conf.get("beta_end", 0.02), "beta_end"),
                prediction_type=str(conf.get("prediction_type", "epsilon")),
                clip_sample=bool(conf.get("clip_sample", True)),
                clip_sample_range=finite_float(conf.get("clip_sample_range", 1.0), "clip_sample_range"),
                set_alpha_to_one=True, steps_offset=0, sampler=sched_type.lower(),
                num_inference_steps=n_inf, timestep_spacing="leading"),
            normalizer=normalizer,
            policy_id=policy_id or f"lerobot:{src.resolve().name}",
        )
        cfg.validate()
    except ConfigError as exc:
        raise ImportRefused(f"{src}: {exc}") from None

    # -- weights ---------------------------------------------------------------------------------
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    used: set[str] = set()
    for i, prefix in enumerate(enc_prefixes):
        for k, v in weights.items():
            if not k.startswith(prefix):
                continue
            rest = k[len(prefix):]
            target = None
            if rest.startswith("backbone."):
                inner = resnet_children_key(rest[len("backbone."):])
                target = None if inner is None else f"backbone.{inner}"
            elif rest.startswith(("pool.nets.", "out.")):
                target = rest
            elif rest == "pool.pos_grid":
                used.add(k)
                continue
            if target is None:
                raise ImportRefused(f"{src}: unexpected encoder weight {k!r}")
            mapped[f"obs_encoder.encoders.{i}.{target}"] = v
            origin[f"obs_encoder.encoders.{i}.{target}"] = k
            used.add(k)
    for k, v in weights.items():
        if not k.startswith("diffusion.unet."):
            continue
        rest = k[len("diffusion.unet."):]
        rest = rest.replace(".conv1.block.", ".blocks.0.block.").replace(".conv2.block.", ".blocks.1.block.")
        parts = rest.split(".")
        if parts[0] in ("down_modules", "up_modules") and len(parts) == 4 and parts[2] == "2":
            rest = ".".join(parts[:3] + ["conv", parts[3]])  # bare Conv1d -> Downsample1d/Upsample1d.conv
        mapped[f"denoiser.{rest}"] = v
        origin[f"denoiser.{rest}"] = k
        used.add(k)
    stat_keys = {k for k in weights if k.startswith(("normalize_inputs.", "normalize_targets.",
                                                      "unnormalize_outputs."))}
    leftover = sorted(set(weights) - used - stat_keys)
    if leftover:
        raise ImportRefused(f"{src}: weights not understood: {leftover[:5]}")

    model = build_model(cfg)
    fill_model(model, mapped, str(src / "model.safetensors"), origin)
    out = Path(out)
    save_checkpoint(out, cfg, model)
    notes.insert(0, f"read {layout}")
    return ImportResult(out=out, config=cfg, source=str(src), notes=notes)
