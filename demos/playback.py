"""Replay a recorded episode: its actions in the simulator from the stored seed, or its camera frames.

With a stored `seed` (write_expert_episodes, `robolearn rollout --record` and the recorder store
one) the env is reset with it and fed the recorded actions; the episode reproduces when every
float observation, reward and robot state value stays within REPRODUCED_ATOL of the recording
(MuJoCo is deterministic on one machine and build). Without a seed only the recorded frames can
be shown.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from robolearn.demos.convert import env_kwargs_for, image_keys
from robolearn.demos.dataset import Dataset, DatasetError, robot_row, robot_state

REPRODUCED_ATOL = 1e-4  # max abs difference of a float observation, reward or robot state that counts as equal
ROBOT_COMPARED = ("joint_position", "joint_velocity", "tool_pose", "gripper")  # not `stamp`: a clock, not state


@dataclass
class Replay:
    episode: int
    steps: int
    seed: int | None
    recorded_success: bool
    fps: float = 10.0
    simulated: bool = False
    replayed_success: bool | None = None
    divergence: dict[str, float] = field(default_factory=dict)  # key (obs, robot/<field>) -> max abs diff
    reward_max_abs_diff: float | None = None
    first_divergent_step: int | None = None  # first obs index where a compared value differs by > REPRODUCED_ATOL
    first_divergent_key: str | None = None  # what differed there: an obs key, "reward", "robot/<field>", "terminated"
    frames: list[np.ndarray] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return self.simulated and self.first_divergent_step is None


def find_episode(ds: Dataset, index: int) -> int:
    """Position in `ds` of the episode file episode_<index>.h5."""
    for pos, path in enumerate(ds.paths):
        if int(path.stem.split("_")[1]) == index:
            return pos
    have = [int(p.stem.split("_")[1]) for p in ds.paths]
    raise DatasetError(f"{ds.path}: no episode {index} (episodes: {have[:20]}{' ...' if len(have) > 20 else ''})")


def recorded_frames(obs: dict[str, np.ndarray], keys: list[str]) -> list[np.ndarray]:
    """One RGB frame per observation: the cameras side by side."""
    frames = []
    for t in range(len(obs[keys[0]])):
        # a frame stack (C = 3k) shows its newest frame; other channel counts their last channel as grey
        views = [obs[k][t][..., -3:] if obs[k].shape[-1] % 3 == 0 else np.repeat(obs[k][t][..., -1:], 3, -1)
                 for k in keys]
        height = max(v.shape[0] for v in views)
        views = [np.pad(v, ((0, height - v.shape[0]), (0, 0), (0, 0))) for v in views]
        frames.append(np.concatenate(views, axis=1))
    return frames


def replay_episode(path: str | os.PathLike, index: int, simulate: bool = True, render: bool = False,
                   frames: bool = False, env_overrides: dict | None = None) -> Replay:
    """Replay episode `index`; `render` keeps the simulator's frames, `frames` the recorded ones."""
    ds = Dataset(path)
    pos = find_episode(ds, index)
    ep, attrs = ds.episode(pos), ds.episode_attrs(pos)
    seed = attrs.get("seed")
    if (simulate or render) and seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise DatasetError(f"{ds.paths[pos]}: attrs field 'seed' is {seed!r}; gymnasium takes an integer >= 0 "
                           "(--no-sim shows the recorded frames)")
    result = Replay(episode=index, steps=int(attrs["length"]), seed=seed, recorded_success=bool(attrs["success"]),
                    fps=ds.fps)
    if render and seed is None:
        raise DatasetError(f"{ds.paths[pos]}: no seed stored, so the episode cannot be replayed in simulation "
                           "(--render); without --render the recorded camera frames are used")
    if seed is not None and (simulate or render):
        _simulate(ds, ep, int(seed), result, render, env_overrides or {})
    if frames:
        cams = image_keys(ds.meta)
        if not cams:
            raise DatasetError(f"{ds.path}: the dataset has no camera images; use --render for the simulator's view")
        result.frames = recorded_frames(ep["obs"], cams)
    return result


def _simulate(ds: Dataset, ep: dict, seed: int, result: Replay, render: bool, overrides: dict) -> None:
    from robolearn.sim import registry

    env_id = ds.env_id
    if env_id not in registry.all_ids():
        raise DatasetError(f"{ds.path}: env {env_id!r} is not a registered simulator task; cannot replay it")
    kwargs = {**env_kwargs_for(env_id, ds.observation_spec), **overrides}
    env = registry.make(env_id, render_mode="rgb_array" if render else None, **kwargs)
    try:
        ds.check_compatible(env)
        obs, _ = env.reset(seed=seed)
        images = [k for k, s in ds.observation_spec.items() if s["dtype"] == "uint8"]
        robot = ep.get("robot") if robot_state(env) is not None else None
        div = {k: 0.0 for k in [*ds.observation_spec, "reward", *(f"robot/{k}" for k in ROBOT_COMPARED if robot)]}
        info = {}

        def compare(t: int, key: str, got, recorded) -> None:
            d = np.abs(np.asarray(got, np.float64) - np.asarray(recorded, np.float64))
            d = float(d.mean() if key in images else d.max())
            d = math.inf if math.isnan(d) else d  # NaN: as far off as it gets
            div[key] = max(div[key], d)
            if key not in images and d > REPRODUCED_ATOL and result.first_divergent_step is None:
                result.first_divergent_step, result.first_divergent_key = t, key

        def observe(t: int, obs: dict) -> None:
            for k in ds.observation_spec:
                compare(t, k, obs[k], ep["obs"][k][t])
            if robot:
                row = robot_row(robot_state(env))
                for k in ROBOT_COMPARED:
                    compare(t, f"robot/{k}", row[k], robot[k][t])

        observe(0, obs)
        if render:
            result.frames.append(env.render())
        for t, action in enumerate(ep["action"]):
            obs, reward, terminated, truncated, info = env.step(action)
            observe(t + 1, obs)
            compare(t + 1, "reward", reward, ep["reward"][t])
            if render:
                result.frames.append(env.render())
            if (terminated or truncated) and t + 1 < len(ep["action"]) and result.first_divergent_step is None:
                result.first_divergent_step, result.first_divergent_key = t + 1, "terminated"
            if terminated or truncated:
                break
        result.simulated = True
        result.reward_max_abs_diff = div.pop("reward")
        result.divergence = div
        result.replayed_success = bool(info.get("success", False))
    finally:
        env.close()


def format_replay(r: Replay) -> str:
    lines = [f"episode {r.episode}: {r.steps} steps, seed {r.seed if r.seed is not None else '-'}, "
             f"recorded success: {'yes' if r.recorded_success else 'no'}"]
    if r.simulated:
        verdict = "reproduced" if r.reproduced else \
            f"diverged from observation {r.first_divergent_step} ({r.first_divergent_key})"
        lines.append(f"replayed in simulation: {verdict}; success: {'yes' if r.replayed_success else 'no'}; "
                     f"max |reward diff| {r.reward_max_abs_diff:.3g}")
        lines.append("divergence (float keys and robot state: max abs; images: max per-frame mean abs pixel "
                     "error):")
        for k, v in r.divergence.items():
            lines.append(f"  {k}: {v:.3g}")
    elif r.seed is None:
        lines.append("no seed stored: not replayed in simulation")
    return "\n".join(lines)
