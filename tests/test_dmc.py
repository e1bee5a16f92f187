"""DMCEnv follows DrQ-v2's pixel protocol: shapes, repeat, seeding, camera, limits, errors."""

from __future__ import annotations

import dm_env
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import parse_env_id

from robolearn.sim import dmc
from robolearn.sim.dmc import DMC_TASK_NAMES, DMCEnv, env_id, parse_task

from dm_control import suite


@pytest.fixture
def make():
    """Build DMCEnvs and free their GL contexts afterwards."""
    envs = []

    def _make(*args, **kwargs):
        envs.append(DMCEnv(*args, **kwargs))
        return envs[-1]

    yield _make
    for env in envs:
        env.close()


@pytest.mark.parametrize("stack", [3, 1])
def test_obs_shapes_and_dtypes(make, stack):
    env = make("cartpole_swingup", frame_stack=stack, seed=0)
    obs, info = env.reset()
    pixels = obs["images/pixels"]
    assert pixels.shape == (84, 84, 3 * stack) and pixels.dtype == np.uint8
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (5,)  # position 3, velocity 2
    assert env.observation_space.contains(obs) and info == {"discount": 1.0}
    assert env.action_space == gym.spaces.Box(-1, 1, (1,), np.float32)
    obs2, reward, terminated, truncated, info = env.step(np.zeros(1, np.float32))
    assert env.observation_space.contains(obs2) and isinstance(reward, float)
    assert not terminated and not truncated and info == {"discount": 1.0}
    if stack == 3:  # on reset all k frames are the first one; a step shifts the newest frame in
        frames = np.split(pixels, 3, axis=-1)
        assert all(np.array_equal(f, frames[0]) for f in frames)
        np.testing.assert_array_equal(obs2["images/pixels"][..., :6], pixels[..., 3:])


def test_action_repeat_advances_time_and_sums_rewards(make):
    env = make("cartpole_swingup", seed=3)
    ref = suite.load("cartpole", "swingup", task_kwargs={"random": 3})
    env.reset()
    ref.reset()
    assert env.action_repeat == 2
    rng = np.random.default_rng(0)
    for _ in range(10):
        a = rng.uniform(-1, 1, size=1)  # float64 is accepted and cast
        _, reward, *_ = env.step(a)
        expected = sum(ref.step(a).reward for _ in range(2))
        assert reward == pytest.approx(expected)
    assert env.physics.data.time == pytest.approx(10 * 2 * env._env.control_timestep())
    np.testing.assert_allclose(env.physics.data.qpos, ref.physics.data.qpos)


def test_action_repeat_override(make, monkeypatch):
    assert make("walker_walk", action_repeat=4).action_repeat == 4
    monkeypatch.setitem(dmc.DEFAULT_ACTION_REPEAT, "walker_walk", 8)
    assert make("walker_walk").action_repeat == 8


def test_reset_seeding(make):
    env = make("reacher_easy")
    a, _ = env.reset(seed=7)
    env.step(env.action_space.sample())
    b, _ = env.reset(seed=7)
    c, _ = env.reset(seed=8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["images/pixels"], c["images/pixels"])
    assert not np.array_equal(a["state"], c["state"])
    # The constructor seed and a reset seed give the same episode.
    d, _ = make("reacher_easy", seed=7).reset()
    np.testing.assert_array_equal(a["images/pixels"], d["images/pixels"])


def test_quadruped_camera_and_action_rescale(make):
    env = make("quadruped_walk", image_size=64, frame_stack=1)
    assert env.camera_id == 2 and make("walker_walk").camera_id == 0
    assert make("walker_walk", camera_id=1).camera_id == 1
    obs, _ = env.reset(seed=0)
    assert obs["images/pixels"].shape == (64, 64, 3)
    # Quadruped's actuator bounds are asymmetric: -1 / +1 must land on the spec's min / max.
    spec = env._env.action_spec()
    env.step(-np.ones(12))
    np.testing.assert_allclose(env.physics.data.ctrl, spec.minimum)
    env.step(np.ones(12))
    np.testing.assert_allclose(env.physics.data.ctrl, spec.maximum)


def test_task_names():
    assert parse_task("ball_in_cup_catch") == ("ball_in_cup", "catch")
    assert parse_task("cup_catch") == ("ball_in_cup", "catch")  # DrQ-v2's name
    assert parse_task("point_mass_easy") == ("point_mass", "easy")
    assert parse_task("humanoid_CMU_run") == ("humanoid_CMU", "run")
    assert parse_task("finger_turn_hard") == ("finger", "turn_hard")
    assert set(DMC_TASK_NAMES) == {f"{d}_{t}" for d, t in suite.ALL_TASKS if d != "lqr"}
    assert env_id("cartpole_swingup") == "robolearn/dmc-cartpole_swingup-v0"
    for name in DMC_TASK_NAMES:
        assert parse_env_id(env_id(name)) == ("robolearn", f"dmc-{name}", 0)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="cartpole_swingupp") as err:
        DMCEnv("cartpole_swingupp")
    assert "cartpole_swingup," in str(err.value) and "ball_in_cup_catch" in str(err.value)


@pytest.mark.parametrize(
    "action, shown",
    [
        (np.zeros(2), r"\(2,\)"),
        (np.zeros((1, 1)), r"\(1, 1\)"),
        ([np.nan], "nan"),
        (np.array([np.inf]), "inf"),
    ],
)
def test_bad_actions_raise(make, action, shown):
    env = make("cartpole_swingup", seed=0)
    env.reset()
    with pytest.raises(ValueError, match=rf"DMCEnv\(cartpole_swingup\).*\(1,\).*{shown}"):
        env.step(action)


def test_bad_arguments():
    with pytest.raises(ValueError, match="frame_stack"):
        DMCEnv(frame_stack=0)
    with pytest.raises(ValueError, match="render_mode"):
        DMCEnv(render_mode="human")


def test_truncation_at_time_limit(make):
    # 0.1 s at cartpole's 0.01 s control step = 10 env steps = 5 agent steps at repeat 2.
    env = make("cartpole_swingup", seed=0, time_limit=0.1)
    env.reset()
    for i in range(5):
        _, _, terminated, truncated, info = env.step([0.0])
        assert not terminated and truncated == (i == 4) and info["discount"] == 1.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step([0.0])
    env.reset()  # a new episode runs after the limit
    env.step([0.0])


def test_termination_when_discount_zero(make, monkeypatch):
    env = make("cartpole_swingup", seed=0)
    env.reset()
    dead = dm_env.termination(reward=0.5, observation=env._env.reset().observation)
    monkeypatch.setattr(env._env, "step", lambda action: dead)
    _, reward, terminated, truncated, info = env.step([0.0])
    # the first repeat ends the episode, so its reward is counted once
    assert terminated and not truncated and reward == 0.5 and info == {"discount": 0.0}


def test_render_returns_latest_frame(make):
    env = make("cartpole_swingup", render_mode="rgb_array", seed=0)
    env.reset()
    obs, *_ = env.step([0.5])
    frame = env.render()
    assert frame.shape == (84, 84, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, obs["images/pixels"][..., -3:])
    assert make("cartpole_swingup").render() is None


def test_a_smaller_shadow_map_changes_only_shadow_edge_pixels(make):
    """shadow_size: the side of the shadow map, set before the first render; cartpole at 64x64 with 512 draws the
    task's frames (2048) but for a few shadow-edge pixels (docs/dmc.md), for about half the osmesa time."""
    envs = [make("cartpole_swingup", seed=0, image_size=64, action_repeat=8, **kw) for kw in ({}, {"shadow_size": 512})]
    assert [e.physics.model.vis.quality.shadowsize for e in envs] == [2048, 512]
    obs, differ = [e.reset(seed=0)[0] for e in envs], []
    for action in ([0.8], [-0.5], [1.0], [-1.0]):
        a, b = (o["images/pixels"] for o in obs)
        differ.append(float(np.mean(np.any(a.reshape(64, 64, -1, 3) != b.reshape(64, 64, -1, 3), axis=-1))))
        obs = [e.step(action)[0] for e in envs]
    assert max(differ) < 0.002, differ  # measured: 1 pixel of 4096 in some frames, none in most
    with pytest.raises(ValueError, match="shadow_size must be a positive int"):
        DMCEnv("cartpole_swingup", shadow_size=0)


def test_gymnasium_make_with_env_checker():
    task = "cartpole_swingup"
    if env_id(task) not in gym.registry:  # the package registry may already hold it
        gym.register(env_id(task), entry_point="robolearn.sim.dmc:DMCEnv", kwargs={"task": task})
    env = gym.make(env_id(task), seed=0)
    try:
        obs, _ = env.reset(seed=1)
        obs, *_ = env.step(env.action_space.sample())
        assert obs["images/pixels"].shape == (84, 84, 9)
    finally:
        env.close()
