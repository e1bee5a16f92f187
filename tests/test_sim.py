"""Panda model, workcell envs, experts, resets and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import robolearn.sim as rsim
import mujoco
from robolearn.sim.model import ASSETS, ModelError, load_model

# Franka's published modified-DH table (Craig): (a_{i-1}, d_i, alpha_{i-1}).
PANDA_DH = [(0, 0.333, 0), (0, 0, -np.pi / 2), (0, 0.316, np.pi / 2), (0.0825, 0, np.pi / 2),
            (-0.0825, 0.384, -np.pi / 2), (0, 0, np.pi / 2), (0.088, 0, np.pi / 2)]


def dh_tool(q: np.ndarray) -> np.ndarray:
    """Tool-centre point by the DH chain: flange 0.107 m, then the hand's 0.1034 m to the tcp."""
    def link(a, d, alpha, theta):
        ca, sa, ct, st = np.cos(alpha), np.sin(alpha), np.cos(theta), np.sin(theta)
        return np.array([[ct, -st, 0, a], [st * ca, ct * ca, -sa, -d * sa], [st * sa, ct * sa, ca, d * ca], [0, 0, 0, 1]])
    T = np.eye(4)
    for (a, d, alpha), theta in zip(PANDA_DH, q):
        T = T @ link(a, d, alpha, theta)
    return (T @ link(0, 0.107 + 0.1034, 0, 0))[:3, 3]


def test_forward_kinematics_matches_dh_table():
    m = load_model(ASSETS / "panda.xml")
    d = mujoco.MjData(m)
    rng = np.random.default_rng(7)
    configs = [m.key_qpos[0][:7], np.zeros(7).clip(m.jnt_range[:7, 0], m.jnt_range[:7, 1])]
    configs += [rng.uniform(m.jnt_range[:7, 0], m.jnt_range[:7, 1]) for _ in range(8)]
    for q in configs:
        d.qpos[:7] = q
        mujoco.mj_kinematics(m, d)
        err = np.linalg.norm(d.site("tcp").xpos - dh_tool(q))
        assert err < 1e-3, f"tcp differs from DH by {err * 1000:.3f} mm at q={q}"


def test_joint_limits_are_frankas():
    m = load_model(ASSETS / "panda.xml")
    expected_high = [2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973]
    np.testing.assert_allclose(m.jnt_range[:7, 1], expected_high)
    np.testing.assert_allclose([m.actuator(f"joint{i}").ctrlrange[1] for i in range(1, 8)], [87] * 4 + [12] * 3)


@pytest.fixture(scope="module")
def pick():
    env = rsim.make("robolearn/PandaPickCube-v0")
    yield env
    env.close()


def test_pick_cube_spec_matches_serl(pick):
    env = pick.unwrapped
    assert env.cfg.control_hz == 10 and env.cfg.max_episode_steps == 100 and env.cfg.action_scale == 0.1
    assert pick.action_space.shape == (4,)
    obs, _ = pick.reset(seed=3)
    # tool position (3), tool velocity (3), gripper width (1), cube position (3)
    assert obs["state"].shape == (10,) and obs["state"].dtype == np.float32
    assert pick.observation_space.contains(obs)
    cube = obs["state"][7:]
    low, high = env.task.cfg.region_low, env.task.cfg.region_high
    assert low[0] <= cube[0] <= high[0] and low[1] <= cube[1] <= high[1]


def test_pick_cube_dense_and_sparse_reward(pick):
    env = pick.unwrapped
    pick.reset(seed=0)
    reward, success = env.task.score(env.arm)
    cube, tool = env.task.cube_pos(env.arm), env.arm.tool_pos()
    expected = 0.3 * np.exp(-20 * np.linalg.norm(cube - tool)) + 0.7 * np.clip((cube[2] - 0.02) / 0.2, 0, 1)
    assert reward == pytest.approx(expected, rel=1e-6) and not success
    sparse = rsim.make("robolearn/PandaPickCube-v0", reward_type="sparse")
    sparse.reset(seed=0)
    _, r, *_ = sparse.step(np.zeros(4, np.float32))
    assert r == 0.0


def test_episode_truncates_at_100_steps(pick):
    pick.reset(seed=1)
    for t in range(100):
        _, _, terminated, truncated, info = pick.step(np.array([0, 0, 0.3, -1], np.float32))
        assert not terminated
    assert truncated and not info["success"]


def test_reset_is_deterministic_under_seed(pick):
    a, _ = pick.reset(seed=11)
    qa = pick.unwrapped.arm.data.qpos.copy()
    b, _ = pick.reset(seed=11)
    c, _ = pick.reset(seed=12)
    np.testing.assert_array_equal(a["state"], b["state"])
    assert not np.allclose(a["state"], c["state"])
    pick.reset(seed=11)
    np.testing.assert_array_equal(qa, pick.unwrapped.arm.data.qpos)


def test_reset_starts_inside_the_workspace_box(pick):
    env = pick.unwrapped
    low, high = np.asarray(env.cfg.safety.workspace_low), np.asarray(env.cfg.safety.workspace_high)
    for seed in range(100):
        pick.reset(seed=seed)
        tool = env.arm.tool_pos()
        assert np.all(tool >= low) and np.all(tool <= high), (seed, tool)


@pytest.mark.parametrize("env_id, episodes, required", [("robolearn/PandaReach-v0", 100, 1.0),
                                                         ("robolearn/PandaPickCube-v0", 100, 0.95)])
def test_scripted_expert_success(env_id, episodes, required):
    from robolearn.rollout import run_episodes, scripted_policy
    env = rsim.make(env_id)
    result = run_episodes(env, scripted_policy(env), episodes, seed=0)
    assert result.success_rate >= required, f"{env_id}: {result.success_rate:.2%} < {required:.0%}"


def test_pixel_variant_images_and_proprio():
    env = rsim.make("robolearn/PandaPickCubePixels-v0", image_size=64)
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"state", "tcp_pose", "images/front", "images/wrist"}
    for cam in ("front", "wrist"):
        img = obs[f"images/{cam}"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 5  # a real picture
    assert obs["state"].shape == (7,)  # proprioception only: no privileged cube position
    assert env.observation_space.contains(obs)
    env.close()


def test_unknown_env_id_lists_valid_ids():
    with pytest.raises(rsim.UnknownEnvError) as err:
        rsim.make("robolearn/PandaPickCub-v0")
    assert "robolearn/PandaPickCube-v0" in str(err.value) and "PandaReach" in str(err.value)


@pytest.mark.parametrize("action, words", [(np.zeros(3), ["shape (4,)", "(3,)"]),
                                           (np.array([0, 0, np.nan, 0]), ["NaN", "index [2]"]),
                                           (np.array([0, np.inf, 0, 0]), ["NaN/inf", "index [1]"]),
                                           (np.array(["a", "b", "c", "d"]), ["numeric", "<U1"])])
def test_bad_actions_are_rejected_with_a_clear_error(pick, action, words):
    pick.reset(seed=0)
    before = pick.unwrapped.arm.data.qpos.copy()
    with pytest.raises(ValueError) as err:
        pick.unwrapped.step(action)
    msg = str(err.value)
    assert "robolearn/PandaPickCube-v0" in msg and all(w in msg for w in words), msg
    np.testing.assert_array_equal(before, pick.unwrapped.arm.data.qpos)  # nothing was applied


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="image_sise"):
        rsim.make("robolearn/PandaReach-v0", image_sise=64)


def test_malformed_mjcf_names_file_and_line(tmp_path):
    bad = tmp_path / "arm.xml"
    bad.write_text('<mujoco>\n<worldbody>\n<body>\n<geom type="box" size="x"/>\n</body></worldbody></mujoco>')
    with pytest.raises(ModelError) as err:
        load_model(bad)
    assert str(bad) in str(err.value) and "line 4" in str(err.value) and "size" in str(err.value)
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.xml")
    unclosed = tmp_path / "unclosed.xml"
    unclosed.write_text("<mujoco><worldbody>")
    with pytest.raises(ModelError, match="unclosed.xml"):
        load_model(unclosed)


def test_dmc_tasks_are_registered():
    env = rsim.make("robolearn/dmc-cartpole_swingup-v0")
    obs, _ = env.reset(seed=0)
    assert obs["images/pixels"].shape == (84, 84, 9)
    env.close()


def test_pick_cube_backward_task_scores_putting_the_cube_down_and_letting_go():
    """reset_score: the learned reset's goal is the start of a forward episode, not the forward success."""
    import mujoco

    env = rsim.make("robolearn/PandaPickCube-v0")
    env.reset(seed=0)
    arm, task = env.unwrapped.arm, env.unwrapped.task
    reward, success = task.reset_score(arm)
    clearance = arm.tool_pos()[2] - task.cube_pos(arm)[2] - task.cfg.cube_half_size
    assert success == (clearance >= 0.08) and 0.5 <= reward <= 1.0  # resting in the region: only clearance left
    adr = arm.model.jnt_qposadr[arm.model.joint("cube").id]
    arm.data.qpos[adr + 2] = 0.15  # lifted, as after a forward success
    mujoco.mj_forward(arm.model, arm.data)
    lifted_reward, lifted_success = task.reset_score(arm)
    assert not lifted_success and lifted_reward < reward
    assert rsim.make("robolearn/PandaReach-v0").unwrapped.task.reset_score(arm) is None
    env.close()
