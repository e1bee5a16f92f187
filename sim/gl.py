"""Pick a headless MuJoCo GL backend before anything creates a rendering context."""

from __future__ import annotations

import os


def has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")


def choose_mujoco_gl() -> str:
    """Set MUJOCO_GL (and PYOPENGL_PLATFORM) unless the user already chose; return the choice.

    osmesa on CPU machines (EGL through llvmpipe is slower there), egl where an NVIDIA GPU is
    present. A display is never assumed: robolearn runs headless over SSH and in CI.
    """
    backend = os.environ.get("MUJOCO_GL") or ("egl" if has_nvidia_gpu() else "osmesa")
    os.environ["MUJOCO_GL"] = backend
    if backend in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def check_headless_context() -> None:
    """Raise a clear error if mujoco was imported with GLFW where there is no display."""
    import mujoco

    ctx = getattr(mujoco, "GLContext", None)
    if ctx is not None and ctx.__module__.endswith("glfw") and not os.environ.get("DISPLAY"):
        raise RuntimeError("mujoco was imported before robolearn.sim could choose a headless GL backend, and "
                           "there is no display: set MUJOCO_GL=osmesa (CPU) or MUJOCO_GL=egl (GPU) in the "
                           "environment, or import robolearn.sim before mujoco")
