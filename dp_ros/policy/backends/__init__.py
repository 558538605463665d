"""Inference backends behind ``Policy.predict``.

An engine does two things for the Policy, which keeps everything else (observation checks,
the per-frame feature cache, initial noise, warm start):

- ``encode_camera(name, frames)``: uint8 (N, H, W, 3) numpy frames -> (N, F) float32 torch
  features (on the policy's device);
- ``sample(feats, state, x, start_index, generator)``: per-frame features (1, T_o, F) or
  None, raw state (1, T_o, D), the sample x (1, T_p, A) at the noise level of sampler step
  ``start_index`` -> raw actions (1, T_p, A) float32.

Backends: ``torch`` (eager on CPU or CUDA; on CUDA the denoising loop is captured once per
start index as a CUDA graph and replayed) and ``onnxruntime`` (ONNX files written by
``dp_ros.policy.export``; providers TensorRT -> CUDA -> CPU, whichever are installed).

Precision: ``fp32`` everywhere; ``bf16``/``fp16`` weights for torch; ``int8`` weight
quantization for onnxruntime. Reduced precision is opt-in and accepted only after the
accuracy gate (``precision.accuracy_gate``) against fp32.
"""

from __future__ import annotations

BACKENDS = ("torch", "onnxruntime")
PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "onnxruntime": ("fp32", "int8")}


def check_backend(backend: str, precision: str = "fp32") -> None:
    """Raise ValueError naming a bad backend or a precision the backend does not offer."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS[backend]:
        raise ValueError(f"precision {precision!r} is not available with backend {backend!r} "
                         f"(choose from {', '.join(PRECISIONS[backend])})")
