"""The recorder: a teleop device drives an env at its control rate; episodes go to a DatasetWriter.

Three modes (docs/teleop.md): teleop (the device acts), intervention (a policy acts and the
device takes over while it gives input; those steps are flagged `intervention`) and label
(per-step `success` is the operator's label, for reward classifiers). Crash safety is the
writer's: an episode is committed only when it ends, so a crash loses at most that one.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

import numpy as np

from robolearn.demos.dataset import robot_state
from robolearn.rollout import reset_policy
from robolearn.demos.teleop import DISCARD, FAILURE, QUIT, START_STOP, SUCCESS, TeleopDevice, TeleopInput


@dataclass
class RecordConfig:
    episodes: int = 10
    fps: float | None = None      # pacing rate; default: the env's control rate (metadata["render_fps"])
    pace: bool = True             # False: as fast as the env steps (scripted devices)
    label: bool = False           # label mode: per-step success is the operator's label
    seed: int = 0                 # episode k of the dataset is reset with seed + k
    status: bool | None = None    # live status line; default: when the output is a terminal


@dataclass
class RecordSummary:
    paths: list[Path] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)
    episode_fps: list[float] = field(default_factory=list)  # steps / wall time, reset and commit included
    discarded: int = 0
    stopped_by: str = "done"   # done | quit | device lost


def merge_inputs(main: TeleopInput, extra: Sequence[TeleopInput]) -> TeleopInput:
    """The main device's reading plus control devices' motion, gripper and events; connection is the main one's."""
    motion, gripper, events = main.motion.copy(), main.gripper, list(main.events)
    for inp in extra:
        motion = motion + inp.motion
        gripper = inp.gripper if inp.gripper is not None else gripper
        events.extend(inp.events)
    return TeleopInput(np.clip(motion, -1.0, 1.0).astype(np.float32), gripper, tuple(events), main.connected,
                       main.reason)


class Recorder:
    """Runs the record loop; `policy` (obs -> action) switches on intervention mode."""

    def __init__(self, env, device: TeleopDevice, writer, cfg: RecordConfig,
                 policy: Callable | None = None, policy_name: str | None = None,
                 controls: Sequence[TeleopDevice] = (), out: TextIO | None = None):
        self.env, self.device, self.writer, self.cfg = env, device, writer, cfg
        self.policy, self.policy_name, self.controls = policy, policy_name, list(controls)
        self.out = out or sys.stdout
        self.status = cfg.status if cfg.status is not None else bool(getattr(self.out, "isatty", lambda: False)())
        self.fps = float(cfg.fps or env.metadata.get("render_fps") or 10)
        if self.fps <= 0:
            raise ValueError(f"record: fps must be positive, got {self.fps}")
        self.dim = int(np.prod(env.action_space.shape))
        self.mode = "label" if cfg.label else ("intervention" if policy is not None else "teleop")
        self.summary = RecordSummary()
        self.obs = None
        self.recording = False
        self._connected = True
        self._quit = False
        self._rate = 0.0
        self._last_status = 0.0

    # -- output ---------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        prefix = "\r\x1b[K" if self.status else ""
        self.out.write(f"{prefix}{msg}\n")
        self.out.flush()

    def _draw_status(self, inp: TeleopInput, intervening: bool) -> None:
        now = time.monotonic()
        if not self.status or now - self._last_status < 0.1:
            return
        self._last_status = now
        s = self.summary
        n = len(s.paths) + (1 if self.recording else 0)
        parts = [f"episode {min(n, self.cfg.episodes) or 1}/{self.cfg.episodes}",
                 f"REC step {self.t}" if self.recording else "idle",
                 f"{self._rate:5.1f} fps", f"success {sum(s.successes)}/{len(s.paths)}"]
        if self.cfg.label and self.recording:
            parts.append(f"label {'SUCCESS' if self.label else 'failure'}")
        if intervening:
            parts.append("INTERVENING")
        if not inp.connected:
            parts.append("DISCONNECTED")
        self.out.write("\r\x1b[K" + " | ".join(parts))
        self.out.flush()

    def _start_hint(self) -> str:
        """The device's way to start; Enter too where the keyboard rides along as a control device."""
        hints = [self.device.start_hint] + [c.start_hint for c in self.controls if c.start_hint != self.device.start_hint]
        return " or ".join(hints)

    # -- episode lifecycle ------------------------------------------------------------------
    def _start(self) -> None:
        self._ep_start = time.monotonic()
        seed = self.cfg.seed + self.writer.next_index
        self.obs, _ = self.env.reset(seed=seed)
        reset_policy(self.policy)  # an agent with a history or action chunks starts afresh
        attrs = {"seed": seed, "device": self.device.name, "mode": self.mode}
        if self.policy_name:
            attrs["policy"] = self.policy_name
        self.writer.begin_episode(self.obs, robot=robot_state(self.env), **attrs)
        self.recording, self.t, self.label, self.any_label = True, 0, False, False
        self.gripper = -1.0  # the env resets with the gripper open
        self._t0 = time.monotonic()
        if self.device.human:
            self.say(f"episode {self.writer.next_index}: recording (seed {seed})")

    def _end(self, success: bool | None, why: str) -> None:
        if self.t == 0:
            self._discard("it has no steps")
            return
        if self.cfg.label:
            success = self.any_label
        path = self.writer.end_episode(success=success)
        ok = bool(success) if success is not None else self._last_step_success
        s = self.summary
        s.paths.append(path)
        s.lengths.append(self.t)
        s.successes.append(ok)
        s.episode_fps.append(self.t / max(time.monotonic() - self._ep_start, 1e-9))
        self.recording = False
        self.say(f"saved episode {self.writer.index}: {self.t} steps, {'success' if ok else 'failure'} "
                 f"({why}) -> {path.name}")
        if len(s.paths) < self.cfg.episodes and not self.device.autostart:
            self.say(f"{self._start_hint()} to start episode {self.writer.next_index}")

    def _discard(self, why: str) -> None:
        self.writer.discard_episode()
        self.recording = False
        self.summary.discarded += 1
        self.say(f"discarded episode {self.writer.index} ({why})")
        if not self.device.autostart and not self._quit:
            self.say(f"{self._start_hint()} to re-record episode {self.writer.next_index}")

    def _on_event(self, ev: str) -> None:
        if ev == QUIT:
            self._quit = True
        elif ev == START_STOP:
            if self.recording:
                self._end(None, "stopped")
            else:
                self._start()
        elif ev in (SUCCESS, FAILURE) and self.recording:
            if self.cfg.label:
                self.label = ev == SUCCESS
            else:
                self._end(ev == SUCCESS, f"marked {ev}")
        elif ev == DISCARD and self.recording:
            self._discard("operator")

    # -- one control step ----------------------------------------------------------------------
    def _read(self) -> TeleopInput:
        obs = self.obs if self.recording else None
        inp = self.device.read(obs)
        if self.controls:
            inp = merge_inputs(inp, [c.read(obs) for c in self.controls])
        if inp.connected != self._connected:
            self._connected = inp.connected
            if inp.connected:
                self.say(f"teleop {self.device.name}: connected")
            else:
                self.say(f"teleop {self.device.name}: disconnected ({inp.reason}); motion stopped")
        return inp

    def _step(self, inp: TeleopInput) -> bool:
        action = inp.action(self.gripper, self.dim)
        intervening = False
        if self.policy is not None:
            policy_action = np.asarray(self.policy(self.obs), dtype=np.float32).reshape(self.dim)
            intervening = inp.active
            if not intervening:
                action = policy_action
        if self.dim > 3:
            self.gripper = float(action[3])
        obs, reward, terminated, truncated, info = self.env.step(action)
        env_success = bool(info.get("success", False))
        if self.cfg.label:
            self.any_label |= self.label
        success = self.label if self.cfg.label else env_success
        self._last_step_success = success
        ts = time.monotonic() - self._t0 if self.cfg.pace else None
        self.writer.add_step(action, obs, reward, terminated, truncated, success, intervention=intervening,
                             timestamp=ts, robot=robot_state(self.env))
        self.obs = obs
        self.t += 1
        if terminated or truncated:
            self._end(None, "terminated by the env" if terminated else "time limit")
        return intervening

    def run(self) -> RecordSummary:
        """Record until `episodes` are saved, the operator quits, or the device is lost."""
        cfg, s = self.cfg, self.summary
        self.device.attach(self.env)
        period = 1.0 / self.fps
        pace = f"at {self.fps:g} Hz" if cfg.pace else "unpaced"
        self.say(f"recording {cfg.episodes} episode(s) of {self.writer.env_id} to {self.writer.path} "
                 f"({self.mode} mode, {self.device.name}, {pace})")
        for dev in [self.device, *self.controls]:
            if dev.help:
                self.say(dev.help)
        if not self.device.autostart:
            self.say(f"{self._start_hint()} to start episode {self.writer.next_index}")
        next_t = last = time.monotonic()
        self.t = 0
        try:
            while len(s.paths) < cfg.episodes:
                if not self.recording and self.device.autostart:
                    self._start()
                inp = self._read()
                if self.device.gone:
                    self._quit = True
                    if self.recording:
                        self._discard(f"teleop {self.device.name} lost")
                    s.stopped_by = "device lost"
                    break
                for ev in inp.events:
                    self._on_event(ev)
                    if self._quit or len(s.paths) >= cfg.episodes:
                        break
                if self._quit:
                    s.stopped_by = "quit"
                    break
                intervening = False
                if self.recording:
                    intervening = self._step(inp)
                    now = time.monotonic()
                    self._rate = 1.0 / max(now - last, 1e-9) if self._rate == 0 else \
                        0.9 * self._rate + 0.1 / max(now - last, 1e-9)
                    last = now
                else:
                    last = time.monotonic()
                self._draw_status(inp, intervening)
                if cfg.pace:
                    next_t += period
                    delay = next_t - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    elif delay < -period:  # fell behind (slow render): do not burst to catch up
                        next_t = time.monotonic()
        except KeyboardInterrupt:
            s.stopped_by = "quit"
        finally:
            self._quit = True
            if self.recording:
                self._discard("recording stopped")
        n, k = len(s.paths), sum(s.successes)
        self.say(f"recorded {n} episode(s), {k} successful, {s.discarded} discarded, to {self.writer.path}"
                 + (f" (median {statistics.median(s.episode_fps):.1f} steps/s)" if s.episode_fps else ""))
        return s
