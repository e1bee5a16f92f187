"""PandaPegInsert: a square peg held in the gripper goes into a fixed block's hole (SERL's peg task).

The peg starts grasped by friction (not welded) a few centimetres above a hole with 1 mm
clearance each side; the hole's xy is drawn per episode. Action (dx, dy, dz); the gripper stays
closed. Success = the peg's bottom face at least `success_depth` below the hole's top face while
inside the hole. Geometry, reward and success are documented in docs/tasks_peg_insert.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from robolearn.controllers.impedance import ImpedanceConfig
from robolearn.controllers.rotations import orientation_error
from robolearn.controllers.safety import SafetyConfig
from robolearn.sim.panda_env import TOOL_DOWN, PandaEnvConfig
from robolearn.sim.tasks.base import Task, move_action

# Where the peg sits in the hand: its top face this far above the tcp. The finger pads span
# 7 mm below to 37 mm above the tcp, so a 70 mm peg is gripped over 32 mm and reaches 38 mm
# below the pads: a full 30 mm insertion leaves the pads 8 mm above the block.
PEG_TOP_ABOVE_TCP = 0.025


@dataclass
class PegInsertConfig:
    """Peg and hole geometry (metres), the randomized start, and the success depth."""

    peg_half_width: float = 0.0125  # 25 mm square peg
    peg_length: float = 0.07
    peg_mass: float = 0.1
    clearance: float = 0.001  # per side: the hole is 27 mm square
    hole_depth: float = 0.03
    wall_thickness: float = 0.02
    base_thickness: float = 0.01
    hole_low: tuple[float, float] = (0.42, -0.05)  # region of the hole's centre (xy)
    hole_high: tuple[float, float] = (0.52, 0.05)
    start_xy_offset: float = 0.01  # peg start: uniform +-this in x and y from the hole centre
    start_height: tuple[float, float] = (0.02, 0.04)  # peg bottom above the hole's top face
    success_depth: float = 0.02
    friction: float = 0.3  # peg and block; the finger pads (1.5) dominate the grasp contacts
    solref: tuple[float, float] = (0.005, 1.0)  # peg and block: stiffer than the default 0.02 s
    noslip_iterations: int = 5  # MuJoCo's noslip pass: no creep of the frictional grasp

    @property
    def hole_half_width(self) -> float:
        return self.peg_half_width + self.clearance

    @property
    def hole_top_z(self) -> float:
        return self.base_thickness + self.hole_depth


class PegInsert(Task):
    uses_gripper = False

    def __init__(self, cfg: PegInsertConfig | None = None):
        self.cfg = cfg or PegInsertConfig()

    def default_env_config(self) -> PandaEnvConfig:
        """SERL's peg-insertion settings: fine steps, bounded contact force, a box around the hole."""
        c = self.cfg
        # The hand squeezes the peg with ~12 N per finger (friction 1.5: ~36 N of hold), so the
        # contact force is capped at 20 N (K * 0.01 m), as SERL clips its reference for this task.
        # The floor of the box keeps the peg's bottom above the hole's bottom and off the table.
        below_tcp = c.peg_length - PEG_TOP_ABOVE_TCP
        z_low, z_high = c.base_thickness + below_tcp, c.hole_top_z + c.start_height[1] + below_tcp + 0.1
        margin = c.start_xy_offset + 0.04
        safety = SafetyConfig(workspace_low=(c.hole_low[0] - margin, c.hole_low[1] - margin, z_low),
                              workspace_high=(c.hole_high[0] + margin, c.hole_high[1] + margin, z_high))
        return PandaEnvConfig(action_scale=0.02, impedance=ImpedanceConfig(max_translation_error=0.01),
                              safety=safety)

    # -- scene ----------------------------------------------------------------------------
    def build(self, spec) -> None:
        c = self.cfg
        box = mujoco.mjtGeom.mjGEOM_BOX
        obj = dict(contype=1, conaffinity=3, condim=4, friction=[c.friction, 0.005, 0.0001], solref=list(c.solref))
        # Soft contacts let a gripped object creep under sustained load (1.6 mm/s at 20 N here);
        # the noslip post-pass removes that, so the peg stays put while the arm pushes it.
        spec.option.noslip_iterations = max(spec.option.noslip_iterations, c.noslip_iterations)
        peg = spec.worldbody.add_body(name="peg", pos=[0.45, 0.0, 0.3])
        peg.add_freejoint(name="peg")
        h = c.peg_half_width
        peg.add_geom(name="peg", type=box, size=[h, h, c.peg_length / 2], mass=c.peg_mass,
                     rgba=[0.85, 0.55, 0.1, 1.0], **obj)
        peg.add_site(name="peg_bottom", pos=[0, 0, -c.peg_length / 2], size=[0.003], group=4)

        # The block is a static body moved per episode through model.body_pos.
        block = spec.worldbody.add_body(name="hole", pos=[0.45, 0.0, 0.0])
        inner, t, depth, base = c.hole_half_width, c.wall_thickness, c.hole_depth, c.base_thickness
        outer, zc = inner + t, base + depth / 2
        grey = [0.5, 0.55, 0.6, 1.0]
        block.add_geom(name="hole_base", type=box, size=[outer, outer, base / 2], pos=[0, 0, base / 2], rgba=grey, **obj)
        for sx in (-1, 1):  # x walls run the block's full width, y walls fit between them
            block.add_geom(name=f"hole_wall_x{sx:+d}", type=box, size=[t / 2, outer, depth / 2],
                           pos=[sx * (inner + t / 2), 0, zc], rgba=grey, **obj)
            block.add_geom(name=f"hole_wall_y{sx:+d}", type=box, size=[inner, t / 2, depth / 2],
                           pos=[0, sx * (inner + t / 2), zc], rgba=grey, **obj)
        block.add_site(name="hole_top", pos=[0, 0, c.hole_top_z], size=[0.003], group=4)

    # -- episode ------------------------------------------------------------------------------
    def reset(self, arm, rng):
        c, m, d = self.cfg, arm.model, arm.data
        hole_xy = rng.uniform(c.hole_low, c.hole_high)
        offset = rng.uniform(-c.start_xy_offset, c.start_xy_offset, 2)
        height = rng.uniform(*c.start_height)
        m.body_pos[m.body("hole").id, :2] = hole_xy
        tcp = np.array([*(hole_xy + offset), c.hole_top_z + height + c.peg_length - PEG_TOP_ABOVE_TCP])
        solve_tool_pose(arm, tcp, TOOL_DOWN)
        arm.set_tool_target(tcp, TOOL_DOWN)
        # Fingers already at the peg's width, closed command: the pads squeeze it from the first step.
        d.qpos[arm.finger_adr] = c.peg_half_width
        d.ctrl[arm.gripper_actuator] = 0.0
        adr = m.jnt_qposadr[m.joint("peg").id]
        d.qpos[adr:adr + 3] = tcp + [0, 0, PEG_TOP_ABOVE_TCP - c.peg_length / 2]
        d.qpos[adr + 3:adr + 7] = [1.0, 0.0, 0.0, 0.0]
        return {"hole_xy": hole_xy.tolist(), "peg_start": tcp.tolist()}

    # -- state and score -------------------------------------------------------------------------
    def peg_bottom(self, arm) -> np.ndarray:
        return arm.data.site("peg_bottom").xpos.copy()

    def hole_top(self, arm) -> np.ndarray:
        return arm.data.site("hole_top").xpos.copy()

    def object_state(self, arm) -> np.ndarray:
        """Peg bottom-face centre (3) and hole top-face centre (3), world frame."""
        return np.concatenate([self.peg_bottom(arm), self.hole_top(arm)])

    def score(self, arm):
        c = self.cfg
        peg, hole = self.peg_bottom(arm), self.hole_top(arm)
        xy, height = float(np.linalg.norm(peg[:2] - hole[:2])), float(peg[2] - hole[2])
        inside = bool(np.all(np.abs(peg[:2] - hole[:2]) < c.hole_half_width))
        depth = -height if inside else 0.0
        # Approach term: distance to the hole's mouth; insertion term: depth up to the success depth.
        reward = 0.3 * np.exp(-40.0 * (xy + max(height, 0.0))) + 0.7 * np.clip(depth / c.success_depth, 0.0, 1.0)
        return float(reward), bool(inside and depth >= c.success_depth)

    def expert(self, env):
        return PegInsertExpert(self, env)


class PegInsertExpert:
    """Align the peg over the hole, then push down; a phase machine on privileged peg/hole state.

    The descent is rate-limited (`insert_step` per control step) because a sudden full-force push
    swings the tool sideways by a millimetre or two; a peg caught on the rim is lifted and realigned.
    """

    def __init__(self, task: PegInsert, env, align_tol: float = 0.0005, hover: float = 0.005,
                 insert_step: float = 0.01):
        self.task, self.env = task, env
        self.align_tol, self.hover, self.insert_step = align_tol, hover, insert_step
        self.phase = "align"

    def __call__(self, obs) -> np.ndarray:
        env, task = self.env, self.task
        if env.elapsed_steps == 0:
            self.phase = "align"
        peg, hole = task.peg_bottom(env.arm), task.hole_top(env.arm)
        xy_err = float(np.linalg.norm((peg - hole)[:2]))
        if self.phase == "insert" and xy_err > task.cfg.clearance and peg[2] > hole[2] - 0.002:
            self.phase = "align"  # on the rim, not in the hole: back off and realign
        if self.phase == "align":
            goal = hole + [0, 0, self.hover]
            if xy_err < self.align_tol and abs(peg[2] - goal[2]) < 0.003:
                self.phase = "insert"
        if self.phase == "insert":
            goal = np.array([hole[0], hole[1], max(peg[2] - self.insert_step, hole[2] - task.cfg.hole_depth)])
        # Move the tool so that the peg's bottom lands on the goal.
        return move_action(env, env.arm.tool_pos() + goal - peg).astype(np.float32)


def solve_tool_pose(scene, pos: np.ndarray, quat: np.ndarray, iters: int = 200, tol: float = 1e-6) -> None:
    """Set the arm's joints so the tool site is at pos/quat (damped least squares from the current q)."""
    m, d, arm = scene.model, scene.data, scene.kin
    err = np.empty(6)
    for _ in range(iters):
        mujoco.mj_kinematics(m, d)
        mujoco.mj_comPos(m, d)
        err[:3] = pos - arm.tool_pos(d)
        err[3:] = orientation_error(quat, arm.tool_quat(d))
        if np.linalg.norm(err) < tol:
            break
        jac = arm.jacobian(d)
        dq = jac.T @ np.linalg.solve(jac @ jac.T + 1e-4 * np.eye(6), err)
        dq *= min(1.0, 0.2 / np.abs(dq).max())
        d.qpos[arm.qpos_adr] = np.clip(arm.q(d) + dq, arm.q_low, arm.q_high)
    d.qvel[:] = 0.0
