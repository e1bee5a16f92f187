"""PandaPickCube, matching SERL's franka_sim pick-cube so results compare.

10 Hz control, 100-step episodes, action (dx, dy, dz, gripper), tool clipped to the workspace
box, cube placed uniformly in front of the robot. Dense reward
0.3 exp(-20 |cube - tool|) + 0.7 clip(lift / 0.2, 0, 1); success = cube lifted >= 0.1 m.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from robolearn.sim.tasks.base import Task


@dataclass
class PickCubeConfig:
    cube_half_size: float = 0.02
    cube_mass: float = 0.05
    region_low: tuple[float, float] = (0.25, -0.25)
    region_high: tuple[float, float] = (0.55, 0.25)
    success_lift: float = 0.1
    full_reward_lift: float = 0.2


class PickCube(Task):
    uses_gripper = True

    def __init__(self, cfg: PickCubeConfig | None = None):
        self.cfg = cfg or PickCubeConfig()

    def build(self, spec) -> None:
        h = self.cfg.cube_half_size
        body = spec.worldbody.add_body(name="cube", pos=[0.4, 0.0, h])
        body.add_freejoint(name="cube")
        body.add_geom(name="cube", type=mujoco.mjtGeom.mjGEOM_BOX, size=[h, h, h], mass=self.cfg.cube_mass,
                      rgba=[0.85, 0.2, 0.2, 1.0], friction=[1.0, 0.01, 0.001], condim=4,
                      contype=1, conaffinity=3)  # conaffinity bit 2: the arm and fingers touch it

    def default_env_config(self):
        """A faster arm than the default impedance, toward SERL's franka_sim arm (~0.5 m/s).

        The spring force is clipped at K * 0.025 = 75 N instead of 60 N, so the free-space speed
        cap is 75 / 390 = 0.19 m/s (1.9 cm per 10 Hz step): the scripted expert lifts in ~33
        steps instead of ~41, and SERL from states reached 90% where the default arm plateaued
        near 70% (docs/benchmarks.md). Faster still breaks the safety bound: a 3.5 cm clip let the
        tool swing 5.1 mm and a 6 cm clip 6.2 mm out of the box when the elbow folded onto its
        limit next to the base (tests/test_safety_properties.py, docs/controllers.md).
        """
        from robolearn.controllers.impedance import ImpedanceConfig
        from robolearn.sim.panda_env import PandaEnvConfig
        return PandaEnvConfig(impedance=ImpedanceConfig(max_translation_error=0.025))

    def reset(self, arm, rng):
        xy = rng.uniform(self.cfg.region_low, self.cfg.region_high)
        adr = arm.model.jnt_qposadr[arm.model.joint("cube").id]
        arm.data.qpos[adr:adr + 7] = [*xy, self.cfg.cube_half_size, 1.0, 0.0, 0.0, 0.0]
        return {"cube_init": xy.tolist()}

    def cube_pos(self, arm) -> np.ndarray:
        return arm.data.body("cube").xpos.copy()

    def object_state(self, arm) -> np.ndarray:
        return self.cube_pos(arm)

    def in_region(self, xy) -> bool:
        """Whether a cube position (x, y) lies inside the region its episodes start from."""
        return bool(np.all(xy >= self.cfg.region_low) and np.all(xy <= self.cfg.region_high))

    def score(self, arm):
        cube, tool = self.cube_pos(arm), arm.tool_pos()
        lift = cube[2] - self.cfg.cube_half_size
        reward = 0.3 * np.exp(-20.0 * np.linalg.norm(cube - tool)) + 0.7 * np.clip(lift / self.cfg.full_reward_lift, 0, 1)
        return float(reward), bool(lift >= self.cfg.success_lift)

    def reset_score(self, arm):
        """The backward task: the cube put back down inside the start region, and the gripper clear above it.
        Reward 0.5 (1 - lift / 0.1) + 0.5 clearance / 0.08, each clipped to [0, 1]; success: resting, inside, clear."""
        cube, tool = self.cube_pos(arm), arm.tool_pos()
        lift = cube[2] - self.cfg.cube_half_size
        clearance = tool[2] - cube[2] - self.cfg.cube_half_size
        reward = 0.5 * (1 - np.clip(lift / 0.1, 0, 1)) + 0.5 * np.clip(clearance / 0.08, 0, 1)
        return float(reward), bool(lift < 0.005 and self.in_region(cube[:2]) and clearance >= 0.08)

    def expert(self, env):
        return PickCubeExpert(self, env)

    def reset_expert(self, env):
        return PickCubeResetExpert(self, env)


GRASP_PHASES = ("approach", "descend", "grasp")


def grasp_step(phase: str, closed_for: int, cube: np.ndarray, tool: np.ndarray, then: str):
    """One step of the phases both experts share: above the cube, down, close for 3 steps, then phase `then`.
    Returns (phase, closed_for, goal, grip); the caller sets the goal of phase `then` (on the step that
    switches to it, the grasp goal is returned)."""
    goal, grip = None, -1.0
    if phase == "approach":
        goal = cube + [0, 0, 0.08]
        if np.linalg.norm((tool - goal)[:2]) < 0.01 and abs(tool[2] - goal[2]) < 0.02:
            phase = "descend"
    if phase == "descend":
        goal = cube + [0, 0, 0.002]
        if np.linalg.norm(tool - goal) < 0.008:
            phase, closed_for = "grasp", 0
    if phase == "grasp":
        goal, grip = cube + [0, 0, 0.002], 1.0
        closed_for += 1
        if closed_for >= 3:
            phase = then
    return phase, closed_for, goal, grip


class PickCubeExpert:
    """Above the cube, down, close, lift: a phase machine on privileged cube and tool state."""

    def __init__(self, task: PickCube, env):
        self.task, self.env = task, env
        self.phase, self.closed_for = "approach", 0

    def __call__(self, obs) -> np.ndarray:
        from robolearn.sim.tasks.base import move_action
        env, cube = self.env, self.task.cube_pos(self.env.arm)
        if env.elapsed_steps == 0:
            self.phase, self.closed_for = "approach", 0
        tool, goal, grip = env.arm.tool_pos(), None, -1.0
        if self.phase in GRASP_PHASES:
            self.phase, self.closed_for, goal, grip = grasp_step(self.phase, self.closed_for, cube, tool, "lift")
        if self.phase == "lift":
            goal, grip = np.array([cube[0], cube[1], 0.3]), 1.0
        return np.append(move_action(env, goal), grip).astype(np.float32)


class PickCubeResetExpert:
    """The backward task's expert: carry the cube into its start region (grasping it first if it rests outside),
    put it down, open, and lift the gripper clear; a phase machine on privileged state, as PickCubeExpert."""

    MARGIN = 0.03  # put the cube down this far inside the region's edges

    def __init__(self, task: PickCube, env):
        self.task, self.env = task, env
        self.phase, self.count = None, 0

    def _start(self, cube) -> str:
        half = self.task.cfg.cube_half_size
        held = cube[2] - half > 0.01 and self.env.arm.gripper_width() < 2 * half + 0.01
        return "carry" if held else "release" if self.task.in_region(cube[:2]) else "approach"

    def __call__(self, obs) -> np.ndarray:
        from robolearn.sim.tasks.base import move_action
        env, cfg = self.env, self.task.cfg
        cube, tool, half = self.task.cube_pos(env.arm), env.arm.tool_pos(), cfg.cube_half_size
        if env.elapsed_steps == 0 or self.phase is None:
            self.phase, self.count = self._start(cube), 0
        place = np.clip(cube[:2], np.add(cfg.region_low, self.MARGIN), np.subtract(cfg.region_high, self.MARGIN))
        goal, grip = tool, 1.0
        if self.phase in GRASP_PHASES:
            self.phase, self.count, goal, grip = grasp_step(self.phase, self.count, cube, tool, "carry")
        if self.phase == "carry":
            goal = np.array([place[0], place[1], max(cube[2], half + 0.03)])
            if np.linalg.norm((cube[:2] - place)) < 0.01:
                self.phase = "lower"
        if self.phase == "lower":
            goal = np.array([place[0], place[1], half + 0.002])
            if cube[2] - half < 0.004:
                self.phase, self.count = "release", 0
        if self.phase == "release":
            goal, grip = tool, -1.0
            self.count += 1
            if self.count >= 3:
                self.phase = "clear"
        if self.phase == "clear":
            goal, grip = np.array([tool[0], tool[1], cube[2] + half + 0.12]), -1.0
        return np.append(move_action(env, goal), grip).astype(np.float32)
