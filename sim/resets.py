"""Reset handlers: put the arm and the task's objects in a random start within configured ranges.

`ResetHandler` is the interface hardware reset handlers implement too (hardware/resets.py):
one call, a seeded numpy Generator in, an info dict out. In simulation the arm start and the
object poses are drawn from `rng` alone, so the same seed gives the same start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mujoco
import numpy as np


class ResetHandler(Protocol):
    def reset(self, rng: np.random.Generator) -> dict: ...


@dataclass
class ResetConfig:
    """Ranges for the random start; object ranges belong to each task's own config."""

    arm_joint_noise: float = 0.03  # rad, uniform per joint around the home posture
    settle_steps: int = 100  # physics steps (0.2 s) with the controller on before the first observation
    box_inset: float = 0.01  # the start target is kept this far inside the workspace box


class SimReset:
    """Resets a PandaEnv: home posture plus joint noise, task objects randomized by the task."""

    def __init__(self, env, cfg: ResetConfig):
        self.env, self.cfg = env, cfg

    def reset(self, rng: np.random.Generator) -> dict:
        env = self.env
        m, d = env.model, env.data
        mujoco.mj_resetDataKeyframe(m, d, env._home)
        noise = rng.uniform(-self.cfg.arm_joint_noise, self.cfg.arm_joint_noise, env.arm.n)
        d.qpos[env.arm.qpos_adr] = np.clip(d.qpos[env.arm.qpos_adr] + noise, env.arm.q_low, env.arm.q_high)
        mujoco.mj_forward(m, d)
        # The joint noise can lift the tool past the box top (home is 13 mm below it): aim inside.
        inset = self.cfg.box_inset
        env.set_tool_target(np.clip(env.tool_pos(), np.add(env.cfg.safety.workspace_low, inset),
                                    np.subtract(env.cfg.safety.workspace_high, inset)))
        info = env.task.reset(env, rng) or {}
        mujoco.mj_forward(m, d)
        env.simulate(self.cfg.settle_steps)
        return info
