"""What actors and learners send each other: safetensors bytes with a JSON header, never pickle.

Two kinds, both carrying the agent spec (agent name, observation keys/shapes/dtypes, action shape,
env settings) so a receiver refuses a mismatch by name before anything is stored or loaded:
- an episode: obs (T+1, ...) per key, action (T, A), reward/terminated/truncated/intervention (T,);
- weights: an agent's state_dict, its config (agent.config_dict()) and a version (learner updates).
The ROS nodes put these bytes in std_msgs/UInt8MultiArray (docs/actor_learner.md).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as np_load, save as np_save
from safetensors.torch import load as torch_load, save as torch_save

FORMAT = "robolearn-payload/1"
EPISODE, WEIGHTS = "episode", "weights"
STEP_KEYS = ("action", "reward", "terminated", "truncated", "intervention")
# state_dict entries that stay with the learner: optimizer moments, and random streams (an actor loading the
# learner's would replay the same exploration noise after every weights message).
LEARNER_ONLY = ("optim/", "rng/")


class PayloadError(ValueError):
    """A payload that cannot be used: not ours, damaged, the wrong kind, or for another agent/robot."""


def env_spec(env, agent: str) -> dict:
    """The spec both sides compare: agent name, observation spaces, action shape, env settings."""
    obs = {k: {"shape": list(v.shape), "dtype": np.dtype(v.dtype).name} for k, v in env.observation_space.spaces.items()}
    spec = {"agent": agent, "observation_space": obs, "action_shape": list(env.action_space.shape)}
    cfg = getattr(env.unwrapped, "cfg", None)
    for field in ("control_hz", "max_episode_steps", "action_mode", "action_scale", "reward_type",
                  "terminate_on_success"):
        if cfg is not None and hasattr(cfg, field):
            spec.setdefault("env", {})[field] = getattr(cfg, field)
    return json.loads(json.dumps(spec))


def spec_mismatches(ours: dict, theirs: dict) -> list[str]:
    """Every field where two specs differ, named (`observation_space['state']: ours ..., theirs ...`)."""
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}[{k!r}]: ours {a.get(k)}, theirs {b.get(k)}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: ours {a!r}, theirs {b!r}")
    return out


def check_spec(ours: dict, theirs: dict, what: str) -> None:
    bad = spec_mismatches(ours, theirs)
    if bad:
        raise PayloadError(f"{what} is for another agent or robot: " + "; ".join(bad))


def _header(kind: str, spec: dict, meta: dict) -> dict[str, str]:
    return {"format": FORMAT, "kind": kind, "spec": json.dumps(spec), "meta": json.dumps(meta)}


def _read_header(data: bytes, kind: str, what: str) -> tuple[dict, dict]:
    if len(data) < 8:
        raise PayloadError(f"{what}: {len(data)} bytes is not a safetensors payload")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n]) if 0 < n <= len(data) - 8 else None
        info = header.get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        header = None
    if header is None:
        raise PayloadError(f"{what}: not a safetensors payload (damaged header)")
    if info.get("format") != FORMAT:
        raise PayloadError(f"{what}: format {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("kind") != kind:
        raise PayloadError(f"{what}: a {info.get('kind')!r} payload where a {kind!r} one was expected")
    try:
        spec, meta = json.loads(info["spec"]), json.loads(info["meta"])
        obs = spec["observation_space"]
        ok = isinstance(meta, dict) and isinstance(spec["action_shape"], list) and isinstance(obs, dict) and all(
            isinstance(v["shape"], list) and isinstance(v["dtype"], str) for v in obs.values())
    except (KeyError, ValueError, TypeError) as err:
        raise PayloadError(f"{what}: damaged metadata ({err!r})") from None
    if not ok:
        raise PayloadError(f"{what}: damaged metadata (spec needs observation_space {{key: {{shape, dtype}}}} and "
                           "action_shape; meta a mapping)")
    return spec, meta


def _open(data: bytes, kind: str, spec: dict | None, what: str, load) -> tuple[dict, dict, dict]:
    """(tensors, spec, meta) of a payload of `kind`, its spec checked against `spec` before the tensors are read."""
    theirs, meta = _read_header(data, kind, what)
    if spec is not None:
        check_spec(spec, theirs, what)
    try:
        return load(data), theirs, meta
    except (SafetensorError, ValueError) as err:
        raise PayloadError(f"{what}: damaged tensors ({err})") from None


def pack_episode(episode: dict, spec: dict, meta: dict) -> bytes:
    """episode: {"obs": {key: (T+1, ...)}, "action": (T, A), "reward", "terminated", "truncated",
    "intervention": (T,)}; meta: actor, index, success, ... (JSON)."""
    arrays = {f"obs/{k}": np.ascontiguousarray(v) for k, v in episode["obs"].items()}
    arrays["action"] = np.ascontiguousarray(episode["action"], np.float32)
    arrays["reward"] = np.ascontiguousarray(episode["reward"], np.float32)
    for key in STEP_KEYS[2:]:
        arrays[key] = np.ascontiguousarray(episode.get(key, np.zeros(len(arrays["action"]), bool)), np.uint8)
    return np_save(arrays, metadata=_header(EPISODE, spec, meta))


def unpack_episode(data: bytes, spec: dict | None = None, what: str = "episode") -> tuple[dict, dict, dict]:
    """(episode, its spec, meta); checks the spec against `spec` and every array's shape, dtype and finiteness."""
    arrays, theirs, meta = _open(data, EPISODE, spec, what, np_load)
    obs = {k[4:]: v for k, v in arrays.items() if k.startswith("obs/")}
    missing = [k for k in ("action", *STEP_KEYS[1:]) if k not in arrays]
    if missing:
        raise PayloadError(f"{what}: missing {', '.join(missing)}")
    T = len(arrays["action"])
    if T < 1:
        raise PayloadError(f"{what}: no steps")
    want = theirs["observation_space"]
    if sorted(obs) != sorted(want):
        raise PayloadError(f"{what}: observation keys {sorted(obs)}, spec has {sorted(want)}")
    for k, v in obs.items():
        shape, dtype = [T + 1, *want[k]["shape"]], want[k]["dtype"]
        if list(v.shape) != shape or v.dtype.name != dtype:
            raise PayloadError(f"{what}: obs {k!r} is {list(v.shape)} {v.dtype.name}, expected {shape} {dtype}")
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise PayloadError(f"{what}: obs {k!r} is not finite at step {int(np.argwhere(~np.isfinite(v))[0][0])}")
    if list(arrays["action"].shape) != [T, *theirs["action_shape"]]:
        raise PayloadError(f"{what}: action is {list(arrays['action'].shape)}, expected {[T, *theirs['action_shape']]}")
    for key in STEP_KEYS[1:]:
        if arrays[key].shape != (T,):
            raise PayloadError(f"{what}: {key} has shape {list(arrays[key].shape)}, expected [{T}]")
    for key in ("action", "reward"):
        if not np.isfinite(arrays[key]).all():
            raise PayloadError(f"{what}: {key} is not finite")
    for key in ("terminated", "truncated"):
        early = np.flatnonzero(arrays[key][:-1])
        if early.size:
            raise PayloadError(f"{what}: {key} at step {int(early[0])} of {T}; only the last step may end an episode")
    episode = {"obs": obs, "action": arrays["action"], "reward": arrays["reward"],
               **{k: arrays[k].astype(bool) for k in STEP_KEYS[2:]}}
    return episode, theirs, meta


def pack_weights(state: dict[str, torch.Tensor], spec: dict, config: dict, version: int, meta: dict | None = None) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return torch_save(tensors, metadata=_header(WEIGHTS, spec, {"config": config, "version": int(version),
                                                                **(meta or {})}))


def unpack_weights(data: bytes, spec: dict | None = None, what: str = "weights") -> tuple[dict, dict, dict]:
    """(state_dict, spec, meta with config and version); non-finite weights are refused by tensor name."""
    state, theirs, meta = _open(data, WEIGHTS, spec, what, torch_load)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise PayloadError(f"{what}: non-finite tensors {bad[:3]}")
    return state, theirs, meta
