"""Import policies trained elsewhere into native dp_ros checkpoints.

- ``import_lerobot(src, out)``: a LeRobot ``save_pretrained`` directory (diffusion policy),
  statistics in the weights (LeRobot <= 0.3) or in the processor files (>= 0.4).
- ``import_diffusion_policy(ckpt, out, trust_pickle=True)``: a checkpoint of the paper's
  reference code (real-stanford/diffusion_policy), read with a restricted unpickler.

Both write ``config.json`` + ``model.safetensors`` that ``load_policy`` reads, and refuse
(``ImportRefused``, naming the setting) anything whose computation dp_ros would not
reproduce. Shared helpers for the two importers live here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import NormStats, PolicyConfig
from ..normalizer import RANGE_EPS


class ImportRefused(ValueError):
    """The foreign checkpoint uses something dp_ros cannot reproduce; the message names it."""


@dataclass
class ImportResult:
    out: Path
    config: PolicyConfig
    source: str
    notes: list[str] = field(default_factory=list)


def import_lerobot(src, out, **kwargs) -> ImportResult:
    """See ``dp_ros.policy.importers.lerobot.import_lerobot``."""
    from .lerobot import import_lerobot as _impl
    return _impl(src, out, **kwargs)


def import_diffusion_policy(ckpt, out, **kwargs) -> ImportResult:
    """See ``dp_ros.policy.importers.reference.import_diffusion_policy``."""
    from .reference import import_diffusion_policy as _impl
    return _impl(ckpt, out, **kwargs)


# -- normalisation ------------------------------------------------------------------------

_SLACK = 1.0 + 1e-6  # keep a forced range just above RANGE_EPS after float rounding


def _vec(x) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).detach().double().reshape(-1).cpu().numpy(), dtype=np.float64)


def stats_from_normalize(scale, offset, anchor, what: str, notes: list[str]) -> NormStats:
    """dp_ros min_max statistics for an input normalised as ``y = scale * x + offset``.

    ``anchor`` is a data value per dimension (the min or the mean) used where the source's
    map is steeper than dp_ros represents (range < RANGE_EPS: a constant dimension in
    LeRobot, which divides by ~1e-8): there the slope becomes 1 and the anchor keeps its
    source image, so the recorded constant still normalises to what the network saw.
    """
    a, b = _vec(scale), _vec(offset)
    anchor = _vec(anchor) if anchor is not None else np.zeros_like(a)
    _check_affine(a, b, what)
    lo, hi = (-1.0 - b) / a, (1.0 - b) / a
    steep = (hi - lo) < RANGE_EPS * _SLACK
    if steep.any():
        y_anchor = a * anchor + b
        lo = np.where(steep, anchor - (y_anchor + 1.0), lo)  # slope 1 through (anchor, y_anchor)
        hi = np.where(steep, lo + 2.0, hi)
        notes.append(f"{what}: dimension(s) {np.flatnonzero(steep).tolist()} have a range below "
                     f"{RANGE_EPS:g}; normalised with slope 1 through the recorded value instead of "
                     f"the source's 1/range (identical at that value)")
    return NormStats(mode="min_max", min=lo.tolist(), max=hi.tolist())


def stats_from_unnormalize(scale, offset, anchor_y, what: str, notes: list[str]) -> NormStats:
    """dp_ros min_max statistics for an output unnormalised as ``x = scale * y + offset``.

    Where the source's range is below RANGE_EPS the range becomes RANGE_EPS, pinned at the
    normalised value ``anchor_y`` the source maps to its recorded constant (LeRobot: -1)."""
    c, d = _vec(scale), _vec(offset)
    _check_affine(c, d, what)
    lo, hi = d - c, d + c
    steep = (hi - lo) < RANGE_EPS * _SLACK
    if steep.any():
        ya = _vec(anchor_y) if anchor_y is not None else np.zeros_like(c)
        xa = c * ya + d
        half = RANGE_EPS * _SLACK / 2.0
        lo = np.where(steep, xa - half * (1.0 + ya), lo)
        hi = np.where(steep, lo + 2.0 * half, hi)
        notes.append(f"{what}: dimension(s) {np.flatnonzero(steep).tolist()} have a range below "
                     f"{RANGE_EPS:g}; unnormalised over a range of {RANGE_EPS:g} instead (differs by "
                     f"at most {RANGE_EPS:g} x (y + 1) / 2)")
    return NormStats(mode="min_max", min=lo.tolist(), max=hi.tolist())


def _check_affine(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ImportRefused(f"{what}: scale and offset have different sizes ({a.size} vs {b.size})")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ImportRefused(f"{what}: normalisation statistics are not finite (were they ever fitted?)")
    if (a <= 0).any():
        raise ImportRefused(f"{what}: normalisation scale must be positive, got {a.tolist()}")


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def image_norm_fields(scale, offset, what: str) -> dict:
    """EncoderConfig fields for pixels in [0, 1] mapped per channel as ``scale * p + offset``."""
    a = np.broadcast_to(_vec(scale), (3,)).astype(np.float64)
    b = np.broadcast_to(_vec(offset), (3,)).astype(np.float64)
    _check_affine(a, b, what)
    mean, std = -b / a, 1.0 / a

    def near(x, y, tol):
        return bool(np.all(np.abs(np.asarray(x) - np.asarray(y)) <= tol))

    if near(mean, 0.5, 1e-7) and near(std, 0.5, 1e-7):
        return {"image_norm": "symmetric"}
    if near(mean, 0.0, 1e-7) and near(std, 1.0, 1e-7):
        return {"image_norm": "unit"}
    if near(mean, _IMAGENET[0], 1e-6) and near(std, _IMAGENET[1], 1e-6):
        return {"image_norm": "imagenet"}
    return {"image_norm": "custom", "image_mean": mean.tolist(), "image_std": std.tolist()}


def same_image_norm(fields: Sequence[dict], names: Sequence[str]) -> dict:
    """One encoder normalisation for every camera, or a refusal naming the cameras."""
    first = fields[0]
    for f, n in zip(fields[1:], names[1:]):
        if f.get("image_norm") != first.get("image_norm") or any(
                not np.allclose(f.get(k) or [0.0], first.get(k) or [0.0], rtol=0, atol=1e-7)
                for k in ("image_mean", "image_std")):
            raise ImportRefused(f"cameras {names[0]!r} and {n!r} use different pixel normalisations "
                                f"({first} vs {f}); dp_ros normalises every camera alike")
    return first


# -- images -------------------------------------------------------------------------------

def check_center_crop(height: int, width: int, crop: Optional[Sequence[int]], where: str) -> None:
    """dp_ros crops at ((H - h) // 2, (W - w) // 2); torchvision rounds half to even."""
    if crop is None:
        return
    for size, c, axis in ((height, crop[0], "height"), (width, crop[1], "width")):
        if int(round((size - c) / 2.0)) != (size - c) // 2:
            raise ImportRefused(f"{where}: a center crop of {c} from {size} ({axis}) starts one pixel "
                                f"later in torchvision than in dp_ros; not supported")


# -- weights ------------------------------------------------------------------------------

RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def resnet_children_key(rest: str) -> Optional[str]:
    """'4.0.conv1.weight' (nn.Sequential of a ResNet's children) -> 'layer1.0.conv1.weight'."""
    head, _, tail = rest.partition(".")
    name = RESNET_CHILDREN.get(head)
    return None if name is None else f"{name}.{tail}"


def resnet_width(tensors: dict, conv1_key: str, where: str) -> int:
    w = tensors.get(conv1_key)
    if w is None:
        raise ImportRefused(f"{where}: no backbone weight {conv1_key!r}")
    if w.dim() != 4 or w.shape[1] != 3 or tuple(w.shape[2:]) != (7, 7):
        raise ImportRefused(f"{where}: backbone stem {conv1_key} has shape {tuple(w.shape)}; only an "
                            f"RGB ResNet-18 stem (out, 3, 7, 7) is supported")
    return int(w.shape[0])


def fill_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
               origin: Optional[dict[str, str]] = None) -> None:
    """Load mapped tensors strictly: every model tensor given, with its shape, nothing else.

    ``origin`` maps dp_ros names to the source's, so that messages name the source tensor."""
    origin = origin or {}
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [origin.get(k, k) for k in tensors if k not in expected]
    if missing or unexpected:
        raise ImportRefused(f"{source}: weights do not match the architecture read from its config "
                            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})")
    state = {}
    for name, ref in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise ImportRefused(f"{source}: tensor {origin.get(name, name)} has shape {tuple(got.shape)}, "
                                f"the architecture in its config implies {tuple(ref.shape)}")
        got = got.detach().to(dtype=ref.dtype)
        # a finite sum proves every element finite; otherwise check exactly (it may overflow)
        if got.is_floating_point() and not (torch.isfinite(got.sum()) or torch.isfinite(got).all()):
            raise ImportRefused(f"{source}: tensor {origin.get(name, name)} has NaN or Inf values")
        state[name] = got
    model.load_state_dict(state, strict=True)


def permute_condition_columns(tensors: dict, keys: Sequence[str], src_index: Sequence[int],
                              step_width: int, n_steps: int, lead: int) -> None:
    """Reorder the per-step observation columns of Linear weights fed by the conditioning.

    ``src_index[j]`` is the source column of dp_ros's per-step feature j; a weight's columns
    are ``lead`` leading columns (the step embedding of the U-Net) then ``n_steps`` blocks.
    """
    idx = list(range(lead))
    for t in range(n_steps):
        idx += [lead + t * step_width + j for j in src_index]
    index = torch.tensor(idx)
    for k in keys:
        w = tensors[k]
        if w.shape[1] != len(idx):
            raise ImportRefused(f"{k}: expected {len(idx)} input columns, found {w.shape[1]}")
        tensors[k] = w.index_select(1, index)


def condition_layout(segments: Sequence[tuple[str, int]]) -> tuple[bool, Optional[list[int]]]:
    """Source per-step layout [(kind 'image'|'state', width), ...] -> (state_first, permutation).

    dp_ros concatenates cameras (in config order) then state, or state first; any other
    source order is handled by permuting columns (the permutation is None when not needed).
    """
    starts, pos = [], 0
    for kind, width in segments:
        starts.append(pos)
        pos += width
    images = [(s, w) for (k, w), s in zip(segments, starts) if k == "image"]
    states = [(s, w) for (k, w), s in zip(segments, starts) if k == "state"]
    img_cols = [c for s, w in images for c in range(s, s + w)]
    st_cols = [c for s, w in states for c in range(s, s + w)]
    kinds = [k for k, _ in segments]
    if kinds == sorted(kinds):  # images (if any) then states
        return False, None
    if kinds == sorted(kinds, reverse=True):  # states then images
        return True, None
    return False, img_cols + st_cols


def names_or_default(names: Optional[Sequence[str]], n: int, prefix: str, what: str) -> list[str]:
    if names is None:
        return [f"{prefix}_{i}" for i in range(n)]
    names = list(names)
    if len(names) != n:
        raise ImportRefused(f"{what}: {len(names)} names given, the policy has {n} dimensions")
    return names


def finite_float(x, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ImportRefused(f"{what} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise ImportRefused(f"{what} must be finite, got {x!r}")
    return v
