"""Handles to one arm inside a MuJoCo model, and the tool-site pose, Jacobian and pose error."""

from __future__ import annotations

from dataclasses import dataclass, field

import mujoco
import numpy as np

from robolearn.controllers.rotations import orientation_error


@dataclass
class Arm:
    """Indices of an arm's joints, actuators and tool site in a compiled model."""

    model: mujoco.MjModel
    joints: tuple[str, ...]
    site: str = "tcp"
    qpos_adr: np.ndarray = field(init=False)
    dof_adr: np.ndarray = field(init=False)
    actuator_ids: np.ndarray = field(init=False)
    site_id: int = field(init=False)
    q_low: np.ndarray = field(init=False)
    q_high: np.ndarray = field(init=False)
    torque_limit: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        m = self.model
        try:
            ids = [m.joint(name).id for name in self.joints]
            self.site_id = m.site(self.site).id
        except KeyError as err:
            raise ValueError(f"arm model lacks {err}; joints={self.joints}, site={self.site!r}") from None
        self.qpos_adr = m.jnt_qposadr[ids].copy()
        self.dof_adr = m.jnt_dofadr[ids].copy()
        self.q_low, self.q_high = m.jnt_range[ids, 0].copy(), m.jnt_range[ids, 1].copy()
        # Actuator driving each joint (torque motors in sim; absent in kinematic-only uses).
        by_joint = {int(m.actuator_trnid[a, 0]): a for a in range(m.nu)
                    if m.actuator_trntype[a] == mujoco.mjtTrn.mjTRN_JOINT}
        self.actuator_ids = np.array([by_joint.get(j, -1) for j in ids])
        lim = [m.actuator_ctrlrange[a, 1] if a >= 0 else np.inf for a in self.actuator_ids]
        self.torque_limit = np.asarray(lim, dtype=float)
        self._jac = np.zeros((6, m.nv))

    @property
    def n(self) -> int:
        return len(self.joints)

    def q(self, data: mujoco.MjData) -> np.ndarray:
        return data.qpos[self.qpos_adr]

    def dq(self, data: mujoco.MjData) -> np.ndarray:
        return data.qvel[self.dof_adr]

    def tool_pos(self, data: mujoco.MjData) -> np.ndarray:
        return data.site_xpos[self.site_id].copy()

    def tool_quat(self, data: mujoco.MjData) -> np.ndarray:
        quat = np.empty(4)
        mujoco.mju_mat2Quat(quat, data.site_xmat[self.site_id])
        return quat

    def jacobian(self, data: mujoco.MjData) -> np.ndarray:
        """6 x n geometric Jacobian (linear; angular) of the tool site over the arm's joints."""
        mujoco.mj_jacSite(self.model, data, self._jac[:3], self._jac[3:], self.site_id)
        return self._jac[:, self.dof_adr]


def pose_error(arm: Arm, data: mujoco.MjData, target_pos: np.ndarray, target_quat: np.ndarray) -> np.ndarray:
    """6-vector (position; rotation vector) that takes the tool site to the target pose, world axes."""
    err = np.empty(6)
    err[:3] = np.asarray(target_pos, dtype=float) - data.site_xpos[arm.site_id]
    err[3:] = orientation_error(np.asarray(target_quat, dtype=float), arm.tool_quat(data))
    return err


def quat_to_mat(quat: np.ndarray) -> np.ndarray:
    """3 x 3 rotation matrix of a (w, x, y, z) quaternion, normalized first as MuJoCo does for mocap."""
    q = np.asarray(quat, dtype=float)
    mat = np.empty(9)
    mujoco.mju_quat2Mat(mat, q / np.linalg.norm(q))
    return mat.reshape(3, 3)


def clip_norm(vec: np.ndarray, max_norm: float) -> np.ndarray:
    norm = float(np.linalg.norm(vec))
    return vec * (max_norm / norm) if norm > max_norm else vec
