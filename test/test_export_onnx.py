"""`dp-ros export CKPT --onnx OUT` and the onnxruntime backend: the same actions as the torch
backend within 1e-4 on the CPU (step graph, unrolled loop, DDPM, warm start, feature cache),
exports of other weights refused, the int8 accuracy gate enforced."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from dp_ros.cli import main as cli_main  # noqa: E402
from dp_ros.policy.backends.onnx_backend import FORMAT, MANIFEST, OnnxBackendError  # noqa: E402
from dp_ros.policy.export import (  # noqa: E402
    EQUAL_TOL, ExpMish, MatmulConv1d, MatmulConv2d, cached_onnx_dir, export_form, export_policy,
    model_digest)
from dp_ros.policy.inference import load_policy  # noqa: E402
from dp_ros.policy.model import build_model  # noqa: E402
from dp_ros.policy.config import ScheduleConfig  # noqa: E402
from dp_ros.policy.warm_start import PreviousPlan, shift_plan  # noqa: E402
from helpers_policy import make_checkpoint, random_noise, random_obs, small_config  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small DDIM checkpoint exported through the command line (with int8)."""
    root = tmp_path_factory.mktemp("onnx")
    # 3 DDIM steps: the unrolled loop traces in a third of the time of 10
    cfg = small_config(schedule=ScheduleConfig(num_inference_steps=3))
    ckpt = make_checkpoint(root / "ckpt", cfg, torch_seed=1)
    out = root / "onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(["export", str(ckpt), "--onnx", str(out), "--int8"]) == 0
    return ckpt, out, printed.getvalue()


def test_export_command_writes_the_graphs_and_prints_the_checks(exported):
    ckpt, out, text = exported
    assert "onnxruntime (step) vs torch" in text and "onnxruntime (loop) vs torch" in text
    assert "int8: max |action - fp32|" in text  # the accuracy gate is printed
    manifest = json.loads((out / MANIFEST).read_text())
    for name in [*manifest["encoders"].values(), manifest["step"], manifest["film"],
                 manifest["loop"], manifest["int8"]["file"]]:
        assert (out / name).is_file(), name
    assert manifest["plan_graph"] in ("step", "loop")
    assert all(v <= EQUAL_TOL for v in manifest["equality"]["max_abs"].values())
    gate = manifest["int8"]["gate"]
    assert gate["passed"] == (gate["max_rel"] <= gate["limit"] == 0.01)


@pytest.mark.parametrize("graph", ["step", "loop"])
def test_onnxruntime_backend_equals_torch(exported, graph):
    ckpt, out, _ = exported
    ref = load_policy(ckpt, device="cpu", seed=0)
    ort = load_policy(ckpt, device="cpu", seed=0, backend="onnxruntime", onnx_dir=out,
                      plan_graph=graph)
    assert ort.engine.plan_graph == graph
    for s in range(3):
        obs, noise = random_obs(ref.config, 100 + s), random_noise(ref.config, s)
        a, b = ref.predict(obs, noise=noise), ort.predict(obs, noise=noise)
        assert np.abs(a - b).max() <= TOL
    # the per-frame feature cache works the same: a window sharing a frame with the last
    frames = random_obs(ref.config, 7)["images"]["image"]
    new = random_obs(ref.config, 17)["images"]["image"][:1]
    shifted = {"images": {"image": np.concatenate([frames[1:], new])},
               "state": random_obs(ref.config, 8)["state"]}
    first = {"images": {"image": frames}, "state": shifted["state"]}
    for p in (ref, ort):
        p.cache.clear()
        p.predict(first, noise=random_noise(ref.config, 9))
        hits = p.cache.hits
        p.predict(shifted, noise=random_noise(ref.config, 9))
        assert p.cache.hits == hits + 1
    assert np.abs(ref.predict(shifted, noise=random_noise(ref.config, 9))
                  - ort.predict(shifted, noise=random_noise(ref.config, 9))).max() <= TOL


@pytest.mark.parametrize("keep", [0, 2])
def test_warm_start_through_the_step_graph_equals_torch(exported, keep):
    ckpt, out, _ = exported
    ref = load_policy(ckpt, device="cpu", seed=0, warm_start_steps=2, warm_start_keep_steps=keep)
    ort = load_policy(ckpt, device="cpu", seed=0, warm_start_steps=2, backend="onnxruntime",
                      onnx_dir=out, plan_graph="loop", warm_start_keep_steps=keep)
    cfg = ref.config
    prev = PreviousPlan(np.random.default_rng(3).uniform(-3, 1, (cfg.T_p, cfg.action_dim))
                        .astype(np.float32), stamp_ns=0)
    obs, noise = random_obs(cfg, 4), random_noise(cfg, 4)
    # the newest state where the previous plan put the arm: it followed the plan (warm)
    obs["state"][-1] = shift_plan(prev, 200_000_000, cfg.dt, cfg.T_p)[cfg.T_o - 1]
    a = ref.predict(obs, noise=noise, previous=prev, plan_stamp_ns=200_000_000)
    calls = ort.engine.denoiser_calls
    b = ort.predict(obs, noise=noise, previous=prev, plan_stamp_ns=200_000_000)
    assert ort.engine.denoiser_calls - calls == 2  # the step graph, 2 of 3 steps
    assert np.abs(a - b).max() <= TOL


def test_export_of_other_weights_and_failed_int8_gate_are_refused(exported, tmp_path):
    ckpt, out, _ = exported
    other = make_checkpoint(tmp_path / "other", torch_seed=5)
    with pytest.raises(OnnxBackendError, match="other weights"):
        load_policy(other, device="cpu", backend="onnxruntime", onnx_dir=out)
    copy = tmp_path / "onnx_copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["int8"]["gate"].update(passed=False, max_rel=0.05)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OnnxBackendError, match="accuracy gate failed"):
        load_policy(ckpt, device="cpu", backend="onnxruntime", onnx_dir=copy, precision="int8")
    manifest["int8"]["gate"].update(passed=True, max_rel=0.001)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    q = load_policy(ckpt, device="cpu", backend="onnxruntime", onnx_dir=copy, precision="int8")
    assert q.precision == "int8" and q.predict(random_obs(q.config, 0)).shape == (8, 2)


def test_older_export_formats_are_served_or_refused_and_the_cache_exports_again(exported, tmp_path):
    """/2 has the inputs and outputs of the current format (only its encoder graph is
    slower): it is served. /1 is refused with the fix. The user cache re-exports a /2."""
    ckpt, out, _ = exported
    copy = tmp_path / "onnx_copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest["format"] == FORMAT
    for old, served in (("dp_ros-onnx/2", True), ("dp_ros-onnx/1", False)):
        (copy / MANIFEST).write_text(json.dumps({**manifest, "format": old}))
        if served:
            p = load_policy(ckpt, device="cpu", backend="onnxruntime", onnx_dir=copy)
            assert p.predict(random_obs(p.config, 0)).shape == (8, 2)
        else:
            with pytest.raises(OnnxBackendError, match="export again"):
                load_policy(ckpt, device="cpu", backend="onnxruntime", onnx_dir=copy)
    policy = load_policy(ckpt, device="cpu")
    cache = tmp_path / "cache" / model_digest(policy.model)
    shutil.copytree(out, cache)
    (cache / MANIFEST).write_text(json.dumps({**manifest, "format": "dp_ros-onnx/2"}))
    assert cached_onnx_dir(policy, root=cache.parent) == cache
    assert json.loads((cache / MANIFEST).read_text())["format"] == FORMAT


def test_transformer_with_ddpm_exports_the_step_graph_equal_to_torch(tmp_path):
    """The transformer denoiser, and a DDPM sampler: it draws noise inside the loop, so only
    the step graph is exported, and the same generator gives the same draws."""
    from dp_ros.policy.config import TransformerConfig
    cfg = small_config(denoiser="transformer", transformer=TransformerConfig(n_layer=2, n_head=2, n_emb=32),
                       schedule=ScheduleConfig(sampler="ddpm", num_inference_steps=3))
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg, torch_seed=3)
    ref = load_policy(ckpt, device="cpu", seed=0)
    manifest = export_policy(ref, tmp_path / "onnx", check_windows=1, time_repeats=1,
                             log=lambda _m: None)
    assert manifest["loop"] is None and manifest["equality"]["max_abs"]["step"] <= TOL
    assert manifest["film"] is None  # no FiLM in the transformer: the step takes the timestep
    ort = load_policy(ckpt, device="cpu", seed=0, backend="onnxruntime", onnx_dir=tmp_path / "onnx")
    for s in range(2):
        ref.generator.manual_seed(s)
        ort.generator.manual_seed(s)
        obs, noise = random_obs(cfg, s), random_noise(cfg, s)
        assert np.abs(ref.predict(obs, noise=noise) - ort.predict(obs, noise=noise)).max() <= TOL


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Conv1d(6, 5, 5, padding=2),
    lambda: torch.nn.Conv1d(6, 5, 3, stride=2, padding=1),  # Downsample1d
    lambda: torch.nn.Conv1d(6, 5, 1),  # residual 1x1
    lambda: torch.nn.Conv1d(6, 5, 4, stride=3, padding=0, bias=False),
    lambda: torch.nn.ConvTranspose1d(6, 5, 4, 2, 1),  # Upsample1d
    lambda: torch.nn.ConvTranspose1d(6, 5, 3, stride=2, padding=0),
])
@pytest.mark.parametrize("t", [4, 7, 16])
def test_matmul_conv_equals_the_convolution_it_replaces(make, t):
    torch.manual_seed(t)
    conv = make()
    x = torch.randn(2, 6, t)
    with torch.no_grad():
        assert torch.allclose(MatmulConv1d(conv)(x), conv(x), atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Conv2d(6, 64, 3, padding=1, bias=False),  # ResNet 3x3
    lambda: torch.nn.Conv2d(6, 64, 3, stride=2, padding=1),  # first conv of a stage
    lambda: torch.nn.Conv2d(6, 64, 1, stride=2, bias=False),  # downsample 1x1
    lambda: torch.nn.Conv2d(6, 64, (2, 3), stride=(1, 2), padding=(0, 1)),
])
@pytest.mark.parametrize("hw", [(3, 3), (4, 5), (6, 6), (11, 11)])
def test_matmul_conv2d_equals_the_convolution_it_replaces(make, hw):
    """(11, 11) is over the im2col cost limit for 64 channels: the Conv itself runs."""
    torch.manual_seed(hw[0])
    conv = make()
    x = torch.randn(2, 6, *hw)
    mm = MatmulConv2d(conv)
    with torch.no_grad():
        assert torch.allclose(mm(x), conv(x), atol=1e-5)
    assert bool(mm._im2col) == (hw[0] * hw[1] <= MatmulConv2d.IM2COL_MAX_COST * 64)


def test_export_form_converts_the_deep_encoder_layers_only():
    """Which encoder convolutions run as MatMuls depends on the map they see: the paper
    CNN's 84x84 crop leaves 6x6 maps in layer3 and 3x3 in layer4."""
    from dp_ros.bench.policy import paper_cnn_config

    cfg = paper_cnn_config()
    torch.manual_seed(0)
    model = export_form(build_model(cfg).eval())
    cam = cfg.cameras[0]
    with torch.no_grad():
        model.obs_encoder.encode_camera(cam.name, torch.zeros((1, cam.height, cam.width, 3), dtype=torch.uint8))
    as_matmul = {n for n, m in model.obs_encoder.named_modules()
                 if isinstance(m, MatmulConv2d) and m._im2col}
    assert as_matmul and all(".layer3." in n or ".layer4." in n for n in as_matmul), as_matmul
    assert any(".layer4." in n and n.endswith("conv1") for n in as_matmul)


def test_exp_mish_equals_mish_over_the_float_range():
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([-1e4, 1e4, 0.0])])
    assert torch.allclose(ExpMish()(x), torch.nn.functional.mish(x), rtol=1e-5, atol=1e-6)
    big = torch.tensor([1e30, -1e30])
    assert torch.equal(ExpMish()(big), torch.tensor([1e30, 0.0]))  # x * n would overflow


def test_exported_step_graph_has_none_of_the_slow_ops(exported):
    """The export form reached the file: convolutions as MatMuls, Mish without Softplus
    (each several times slower per call in onnxruntime, see MatmulConv1d and ExpMish), and
    the im2col matrices as constants, not as the traced ops that built them."""
    import onnx

    _, out, _ = exported
    ops = {n.op_type for n in onnx.load(str(out / "denoiser_step.onnx")).graph.node}
    assert "MatMul" in ops
    slow = {"Conv", "ConvTranspose", "Softplus", "Pad", "Mish", "Where", "ConstantOfShape"}
    assert not ops & slow


def test_exported_step_graph_broadcasts_no_column(exported):
    """No Mul or Add in a step stretches a (C, 1) operand over the time axis: onnxruntime
    does that one row at a time (ExpandedGroupNorm, ConditionalUnet1D.repeat_film)."""
    import onnx

    _, out, _ = exported
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(out / "denoiser_step.onnx"))).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for v in [*graph.value_info, *graph.input]:
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None
                          for d in v.type.tensor_type.shape.dim]
    checked = 0
    for node in (n for n in graph.node if n.op_type in ("Mul", "Add")):
        a, b = (shapes.get(i) for i in node.input)
        assert a is not None and b is not None and None not in a + b, (node.name, a, b)
        if len(a) > 1 and len(b) > 1:
            checked += 1
            assert (a[-1] == 1) == (b[-1] == 1), (node.name, a, b)
    assert checked >= 10


def test_repeated_film_gives_the_same_denoising_step():
    cfg = small_config()
    torch.manual_seed(0)
    unet = build_model(cfg).eval().denoiser
    cond_dim = unet.film_blocks()[0].cond_encoder[1].in_features - unet.diffusion_step_encoder[-1].out_features
    cond, steps = torch.randn(1, cond_dim), torch.tensor([3, 1])
    x = torch.randn(1, cfg.T_p, cfg.action_dim)
    with torch.no_grad():
        plain = unet.forward_film(x, unet.film(cond, steps)[1])
        unet.repeat_film(cfg.T_p)
        film = unet.film(cond, steps)
        assert film.shape[-1] == sum(c * n for c, n in zip(unet.film_sizes, unet.film_repeats))
        assert torch.allclose(unet.forward_film(x, film[1]), plain, atol=1e-6)
