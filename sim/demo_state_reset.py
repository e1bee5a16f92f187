"""Episodes that start from states along recorded demonstrations, as SnapshotRL does, in simulation.

A dataset stores actions and observations, not MuJoCo's state, so the states are rebuilt: each demo is
replayed in the env from its recorded reset seed (the simulator is deterministic), its replayed joint
positions and observations checked against the recorded ones, and the full integration state
(mj_getState, mjSTATE_INTEGRATION) kept after every step. A reset then restores one of them with
probability `prob`, the episode drawn uniformly and the step uniformly along it; otherwise the
env's own reset runs. Chosen with the env options `reset_from_demos=DIR` and `demo_state_prob`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mujoco
import numpy as np

STATE = mujoco.mjtState.mjSTATE_INTEGRATION  # everything mj_step reads: qpos, qvel, act, ctrl, mocap, warmstart
OBS_ATOL = 1e-5  # float32 observations of a deterministic replay agree to rounding
JOINT_ATOL = 1e-9  # rad; joint positions are stored as float64


def _task_id(env_id: str) -> str:
    return str(env_id).replace("Pixels", "")  # one task's state and pixel variants share their physics


def replay_states(robot, path: str | Path, where: str) -> tuple[list[np.ndarray], list[str]]:
    """(per episode a (T+1, n) array of MuJoCo states, episode file names) of every demo that replays;
    an episode that drifts from its recording is skipped with a warning naming it and the step."""
    from robolearn.demos.dataset import Dataset, DatasetError

    try:
        ds = Dataset(path).require_episodes(f"for {where}: reset_from_demos")
    except DatasetError as err:
        raise ValueError(f"{where}: reset_from_demos: {err}") from None
    if _task_id(ds.env_id) != _task_id(robot.env_id):
        raise ValueError(f"{where}: reset_from_demos {path} holds {ds.env_id} demonstrations, not {robot.env_id}")
    if list(ds.action_spec["shape"]) != list(robot.action_space.shape):
        raise ValueError(f"{where}: reset_from_demos {path} has action shape {ds.action_spec['shape']}, the env "
                         f"{list(robot.action_space.shape)} (action_mode?)")
    m, d = robot.arm.model, robot.arm.data
    saved_rng = robot._np_random, getattr(robot, "_np_random_seed", None)  # the replay's seeds are not the user's
    states, names = [], []
    for i, file in enumerate(ds.paths):
        seed = ds.episode_attrs(i).get("seed")
        if not isinstance(seed, int):
            raise ValueError(f"{where}: reset_from_demos: {file} has no integer 'seed' attribute to replay it from")
        ep = ds.episode(i)
        rows = [np.empty(mujoco.mj_stateSize(m, STATE)) for _ in range(len(ep["action"]) + 1)]
        obs, _ = robot.reset(seed=seed)
        drift = _drift(robot, obs, ep, 0)
        mujoco.mj_getState(m, d, rows[0], STATE)
        for t, action in enumerate(ep["action"]):
            if drift:
                break
            obs, *_ = robot.step(action)
            drift = _drift(robot, obs, ep, t + 1)
            mujoco.mj_getState(m, d, rows[t + 1], STATE)
        if drift:
            warnings.warn(f"{where}: reset_from_demos: skipping {file}: its replay drifts from the recording "
                          f"({drift}); recorded with other env options, or not in lockstep?", stacklevel=2)
            continue
        states.append(np.stack(rows))
        names.append(file.name)
    robot._np_random = saved_rng[0]
    if hasattr(robot, "_np_random_seed"):
        robot._np_random_seed = saved_rng[1]
    if not states:
        raise ValueError(f"{where}: reset_from_demos: none of the {len(ds)} episodes in {path} replays in this env "
                         "(see the warnings); record them with the same env options")
    return states, names


def _drift(robot, obs: dict, ep: dict, t: int) -> str:
    """'' when the replay at step t matches the recording, else what differs."""
    for key in ("state", "tcp_pose"):
        if key not in ep["obs"] or ep["obs"][key][t].shape != obs[key].shape:
            continue  # a pixel env replaying state demos: its state has no object part
        err = float(np.max(np.abs(obs[key] - ep["obs"][key][t])))
        if err > OBS_ATOL:
            return f"obs {key} differs by {err:.2g} at step {t}"
    if "robot" in ep and len(ep["robot"]["joint_position"][t]) == len(robot.state.position):
        err = float(np.max(np.abs(robot.state.position - ep["robot"]["joint_position"][t])))
        if err > JOINT_ATOL:
            return f"joint positions differ by {err:.2g} rad at step {t}"
    return ""


class DemoStateReset:
    """ResetHandler: with probability `prob` a recorded demo state (episode, then step, uniform), else `inner`."""

    def __init__(self, arm, inner, states: list[np.ndarray], names: list[str], prob: float):
        self.arm, self.inner, self.states, self.names, self.prob = arm, inner, states, names, float(prob)

    def reset(self, rng: np.random.Generator) -> dict:
        if not self.states or rng.random() >= self.prob:
            return self.inner.reset(rng)
        i = int(rng.integers(len(self.states)))
        k = int(rng.integers(len(self.states[i]) - 1))  # not the last state: the demo ended there
        self.restore(i, k)
        return {"reset": "demo_state", "demo_episode": i, "demo_step": k, "demo_file": self.names[i]}

    def restore(self, episode: int, step: int) -> None:
        m, d = self.arm.model, self.arm.data
        mujoco.mj_setState(m, d, self.states[episode][step], STATE)
        mujoco.mj_forward(m, d)  # positions, contacts and sensors of the restored state for the first observation


def use_demo_states(env, path: str | Path, prob: float = 0.5) -> DemoStateReset:
    """Replace a MuJoCo RobotEnv's reset handler by a DemoStateReset over the demos in `path`; returns it."""
    robot = getattr(env, "unwrapped", env)
    where = robot.env_id
    if not 0 <= prob <= 1:
        raise ValueError(f"{where}: demo_state_prob must be in [0, 1], got {prob!r}")
    if not Path(path).is_dir():
        raise ValueError(f"{where}: reset_from_demos {str(path)!r} is not a dataset directory")
    inner = robot.resetter.inner if isinstance(robot.resetter, DemoStateReset) else robot.resetter
    robot.resetter = inner  # the replay uses the env's own reset
    states, names = replay_states(robot, path, where) if prob > 0 else ([], [])
    robot.resetter = DemoStateReset(robot.arm, inner, states, names, prob)
    return robot.resetter
