"""Teleoperation devices behind one interface, registered by name (docs/teleop.md).

A device turns what an operator (or a script) does into a `TeleopInput`: a normalized
end-effector motion (dx, dy, dz) in [-1, 1], an optional gripper command (+1 close, -1 open,
None: leave it as it is), recorder events (start/stop, success, failure, discard, quit) and
whether it is connected. Shaping (deadzone, scale, axis locks) is `shape_motion`, one pure
function shared by every device; each device module only maps its raw readings.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# Recorder events a device may emit.
START_STOP, SUCCESS, FAILURE, DISCARD, QUIT = "start_stop", "success", "failure", "discard", "quit"
EVENTS = (START_STOP, SUCCESS, FAILURE, DISCARD, QUIT)

# name -> "module:Class"; modules are imported only when their device is made, so optional
# libraries (pygame, hidapi, rclpy) are needed only by the device that uses them.
DEVICES: dict[str, str] = {
    "keyboard": "robolearn.demos.teleop_keyboard:KeyboardDevice",
    "gamepad": "robolearn.demos.teleop_gamepad:GamepadDevice",
    "spacemouse": "robolearn.demos.teleop_spacemouse:SpaceMouseDevice",
    "ros": "robolearn.ros.teleop_device:RosTopicDevice",
    "scripted": "robolearn.demos.teleop_scripted:ScriptedDevice",
}


class TeleopError(Exception):
    """A device that cannot be used as asked: missing package, no hardware, not a terminal."""


class UnknownDeviceError(ValueError):
    """A device name that is not registered."""


@dataclass
class TeleopConfig:
    """How raw device readings become actions; every device takes one."""

    scale: float = 1.0                      # multiplies every motion axis
    axis_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per axis (x, y, z), after `scale`
    deadzone: float = 0.0                   # |raw| at or below this reads as 0; the rest is rescaled to [0, 1]
    lock: str = ""                          # axes held at zero: letters of "xyzg" ("z": planar, "g": gripper)
    timeout_s: float = 0.5                  # streaming devices: no message for this long = disconnected

    def __post_init__(self):
        if isinstance(self.lock, (list, tuple)):
            self.lock = "".join(self.lock)
        self.lock = str(self.lock).lower()
        bad = sorted(set(self.lock) - set("xyzg"))
        if bad:
            raise ValueError(f"teleop lock: unknown axis {''.join(bad)!r}; use letters of 'xyzg' "
                             "(x, y, z motion; g gripper), e.g. lock=z for planar motion")
        if not isinstance(self.axis_scale, (list, tuple)) or len(self.axis_scale) != 3:
            raise ValueError(f"teleop axis_scale needs 3 values (x, y, z), got {self.axis_scale!r}")
        self.axis_scale = tuple(_number("axis_scale", v) for v in self.axis_scale)
        self.scale, self.deadzone, self.timeout_s = (_number(name, getattr(self, name))
                                                     for name in ("scale", "deadzone", "timeout_s"))
        if not 0.0 <= self.deadzone < 1.0:
            raise ValueError(f"teleop deadzone must be in [0, 1), got {self.deadzone}")
        if self.timeout_s <= 0:
            raise ValueError(f"teleop timeout_s must be positive, got {self.timeout_s}")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"teleop {name} must be a number, got {value!r}")
    return float(value)


@dataclass
class TeleopInput:
    """One reading: shaped motion, gripper command, recorder events, connection state."""

    motion: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    gripper: float | None = None
    events: tuple[str, ...] = ()
    connected: bool = True
    reason: str = ""  # why it is not connected
    held: tuple[int, ...] = ()  # raw indices of the buttons held down now (devices with buttons)

    @property
    def active(self) -> bool:
        """The operator is commanding something now (intervention mode hands control over)."""
        return bool(np.any(self.motion != 0.0)) or self.gripper is not None

    def takes_over(self, button: int) -> bool:
        """Whether the operator has control: while `button` is held (a dead-man switch), or, for button -1,
        whenever they command something (HIL-SERL's rule)."""
        return self.connected and (self.active if button < 0 else button in self.held)

    def action(self, gripper_now: float, dim: int = 4) -> np.ndarray:
        """The env action: motion plus this reading's gripper command, or `gripper_now` without one."""
        g = gripper_now if self.gripper is None else self.gripper
        return np.append(self.motion, np.float32(g)).astype(np.float32)[:dim]


def shape_motion(raw: Sequence[float], cfg: TeleopConfig) -> np.ndarray:
    """Deadzone (rescaled so output starts at 0 past it), scale, axis locks, clip to [-1, 1]."""
    v = np.clip(np.asarray(raw, dtype=np.float64).reshape(3), -1.0, 1.0)
    mag = np.abs(v)
    v = np.where(mag <= cfg.deadzone, 0.0, np.sign(v) * (mag - cfg.deadzone) / (1.0 - cfg.deadzone))
    v = v * cfg.scale * np.asarray(cfg.axis_scale)
    for i, axis in enumerate("xyz"):
        if axis in cfg.lock:
            v[i] = 0.0
    return np.clip(v, -1.0, 1.0).astype(np.float32)


def held_buttons(buttons: Sequence[int]) -> tuple[int, ...]:
    """Indices of the buttons pressed in a raw button array."""
    return tuple(i for i, b in enumerate(buttons) if b)


def button_edges(buttons: Sequence[int], previous: Sequence[int], mapping: Mapping[str, int]) -> list[str]:
    """Names in `mapping` (name -> button index) whose button went from released to pressed."""
    def pressed(seq, i):
        return 0 <= i < len(seq) and bool(seq[i])
    return [name for name, i in mapping.items() if pressed(buttons, i) and not pressed(previous, i)]


def default_buttons() -> dict[str, int]:
    """Button index per command for an Xbox-style pad as SDL and ROS joy drivers number it."""
    return {START_STOP: 0, FAILURE: 1, DISCARD: 2, SUCCESS: 3, "open": 4, "close": 5, QUIT: 7}


def split_buttons(names: Iterable[str]) -> tuple[float | None, tuple[str, ...]]:
    """Button names -> (gripper command from 'close'/'open', recorder events)."""
    gripper, events = None, []
    for name in names:
        if name == "close":
            gripper = 1.0
        elif name == "open":
            gripper = -1.0
        elif name in EVENTS:
            events.append(name)
    return gripper, tuple(events)


def require(module: str, package: str, extra: str = "teleop"):
    """Import an optional dependency or raise TeleopError naming the package and the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TeleopError(f"this device needs the Python package {package!r} (import {module!r} failed: {err}); "
                          f"install it with: pip install 'robolearn[{extra}]'") from None


class TeleopDevice:
    """Base class: subclasses implement `poll`; `read` shapes it and stops motion when disconnected."""

    name = "device"
    human = True        # paced at the control rate by the recorder
    autostart = False   # starts each episode by itself (a scripted policy)
    start_hint = "press Enter"  # how the operator starts and stops an episode with this device
    has_buttons = False  # reports held buttons (TeleopInput.held): can serve a dead-man intervention button
    help = ""           # one line for the recorder's banner
    default_config = TeleopConfig()

    def __init__(self, config: TeleopConfig | None = None):
        self.config = config or replace(self.default_config)

    def attach(self, env) -> None:
        """Called by the recorder once the env exists (scripted devices need it)."""

    def poll(self, obs) -> TeleopInput:
        """Raw reading: unshaped motion in [-1, 1] and the rest of TeleopInput."""
        raise NotImplementedError

    def read(self, obs=None) -> TeleopInput:
        inp = self.poll(obs)
        if "g" in self.config.lock:
            inp.gripper = None
        if not inp.connected:
            inp.motion, inp.gripper = np.zeros(3, np.float32), None  # a lost device commands nothing
        else:
            inp.motion = shape_motion(inp.motion, self.config)
        return inp

    @property
    def gone(self) -> bool:
        """Lost for good (stdin closed, script over): the recorder stops."""
        return False

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def device_names() -> list[str]:
    return sorted(DEVICES)


def register(name: str, target: str) -> None:
    """Register a device class by "module:Class" under `name`."""
    DEVICES[name] = target


def device_class(name: str) -> type[TeleopDevice]:
    if name not in DEVICES:
        raise UnknownDeviceError(f"unknown teleop device {name!r}; valid: {', '.join(device_names())}")
    module, cls = DEVICES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_device(name: str, options: Mapping[str, Any] | None = None) -> TeleopDevice:
    """A device by name; `options` mixes TeleopConfig fields and the device's own keyword options."""
    import inspect

    cls = device_class(name)
    options = dict(options or {})
    cfg_fields = {f.name for f in fields(TeleopConfig)}
    cfg = replace(cls.default_config, **{k: v for k, v in options.items() if k in cfg_fields})
    own = {k: v for k, v in options.items() if k not in cfg_fields}
    try:
        signature = inspect.signature(cls.__init__, eval_str=True)
    except (NameError, TypeError):  # an annotation that does not evaluate here: names only
        signature = inspect.signature(cls.__init__)
    params = {k: p for k, p in signature.parameters.items() if k not in ("self", "config")}
    unknown = sorted(set(own) - set(params))
    if unknown:
        raise ValueError(f"teleop {name}: unknown option(s) {unknown}; valid: {sorted(cfg_fields | set(params))}")
    from robolearn.config_check import check_value

    for key, value in own.items():
        hint = params[key].annotation
        if hint is not inspect.Parameter.empty and not isinstance(hint, str):
            check_value(value, hint, f"teleop {name}: {key}")
    return cls(cfg, **own)
