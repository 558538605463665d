"""Backend selection: names and precisions validated with the reason, onnxruntime providers
in the order TensorRT -> CUDA -> CPU, the torch backend's CUDA-graph path falling back to
eager on the CPU (and, where a GPU exists, equal to eager), the accuracy gate, and the
policy node's backend / precision / warm_start_steps parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dp_ros.policy.backends import check_backend
from dp_ros.policy.backends.onnx_backend import OnnxBackendError, choose_providers
from dp_ros.policy.backends.precision import GateResult, accuracy_gate, fixed_windows
from dp_ros.policy.normalizer import action_range
from dp_ros.policy.inference import Policy, load_policy
from helpers_policy import make_checkpoint, random_obs


def test_bad_backend_and_precision_are_named():
    check_backend("torch", "bf16")
    check_backend("onnxruntime", "int8")
    with pytest.raises(ValueError, match="'tensorflow'"):
        check_backend("tensorflow")
    with pytest.raises(ValueError, match="'int8' is not available with backend 'torch'"):
        check_backend("torch", "int8")
    with pytest.raises(ValueError, match="'bf16' is not available with backend 'onnxruntime'"):
        check_backend("onnxruntime", "bf16")


def test_providers_are_tried_tensorrt_then_cuda_then_cpu():
    everything = ["CPUExecutionProvider", "AzureExecutionProvider", "CUDAExecutionProvider",
                  "TensorrtExecutionProvider"]
    assert choose_providers(everything, device="cuda") == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], device="cuda") == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(everything, device="cpu") == ["CPUExecutionProvider"]
    with pytest.raises(OnnxBackendError, match="none of"):
        choose_providers(["AzureExecutionProvider"], device="cpu")


def test_torch_backend_on_cpu_runs_eagerly_and_counts_network_calls(cfg, model):
    policy = Policy(cfg, model, torch.device("cpu"), seed=0)
    assert policy.backend == "torch" and policy.precision == "fp32"
    assert not policy.engine.uses_cuda_graph  # no GPU: the eager fallback
    out = policy.predict(random_obs(cfg, 0))
    assert out.shape == (cfg.T_p, cfg.action_dim)
    assert policy.engine.denoiser_calls == cfg.schedule.num_inference_steps
    assert policy.engine.graph_replays == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_eager(cfg, model):  # pragma: no cover - no GPU in CI
    import copy
    graph = Policy(cfg, copy.deepcopy(model), torch.device("cuda"), seed=0)
    eager = Policy(cfg, copy.deepcopy(model), torch.device("cuda"), seed=0, cuda_graph=False)
    assert graph.engine.uses_cuda_graph and not eager.engine.uses_cuda_graph
    for s in range(3):
        obs = random_obs(cfg, s)
        noise = np.random.default_rng(s).standard_normal((cfg.T_p, cfg.action_dim)).astype(np.float32)
        np.testing.assert_allclose(graph.predict(obs, noise=noise), eager.predict(obs, noise=noise),
                                   atol=1e-5)
    assert graph.engine.graph_replays == 3


class _Offset:
    """A 'candidate policy' whose actions differ from the reference by a fixed fraction of
    the action range."""

    def __init__(self, reference, fraction):
        self.ref, self.fraction = reference, fraction
        self.generator = torch.Generator()
        self.rng = action_range(reference.config)

    def predict(self, obs, noise=None):
        return self.ref.predict(obs, noise=noise) + self.fraction * self.rng.astype(np.float32)


def test_accuracy_gate_passes_under_one_percent_of_the_range_and_fails_above(cfg, model):
    ref = Policy(cfg, model, torch.device("cpu"), seed=0)
    windows = fixed_windows(cfg, 2)
    ok = accuracy_gate(ref, _Offset(ref, 0.005), "test", windows)
    bad = accuracy_gate(ref, _Offset(ref, 0.02), "test", windows)
    assert ok.passed and ok.max_rel == pytest.approx(0.005, rel=1e-3)
    assert not bad.passed and bad.max_rel == pytest.approx(0.02, rel=1e-3)
    assert "PASS" in ok.line() and "FAIL" in bad.line()


def test_reduced_precision_casts_the_weights_and_is_gated(cfg, model):
    import copy
    fp16 = Policy(cfg, copy.deepcopy(model), torch.device("cpu"), seed=0, precision="fp16",
                  gate=False)
    assert next(fp16.model.denoiser.parameters()).dtype == torch.float16
    assert next(fp16.model.obs_encoder.parameters()).dtype == torch.float16
    ref = Policy(cfg, model, torch.device("cpu"), seed=0)
    result = accuracy_gate(ref, fp16, "fp16", fixed_windows(cfg, 2))
    assert isinstance(result, GateResult) and 0 < result.max_abs < 1.0  # close, not equal
    # with the gate on, a precision either passes it or is refused with the measured error
    try:
        gated = Policy(cfg, copy.deepcopy(model), torch.device("cpu"), seed=0, precision="bf16")
    except ValueError as err:
        assert "refused by the accuracy gate" in str(err) and "of the action range" in str(err)
    else:
        assert gated.gate is not None and gated.gate.passed


def test_the_gate_leaves_the_policy_seeded_as_asked(cfg, model, monkeypatch):
    """The gate runs its fixed windows (reseeding the generator, filling the feature
    cache) inside the constructor: the policy's own seed must still hold after it."""
    import copy
    from dp_ros.policy.backends import precision

    def gate(reference, candidate, name, windows=None):
        candidate.generator.manual_seed(precision.GATE_SEED)
        candidate.cache.put(("gate", 0), torch.zeros(1))
        return GateResult(name, 0.0, 0.0, precision.GATE_LIMIT, True)

    monkeypatch.setattr(precision, "accuracy_gate", gate)
    gated = Policy(cfg, copy.deepcopy(model), torch.device("cpu"), seed=7, precision="fp16")
    assert gated.gate.passed and gated.generator.initial_seed() == 7
    assert gated.cache.get(("gate", 0)) is None


def test_load_policy_passes_the_backend_options(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    policy = load_policy(ckpt, device="cpu", warm_start_steps=2)
    assert policy.warm_start_steps == 2 and policy.backend == "torch"
    with pytest.raises(ValueError, match="precision 'int8' is not available"):
        load_policy(ckpt, device="cpu", precision="int8")


def test_policy_node_backend_parameters(ros_context, tmp_path):
    from rclpy.parameter import Parameter

    from dp_ros.nodes.policy_node import PolicyNode

    ckpt = make_checkpoint(tmp_path / "ckpt")
    base = {"policy_path": str(ckpt), "device": "cpu"}

    def start(**params):
        return PolicyNode(context=ros_context, parameter_overrides=[
            Parameter(k, value=v) for k, v in {**base, **params}.items()])

    for params, reason in [({"backend": "tensorrt"}, "backend must be one of"),
                           ({"precision": "int4"}, "precision 'int4'"),
                           ({"backend": "torch", "precision": "int8"}, "'int8' is not available"),
                           ({"warm_start_steps": 10}, "warm_start_steps")]:
        with pytest.raises(ValueError, match=reason):
            start(**params)
    node = start(warm_start_steps=3)
    try:
        assert node.runner.policy.warm_start_steps == 3
        refused = node.set_parameters([Parameter("warm_start_steps", value=12)])
        assert not refused[0].successful and "warm_start_steps" in refused[0].reason
        assert node.set_parameters([Parameter("warm_start_steps", value=0)])[0].successful
        assert node.runner.policy.warm_start_steps == 0
        for name, value in (("backend", "onnxruntime"), ("precision", "fp16")):  # fixed at start
            [result] = node.set_parameters([Parameter(name, value=value)])
            assert not result.successful and "read-only" in result.reason, (name, result.reason)
    finally:
        node.destroy_node()
