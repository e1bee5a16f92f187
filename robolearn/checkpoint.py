"""Checkpoints: safetensors weights + JSON config, written atomically, never pickle.

Layout of a run directory:
    runs/NAME/checkpoints/step_000001000/
        weights.safetensors   every tensor of the agent (networks, targets, optimizer moments)
        rng.safetensors       torch RNG state(s)
        config.json           agent name and config, env id, observation/action spec
        state.json            step counters, numpy RNG state, metrics history
        replay.h5             the replay buffer(s), when saved for resuming
    runs/NAME/checkpoints/latest.json   {"path": "step_000001000"}

A checkpoint directory is assembled under a temporary name and renamed into place, and
latest.json is replaced atomically after that, so a crash at any moment leaves the previous
checkpoint intact and `latest` always points at a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not match the agent or env."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(ckpt_root: str | Path, step: int, weights: dict[str, torch.Tensor], config: dict,
                    state: dict, extra_files: dict[str, callable] | None = None, keep: int = 2) -> Path:
    """Write one checkpoint atomically and point latest.json at it; keep the newest `keep`.

    extra_files maps a file name to a function writing that file given its path (replay.h5).
    """
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:012d}"
    final, tmp = root / name, root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(weights), str(tmp / "weights.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, str(tmp / "rng.safetensors"))
    write_json(tmp / "config.json", config)
    write_json(tmp / "state.json", state)
    for fname, writer in (extra_files or {}).items():
        writer(tmp / fname)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_json(root / "latest.json", {"path": name, "step": step})
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a run dir, a checkpoints dir, or the step directory itself."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        latest = root / "latest.json"
        if latest.is_file():
            try:
                target = root / json.loads(latest.read_text())["path"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{latest} is corrupt: {err}") from None
            if not (target / "weights.safetensors").is_file():
                raise CheckpointError(f"{latest} points at {target}, which is incomplete or missing")
            return target
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
        raise CheckpointError(f"cannot read {ckpt / 'config.json'}: {err}") from None


def load_checkpoint(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict, dict]:
    """(directory, weights, config, state) of the checkpoint at or under `path`."""
    ckpt = resolve(path)
    try:
        weights = load_file(str(ckpt / "weights.safetensors"))
        config = json.loads((ckpt / "config.json").read_text())
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as err:  # safetensors raises its own subclasses of these
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {err}") from None
    return ckpt, weights, config, state


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
