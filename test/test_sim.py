"""The simulated arm, task, camera and scripted expert, without ROS."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dp_ros.sim.arm import (ArmGeometry, CommandRejected, SimulatedArm, parse_position_command,
                            parse_trajectory, two_link_ik)
from dp_ros.sim.expert import ExpertConfig, ScriptedExpert, rollout
from dp_ros.sim.render import Palette, View, render_scene, view_for
from dp_ros.sim.task import (Episode, EpisodeMonitor, clearance, evaluate, lateral_offset,
                             sample_episode, segment_distances, task_for)

GEOM = ArmGeometry()
NAMES = GEOM.joint_names


def traj(times, positions, start=None, velocities=None, names=NAMES):
    vel = velocities if velocities is not None else [[] for _ in times]
    return parse_trajectory(NAMES, names, start, times, positions, vel)


def run(arm: SimulatedArm, t0: float, t1: float, dt: float = 0.01) -> list[np.ndarray]:
    out = []
    for t in np.arange(t0, t1 + 1e-9, dt):
        out.append(arm.step(float(t)).positions)
    return out


# ---------------------------------------------------------------------------- kinematics

def test_forward_kinematics():
    pts = GEOM.link_points([0.0, 0.0])  # straight down (towards the start region)
    np.testing.assert_allclose(pts, [[0, 0], [0, -0.5], [0, -1.0]], atol=1e-12)
    np.testing.assert_allclose(GEOM.end_effector([math.pi / 2, 0.0]), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(GEOM.end_effector([0.0, math.pi / 2]), [0.5, -0.5], atol=1e-12)
    g3 = ArmGeometry(link_lengths=(0.5, 0.3, 0.2), base_yaw=0.0)
    np.testing.assert_allclose(g3.end_effector([0, math.pi / 2, math.pi / 2]), [0.3, 0.3],
                               atol=1e-12)
    batch = GEOM.link_points(np.zeros((4, 7, 2)))
    assert batch.shape == (4, 7, 3, 2)


@pytest.mark.parametrize("elbow", [1, -1])
def test_inverse_kinematics_round_trip(elbow):
    rng = np.random.default_rng(0)
    for _ in range(50):
        target = rng.uniform(-0.9, 0.9, size=2)
        if not 0.05 < np.linalg.norm(target) < 0.99:
            continue
        q = np.array(two_link_ik(target, 0.5, 0.5, elbow, GEOM.base_yaw))
        assert np.sign(q[1]) == elbow
        np.testing.assert_allclose(GEOM.end_effector(q), target, atol=1e-9)


def test_geometry_validation():
    with pytest.raises(ValueError):
        ArmGeometry(link_lengths=(0.5,))
    with pytest.raises(ValueError):
        ArmGeometry(link_lengths=(0.5, -0.1))
    with pytest.raises(ValueError):
        ArmGeometry(lower=(0.0, 0.0), upper=(0.0, 1.0))
    assert ArmGeometry(link_lengths=(0.5, 0.3, 0.2)).joint_names == ["joint_1", "joint_2",
                                                                      "joint_3"]


# ---------------------------------------------------------------------------- limits

def test_velocity_and_position_limits():
    geom = ArmGeometry(max_velocity=1.0, lower=(-1.0, -1.0), upper=(1.0, 1.0))
    arm = SimulatedArm(geom)
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_positions([5.0, -0.5], now=0.0)   # joint 1 beyond its limit
    qs = run(arm, 0.0, 3.0)
    steps = np.abs(np.diff(qs, axis=0))
    assert steps.max() <= 1.0 * 0.01 + 1e-12      # never faster than the limit
    np.testing.assert_allclose(qs[50], [0.5, -0.5], atol=1e-9)  # at full speed
    np.testing.assert_allclose(qs[-1], [1.0, -0.5], atol=1e-9)  # clamped at the limit
    np.testing.assert_allclose(arm.velocities, [0.0, 0.0], atol=1e-9)


def test_reset_clamps_and_holds():
    arm = SimulatedArm(GEOM)
    arm.reset([10.0, 0.2], now=1.0)
    assert arm.positions[0] == GEOM.upper[0]
    before = arm.positions.copy()
    run(arm, 1.0, 2.0)
    np.testing.assert_array_equal(arm.positions, before)


def test_clock_jump_back_restarts_without_moving():
    arm = SimulatedArm(GEOM)
    arm.reset([0.0, 0.0], now=10.0)
    arm.command_positions([1.0, 0.0], now=10.0)
    arm.step(10.1)
    q = arm.positions.copy()
    arm.step(0.0)  # clock restarted
    np.testing.assert_array_equal(arm.positions, q)
    arm.step(0.1)
    assert arm.positions[0] > q[0]


# ---------------------------------------------------------------------------- trajectories

def test_trajectory_stamp_zero_starts_now_and_interpolates_linearly():
    arm = SimulatedArm(GEOM)
    arm.reset([0.0, 0.0], now=5.0)
    arm.command_trajectory(traj([1.0, 2.0], [[0.5, 0.2], [0.5, 0.6]]), now=5.0)
    arm.step(5.5)
    np.testing.assert_allclose(arm.positions, [0.25, 0.1], atol=1e-9)  # halfway to point 0
    arm.step(6.0)
    np.testing.assert_allclose(arm.positions, [0.5, 0.2], atol=1e-9)
    arm.step(6.5)
    np.testing.assert_allclose(arm.positions, [0.5, 0.4], atol=1e-9)
    run(arm, 6.5, 9.0)   # holds after the last point
    np.testing.assert_allclose(arm.positions, [0.5, 0.6], atol=1e-9)
    np.testing.assert_allclose(arm.velocities, [0.0, 0.0], atol=1e-9)


def test_new_trajectory_replaces_old_from_current_state():
    arm = SimulatedArm(GEOM)
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_trajectory(traj([1.0], [[1.0, 0.0]]), now=0.0)
    arm.step(0.5)
    np.testing.assert_allclose(arm.positions, [0.5, 0.0], atol=1e-9)
    arm.command_trajectory(traj([1.0], [[0.0, 1.0]]), now=0.5)  # replaces: from [0.5, 0]
    arm.step(1.0)
    np.testing.assert_allclose(arm.positions, [0.25, 0.5], atol=1e-9)
    run(arm, 1.0, 3.0)
    np.testing.assert_allclose(arm.positions, [0.0, 1.0], atol=1e-9)  # old target gone


def test_future_start_holds_then_runs_and_past_points_are_dropped():
    arm = SimulatedArm(GEOM)
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_trajectory(traj([1.0], [[0.4, 0.0]], start=2.0), now=0.0)
    run(arm, 0.0, 2.0)
    np.testing.assert_allclose(arm.positions, [0.0, 0.0], atol=1e-12)
    arm.step(2.5)
    np.testing.assert_allclose(arm.positions, [0.2, 0.0], atol=1e-9)
    # stamped in the past: the first point has passed; go from here to the second
    arm.command_trajectory(traj([0.5, 3.0], [[9.0, 9.0], [0.2, 0.5]], start=1.5), now=2.5)
    arm.step(3.5)
    np.testing.assert_allclose(arm.positions, [0.2, 0.25], atol=1e-9)
    with pytest.raises(CommandRejected, match="past"):
        arm.command_trajectory(traj([0.5], [[1.0, 1.0]], start=1.0), now=3.5)
    run(arm, 3.5, 5.0)
    np.testing.assert_allclose(arm.positions, [0.2, 0.5], atol=1e-9)  # rejection: unchanged


def test_cubic_interpolation_passes_points_smoothly():
    arm = SimulatedArm(GEOM, interpolation="cubic")
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_trajectory(traj([1.0, 2.0, 3.0], [[0.3, 0.0], [0.6, 0.3], [0.6, 0.6]]), now=0.0)
    qs = {round(t, 2): q for t, q in zip(np.arange(0, 4.001, 0.01), run(arm, 0.0, 4.0))}
    np.testing.assert_allclose(qs[1.0], [0.3, 0.0], atol=1e-6)
    np.testing.assert_allclose(qs[2.0], [0.6, 0.3], atol=1e-6)
    np.testing.assert_allclose(qs[4.0], [0.6, 0.6], atol=1e-6)
    # differs from linear between points, with continuous velocity through point 1
    assert abs(qs[1.5][1] - 0.15) > 1e-3
    v_before = (qs[1.0] - qs[0.99]) / 0.01
    v_after = (qs[1.01] - qs[1.0]) / 0.01
    np.testing.assert_allclose(v_before, v_after, atol=0.02)


def test_cubic_uses_given_velocities():
    arm = SimulatedArm(GEOM, interpolation="cubic")
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_trajectory(traj([1.0], [[0.5, 0.5]], velocities=[[0.5, 0.0]]), now=0.0)
    arm.step(0.99)
    arm.step(1.0)
    assert arm.velocities[0] == pytest.approx(0.5, abs=0.02)
    assert arm.velocities[1] == pytest.approx(0.0, abs=0.02)


def test_point_at_time_zero_is_a_step_target():
    arm = SimulatedArm(GEOM)
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_trajectory(traj([0.0, 1.0], [[0.5, 0.0], [0.5, 0.5]]), now=0.0)
    arm.step(0.1)
    np.testing.assert_allclose(arm.positions, [0.2, 0.05], atol=1e-9)  # velocity-limited
    run(arm, 0.1, 2.0)
    np.testing.assert_allclose(arm.positions, [0.5, 0.5], atol=1e-9)


def test_measured_state_anchor_when_not_interpolating_from_desired():
    arm = SimulatedArm(GEOM, interpolate_from_desired_state=False)
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_positions([2.0, 0.0], now=0.0)   # desired jumps; the joint lags behind
    arm.step(0.25)
    np.testing.assert_allclose(arm.positions, [0.5, 0.0], atol=1e-9)
    arm.command_trajectory(traj([1.0], [[0.5, 1.0]]), now=0.25)
    arm.step(0.75)
    np.testing.assert_allclose(arm.positions, [0.5, 0.5], atol=1e-9)  # from the measured


def test_empty_trajectory_stops_and_holds():
    arm = SimulatedArm(GEOM)
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_trajectory(traj([2.0], [[1.0, 1.0]]), now=0.0)
    arm.step(1.0)
    q = arm.positions.copy()
    arm.command_trajectory(traj([], []), now=1.0)
    run(arm, 1.0, 2.0)
    np.testing.assert_allclose(arm.positions, q, atol=1e-12)


def test_position_commands_are_held_until_the_next():
    arm = SimulatedArm(GEOM)
    arm.reset([0.0, 0.0], now=0.0)
    arm.command_trajectory(traj([1.0], [[1.0, 1.0]]), now=0.0)
    arm.command_positions([0.1, -0.1], now=0.2)  # replaces the trajectory
    run(arm, 0.2, 2.0)
    np.testing.assert_allclose(arm.positions, [0.1, -0.1], atol=1e-12)


def test_trajectory_is_reordered_by_joint_name():
    t = traj([1.0], [[0.2, 0.7]], names=["joint_2", "joint_1"])
    np.testing.assert_allclose(t.positions, [[0.7, 0.2]])


@pytest.mark.parametrize("names,times,positions,velocities,cause", [
    (["joint_1", "wrist"], [1.0], [[0, 0]], [[]], "unknown joint"),
    (["joint_1"], [1.0], [[0]], [[]], "missing joints"),
    (["joint_1", "joint_1"], [1.0], [[0, 0]], [[]], "duplicate"),
    (NAMES, [1.0, 1.0], [[0, 0], [1, 1]], [[], []], "strictly increasing"),
    (NAMES, [2.0, 1.0], [[0, 0], [1, 1]], [[], []], "strictly increasing"),
    (NAMES, [-1.0], [[0, 0]], [[]], "strictly increasing"),
    (NAMES, [1.0], [[0, float("nan")]], [[]], "non-finite"),
    (NAMES, [1.0], [[0, float("inf")]], [[]], "non-finite"),
    (NAMES, [1.0], [[0, 0, 0]], [[]], "positions"),
    (NAMES, [1.0, 2.0], [[0, 0], [1, 1]], [[0, 0], []], "velocities"),
    (NAMES, [1.0], [[0, 0]], [[0, float("nan")]], "non-finite"),
])
def test_bad_trajectories_are_rejected(names, times, positions, velocities, cause):
    with pytest.raises(CommandRejected) as err:
        parse_trajectory(NAMES, names, None, times, positions, velocities)
    assert any(cause in c for c in err.value.causes), err.value.causes


def test_rejection_lists_every_cause():
    with pytest.raises(CommandRejected) as err:
        parse_trajectory(NAMES, ["joint_1", "x"], None, [2.0, 1.0],
                         [[0, 0], [0, 0]], [[], []])
    assert len(err.value.causes) == 2


def test_position_command_validation():
    np.testing.assert_array_equal(parse_position_command([0.1, 0.2], 2), [0.1, 0.2])
    with pytest.raises(CommandRejected, match="3 values for 2"):
        parse_position_command([0.1, 0.2, 0.3], 2)
    with pytest.raises(CommandRejected, match="non-finite"):
        parse_position_command([0.1, float("nan")], 2)


# ---------------------------------------------------------------------------- task

def _episode(obstacle=(0.0, 0.42), goal=(0.0, 0.8)) -> Episode:
    return Episode(seed=0, start_positions=(0.0, 0.0), goal=goal, goal_radius=0.08,
                   obstacle=obstacle, obstacle_radius=0.09, time_limit=10.0)


def test_segment_distance():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(segment_distances(pts, (0.5, 0.3)), [0.3, 0.5])
    np.testing.assert_allclose(segment_distances(pts, (-1.0, 0.0)), [1.0, 2.0])


def test_collision_detects_links_not_just_the_tip():
    ep = _episode(obstacle=(0.0, 0.42))
    # straight up: the first link (base to elbow) and the second run through the obstacle,
    # while the tip at (0, 1) is well clear of it
    q_up = np.array([math.pi, 0.0])
    assert np.linalg.norm(GEOM.end_effector(q_up) - ep.obstacle) > 0.5
    assert clearance(GEOM, q_up, ep) < 0
    # elbow beyond the obstacle, tip folded back beside it: only link 2 crosses it
    ep2 = _episode(obstacle=(0.25, 0.45))
    q = np.array([math.pi, -math.pi / 2])         # elbow (0, 0.5), tip (0.5, 0.5)
    np.testing.assert_allclose(GEOM.end_effector(q), [0.5, 0.5], atol=1e-12)
    assert np.linalg.norm(GEOM.end_effector(q) - ep2.obstacle) > 0.2
    assert clearance(GEOM, q, ep2) < 0
    # the tip alone inside
    ep3 = _episode(obstacle=(0.0, -1.0))
    assert clearance(GEOM, np.zeros(2), ep3) < 0
    # well clear
    assert clearance(GEOM, np.zeros(2), ep) > 0.3
    # link width counts: a link passing just outside the radius still touches
    ep4 = _episode(obstacle=(0.09 + GEOM.link_width / 4, -0.5))
    assert clearance(GEOM, np.zeros(2), ep4) < 0


def test_sampling_ranges_and_reproducibility():
    spec = task_for(GEOM)
    for seed in range(200):
        ep = sample_episode(seed, GEOM)
        assert ep == sample_episode(seed, GEOM)
        q = np.asarray(ep.start_positions)
        assert spec.start_yaw_range[0] <= q[0] <= spec.start_yaw_range[1]
        assert spec.start_bend_range[0] <= q[1] <= spec.start_bend_range[1]
        assert spec.in_start_region(GEOM.end_effector(q))
        assert spec.goal_x_range[0] <= ep.goal[0] <= spec.goal_x_range[1]
        assert spec.goal_y_range[0] <= ep.goal[1] <= spec.goal_y_range[1]
        assert spec.obstacle_x_range[0] <= ep.obstacle[0] <= spec.obstacle_x_range[1]
        assert spec.obstacle_y_range[0] <= ep.obstacle[1] <= spec.obstacle_y_range[1]
        assert clearance(GEOM, q, ep) > 0.2      # the start is collision-free
    assert sample_episode(1, GEOM) != sample_episode(2, GEOM)
    assert Episode.from_dict(sample_episode(3, GEOM).to_dict()) == sample_episode(3, GEOM)


def test_straight_line_is_blocked_and_both_sides_reach_the_goal():
    for seed in range(200):
        ep = sample_episode(seed, GEOM)
        start = GEOM.end_effector(np.asarray(ep.start_positions))
        line = np.array([start, ep.goal])
        assert segment_distances(line, ep.obstacle)[0] < ep.obstacle_radius
        for elbow in (1, -1):  # right, left: each branch reaches the goal clear of it
            q = np.array(two_link_ik(np.array(ep.goal), 0.5, 0.5, elbow, GEOM.base_yaw))
            assert clearance(GEOM, q, ep) > 0.03


def test_scaled_scene_for_a_longer_arm():
    geom = ArmGeometry(link_lengths=(1.0, 1.0))
    ep = sample_episode(0, geom)
    assert 1.5 < ep.goal[1] < 1.7 and ep.obstacle_radius == pytest.approx(0.18)
    assert task_for(geom).in_start_region(geom.end_effector(np.asarray(ep.start_positions)))


def test_evaluate_success_side_timeout_and_collision():
    ep = _episode()
    expert = ScriptedExpert(GEOM, seed=0)
    for side in ("left", "right"):
        plan = expert.plan(ep, side=side)
        result, times, qs = rollout(ep, plan, GEOM)
        assert result.success and not result.collision and result.side == side
        assert result.done and result.time_to_goal <= plan.duration
        # the incremental monitor agrees with evaluate()
        monitor = EpisodeMonitor(ep, GEOM)
        for t, q in zip(times, qs):
            monitor.update(float(t), q)
        assert monitor.result == result
        # too slow: the same path judged against a short time limit
        late = evaluate(Episode(**{**ep.to_dict(), "time_limit": 1.0}), times, qs, GEOM)
        assert late.timed_out and not late.success and late.done
    # straight through: the arm swings up through the obstacle
    times = np.arange(0, 3.0, 0.01)
    qs = np.stack([np.linspace(0, math.pi, len(times)), np.zeros(len(times))], axis=1)
    result = evaluate(ep, times, qs, GEOM)
    assert result.collision and not result.success and result.min_clearance < 0


# ---------------------------------------------------------------------------- expert

def test_expert_succeeds_on_both_sides_about_half_each():
    sides, ok = [], {"left": 0, "right": 0}
    for seed in range(100):
        ep = sample_episode(seed, GEOM)
        plan = ScriptedExpert(GEOM, seed=seed).plan(ep)
        assert plan.dt == 0.1 and plan.positions.shape[1] == 2
        np.testing.assert_allclose(plan.positions[0], ep.start_positions, atol=1e-9)
        assert np.all(plan.positions >= np.asarray(GEOM.lower))
        assert np.all(plan.positions <= np.asarray(GEOM.upper))
        step = np.abs(np.diff(plan.positions, axis=0)).max()
        assert step <= ExpertConfig().max_joint_speed * plan.dt + 1e-6
        result, _, _ = rollout(ep, plan, GEOM, sim_dt=0.02)
        sides.append(plan.side)
        assert result.side in (plan.side, None)
        ok[plan.side] += result.success and result.side == plan.side
    n_left = sides.count("left")
    assert 35 <= n_left <= 65, n_left
    assert ok["left"] >= 0.95 * n_left and ok["right"] >= 0.95 * (100 - n_left), ok


def test_expert_three_joint_arm():
    geom = ArmGeometry(link_lengths=(0.5, 0.3, 0.2))
    for seed in range(12):
        ep = sample_episode(seed, geom)
        for side in ("left", "right"):
            plan = ScriptedExpert(geom, seed=seed).plan(ep, side=side)
            assert plan.positions.shape[1] == 3
            result, _, _ = rollout(ep, plan, geom, sim_dt=0.02)
            assert result.success and result.side == side, (seed, side, result)


# ---------------------------------------------------------------------------- render

def _pixel(img: np.ndarray, view: View, point) -> np.ndarray:
    u, v = np.round(view.to_pixels(np.asarray(point, dtype=float))).astype(int)
    return img[v, u].astype(int)


@pytest.mark.parametrize("width,height", [(96, 96), (64, 48), (160, 120)])
def test_render_shapes_and_colours(width, height):
    ep = sample_episode(0, GEOM)
    view = view_for(GEOM, width, height)
    img = render_scene(GEOM, ep.start_positions, ep, view)
    assert img.shape == (height, width, 3) and img.dtype == np.uint8
    pal = Palette()
    assert np.abs(_pixel(img, view, ep.obstacle) - pal.obstacle).max() < 30
    assert np.abs(_pixel(img, view, ep.goal) - pal.goal).max() < 30
    mid_link = GEOM.link_points(np.asarray(ep.start_positions))[:2].mean(axis=0)
    assert np.abs(_pixel(img, view, mid_link) - pal.link).max() < 60
    assert np.abs(_pixel(img, view, (0.9, 0.9)) - pal.background).max() == 0
    # the arm's pose changes the image; the scene without the arm differs from with it
    moved = render_scene(GEOM, [1.0, 0.5], ep, view)
    assert np.any(moved != img)
    np.testing.assert_array_equal(img, render_scene(GEOM, ep.start_positions, ep, view))


def test_view_validation():
    with pytest.raises(ValueError):
        View(width=4, height=96)


def test_side_switch_is_judged_from_the_line_through_the_start():
    from dp_ros.sim.closed_loop import COMMIT_OFFSET, switched_sides
    ep = sample_episode(10_035, GEOM)
    start = GEOM.end_effector(np.asarray(ep.start_positions)[None])[0]
    along = (np.asarray(ep.goal) - start) / np.linalg.norm(np.asarray(ep.goal) - start)
    left = np.array([-along[1], along[0]])
    goal = np.asarray(ep.goal)
    # one way round: committed left, stays left
    assert not switched_sides(np.array([start, start + 0.3 * left + 0.2 * along, goal]), ep)
    # committed left, then more than COMMIT_OFFSET to the right: a switch
    assert switched_sides(np.array([start, start + 0.3 * left, start - 0.3 * left, goal]), ep)
    # a hesitation smaller than COMMIT_OFFSET before going right is not a commitment
    small = (COMMIT_OFFSET - 0.05) * left
    assert not switched_sides(np.array([start, start + small, start - 0.4 * left, goal]), ep)
    # this episode starts ~0.12 m left of the base -> goal axis: measured from that axis,
    # the same small move left would already count as committed
    assert lateral_offset(start, ep) > 0.1
    assert not switched_sides(np.zeros((0, 2)), ep)
