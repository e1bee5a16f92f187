"""Learning checks: the full loops learn on real tasks within a short CPU run.

The benchmarks' targets (bench/serl_pickcube.py, bench/drqv2_update.py) live in bench/; these
only prove that the training loop, replay, demos and agents together improve a policy.
"""

from __future__ import annotations

import json

import pytest
import torch

import robolearn.sim as rsim
from robolearn.agents.serl import CPU_OVERRIDES
from robolearn.demos.dataset import DatasetWriter
from robolearn.rollout import run_episodes, scripted_policy
from robolearn.train import TrainConfig, train

PICK = "robolearn/PandaPickCube-v0"
ENV_KWARGS = {"terminate_on_success": False}  # SERL's franka_sim: dense reward, 100-step episodes


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.timeout(900)
def test_serl_from_states_lifts_the_cube_within_a_few_thousand_steps(tmp_path, one_thread):
    demos = tmp_path / "demos"
    env = rsim.make(PICK, **ENV_KWARGS)
    with DatasetWriter(demos, PICK, env.observation_space, env.action_space, fps=10) as writer:
        assert run_episodes(env, scripted_policy(env), 20, seed=10_000, recorder=writer).success_rate >= 0.8
    env.close()
    cfg = TrainConfig(agent="serl", env=PICK, out=str(tmp_path / "run"), frames=4_000, seed=0, demos=str(demos),
                      eval_every=1_000, eval_episodes=10, target_success=0.2, checkpoint_every=100_000,
                      save_replay=False, video=False, env_kwargs=ENV_KWARGS, agent_overrides=dict(CPU_OVERRIDES))
    result = train(cfg)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    successes = [success for _steps, _ret, success, _s in history["eval"]]
    # Within 4k steps the greedy policy lifts the cube and still holds it up at the last step in
    # at least 2 of the 10 fixed evaluation episodes (seed 0 does so by ~2k steps).
    assert max(successes) >= 0.2, history["eval"]
    assert result["env_steps"] <= 4_000
