"""The simulated Panda workcell as a gymnasium env: a task on the arena, impedance-controlled.

One class for every Panda task. The task (robolearn.sim.tasks) adds its objects to the scene,
resets them, and scores the state; this class owns the robot, the controller, the safety
layer, rendering and the gymnasium contract. Actions are normalized end-effector deltas in
[-1, 1]: (dx, dy, dz[, gripper]) scaled to `action_scale` metres per step, with the tool kept
pointing down. Gripper +1 closes, -1 opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import mujoco
import numpy as np

from robolearn.controllers.impedance import ImpedanceConfig, configure_native, nullspace_posture_torque
from robolearn.controllers.kinematics import Arm
from robolearn.controllers.safety import SafetyConfig, clamp_tool_target, harden_joint_limits, require_shape
from robolearn.sim.gl import check_headless_context
from robolearn.sim.model import ASSETS, compile_spec, load_spec
from robolearn.sim.resets import ResetConfig, SimReset

ARM_JOINTS = tuple(f"joint{i}" for i in range(1, 8))
TOOL_DOWN = np.array([0.0, 1.0, 0.0, 0.0])  # tcp z axis pointing at the table, fingers along world y
FINGER_OPEN = 0.04


@dataclass
class PandaEnvConfig:
    """Timing, action scaling, observation and controller settings shared by Panda tasks."""

    control_hz: float = 10.0
    physics_dt: float = 0.002
    max_episode_steps: int = 100
    action_scale: float = 0.1  # metres per step at |action| = 1
    pixels: bool = False
    cameras: tuple[str, ...] = ("front", "wrist")
    image_size: int = 128
    reward_type: str = "dense"  # or "sparse"
    terminate_on_success: bool = True
    impedance: ImpedanceConfig = field(default_factory=ImpedanceConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)


class PandaEnv(gym.Env):
    """A Panda task in the workcell; see the module docstring for the action convention."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task, config: PandaEnvConfig | None = None, render_mode: str | None = None,
                 env_id: str | None = None):
        self.task, self.cfg, self.render_mode = task, config or PandaEnvConfig(), render_mode
        self.env_id = env_id or type(task).__name__
        cfg = self.cfg
        if cfg.reward_type not in ("dense", "sparse"):
            raise ValueError(f"{self.env_id}: reward_type must be 'dense' or 'sparse', got {cfg.reward_type!r}")
        spec = load_spec(ASSETS / "workcell.xml")
        task.build(spec)
        self.model = compile_spec(spec, f"{self.env_id} scene")
        self.model.opt.timestep = cfg.physics_dt
        self.data = mujoco.MjData(self.model)
        self.arm = Arm(self.model, ARM_JOINTS)
        configure_native(self.model, cfg.impedance)
        harden_joint_limits(self.model, self.model.dof_jntid[self.arm.dof_adr], cfg.safety)
        self.n_substeps = max(1, round(1.0 / (cfg.control_hz * cfg.physics_dt)))
        self._home = self.model.key("home").id
        self._gripper = self.model.actuator("gripper").id
        self._finger_adr = self.model.jnt_qposadr[[self.model.joint("finger_joint1").id,
                                                     self.model.joint("finger_joint2").id]]
        self._posture = self.model.key_qpos[self._home][self.arm.qpos_adr].copy()
        self.resetter = SimReset(self, cfg.reset)
        arm_dofs = slice(int(self.arm.dof_adr[0]), int(self.arm.dof_adr[-1]) + 1)
        self._bias, self._applied = self.data.qfrc_bias[arm_dofs], self.data.qfrc_applied[arm_dofs]
        self._hold = np.zeros(self.arm.n)

        self.action_dim = 4 if task.uses_gripper else 3
        self.action_space = gym.spaces.Box(-1.0, 1.0, (self.action_dim,), np.float32)
        self._renderer = None
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (self._state().shape[0],), np.float32),
                  "tcp_pose": gym.spaces.Box(-np.inf, np.inf, (7,), np.float32)}
        if cfg.pixels:
            for cam in cfg.cameras:
                if mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, cam) < 0:
                    raise ValueError(f"{self.env_id}: unknown camera {cam!r}; model cameras: "
                                     f"{[self.model.camera(i).name for i in range(self.model.ncam)]}")
                size = (cfg.image_size, cfg.image_size, 3)
                spaces[f"images/{cam}"] = gym.spaces.Box(0, 255, size, np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)
        self._steps = 0

    # -- robot state -----------------------------------------------------------------
    def tool_pos(self) -> np.ndarray:
        return self.data.site_xpos[self.arm.site_id].copy()

    def tool_vel(self) -> np.ndarray:
        return self.arm.jacobian(self.data)[:3] @ self.arm.dq(self.data)

    def gripper_width(self) -> float:
        return float(self.data.qpos[self._finger_adr].sum())

    def set_tool_target(self, pos: np.ndarray, quat: np.ndarray = TOOL_DOWN) -> None:
        self.data.mocap_pos[0], self.data.mocap_quat[0] = pos, quat

    def _state(self) -> np.ndarray:
        proprio = [self.tool_pos(), self.tool_vel(), [self.gripper_width()]]
        if not self.cfg.pixels:  # privileged object state only where there are no images
            proprio.append(self.task.object_state(self))
        return np.concatenate(proprio).astype(np.float32)

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {"state": self._state(),
               "tcp_pose": np.concatenate([self.tool_pos(), self.arm.tool_quat(self.data)]).astype(np.float32)}
        if self.cfg.pixels:
            for cam in self.cfg.cameras:
                obs[f"images/{cam}"] = self.render_camera(cam)
        return obs

    # -- rendering ---------------------------------------------------------------------
    def render_camera(self, camera: str, size: int | None = None) -> np.ndarray:
        size = size or self.cfg.image_size
        if self._renderer is None or self._renderer.height != size:
            if self._renderer is not None:
                self._renderer.close()
            check_headless_context()
            self._renderer = mujoco.Renderer(self.model, size, size)
        self._renderer.update_scene(self.data, camera=camera)
        return self._renderer.render()

    def render(self):
        if self.render_mode == "rgb_array":
            return self.render_camera("front", 256)
        return None

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    # -- gymnasium -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        info = self.resetter.reset(self.np_random)
        self._steps = 0
        return self._obs(), info

    def validate_action(self, action) -> np.ndarray:
        try:
            return require_shape(action, (self.action_dim,), f"{self.env_id} action")
        except ValueError as err:
            raise ValueError(f"{err} (action space {self.action_space})") from None

    def step(self, action):
        a = np.clip(self.validate_action(action), -1.0, 1.0)
        cur = self.tool_pos()
        target = clamp_tool_target(cur, cur + a[:3] * self.cfg.action_scale, self.cfg.safety)
        self.set_tool_target(target)
        if self.task.uses_gripper:
            self.data.ctrl[self._gripper] = FINGER_OPEN * (1.0 - a[3]) / 2.0
        self.simulate(self.n_substeps)
        self._steps += 1
        reward, success = self.task.score(self)
        if self.cfg.reward_type == "sparse":
            reward = float(success)
        terminated = bool(success and self.cfg.terminate_on_success)
        truncated = self._steps >= self.cfg.max_episode_steps
        return self._obs(), float(reward), terminated, truncated, {"success": bool(success)}

    def simulate(self, n: int) -> None:
        """Advance n physics steps; Coriolis/gravity compensation is applied between step1 and step2."""
        m, d = self.model, self.data
        # The posture term changes slowly, so it is computed once per control step and held.
        self._hold[:] = nullspace_posture_torque(self.arm, d, self._posture, self.cfg.impedance.nullspace_stiffness)
        for _ in range(n):
            mujoco.mj_step1(m, d)
            np.add(self._bias, self._hold, out=self._applied)
            mujoco.mj_step2(m, d)
