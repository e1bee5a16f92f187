"""A scripted device: the task's scripted expert (demonstrations from the sim experts), or a key script.

A key script is the keyboard without a terminal: one token per control step, `.` for no key,
`<name>` for a named key (`<enter>`, `<up>`, `<backspace>` ...), any other character for that
key (the keyboard's key map). A motion key moves for `hold_steps` steps. When the script runs
out the device is gone and the recorder stops.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from robolearn.demos.teleop import TeleopConfig, TeleopDevice, TeleopError, TeleopInput
from robolearn.demos.teleop_keyboard import KEY_HELP, KeyState


def parse_key_script(script: str) -> list[str | None]:
    """'<enter>ww.y' -> ['enter', 'w', 'w', None, 'y']."""
    tokens, i = [], 0
    while i < len(script):
        ch = script[i]
        if ch == "<":
            end = script.find(">", i)
            if end < 0:
                raise ValueError(f"key script: unclosed '<' at position {i} in {script!r}")
            tokens.append(script[i + 1:end].lower())
            i = end + 1
            continue
        tokens.append(None if ch == "." else ch.lower())
        i += 1
    return tokens


class ScriptedDevice(TeleopDevice):
    """policy="expert" (the task's scripted expert) or a callable obs -> action; or `keys`, a key script."""

    name = "scripted"
    human = False
    default_config = TeleopConfig()

    def __init__(self, config: TeleopConfig | None = None, policy: str | Callable = "expert",
                 keys: str | None = None, hold_steps: int = 1):
        super().__init__(config)
        self.keys = parse_key_script(str(keys)) if keys is not None else None
        if self.keys is None and not (policy == "expert" or callable(policy)):
            raise ValueError(f"teleop scripted: policy must be 'expert' (or a callable in Python), got {policy!r}")
        self.policy, self._policy = policy, None
        self.autostart = self.keys is None  # a policy starts every episode itself; a key script presses Enter
        self.help = KEY_HELP if self.keys is not None else "the task's scripted expert"
        self._state, self._tick = KeyState(hold_steps, speed=1.0), 0

    def attach(self, env) -> None:
        if self.keys is not None:
            return
        if callable(self.policy):
            self._policy = self.policy
            return
        task = getattr(env.unwrapped, "task", None)
        if task is None or not hasattr(task, "expert"):
            env_id = env.spec.id if getattr(env, "spec", None) else type(env.unwrapped).__name__
            raise TeleopError(f"teleop scripted: {env_id} has no scripted expert (Panda tasks have one); "
                              "pass a key script with --teleop-set keys=...")
        self._policy = task.expert(env.unwrapped)

    def poll(self, obs) -> TeleopInput:
        if self.keys is None:
            if self._policy is None:
                raise TeleopError("teleop scripted: attach(env) before read()")
            if obs is None:  # between episodes: nothing to act on
                return TeleopInput()
            a = np.asarray(self._policy(obs), dtype=np.float32).ravel()
            return TeleopInput(a[:3].copy(), float(a[3]) if a.size > 3 else None)
        now = self._tick
        self._tick += 1
        if now >= len(self.keys):
            return TeleopInput(connected=False, reason="scripted: key script finished")
        key = self.keys[now]
        gripper, events = self._state.press([key] if key else [], now)
        return TeleopInput(self._state.motion(now), gripper, tuple(events))

    @property
    def gone(self) -> bool:
        return self.keys is not None and self._tick > len(self.keys)
