"""Safety properties of the real PandaPickCube env under random and adversarial action sequences.

After every step: the tool is inside the workspace box (within 5 mm), every arm joint is inside
its model range and the state is finite. Bad actions (NaN/inf, wrong shape) raise ValueError
naming the env and the problem, and leave the env exactly as it was.

The sequences that broke an earlier controller (spring and damper clipped together, which let
full actions drive the tool at 0.3-0.4 m/s) are kept as regression cases.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robolearn.robot import RobotEnv
from robolearn.sim.panda_env import make_panda_env
from robolearn.sim.tasks.pick_cube import PickCube

BOX_TOLERANCE = 0.005  # m
# Derandomized so CI sees the same sequences on every run.
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def env():
    task = PickCube()
    env = make_panda_env(task, task.default_env_config())  # the shipped task: its faster arm included
    yield env
    env.close()


def assert_safe(env: RobotEnv, where: str, box_tolerance: float = BOX_TOLERANCE) -> None:
    low, high = np.asarray(env.cfg.safety.workspace_low), np.asarray(env.cfg.safety.workspace_high)
    tool, q = env.arm.tool_pos(), env.arm.kin.q(env.arm.data)
    assert np.all(np.isfinite(env.arm.data.qpos)), f"{where}: non-finite qpos {env.arm.data.qpos}"
    out = np.maximum(low - tool, 0.0) + np.maximum(tool - high, 0.0)
    assert out.max() <= box_tolerance, f"{where}: tool {tool} is {out.max() * 1e3:.1f} mm outside the box"
    assert np.all(q >= env.arm.kin.q_low) and np.all(q <= env.arm.kin.q_high), (
        f"{where}: joints {q} outside [{env.arm.kin.q_low}, {env.arm.kin.q_high}]")


def run(env: RobotEnv, seed: int, actions) -> None:
    env.reset(seed=seed)  # the reset may leave the tool a few mm above the box; the first step pulls it in
    for k, action in enumerate(actions):
        env.step(np.asarray(action, dtype=np.float32))
        assert_safe(env, f"step {k} action {np.round(action, 3)}")


# Action sequences, each a list of 4-vectors (dx, dy, dz, gripper); values beyond [-1, 1] are clipped by the env.
signs = st.sampled_from([-1.0, 1.0])
corner = st.tuples(signs, signs, signs, signs)
unit = st.floats(-1.0, 1.0, allow_nan=False)
overdriven = st.floats(-10.0, 10.0, allow_nan=False)
ternary = st.sampled_from([-1.0, 0.0, 1.0])
held_corner = st.tuples(corner, st.integers(5, 30)).map(lambda c: [c[0]] * c[1])
alternating = st.tuples(st.tuples(ternary, ternary, ternary, ternary), st.integers(4, 20)).map(
    lambda c: [tuple(s * (-1) ** k for s in c[0]) for k in range(c[1])])


@st.composite
def wall_push(draw):
    """Press into one wall (or the table) at full action while sliding along the others at random."""
    axis, sign = draw(st.integers(0, 2)), draw(signs)
    out = []
    for _ in range(draw(st.integers(5, 25))):
        a = list(draw(st.tuples(unit, unit, unit, unit)))
        a[axis] = sign
        out.append(tuple(a))
    return out


random_episodes = st.one_of(st.lists(st.tuples(unit, unit, unit, unit), min_size=1, max_size=50),
                            st.lists(st.tuples(ternary, ternary, ternary, ternary), min_size=1, max_size=50),
                            st.lists(st.tuples(overdriven, overdriven, overdriven, unit), min_size=1, max_size=50))
segment = st.one_of(held_corner, alternating, wall_push(), st.lists(st.tuples(overdriven, overdriven, overdriven, unit),
                                                                    min_size=1, max_size=25))
adversarial_episodes = st.lists(segment, min_size=1, max_size=3).map(lambda segs: [a for s in segs for a in s])


@PROPERTY
@given(seed=st.integers(0, 2**16), actions=random_episodes)
def test_random_sequences_stay_safe(env, seed, actions):
    """Uniform, bang-bang ({-1, 0, 1}) and overdriven random actions."""
    run(env, seed, actions)


@pytest.mark.parametrize("corner", list(itertools.product([-1.0, 1.0], repeat=3)))
def test_every_corner_held_stays_safe(env, corner):
    """Full action toward each corner of the box (onto the table for z = -1) for 4 s, gripper closed."""
    run(env, 0, [(*corner, 1.0)] * 40)


@pytest.mark.parametrize("first,second", [((-1, -1, -1), (-1, 1, -1)), ((0, 0, -1), (-1, 1, -1)),
                                          ((1, 1, -1), (-1, 1, -1)), ((-1, 1, 1), (-1, 1, -1))])
def test_sweeping_along_walls_stays_safe(env, first, second):
    """Reach one corner, then sweep along the near-base wall and the table."""
    run(env, 1, [(*first, 1.0)] * 20 + [(*second, 1.0)] * 20)


CORNERS = list(itertools.product([-1.0, 1.0], repeat=3))


@pytest.mark.parametrize("start", range(8))
def test_corner_tour_stays_safe(env, start):
    """Each corner of the box in turn, 1 s each (bench/safety_overshoot.py's corner episodes).

    Against a 6 cm spring clip with a 10 ms joint-limit constraint, the move from the low
    near-base corner to the high one folded the elbow onto its limit: 21 mrad past joint 4's
    limit and the tool 6.2 mm out of the box.
    """
    run(env, start, [(*CORNERS[(start + t // 10) % 8], 1.0) for t in range(60)])


@settings(PROPERTY)
@given(seed=st.integers(0, 2**16), actions=adversarial_episodes)
def test_adversarial_sequences_stay_safe(env, seed, actions):
    """Held corners, alternating extremes, wall and table pushes: inside the box and joint limits."""
    run(env, seed, actions)


@pytest.mark.parametrize("first,second,steps", [
    ((1, 1, 1, -1), (1, -1, -1, -1), 11),  # 7.2 mm past x = 0.6 after reversing at the far top corner
    ((-1, -1, -1, -1), (-1, 1, -1, -1), 17),  # 6.5 mm past x = 0.2 sweeping the table next to the base
], ids=["far-wall-reversal", "near-base-sweep"])
def test_former_violations_stay_safe(env, first, second, steps):
    """Sequences hypothesis found against the earlier force-clipped law (7.2 and 6.5 mm out)."""
    run(env, 0, [first] * steps + [second] * 5)


# Found by test_adversarial_sequences_stay_safe in a full `make test` run on 2026-12-06: sweeping the table along the
# near-base wall with the fingers pressing down, then reversing at full action, whipped joint 6 to 8 rad/s (the
# Panda's limit is 2.61) and the tool went 19.6 mm past x = 0.2. The simulator now brakes joints past their velocity
# limits, as the real arm never exceeds them (sim/mujoco_arm.py, VELOCITY_LIMIT_DAMPING; docs/controllers.md).
NEAR_BASE_TABLE_SWEEP = ([(-1.0, 1.0, -1.0, -1.0)] * 23 + [(-1.0, -1.0, -1.0, -1.0), (1.0, 1.0, 1.0, 1.0)] * 2
                         + [(-1.0, -1.0, -1.0, 1.0)] * 5)


def test_near_base_table_sweep_with_reversals_stays_safe(env):
    run(env, 0, NEAR_BASE_TABLE_SWEEP)


def test_a_joint_past_its_velocity_limit_is_braked(env, monkeypatch):
    """Joint 6 flung at 8 rad/s (what the sweep above did) is braked; without the brake it keeps most of its speed."""
    import robolearn.sim.mujoco_arm as mujoco_arm

    def fling(damping: float) -> float:
        monkeypatch.setattr(mujoco_arm, "VELOCITY_LIMIT_DAMPING", damping)
        env.reset(seed=0)
        env.arm.hold()
        env.arm.data.qvel[env.arm.kin.dof_adr[5]] = 8.0
        env.arm.simulate(25)  # 50 ms
        return float(env.arm.data.qvel[env.arm.kin.dof_adr[5]])

    braked, free = fling(mujoco_arm.VELOCITY_LIMIT_DAMPING), fling(0.0)
    assert braked < 3.0 and free > 6.0, (braked, free)  # braked to 2.4, free 8.3


# -- bad actions -----------------------------------------------------------------------------------

def snapshot(env: RobotEnv) -> dict:
    d = env.arm.data
    return {"qpos": d.qpos.copy(), "qvel": d.qvel.copy(), "ctrl": d.ctrl.copy(), "mocap": d.mocap_pos.copy(),
            "applied": d.qfrc_applied.copy(), "time": d.time, "steps": env.elapsed_steps}


def assert_unchanged(env: RobotEnv, before: dict) -> None:
    after = snapshot(env)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=f"{key} changed by a rejected action")


@settings(max_examples=30, deadline=None, derandomize=True)
@given(index=st.integers(0, 3), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       rest=st.tuples(unit, unit, unit, unit))
def test_non_finite_action_is_rejected_and_nothing_applied(env, index, bad, rest):
    env.reset(seed=index)
    env.step(np.zeros(4, dtype=np.float32))
    before = snapshot(env)
    action = np.array(rest, dtype=np.float32)
    action[index] = bad
    with pytest.raises(ValueError, match=rf"{env.env_id} action contains NaN/inf at index \[{index}\]"):
        env.step(action)
    assert_unchanged(env, before)
    env.step(np.array(rest, dtype=np.float32))  # the env still steps
    assert env.elapsed_steps == before["steps"] + 1
    assert np.all(np.isfinite(env.arm.data.qpos))


def escaped(shape: tuple) -> str:
    return str(shape).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("action", [np.zeros(3), np.zeros(5), np.zeros((1, 4)), np.float32(0.0), [], np.zeros((4, 1))],
                         ids=["3", "5", "1x4", "scalar", "empty", "4x1"])
def test_wrongly_shaped_action_is_rejected_and_nothing_applied(env, action):
    env.reset(seed=0)
    before = snapshot(env)
    shape = np.asarray(action).shape
    with pytest.raises(ValueError, match=rf"{env.env_id} action must have shape \(4,\), got {escaped(shape)}"):
        env.step(action)
    assert_unchanged(env, before)
    env.step(np.zeros(4))
    assert env.elapsed_steps == 1


def test_non_numeric_action_is_rejected(env):
    env.reset(seed=0)
    before = snapshot(env)
    with pytest.raises(ValueError, match=rf"{env.env_id} action must be numeric"):
        env.step(np.array(["up", "up", "up", "open"]))
    assert_unchanged(env, before)
