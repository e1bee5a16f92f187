"""The one gymnasium env for every robot: an arm backend, cameras, a reset handler and a task.

The action mapping (normalized end-effector delta -> safety layer -> target) and the observation
layout live here once, so the simulator and a ROS 2 arm cannot drift. Actions are in [-1, 1]:
`xyz` mode (dx, dy, dz[, gripper]) with the tool kept at `tool_quat`; `6dof` mode
(dx, dy, dz, rx, ry, rz[, gripper]), the rotation vector scaled to `rotation_scale` rad per step
and applied in the world frame. Gripper +1 closes, -1 opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from robolearn.controllers.rotations import quat_mul, rotvec_to_quat
from robolearn.config_check import check_fields
from robolearn.controllers.safety import SafetyConfig, clamp_tool_rotation, clamp_tool_target, require_shape
from robolearn.robot.interfaces import ArmBackend, ArmState, Camera, ResetHandler, Task, ToolTarget

ACTION_MODES = ("xyz", "6dof")


@dataclass
class RobotEnvConfig:
    """Timing, action scaling and episode settings shared by every backend."""

    control_hz: float = 10.0
    max_episode_steps: int = 100
    action_mode: str = "xyz"  # or "6dof"
    action_scale: float = 0.1  # metres per step at |action| = 1
    rotation_scale: float = 0.1  # rad per step at |action| = 1 ("6dof" only)
    tool_quat: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 0.0)  # held in "xyz" mode: tool z down
    reward_type: str = "dense"  # or "sparse"
    terminate_on_success: bool = True
    safety: SafetyConfig = field(default_factory=SafetyConfig)


def check_config(cfg: RobotEnvConfig, where: str) -> None:
    """Types of every field, then the robot-level ranges; ValueError names the field."""
    check_fields(cfg, where)
    if cfg.reward_type not in ("dense", "sparse"):
        raise ValueError(f"{where}: reward_type must be 'dense' or 'sparse', got {cfg.reward_type!r}")
    if cfg.action_mode not in ACTION_MODES:
        raise ValueError(f"{where}: action_mode must be one of {ACTION_MODES}, got {cfg.action_mode!r}")
    for name in ("control_hz", "action_scale", "rotation_scale"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{where}: {name} must be positive, got {getattr(cfg, name)!r}")
    if cfg.max_episode_steps < 1:
        raise ValueError(f"{where}: max_episode_steps must be at least 1, got {cfg.max_episode_steps!r}")
    if abs(float(np.linalg.norm(cfg.tool_quat)) - 1.0) > 1e-3:
        raise ValueError(f"{where}: tool_quat must be a unit quaternion (w, x, y, z), got {list(cfg.tool_quat)}")


def action_dim(cfg: RobotEnvConfig, uses_gripper: bool) -> int:
    return (6 if cfg.action_mode == "6dof" else 3) + int(uses_gripper)


def action_to_target(action: np.ndarray, state: ArmState, cfg: RobotEnvConfig, uses_gripper: bool) -> ToolTarget:
    """The safety-limited tool target for a clipped, validated action from the measured state."""
    pos = clamp_tool_target(state.tool_pos, state.tool_pos + action[:3] * cfg.action_scale, cfg.safety)
    if cfg.action_mode == "6dof":
        turn = rotvec_to_quat(action[3:6] * cfg.rotation_scale)
        quat = clamp_tool_rotation(state.tool_quat, quat_mul(turn, state.tool_quat), cfg.safety)
    else:
        quat = np.asarray(cfg.tool_quat, dtype=float)
    return ToolTarget(pos, quat, float(action[-1]) if uses_gripper else None)


class RobotEnv(gym.Env):
    """A task on an arm backend with cameras; see the module docstring for the action convention."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, arm: ArmBackend, task: Task, resetter: ResetHandler, config: RobotEnvConfig | None = None,
                 cameras: dict[str, Camera] | None = None, viewer: Camera | None = None,
                 render_mode: str | None = None, env_id: str | None = None):
        self.arm, self.task, self.resetter = arm, task, resetter
        self.cfg, self.cameras, self.viewer = config or RobotEnvConfig(), dict(cameras or {}), viewer
        self.render_mode, self.env_id = render_mode, env_id or type(task).__name__
        check_config(self.cfg, self.env_id)
        self.metadata = {**self.metadata, "render_fps": self.cfg.control_hz}
        self.action_dim = action_dim(self.cfg, task.uses_gripper)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)
        # Privileged object state only where there are no images, as in SERL's state tasks.
        self._object_dim = 0 if self.cameras else len(task.object_state(arm))
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (7 + self._object_dim,), np.float32),
                  "tcp_pose": gym.spaces.Box(-np.inf, np.inf, (7,), np.float32)}
        for name, cam in self.cameras.items():
            spaces[f"images/{name}"] = gym.spaces.Box(0, 255, tuple(cam.shape), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self.elapsed_steps = 0
        self.state: ArmState | None = None  # the state the last observation was built from

    @property
    def joint_names(self) -> tuple[str, ...]:
        return tuple(self.arm.joint_names)

    # -- the two halves of a step, also used by the ROS agent node on its own timer ----------
    def observe(self) -> dict[str, np.ndarray]:
        """Read the newest state (and frames) and build the observation."""
        s = self.state = self.arm.read()
        parts = [s.tool_pos, s.tool_vel, [s.gripper]]
        if not self.cameras:
            parts.append(self.task.object_state(self.arm))
        obs = {"state": np.concatenate(parts).astype(np.float32), "tcp_pose": s.tool_pose.astype(np.float32)}
        for name, cam in self.cameras.items():
            obs[f"images/{name}"] = cam.read()[0]
        return obs

    def validate_action(self, action) -> np.ndarray:
        try:
            return require_shape(action, (self.action_dim,), f"{self.env_id} action")
        except ValueError as err:
            raise ValueError(f"{err} (action space {self.action_space})") from None

    def apply(self, action) -> ToolTarget:
        """Map an action through the safety layer to a target and send it; returns the target."""
        a = np.clip(self.validate_action(action), -1.0, 1.0)
        target = action_to_target(a, self.arm.read(), self.cfg, self.task.uses_gripper)
        self.arm.command(target)
        return target

    # -- gymnasium ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        info = self.resetter.reset(self.np_random) or {}
        self.elapsed_steps = 0
        return self.observe(), info

    def step(self, action):
        self.apply(action)
        self.arm.wait()
        obs = self.observe()  # may raise StaleStateError: then this step did not happen
        self.elapsed_steps += 1
        reward, success = self.task.score(self.arm)
        if self.cfg.reward_type == "sparse":
            reward = float(success)
        terminated = bool(success and self.cfg.terminate_on_success)
        truncated = self.elapsed_steps >= self.cfg.max_episode_steps
        return obs, float(reward), terminated, truncated, {"success": bool(success)}

    def render(self):
        if self.render_mode == "rgb_array" and self.viewer is not None:
            return self.viewer.read()[0]
        return None

    def close(self):
        for part in (*self.cameras.values(), self.viewer, self.arm):
            if part is not None and hasattr(part, "close"):
                part.close()
