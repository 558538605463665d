"""The torch backend: eager on CPU or CUDA, the denoising loop as a CUDA graph on CUDA.

Reduced precision (bf16/fp16) casts the encoder's and the denoiser's weights; the
conditioning, the sampler arithmetic and the normaliser stay in fp32 (the sample is cast
at each network call), so only the network evaluations lose precision.

CUDA graph: the whole loop (conditioning, K - start_index network calls, sampler updates,
unnormalisation) is captured once per start index into static input/output buffers and
replayed; a plan is three copies in, one replay, one copy out, instead of hundreds of
kernel launches per denoising step. Used only for samplers that draw no noise inside the
loop (DDIM); DDPM runs eagerly, and so does a warm start that keeps the running plan's
prefix (``Inpaint``). Never measured on a GPU in this repository (see README).
The U-Net's FiLM for the plan's steps is computed from the conditioning inside ``_eager``,
so the graph captures it too and a replay recomputes it from the new inputs.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..model import DiffusionPolicyModel
from ..schedule import Inpaint, Sampler

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchEngine:
    name = "torch"

    def __init__(self, model: DiffusionPolicyModel, sampler: Sampler, device: torch.device,
                 precision: str = "fp32", cuda_graph: bool = True):
        self.model = model
        self.sampler = sampler
        self.device = device
        self.precision = precision
        self.dtype = DTYPES[precision]
        if self.dtype != torch.float32:
            for part in (model.obs_encoder, model.denoiser, getattr(model, "regressor", None)):
                if part is not None:
                    part.to(self.dtype)
        if device.type == "cpu" and model.obs_encoder is not None:
            # NHWC activations: the frames arrive NHWC, and oneDNN's convolutions then skip a
            # weight/activation reorder per call (measured 1.8x faster encoder, same output)
            model.obs_encoder.to(memory_format=torch.channels_last)
        self.cuda_graph = bool(cuda_graph) and device.type == "cuda" and not any(sampler.noisy)
        self._graphs: dict[tuple, tuple] = {}  # (start_index, shapes) -> (graph, inputs, output)
        self.denoiser_calls = 0
        self.graph_replays = 0

    @property
    def uses_cuda_graph(self) -> bool:
        return self.cuda_graph

    def encode_camera(self, name: str, frames) -> torch.Tensor:
        batch = torch.from_numpy(frames).to(self.device)
        return self.model.obs_encoder.encode_camera(name, batch).float()

    # ------------------------------------------------------------------ sampling

    def _eager(self, feats: Optional[torch.Tensor], state: torch.Tensor, x: torch.Tensor,
               start_index: int, generator: Optional[torch.Generator],
               count: bool = True, inpaint: Optional[Inpaint] = None) -> torch.Tensor:
        model, dtype = self.model, self.dtype
        cond = model.condition(feats, state)
        if model.cfg.head == "regression":
            naction = model.regressor(cond.to(dtype)).float()
            return model.normalizer.unnormalize("action", naction)
        net = model.plan_fn(cond.to(dtype), self.sampler.timesteps[start_index:])

        def fn(xk: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if count:
                self.denoiser_calls += 1
            return net(xk.to(dtype), t).float()

        naction = self.sampler.run(fn, x, start_index=start_index, generator=generator,
                                   inpaint=inpaint)
        return model.normalizer.unnormalize("action", naction)

    def sample(self, feats: Optional[torch.Tensor], state: torch.Tensor, x: torch.Tensor,
               start_index: int, generator: Optional[torch.Generator],
               inpaint: Optional[Inpaint] = None) -> torch.Tensor:
        if not self.cuda_graph or self.model.cfg.head == "regression" or inpaint is not None:
            return self._eager(feats, state, x, start_index, generator, inpaint=inpaint)
        return self._replay(feats, state, x, start_index)

    def _replay(self, feats, state, x, start_index: int) -> torch.Tensor:
        key = (start_index, None if feats is None else tuple(feats.shape), tuple(state.shape),
               tuple(x.shape))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(feats, state, x, start_index)
            self._graphs[key] = entry
        graph, (s_feats, s_state, s_x), out = entry
        if s_feats is not None:
            s_feats.copy_(feats)
        s_state.copy_(state)
        s_x.copy_(x)
        graph.replay()
        self.denoiser_calls += len(self.sampler) - start_index
        self.graph_replays += 1
        return out.clone()

    def _capture(self, feats, state, x, start_index: int):
        s_feats = None if feats is None else feats.clone()
        s_state, s_x = state.clone(), x.clone()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph (lazy init, autotuning)
            for _ in range(2):
                self._eager(s_feats, s_state, s_x, start_index, None, count=False)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager(s_feats, s_state, s_x, start_index, None, count=False)
        return graph, (s_feats, s_state, s_x), out
