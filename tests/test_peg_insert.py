"""PandaPegInsert: expert success, a frictional grasp that holds, seeded resets, state and success."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from robolearn.robot import RobotEnv
from robolearn.sim.panda_env import make_panda_env
from robolearn.sim.tasks.peg_insert import PegInsert, PegInsertConfig

ENV_ID = "robolearn/PandaPegInsert-v0"


def make_env(task: PegInsert | None = None, **overrides) -> RobotEnv:
    task = task or PegInsert()
    cfg = task.default_env_config()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return make_panda_env(task, cfg, env_id=ENV_ID)


@pytest.fixture(scope="module")
def env():
    env = make_env()
    yield env
    env.close()


def peg_in_hand(env) -> np.ndarray:
    """Peg centre in the tool frame: constant while the grasp holds."""
    rot = env.arm.data.site_xmat[env.arm.kin.site_id].reshape(3, 3)
    return rot.T @ (env.arm.data.body("peg").xpos - env.arm.tool_pos())


def run_expert(env, seed: int) -> tuple[bool, int, float]:
    obs, _ = env.reset(seed=seed)
    expert, start = env.task.expert(env), peg_in_hand(env)
    for step in range(1, env.cfg.max_episode_steps + 1):
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            break
    assert terminated == info["success"]  # terminate_on_success
    return info["success"], step, float(np.abs(peg_in_hand(env) - start).max())


def test_expert_succeeds_over_100_seeds(env):
    results = [run_expert(env, seed) for seed in range(100)]
    success = np.mean([r[0] for r in results])
    assert success >= 0.9, f"expert success {success:.2f}"
    # The expert's insertion never makes the peg slip in the fingers.
    assert max(r[2] for r in results) < 1e-3


def test_expert_succeeds_with_plain_env_config():
    env = make_panda_env(PegInsert(), env_id=ENV_ID)  # PandaEnvConfig defaults: 0.1 m/step, 40 N
    assert np.mean([run_expert(env, seed)[0] for seed in range(20)]) >= 0.9


def test_peg_stays_in_gripper_with_zero_actions(env):
    env.reset(seed=0)
    start = peg_in_hand(env)
    for _ in range(100):
        env.step(np.zeros(3, np.float32))
    assert np.abs(peg_in_hand(env) - start).max() < 5e-4
    assert env.arm.gripper_width() == pytest.approx(2 * env.task.cfg.peg_half_width, abs=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_peg_stays_in_gripper_under_random_actions(env, seed):
    env.reset(seed=seed)
    env.action_space.seed(seed)
    start, h = peg_in_hand(env), env.task.cfg.peg_half_width
    for _ in range(100):
        env.step(env.action_space.sample())
    shift = peg_in_hand(env) - start
    # Bumping the block may nudge the peg in the fingers by a few mm; it must not leave them.
    assert np.abs(shift).max() < 0.01, shift
    assert env.arm.gripper_width() == pytest.approx(2 * h, abs=1.5e-3)


def test_grasp_is_friction_not_a_weld(env):
    weld = mujoco.mjtEq.mjEQ_WELD
    assert not any(env.arm.model.eq_type[i] == weld for i in range(env.arm.model.neq))
    assert env.arm.model.body("peg").jntnum == 1 and env.task.uses_gripper is False
    assert env.action_space.shape == (3,)


def test_same_seed_same_hole_and_start():
    a, b = make_env(), make_env()
    info_a, info_b = a.reset(seed=7)[1], b.reset(seed=7)[1]
    assert info_a == info_b
    np.testing.assert_array_equal(a.task.hole_top(a.arm), b.task.hole_top(b.arm))
    np.testing.assert_array_equal(a.reset(seed=7)[0]["state"], b.reset(seed=7)[0]["state"])
    cfg = a.task.cfg
    holes = np.array([a.reset(seed=k)[1]["hole_xy"] for k in range(20)])
    assert len(np.unique(holes, axis=0)) == 20
    assert np.all(holes >= cfg.hole_low) and np.all(holes <= cfg.hole_high)
    np.testing.assert_allclose(a.task.hole_top(a.arm)[:2], holes[-1])


def test_object_state_and_observation_shapes(env):
    obs, _ = env.reset(seed=1)
    state = env.task.object_state(env.arm)
    assert state.shape == (6,)
    np.testing.assert_allclose(state[3:], [*env.task.hole_top(env.arm)[:2], env.task.cfg.hole_top_z])
    assert state[2] > state[5]  # the peg starts above the hole
    assert obs["state"].shape == (13,) and obs["state"].dtype == np.float32  # tool 3, vel 3, width 1, objects 6
    assert env.observation_space.contains(obs)


def test_success_false_at_reset(env):
    for seed in range(5):
        env.reset(seed=seed)
        reward, success = env.task.score(env.arm)
        assert not success and 0.0 <= reward < 0.3
        _, _, terminated, _, info = env.step(np.zeros(3, np.float32))
        assert not info["success"] and not terminated


def test_success_definition():
    """Teleport the peg: success needs its bottom >= success_depth below the top face, inside the hole."""
    task = PegInsert(PegInsertConfig())
    env = make_env(task)
    env.reset(seed=2)
    cfg, hole = task.cfg, task.hole_top(env.arm)
    adr = env.arm.model.jnt_qposadr[env.arm.model.joint("peg").id]

    def place(dx: float, depth: float):
        env.arm.data.qpos[adr:adr + 3] = [hole[0] + dx, hole[1], hole[2] - depth + cfg.peg_length / 2]
        env.arm.data.qpos[adr + 3:adr + 7] = [1, 0, 0, 0]
        mujoco.mj_forward(env.arm.model, env.arm.data)
        return task.score(env.arm)

    assert place(0.0, cfg.success_depth + 0.002) == (pytest.approx(1.0), True)
    assert place(0.0005, cfg.success_depth - 0.002)[1] is False
    assert place(0.05, cfg.success_depth + 0.002)[1] is False  # beside the block, not in the hole
    assert place(0.0, -0.01)[0] < place(0.0, 0.01)[0] < place(0.0, cfg.success_depth)[0]
    assert place(0.05, -0.05)[0] < place(0.05, -0.01)[0]  # outside the hole: lower is nearer
