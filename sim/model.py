"""Loading and composing MJCF, with errors that name the file and MuJoCo's reason."""

from __future__ import annotations

from pathlib import Path

import mujoco

ASSETS = Path(__file__).parent / "assets"


class ModelError(ValueError):
    """An MJCF file that MuJoCo cannot load or compile."""


def load_spec(path: str | Path) -> mujoco.MjSpec:
    """Parse an MJCF file into an editable spec; a bad file raises ModelError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"MJCF file not found: {path}")
    try:
        return mujoco.MjSpec.from_file(str(path))
    except ValueError as err:  # MuJoCo's message carries the element and line number
        raise ModelError(f"cannot parse MJCF {path}: {err}") from None


def compile_spec(spec: mujoco.MjSpec, origin: str) -> mujoco.MjModel:
    try:
        return spec.compile()
    except ValueError as err:
        raise ModelError(f"cannot compile MJCF {origin}: {err}") from None


def load_model(path: str | Path) -> mujoco.MjModel:
    return compile_spec(load_spec(path), str(path))
