"""Keyboard teleop in a terminal: raw stdin with select, so it works over SSH with no display.

A terminal sends key presses, never releases, so a motion key moves for `hold_s` seconds after
each press; a held key's auto-repeat keeps it moving. A recorder key (Enter, y, n, x, q) stops
any held motion. The terminal is restored on exit, on an
exception, and on SIGTERM/SIGHUP/SIGQUIT (not on SIGKILL, which nothing can catch: `stty sane`).
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import sys
import threading
import time

import numpy as np

from robolearn.demos.teleop import (DISCARD, FAILURE, QUIT, START_STOP, SUCCESS, TeleopConfig, TeleopDevice,
                                    TeleopError, TeleopInput)

# key -> (kind, value). move: (axis, sign); gripper: command; event: recorder event; speed: factor.
KEYMAP: dict[str, tuple[str, object]] = {
    "w": ("move", (0, 1)), "up": ("move", (0, 1)),
    "s": ("move", (0, -1)), "down": ("move", (0, -1)),
    "a": ("move", (1, 1)), "left": ("move", (1, 1)),
    "d": ("move", (1, -1)), "right": ("move", (1, -1)),
    "r": ("move", (2, 1)), "f": ("move", (2, -1)),
    "c": ("gripper", 1.0), "o": ("gripper", -1.0),
    "enter": ("event", START_STOP), "y": ("event", SUCCESS), "n": ("event", FAILURE),
    "x": ("event", DISCARD), "backspace": ("event", DISCARD),
    "q": ("event", QUIT), "ctrl-c": ("event", QUIT), "ctrl-d": ("event", QUIT),
    "+": ("speed", 1.5), "=": ("speed", 1.5), "-": ("speed", 1 / 1.5),
}
KEY_HELP = ("w/s or up/down: +x/-x   a/d or left/right: +y/-y   r/f: up/down   c/o: close/open gripper   "
            "+/-: speed\nEnter: start/stop episode   y: success   n: failure   x/Backspace: discard and "
            "re-record   q/Ctrl-C: quit")

_ESCAPES = {b"[A": "up", b"[B": "down", b"[C": "right", b"[D": "left",
            b"OA": "up", b"OB": "down", b"OC": "right", b"OD": "left"}
_CONTROL = {b"\r": "enter", b"\n": "enter", b"\x7f": "backspace", b"\x08": "backspace",
            b"\x03": "ctrl-c", b"\x04": "ctrl-d"}


def parse_keys(data: bytes) -> list[str]:
    """Terminal bytes -> key names (letters lower-cased; arrows from ESC [ A..D or ESC O A..D)."""
    keys, i = [], 0
    while i < len(data):
        b = data[i:i + 1]
        if b == b"\x1b":
            seq = data[i + 1:i + 3]
            if seq in _ESCAPES:
                keys.append(_ESCAPES[seq])
                i += 3
                continue
            # another CSI sequence (F-keys, Home ...): skip to its final byte; a lone ESC is "esc"
            if data[i + 1:i + 2] == b"[":
                j = i + 2
                while j < len(data) and not 0x40 <= data[j] <= 0x7e:
                    j += 1
                i = j + 1
                continue
            keys.append("esc")
            i += 1
            continue
        if b in _CONTROL:
            keys.append(_CONTROL[b])
        else:
            keys.append(b.decode("latin-1").lower())
        i += 1
    return keys


class KeyState:
    """Key presses -> motion held for `hold` time units after each press, gripper and events."""

    def __init__(self, hold: float, speed: float = 1.0):
        self.hold, self.speed = float(hold), float(speed)
        self._until = np.full((3, 2), -np.inf)  # per axis, per direction (-, +): active until

    def press(self, keys, now: float) -> tuple[float | None, list[str]]:
        gripper, events = None, []
        for key in keys:
            kind, value = KEYMAP.get(key, (None, None))
            if kind == "move":
                axis, sign = value
                self._until[axis, int(sign > 0)] = now + self.hold
                self._until[axis, int(sign < 0)] = -np.inf  # the opposite key cancels
            elif kind == "gripper":
                gripper = value
            elif kind == "event":
                events.append(value)
                self.stop()  # no motion carries over an episode boundary
            elif kind == "speed":
                self.speed = float(np.clip(self.speed * value, 0.05, 1.0))
        return gripper, events

    def motion(self, now: float) -> np.ndarray:
        active = self._until > now
        return (active[:, 1].astype(np.float32) - active[:, 0]) * np.float32(self.speed)

    def stop(self) -> None:
        self._until[:] = -np.inf


class KeyboardDevice(TeleopDevice):
    """Keys in the terminal on stdin (see KEY_HELP); needs a real terminal (ssh -t over SSH)."""

    name = "keyboard"
    help = KEY_HELP
    default_config = TeleopConfig()

    def __init__(self, config: TeleopConfig | None = None, hold_s: float = 0.3, speed: float = 0.3,
                 fd: int | None = None):
        import termios
        import tty

        super().__init__(config)
        self.fd = sys.stdin.fileno() if fd is None else int(fd)
        if not os.isatty(self.fd):
            raise TeleopError("keyboard teleop needs a terminal on stdin (run it in a terminal, tmux, or `ssh -t`)")
        self.keys = KeyState(hold_s, speed)
        self._eof = False
        self._saved = termios.tcgetattr(self.fd)
        self._old_handlers = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        atexit.register(self.restore)
        tty.setraw(self.fd, termios.TCSANOW)
        mode = termios.tcgetattr(self.fd)
        mode[1] |= termios.OPOST | termios.ONLCR  # raw input, but "\n" still starts a new line on output
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)

    def _on_signal(self, signum, frame):
        self.restore()
        raise SystemExit(128 + signum)  # unwinds the recorder's finally: the episode in progress is discarded

    def restore(self) -> None:
        """Put the terminal back as it was; safe to call more than once."""
        import termios
        if self._saved is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass  # the terminal is gone (SSH dropped)
            self._saved = None

    def poll(self, obs) -> TeleopInput:
        now = time.monotonic()
        data = b""
        while not self._eof and select.select([self.fd], [], [], 0)[0]:
            try:
                chunk = os.read(self.fd, 1024)
            except OSError:  # EIO: the terminal hung up
                chunk = b""
            if not chunk:
                self._eof = True
            data += chunk
        gripper, events = self.keys.press(parse_keys(data), now)
        if self._eof:
            self.keys.stop()
            return TeleopInput(connected=False, reason="keyboard: stdin closed", events=tuple(events))
        return TeleopInput(self.keys.motion(now), gripper, tuple(events))

    @property
    def gone(self) -> bool:
        return self._eof

    def close(self) -> None:
        self.restore()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}
        atexit.unregister(self.restore)
