"""Differential inverse kinematics (damped least squares) for position- or velocity-commanded arms.

For arms that take joint position or velocity commands rather than torques: ros2_control
forward position/velocity controllers, UR servoJ/speedJ behind a servoL-style interface.
Each cycle: twist = gain * pose error (clipped to a speed), dq = J^T (J J^T + lambda^2 I)^-1 twist
plus a posture pull in the Jacobian's nullspace, and the next joint target q + dq dt goes
through the safety layer (joint limits less margin, joint velocity limits).
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from robolearn.controllers.kinematics import Arm, clip_norm, pose_error
from robolearn.controllers.safety import SafetyConfig, clamp_joint_target, require_finite


@dataclass
class DiffIKConfig:
    """Servo gains (1/s), tool speed limits, least-squares damping and nullspace posture gain."""

    translation_gain: float = 10.0  # 1/s: commanded tool velocity per metre of error
    rotation_gain: float = 10.0  # 1/s: commanded angular velocity per radian of error
    max_linear_speed: float = 0.25  # m/s, norm of the commanded tool velocity
    max_angular_speed: float = 1.0  # rad/s, norm of the commanded angular velocity
    damping: float = 0.05  # lambda (m): trades accuracy for bounded joint speeds near singularities
    posture_gain: float = 1.0  # 1/s: joint velocity toward the posture, in the nullspace only


@dataclass
class DiffIKCommand:
    """One cycle's output: joint velocity (rad/s) and the next joint position target (rad)."""

    dq: np.ndarray
    q_target: np.ndarray


def arm_kinematics(arm: Arm, data: mujoco.MjData, q: np.ndarray) -> None:
    """Set the arm's joints in `data` to q and compute what the tool pose and Jacobian need."""
    data.qpos[arm.qpos_adr] = q
    mujoco.mj_kinematics(arm.model, data)
    mujoco.mj_comPos(arm.model, data)


def diff_ik(arm: Arm, data: mujoco.MjData, q: np.ndarray, target_pos: np.ndarray, target_quat: np.ndarray,
            dt: float, posture: np.ndarray | None = None, cfg: DiffIKConfig | None = None,
            safety: SafetyConfig | None = None) -> DiffIKCommand:
    """Joint velocity and next position target moving the tool toward the target pose over dt.

    `data` is scratch: its arm joints are set to the measured q (other joints keep their values).
    """
    cfg, safety = cfg or DiffIKConfig(), safety or SafetyConfig()
    q = require_finite(q, "measured joint positions")
    target_pos = require_finite(target_pos, "tool target position")
    target_quat = require_finite(target_quat, "tool target orientation")
    arm_kinematics(arm, data, q)
    jac = arm.jacobian(data)
    err = pose_error(arm, data, target_pos, target_quat)
    twist = np.concatenate([clip_norm(cfg.translation_gain * err[:3], cfg.max_linear_speed),
                            clip_norm(cfg.rotation_gain * err[3:], cfg.max_angular_speed)])
    jac_pinv = jac.T @ np.linalg.inv(jac @ jac.T + cfg.damping ** 2 * np.eye(6))
    dq = jac_pinv @ twist
    if posture is not None:
        dq_posture = cfg.posture_gain * (np.asarray(posture, dtype=float) - q)
        dq += dq_posture - jac_pinv @ (jac @ dq_posture)
    q_target = clamp_joint_target(q, q + dq * dt, arm.q_low, arm.q_high, dt, safety)
    return DiffIKCommand(dq=(q_target - q) / dt, q_target=q_target)
