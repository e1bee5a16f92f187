"""dm_control suite tasks as gymnasium envs with DrQ-v2's pixel protocol (Yarats et al. 2021).

84x84 RGB from camera 0 (2 for quadruped), action repeat 2 with summed rewards, 3 stacked frames,
actions in [-1, 1]: the settings of facebookresearch/drqv2, so returns compare with the paper.
"""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# The parent package robolearn.sim has already set MUJOCO_GL before this import runs.
from dm_control import suite


def _suite_names() -> dict[str, tuple[str, str]]:
    # "<domain>_<task>" with the full dm_control domain name: matching whole (domain, task) pairs
    # is unambiguous for ball_in_cup, point_mass and humanoid_CMU alike. lqr is left out: its
    # actions are unbounded (+-1e10) and its episodes have no time limit, so [-1, 1] actions and
    # 1000-step episodes mean nothing there.
    return {f"{d}_{t}": (d, t) for d, t in suite.ALL_TASKS if d != "lqr"}


_TASKS = _suite_names()
# DrQ-v2's configs call ball_in_cup "cup" (cfgs/task/cup_catch.yaml); accept its names too.
_ALIASES = {"cup_catch": "ball_in_cup_catch"}
DMC_TASK_NAMES: list[str] = sorted(_TASKS)
# DrQ-v2 uses 2 for every task (cfgs/config.yaml); edit an entry to change one task's default.
DEFAULT_ACTION_REPEAT: dict[str, int] = {name: 2 for name in DMC_TASK_NAMES}


def env_id(task: str) -> str:
    """The gymnasium id under which the registry registers `task`."""
    return f"robolearn/dmc-{task}-v0"


def parse_task(task: str) -> tuple[str, str]:
    """Map a name like "ball_in_cup_catch" to dm_control's ("ball_in_cup", "catch")."""
    name = _ALIASES.get(task, task)
    if name not in _TASKS:
        valid = ", ".join(DMC_TASK_NAMES)
        raise ValueError(f"unknown dm_control task {task!r}; valid tasks: {valid}")
    return _TASKS[name]


class DMCEnv(gym.Env):
    """A dm_control suite task seen through pixels.

    Dict obs {"images/pixels": uint8 HWC frame stack, "state": float32}; actions in [-1, 1].
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(
        self,
        task: str = "cartpole_swingup",
        *,
        image_size: int = 84,
        frame_stack: int = 3,
        action_repeat: int | None = None,
        seed: int | None = None,
        camera_id: int | None = None,
        render_mode: str | None = None,
        time_limit: float | None = None,
        shadow_size: int | None = None,
    ):
        domain, task_name = parse_task(task)
        self.task = _ALIASES.get(task, task)
        self._name = name = f"DMCEnv({self.task})"
        sizes = dict(image_size=image_size, frame_stack=frame_stack, action_repeat=action_repeat,
                     shadow_size=shadow_size)
        for label, value in sizes.items():
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name}: {label} must be a positive int, got {value!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"{name}: render_mode must be None or 'rgb_array': {render_mode!r}")
        self.image_size, self.frame_stack = int(image_size), int(frame_stack)
        self.render_mode = render_mode
        if action_repeat is None:
            action_repeat = DEFAULT_ACTION_REPEAT.get(self.task, 2)
        self.action_repeat = int(action_repeat)
        # DrQ-v2 zooms in on the quadruped with camera 2; every other domain uses camera 0.
        self.camera_id = camera_id if camera_id is not None else (2 if domain == "quadruped" else 0)

        task_kwargs: dict = {"random": seed}
        if time_limit is not None:  # seconds of dm_control time; suite default: 1000 control steps
            task_kwargs["time_limit"] = time_limit
        self._env = suite.load(domain, task_name, task_kwargs=task_kwargs, visualize_reward=False)
        if shadow_size is not None:  # before the first render, which sizes the shadow map (docs/dmc.md)
            self._env.physics.model.vis.quality.shadowsize = int(shadow_size)

        spec = self._env.action_spec()
        lo, hi = np.asarray(spec.minimum, np.float64), np.asarray(spec.maximum, np.float64)
        assert np.all(np.isfinite(lo) & np.isfinite(hi) & (lo < hi)), f"{self.task}: action bounds"
        # Affine map from [-1, 1] onto the spec bounds (quadruped's are asymmetric), as drqv2 does.
        self._act_mid = np.broadcast_to((hi + lo) / 2, spec.shape)
        self._act_half = np.broadcast_to((hi - lo) / 2, spec.shape)
        self._act_dtype = spec.dtype
        self.action_space = spaces.Box(-1.0, 1.0, shape=spec.shape, dtype=np.float32)

        state_dim = sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values())
        pix_shape = (self.image_size, self.image_size, 3 * self.frame_stack)
        self.observation_space = spaces.Dict({
            "images/pixels": spaces.Box(0, 255, shape=pix_shape, dtype=np.uint8),
            "state": spaces.Box(-np.inf, np.inf, shape=(state_dim,), dtype=np.float32),
        })
        agent_dt = self._env.control_timestep() * self.action_repeat
        self.metadata = {**self.metadata, "render_fps": round(1.0 / agent_dt)}
        self._frames: deque[np.ndarray] = deque(maxlen=self.frame_stack)
        self._done = True

    @property
    def physics(self):
        """The dm_control physics (time, named data), for inspection."""
        return self._env.physics

    def _render(self) -> np.ndarray:
        size = self.image_size
        return self._env.physics.render(height=size, width=size, camera_id=self.camera_id)

    def _obs(self, dm_obs) -> dict[str, np.ndarray]:
        state = np.concatenate([np.asarray(dm_obs[k], np.float64).ravel() for k in sorted(dm_obs)])
        pixels = np.concatenate(self._frames, axis=-1)
        return {"images/pixels": pixels, "state": state.astype(np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            # Reseeding the task's RandomState in place gives the same initial state as loading
            # with task_kwargs={"random": seed}, without rebuilding the model.
            self._env.task.random.seed(seed)
        ts = self._env.reset()
        frame = self._render()
        for _ in range(self.frame_stack):  # a fresh stack holds k copies of the first frame
            self._frames.append(frame)
        self._done = False
        return self._obs(ts.observation), {"discount": 1.0}

    def step(self, action):
        if self._done:
            raise RuntimeError(f"{self._name}: no episode is running; call reset() first")
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.action_space.shape or not np.all(np.isfinite(a)):
            raise ValueError(
                f"{self._name}: expected a finite action of shape {self.action_space.shape}, "
                f"got shape {a.shape} with values {np.array2string(a, threshold=8)}"
            )
        # Exploration noise may overshoot [-1, 1] a little; clip rather than pass it to the motors.
        ctrl = (self._act_mid + self._act_half * np.clip(a, -1.0, 1.0)).astype(self._act_dtype)
        reward = 0.0
        for _ in range(self.action_repeat):
            ts = self._env.step(ctrl)
            reward += ts.reward or 0.0
            if ts.last():
                break
        # Only the frame after the last repeat is seen, as in drqv2's pixel wrapper.
        self._frames.append(self._render())
        discount = float(ts.discount) if ts.discount is not None else 1.0
        # dm_control ends by time with discount 1 (bootstrap: truncated) and by failure with 0.
        terminated = bool(ts.last() and discount == 0.0)
        truncated = bool(ts.last() and not terminated)
        self._done = ts.last()
        obs = self._obs(ts.observation)
        return obs, float(reward), terminated, truncated, {"discount": discount}

    def render(self):
        """The newest single RGB frame (H, W, 3) in "rgb_array" mode, else None."""
        if self.render_mode != "rgb_array":
            return None
        return self._frames[-1].copy() if self._frames else self._render()

    def close(self):
        # physics.free releases the GL context, which otherwise lives until garbage collection.
        if getattr(self, "_env", None) is not None:
            self._env.physics.free()
            self._env = None
