"""Checkpoints: safetensors weights + JSON config, written atomically, never pickle.

Layout of a run directory:
    runs/NAME/checkpoints/step_000001000/
        weights.safetensors   every tensor of the agent (networks, targets, optimizer moments)
        rng.safetensors       torch RNG state(s)
        config.json           agent name and config, env id, observation/action spec, and
                              weights_sha256: the sha256 of weights.safetensors, checked on load
        state.json            step counters, numpy RNG state, metrics history
        replay.h5             the replay buffer(s), when saved for resuming
    runs/NAME/checkpoints/latest.json   {"path": "step_000001000", "step": 1000}

A checkpoint directory is assembled under a temporary name and renamed to a name no other
checkpoint has (a step saved again becomes step_N.1, step_N.2 ...). Replacing latest.json is
the one moment it becomes current, and older checkpoints are removed only after that, so a kill
at any moment leaves latest.json pointing at a complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"step_(\d+)(?:\.(\d+))?")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not match the agent or env."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are missing, unreadable, or fail their checksum."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes through a temporary file, fsync and an atomic rename: a crash leaves old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # the rename itself survives a power cut


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _order(path: Path) -> tuple[int, int]:
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)), int(m.group(2) or 0)


def _checkpoint_dirs(root: Path) -> list[Path]:
    """The step directories under `root`, oldest first."""
    return sorted((p for p in root.glob("step_*") if _NAME.fullmatch(p.name) and p.is_dir()), key=_order)


def save_checkpoint(ckpt_root: str | Path, step: int, weights: dict[str, torch.Tensor], config: dict,
                    state: dict, extra_files: dict[str, callable] | None = None, keep: int = 2) -> Path:
    """Write one checkpoint atomically and point latest.json at it; keep the newest `keep`.

    extra_files maps a file name to a function writing that file given its path (replay.h5).
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:012d}"
    tmp = root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(weights), str(tmp / "weights.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    digest = hashlib.sha256((tmp / "weights.safetensors").read_bytes()).hexdigest()
    write_json(tmp / "config.json", {**config, "weights_sha256": digest})
    write_json(tmp / "state.json", state)
    for fname, writer in (extra_files or {}).items():
        writer(tmp / fname)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    # A step saved again (the loop's final save, a resume from an older checkpoint) gets a new
    # name: the copy latest.json may point at stays until its replacement is current.
    final, revision = root / name, 0
    while final.exists():
        revision += 1
        final = root / f"{name}.{revision}"
    os.replace(tmp, final)
    _fsync_dir(root)
    write_json(root / "latest.json", {"path": final.name, "step": step})
    _fsync_dir(root)
    # Older steps beyond `keep`, other copies of this step, and steps past it (left by a run
    # resumed from an older checkpoint) go only now.
    older = [p for p in _checkpoint_dirs(root) if _order(p)[0] < step]
    kept = {final, *older[max(0, len(older) - keep + 1):]}
    for old in [*_checkpoint_dirs(root), *root.glob(".step_*.partial")]:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _ckpt_root(path: Path) -> Path | None:
    """The checkpoints directory at or under `path` (with latest.json or step directories), if any."""
    for root in (path / "checkpoints", path):
        if (root / "latest.json").is_file() or _checkpoint_dirs(root):
            return root
    return None


def _latest(root: Path) -> Path:
    """The checkpoint latest.json names; it must be a directory directly inside `root`."""
    latest = root / "latest.json"
    try:
        name = json.loads(latest.read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointDamaged(f"{latest} is corrupt: {err}") from None
    target = root / str(name)
    if (not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
            or target.resolve().parent != root.resolve()):
        raise CheckpointError(f"{latest} names {name!r}, outside {root}; a checkpoint must be one of its "
                              "step directories")
    if not (target / "weights.safetensors").is_file():
        raise CheckpointDamaged(f"{latest} points at {target}, which is incomplete or missing")
    return target


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run dir, a checkpoints dir, or the step directory itself."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if (root / "latest.json").is_file():
            return _latest(root)
    if (path / "weights.safetensors").is_file():
        return path
    raise CheckpointError(f"no checkpoint at {path} (expected a run dir, checkpoints/latest.json, "
                          "or a directory with weights.safetensors)")


def read_config(path: str | Path) -> dict:
    """config.json of the checkpoint at or under `path`, without reading the weights."""
    ckpt = resolve(path)
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointDamaged(f"cannot read {ckpt / 'config.json'}: {err}") from None


def _load(ckpt: Path) -> tuple[Path, dict[str, torch.Tensor], dict, dict]:
    try:
        config = json.loads((ckpt / "config.json").read_text())
        state = json.loads((ckpt / "state.json").read_text())
        data = (ckpt / "weights.safetensors").read_bytes()
        expected = config.get("weights_sha256")  # absent in checkpoints written before it was added
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ValueError("weights.safetensors fails its checksum (weights_sha256 in config.json): "
                             "the file was damaged or changed after it was saved")
        weights = load_tensors(data)
    except (OSError, ValueError) as err:  # safetensors raises its own subclasses of these
        raise CheckpointDamaged(f"cannot read checkpoint {ckpt}: {err}") from None
    return ckpt, weights, config, state


def load_checkpoint(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict, dict]:
    """(directory, weights, config, state) of the checkpoint at or under `path`, its weights verified."""
    return _load(resolve(path))


def load_newest_good(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict, dict, list[str]]:
    """load_checkpoint, falling back past damaged checkpoints to the older ones kept beside them.

    The fifth element says why each skipped checkpoint was skipped (empty when latest is intact)."""
    path = Path(path)
    root = _ckpt_root(path)
    if root is None:
        return (*load_checkpoint(path), [])
    skipped, first = [], []
    if (root / "latest.json").is_file():
        try:
            first = [_latest(root)]
        except CheckpointDamaged as err:
            skipped.append(str(err))
    for ckpt in dict.fromkeys([*first, *reversed(_checkpoint_dirs(root))]):
        try:
            return (*_load(ckpt), skipped)
        except CheckpointDamaged as err:
            skipped.append(str(err))
    raise CheckpointError(f"no intact checkpoint in {root}: " + "; ".join(skipped))


def last_good(path: str | Path) -> Path | None:
    """The newest checkpoint at or under `path` whose files load and pass their checksum, if any."""
    try:
        return load_newest_good(path)[0]
    except CheckpointError:
        return None


def restore_torch_rng(ckpt: Path) -> None:
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def check_matches(config: dict, expected: dict, where: Path) -> None:
    """Raise naming every field (agent, env id, spaces) where the checkpoint differs from expected."""
    diffs = [f"{k}: checkpoint has {config.get(k)!r}, expected {v!r}" for k, v in expected.items()
             if config.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {where} does not match: " + "; ".join(diffs))
