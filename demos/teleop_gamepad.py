"""Gamepad teleop through pygame's joystick API (no window: SDL's dummy video driver).

Default layout (an Xbox-style pad as SDL numbers it on Linux): left stick x/y, right stick
vertical z; A start/stop, Y success, B failure, X discard, Start quit, RB close, LB open.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from robolearn.demos.teleop import (TeleopConfig, TeleopDevice, TeleopError, TeleopInput, button_edges, held_buttons,
                                    default_buttons, require, split_buttons)


@dataclass
class GamepadMapping:
    """Axis (index, sign) for robot x, y, z, and button index per command (close/open/events)."""

    # stick up reads negative in SDL, and +y is to the operator's left: both are negated
    axes: tuple[tuple[int, float], ...] = ((1, -1.0), (0, -1.0), (4, -1.0))
    buttons: dict[str, int] = field(default_factory=default_buttons)


def map_gamepad(axes: Sequence[float], buttons: Sequence[int], previous: Sequence[int],
                mapping: GamepadMapping) -> TeleopInput:
    """Raw pad state -> unshaped TeleopInput; buttons act on the press (released -> pressed)."""
    raw = [sign * float(axes[i]) if 0 <= i < len(axes) else 0.0 for i, sign in mapping.axes]
    gripper, events = split_buttons(button_edges(buttons, previous, mapping.buttons))
    return TeleopInput(np.asarray(raw, np.float32), gripper, events, held=held_buttons(buttons))


class GamepadDevice(TeleopDevice):
    """A pygame joystick; unplugging it stops motion until it is plugged back in."""

    name = "gamepad"
    has_buttons = True
    help = ("left stick: x/y   right stick up/down: z   RB/LB: close/open gripper\n"
            "A: start/stop episode   Y: success   B: failure   X: discard and re-record   Start: quit")
    default_config = TeleopConfig(deadzone=0.1)

    def __init__(self, config: TeleopConfig | None = None, index: int = 0, axes=None, buttons=None):
        super().__init__(config)
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # events without a display (SSH)
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        self.pg = pg = require("pygame", "pygame")
        self.mapping = GamepadMapping()
        if axes is not None:
            self.mapping.axes = tuple((int(i), float(s)) for i, s in axes)
        if buttons is not None:
            self.mapping.buttons = {**self.mapping.buttons, **{str(k): int(v) for k, v in dict(buttons).items()}}
        pg.display.init()
        pg.joystick.init()
        count = pg.joystick.get_count()
        if not 0 <= index < count:
            raise TeleopError(f"gamepad: no joystick at index {index} ({count} connected); plug one in "
                              "or choose another with --teleop-set index=N")
        self._open(index)

    def _open(self, index: int) -> None:
        self.js = self.pg.joystick.Joystick(index)
        self.js.init()
        self.instance_id = self.js.get_instance_id()
        self._prev = self._buttons()  # a button held while (re)connecting is not a press
        self._lost = False

    def _buttons(self) -> list[int]:
        return [int(self.js.get_button(i)) for i in range(self.js.get_numbuttons())]

    def poll(self, obs) -> TeleopInput:
        pg = self.pg
        for ev in pg.event.get():
            if ev.type == pg.JOYDEVICEREMOVED and ev.instance_id == self.instance_id:
                self._lost = True
            elif ev.type == pg.JOYDEVICEADDED and self._lost:
                self._open(ev.device_index)
        if self._lost:
            return TeleopInput(connected=False, reason="gamepad unplugged")
        axes = [self.js.get_axis(i) for i in range(self.js.get_numaxes())]
        buttons = self._buttons()
        inp = map_gamepad(axes, buttons, self._prev, self.mapping)
        self._prev = buttons
        return inp

    def close(self) -> None:
        self.pg.joystick.quit()
