"""The onnxruntime backend: the ONNX files written by ``dp_ros.policy.export``.

- one encoder graph per camera (uint8 frames (N, H, W, 3) -> features), so the Policy's
  per-frame feature cache works as with torch;
- the denoiser as one step (noisy sample + conditioning -> network output) driven by the
  same fused ``Sampler`` as the torch backend. For the U-Net the conditioning is the step's
  FiLM row, from a film graph run once per plan for the steps it visits (frame features,
  raw state, timesteps -> FiLM; the state normaliser is folded in); for the transformer it
  is the timestep, frame features and raw state. For DDIM, optionally the unrolled loop
  (frame features, raw state, initial noise -> raw actions; both normalisers folded in).
  The export measures step and loop and records the faster in the manifest; the loop
  serves cold starts, the step warm starts.

Providers are tried in the order TensorRT -> CUDA -> CPU among those the installed
onnxruntime offers. int8 uses the dynamically quantized step graph, only if the export's
accuracy gate passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..model import DiffusionPolicyModel
from ..schedule import Inpaint, Sampler

MANIFEST = "manifest.json"
FORMAT = "dp_ros-onnx/3"  # /2: U-Net convolutions as im2col MatMuls, Mish from Exp; /3: the
# encoder's small-map convolutions too. Same inputs and outputs: /2 files are still served.
READABLE_FORMATS = ("dp_ros-onnx/2", FORMAT)
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxBackendError(RuntimeError):
    """The ONNX files cannot serve this policy (missing, stale, or a failed gate)."""


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise OnnxBackendError("backend 'onnxruntime' needs the onnxruntime package "
                               "(pip install 'dp_ros[onnx]', or onnxruntime-gpu)") from exc
    return onnxruntime


def choose_providers(available: Optional[list[str]] = None, device: str = "cpu") -> list[str]:
    """TensorRT -> CUDA -> CPU, restricted to what onnxruntime offers (CPU only for cpu)."""
    if available is None:
        available = import_onnxruntime().get_available_providers()
    order = PROVIDER_ORDER if device != "cpu" else ("CPUExecutionProvider",)
    chosen = [p for p in order if p in available]
    if not chosen:
        raise OnnxBackendError(f"onnxruntime offers none of {list(order)} (has {available})")
    return chosen


def read_manifest(onnx_dir: str | Path) -> dict:
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        raise OnnxBackendError(f"{onnx_dir}: no {MANIFEST} (write one with dp-ros export CKPT --onnx DIR)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") not in READABLE_FORMATS:
        raise OnnxBackendError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r} "
                               "(export again with dp-ros export CKPT --onnx DIR)")
    return manifest


_shared_pool_made = False


def make_session(path: Path, providers: list[str]):
    """A session on the process's one intra-op thread pool, made by the first session with
    torch's thread count. With a pool per session, the encoder's, FiLM's and denoiser's
    threads spin after each run and take the cores from the next session's: on 2 cores,
    encoder 28 -> 13 ms and a FiLM + 3-step warm start 121 -> 56 ms with one pool.
    (onnxruntime then refuses per-session pools, so the size holds for the process.)"""
    global _shared_pool_made
    ort = import_onnxruntime()
    if not _shared_pool_made:
        ort.set_global_thread_pool_sizes(int(torch.get_num_threads()), 1)
        _shared_pool_made = True
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.use_per_session_threads = False
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, model: DiffusionPolicyModel, sampler: Sampler, onnx_dir: str | Path,
                 digest: str, precision: str = "fp32", device: str = "cpu",
                 providers: Optional[list[str]] = None, plan_graph: Optional[str] = None,
                 require_gate: bool = True):
        cfg = model.cfg
        if cfg.head == "regression":
            raise OnnxBackendError("backend 'onnxruntime' serves diffusion heads only "
                                   "(this policy has a regression head)")
        self.model = model  # the normaliser (action) for the step graph's output
        self.sampler = sampler
        self.dir = Path(onnx_dir)
        self.manifest = read_manifest(self.dir)
        if self.manifest.get("digest") != digest:
            raise OnnxBackendError(f"{self.dir}: written for other weights or another config "
                                   f"(digest {self.manifest.get('digest')}, policy {digest}); "
                                   "export again")
        self.precision = precision
        self.providers = providers or choose_providers(device=device)
        self.encoders = {name: make_session(self.dir / f, self.providers)
                         for name, f in self.manifest["encoders"].items()}
        step_file = self.manifest["step"]
        if precision == "int8":
            q = self.manifest.get("int8")
            if not q:
                raise OnnxBackendError(f"{self.dir}: no int8 model (dp-ros export --int8)")
            if not require_gate:
                pass  # measuring what int8 would cost (export, bench): no refusal
            elif q.get("gate") is None:
                raise OnnxBackendError(f"{self.dir}: the int8 model has no accuracy gate result")
            elif not q["gate"]["passed"]:
                raise OnnxBackendError(
                    f"int8 refused: its accuracy gate failed at export (max action difference "
                    f"{q['gate']['max_rel']:.2%} of the action range > {q['gate']['limit']:.0%})")
            step_file = q["file"]
        equality = self.manifest.get("equality")
        if equality and max(equality["max_abs"].values()) > equality["tolerance"]:
            raise OnnxBackendError(f"{self.dir}: the export's equality check with torch failed "
                                   f"({equality['max_abs']} > {equality['tolerance']:g})")
        self.step = make_session(self.dir / step_file, self.providers)
        self.film = None
        if self.manifest.get("film"):
            self.film = make_session(self.dir / self.manifest["film"], self.providers)
        chosen = plan_graph or self.manifest.get("plan_graph", "step")
        self.loop = None
        if chosen == "loop" and precision == "fp32" and self.manifest.get("loop"):
            self.loop = make_session(self.dir / self.manifest["loop"], self.providers)
        self.has_images = bool(cfg.cameras)
        self.has_state = cfg.state_dim > 0
        self.denoiser_calls = 0

    @property
    def plan_graph(self) -> str:
        return "loop" if self.loop is not None else "step"

    def encode_camera(self, name: str, frames: np.ndarray) -> torch.Tensor:
        out = self.encoders[name].run(None, {"frames": np.ascontiguousarray(frames)})[0]
        return torch.from_numpy(out)

    def _feeds(self, feats, state) -> dict:
        feeds = {}
        if self.has_images:
            feeds["frame_features"] = np.ascontiguousarray(feats.cpu().numpy(), dtype=np.float32)
        if self.has_state:
            feeds["state"] = np.ascontiguousarray(state.cpu().numpy(), dtype=np.float32)
        return feeds

    def sample(self, feats: Optional[torch.Tensor], state: torch.Tensor, x: torch.Tensor,
               start_index: int, generator: Optional[torch.Generator],
               inpaint: Optional[Inpaint] = None) -> torch.Tensor:
        feeds = self._feeds(feats, state)
        x = x.cpu()
        if inpaint is not None:
            inpaint = Inpaint(inpaint.mask.cpu(), inpaint.x0.cpu(), inpaint.noise.cpu())
        if self.loop is not None and start_index == 0 and inpaint is None:
            feeds["noise"] = np.ascontiguousarray(x.numpy(), dtype=np.float32)
            self.denoiser_calls += len(self.sampler)
            return torch.from_numpy(self.loop.run(None, feeds)[0])

        if self.film is not None:  # one FiLM row per step, in the order Sampler.run visits them
            timesteps = self.sampler.timesteps[start_index:].numpy()
            rows = iter(self.film.run(None, {**feeds, "timesteps": timesteps})[0])
            feeds = {}  # the step graph then takes only the sample and its FiLM row

        def fn(xk: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.denoiser_calls += 1
            feeds["sample"] = np.ascontiguousarray(xk.numpy(), dtype=np.float32)
            if self.film is not None:
                feeds["film"] = next(rows)
            else:
                feeds["timestep"] = np.asarray(t, dtype=np.int64).reshape(1)
            return torch.from_numpy(self.step.run(None, feeds)[0])

        naction = self.sampler.run(fn, x, start_index=start_index, generator=generator,
                                   inpaint=inpaint)
        return self.model.normalizer.unnormalize("action", naction)
