"""What a Panda task provides: scene objects, object reset, state and score (robolearn.robot.Task).

Tasks see the simulator through the MuJoCo arm backend (`robolearn.sim.mujoco_arm.MujocoArm`:
`model`, `data`, `kin`, `tool_pos()` ...); experts get the robot env for its `elapsed_steps`.
"""

from __future__ import annotations

import numpy as np


class Task:
    """Base for Panda tasks; subclasses override what they need."""

    uses_gripper: bool = False

    def build(self, spec) -> None:
        """Add the task's bodies and sites to the arena spec."""

    def reset(self, arm, rng: np.random.Generator) -> dict | None:
        """Place objects (and targets) for a new episode."""

    def object_state(self, arm) -> np.ndarray:
        """Privileged object state appended to the state observation (state-only variants)."""
        return np.zeros(0)

    def score(self, arm) -> tuple[float, bool]:
        """Dense reward and success flag for the current state."""
        raise NotImplementedError

    def reset_score(self, arm) -> tuple[float, bool] | None:
        """Dense reward and success of undoing the task (a learned reset's backward task); None: the task has none."""
        return None

    def expert(self, env):
        """A scripted expert: a callable obs -> action using privileged simulator state."""
        raise NotImplementedError(f"{type(self).__name__} has no scripted expert")

    def reset_expert(self, env):
        """A scripted expert for the backward task of `reset_score` (backward demonstrations)."""
        raise NotImplementedError(f"{type(self).__name__} has no scripted backward expert")


def move_action(env, goal: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Normalized (dx, dy, dz) that moves the tool toward `goal` (proportional, clipped)."""
    return np.clip(gain * (goal - env.arm.tool_pos()) / env.cfg.action_scale, -1.0, 1.0)
