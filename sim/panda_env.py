"""The simulated Panda workcell: a task on the arena, as a `robolearn.robot.RobotEnv` with MuJoCo parts.

`make_panda_env` compiles the workcell with the task's objects, and composes the MuJoCo arm
backend, its cameras, the simulated reset and the task into the one robot env that hardware
uses too. The action convention is robolearn.robot.env's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from robolearn.controllers.impedance import ImpedanceConfig
from robolearn.robot.env import RobotEnv, RobotEnvConfig, check_config
from robolearn.sim.model import ASSETS, compile_spec, load_spec
from robolearn.sim.mujoco_arm import MujocoArm, MujocoCamera
from robolearn.sim.resets import ResetConfig, SimReset

TOOL_DOWN = RobotEnvConfig.tool_quat  # tcp z axis pointing at the table, fingers along world y

# The largest physics step the workcell stays accurate at: the scripted experts solve every task
# up to 5 ms, at 10 ms grasps and peg insertion fail (contacts, and joint limits held for two
# steps, too coarse), and at 100 ms the arm leaves the workspace box by up to a metre.
MAX_PHYSICS_DT = 0.005


@dataclass
class PandaEnvConfig(RobotEnvConfig):
    """The robot env's settings plus the simulator's: physics step, cameras, controller, reset."""

    physics_dt: float = 0.002
    pixels: bool = False
    cameras: tuple[str, ...] = ("front", "wrist")
    image_size: int = 128
    impedance: ImpedanceConfig = field(default_factory=ImpedanceConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    reset_from_demos: str | None = None  # dataset dir: start episodes from its demo states (sim/demo_state_reset.py)
    demo_state_prob: float = 0.5  # with reset_from_demos: the chance of a demo start, else the random reset


def check_panda_config(cfg: PandaEnvConfig, where: str) -> None:
    """check_config, then the simulator's fields: physics_dt divides the control period and is small
    enough (MAX_PHYSICS_DT) for stable contacts; ValueError names the field."""
    check_config(cfg, where)
    dt, period = cfg.physics_dt, 1.0 / cfg.control_hz
    if not 0 < dt <= MAX_PHYSICS_DT:
        raise ValueError(f"{where}: physics_dt must be in (0, {MAX_PHYSICS_DT}] s for stable contacts, got {dt!r}")
    substeps = max(1, round(period / dt))
    if abs(substeps * dt - period) > 1e-6 * period:
        raise ValueError(f"{where}: physics_dt {dt} s must divide the control period 1/control_hz = {period:g} s, "
                         f"e.g. {period / substeps:g} or {period / (substeps + 1):g}")
    if cfg.image_size < 1:
        raise ValueError(f"{where}: image_size must be positive, got {cfg.image_size}")


def make_panda_env(task, config: PandaEnvConfig | None = None, render_mode: str | None = None,
                   env_id: str | None = None) -> RobotEnv:
    """A Panda task in the workcell, ready to reset."""
    cfg, env_id = config or PandaEnvConfig(), env_id or type(task).__name__
    check_panda_config(cfg, env_id)  # before the model is compiled
    spec = load_spec(ASSETS / "workcell.xml")
    task.build(spec)
    arm = MujocoArm(compile_spec(spec, f"{env_id} scene"), cfg.control_hz, cfg.physics_dt, cfg.impedance, cfg.safety)
    cameras = {c: MujocoCamera(arm, c, cfg.image_size, env_id) for c in cfg.cameras} if cfg.pixels else {}
    resetter = SimReset(arm, task, cfg.reset, cfg.safety, cfg.tool_quat)
    env = RobotEnv(arm, task, resetter, cfg, cameras=cameras, viewer=MujocoCamera(arm, "front", 256, env_id),
                   render_mode=render_mode, env_id=env_id)
    if cfg.reset_from_demos:
        from robolearn.sim.demo_state_reset import use_demo_states
        use_demo_states(env, cfg.reset_from_demos, cfg.demo_state_prob)
    return env
