"""ONNX export: ``dp-ros export CKPT --onnx OUT``.

Writes into OUT:
- ``encoder_<i>.onnx`` per camera: uint8 frames (N, H, W, 3) -> features (N, F), the crop
  and pixel normalisation inside (exported per frame, so the feature cache still works);
- ``denoiser_step.onnx``: one network evaluation, inputs ``sample`` (1, T_p, A) normalised
  and the conditioning -> the network output. For the U-Net the conditioning is ``film``
  (1, F), that step's row of ``denoiser_film.onnx`` (each block's FiLM repeated over the
  time steps the block sees, see ConditionalUnet1D.repeat_film); for the transformer it is ``timestep``
  (1,) int64, ``frame_features`` (1, T_o, F) and raw ``state`` (1, T_o, D);
- ``denoiser_film.onnx`` (U-Net only): ``timesteps`` (K,) int64 + ``frame_features`` + raw
  ``state`` -> ``film`` (K, 1, F), every FiLM vector of a plan's K steps, run once per
  plan; the state normaliser is folded in;
- ``denoiser_loop.onnx`` (DDIM only): the whole cold-start loop unrolled, ``noise`` +
  ``frame_features`` + raw ``state`` -> raw actions (1, T_p, A), both normalisers and the
  sampler folded in (the U-Net's FiLM computed once, before the loop);
- ``denoiser_step_int8.onnx`` with ``--int8``: weights quantized to int8 (onnxruntime
  dynamic quantization), with its accuracy gate against fp32;
- ``manifest.json``: files, a digest of the weights and config they came from, which
  denoiser graph measured faster for a cold start, and the checks' results.

The export checks that the onnxruntime backend equals the torch backend within
``EQUAL_TOL`` on fixed windows, and prints it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backends.onnx_backend import FORMAT, MANIFEST, import_onnxruntime
from .backends.precision import accuracy_gate, action_differences, fixed_windows
from .model import DiffusionPolicyModel
from .schedule import Sampler
from .unet import ConditionalUnet1D

EQUAL_TOL = 1e-4
OPSET = 17


def model_digest(model: DiffusionPolicyModel) -> str:
    """Identifies the config and fp32 weights an export was made from."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class _Encoder(nn.Module):
    def __init__(self, model: DiffusionPolicyModel, camera: str):
        super().__init__()
        self.model, self.camera = model, camera

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.obs_encoder.encode_camera(self.camera, frames)


def conv_taps(t_in: int, k: int, stride: int, pad: int, transposed: bool = False) -> np.ndarray:
    """(T_out, k) input index that tap i of output step s reads along one axis of a
    convolution (of a transposed one: the input step whose zero-stuffed copy it reads), -1
    where it reads padding or stuffed zeros."""
    t_out = (t_in - 1) * stride - 2 * pad + k if transposed else (t_in + 2 * pad - k) // stride + 1
    s, i = np.meshgrid(np.arange(t_out), np.arange(k), indexing="ij")
    if transposed:  # output s = t * stride - pad + i
        t, rem = np.divmod(s + pad - i, stride)
        t[rem != 0] = -1
    else:  # output s reads input s * stride - pad + i
        t = s * stride - pad + i
    return np.where((t >= 0) & (t < t_in), t, -1)


def _one_hot_rows(index: np.ndarray, n_in: int) -> torch.Tensor:
    """(index.size, n_in) 0/1 matrix: row r picks input index.flat[r], or nothing at -1.
    Built in numpy: torch ops here would be traced into the graph, thousands of them."""
    flat = index.reshape(-1)
    m = np.zeros((flat.size, n_in), np.float32)
    rows = np.flatnonzero(flat >= 0)
    m[rows, flat[rows]] = 1.0
    return torch.from_numpy(m)


class MatmulConv1d(nn.Module):
    """A Conv1d or ConvTranspose1d (groups 1, no dilation) as two MatMuls, for the export.

    At batch 1 a U-Net step streams every weight once per call, and onnxruntime's op count
    matters as much as its arithmetic: a MatMul against prepacked weights beats a Conv of a
    few time steps, and only MatMul weights quantize to int8 blocks (MatMulNBits). The
    im2col is one more MatMul, with a constant 0/1 matrix that also does the padding, the
    stride and a transposed convolution's zero stuffing (a Pad, k Slices and a Concat cost
    ten times as long). Weight (k * C, O): row i * C + c holds tap i of input channel c.
    """

    def __init__(self, conv: nn.Conv1d | nn.ConvTranspose1d):
        super().__init__()
        if conv.groups != 1 or conv.dilation[0] != 1 or conv.padding_mode != "zeros":
            raise ValueError("MatmulConv1d covers plain convolutions only")
        self.transposed = isinstance(conv, nn.ConvTranspose1d)
        w = conv.weight.detach()  # Conv1d (O, C, k); ConvTranspose1d (C, O, k)
        if self.transposed:
            if conv.output_padding[0]:
                raise ValueError("MatmulConv1d covers ConvTranspose1d without output_padding")
            w = w.permute(1, 0, 2)
        out_ch, in_ch, k = w.shape
        self.k, self.stride, self.pad = k, conv.stride[0], int(conv.padding[0])
        self.weight = nn.Parameter(w.permute(2, 1, 0).reshape(k * in_ch, out_ch).contiguous(),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.pointwise = not self.transposed and k == 1 and self.stride == 1 and self.pad == 0
        self._im2col: dict[int, torch.Tensor] = {}

    def im2col(self, t_in: int) -> Optional[torch.Tensor]:
        """(T_out * k, T_in) 0/1 matrix: row s * k + i picks the input step that tap i of
        output step s reads (an all-zero row where it reads padding); None for a 1x1 conv."""
        if self.pointwise:
            return None
        if t_in not in self._im2col:
            taps = conv_taps(t_in, self.k, self.stride, self.pad, self.transposed)
            self._im2col[t_in] = _one_hot_rows(taps, t_in)
        return self._im2col[t_in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, O, T_out)
        b, t_in = x.shape[0], int(x.shape[-1])
        cols = x.transpose(1, 2)
        shift = self.im2col(t_in)
        t_out = t_in if shift is None else shift.shape[0] // self.k
        if shift is not None:
            cols = shift @ cols
        # 2-D, so that onnxruntime fuses MatMul and bias into one Gemm without reshapes of its own
        y = cols.reshape(b * t_out, -1) @ self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(b, t_out, -1).transpose(1, 2)


class MatmulConv2d(nn.Module):
    """A Conv2d (groups 1, no dilation) that, on inputs of few pixels, runs as two MatMuls
    in the export, the 2-D form of MatmulConv1d; on larger inputs it stays a Conv.

    The deep layers of the ResNet encoder see 6x6 and 3x3 maps: there onnxruntime's
    direct convolution ran at a third of the weight bandwidth (paper CNN, 84x84 crop, two
    frames, caches flushed between calls: encoder 10.9 -> 10.0 ms; a limit of 0.5 or 1 was
    slower than 0.25). The im2col MatMul costs (input pixels / output channels)
    of the convolution's own multiply-adds, so it is used where that is at most
    IM2COL_MAX_COST. Weight (kh * kw * C, O): row (i * kw + j) * C + c holds tap (i, j) of
    input channel c."""

    IM2COL_MAX_COST = 0.25

    @staticmethod
    def covers(conv: nn.Conv2d) -> bool:
        return (conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str))

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not self.covers(conv):
            raise ValueError("MatmulConv2d covers plain convolutions only")
        self.conv = conv
        out_ch, in_ch, kh, kw = conv.weight.shape
        self.weight = nn.Parameter(conv.weight.detach().permute(2, 3, 1, 0)
                                   .reshape(kh * kw * in_ch, out_ch).contiguous(), requires_grad=False)
        self._im2col: dict[tuple[int, int], tuple[torch.Tensor, int, int]] = {}

    def im2col(self, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        """(H_out * W_out * kh * kw, H * W) 0/1 matrix, row ((a * W_out + b) * kh + i) * kw + j
        picking the pixel that tap (i, j) of output pixel (a, b) reads; and H_out, W_out."""
        if (h, w) not in self._im2col:
            c = self.conv
            rows = conv_taps(h, c.kernel_size[0], c.stride[0], c.padding[0])  # (H_out, kh)
            cols = conv_taps(w, c.kernel_size[1], c.stride[1], c.padding[1])  # (W_out, kw)
            pixel = rows[:, None, :, None] * w + cols[None, :, None, :]
            pixel[(rows[:, None, :, None] < 0) | (cols[None, :, None, :] < 0)] = -1
            self._im2col[(h, w)] = (_one_hot_rows(pixel, h * w), len(rows), len(cols))
        return self._im2col[(h, w)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, O, H_out, W_out)
        n, c, h, w = x.shape[0], x.shape[1], int(x.shape[2]), int(x.shape[3])
        if h * w > self.IM2COL_MAX_COST * self.conv.out_channels:
            return self.conv(x)
        shift, h_out, w_out = self.im2col(h, w)
        taps = self.weight.shape[0] // c
        cols = shift @ x.reshape(n, c, h * w).transpose(1, 2)  # (N, H_out * W_out * taps, C)
        y = cols.reshape(-1, taps * c) @ self.weight
        if self.conv.bias is not None:
            y = y + self.conv.bias
        return y.reshape(n, h_out * w_out, -1).transpose(1, 2).reshape(n, -1, h_out, w_out)


class ExpandedGroupNorm(nn.Module):
    """GroupNorm whose per-channel scale and shift are constants of the input's full
    (C, T) or (C, H, W) shape, for the export: onnxruntime broadcasts a (C, 1) operand one
    row at a time, 4 us a call at 256 x 16 and 14 us at 1024 x 4, against 1.1 us for two
    tensors of one shape (two such calls per GroupNorm, 25 GroupNorms in a paper U-Net step)."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight = norm.weight.detach() if norm.affine else None
        self.bias = norm.bias.detach() if norm.affine else None
        self._affine: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def affine(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and shift broadcast to `shape` (C, ...). Built in numpy, as constants."""
        if shape not in self._affine:
            column = (-1,) + (1,) * (len(shape) - 1)
            self._affine[shape] = tuple(
                torch.from_numpy(np.broadcast_to(v.numpy().reshape(column), shape).copy())
                for v in (self.weight, self.bias))
        return self._affine[shape]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # group_norm itself exports a (1, 1) Mul and Add even without an affine: instance
        # norm over the groups is the same statistics, and exports as one op
        shape = tuple(int(d) for d in x.shape[1:])
        groups = x.reshape(-1, self.groups, math.prod(shape) // self.groups)
        unit = torch.ones(self.groups)  # explicit: the exporter cannot size them itself here
        y = F.instance_norm(groups, weight=unit, bias=unit - 1, eps=self.eps).reshape(-1, *shape)
        if self.weight is None:
            return y
        scale, shift = self.affine(shape)
        return y * scale + shift


class ExpMish(nn.Module):
    """Mish as x * n / (n + 2) with n = e^x (e^x + 2), which equals x * tanh(softplus(x)).

    onnxruntime runs Softplus element by element (about 90 us on 4k values against 20 us
    for these seven vectorised ops). The exponent is capped at 20, where the ratio is 1 in
    float32 anyway, so that n cannot overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.exp(torch.clamp(x, max=20.0))
        n = e * (e + 2.0)
        return x * (n / (n + 2.0))  # the ratio first: x * n overflows for large x


def export_form(model: DiffusionPolicyModel) -> DiffusionPolicyModel:
    """A copy of `model` that runs fast in onnxruntime, same outputs: the denoiser's
    convolutions as MatmulConv1d and Mish as ExpMish, the encoder's as MatmulConv2d,
    every GroupNorm as ExpandedGroupNorm, and the U-Net's FiLM repeated over time
    (ConditionalUnet1D.repeat_film): no (C, 1) broadcasts left in a denoising step."""
    model = copy.deepcopy(model)

    def fast(child: nn.Module) -> Optional[nn.Module]:
        if type(child) in (nn.Conv1d, nn.ConvTranspose1d):
            return MatmulConv1d(child)
        if type(child) is nn.Mish:
            return ExpMish()
        if type(child) is nn.Conv2d and MatmulConv2d.covers(child):
            return MatmulConv2d(child)
        if type(child) is nn.GroupNorm:
            return ExpandedGroupNorm(child)
        return None

    if isinstance(model.denoiser, ConditionalUnet1D):
        model.denoiser.repeat_film(model.cfg.T_p)
    parts = [m for m in (model.denoiser, model.obs_encoder) if m is not None]
    for parent in [m for part in parts for m in part.modules()]:
        for name, child in list(parent.named_children()):
            replacement = fast(child)
            if replacement is not None:
                setattr(parent, name, replacement)
    return model


def _split(model: DiffusionPolicyModel, rest: tuple):
    rest = list(rest)
    feats = rest.pop(0) if model.cfg.cameras else None
    state = rest.pop(0) if model.cfg.state_dim else None
    return feats, state


class _Step(nn.Module):
    def __init__(self, model: DiffusionPolicyModel):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        feats, state = _split(self.model, rest)
        return self.model.denoise(sample, timestep, self.model.condition(feats, state))


class _Film(nn.Module):
    """The U-Net's FiLM for a plan's steps. A graph of its own, run once per plan, rather
    than folded into the step graph: the step graph serves warm starts and int8 too, and
    then no longer reads the conditioning weights at every step."""

    def __init__(self, model: DiffusionPolicyModel):
        super().__init__()
        self.model = model

    def forward(self, timesteps: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        feats, state = _split(self.model, rest)
        return self.model.denoiser.film(self.model.condition(feats, state).flatten(1), timesteps)


class _FilmStep(nn.Module):
    def __init__(self, model: DiffusionPolicyModel):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        return self.model.denoiser.forward_film(sample, film)


class _Loop(nn.Module):
    def __init__(self, model: DiffusionPolicyModel, sampler: Sampler):
        super().__init__()
        self.model, self.sampler = model, sampler

    def forward(self, noise: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        feats, state = _split(self.model, rest)
        net = self.model.plan_fn(self.model.condition(feats, state), self.sampler.timesteps)
        x = noise
        for k in range(len(self.sampler)):
            x = self.sampler.step(k, x, net(x, self.sampler.timesteps[k]))
        return self.model.normalizer.unnormalize("action", x)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: Optional[dict] = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic or {}, opset_version=OPSET, do_constant_folding=True,
                          dynamo=False)


def _cond_inputs(cfg) -> tuple[list[str], list[torch.Tensor]]:
    names, values = [], []
    if cfg.cameras:
        names.append("frame_features")
        values.append(torch.zeros(1, cfg.T_o, len(cfg.cameras) * cfg.encoder.feature_dim))
    if cfg.state_dim:
        names.append("state")
        values.append(torch.zeros(1, cfg.T_o, cfg.state_dim))
    return names, values


def write_onnx(model: DiffusionPolicyModel, sampler: Sampler, out_dir: str | Path,
               loop: bool = True) -> dict:
    """Export the graphs of an fp32 CPU model and write the manifest; returns it."""
    cfg = model.cfg
    if cfg.head == "regression":
        raise ValueError("ONNX export covers diffusion heads only (this policy has a regression head)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    sampler = sampler.to("cpu", torch.float32)
    digest = model_digest(model)
    model = export_form(model)
    manifest: dict = {"format": FORMAT, "digest": digest, "opset": OPSET,
                      "encoders": {}, "step": "denoiser_step.onnx", "film": None, "loop": None,
                      "plan_graph": "step", "torch": torch.__version__}
    with torch.no_grad():
        for i, cam in enumerate(cfg.cameras):
            name = f"encoder_{i}.onnx"
            example = torch.zeros((2, cam.height, cam.width, 3), dtype=torch.uint8)
            _export(_Encoder(model, cam.name), (example,), out / name, ["frames"], ["features"],
                    {"frames": {0: "frames"}, "features": {0: "frames"}})
            manifest["encoders"][cam.name] = name
        names, values = _cond_inputs(cfg)
        sample = torch.zeros(1, cfg.T_p, cfg.action_dim)
        if isinstance(model.denoiser, ConditionalUnet1D):
            manifest["film"] = "denoiser_film.onnx"
            steps = sampler.timesteps[:2]  # any count: K is a dynamic axis
            _export(_Film(model), (steps, *values), out / manifest["film"], ["timesteps", *names],
                    ["film"], {"timesteps": {0: "steps"}, "film": {0: "steps"}})
            film = _Film(model)(steps, *values)[0]
            _export(_FilmStep(model), (sample, film), out / manifest["step"], ["sample", "film"],
                    ["model_output"])
        else:
            _export(_Step(model), (sample, torch.tensor([1], dtype=torch.int64), *values),
                    out / manifest["step"], ["sample", "timestep", *names], ["model_output"])
        if loop and not any(sampler.noisy):
            manifest["loop"] = "denoiser_loop.onnx"
            _export(_Loop(model, sampler), (sample, *values), out / manifest["loop"],
                    ["noise", *names], ["actions"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def quantize_int8(out_dir: str | Path, block_size: int = 32) -> str:
    """int8 weights for the step graph's MatMuls: onnxruntime's MatMulNBits (8 bits,
    symmetric blocks of `block_size` along the input dimension, one fp32 scale per block),
    computed with int8 activations (accuracy_level 4: VNNI dot products where the CPU has
    them). The convolutions are MatMuls in this graph (MatmulConv1d), so that is nearly
    every U-Net weight. Needs the onnx_ir package (onnxruntime's quantizer imports it)."""
    import_onnxruntime()
    import onnx
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise RuntimeError("int8 export needs onnxruntime's MatMulNBits quantizer and the "
                           f"onnx-ir package (pip install onnx-ir): {exc}") from exc
    out = Path(out_dir)
    name = "denoiser_step_int8.onnx"
    loggers = [logging.getLogger(n) for n in ("", "onnxruntime", MatMulNBitsQuantizer.__module__)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # the quantizer reports every node at INFO
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = onnx.load(str(out / "denoiser_step.onnx"))
            q = MatMulNBitsQuantizer(graph, bits=8, block_size=block_size, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=_small_matmuls(graph))
            q.process()
            q.model.save_model_to_file(str(out / name), use_external_data_format=False)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return name


SMALL_MATMUL = 64  # channels: layers touching the action or a narrow dimension stay fp32


def _small_matmuls(graph) -> list[str]:
    """MatMuls whose weight has a side below SMALL_MATMUL (the first and last U-Net layers,
    which see or produce the action itself): few bytes, most of the quantization error."""
    shapes = {t.name: tuple(t.dims) for t in graph.graph.initializer}
    return [n.name for n in graph.graph.node if n.op_type == "MatMul" and len(n.input) > 1
            and n.input[1] in shapes and min(shapes[n.input[1]]) < SMALL_MATMUL]


def compare(reference, candidate, windows) -> float:
    """Largest absolute action difference of two Policy objects on (obs, noise) windows."""
    return max((float(d.max()) for d in action_differences(reference, candidate, windows)), default=0.0)


def _median_plan_ms(policy, windows, repeats: int) -> float:
    times = []
    for r in range(repeats):
        obs, noise = windows[r % len(windows)]
        policy.cache.clear()
        t0 = time.perf_counter()
        policy.predict(obs, noise=noise)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def export_policy(policy, out_dir: str | Path, *, int8: bool = False,
                  torch_precisions: tuple[str, ...] = (), check_windows: int = 4,
                  time_repeats: int = 5, log: Callable[[str], None] = print) -> dict:
    """Export a loaded fp32 torch Policy to ONNX in `out_dir`, check it, and gate the
    requested reduced precisions; returns the manifest (also written to the directory)."""
    from .inference import Policy

    if policy.backend != "torch" or policy.engine.precision != "fp32" or policy.device.type != "cpu":
        raise ValueError("export needs the fp32 torch policy on the CPU")
    cfg, model = policy.config, policy.model
    t0 = time.perf_counter()
    manifest = write_onnx(model, model.noise_schedule.sampler(), out_dir)
    log(f"wrote {out_dir}: {len(manifest['encoders'])} encoder(s), denoiser step"
        + (", unrolled loop" if manifest["loop"] else "") + f" ({time.perf_counter() - t0:.1f} s)")
    windows = fixed_windows(cfg, check_windows)
    ref = Policy(cfg, model, torch.device("cpu"), seed=0)
    checks, graphs = {}, ["step"] + (["loop"] if manifest["loop"] else [])
    engines = {}
    for g in graphs:
        engines[g] = Policy(cfg, model, torch.device("cpu"), seed=0, backend="onnxruntime",
                            onnx_dir=out_dir, plan_graph=g)
        checks[g] = compare(ref, engines[g], windows)
        ok = checks[g] <= EQUAL_TOL
        log(f"  onnxruntime ({g}) vs torch: max |action difference| {checks[g]:.2e} "
            f"over {len(windows)} windows ({'OK' if ok else 'FAIL'}: tolerance {EQUAL_TOL:g})")
    manifest["equality"] = {"tolerance": EQUAL_TOL, "max_abs": checks}
    if len(graphs) > 1:
        ms = {g: _median_plan_ms(engines[g], windows, time_repeats) for g in graphs}
        manifest["plan_graph"] = min(ms, key=ms.get)
        manifest["plan_ms"] = ms
        log("  cold plan, median ms: " + ", ".join(f"{g} {v:.1f}" for g, v in ms.items())
            + f" -> {manifest['plan_graph']}")
    gates = {}
    if int8:
        manifest["int8"] = {"file": quantize_int8(out_dir), "gate": None}
        (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1))
        q = Policy(cfg, model, torch.device("cpu"), seed=0, backend="onnxruntime",
                   onnx_dir=out_dir, precision="int8", gate=False)
        gates["int8"] = accuracy_gate(ref, q, "int8")
        manifest["int8"]["gate"] = gates["int8"].as_dict()
    for prec in torch_precisions:  # on a copy: the reference stays fp32
        cand = Policy(cfg, copy.deepcopy(model), torch.device("cpu"), seed=0, precision=prec,
                      gate=False)
        gates[prec] = accuracy_gate(ref, cand, prec)
    if gates:
        manifest["gates"] = {k: g.as_dict() for k, g in gates.items()}
        log("  accuracy gate (reduced precision vs fp32 torch, fixed windows):")
        for g in gates.values():
            log("    " + g.line())
    (Path(out_dir) / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def cached_onnx_dir(policy, int8: bool = False, root: Optional[Path] = None,
                    log: Callable[[str], None] = lambda _msg: None,
                    digest: Optional[str] = None) -> Path:
    """The export of this policy's fp32 weights in the user cache, written (and checked,
    and with `int8` quantized and gated) on first use, and again after a format change.
    `digest`: model_digest(policy.model) when the caller has it (hashing reads every weight)."""
    from ..paths import cache_dir
    from .backends.onnx_backend import read_manifest

    digest = digest or model_digest(policy.model)
    d = (root or cache_dir() / "onnx") / digest
    try:
        manifest = read_manifest(d)
        if manifest.get("digest") == digest and manifest.get("format") == FORMAT \
                and (manifest.get("int8") or not int8):
            return d
    except Exception:  # noqa: BLE001 - missing or unreadable: export again
        pass
    from .inference import Policy
    model = copy.deepcopy(policy.model).float().cpu()
    fp32 = Policy(policy.config, model, torch.device("cpu"), seed=0)
    tmp = d.parent / f".{d.name}.{os.getpid()}"  # another process may export the same weights
    shutil.rmtree(tmp, ignore_errors=True)
    export_policy(fp32, tmp, int8=int8, log=log)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return d
