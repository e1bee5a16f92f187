"""The backward task of a learned reset (sim/backward.py): PickCube's backward expert, its env, and the
backward demonstrations `robolearn rollout --backward --record` writes for a backward learner."""

from __future__ import annotations

import numpy as np
import pytest

import robolearn.sim as rsim
from robolearn.sim.backward import BackwardTask

PICK = "robolearn/PandaPickCube-v0"


def test_the_backward_expert_undoes_every_forward_state_and_scores_with_reset_score():
    """Starts after 0-60 forward expert steps: some with the cube held up, some untouched; the backward expert
    succeeds from each, its rewards are the task's reset_score and the episode ends at that success."""
    env = BackwardTask(rsim.make(PICK, terminate_on_success=False))
    task, arm = env.base.task, env.base.arm
    held = untouched = 0
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        lift = task.cube_pos(arm)[2] - task.cfg.cube_half_size
        held += lift > 0.05
        untouched += info["forward_steps"] < 10
        policy, done, steps = env.scripted_policy(), False, 0
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy(obs))
            assert (reward, info["success"]) == task.reset_score(arm)
            done, steps = terminated or truncated, steps + 1
        assert terminated and info["success"], f"seed {seed}: not undone in {steps} steps"
    assert held >= 5 and untouched >= 1, (held, untouched)


def test_the_recorded_backward_demos_fill_a_backward_learners_demo_buffer(tmp_path):
    from robolearn.cli import main
    from robolearn.demos.dataset import Dataset
    from robolearn.replay import ReplayBuffer

    demos = tmp_path / "back"
    assert main(["rollout", "--env", PICK, "--env-set", "terminate_on_success=false", "--backward", "--episodes", "4",
                 "--seed", "7", "--record", str(demos)]) == 0
    data = Dataset(demos)
    assert len(data) == 4 and data.env_id == PICK
    env = rsim.make(PICK, terminate_on_success=False)
    buf = ReplayBuffer.from_dataset(data, env.observation_space, env.action_space)
    assert len(buf) == data.num_steps and data.num_steps <= 4 * 40
    rewards = np.concatenate([data.episode(i)["reward"] for i in range(len(data))])
    assert rewards.max() > 0.9  # the backward reward: 1.0 when the cube is down and the gripper clear


@pytest.mark.parametrize("env_id,kwargs,named", [
    ("robolearn/PandaReach-v0", {}, "PandaReach-v0 has no backward task"),
    ("robolearn/dmc-cartpole_swingup-v0", {}, "has no backward task"),
    (PICK, {"max_steps": 0}, "max_steps must be >= 1"),
])
def test_a_task_without_a_backward_task_and_a_bad_length_are_refused(env_id, kwargs, named):
    with pytest.raises(ValueError, match=named):
        BackwardTask(rsim.make(env_id), **kwargs)


def test_the_backward_rollout_reports_its_success_within_max_steps(capsys):
    """Putting a held cube down and clearing it takes the expert ~30 steps: 40 (the default) is enough, 10 is not."""
    from robolearn.cli import main
    env = BackwardTask(rsim.make(PICK))
    seed = next(s for s in range(100) if env.reset(seed=s)[1]["forward_steps"] >= 45)  # the cube held up
    assert env.base.task.cube_pos(env.base.arm)[2] > 0.1
    assert main(["rollout", "--env", PICK, "--backward", "--episodes", "1", "--seed", str(seed)]) == 0
    assert "success rate: 100.0%" in capsys.readouterr().out
    assert main(["rollout", "--env", PICK, "--backward", "10", "--episodes", "1", "--seed", str(seed)]) == 0
    assert "success rate: 0.0%" in capsys.readouterr().out
