"""robolearn used as a library with an env it did not write (docs/training.md, "Your own env"):
installing and importing without the simulator, training on any gymnasium env or an env factory,
a configurable success key, stateful policies and a repeatable replay buffer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

ROOT = Path(__file__).resolve().parents[1]
TINY = {"batch_size": 8, "utd_ratio": 1, "hidden_dims": [16, 16], "num_critics": 2}


class PointEnv(gym.Env):
    """Another team's env: dict observation, actions in [-1, 1], success under info["is_success"]
    (reported at every step; true once an episode has lasted `horizon` steps)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode=None, horizon: int = 8):
        self.observation_space = spaces.Dict({"state": spaces.Box(-np.inf, np.inf, (3,), np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.render_mode, self.horizon = render_mode, horizon

    def _obs(self):
        return {"state": np.array([*self.pos, self.t / self.horizon], np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = self.np_random.uniform(-1, 1, 2), 0
        return self._obs(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + 0.1 * np.clip(action, -1, 1), -1, 1)
        self.t += 1
        done = self.t >= self.horizon
        return self._obs(), float(-np.linalg.norm(self.pos)), False, done, {"is_success": done}

    def render(self):
        return np.zeros((16, 16, 3), np.uint8)


class CountingPolicy:
    """A stateful policy: counts its resets and refuses to act before the first."""

    def __init__(self):
        self.resets, self.t = 0, None

    def reset(self):
        self.resets, self.t = self.resets + 1, 0

    def __call__(self, obs):
        assert self.t is not None, "acted before reset()"
        self.t += 1
        return np.zeros(2, np.float32)


# -- 1. install and import without the simulator ---------------------------------------------

BLOCK_MUJOCO = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("mujoco", "dm_control"):
                raise ImportError(f"No module named {name!r} (blocked)")
    sys.meta_path.insert(0, Block())
""")


def test_simulator_pins_are_an_extra_that_make_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.split("=")[0].split(">")[0].strip() in ("mujoco", "dm-control")]
    assert sorted(project["optional-dependencies"]["sim"]) == ["dm-control==1.0.50", "mujoco==3.17.0"]
    extras = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("EXTRAS ?="))
    assert "sim" in extras.split("=", 1)[1].strip().split(",")


def test_agents_replay_datasets_and_robot_import_without_mujoco():
    code = BLOCK_MUJOCO + textwrap.dedent("""
        import robolearn.agents, robolearn.agents.serl, robolearn.agents.drqv2, robolearn.replay
        import robolearn.demos.dataset, robolearn.robot, robolearn.rollout, robolearn.train
        assert not [m for m in sys.modules if m.split(".")[0] in ("mujoco", "dm_control")]
        try:
            import robolearn.sim
        except ImportError as err:
            print("HINT:", err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hint = proc.stdout.split("HINT:", 1)[1].strip()
    assert len(hint.splitlines()) == 1 and "robolearn[sim]" in hint, hint


# -- 2. any gymnasium env, or an env factory ------------------------------------------------------

def _cfg(tmp_path, **kw):
    from robolearn.train import TrainConfig

    base = dict(agent="serl", out=str(tmp_path / "run"), frames=40, seed_steps=16, eval_every=1_000,
                eval_episodes=2, checkpoint_every=1_000, replay_capacity=200, video=False, agent_overrides=TINY,
                success_key="is_success")
    return TrainConfig(**{**base, **kw})


def test_trainer_trains_on_an_env_factory(tmp_path):
    from robolearn.train import load_agent, train

    result = train(_cfg(tmp_path), env_factory=lambda: PointEnv(horizon=8))
    assert result["env_steps"] == 40 and result["final_success"] == 1.0  # info["is_success"] was read
    agent, config = load_agent(result["checkpoint"], PointEnv())
    assert config["env_id"] == f"{__name__}:PointEnv"
    assert agent.act(PointEnv().reset(seed=0)[0], explore=False).shape == (2,)


def test_cli_trains_on_an_imported_gymnasium_id_and_loads_without_the_simulator(tmp_path, monkeypatch, capsys):
    from robolearn import cli
    from robolearn.train import load_agent

    (tmp_path / "libtest_envs.py").write_text(textwrap.dedent(f"""
        import gymnasium as gym
        gym.register("LibTest/Point-v0", entry_point="{__name__}:PointEnv", kwargs={{"horizon": 8}})
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    args = ["train", "--agent", "serl", "--env", "LibTest/Point-v0", "--import-module", "libtest_envs",
            "--success-key", "is_success", "--frames", "40", "--eval-episodes", "2", "--out", str(run),
            "--no-video", "--threads", "1"] + [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    assert cli.main(args) == 0, capsys.readouterr().err
    assert "final eval success: 100%" in capsys.readouterr().out
    # load_agent without an env builds the agent from the checkpoint's spaces: no MuJoCo, no robolearn.sim
    for name in ("mujoco", "dm_control", "robolearn.sim"):
        monkeypatch.setitem(sys.modules, name, None)
    agent, config = load_agent(run)
    assert config["env_id"] == "LibTest/Point-v0"
    assert agent.act(PointEnv().reset(seed=0)[0], explore=False).shape == (2,)


def test_unknown_non_robolearn_id_names_the_way_to_register_it():
    from robolearn.rollout import make_env

    with pytest.raises(ValueError, match="--import-module"):
        make_env("NoSuchTeam/NoSuchEnv-v0")


# -- 3. the success key -------------------------------------------------------------------------

def test_success_key_is_read_by_rollouts_and_writers(tmp_path):
    from robolearn.demos.dataset import Dataset, write_expert_episodes
    from robolearn.rollout import run_episodes

    policy = lambda obs: np.zeros(2, np.float32)  # noqa: E731
    assert run_episodes(PointEnv(), policy, 3, success_key="is_success").success_rate == 1.0
    write_expert_episodes(PointEnv(), policy, tmp_path / "ds", 2, success_key="is_success")
    ds = Dataset(tmp_path / "ds")
    assert [ds.episode_attrs(i)["success"] for i in range(len(ds))] == [True, True]


def test_an_env_that_never_reports_the_success_key_is_named(tmp_path):
    from robolearn.demos.dataset import write_expert_episodes
    from robolearn.rollout import run_episodes

    policy = lambda obs: np.zeros(2, np.float32)  # noqa: E731
    with pytest.warns(UserWarning, match=r"PointEnv never reported info\['success'\] in 2 episode"):
        assert run_episodes(PointEnv(), policy, 2).success_rate == 0.0
    with pytest.warns(UserWarning, match=r"never reported info\['success'\]"):
        write_expert_episodes(PointEnv(), policy, tmp_path / "ds", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the key it does report, or none at all: quiet
        run_episodes(PointEnv(), policy, 2, success_key="is_success")
        run_episodes(PointEnv(), policy, 2, success_key=None)


# -- 4. stateful policies and a repeatable replay buffer ----------------------------------------------

def test_stateful_policy_is_reset_at_each_episode_start(tmp_path):
    from robolearn.demos.dataset import write_expert_episodes
    from robolearn.rollout import run_episodes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PointEnv's success key is not the default one
        policy = CountingPolicy()
        write_expert_episodes(PointEnv(), policy, tmp_path / "ds", 3)
        assert policy.resets == 3
        policy = CountingPolicy()
        run_episodes(PointEnv(), policy, 2)
        assert policy.resets == 2


def test_replay_buffer_sampling_repeats_without_a_passed_rng():
    from robolearn.replay import ReplayBuffer

    env = PointEnv()

    def filled(**kw):
        buf = ReplayBuffer(100, env.observation_space, env.action_space, device="cpu", **kw)
        obs, _ = env.reset(seed=0)
        buf.add_first(obs)
        for _ in range(40):
            obs, reward, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
            buf.add(np.zeros(2, np.float32), reward, obs, terminated, truncated)
            if terminated or truncated:
                obs, _ = env.reset()
                buf.add_first(obs)
        return buf

    assert np.array_equal(filled().sample_indices(16), filled().sample_indices(16))
    assert np.array_equal(filled(seed=3).sample_indices(16), filled(seed=3).sample_indices(16))
    assert not np.array_equal(filled(seed=3).sample_indices(16), filled(seed=4).sample_indices(16))
