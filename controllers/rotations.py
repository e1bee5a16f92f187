"""Quaternion (w, x, y, z) and rotation-vector math in plain numpy, for code that runs without MuJoCo.

The ROS nodes and the robot env map actions to targets with these; MuJoCo's mju_* functions
compute the same quantities inside the simulator.
"""

from __future__ import annotations

import numpy as np


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product a * b (apply b, then a)."""
    aw, ax, ay, az = a
    bw, bx, by, bz = b
    return np.array([aw * bw - ax * bx - ay * by - az * bz,
                     aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw])


def quat_conj(q: np.ndarray) -> np.ndarray:
    return np.array([q[0], -q[1], -q[2], -q[3]])


def quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    """Rotation vector (axis times angle, angle in [0, pi]) of a unit quaternion."""
    q = np.asarray(q, dtype=float)
    if q[0] < 0:  # shortest way round
        q = -q
    sin_half = float(np.linalg.norm(q[1:]))
    if sin_half < 1e-12:
        return 2.0 * q[1:]
    return q[1:] * (2.0 * np.arctan2(sin_half, q[0]) / sin_half)


def rotvec_to_quat(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([1.0, *(0.5 * v)])
    return np.array([np.cos(angle / 2), *(v * (np.sin(angle / 2) / angle))])


def orientation_error(target_quat: np.ndarray, current_quat: np.ndarray) -> np.ndarray:
    """World-frame rotation vector that turns current_quat into target_quat."""
    return quat_to_rotvec(quat_mul(np.asarray(target_quat, dtype=float), quat_conj(np.asarray(current_quat, dtype=float))))
