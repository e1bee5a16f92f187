"""Reset handlers: put the arm and the task's objects in a random start within configured ranges.

`SimReset` implements robolearn.robot.ResetHandler, the interface hardware reset handlers
implement too: one call, a seeded numpy Generator in, an info dict out. In simulation the arm start and the
object poses are drawn from `rng` alone, so the same seed gives the same start.
"""

from __future__ import annotations

from dataclasses import dataclass
import mujoco
import numpy as np


@dataclass
class ResetConfig:
    """Ranges for the random start; object ranges belong to each task's own config."""

    arm_joint_noise: float = 0.03  # rad, uniform per joint around the home posture
    settle_steps: int = 100  # physics steps (0.2 s) with the controller on before the first observation
    box_inset: float = 0.01  # the start target is kept this far inside the workspace box


class SimReset:
    """Resets a MujocoArm scene: home posture plus joint noise, task objects randomized by the task."""

    def __init__(self, arm, task, cfg: ResetConfig, safety, tool_quat):
        self.arm, self.task, self.cfg, self.safety, self.tool_quat = arm, task, cfg, safety, tool_quat

    def reset(self, rng: np.random.Generator) -> dict:
        arm, kin = self.arm, self.arm.kin
        m, d = arm.model, arm.data
        mujoco.mj_resetDataKeyframe(m, d, arm.home_key)
        noise = rng.uniform(-self.cfg.arm_joint_noise, self.cfg.arm_joint_noise, kin.n)
        d.qpos[kin.qpos_adr] = np.clip(d.qpos[kin.qpos_adr] + noise, kin.q_low, kin.q_high)
        mujoco.mj_forward(m, d)
        # The joint noise can lift the tool past the box top (home is 13 mm below it): aim inside.
        inset = self.cfg.box_inset
        arm.set_tool_target(np.clip(arm.tool_pos(), np.add(self.safety.workspace_low, inset),
                                    np.subtract(self.safety.workspace_high, inset)), self.tool_quat)
        info = self.task.reset(arm, rng) or {}
        mujoco.mj_forward(m, d)
        arm.simulate(self.cfg.settle_steps)
        return info
