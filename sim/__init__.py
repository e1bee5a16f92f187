"""Simulation: MuJoCo models, tasks, the gymnasium registry, pixel wrappers and scripted experts."""

from robolearn.sim.gl import choose_mujoco_gl

choose_mujoco_gl()

try:
    import dm_control  # noqa: F401
    import mujoco  # noqa: F401
except ImportError as err:  # the agents, replay, datasets and ROS side work without them
    raise ImportError(f"robolearn.sim needs MuJoCo and dm_control ({err}); install the simulator extra: "
                      "pip install 'robolearn[sim]'") from err

from robolearn.sim.registry import UnknownEnvError, all_ids, make, register_all  # noqa: E402

register_all()

__all__ = ["make", "all_ids", "UnknownEnvError"]
