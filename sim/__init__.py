"""Simulation: MuJoCo models, tasks, the gymnasium registry, pixel wrappers and scripted experts."""

from robolearn.sim.gl import choose_mujoco_gl

choose_mujoco_gl()

from robolearn.sim.registry import UnknownEnvError, all_ids, make, register_all  # noqa: E402

register_all()

__all__ = ["make", "all_ids", "UnknownEnvError"]
