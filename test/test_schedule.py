"""Noise schedules and fused samplers: equal to diffusers over full sampling loops."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from dp_ros.policy.config import ScheduleConfig
from dp_ros.policy.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

SCHEDULES = ["squaredcos_cap_v2", "linear", "scaled_linear"]
PREDICTIONS = ["epsilon", "sample"]
SHAPE = (3, 16, 4)  # (B, T_p, action_dim)
TOL = 1e-5


def _cfg(**kw) -> ScheduleConfig:
    return dataclasses.replace(ScheduleConfig(), **kw)


def _diffusers(cls, cfg: ScheduleConfig, steps: int):
    kw = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
              beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type=cfg.prediction_type,
              clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range,
              steps_offset=cfg.steps_offset, timestep_spacing=cfg.timestep_spacing)
    if cls is DDIMScheduler:
        kw["set_alpha_to_one"] = cfg.set_alpha_to_one
    sched = cls(**kw)
    sched.set_timesteps(steps)
    return sched


class FixedModel:
    """A fixed nonlinear denoiser of (x, t): a tiny random MLP with a time feature."""

    def __init__(self, dim: int = SHAPE[-1], hidden: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(dim + 1, hidden, generator=g) / dim**0.5
        self.w2 = torch.randn(hidden, dim, generator=g) / hidden**0.5

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.int64 and t.dim() == 0
        tf = torch.sin(t.to(x.dtype) * 0.05).expand(*x.shape[:-1], 1)
        h = torch.tanh(torch.cat([x, tf], dim=-1) @ self.w1.to(x.dtype))
        return h @ self.w2.to(x.dtype) + 0.3 * x


def _x_init(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _diffusers_loop(sched, model, x, timesteps=None, generator=None):
    for t in sched.timesteps if timesteps is None else timesteps:
        x = sched.step(model(x, t), t, x, generator=generator).prev_sample
    return x


# --- schedule tensors ----------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("n", [100, 1000])
def test_betas_and_alphas_cumprod_equal_diffusers(beta_schedule, n):
    cfg = _cfg(beta_schedule=beta_schedule, num_train_timesteps=n)
    ours, ref = NoiseSchedule(cfg), _diffusers(DDPMScheduler, cfg, 10)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [1, 7, 10, 16, 33, 100])
def test_timesteps_equal_diffusers(spacing, offset, steps):
    cfg = _cfg(timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and offset and steps == 100:
        with pytest.raises(ValueError, match="steps_offset"):
            NoiseSchedule(cfg).sampler(steps)
        return
    for kind, cls in (("ddim", DDIMScheduler), ("ddpm", DDPMScheduler)):
        s = NoiseSchedule(cfg).sampler(steps, kind)
        assert s.timesteps.dtype == torch.int64 and s.timesteps.shape == (steps,)
        assert torch.equal(s.timesteps, _diffusers(cls, cfg, steps).timesteps)


def test_add_noise_equals_diffusers():
    cfg = _cfg(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 57, 99], dtype=torch.long)
    ref = _diffusers(DDPMScheduler, cfg, 100).add_noise(x0, noise, t)
    ours = NoiseSchedule(cfg).add_noise(x0, noise, t)
    assert torch.allclose(ours, ref, atol=1e-7, rtol=0)
    # each batch element at its own noise level
    ac = NoiseSchedule(cfg).alphas_cumprod
    assert torch.allclose(ours[1], ac[57].sqrt() * x0[1] + (1 - ac[57]).sqrt() * noise[1], atol=1e-6)
    # dtype follows the input
    assert NoiseSchedule(cfg).add_noise(x0.double(), noise.double(), t).dtype == torch.float64


def test_training_target_follows_prediction_type():
    x0, noise = torch.zeros(2, 3), torch.ones(2, 3)
    assert NoiseSchedule(_cfg(prediction_type="epsilon")).training_target(x0, noise) is noise
    assert NoiseSchedule(_cfg(prediction_type="sample")).training_target(x0, noise) is x0


# --- full sampling loops against diffusers --------------------------------------------


@pytest.mark.parametrize("beta_schedule,prediction,clip,alpha_one,steps",
                         list(itertools.product(SCHEDULES, PREDICTIONS, [True, False], [True, False],
                                                [10, 16, 100])))
def test_ddim_loop_equals_diffusers(beta_schedule, prediction, clip, alpha_one, steps):
    cfg = _cfg(beta_schedule=beta_schedule, prediction_type=prediction, clip_sample=clip,
               set_alpha_to_one=alpha_one)
    model, x = FixedModel(), _x_init()
    ref = _diffusers_loop(_diffusers(DDIMScheduler, cfg, steps), model, x)
    ours = NoiseSchedule(cfg).sampler(steps, "ddim").run(model, x)
    assert torch.isfinite(ref).all()
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("spacing,offset,steps", [("trailing", 0, 16), ("trailing", 0, 10),
                                                   ("linspace", 0, 16), ("leading", 1, 10),
                                                   ("leading", 1, 16)])
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_spacings_loop_equals_diffusers(spacing, offset, steps, kind):
    cfg = _cfg(timestep_spacing=spacing, steps_offset=offset, clip_sample_range=0.5)
    model, x = FixedModel(), _x_init()
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    ref = _diffusers_loop(_diffusers(cls, cfg, steps), model, x, generator=torch.Generator().manual_seed(9))
    ours = NoiseSchedule(cfg).sampler(steps, kind).run(model, x, generator=torch.Generator().manual_seed(9))
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("beta_schedule,prediction,clip,steps",
                         list(itertools.product(SCHEDULES, PREDICTIONS, [True, False], [100, 20])))
def test_ddpm_loop_equals_diffusers(beta_schedule, prediction, clip, steps):
    cfg = _cfg(beta_schedule=beta_schedule, prediction_type=prediction, clip_sample=clip)
    model, x = FixedModel(), _x_init()
    ref = _diffusers_loop(_diffusers(DDPMScheduler, cfg, steps), model, x,
                          generator=torch.Generator().manual_seed(5))
    sampler = NoiseSchedule(cfg).sampler(steps, "ddpm")
    # same generator state -> same per-step draws as diffusers
    ours = sampler.run(model, x, generator=torch.Generator().manual_seed(5))
    assert (ours - ref).abs().max().item() <= TOL
    # the same draws handed over explicitly as variance_noise
    g = torch.Generator().manual_seed(5)
    vn = torch.stack([torch.randn(SHAPE, generator=g) if t > 0 else torch.zeros(SHAPE)
                      for t in sampler.timesteps.tolist()])
    ours_vn = sampler.run(model, x, variance_noise=vn)
    assert (ours_vn - ref).abs().max().item() <= TOL


def test_ddpm_is_stochastic_and_ddim_is_not():
    sched, model, x = NoiseSchedule(_cfg()), FixedModel(), _x_init()
    ddpm = sched.sampler(20, "ddpm")
    a = ddpm.run(model, x, generator=torch.Generator().manual_seed(0))
    b = ddpm.run(model, x, generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().max() > 1e-3
    assert ddpm.noisy == [True] * 19 + [False]  # no noise once t reaches 0
    ddim = sched.sampler(10, "ddim")
    assert not any(ddim.noisy)
    assert torch.equal(ddim.run(model, x), ddim.run(model, x))


def test_defaults_come_from_config():
    s = NoiseSchedule(_cfg(sampler="ddpm", num_inference_steps=25)).sampler()
    assert s.kind == "ddpm" and len(s) == 25
    s = NoiseSchedule(_cfg()).sampler()
    assert s.kind == "ddim" and s.timesteps.tolist() == list(range(90, -1, -10))


# --- start_index, step, to ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("start", [1, 4, 9])
def test_start_index_runs_the_tail_of_the_loop(kind, start):
    cfg = _cfg()
    model, x = FixedModel(), _x_init()
    ref_sched = _diffusers(DDIMScheduler if kind == "ddim" else DDPMScheduler, cfg, 10)
    ref = _diffusers_loop(ref_sched, model, x, timesteps=ref_sched.timesteps[start:],
                          generator=torch.Generator().manual_seed(2))
    calls = []

    def spy(xx, t):
        calls.append(int(t))
        return model(xx, t)

    sampler = NoiseSchedule(cfg).sampler(10, kind)
    ours = sampler.run(spy, x, start_index=start, generator=torch.Generator().manual_seed(2))
    assert calls == sampler.timesteps[start:].tolist()
    assert (ours - ref).abs().max().item() <= TOL


def test_warm_start_recovers_a_known_sample():
    """With the exact denoiser of a point mass at x*, DDIM from any start returns x*."""
    cfg = _cfg(clip_sample=False)
    sched = NoiseSchedule(cfg)
    sampler = sched.sampler(10, "ddim")
    target = torch.linspace(-0.8, 0.8, 16 * 4).reshape(1, 16, 4)
    ac = sched.alphas_cumprod

    def oracle(x, t):  # epsilon that exactly explains x given x0 = target
        return (x - ac[t].sqrt() * target) / (1 - ac[t]).sqrt()

    noise = _x_init()[:1]
    for start in (0, 3, 7):
        x = sampler.add_noise_at(start, target, noise)
        assert torch.allclose(x, sched.add_noise(target, noise, sampler.timesteps[start:start + 1]))
        out = sampler.run(oracle, x, start_index=start)
        assert (out - target).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind,prediction", [("ddim", "epsilon"), ("ddim", "sample"),
                                             ("ddpm", "epsilon"), ("ddpm", "sample")])
def test_unrolled_steps_equal_run(kind, prediction):
    sampler = NoiseSchedule(_cfg(prediction_type=prediction)).sampler(16, kind)
    model, x = FixedModel(), _x_init()
    vn = torch.randn((len(sampler), *SHAPE), generator=torch.Generator().manual_seed(4))
    expected = sampler.run(model, x, variance_noise=vn)
    y = x
    for k in range(len(sampler)):
        y = sampler.step(k, y, model(y, sampler.timesteps[k]), noise=vn[k])
    assert torch.equal(y, expected)


def test_to_moves_coefficients_and_keeps_results():
    sampler = NoiseSchedule(_cfg()).sampler(10, "ddim")
    s64 = sampler.to("cpu", torch.float64)
    assert s64.sqrt_abar.dtype == torch.float64 and s64.timesteps.dtype == torch.int64
    assert sampler.sqrt_abar.dtype == torch.float32  # the original is untouched
    model, x = FixedModel(), _x_init()
    out64 = s64.run(model, x.double())
    assert out64.dtype == torch.float64
    assert (out64.float() - sampler.run(model, x)).abs().max().item() < 1e-4


def test_bad_arguments_are_rejected():
    sched = NoiseSchedule(_cfg())
    sampler = sched.sampler(10)
    with pytest.raises(ValueError, match="start_index"):
        sampler.run(FixedModel(), _x_init(), start_index=10)
    with pytest.raises(ValueError, match="variance_noise"):
        sampler.run(FixedModel(), _x_init(), variance_noise=torch.zeros(3, *SHAPE))
    with pytest.raises(ValueError, match="kind"):
        sched.sampler(10, "euler")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.sampler(101)
