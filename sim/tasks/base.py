"""What a Panda task provides to PandaEnv: scene objects, object reset, state and score."""

from __future__ import annotations

import numpy as np


class Task:
    """Base for Panda tasks; subclasses override what they need."""

    uses_gripper: bool = False

    def build(self, spec) -> None:
        """Add the task's bodies and sites to the arena spec."""

    def reset(self, env, rng: np.random.Generator) -> dict | None:
        """Place objects (and targets) for a new episode."""

    def object_state(self, env) -> np.ndarray:
        """Privileged object state appended to the state observation (state-only variants)."""
        return np.zeros(0)

    def score(self, env) -> tuple[float, bool]:
        """Dense reward and success flag for the current state."""
        raise NotImplementedError

    def expert(self, env):
        """A scripted expert: a callable obs -> action using privileged simulator state."""
        raise NotImplementedError(f"{type(self).__name__} has no scripted expert")


def move_action(env, goal: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Normalized (dx, dy, dz) that moves the tool toward `goal` (proportional, clipped)."""
    return np.clip(gain * (goal - env.tool_pos()) / env.cfg.action_scale, -1.0, 1.0)
