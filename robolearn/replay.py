"""Replay for off-policy agents: each observation stored once, n-step returns at sample time.

Storage is a ring of `capacity` observation slots. A slot holds one time step: the observation
(images as ONE uint8 frame, the newest channels/frame_stack channels of a frame-stacked env
observation, kept channel-first; other keys float32), and, once the next step arrives, the
action taken from it, the reward and the termination flag. The last observation of an episode has a slot but starts no transition.
Frame stacks are rebuilt by index when sampling, repeating the episode's first frame at its
start exactly as DMCEnv does on reset. A transition is sampleable only while every slot it reads
(its frame stacks and its n-step window) holds its own episode; `__len__` counts those.
Batches follow the layout documented in robolearn/agents/base.py. Layout: docs/replay.md.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import h5py
import numpy as np
import torch

from robolearn.demos.dataset import (Dataset, DatasetError, commit_file, compare_observation_specs,
                                     observation_spec)

FORMAT = "robolearn.replay"
FORMAT_VERSION = 1
# Per-slot arrays besides the observations; saved and restored by name.
_SLOT_ARRAYS = ("action", "reward", "terminated", "has_action", "sampleable", "intervention", "episode", "step")


@dataclass
class ReplayConfig:
    """Replay settings; DrQ-v2 uses frame_stack=3, nstep=3; SERL/RLPD nstep=1 with demo_ratio=0.5."""

    capacity: int = 1_000_000
    frame_stack: int = 1
    nstep: int = 1
    gamma: float = 0.99
    demo_ratio: float = 0.5


class ReplayFileError(ValueError):
    """A replay file that cannot be restored: damaged, truncated, or saved by a buffer of another shape."""


def _is_image(shape, dtype) -> bool:
    return np.dtype(dtype) == np.uint8 and len(shape) == 3


def _refcounts(arrays: list) -> list[int]:
    return [sys.getrefcount(a) for a in arrays]


def batch_to_torch(batch: dict, device: torch.device | str) -> dict:
    """A numpy batch (nested dict) as torch tensors on `device`."""
    return {k: batch_to_torch(v, device) if isinstance(v, dict) else torch.from_numpy(v).to(device)
            for k, v in batch.items()}


class ReplayBuffer:
    """A ring buffer of time steps; see the module docstring. Env loop:

        buf.add_first(obs)
        obs, r, term, trunc, info = env.step(a); buf.add(a, r, obs, term, trunc)
        (after term or trunc, reset and add_first the new first observation)
    """

    def __init__(self, capacity: int, observation_space, action_space, frame_stack: int = 1, nstep: int = 1,
                 gamma: float = 0.99, device: torch.device | str | None = None, seed: int = 0):
        """seed: of `self.rng`, the generator sampling uses when no `rng` is passed; the same seed and the
        same adds give the same batches (the training loop passes its own seeded generator)."""
        for name, value in (("frame_stack", frame_stack), ("nstep", nstep)):
            if int(value) != value or value < 1:
                raise ValueError(f"ReplayBuffer: {name} must be a positive int, got {value!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"ReplayBuffer: gamma must be in [0, 1], got {gamma}")
        if int(capacity) != capacity or capacity < nstep + frame_stack + 1:
            raise ValueError(f"ReplayBuffer: capacity must be an int >= nstep + frame_stack + 1 "
                             f"({nstep + frame_stack + 1}), got {capacity!r}")
        self.capacity, self.frame_stack, self.nstep = int(capacity), int(frame_stack), int(nstep)
        self.gamma = float(gamma)
        if device is None:
            from robolearn.agents.base import default_device
            device = default_device()
        self.device = torch.device(device)
        self.obs_spec = observation_spec(observation_space)
        self.action_shape = tuple(int(d) for d in action_space.shape)
        self.image_keys: list[str] = []
        self._obs: dict[str, np.ndarray] = {}
        C = self.capacity
        for key, spec in self.obs_spec.items():
            shape = tuple(spec["shape"])
            if _is_image(shape, spec["dtype"]):
                if shape[-1] % self.frame_stack:
                    raise ValueError(f"ReplayBuffer: observation {key!r} has {shape[-1]} channels, not a "
                                     f"multiple of frame_stack={self.frame_stack}")
                self.image_keys.append(key)
                # np.zeros maps untouched pages lazily: a large, mostly empty buffer costs little RAM.
                # Channel-first frames (C, H, W): a sampled stack is whole frames side by side.
                self._obs[key] = np.zeros((C, shape[-1] // self.frame_stack, *shape[:-1]), np.uint8)
            else:
                self._obs[key] = np.zeros((C, *shape), np.float32)
        self._action = np.zeros((C, *self.action_shape), np.float32)
        self._reward = np.zeros(C, np.float32)
        self._terminated = np.zeros(C, bool)
        self._has_action = np.zeros(C, bool)   # an action was taken from this slot's observation
        self._sampleable = np.zeros(C, bool)   # a transition starting here may be sampled
        self._intervention = np.zeros(C, bool)
        self._episode = np.full(C, -1, np.int64)
        self._step = np.zeros(C, np.int64)     # step of the observation within its episode
        self._ptr = self._size = self._count = self._next_episode = 0
        self._open = False  # an episode is being added
        self._cur = -1      # slot of the newest observation
        self.rng = np.random.default_rng(seed)
        self._staging: tuple | None = None  # (batch size, arrays, their idle refcounts); see _alloc

    @classmethod
    def from_config(cls, cfg: ReplayConfig, observation_space, action_space, device=None) -> "ReplayBuffer":
        return cls(cfg.capacity, observation_space, action_space, cfg.frame_stack, cfg.nstep, cfg.gamma, device)

    # -- sizes ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of sampleable transitions."""
        return self._count

    @property
    def size(self) -> int:
        """The number of stored observation slots (at most capacity)."""
        return self._size

    @property
    def num_episodes(self) -> int:
        """Episodes ever started in this buffer (some may have been overwritten)."""
        return self._next_episode

    def nbytes(self) -> int:
        """Bytes of storage, allocated for the full capacity."""
        arrays = list(self._obs.values()) + [getattr(self, "_" + name) for name in _SLOT_ARRAYS]
        return int(sum(a.nbytes for a in arrays))

    # -- adding ----------------------------------------------------------------------------
    def _frame(self, obs: Mapping[str, np.ndarray], key: str) -> np.ndarray:
        if key not in obs:
            raise KeyError(f"ReplayBuffer: observation is missing key {key!r} (has {sorted(obs)})")
        value = np.asarray(obs[key])
        if list(value.shape) != self.obs_spec[key]["shape"]:
            raise ValueError(f"ReplayBuffer: observation {key!r} has shape {value.shape}, expected "
                             f"{tuple(self.obs_spec[key]['shape'])}")
        if key in self.image_keys:
            # The newest frame of a stack, channel-first.
            return value[..., value.shape[-1] - self._obs[key].shape[1]:].transpose(2, 0, 1)
        return value

    def _write_obs(self, obs: Mapping[str, np.ndarray], episode: int, step: int) -> None:
        frames = {key: self._frame(obs, key) for key in self._obs}  # validate before touching storage
        p = self._ptr
        if self._size == self.capacity:
            self._evict(p)
        for key, value in frames.items():
            self._obs[key][p] = value
        self._episode[p], self._step[p] = episode, step
        self._has_action[p] = self._terminated[p] = self._intervention[p] = False
        self._reward[p] = 0.0
        self._cur, self._ptr = p, (p + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)

    def _evict(self, p: int) -> None:
        # Overwriting the oldest slot p kills the transition starting there and those whose frame
        # stack reaches back to it: the next frame_stack-1 slots of the same episode. Transitions
        # before p are newer and only read forward, so p's new content is their true successor.
        for j in range(self.frame_stack):
            q = (p + j) % self.capacity
            if j and self._episode[q] != self._episode[p]:
                break
            self._unmark(q)

    def _unmark(self, i: int) -> None:
        if self._sampleable[i]:
            self._sampleable[i] = False
            self._count -= 1

    def _mark(self, i: int) -> None:
        """Make slot i sampleable if its frame stack is still intact (its window is, by construction)."""
        ep, step = self._episode[i], self._step[i]
        for j in range(1, min(self.frame_stack - 1, step) + 1):
            q = (i - j) % self.capacity
            if self._episode[q] != ep or self._step[q] != step - j:
                return
        if not self._sampleable[i] and self._has_action[i]:
            self._sampleable[i] = True
            self._count += 1

    def add_first(self, obs: Mapping[str, np.ndarray]) -> None:
        """Start an episode at the observation returned by env.reset (an open one is ended first)."""
        if self._open:
            self.end_episode()
        self._write_obs(obs, self._next_episode, 0)
        self._next_episode += 1
        self._open = True

    def add(self, action, reward: float, next_obs: Mapping[str, np.ndarray], terminated: bool, truncated: bool,
            intervention: bool = False) -> None:
        """Record env.step's result for the action taken from the newest observation."""
        if not self._open:
            raise RuntimeError("ReplayBuffer.add() without an episode: call add_first(obs) after env.reset()")
        a = np.asarray(action, np.float32)
        if a.shape != self.action_shape:
            raise ValueError(f"ReplayBuffer: action has shape {a.shape}, expected {self.action_shape}")
        c = self._cur
        step = int(self._step[c])
        self._write_obs(next_obs, int(self._episode[c]), step + 1)  # may evict; validates first
        self._action[c], self._reward[c] = a, reward
        self._terminated[c], self._intervention[c] = bool(terminated), bool(intervention)
        self._has_action[c] = True
        if step + 1 >= self.nstep:  # the transition nstep back now has its full n-step window
            self._mark((self._cur - self.nstep) % self.capacity)
        if terminated or truncated:
            self._close()

    def add_episode(self, obs: Mapping[str, np.ndarray], action, reward, terminated, truncated,
                    intervention=None) -> None:
        """A whole recorded episode at once: obs (T+1, ...) per key, the rest (T, ...), then ended.

        Equal to add_first + T x add + end_episode. Whole arrays are copied in one go when the
        episode fits in the free part of the ring and only its last step may end it; otherwise it
        goes step by step.
        """
        action = np.asarray(action, np.float32)
        T = len(action)
        flags = [np.asarray(x, bool) for x in (terminated, truncated)]
        fast = (self._size + T + 1 <= self.capacity and T > 0 and not any(f[:-1].any() for f in flags)
                and all(len(np.asarray(x)) == T for x in (reward, *flags)))
        if fast:
            for key in self._obs:
                if key not in obs:
                    raise KeyError(f"ReplayBuffer: observation is missing key {key!r} (has {sorted(obs)})")
                value = np.asarray(obs[key])
                if value.shape != (T + 1, *self.obs_spec[key]["shape"]):
                    fast = False  # the step-by-step path names the bad key and shape
        if not fast:
            self.add_first({k: v[0] for k, v in obs.items()})
            for t in range(T):
                self.add(action[t], float(reward[t]), {k: v[t + 1] for k, v in obs.items()},
                         bool(terminated[t]), bool(truncated[t]),
                         False if intervention is None else bool(intervention[t]))
            self.end_episode()
            return
        if action.shape[1:] != self.action_shape:
            raise ValueError(f"ReplayBuffer: action has shape {action.shape[1:]}, expected {self.action_shape}")
        self.end_episode()
        p, rows = self._ptr, slice(self._ptr, self._ptr + T + 1)  # the ring has not wrapped: p == size
        for key, store in self._obs.items():
            value = np.asarray(obs[key])
            if key in self.image_keys:  # the newest frame of a stack, channel-first (as _frame)
                value = value[..., value.shape[-1] - store.shape[1]:].transpose(0, 3, 1, 2)
            store[rows] = value
        acts = slice(p, p + T)
        self._episode[rows], self._step[rows] = self._next_episode, np.arange(T + 1)
        self._action[acts], self._reward[acts] = action, np.asarray(reward, np.float32)
        self._terminated[rows], self._intervention[rows], self._reward[p + T] = False, False, 0.0
        self._terminated[p + T - 1] = flags[0][-1]
        if intervention is not None:
            self._intervention[acts] = np.asarray(intervention, bool)
        self._has_action[rows] = np.arange(T + 1) < T
        # Every step with an action is sampleable: its frame stack and n-step window lie in this
        # episode, which is complete (the step-by-step path marks the same slots).
        self._sampleable[rows] = self._has_action[rows]
        self._count += T
        self._cur, self._ptr = p + T, (p + T + 1) % self.capacity
        self._size += T + 1
        self._next_episode += 1
        self._open = False

    def end_episode(self) -> None:
        """End the open episode without a terminal flag (it bootstraps, like truncation); no-op if none."""
        if self._open:
            self._close()

    def _close(self) -> None:
        # Transitions fewer than nstep steps from the end use the steps that remain.
        for k in range(1, min(self.nstep - 1, int(self._step[self._cur])) + 1):
            self._mark((self._cur - k) % self.capacity)
        self._open = False

    # -- sampling ----------------------------------------------------------------------------
    def sample_indices(self, batch_size: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Slots of `batch_size` transitions drawn uniformly (with replacement) from the sampleable ones."""
        if self._count == 0:
            raise ValueError("ReplayBuffer: no sampleable transitions yet (a transition needs its next "
                             f"{self.nstep} step(s) or the episode's end)")
        rng = self.rng if rng is None else rng
        frac = self._count / self._size
        if frac < 0.05:  # rejection would waste draws; index the few valid slots directly
            return rng.choice(np.flatnonzero(self._sampleable[:self._size]), batch_size)
        out, filled = np.empty(batch_size, np.int64), 0
        while filled < batch_size:  # rejection sampling keeps draws uniform over valid slots
            need = batch_size - filled
            cand = rng.integers(0, self._size, int(need / frac * 1.25) + 8)
            cand = cand[self._sampleable[cand]][:need]
            out[filled:filled + len(cand)] = cand
            filled += len(cand)
        return out

    def _alloc(self, batch_size: int) -> dict:
        """An empty batch; images in their physical channel-first layout (B, C*stack, H, W).

        The arrays of the previous batch are reused once nothing outside refers to them any more
        (the caller dropped the batch and its tensors): fresh 16 MB arrays cost more in page
        faults than the gather that fills them. A batch still held is never overwritten.
        """
        layout = [(k, (batch_size, s.shape[1] * self.frame_stack, *s.shape[2:]), np.uint8)
                  if k in self.image_keys else (k, (batch_size, *s.shape[1:]), np.float32)
                  for k, s in self._obs.items()]
        layout = [("obs/" + k, shape, dt) for k, shape, dt in layout] + \
                 [("next_obs/" + k, shape, dt) for k, shape, dt in layout] + \
                 [("action", (batch_size, *self.action_shape), np.float32),
                  ("reward", (batch_size,), np.float32), ("discount", (batch_size,), np.float32)]
        staged = self._staging
        if staged is None or staged[0] != batch_size or _refcounts(staged[1]) != staged[2]:
            arrays = [np.empty(shape, dt) for _, shape, dt in layout]
            self._staging = staged = (batch_size, arrays, _refcounts(arrays))
        batch: dict = {"obs": {}, "next_obs": {}}
        for (name, _, _), array in zip(layout, staged[1]):
            part, _, key = name.partition("/")
            if key:
                batch[part][key] = array
            else:
                batch[name] = array
        return batch

    def _fill_obs(self, idx: np.ndarray, out: dict, sl: slice) -> None:
        k, C, n = self.frame_stack, self.capacity, len(idx)
        # Oldest frame first, as DMCEnv concatenates; offsets stop at the episode's first frame.
        back = np.minimum(np.arange(k - 1, -1, -1)[None, :], self._step[idx][:, None])
        src = (idx[:, None] - back) % C
        for key, store in self._obs.items():
            if key in self.image_keys:
                # Frames are stored channel-first, so a stack is k whole frames side by side:
                # one gather, no per-pixel interleaving.
                dst = out[key][sl].reshape(n, k, *store.shape[1:])
                np.take(store, src, axis=0, out=dst, mode="clip")
            else:
                np.take(store, idx, axis=0, out=out[key][sl], mode="clip")

    def _fill(self, idx: np.ndarray, out: dict, sl: slice) -> None:
        """Write the transitions starting at slots `idx` into rows `sl` of a batch from _alloc."""
        idx = np.asarray(idx, np.int64)
        C, g = self.capacity, self.gamma
        ret = np.zeros(len(idx), np.float64)
        used = np.zeros(len(idx), np.int64)
        alive = np.ones(len(idx), bool)
        for k in range(self.nstep):
            j = (idx + k) % C
            alive &= self._has_action[j]  # the episode's last observation has no action: stop there
            ret += np.where(alive, g ** k * self._reward[j], 0.0)
            used += alive
            alive &= ~self._terminated[j]
        done = self._terminated[(idx + used - 1) % C]
        out["reward"][sl] = ret
        out["discount"][sl] = np.where(done, 0.0, g ** used.astype(np.float64))
        out["action"][sl] = self._action[idx]
        self._fill_obs(idx, out["obs"], sl)
        self._fill_obs((idx + used) % C, out["next_obs"], sl)

    def _present(self, batch: dict) -> dict:
        """Images as (B, H, W, C*stack) views of their channel-first memory (the agents' layout)."""
        for part in ("obs", "next_obs"):
            for key in self.image_keys:
                batch[part][key] = batch[part][key].transpose(0, 2, 3, 1)
        return batch

    def batch_arrays(self, idx: np.ndarray) -> dict:
        """The numpy batch for transitions starting at slots `idx` (layout of robolearn.agents.base)."""
        out = self._alloc(len(idx))
        self._fill(np.asarray(idx, np.int64), out, slice(0, len(idx)))
        return self._present(out)

    def sample_arrays(self, batch_size: int, rng: np.random.Generator | None = None) -> dict:
        return self.batch_arrays(self.sample_indices(batch_size, rng))

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> dict:
        """A batch of torch tensors on the buffer's device (see robolearn/agents/base.py)."""
        return batch_to_torch(self.sample_arrays(batch_size, rng), self.device)

    # -- windows (chunked policies) ---------------------------------------------------------
    def _along(self, idx: np.ndarray, offsets: range, need_action: bool) -> np.ndarray:
        """Slots at `offsets` steps from each slot in `idx` (B, len(offsets)), along its own episode:
        an offset before the episode's first slot (or its oldest kept one) gives that slot; one past
        its last action (`need_action`) or its last observation gives that one."""
        C, ep, step = self.capacity, self._episode[idx], self._step[idx]
        cols = {0: idx}
        for sign in (-1, 1):
            prev, alive = idx, np.ones(len(idx), bool)
            for d in range(1, max([sign * o for o in offsets] + [0]) + 1):
                cand = (idx + sign * d) % C
                alive &= (self._episode[cand] == ep) & (self._step[cand] == step + sign * d)
                if need_action:
                    alive &= self._has_action[cand]
                prev = cols[sign * d] = np.where(alive, cand, prev)
        return np.stack([cols[o] for o in offsets], axis=1)

    def window_arrays(self, idx: np.ndarray, obs_horizon: int, action_horizon: int) -> dict:
        """Windows around the steps at slots `idx`, as Diffusion Policy trains on them:
        obs[key] (B, obs_horizon, ...) for steps t-obs_horizon+1 .. t (images uint8 HWC), and
        action (B, action_horizon, A) for steps t-obs_horizon+1 .. t-obs_horizon+action_horizon;
        before the episode's start the first observation and action repeat, past its end the last
        action repeats. Also reward and terminated (B, action_horizon) along the same steps (0 and
        False where padded past the end), and intervention at t."""
        idx = np.asarray(idx, np.int64)
        first = -(obs_horizon - 1)
        obs_slots = self._along(idx, range(first, 1), need_action=False)
        act_slots = self._along(idx, range(first, first + action_horizon), need_action=True)
        obs = {}
        for key, store in self._obs.items():
            value = store[obs_slots]  # (B, To, ...)
            obs[key] = value.transpose(0, 1, 3, 4, 2) if key in self.image_keys else value
        step = self._step[idx][:, None] + np.arange(first, first + action_horizon)[None, :]
        real = self._step[act_slots] == step  # not a repeat of the first or last action
        return {"obs": obs, "action": self._action[act_slots],
                "reward": np.where(real, self._reward[act_slots], 0.0).astype(np.float32),
                "terminated": real & self._terminated[act_slots], "intervention": self._intervention[idx]}

    def chunk_arrays(self, idx: np.ndarray, obs_horizon: int, chunk: int) -> dict:
        """Transitions whose action is the chunk of `chunk` actions from the steps at slots `idx`
        (an agent that plans chunks learns a critic over them): obs and next_obs windows of
        `obs_horizon` steps at t and at t+m, action (B, chunk, A) for t..t+chunk-1 (the last action
        repeats past the episode's end), reward sum_{k<m} gamma^k r_{t+k} and discount gamma^m, 0
        where the episode terminated within; m = min(chunk, steps to the episode's end). The n-step
        transition with n = chunk, and the buffer's gamma."""
        idx = np.asarray(idx, np.int64)
        C, g = self.capacity, self.gamma
        ret, used = np.zeros(len(idx)), np.zeros(len(idx), np.int64)
        alive = np.ones(len(idx), bool)
        for k in range(chunk):
            j = (idx + k) % C
            alive &= self._has_action[j] & (self._episode[j] == self._episode[idx])
            ret += np.where(alive, g ** k * self._reward[j], 0.0)
            used += alive
            alive &= ~self._terminated[j]
        done = self._terminated[(idx + used - 1) % C]
        first = -(obs_horizon - 1)
        out = {"action": self._action[self._along(idx, range(0, chunk), need_action=True)],
               "reward": ret.astype(np.float32), "discount": np.where(done, 0.0, g ** used).astype(np.float32)}
        for part, at in (("obs", idx), ("next_obs", (idx + used) % C)):
            slots = self._along(at, range(first, 1), need_action=False)
            out[part] = {key: store[slots].transpose(0, 1, 3, 4, 2) if key in self.image_keys else store[slots]
                         for key, store in self._obs.items()}
        return out

    def sample_chunks(self, batch_size: int, obs_horizon: int, chunk: int,
                      rng: np.random.Generator | None = None) -> dict:
        """A batch of chunk transitions (chunk_arrays) at uniformly drawn steps, as torch tensors."""
        return batch_to_torch(self.chunk_arrays(self.sample_indices(batch_size, rng), obs_horizon, chunk), self.device)

    def sample_windows(self, batch_size: int, obs_horizon: int, action_horizon: int,
                       rng: np.random.Generator | None = None) -> dict:
        """A batch of windows (see window_arrays) at uniformly drawn steps, as torch tensors."""
        if self.frame_stack != 1:
            raise ValueError(f"ReplayBuffer: windows need frame_stack=1 (the window is the history), "
                             f"got {self.frame_stack}")
        return batch_to_torch(self.window_arrays(self.sample_indices(batch_size, rng), obs_horizon,
                                                 action_horizon), self.device)

    # -- demonstrations ------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset: Dataset | str | os.PathLike, observation_space=None, action_space=None,
                     capacity: int | None = None, view: tuple | None = None, **kwargs) -> "ReplayBuffer":
        """A buffer holding every episode of `dataset`; spaces default to the dataset's own.

        Pass the env's spaces to have the dataset checked against them (DatasetError names the key).
        view: (stored space, obs_fn), as MappedReplay's: the buffer holds obs_fn of each episode's
        observations, and the dataset is checked against `observation_space`, what obs_fn reads.
        """
        if not isinstance(dataset, Dataset):
            dataset = Dataset(dataset)
        if observation_space is None:
            observation_space = _spaces_from_spec(dataset.observation_spec)
        if action_space is None:
            from gymnasium.spaces import Box
            spec = dataset.action_spec
            action_space = Box(np.array(spec["low"], np.float32).reshape(spec["shape"]),
                               np.array(spec["high"], np.float32).reshape(spec["shape"]), dtype=np.float32)
        if capacity is None:
            capacity = dataset.num_steps + len(dataset)
        min_capacity = kwargs.get("nstep", 1) + kwargs.get("frame_stack", 1) + 1
        buf = cls(max(int(capacity), min_capacity), observation_space if view is None else view[0], action_space,
                  **kwargs)
        load_dataset(buf, dataset, None if view is None else (observation_space, view[1]))
        return buf

    # -- save / load ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the buffer to an HDF5 file atomically (temp file, fsync, rename)."""
        _save_h5(path, self._write_group)

    def load(self, path: str | os.PathLike) -> None:
        """Restore contents saved by save() into this buffer (capacity, stack, nstep and spec must match);
        ReplayFileError names the file when it is damaged or does not fit."""
        _load_h5(path, lambda f: self._read_group(f, str(path)))

    def _config(self) -> dict:
        return {"capacity": self.capacity, "frame_stack": self.frame_stack, "nstep": self.nstep,
                "observation": self.obs_spec, "action_shape": list(self.action_shape)}

    def _write_group(self, g: h5py.Group) -> None:
        n = self._size
        g.attrs["format"], g.attrs["format_version"] = FORMAT, FORMAT_VERSION
        g.attrs["config"] = json.dumps(self._config())
        g.attrs["state"] = json.dumps({"ptr": self._ptr, "size": n, "count": self._count,
                                       "next_episode": self._next_episode, "open": self._open,
                                       "cur": self._cur, "gamma": self.gamma})
        for key, store in self._obs.items():  # Fletcher32: load() finds flipped bytes, not just a short file
            g.create_dataset(f"obs/{key}", data=store[:n], fletcher32=True)
        for name in _SLOT_ARRAYS:
            g.create_dataset(name, data=getattr(self, "_" + name)[:n], fletcher32=True)

    def _read_group(self, g: h5py.Group, where: str) -> None:
        if g.attrs.get("format") != FORMAT or g.attrs.get("format_version") != FORMAT_VERSION:
            raise ReplayFileError(f"{where}: not a {FORMAT} v{FORMAT_VERSION} file")
        saved, ours = json.loads(g.attrs["config"]), self._config()
        state = json.loads(g.attrs["state"])
        # A bigger buffer takes a saved one whose ring never wrapped (a demo buffer saved when it had no room
        # beyond its dataset): its slots are in order, so the next step goes after them.
        grows = saved["capacity"] < ours["capacity"] and state["ptr"] in (0, state["size"]) and bool(
            np.all(np.diff(g["episode"][()]) >= 0))
        for field in ("capacity", "frame_stack", "nstep", "action_shape"):
            if saved[field] != ours[field] and not (field == "capacity" and grows):
                raise ReplayFileError(f"{where}: saved buffer has {field}={saved[field]}, this buffer {ours[field]}")
        try:
            compare_observation_specs(saved["observation"], ours["observation"], where, "this buffer")
        except DatasetError as err:
            raise ReplayFileError(str(err)) from None
        n = state["size"]
        if grows:
            state["ptr"] = n
        for key, store in self._obs.items():
            store[:n] = g[f"obs/{key}"][()]
        for name in _SLOT_ARRAYS:
            getattr(self, "_" + name)[:n] = g[name][()]
        self._episode[n:], self._sampleable[n:], self._has_action[n:] = -1, False, False
        self._ptr, self._size, self._count = state["ptr"], n, int(self._sampleable.sum())
        self._next_episode, self._open, self._cur = state["next_episode"], state["open"], state["cur"]
        if self._count != state["count"]:
            raise ReplayFileError(f"{where}: inconsistent file ({self._count} sampleable slots, "
                                  f"{state['count']} recorded)")


def _save_h5(path: str | os.PathLike, write: Callable[[h5py.File], None]) -> None:
    """Fill a temporary HDF5 file with `write`, then fsync and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with h5py.File(tmp, "w") as f:
            write(f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_file(tmp, path)


def _load_h5(path: str | os.PathLike, read: Callable[[h5py.File], None]) -> None:
    """Open a saved replay file and `read` it; any failure is one ReplayFileError line naming the file."""
    try:
        with h5py.File(path, "r") as f:
            read(f)
    except ReplayFileError:
        raise
    except Exception as err:  # h5py: OSError (truncated, bad checksum), KeyError; json: ValueError
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise ReplayFileError(f"{path}: damaged or truncated replay file ({reason})") from None


def _spaces_from_spec(spec: Mapping[str, dict]):
    from gymnasium.spaces import Box, Dict
    spaces = {}
    for key, s in spec.items():
        dtype = np.dtype(s["dtype"])
        if dtype == np.uint8:
            spaces[key] = Box(0, 255, tuple(s["shape"]), np.uint8)
        else:
            spaces[key] = Box(-np.inf, np.inf, tuple(s["shape"]), dtype)
    return Dict(spaces)


def load_dataset(buffer: ReplayBuffer, dataset: Dataset | str | os.PathLike, mapped: tuple | None = None) -> None:
    """Append every episode of `dataset` to `buffer`; DatasetError names a mismatching key.

    mapped: (observation space, obs_fn): the dataset is checked against that space and the buffer
    gets obs_fn of each episode's observations (MappedReplay)."""
    if not isinstance(dataset, Dataset):
        dataset = Dataset(dataset)
    where = f"dataset {dataset.path}"
    expected = buffer.obs_spec if mapped is None else observation_spec(mapped[0])
    compare_observation_specs(dataset.observation_spec, expected, where,
                              "the replay buffer" if mapped is None else "the env")
    if tuple(dataset.action_spec["shape"]) != buffer.action_shape:
        raise DatasetError(f"{where}: action shape {tuple(dataset.action_spec['shape'])} in the dataset but "
                           f"{buffer.action_shape} in the replay buffer")
    for ep in dataset:  # an episode stopped without a terminal flag bootstraps from its last obs
        obs = ep["obs"] if mapped is None else mapped[1](ep["obs"])
        buffer.add_episode(obs, ep["action"], ep["reward"], ep["terminated"], ep["truncated"], ep["intervention"])


def _concat(parts: list[dict]) -> dict:
    """Batches (nested dicts of arrays) joined along the batch axis."""
    return {k: _concat([p[k] for p in parts]) if isinstance(v, dict) else np.concatenate([p[k] for p in parts])
            for k, v in parts[0].items()}


class MappedReplay:
    """A replay that stores `obs_fn(obs)` of every observation added, e.g. a frozen encoder's features in
    place of the frames they came from (SERLAgent.replay_view): the features are computed once per env
    step instead of once per sample, and a batch copies 2 KB per camera instead of a frame. Everything
    else (sampling, sizes, save and load, the online and demo buffers) is the inner replay's."""

    def __init__(self, inner, obs_fn: Callable[[Mapping[str, np.ndarray]], dict]):
        self.inner, self.obs_fn = inner, obs_fn

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __len__(self) -> int:
        return len(self.inner)

    def add_first(self, obs: Mapping[str, np.ndarray]) -> None:
        self.inner.add_first(self.obs_fn(obs))

    def add(self, action, reward: float, next_obs: Mapping[str, np.ndarray], terminated: bool, truncated: bool,
            intervention: bool = False) -> None:
        self.inner.add(action, reward, self.obs_fn(next_obs), terminated, truncated, intervention)


class MixedReplay:
    """Online + demo buffers; each batch takes round(batch * demo_ratio) transitions from the demos.

    Steps added with intervention=True (a human took over) go to both buffers; in the demo buffer
    each intervention run becomes its own segment, ended (bootstrapping) when the human lets go.
    """

    def __init__(self, online: ReplayBuffer, demo: ReplayBuffer, demo_ratio: float = 0.5):
        if not 0.0 <= demo_ratio <= 1.0:
            raise ValueError(f"MixedReplay: demo_ratio must be in [0, 1], got {demo_ratio}")
        try:
            compare_observation_specs(demo.obs_spec, online.obs_spec, "MixedReplay demo buffer", "the online buffer")
        except DatasetError as err:
            raise ValueError(str(err)) from None
        for field in ("action_shape", "frame_stack"):
            if getattr(demo, field) != getattr(online, field):
                raise ValueError(f"MixedReplay: demo buffer has {field}={getattr(demo, field)}, "
                                 f"online buffer {getattr(online, field)}")
        self.online, self.demo, self.demo_ratio = online, demo, float(demo_ratio)
        self.device = online.device
        self._last_obs: dict[str, np.ndarray] | None = None
        self._demo_open = False

    def __len__(self) -> int:
        return len(self.online) + len(self.demo)

    def nbytes(self) -> int:
        return self.online.nbytes() + self.demo.nbytes()

    def add_first(self, obs: Mapping[str, np.ndarray]) -> None:
        self.online.add_first(obs)
        self._end_demo_segment()
        self._last_obs = {k: np.array(v) for k, v in obs.items()}

    def add(self, action, reward: float, next_obs: Mapping[str, np.ndarray], terminated: bool, truncated: bool,
            intervention: bool = False) -> None:
        self.online.add(action, reward, next_obs, terminated, truncated, intervention)
        if intervention:
            if not self._demo_open:
                if self._last_obs is None:
                    raise RuntimeError("MixedReplay: call add_first(obs) before adding steps")
                self.demo.add_first(self._last_obs)
                self._demo_open = True
            self.demo.add(action, reward, next_obs, terminated, truncated, intervention=True)
            self._demo_open = not (terminated or truncated)
        else:
            self._end_demo_segment()
        self._last_obs = {k: np.array(v) for k, v in next_obs.items()}

    def _end_demo_segment(self) -> None:
        if self._demo_open:
            self.demo.end_episode()
            self._demo_open = False

    def split(self, batch_size: int) -> tuple[int, int]:
        """(from demo, from online) for one batch; an empty buffer gives its share to the other."""
        if len(self.demo) == 0 and len(self.online) == 0:
            raise ValueError("MixedReplay: both buffers are empty")
        if len(self.demo) == 0:
            return 0, batch_size
        if len(self.online) == 0:
            return batch_size, 0
        n_demo = int(round(batch_size * self.demo_ratio))
        return n_demo, batch_size - n_demo

    def sample_arrays(self, batch_size: int, rng: np.random.Generator | None = None) -> dict:
        n_demo, n_online = self.split(batch_size)
        # Both halves are written into one preallocated batch: no concatenation copy.
        out = self.online._alloc(batch_size)
        if n_demo:
            self.demo._fill(self.demo.sample_indices(n_demo, rng), out, slice(0, n_demo))
        if n_online:
            self.online._fill(self.online.sample_indices(n_online, rng), out, slice(n_demo, batch_size))
        return self.online._present(out)

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> dict:
        """Demo transitions first, then online ones, as one batch on the online buffer's device."""
        return batch_to_torch(self.sample_arrays(batch_size, rng), self.device)

    def sample_chunks(self, batch_size: int, obs_horizon: int, chunk: int,
                      rng: np.random.Generator | None = None) -> dict:
        """Chunk transitions (ReplayBuffer.chunk_arrays), demo ones first, in the split of `sample`."""
        n_demo, n_online = self.split(batch_size)
        parts = [buf.chunk_arrays(buf.sample_indices(n, rng), obs_horizon, chunk)
                 for buf, n in ((self.demo, n_demo), (self.online, n_online)) if n]
        return batch_to_torch(_concat(parts), self.device)

    def sample_windows(self, batch_size: int, obs_horizon: int, action_horizon: int,
                       rng: np.random.Generator | None = None) -> dict:
        """Windows (ReplayBuffer.window_arrays), demo ones first, in the split of `sample`."""
        n_demo, n_online = self.split(batch_size)
        parts = [buf.window_arrays(buf.sample_indices(n, rng), obs_horizon, action_horizon)
                 for buf, n in ((self.demo, n_demo), (self.online, n_online)) if n]
        return batch_to_torch(_concat(parts), self.device)

    def save(self, path: str | os.PathLike) -> None:
        """Both buffers in one HDF5 file (groups online/ and demo/), written atomically."""
        def write(f: h5py.File) -> None:
            f.attrs["demo_ratio"] = self.demo_ratio
            self.online._write_group(f.create_group("online"))
            self.demo._write_group(f.create_group("demo"))
        _save_h5(path, write)

    def load(self, path: str | os.PathLike) -> None:
        """Restore both buffers; continue with add_first (an open intervention segment is ended)."""
        def read(f: h5py.File) -> None:
            self.online._read_group(f["online"], f"{path}:online")
            self.demo._read_group(f["demo"], f"{path}:demo")
        _load_h5(path, read)
        self.demo.end_episode()
        self._demo_open, self._last_obs = False, None
