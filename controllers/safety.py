"""The safety layer every command path goes through, in simulation and on hardware.

Workspace box on the tool, a maximum step per command, joint position/velocity limits, and
rejection of non-finite numbers. Functions, not a class: each is called where its check
belongs and holds no state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from robolearn.controllers.rotations import orientation_error, quat_mul, rotvec_to_quat


class UnsafeCommandError(ValueError):
    """A command that must not reach the robot (non-finite, wrong shape)."""


@dataclass
class SafetyConfig:
    """Limits applied to every command; distances in metres, angles in radians."""

    workspace_low: tuple[float, float, float] = (0.2, -0.3, 0.0)
    workspace_high: tuple[float, float, float] = (0.6, 0.3, 0.5)
    max_translation_step: float = 0.1  # per command, from the current tool position
    max_rotation_step: float = 0.5  # per command, from the current tool orientation (clamp_tool_rotation)
    # A tool found outside the box (impedance tracking error at speed, friction on the table)
    # has the violated wall of the target box moved inward by this many times its overshoot.
    workspace_recovery_gain: float = 2.0
    joint_margin: float = 0.02  # joint targets, and the simulator's MuJoCo limits, this far inside the range
    joint_velocity_limit: tuple[float, ...] = (2.175, 2.175, 2.175, 2.175, 2.61, 2.61, 2.61)


def harden_joint_limits(model, joint_ids, cfg: SafetyConfig, timeconst: float | None = None) -> None:
    """Make MuJoCo's soft joint limits hold the model range: act joint_margin early, as stiff as stable.

    With MuJoCo's defaults (no margin, 20 ms) an impedance-driven arm pushed into a limit went up
    to 15 mrad past it, and a 10 ms constraint still let a folding elbow or wrist slam 26 mrad
    past it; a constraint of two physics steps (the stiffest MuJoCo integrates stably) acting
    joint_margin early holds the range (docs/controllers.md, "Known limits").
    """
    model.jnt_margin[joint_ids] = cfg.joint_margin
    model.jnt_solref[joint_ids] = (timeconst or 2.0 * model.opt.timestep, 1.0)


def require_finite(values, what: str) -> np.ndarray:
    """Return values as a float array, or raise naming `what` and the offending entries."""
    arr = np.asarray(values, dtype=float)
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = np.flatnonzero(bad).tolist() if arr.ndim <= 1 else [tuple(i) for i in np.argwhere(bad).tolist()]
        raise UnsafeCommandError(f"{what} contains NaN/inf at index {idx}: {arr.tolist()}")
    return arr


def require_shape(values, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Return values as a finite float array of exactly `shape`, or raise naming `what`."""
    arr = np.asarray(values)
    if arr.shape != shape:
        raise UnsafeCommandError(f"{what} must have shape {shape}, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise UnsafeCommandError(f"{what} must be numeric, got dtype {arr.dtype}")
    return require_finite(arr, what)


def clamp_tool_target(current_pos: np.ndarray, target_pos: np.ndarray, cfg: SafetyConfig) -> np.ndarray:
    """Limit the step from the current tool position, then clip into the workspace box.

    The box only bounds the target; the tool lags it. Where the tool is already outside, the
    violated wall moves inward by workspace_recovery_gain times the overshoot, so it is pulled back.
    """
    current = require_finite(current_pos, "current tool position")
    target = require_finite(target_pos, "tool target position")
    step = target - current
    norm = float(np.linalg.norm(step))
    if norm > cfg.max_translation_step:
        target = current + step * (cfg.max_translation_step / norm)
    low, high = np.asarray(cfg.workspace_low, dtype=float), np.asarray(cfg.workspace_high, dtype=float)
    gain = cfg.workspace_recovery_gain
    low_in = np.minimum(low + gain * np.maximum(low - current, 0.0), high)
    high_in = np.maximum(high - gain * np.maximum(current - high, 0.0), low)
    return np.clip(target, low_in, high_in)


def clamp_tool_rotation(current_quat: np.ndarray, target_quat: np.ndarray, cfg: SafetyConfig) -> np.ndarray:
    """Unit target quaternion at most max_rotation_step (rad) from the current tool orientation."""
    target = require_finite(target_quat, "tool target orientation")
    norm = float(np.linalg.norm(target))
    if norm < 1e-9:
        raise UnsafeCommandError(f"tool target orientation is not a rotation: {target.tolist()}")
    target = target / norm
    err = orientation_error(target, current_quat)
    angle = float(np.linalg.norm(err))
    if angle <= cfg.max_rotation_step:
        return target
    return quat_mul(rotvec_to_quat(err * (cfg.max_rotation_step / angle)), np.asarray(current_quat, dtype=float))


def clamp_joint_target(q: np.ndarray, q_target: np.ndarray, q_low: np.ndarray, q_high: np.ndarray,
                       dt: float, cfg: SafetyConfig) -> np.ndarray:
    """Joint position target within limits (less the margin) and reachable at the velocity limit."""
    q_target = require_finite(q_target, "joint target")
    vmax = np.asarray(cfg.joint_velocity_limit[: len(q)]) * dt
    q_target = np.clip(q_target, q - vmax, q + vmax)
    return np.clip(q_target, q_low + cfg.joint_margin, q_high - cfg.joint_margin)


def joint_limit_torque(q: np.ndarray, dq: np.ndarray, q_low: np.ndarray, q_high: np.ndarray,
                       margin: float, stiffness: float = 200.0, damping: float = 10.0) -> np.ndarray:
    """Repulsive torque that grows as a joint enters the margin before its limit (torque paths)."""
    tau = np.zeros_like(q)
    low_pen = (q_low + margin) - q
    high_pen = q - (q_high - margin)
    lo, hi = low_pen > 0, high_pen > 0
    tau[lo] = stiffness * low_pen[lo] - damping * np.minimum(dq[lo], 0.0)
    tau[hi] = -stiffness * high_pen[hi] - damping * np.maximum(dq[hi], 0.0)
    return tau
