"""PandaReach: move the tool to a random target; success within `tolerance` metres."""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from robolearn.sim.tasks.base import Task, move_action


@dataclass
class ReachConfig:
    target_low: tuple[float, float, float] = (0.3, -0.2, 0.1)
    target_high: tuple[float, float, float] = (0.55, 0.2, 0.4)
    tolerance: float = 0.02


class Reach(Task):
    def __init__(self, cfg: ReachConfig | None = None):
        self.cfg = cfg or ReachConfig()

    def build(self, spec) -> None:
        body = spec.worldbody.add_body(name="reach_target", mocap=True, pos=[0.4, 0.0, 0.2])
        body.add_geom(name="reach_target", type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[self.cfg.tolerance],
                      rgba=[0.1, 0.8, 0.1, 0.6], contype=0, conaffinity=0)

    def _mocap(self, arm) -> int:
        return int(arm.model.body("reach_target").mocapid[0])

    def reset(self, arm, rng):
        target = rng.uniform(self.cfg.target_low, self.cfg.target_high)
        arm.data.mocap_pos[self._mocap(arm)] = target
        return {"target": target.tolist()}

    def target(self, arm) -> np.ndarray:
        return arm.data.mocap_pos[self._mocap(arm)].copy()

    def object_state(self, arm) -> np.ndarray:
        return self.target(arm)

    def score(self, arm):
        dist = float(np.linalg.norm(arm.tool_pos() - self.target(arm)))
        return float(np.exp(-10.0 * dist)), dist <= self.cfg.tolerance

    def expert(self, env):
        return lambda obs: move_action(env, self.target(env.arm)).astype(np.float32)
