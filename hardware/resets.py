"""Reset handlers for a real arm (numpy only): scripted, operator-confirmed and learned, chosen in YAML.

Each implements robolearn.robot.ResetHandler (`reset(rng) -> info`) over an ArmBackend, so the same
handler runs on the ROS arm and on the MuJoCo one. `make_reset` builds one from a task's
`reset: {type: scripted|operator|learned|demo_state, ...}` mapping; docs/resets.md lists the fields.
"""

from __future__ import annotations

import dataclasses
import os
import select
import sys
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from robolearn.config_check import check_value
from robolearn.controllers.rotations import orientation_error, quat_mul, rotvec_to_quat
from robolearn.robot.interfaces import ToolTarget

RESET_TYPES = ("scripted", "operator", "learned", "demo_state", "service")


# -- configs ---------------------------------------------------------------------------------

@dataclass
class ScriptedResetConfig:
    """SERL's reset: to home, then to home plus a uniform offset, with a full joint reset every N episodes."""

    home_pos: tuple[float, float, float] = (0.4, 0.0, 0.3)  # m, base frame
    home_quat: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 0.0)  # (w, x, y, z): tool pointing down
    xyz_range: tuple[float, float, float] = (0.05, 0.05, 0.0)  # m, offset uniform in [-r, r] per axis
    yaw_range: float = 0.0  # rad about world z; an xyz-mode env holds tool_quat, so only 6dof tasks want it
    duration: float = 1.5  # s for each leg (to home, then to the offset)
    settle: float = 0.5  # s holding the final target before the episode starts
    gripper: float | None = None  # action held during the reset (-1 open, +1 closed); None: leave it
    box_inset: float = 0.01  # m; the offset target is clipped this far inside the workspace box
    joint_reset_every: int = 0  # episodes; 0: never (SERL uses 200); needs an arm with move_joints
    home_joints: tuple[float, ...] = (0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785)  # rad, the Panda's home
    joint_reset_duration: float = 4.0  # s


@dataclass
class OperatorResetConfig:
    """Wait for an operator's confirmation (a key, or a std_srvs/Trigger service), after an optional inner reset."""

    confirm: str = "key"  # "key" (the terminal) or "trigger" (robolearn.ros.operator_reset, service `service`)
    service: str = "reset/confirm"
    timeout: float = 300.0  # s
    inner: dict | None = None  # a reset mapping run first (e.g. {type: scripted}); None: the operator resets


@dataclass
class LearnedResetConfig:
    """A backward policy undoes the task; the fallback reset runs when it does not succeed in max_steps."""

    checkpoint: str = ""  # the backward agent's starting weights (optional on a ROS robot, where a learner trains it)
    max_steps: int = 50
    fallback: dict = field(default_factory=lambda: {"type": "scripted"})
    # On a ROS robot (agent_node mode:=train): the backward agent is trained alongside the forward one, by a second
    # learner_node in `namespace` (its topics <namespace>/learner/...), on the backward task's reward:
    agent: str = "serl"
    namespace: str = "backward"
    reward: str = "task"  # task: the reset_task/reward and reset_task/success topics (the simulator's); classifier
    classifier: str = ""  # reward classifier folder (robolearn classifier train) for reward: classifier
    explore: bool = True  # sample the backward policy (it is learning); false: its mean action
    then: dict | None = None  # a reset after a successful backward episode (SERL moves the arm home in between)


@dataclass
class ServiceResetConfig:
    """Call a std_srvs/Trigger reset service: a simulator's, or a robot cell's own reset routine (ROS only)."""

    service: str = "reset"
    timeout: float = 30.0  # s for the service and for fresh state after it


@dataclass
class DemoStateResetConfig:
    """Simulation only: start episodes from states along recorded demonstrations (robolearn.sim.demo_state_reset)."""

    demos: str = ""  # dataset directory
    prob: float = 0.5  # chance of a demo start; otherwise the env's own reset


CONFIGS = {"scripted": ScriptedResetConfig, "operator": OperatorResetConfig, "learned": LearnedResetConfig,
           "service": ServiceResetConfig,
           "demo_state": DemoStateResetConfig}


def parse_config(spec: Mapping, where: str = "reset"):
    """The typed config a `{type: ..., fields}` mapping names; ValueError '<where>.<field>: ...' otherwise."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be a mapping with a 'type' ({'|'.join(RESET_TYPES)}), got {spec!r}")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in CONFIGS:
        raise ValueError(f"{where}.type must be one of {list(RESET_TYPES)}, got {kind!r}")
    cls = CONFIGS[kind]
    hints = typing.get_type_hints(cls)
    values = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for type {kind}; valid: {sorted(hints)}")
    for name, value in values.items():
        if hints[name] is dict or hints[name] == (dict | None):
            if value is not None or hints[name] is dict:
                parse_config(value, f"{where}.{name}")  # nested resets are checked now, not at the first episode
            continue
        check_value(value, hints[name], f"{where}.{name}")
        if isinstance(value, list):
            values[name] = tuple(value)
    cfg = cls(**values)
    _check_ranges(cfg, where)
    return cfg


def _check_ranges(cfg, where: str) -> None:
    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{where}.{name} must be {what}, got {getattr(cfg, name)!r}")
    if isinstance(cfg, ScriptedResetConfig):
        need(abs(np.linalg.norm(cfg.home_quat) - 1.0) < 1e-3, "home_quat", "a unit quaternion (w, x, y, z)")
        need(min(cfg.xyz_range) >= 0, "xyz_range", "three non-negative ranges (m)")
        need(cfg.yaw_range >= 0, "yaw_range", "non-negative (rad)")
        need(cfg.duration > 0, "duration", "positive (s)")
        need(cfg.settle >= 0, "settle", "zero or more (s)")
        need(cfg.gripper is None or -1 <= cfg.gripper <= 1, "gripper", "null or in [-1, 1]")
        need(cfg.box_inset >= 0, "box_inset", "zero or more (m)")
        need(cfg.joint_reset_every >= 0, "joint_reset_every", "zero (never) or a positive episode count")
        need(cfg.joint_reset_duration > 0, "joint_reset_duration", "positive (s)")
    elif isinstance(cfg, OperatorResetConfig):
        need(cfg.confirm in ("key", "trigger"), "confirm", "'key' or 'trigger'")
        need(cfg.timeout > 0, "timeout", "positive (s)")
        need(bool(cfg.service), "service", "a service name")
    elif isinstance(cfg, LearnedResetConfig):
        need(cfg.max_steps >= 1, "max_steps", "a positive step count")
        need(cfg.reward in ("task", "classifier"), "reward", "'task' or 'classifier'")
        need(cfg.reward != "classifier" or bool(cfg.classifier), "classifier", "a classifier folder for reward classifier")
        need(bool(cfg.namespace), "namespace", "a ROS namespace for the backward learner's topics")
    elif isinstance(cfg, ServiceResetConfig):
        need(bool(cfg.service), "service", "a service name")
        need(cfg.timeout > 0, "timeout", "positive (s)")
    elif isinstance(cfg, DemoStateResetConfig):
        need(bool(cfg.demos), "demos", "a dataset directory")
        need(0 <= cfg.prob <= 1, "prob", "in [0, 1]")


# -- scripted --------------------------------------------------------------------------------

def yaw_quat(quat, yaw: float) -> np.ndarray:
    """`quat` turned by `yaw` rad about the world z axis."""
    return quat_mul(rotvec_to_quat(np.array([0.0, 0.0, yaw])), np.asarray(quat, dtype=float))


class ScriptedReset:
    """Moves the tool along straight lines to home, then to home + a random offset; counts episodes for
    the periodic joint reset (arm.move_joints, robolearn.robot.interfaces.JointMover)."""

    def __init__(self, arm, cfg: ScriptedResetConfig | None = None, safety=None, where: str = "reset"):
        self.arm, self.cfg, self.safety = arm, cfg or ScriptedResetConfig(), safety
        cfg = self.cfg
        if cfg.joint_reset_every > 0 and not callable(getattr(arm, "move_joints", None)):
            raise ValueError(f"{where}.joint_reset_every is {cfg.joint_reset_every} but {type(arm).__name__} has no "
                             "move_joints(q, duration) (JointMover); set it to 0 or use an arm that moves joints")
        if cfg.joint_reset_every > 0 and len(cfg.home_joints) != len(arm.joint_names):
            raise ValueError(f"{where}.home_joints has {len(cfg.home_joints)} values, {type(arm).__name__} has "
                             f"{len(arm.joint_names)} joints {list(arm.joint_names)}")
        self.low, self.high = self._box()
        home = np.asarray(cfg.home_pos, dtype=float)
        if np.any(home < self.low) or np.any(home > self.high):
            raise ValueError(f"{where}.home_pos {list(cfg.home_pos)} is outside the workspace box "
                             f"{self.low.tolist()}..{self.high.tolist()} (box_inset {cfg.box_inset} m included)")
        self.episodes = 0  # resets done, for joint_reset_every

    def _box(self) -> tuple[np.ndarray, np.ndarray]:
        if self.safety is None:
            return np.full(3, -np.inf), np.full(3, np.inf)
        inset = self.cfg.box_inset
        return np.add(self.safety.workspace_low, inset), np.subtract(self.safety.workspace_high, inset)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """(clipped position offset, yaw) from `rng`; the target home + offset stays inside the box."""
        cfg = self.cfg
        r = np.asarray(cfg.xyz_range, dtype=float)
        home = np.asarray(cfg.home_pos, dtype=float)
        offset = np.clip(home + rng.uniform(-r, r), self.low, self.high) - home
        return offset, float(rng.uniform(-cfg.yaw_range, cfg.yaw_range)) if cfg.yaw_range > 0 else 0.0

    def move_to(self, pos, quat, duration: float) -> None:
        """Command a straight line (slerp in orientation) from the measured pose, then hold the goal for `settle`."""
        arm, cfg = self.arm, self.cfg
        start = arm.read()
        pos, quat = np.asarray(pos, dtype=float), np.asarray(quat, dtype=float)
        turn = orientation_error(quat, start.tool_quat)
        steps = max(1, round(duration * arm.control_hz))
        if self.safety is not None:  # never ask for more than the step limit per command (RosArm would clip it);
            # the smoothstep profile's steepest step is 1.5 times the mean one
            steps = max(steps, int(np.ceil(1.5 * np.linalg.norm(pos - start.tool_pos) / self.safety.max_translation_step)),
                        int(np.ceil(1.5 * np.linalg.norm(turn) / self.safety.max_rotation_step)))
        for i in range(1, steps + 1):
            s = i / steps
            s = s * s * (3 - 2 * s)  # smoothstep: start and end at rest
            arm.command(ToolTarget(start.tool_pos + s * (pos - start.tool_pos),
                                   quat_mul(rotvec_to_quat(s * turn), start.tool_quat), cfg.gripper))
            arm.wait()

    def hold_goal(self, pos, quat) -> None:
        for _ in range(round(self.cfg.settle * self.arm.control_hz)):
            self.arm.command(ToolTarget(np.asarray(pos, dtype=float), np.asarray(quat, dtype=float), self.cfg.gripper))
            self.arm.wait()

    def reset(self, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        self.episodes += 1
        joint_reset = cfg.joint_reset_every > 0 and self.episodes % cfg.joint_reset_every == 0
        if joint_reset:  # as SERL: every N-th reset first goes home in joint space, undoing posture drift
            self.arm.move_joints(np.asarray(cfg.home_joints, dtype=float), cfg.joint_reset_duration)
        offset, yaw = self.draw(rng)
        home = np.asarray(cfg.home_pos, dtype=float)
        goal_quat = yaw_quat(cfg.home_quat, yaw)
        self.move_to(home, cfg.home_quat, cfg.duration)
        self.move_to(home + offset, goal_quat, cfg.duration)
        self.hold_goal(home + offset, goal_quat)
        return {"reset": "scripted", "offset": offset.tolist(), "yaw": yaw, "joint_reset": joint_reset}


# -- operator --------------------------------------------------------------------------------

class KeyConfirm:
    """Confirmation by a key in the terminal (Enter, space or y), read without blocking from a tty."""

    KEYS = (b"\r", b"\n", b" ", b"y", b"Y")

    def __init__(self, fd: int | None = None, prompt: str = "reset: press Enter when the scene is ready",
                 out=None):
        self.fd = sys.stdin.fileno() if fd is None else int(fd)
        if not os.isatty(self.fd):
            raise ValueError("reset.confirm is 'key' but stdin is not a terminal (run in a terminal, tmux or "
                             "`ssh -t`, or use confirm: trigger)")
        self.prompt, self.out = prompt, out
        self.name = f"key on {os.ttyname(self.fd)}"

    def __call__(self, timeout: float) -> bool:
        import termios
        import tty

        saved = termios.tcgetattr(self.fd)
        try:
            tty.setcbreak(self.fd, termios.TCSANOW)  # keys arrive at once; Ctrl-C still interrupts
            termios.tcflush(self.fd, termios.TCIFLUSH)  # a key typed before the prompt does not confirm
            print(self.prompt, file=self.out or sys.stderr, flush=True)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if select.select([self.fd], [], [], min(left, 0.1))[0]:
                    data = os.read(self.fd, 64)
                    if not data:
                        return False  # the terminal closed
                    if any(k in data for k in self.KEYS):
                        return True
            return False
        finally:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def poll(self) -> bool:
        """Without a prompt or a wait: whether one of KEYS was typed since the last poll (a per-step check).

        The first poll keeps the terminal in cbreak mode, so a single key arrives between polls, until
        restore(); a __call__ meanwhile keeps it so."""
        import termios
        import tty

        if getattr(self, "_cooked", None) is None:
            self._cooked = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd, termios.TCSANOW)
        hit = False
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 64)
            if not data:
                break  # the terminal closed
            hit = hit or any(k in data for k in self.KEYS)
        return hit

    def restore(self) -> None:
        """The terminal's mode from before the first poll()."""
        import termios

        cooked, self._cooked = getattr(self, "_cooked", None), None
        if cooked is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, cooked)


class OperatorReset:
    """Runs `inner` (if any), then waits up to `timeout` s for `confirm(timeout) -> bool`; TimeoutError names it."""

    def __init__(self, confirm: Callable[[float], bool], inner=None, timeout: float = 300.0, arm=None):
        self.confirm, self.inner, self.timeout, self.arm = confirm, inner, float(timeout), arm

    @property
    def source(self) -> str:
        return str(getattr(self.confirm, "name", getattr(self.confirm, "__name__", type(self.confirm).__name__)))

    def reset(self, rng: np.random.Generator) -> dict:
        info = dict(self.inner.reset(rng) or {}) if self.inner is not None else {}
        if self.arm is not None:
            self.arm.hold()  # hold still while the operator works (ROS: the controller keeps the last target)
        t = time.monotonic()
        if not self.confirm(self.timeout):
            raise TimeoutError(f"operator reset: no confirmation from {self.source} within {self.timeout:g} s")
        return {**info, "reset": "operator", "inner": info.get("reset"), "waited": round(time.monotonic() - t, 3)}


# -- learned ---------------------------------------------------------------------------------

class LearnedReset:
    """A backward policy runs until `success(obs)` or `max_steps`; then `fallback` (a scripted reset) if it failed.

    `env` needs RobotEnv's halves of a step: observe() and apply(action), and arm.wait()."""

    def __init__(self, policy: Callable[[dict], np.ndarray], env, success: Callable[[dict], bool],
                 max_steps: int = 50, fallback=None):
        self.policy, self.env, self.success, self.max_steps, self.fallback = policy, env, success, max_steps, fallback

    def reset(self, rng: np.random.Generator) -> dict:
        if hasattr(self.policy, "reset"):
            self.policy.reset()
        obs, steps = self.env.observe(), 0
        while not self.success(obs) and steps < self.max_steps:
            self.env.apply(self.policy(obs))
            self.env.arm.wait()
            obs, steps = self.env.observe(), steps + 1
        ok = bool(self.success(obs))
        info = {"reset": "learned", "steps": steps, "backward_success": ok}
        if not ok and self.fallback is not None:
            info["fallback"] = self.fallback.reset(rng)
        return info


# -- the factory -----------------------------------------------------------------------------

def load_reset_spec(path: str | os.PathLike) -> tuple[dict, str]:
    """The `reset:` mapping of a task YAML file and the `where` its errors name ("FILE: reset")."""
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the reset config ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict) or "reset" not in doc:
        raise ValueError(f"{path}: no 'reset' mapping (reset: {{type: {'|'.join(RESET_TYPES)}, ...}})")
    return doc["reset"], f"{path}: reset"


def make_reset(spec: Mapping | Any, arm=None, *, where: str = "reset", safety=None, confirm=None, env=None,
               policy=None, success=None):
    """The ResetHandler a `{type: ..., fields}` mapping chooses (or an already typed config).

    arm/safety: the arm backend and the env's SafetyConfig (scripted); confirm: a `(timeout) -> bool` source
    (operator; the terminal's keys when omitted and confirm is 'key'; robolearn.ros.operator_reset for
    'trigger'); env, policy, success: the RobotEnv, backward policy and its success predicate (learned);
    env: a MuJoCo RobotEnv (demo_state). Every field is checked before anything moves."""
    cfg = spec if dataclasses.is_dataclass(spec) else parse_config(spec, where)
    if isinstance(cfg, ScriptedResetConfig):
        if arm is None:
            raise ValueError(f"{where}: a scripted reset needs the arm backend (arm=)")
        return ScriptedReset(arm, cfg, safety, where)
    if isinstance(cfg, OperatorResetConfig):
        inner = None if cfg.inner is None else make_reset(cfg.inner, arm, where=f"{where}.inner", safety=safety,
                                                          env=env, policy=policy, success=success)
        if confirm is None:
            if cfg.confirm == "trigger":
                raise ValueError(f"{where}.confirm is 'trigger': build the service source with "
                                 f"robolearn.ros.operator_reset.TriggerConfirm(node, {cfg.service!r}) and pass confirm=")
            confirm = KeyConfirm()
        return OperatorReset(confirm, inner, cfg.timeout, arm)
    if isinstance(cfg, LearnedResetConfig):
        if policy is None or env is None or success is None:
            raise ValueError(f"{where}: a learned reset needs the backward policy, the env and a success predicate "
                             f"(policy=, env=, success=; load reset.checkpoint {cfg.checkpoint!r} for the policy)")
        fallback = make_reset(cfg.fallback, arm if arm is not None else env.arm, where=f"{where}.fallback",
                              safety=safety, confirm=confirm)
        return LearnedReset(policy, env, success, cfg.max_steps, fallback)
    if isinstance(cfg, DemoStateResetConfig):
        if env is None or not hasattr(getattr(env, "unwrapped", env).arm, "model"):
            raise ValueError(f"{where}.type demo_state is for simulation: pass the MuJoCo env (env=), or set the env "
                             "option reset_from_demos=DIR")
        from robolearn.sim.demo_state_reset import use_demo_states  # simulation only: MuJoCo loads here alone
        return use_demo_states(env, cfg.demos, cfg.prob)
    if isinstance(cfg, ServiceResetConfig):
        raise ValueError(f"{where}.type service calls a ROS service: agent_node and record_node build it "
                         "(robolearn.ros.robot_params.make_resetter)")
    raise TypeError(f"{where}: {type(cfg).__name__} is not a reset config")
