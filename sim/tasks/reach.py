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

    def _mocap(self, env) -> int:
        return int(env.model.body("reach_target").mocapid[0])

    def reset(self, env, rng):
        target = rng.uniform(self.cfg.target_low, self.cfg.target_high)
        env.data.mocap_pos[self._mocap(env)] = target
        return {"target": target.tolist()}

    def target(self, env) -> np.ndarray:
        return env.data.mocap_pos[self._mocap(env)].copy()

    def object_state(self, env) -> np.ndarray:
        return self.target(env)

    def score(self, env):
        dist = float(np.linalg.norm(env.tool_pos() - self.target(env)))
        return float(np.exp(-10.0 * dist)), dist <= self.cfg.tolerance

    def expert(self, env):
        return lambda obs: move_action(env, self.target(env)).astype(np.float32)
