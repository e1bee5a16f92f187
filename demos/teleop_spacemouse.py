"""3Dconnexion SpaceMouse teleop through hidapi (`import hid`), reading its HID reports directly.

Reports: id 1 translation (x, y, z as little-endian int16; newer models append rotation in the
same report), id 2 rotation, id 3 a button bitmask. Raw y grows toward the operator and raw z
downward, so robot +x (away) is -y and +z (up) is -z. Rotation is read but unused: the Panda
tasks keep the tool pointing down. Left button closes the gripper, right button opens it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from robolearn.demos.teleop import (TeleopConfig, TeleopDevice, TeleopError, TeleopInput, button_edges, held_buttons,
                                    require, split_buttons)

VENDOR_IDS = (0x046D, 0x256F)  # Logitech (older 3Dconnexion devices) and 3Dconnexion


@dataclass
class SpaceMouseState:
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    rotation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    buttons: list[int] = field(default_factory=lambda: [0, 0])


def _int16s(data: Sequence[int], start: int) -> np.ndarray:
    raw = bytes(data[start:start + 6])
    return np.frombuffer(raw, dtype="<i2").astype(np.float64)


def parse_report(report: Sequence[int], state: SpaceMouseState) -> SpaceMouseState:
    """Update `state` from one HID report (a list of byte values, report id first)."""
    if not report:
        return state
    rid = report[0]
    if rid == 1 and len(report) >= 7:
        state.translation = _int16s(report, 1)
        if len(report) >= 13:
            state.rotation = _int16s(report, 7)
    elif rid == 2 and len(report) >= 7:
        state.rotation = _int16s(report, 1)
    elif rid == 3 and len(report) >= 2:
        bits = int.from_bytes(bytes(report[1:]), "little")
        n = max(2, 8 * (len(report) - 1))
        state.buttons = [(bits >> i) & 1 for i in range(n)]
    return state


@dataclass
class SpaceMouseMapping:
    """Raw translation (index, sign) for robot x, y, z; full_scale is the raw deflection read as 1."""

    axes: tuple[tuple[int, float], ...] = ((1, -1.0), (0, -1.0), (2, -1.0))
    full_scale: float = 350.0
    buttons: dict[str, int] = field(default_factory=lambda: {"close": 0, "open": 1})


def map_spacemouse(translation: Sequence[float], buttons: Sequence[int], previous: Sequence[int],
                   mapping: SpaceMouseMapping) -> TeleopInput:
    """Raw SpaceMouse state -> unshaped TeleopInput (motion clipped to [-1, 1])."""
    raw = np.array([sign * float(translation[i]) / mapping.full_scale for i, sign in mapping.axes])
    gripper, events = split_buttons(button_edges(buttons, previous, mapping.buttons))
    return TeleopInput(np.clip(raw, -1.0, 1.0).astype(np.float32), gripper, events, held=held_buttons(buttons))


class SpaceMouseDevice(TeleopDevice):
    """The first 3Dconnexion HID device found (or `path`); unplugged = motion stopped, retried each second."""

    name = "spacemouse"
    has_buttons = True
    help = "push/pull the cap: x/y/z   left button: close gripper   right button: open gripper"
    default_config = TeleopConfig(deadzone=0.1)

    def __init__(self, config: TeleopConfig | None = None, path: str | None = None, full_scale: float = 350.0):
        super().__init__(config)
        self.hid = require("hid", "hidapi")
        self.path = path.encode() if isinstance(path, str) else path
        self.mapping = SpaceMouseMapping(full_scale=float(full_scale))
        self.state = SpaceMouseState()
        self._prev = list(self.state.buttons)
        self._dev, self._retry_at = None, 0.0
        if not self._open():
            raise TeleopError("spacemouse: no 3Dconnexion HID device found (is it plugged in, and is "
                              "/dev/hidraw* readable by this user? see docs/teleop.md)")

    def _find(self):
        for info in self.hid.enumerate():
            if self.path is not None:
                if info["path"] == self.path:
                    return info["path"]
            elif info["vendor_id"] in VENDOR_IDS and "space" in (info.get("product_string") or "").lower():
                return info["path"]
        return None

    def _open(self) -> bool:
        path = self._find()
        if path is None:
            return False
        dev = self.hid.device()
        try:
            dev.open_path(path)
            dev.set_nonblocking(1)
        except (OSError, IOError):
            return False
        self._dev, self.state = dev, SpaceMouseState()
        self._prev = list(self.state.buttons)
        return True

    def poll(self, obs) -> TeleopInput:
        if self._dev is None:
            now = time.monotonic()
            if now < self._retry_at or not self._open():
                self._retry_at = max(self._retry_at, now + 1.0)
                return TeleopInput(connected=False, reason="spacemouse unplugged")
        try:
            for _ in range(64):  # drain what is queued; the newest report wins
                report = self._dev.read(64)
                if not report:
                    break
                parse_report(report, self.state)
        except (OSError, IOError, ValueError):
            self._dev.close()
            self._dev = None
            return TeleopInput(connected=False, reason="spacemouse unplugged")
        inp = map_spacemouse(self.state.translation, self.state.buttons, self._prev, self.mapping)
        self._prev = list(self.state.buttons)
        return inp

    def close(self) -> None:
        if self._dev is not None:
            self._dev.close()
            self._dev = None
