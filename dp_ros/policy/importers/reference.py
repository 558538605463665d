"""Import a checkpoint of the paper's reference code (real-stanford/diffusion_policy).

The ``.ckpt`` is ``torch.save({'cfg', 'state_dicts': {'model', 'ema_model', 'optimizer'},
'pickles'}, pickle_module=dill)``: a pickle. It is read only with ``--trust-pickle``, and even
then through ``safe_unpickle`` (tensors and plain data; the Hydra/OmegaConf config becomes
plain dicts and lists, never OmegaConf objects). ``pickles`` (dill blobs) are never opened.

Supported policies (``cfg.policy._target_``):
- ``DiffusionUnetHybridImagePolicy``: robomimic encoder per RGB key (ResNet-18 -> spatial
  softmax -> Linear -> ReLU), GroupNorm or BatchNorm, crop, U-Net with global conditioning;
- ``DiffusionTransformerHybridImagePolicy``: the same encoder, transformer denoiser;
- ``DiffusionUnetImagePolicy``: ``MultiImageObsEncoder`` (torchvision ResNet-18 with global
  average pooling, optional shared model, crop, ImageNet normalisation), U-Net;
- ``DiffusionUnetLowdimPolicy`` (global conditioning) and ``DiffusionTransformerLowdimPolicy``.
The EMA weights are used when the checkpoint has them. DDPM (fixed_small) and DDIM (eta 0)
schedulers from diffusers. Everything else is refused with its name.
"""

from __future__ import annotations

import ast
import operator
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..checkpoint import save_checkpoint
from ..config import (CameraConfig, ConfigError, EncoderConfig, PolicyConfig, ScheduleConfig,
                      TransformerConfig, UnetConfig)
from ..model import build_model
from . import (ImportRefused, ImportResult, check_center_crop, condition_layout, fill_model,
               finite_float, image_norm_fields, names_or_default, permute_condition_columns,
               resnet_children_key, resnet_width, same_image_norm, stats_from_normalize,
               stats_from_unnormalize)
from .safe_unpickle import PickleRefused, load_torch_archive, to_plain

_REQUIRED = object()


# -- the Hydra config, as plain data with OmegaConf interpolations resolved on access ----------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}


_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge}


def _arith(expr: str) -> Any:
    """Evaluate an ``${eval:'...'}`` resolver: numbers, booleans, None, + - * / // % **,
    comparisons, and/or/not and ``a if c else b``. Nothing else is evaluated."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (int, float, bool))):
            return node.value
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            if isinstance(node.op, ast.And):
                return all(values)
            return any(values)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not ev(node.operand)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            return _CMPOPS[type(node.ops[0])](ev(node.left), ev(node.comparators[0]))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        raise ValueError(f"unsupported element {type(node).__name__}")
    try:
        return ev(ast.parse(expr.strip(), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError) as exc:
        raise ImportRefused(f"config: cannot evaluate eval resolver {expr!r} ({exc}); only arithmetic "
                            f"is evaluated") from None


class Unresolved:
    """A config value that could not be resolved; harmless unless an importer uses it."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"<unresolved: {self.reason}>"


class HydraConfig:
    """Read access to the checkpoint's config with ``${path}``, ``${.rel}`` and ``${eval:...}``."""

    def __init__(self, root: Any):
        if not isinstance(root, dict):
            raise ImportRefused(f"checkpoint cfg is a {type(root).__name__}, expected a mapping")
        self.root = root
        self._active: list[str] = []  # paths being resolved (interpolation loops)

    def get(self, path: str, default: Any = _REQUIRED) -> Any:
        if path in self._active or len(self._active) > 32:
            raise ImportRefused(f"checkpoint config: interpolation loop through '{path}'")
        self._active.append(path)
        try:
            return self._get(path, default)
        finally:
            self._active.pop()

    def _get(self, path: str, default: Any) -> Any:
        parts = [p for p in path.split(".") if p]
        cur, where = self.root, []
        for p in parts:
            cur = self._resolve(cur, where)
            if isinstance(cur, dict) and p in cur:
                cur = cur[p]
            elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
                cur = cur[int(p)]
            else:
                if default is _REQUIRED:
                    raise ImportRefused(f"checkpoint config has no '{path}'")
                return default
            where = where + [p]
        return self._deep(self._resolve(cur, where), where)  # the value itself must resolve

    def _deep(self, value: Any, where: list, depth: int = 0) -> Any:
        try:
            value = self._resolve(value, where, depth)
        except ImportRefused as exc:
            if not where or len(self._active) > 1:
                raise
            return Unresolved(str(exc))  # refused only if an importer reads it
        if isinstance(value, dict):
            return {k: self._deep(v, where + [str(k)], depth) for k, v in value.items()}
        if isinstance(value, list):
            return [self._deep(v, where + [str(i)], depth) for i, v in enumerate(value)]
        return value

    def _resolve(self, value: Any, where: list, depth: int = 0) -> Any:
        if not isinstance(value, str) or "${" not in value:
            if value == "???":
                raise ImportRefused(f"checkpoint config value '{'.'.join(where)}' is missing (???)")
            return value
        if depth > 32:
            raise ImportRefused(f"checkpoint config: interpolation loop at '{'.'.join(where)}'")
        pieces, i, whole = [], 0, None
        while i < len(value):
            j = value.find("${", i)
            if j < 0:
                pieces.append(value[i:])
                break
            pieces.append(value[i:j])
            k, level = j + 2, 1
            while k < len(value) and level:
                if value.startswith("${", k):
                    level, k = level + 1, k + 2
                    continue
                if value[k] == "}":
                    level -= 1
                k += 1
            if level:
                raise ImportRefused(f"checkpoint config: unbalanced interpolation {value!r}")
            resolved = self._interpolate(value[j + 2:k - 1], where, depth)
            if j == 0 and k == len(value):
                whole = resolved
            pieces.append(resolved)
            i = k
        if whole is not None and len(pieces) <= 2 and pieces[0] == "":
            return self._resolve(whole, where, depth + 1)
        return "".join(str(p) for p in pieces)

    def _interpolate(self, expr: str, where: list, depth: int) -> Any:
        expr = expr.strip()
        if expr.startswith("eval:"):
            inner = expr[len("eval:"):].strip()
            if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                inner = inner[1:-1]
            return _arith(str(self._resolve(inner, where, depth + 1)))
        if ":" in expr:
            raise ImportRefused(f"checkpoint config: resolver '${{{expr}}}' at '{'.'.join(where)}' is not "
                                f"supported")
        if expr.startswith("."):
            up = len(expr) - len(expr.lstrip("."))
            base = where[:-1][: max(0, len(where) - up)] if up else where
            path = ".".join(base + [expr.lstrip(".")])
        else:
            path = expr
        return self.get(path)


# -- helpers --------------------------------------------------------------------------------

def _target_name(node: Any, what: str) -> str:
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        raise ImportRefused(f"config {what} has no _target_")
    return node["_target_"].rsplit(".", 1)[-1]


def _as_int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or int(x) != x:
        raise ImportRefused(f"config {what} must be an integer, got {x!r}")
    return int(x)


def _normalizer(sd: dict, key: str, ckpt: str):
    prefix = f"normalizer.params_dict.{key}."
    scale, offset = sd.get(prefix + "scale"), sd.get(prefix + "offset")
    if scale is None or offset is None:
        raise ImportRefused(f"{ckpt}: no normaliser for {key!r} ({prefix}scale/offset)")
    return scale.double().reshape(-1), offset.double().reshape(-1)


_SCHED_KEYS = {
    "DDPMScheduler": {"_target_", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                      "variance_type", "clip_sample", "prediction_type", "trained_betas",
                      "clip_sample_range", "timestep_spacing", "steps_offset", "thresholding",
                      "dynamic_thresholding_ratio", "sample_max_value", "rescale_betas_zero_snr"},
    "DDIMScheduler": {"_target_", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                      "clip_sample", "set_alpha_to_one", "steps_offset", "prediction_type",
                      "trained_betas", "clip_sample_range", "timestep_spacing", "thresholding",
                      "dynamic_thresholding_ratio", "sample_max_value", "rescale_betas_zero_snr"},
}


def _schedule(sched: dict, num_inference_steps, step_kwargs: dict, ckpt: str, notes: list) -> ScheduleConfig:
    kind = _target_name(sched, "policy.noise_scheduler")
    if kind not in _SCHED_KEYS:
        raise ImportRefused(f"{ckpt}: noise scheduler {kind!r} is not supported (DDPMScheduler, DDIMScheduler)")
    unknown = sorted(set(sched) - _SCHED_KEYS[kind])
    if unknown:
        raise ImportRefused(f"{ckpt}: noise_scheduler setting(s) {unknown} are not supported")
    if sched.get("trained_betas") is not None:
        raise ImportRefused(f"{ckpt}: noise_scheduler.trained_betas is not supported")
    for flag in ("thresholding", "rescale_betas_zero_snr"):
        if sched.get(flag):
            raise ImportRefused(f"{ckpt}: noise_scheduler.{flag} is not supported")
    if kind == "DDPMScheduler" and sched.get("variance_type", "fixed_small") != "fixed_small":
        raise ImportRefused(f"{ckpt}: DDPM variance_type {sched.get('variance_type')!r} is not supported "
                            f"(fixed_small)")
    for k, v in step_kwargs.items():
        if k == "eta" and kind == "DDIMScheduler" and float(v) == 0.0:
            continue
        if k == "use_clipped_model_output" and not v:
            continue
        raise ImportRefused(f"{ckpt}: policy setting {k}={v!r} (passed to the scheduler's step) is not "
                            f"supported")
    n_train = _as_int(sched.get("num_train_timesteps", 1000), "noise_scheduler.num_train_timesteps")
    k = n_train if num_inference_steps is None else _as_int(num_inference_steps, "num_inference_steps")
    # two cases where diffusers 0.11 (the reference's original environment) differs from later
    # releases (its current environment pins 0.30): dp_ros follows the later semantics
    if kind == "DDIMScheduler" and sched.get("prediction_type", "epsilon") == "sample":
        notes.append("DDIM with prediction_type 'sample': noise direction from the re-derived epsilon, "
                     "as diffusers >= 0.12 (diffusers 0.11 used the predicted sample itself)")
    if kind == "DDPMScheduler" and k != n_train:
        notes.append(f"DDPM with {k} of {n_train} steps: skip-step posterior as diffusers >= 0.12 "
                     f"(diffusers 0.11 used the one-step coefficients)")
    return ScheduleConfig(
        num_train_timesteps=n_train,
        beta_schedule=str(sched.get("beta_schedule", "linear")),
        beta_start=finite_float(sched.get("beta_start", 0.0001), "beta_start"),
        beta_end=finite_float(sched.get("beta_end", 0.02), "beta_end"),
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        clip_sample=bool(sched.get("clip_sample", True)),
        clip_sample_range=finite_float(sched.get("clip_sample_range", 1.0), "clip_sample_range"),
        set_alpha_to_one=bool(sched.get("set_alpha_to_one", True)),
        steps_offset=_as_int(sched.get("steps_offset", 0), "steps_offset"),
        sampler="ddpm" if kind == "DDPMScheduler" else "ddim",
        num_inference_steps=k,
        timestep_spacing=str(sched.get("timestep_spacing", "leading")),
    )


_POLICY_KEYS = {
    "DiffusionUnetHybridImagePolicy": (
        {"shape_meta", "noise_scheduler", "horizon", "n_action_steps", "n_obs_steps",
         "num_inference_steps", "obs_as_global_cond", "crop_shape", "diffusion_step_embed_dim",
         "down_dims", "kernel_size", "n_groups", "cond_predict_scale", "obs_encoder_group_norm",
         "eval_fixed_crop"},
        {"obs_as_global_cond": True, "crop_shape": (76, 76), "diffusion_step_embed_dim": 256,
         "down_dims": (256, 512, 1024), "kernel_size": 5, "n_groups": 8, "cond_predict_scale": True,
         "obs_encoder_group_norm": False, "eval_fixed_crop": False, "num_inference_steps": None}),
    "DiffusionTransformerHybridImagePolicy": (
        {"shape_meta", "noise_scheduler", "horizon", "n_action_steps", "n_obs_steps",
         "num_inference_steps", "crop_shape", "obs_encoder_group_norm", "eval_fixed_crop", "n_layer",
         "n_cond_layers", "n_head", "n_emb", "p_drop_emb", "p_drop_attn", "causal_attn",
         "time_as_cond", "obs_as_cond", "pred_action_steps_only"},
        {"crop_shape": (76, 76), "obs_encoder_group_norm": False, "eval_fixed_crop": False,
         "n_layer": 8, "n_cond_layers": 0, "n_head": 4, "n_emb": 256, "p_drop_emb": 0.0,
         "p_drop_attn": 0.3, "causal_attn": True, "time_as_cond": True, "obs_as_cond": True,
         "pred_action_steps_only": False, "num_inference_steps": None}),
    "DiffusionUnetImagePolicy": (
        {"shape_meta", "noise_scheduler", "obs_encoder", "horizon", "n_action_steps", "n_obs_steps",
         "num_inference_steps", "obs_as_global_cond", "diffusion_step_embed_dim", "down_dims",
         "kernel_size", "n_groups", "cond_predict_scale"},
        {"obs_as_global_cond": True, "diffusion_step_embed_dim": 256, "down_dims": (256, 512, 1024),
         "kernel_size": 5, "n_groups": 8, "cond_predict_scale": True, "num_inference_steps": None}),
    "DiffusionUnetLowdimPolicy": (
        {"model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps",
         "n_obs_steps", "num_inference_steps", "obs_as_local_cond", "obs_as_global_cond",
         "pred_action_steps_only", "oa_step_convention"},
        {"num_inference_steps": None, "obs_as_local_cond": False, "obs_as_global_cond": False,
         "pred_action_steps_only": False, "oa_step_convention": False}),
    "DiffusionTransformerLowdimPolicy": (
        {"model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps",
         "n_obs_steps", "num_inference_steps", "obs_as_cond", "pred_action_steps_only"},
        {"num_inference_steps": None, "obs_as_cond": False, "pred_action_steps_only": False}),
}


class _Reader:
    """Tracks which checkpoint tensors were used, so leftovers are refused by name."""

    def __init__(self, sd: dict, ckpt: str):
        self.sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.ckpt = ckpt
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ImportRefused(f"{self.ckpt}: missing tensor {key!r}")
        self.used.add(key)
        return self.sd[key]

    def ignore(self, predicate) -> None:
        self.used.update(k for k in self.sd if predicate(k))

    def leftovers(self) -> list[str]:
        return sorted(set(self.sd) - self.used)


# -- encoders -------------------------------------------------------------------------------

def _robomimic_encoder(rd: _Reader, key: str, index: int, mapped: dict) -> dict:
    """One robomimic VisualCore (backbone / pool / nets duplicates) -> dp_ros encoder ``index``."""
    pre = f"obs_encoder.obs_nets.{key}."
    names = [k[len(pre):] for k in rd.sd if k.startswith(pre)]
    if not names:
        raise ImportRefused(f"{rd.ckpt}: no robomimic encoder weights for RGB key {key!r} ({pre}*)")
    canon = {}
    for n in names:
        if n.startswith("nets.0.nets."):
            c = ("backbone", n[len("nets.0.nets."):])
        elif n.startswith("backbone.nets."):
            c = ("backbone", n[len("backbone.nets."):])
        elif n.startswith("nets.1."):
            c = ("pool", n[len("nets.1."):])
        elif n.startswith("pool."):
            c = ("pool", n[len("pool."):])
        elif n.startswith("nets.3."):
            c = ("linear", n[len("nets.3."):])
        else:
            raise ImportRefused(f"{rd.ckpt}: unexpected robomimic encoder tensor {pre + n!r} (only "
                                f"VisualCore(ResNet18Conv, SpatialSoftmax, Linear) is supported)")
        t = rd.take(pre + n)
        if c in canon and not torch.equal(canon[c], t):
            raise ImportRefused(f"{rd.ckpt}: {pre + n} differs from its duplicate")
        canon[c] = t
    tgt = f"obs_encoder.encoders.{index}."
    for (part, rest), t in canon.items():
        if part == "backbone":
            inner = resnet_children_key(rest)
            if inner is None:
                raise ImportRefused(f"{rd.ckpt}: unexpected ResNet18Conv tensor {pre}nets.0.nets.{rest}")
            mapped[tgt + "backbone." + inner] = t
    for need in (("pool", "nets.weight"), ("pool", "nets.bias"), ("linear", "weight"), ("linear", "bias")):
        if need not in canon:
            raise ImportRefused(f"{rd.ckpt}: robomimic encoder of {key!r} has no {need[0]} {need[1]} "
                                f"(spatial softmax with keypoints and a Linear projection are required)")
    temperature = canon.get(("pool", "temperature"), torch.ones(1)).double().reshape(-1)
    if temperature.numel() != 1 or not float(temperature[0]) > 0:
        raise ImportRefused(f"{rd.ckpt}: spatial softmax temperature of {key!r} is {temperature.tolist()}")
    temp = float(temperature[0])
    # softmax(conv(x) / T) == softmax(conv'(x)) with conv' = conv / T
    mapped[tgt + "pool.nets.weight"] = (canon[("pool", "nets.weight")].double() / temp).float()
    mapped[tgt + "pool.nets.bias"] = (canon[("pool", "nets.bias")].double() / temp).float()
    mapped[tgt + "out.weight"] = canon[("linear", "weight")]
    mapped[tgt + "out.bias"] = canon[("linear", "bias")]
    leftover = [c for c in canon if c[0] == "pool" and c[1] not in ("nets.weight", "nets.bias", "temperature",
                                                                      "pos_x", "pos_y")]
    if leftover:
        raise ImportRefused(f"{rd.ckpt}: unexpected spatial softmax tensors {leftover}")
    return {"width": resnet_width({"w": mapped[tgt + "backbone.conv1.weight"]}, "w", f"{rd.ckpt}: {key}"),
            "num_keypoints": int(canon[("pool", "nets.weight")].shape[0]),
            "feature_dim": int(canon[("linear", "weight")].shape[0]),
            "batchnorm": any(c[1].endswith("running_mean") for c in canon)}


def _torchvision_encoder(rd: _Reader, model_key: str, index: int, mapped: dict) -> dict:
    pre = f"obs_encoder.key_model_map.{model_key}."
    names = [k[len(pre):] for k in rd.sd if k.startswith(pre)]
    if not names:
        raise ImportRefused(f"{rd.ckpt}: no ResNet weights under {pre}*")
    tgt = f"obs_encoder.encoders.{index}.backbone."
    for n in names:
        if n.startswith("fc."):
            raise ImportRefused(f"{rd.ckpt}: {pre}{n}: the rgb model keeps a classifier head; only "
                                f"get_resnet's (fc = Identity) is supported")
        mapped[tgt + n] = rd.take(pre + n)
    return {"width": resnet_width(mapped, tgt + "conv1.weight", f"{rd.ckpt}: {model_key}"),
            "batchnorm": any(n.endswith("running_mean") for n in names)}


# -- the import -----------------------------------------------------------------------------

def import_diffusion_policy(ckpt, out, *, trust_pickle: bool = False, dt: Optional[float] = None,
                            state_names: Optional[Sequence[str]] = None,
                            action_names: Optional[Sequence[str]] = None, use_ema: bool = True,
                            policy_id: Optional[str] = None) -> ImportResult:
    """Convert the reference code's ``.ckpt`` into a dp_ros checkpoint directory ``out``."""
    ckpt = Path(ckpt)
    if not trust_pickle:
        raise ImportRefused(
            f"{ckpt}: a diffusion_policy checkpoint is a pickle, which can run code when loaded. "
            f"Import it only if you trust where it came from, by passing --trust-pickle (it is then "
            f"read with a restricted unpickler that builds only tensors and plain data)")
    try:
        payload = to_plain(load_torch_archive(ckpt))
    except PickleRefused as exc:
        raise ImportRefused(str(exc)) from None
    if not isinstance(payload, dict) or "state_dicts" not in payload or "cfg" not in payload:
        raise ImportRefused(f"{ckpt}: not a diffusion_policy workspace checkpoint (no cfg/state_dicts)")
    sds = payload["state_dicts"]
    notes: list[str] = []
    if use_ema and isinstance(sds, dict) and isinstance(sds.get("ema_model"), dict):
        sd, which = sds["ema_model"], "ema_model"
        notes.append("weights: state_dicts.ema_model (EMA)")
    elif isinstance(sds, dict) and isinstance(sds.get("model"), dict):
        sd, which = sds["model"], "model"
        notes.append("weights: state_dicts.model" + ("" if not use_ema else " (the checkpoint has no EMA weights)"))
    else:
        raise ImportRefused(f"{ckpt}: state_dicts has neither 'ema_model' nor 'model'")
    conf = HydraConfig(payload["cfg"])
    pol = conf.get("policy")
    kind = _target_name(pol, "policy")
    if kind not in _POLICY_KEYS:
        raise ImportRefused(f"{ckpt}: policy {kind!r} is not supported (supported: {sorted(_POLICY_KEYS)})")
    known, defaults = _POLICY_KEYS[kind]
    p = {**defaults, **{k: v for k, v in pol.items() if k != "_target_"}}
    step_kwargs = {k: v for k, v in pol.items() if k not in known and k != "_target_"}
    where = f"{ckpt} ({kind})"
    rd = _Reader(sd, f"{ckpt}:{which}")
    rd.ignore(lambda k: k.endswith("_dummy_variable") or k.startswith("normalizer."))

    # denoiser settings first: refusals should not depend on the weights
    if kind == "DiffusionUnetLowdimPolicy":
        if _target_name(p["model"], "policy.model") != "ConditionalUnet1D":
            raise ImportRefused(f"{where}: model {p['model'].get('_target_')!r} is not supported")
        if p["model"].get("local_cond_dim") is not None:
            raise ImportRefused(f"{where}: model.local_cond_dim (local conditioning) is not supported")
    if kind in ("DiffusionTransformerLowdimPolicy", "DiffusionTransformerHybridImagePolicy"):
        t = p["model"] if kind == "DiffusionTransformerLowdimPolicy" else p
        if kind == "DiffusionTransformerLowdimPolicy" and _target_name(t, "policy.model") != "TransformerForDiffusion":
            raise ImportRefused(f"{where}: model {t.get('_target_')!r} is not supported")
        if not t.get("time_as_cond", True):
            raise ImportRefused(f"{where}: time_as_cond: false (BERT-style encoder) is not supported")
        if kind == "DiffusionTransformerLowdimPolicy" and not t.get("cond_dim"):
            raise ImportRefused(f"{where}: a transformer without observation conditioning is not supported")
    T_p, T_o = _as_int(p["horizon"], "horizon"), _as_int(p["n_obs_steps"], "n_obs_steps")
    T_a = _as_int(p["n_action_steps"], "n_action_steps")
    schedule = _schedule(p["noise_scheduler"], p.get("num_inference_steps"), step_kwargs, where, notes)
    if dt is None:
        fps = conf.get("task.env_runner.fps", None)
        dt = 1.0 / float(fps) if isinstance(fps, (int, float)) and fps > 0 else 0.1
        notes.append(f"dt {dt:g} s ({'task.env_runner.fps' if fps else 'default; pass --dt'})")

    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # dp_ros name -> checkpoint name, for messages
    cameras: list[CameraConfig] = []
    enc_kwargs: dict = {}
    segments: list[tuple[str, int]] = []
    state_norm: list[tuple] = []  # per low-dim key: (scale, offset, input min)
    default_state_names: list[str] = []
    image_fields: list[dict] = []

    if kind in ("DiffusionUnetLowdimPolicy", "DiffusionTransformerLowdimPolicy"):
        obs_dim, action_dim = _as_int(p["obs_dim"], "obs_dim"), _as_int(p["action_dim"], "action_dim")
        if kind == "DiffusionUnetLowdimPolicy":
            if p["obs_as_local_cond"] or not p["obs_as_global_cond"]:
                raise ImportRefused(f"{where}: only obs_as_global_cond: true is supported (not local "
                                    f"conditioning or inpainting)")
            if not p["oa_step_convention"]:
                raise ImportRefused(f"{where}: oa_step_convention: false (actions start one step after the "
                                    f"current observation) is not supported")
        elif not p["obs_as_cond"]:
            raise ImportRefused(f"{where}: only obs_as_cond: true is supported (not inpainting)")
        if p["pred_action_steps_only"]:
            raise ImportRefused(f"{where}: pred_action_steps_only: true is not supported")
        s, o = _normalizer(rd.sd, "obs", where)
        state_norm.append((s, o, rd.sd.get("normalizer.params_dict.obs.input_stats.min")))
        segments.append(("state", obs_dim))
        default_state_names = [f"obs_{i}" for i in range(obs_dim)]
    else:
        shape_meta = p["shape_meta"]
        try:
            obs_meta = dict(shape_meta["obs"])
            action_dim = _as_int(list(shape_meta["action"]["shape"])[0], "shape_meta.action.shape")
        except (KeyError, TypeError, IndexError):
            raise ImportRefused(f"{where}: malformed shape_meta") from None
        rgb = [k for k, v in obs_meta.items() if v.get("type", "low_dim") == "rgb"]
        low = [k for k, v in obs_meta.items() if v.get("type", "low_dim") == "low_dim"]
        other = [k for k, v in obs_meta.items() if v.get("type", "low_dim") not in ("rgb", "low_dim")]
        if other:
            raise ImportRefused(f"{where}: observation(s) {other} of type "
                                f"{[obs_meta[k].get('type') for k in other]} are not supported")
        if kind == "DiffusionUnetImagePolicy":
            order = sorted(rgb) + sorted(low)  # MultiImageObsEncoder sorts each group
            rgb, low = sorted(rgb), sorted(low)
        else:
            order = list(obs_meta)  # robomimic keeps shape_meta order
        if kind in ("DiffusionUnetHybridImagePolicy", "DiffusionUnetImagePolicy") and not p["obs_as_global_cond"]:
            raise ImportRefused(f"{where}: only obs_as_global_cond: true is supported (not inpainting)")
        if kind == "DiffusionTransformerHybridImagePolicy":
            if not p["obs_as_cond"]:
                raise ImportRefused(f"{where}: only obs_as_cond: true is supported (not inpainting)")
            if p["pred_action_steps_only"]:
                raise ImportRefused(f"{where}: pred_action_steps_only: true is not supported")
        for k in low:
            shape = list(obs_meta[k]["shape"])
            if len(shape) != 1:
                raise ImportRefused(f"{where}: low_dim observation {k!r} has shape {shape}; only vectors")
        for k in rgb:
            shape = list(obs_meta[k]["shape"])
            if len(shape) != 3 or shape[0] != 3:
                raise ImportRefused(f"{where}: rgb observation {k!r} has shape {shape}; only (3, H, W)")

        if kind == "DiffusionUnetImagePolicy":
            enc = p["obs_encoder"]
            if _target_name(enc, "policy.obs_encoder") != "MultiImageObsEncoder":
                raise ImportRefused(f"{where}: obs_encoder {enc.get('_target_')!r} is not supported")
            known_enc = {"_target_", "shape_meta", "rgb_model", "resize_shape", "crop_shape", "random_crop",
                         "use_group_norm", "share_rgb_model", "imagenet_norm"}
            unknown = sorted(set(enc) - known_enc)
            if unknown:
                raise ImportRefused(f"{where}: obs_encoder setting(s) {unknown} are not supported")
            model_cfg = enc.get("rgb_model")
            if isinstance(model_cfg, dict):
                if _target_name(model_cfg, "obs_encoder.rgb_model") != "get_resnet":
                    raise ImportRefused(f"{where}: rgb_model {model_cfg.get('_target_')!r} is not supported (get_resnet)")
                if model_cfg.get("name") != "resnet18":
                    raise ImportRefused(f"{where}: rgb_model name {model_cfg.get('name')!r} is not supported (resnet18)")
            elif rgb:
                raise ImportRefused(f"{where}: obs_encoder.rgb_model must be a get_resnet config")
            if enc.get("resize_shape") is not None:
                raise ImportRefused(f"{where}: obs_encoder.resize_shape {enc['resize_shape']} (a resize inside "
                                    f"the model) is not supported; dp_ros resizes frames before the policy")
            crop = enc.get("crop_shape")
            if isinstance(crop, dict):
                crops = {tuple(crop[k]) for k in rgb}
                if len(crops) > 1:
                    raise ImportRefused(f"{where}: per-camera crop shapes {crop} are not supported")
                crop = list(crops.pop()) if crops else None
            shared = bool(enc.get("share_rgb_model", False))
            infos = []
            for i, k in enumerate(rgb):
                if shared and i > 0:
                    continue
                infos.append(_torchvision_encoder(rd, "rgb" if shared else k, i, mapped))
            width = infos[0]["width"] if infos else 64
            batchnorm = infos[0]["batchnorm"] if infos else False
            # use_group_norm converts only per-camera models: a shared one keeps its BatchNorm
            if rgb and not shared and batchnorm == bool(enc.get("use_group_norm", False)):
                raise ImportRefused(f"{where}: use_group_norm disagrees with the weights' normalisation layers")
            imagenet = bool(enc.get("imagenet_norm", False))
            enc_kwargs = dict(width=width, norm="batch" if batchnorm else "group", pool="avg",
                              feature_dim=8 * width, shared=shared, feature_activation="none",
                              crop_shape=[int(c) for c in crop] if crop is not None else None,
                              random_crop=bool(enc.get("random_crop", True)))
            feat = 8 * width
            for k in rgb:
                s, o = _normalizer(rd.sd, k, where)
                if s.numel() != 1:
                    raise ImportRefused(f"{where}: image normaliser of {k!r} is not a single scale/offset")
                if imagenet:  # torchvision Normalize after the LinearNormalizer
                    m = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
                    sd_ = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
                    s, o = s / sd_, (o - m) / sd_
                image_fields.append(image_norm_fields(s, o, f"image normaliser {k!r}"))
        else:
            crop = p["crop_shape"]
            if p["obs_encoder_group_norm"] is None:
                raise ImportRefused(f"{where}: obs_encoder_group_norm is not set")
            infos = [_robomimic_encoder(rd, k, i, mapped) for i, k in enumerate(rgb)]
            rd.ignore(lambda key: key.startswith("obs_encoder.obs_randomizers."))
            for a, b in zip(infos, infos[1:]):
                if a != b:
                    raise ImportRefused(f"{where}: RGB encoders differ in size ({a} vs {b}); dp_ros uses one "
                                        f"encoder configuration")
            info = infos[0] if infos else {"width": 64, "num_keypoints": 32, "feature_dim": 64, "batchnorm": False}
            if rgb and info["batchnorm"] == bool(p["obs_encoder_group_norm"]):
                raise ImportRefused(f"{where}: obs_encoder_group_norm disagrees with the weights' normalisation layers")
            if crop is not None and rgb and not p["eval_fixed_crop"]:
                notes.append("eval_fixed_crop is false: the reference code samples a random crop at "
                             "inference; dp_ros uses the center crop")
            enc_kwargs = dict(width=info["width"], norm="batch" if info["batchnorm"] else "group",
                              num_keypoints=info["num_keypoints"], feature_dim=info["feature_dim"],
                              shared=False, feature_activation="relu", pool="spatial_softmax",
                              crop_shape=[int(c) for c in crop] if crop is not None else None)
            feat = info["feature_dim"]
            for k in rgb:
                s, o = _normalizer(rd.sd, k, where)
                if s.numel() != 1:
                    raise ImportRefused(f"{where}: image normaliser of {k!r} is not a single scale/offset")
                image_fields.append(image_norm_fields(s, o, f"image normaliser {k!r}"))
        for k in rgb:
            h, w = int(obs_meta[k]["shape"][1]), int(obs_meta[k]["shape"][2])
            check_center_crop(h, w, enc_kwargs.get("crop_shape"), f"{where}: camera {k!r}")
            cameras.append(CameraConfig(name=k, height=h, width=w))
        if rgb:
            enc_kwargs.update(same_image_norm(image_fields, rgb))
        for k in order:
            if k in rgb:
                segments.append(("image", feat))
            else:
                d = int(obs_meta[k]["shape"][0])
                segments.append(("state", d))
        for k in low:
            s, o = _normalizer(rd.sd, k, where)
            state_norm.append((s, o, rd.sd.get(f"normalizer.params_dict.{k}.input_stats.min")))
            default_state_names += [f"{k}_{i}" for i in range(int(obs_meta[k]["shape"][0]))]

    # -- normaliser ---------------------------------------------------------------------------
    normalizer = {}
    if state_norm:
        s = torch.cat([x[0] for x in state_norm])
        o = torch.cat([x[1] for x in state_norm])
        anchor = torch.cat([(x[2].double().reshape(-1) if x[2] is not None else -(x[1] + 1) / x[0])
                            for x in state_norm])
        normalizer["state"] = stats_from_normalize(s, o, anchor, "state normaliser", notes)
    s, o = _normalizer(rd.sd, "action", where)
    # LinearNormalizer.unnormalize: x = (y - offset) / scale
    normalizer["action"] = stats_from_unnormalize(1.0 / s, -o / s, None, "action normaliser", notes)

    # -- denoiser -----------------------------------------------------------------------------
    model_keys = [k for k in rd.sd if k.startswith("model.")]
    if kind in ("DiffusionUnetHybridImagePolicy", "DiffusionUnetImagePolicy", "DiffusionUnetLowdimPolicy"):
        denoiser = "unet"
        if kind == "DiffusionUnetLowdimPolicy":
            m = p["model"]
            unet_args = {"diffusion_step_embed_dim": m.get("diffusion_step_embed_dim", 256),
                         "down_dims": m.get("down_dims", [256, 512, 1024]), "kernel_size": m.get("kernel_size", 3),
                         "n_groups": m.get("n_groups", 8), "cond_predict_scale": m.get("cond_predict_scale", False)}
        else:
            unet_args = {k: p[k] for k in ("diffusion_step_embed_dim", "down_dims", "kernel_size", "n_groups",
                                           "cond_predict_scale")}
        unet = UnetConfig(down_dims=[_as_int(d, "down_dims") for d in unet_args["down_dims"]],
                          kernel_size=_as_int(unet_args["kernel_size"], "kernel_size"),
                          n_groups=_as_int(unet_args["n_groups"], "n_groups"),
                          step_embed_dim=_as_int(unet_args["diffusion_step_embed_dim"], "diffusion_step_embed_dim"),
                          cond_predict_scale=bool(unet_args["cond_predict_scale"]), final_n_groups=8)
        transformer = TransformerConfig()
        if any(k.startswith("model.local_cond_encoder.") for k in model_keys):
            raise ImportRefused(f"{where}: local conditioning weights (model.local_cond_encoder) are not supported")
        for k in model_keys:
            if not k.endswith("_dummy_variable"):
                mapped["denoiser." + k[len("model."):]] = rd.take(k)
                origin["denoiser." + k[len("model."):]] = k
    else:
        denoiser = "transformer"
        t = p["model"] if kind == "DiffusionTransformerLowdimPolicy" else p
        transformer = TransformerConfig(
            n_layer=_as_int(t.get("n_layer", 12), "n_layer"), n_head=_as_int(t.get("n_head", 12), "n_head"),
            n_emb=_as_int(t.get("n_emb", 768), "n_emb"),
            p_drop_emb=finite_float(t.get("p_drop_emb", 0.1), "p_drop_emb"),
            p_drop_attn=finite_float(t.get("p_drop_attn", 0.1), "p_drop_attn"),
            causal_attn=bool(t.get("causal_attn", False)),
            n_cond_layers=_as_int(t.get("n_cond_layers", 0), "n_cond_layers"))
        unet = UnetConfig()
        for k in model_keys:
            if k.endswith("_dummy_variable") or k in ("model.mask", "model.memory_mask"):
                rd.used.add(k)
                continue
            mapped["denoiser." + k[len("model."):]] = rd.take(k)
            origin["denoiser." + k[len("model."):]] = k
        has_mask = "model.mask" in rd.sd
        if has_mask != transformer.causal_attn:
            raise ImportRefused(f"{where}: causal_attn {transformer.causal_attn} disagrees with the weights "
                                f"({'a' if has_mask else 'no'} causal mask buffer)")

    state_first, perm = condition_layout(segments)
    step_width = sum(w for _, w in segments)
    if perm is not None:
        if denoiser == "unet":
            keys = [k for k in mapped if k.startswith("denoiser.") and k.endswith("cond_encoder.1.weight")]
            permute_condition_columns(mapped, keys, perm, step_width, T_o, unet.step_embed_dim)
        else:
            permute_condition_columns(mapped, ["denoiser.cond_obs_emb.weight"], perm, step_width, 1, 0)
        notes.append("observation features reordered to cameras-then-state (conditioning weights permuted)")
    enc_kwargs["state_first"] = state_first

    leftover = rd.leftovers()
    if leftover:
        raise ImportRefused(f"{where}: tensors not understood: {leftover[:5]}")
    state_dim = sum(w for k, w in segments if k == "state")
    try:
        cfg = PolicyConfig(
            cameras=cameras,
            state_names=names_or_default(state_names, state_dim, "state", "state names")
            if state_names is not None else default_state_names,
            action_names=names_or_default(action_names, action_dim, "action", "action names"),
            T_o=T_o, T_p=T_p, T_a=T_a, dt=float(dt), denoiser=denoiser,
            encoder=EncoderConfig(**enc_kwargs), unet=unet, transformer=transformer, schedule=schedule,
            normalizer=normalizer, policy_id=policy_id or f"diffusion_policy:{ckpt.stem}")
        cfg.validate()
    except ConfigError as exc:
        raise ImportRefused(f"{where}: {exc}") from None
    model = build_model(cfg)
    fill_model(model, mapped, where, origin)
    out = Path(out)
    save_checkpoint(out, cfg, model)
    return ImportResult(out=out, config=cfg, source=str(ckpt), notes=notes)
