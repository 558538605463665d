"""`dp-ros bench policy` measures what its rows say: a warm-start row times warm plans (the
robot follows each plan, so ``warm_start.departure`` does not turn them cold), and a row
whose plans fell back to cold ones says so."""

from __future__ import annotations

import torch

from dp_ros.bench import policy as bench
from dp_ros.policy.config import ScheduleConfig
from dp_ros.policy.inference import Policy
from dp_ros.policy.model import build_model
from helpers_policy import small_config


def _policies(cfg, **warm_steps):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return {label: Policy(cfg, model, torch.device("cpu"), seed=0, warm_start_steps=w)
            for label, w in warm_steps.items()}


def test_warm_start_rows_time_warm_plans_and_cold_rows_cold_ones():
    cfg = small_config(schedule=ScheduleConfig(num_inference_steps=5))
    policies = _policies(cfg, cold=0, warm=2)
    cold_starts: dict = {}
    latency = bench.time_plans(policies, cfg, iterations=4, cold_starts=cold_starts)
    assert {k: len(v) for k, v in latency.items()} == {"cold": 4, "warm": 4}
    assert cold_starts == {}  # no warm-start plan fell back to a cold one
    # 3 warm-up plans + 4 timed; the warm row's first plan has nothing to continue
    assert policies["cold"].engine.denoiser_calls == 7 * 5
    assert policies["warm"].engine.denoiser_calls == 5 + 6 * 2


def test_cold_fallbacks_of_a_warm_row_are_reported(monkeypatch):
    cfg = small_config(schedule=ScheduleConfig(num_inference_steps=5))
    policies = _policies(cfg, warm=2)
    # a robot that ends far from every plan: each plan departs from the previous one
    monkeypatch.setattr(bench, "followed", lambda obs, *_: {**obs, "state": obs["state"] + 100.0})
    cold_starts: dict = {}
    bench.time_plans(policies, cfg, iterations=2, cold_starts=cold_starts)
    assert len(cold_starts["warm"]) == 2
    assert all("away from the previous plan" in reason for reason in cold_starts["warm"])


def test_variants_take_turns_in_blocks_and_a_block_first_plan_is_not_timed(monkeypatch):
    """A plan right after another runtime's plan is slower than any a deployment sees: the
    variants run blocks of plans, and each block's first plan warms up, untimed."""
    cfg = small_config(schedule=ScheduleConfig(num_inference_steps=2))
    policies = _policies(cfg, a=0, b=0)
    order = []
    for label, p in policies.items():
        monkeypatch.setattr(p, "predict", lambda *a, _label=label, _f=p.predict, **k: (
            order.append(_label), _f(*a, **k))[1])
    latency = bench.time_plans(policies, cfg, iterations=7, block=5)
    assert {k: len(v) for k, v in latency.items()} == {"a": 7, "b": 7}
    w = bench.WARM_UP
    assert order == ["a"] * (w + 5) + ["b"] * (w + 5) + ["a"] * 3 + ["b"] * 3


def test_the_bound_takes_the_faster_of_two_machine_readings(monkeypatch, capsys):
    """The bench reads the machine before and after the timing: a slow first reading (a
    neighbour on the VM) must not loosen the bound."""
    from dp_ros.bench.machine import MachineRates

    cfg = small_config(schedule=ScheduleConfig(num_inference_steps=3))
    readings = iter([MachineRates(1e9, 1e9), MachineRates(2e11, 2e10)])
    monkeypatch.setattr(bench, "measure_machine", lambda device="cpu": next(readings))
    monkeypatch.setattr(bench, "paper_cnn_config", lambda: cfg)
    assert bench.run(iterations=2, which=("cnn",), backends=("torch",)) == 0
    out = capsys.readouterr().out
    torch.manual_seed(0)
    expected = bench.plan_cost(Policy(cfg, build_model(cfg), torch.device("cpu"))).bound_ms(
        MachineRates(2e11, 2e10))
    assert f"machine bound {expected:.1f} ms" in out
    row = next(line for line in out.splitlines() if line.split()[:2] == ["torch", "fp32"])
    median, p90, of_bound, of_fp32, encoder, step = map(float, row.split()[2:])
    assert abs(of_bound - expected / median) < 0.01 and of_bound == of_fp32
