"""The gymnasium registry of robolearn tasks, and `make` with a clear error for unknown ids."""

from __future__ import annotations

from dataclasses import fields, replace

import gymnasium as gym

from robolearn.sim import dmc

PANDA_TASKS = {"Reach": "reach", "PickCube": "pick_cube", "PegInsert": "peg_insert"}


class UnknownEnvError(ValueError):
    """An env id that robolearn does not register."""


def _task(name: str):
    if name == "reach":
        from robolearn.sim.tasks.reach import Reach
        return Reach()
    if name == "pick_cube":
        from robolearn.sim.tasks.pick_cube import PickCube
        return PickCube()
    if name == "peg_insert":
        from robolearn.sim.tasks.peg_insert import PegInsert
        return PegInsert()
    raise UnknownEnvError(f"unknown Panda task {name!r}; valid: {sorted(PANDA_TASKS.values())}")


def make_panda(task: str, pixels: bool = False, env_id: str | None = None, render_mode=None, **overrides):
    """The robot env for a Panda `task`; keyword overrides set PandaEnvConfig fields (image_size=64 ...)."""
    from robolearn.sim.panda_env import PandaEnvConfig, make_panda_env
    t = _task(task)
    base = t.default_env_config() if hasattr(t, "default_env_config") else PandaEnvConfig()
    valid = {f.name for f in fields(PandaEnvConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"{env_id or task}: unknown option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    if "cameras" in overrides:
        overrides["cameras"] = tuple(overrides["cameras"])
    cfg = replace(base, pixels=pixels, **overrides)
    return make_panda_env(t, cfg, render_mode=render_mode, env_id=env_id)


def panda_ids() -> list[str]:
    return [f"robolearn/Panda{name}{suffix}-v0" for name in PANDA_TASKS for suffix in ("", "Pixels")]


def all_ids() -> list[str]:
    return panda_ids() + [dmc.env_id(t) for t in dmc.DMC_TASK_NAMES]


def register_all() -> None:
    for name, task in PANDA_TASKS.items():
        for suffix, pixels in (("", False), ("Pixels", True)):
            env_id = f"robolearn/Panda{name}{suffix}-v0"
            if env_id not in gym.registry:
                gym.register(env_id, entry_point="robolearn.sim.registry:make_panda",
                             kwargs={"task": task, "pixels": pixels, "env_id": env_id})
    for task in dmc.DMC_TASK_NAMES:
        if dmc.env_id(task) not in gym.registry:
            gym.register(dmc.env_id(task), entry_point="robolearn.sim.dmc:DMCEnv", kwargs={"task": task})


def make(env_id: str, **kwargs) -> gym.Env:
    """gymnasium.make for robolearn ids; an unknown id raises UnknownEnvError listing valid ones."""
    ids = all_ids()
    if env_id not in ids:
        import difflib
        close = difflib.get_close_matches(env_id, ids, n=3)
        hint = f" Did you mean {close}?" if close else ""
        panda = ", ".join(panda_ids())
        raise UnknownEnvError(f"unknown env id {env_id!r}.{hint} Panda tasks: {panda}; "
                              f"dm_control tasks: robolearn/dmc-<domain>_<task>-v0 "
                              f"({len(dmc.DMC_TASK_NAMES)} of them; `robolearn envs` lists all). Another "
                              f"gymnasium env: register it first (--import-module PKG) or pass 'PKG:Id'.")
    env = gym.make(env_id, **kwargs)
    if env_id not in panda_ids():  # dm_control's suite has rewards, not success: no unreported-success warning
        env.unwrapped.metadata = {**env.unwrapped.metadata, "reports_success": False}
    return env
