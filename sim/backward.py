"""The backward task of a learned reset as a gymnasium env, to record backward demonstrations.

`BackwardTask(env)` starts each episode where a forward episode may leave the scene: after `env.reset`, the
task's forward expert acts for a random number of steps (0 to `forward_steps`: the cube untouched, grasped, or
held up). Rewards and success are then the task's `reset_score` (for PickCube: the cube resting inside its start
region, the gripper 8 cm clear above it), the episode ends at success or after `max_steps`, and
`scripted_policy` is the task's backward expert. `robolearn rollout --backward --record DIR` records it for the
backward learner's `demos` (docs/resets.md, "learned").
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class BackwardTask(gym.Wrapper):
    """A robolearn sim env whose task has `reset_score` and `reset_expert`, turned into its backward task."""

    def __init__(self, env, max_steps: int = 40, forward_steps: int = 60):
        super().__init__(env)
        base = env.unwrapped
        name = getattr(base, "env_id", type(base).__name__)
        score = getattr(getattr(base, "task", None), "reset_score", None)
        if score is None or not hasattr(base, "arm") or score(base.arm) is None:
            raise ValueError(f"{name} has no backward task (only a robolearn Panda task that defines reset_score has)")
        if max_steps < 1 or forward_steps < 0:
            raise ValueError(f"{name} backward task: max_steps must be >= 1 and forward_steps >= 0, "
                             f"got {max_steps} and {forward_steps}")
        self.base, self.max_steps, self.forward_steps = base, max_steps, forward_steps
        self.forward = base.task.expert(base)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        k = int(np.random.default_rng(seed).integers(0, self.forward_steps + 1))
        for _ in range(k):
            obs, *_ = self.env.step(self.forward(obs))
        self.base.elapsed_steps = 0  # the backward episode starts here
        return obs, {**info, "forward_steps": k}

    def step(self, action):
        obs, _, _, _, info = self.env.step(action)
        reward, success = self.base.task.reset_score(self.base.arm)
        truncated = self.base.elapsed_steps >= self.max_steps
        return obs, float(reward), bool(success), truncated, {**info, "success": bool(success)}

    def scripted_policy(self):
        return self.base.task.reset_expert(self.base)
