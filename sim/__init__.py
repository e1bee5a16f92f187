"""Simulation: MuJoCo models, tasks, the gymnasium registry, pixel wrappers and scripted experts."""

from robolearn.sim.gl import choose_mujoco_gl

choose_mujoco_gl()
