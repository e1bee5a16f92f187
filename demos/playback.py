"""Replay a recorded episode: its actions in the simulator from the stored seed, or its camera frames.

With a stored `seed` (write_expert_episodes, `robolearn rollout --record` and the recorder store
one) the env is reset with it and fed the recorded actions; the divergence of each observation
key from the recording says whether the episode reproduces (MuJoCo is deterministic on one
machine and build). Without a seed only the recorded frames can be shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from robolearn.demos.convert import env_kwargs_for, image_keys
from robolearn.demos.dataset import Dataset, DatasetError

REPRODUCED_ATOL = 1e-4  # max abs difference of float observations below which a step counts as equal


@dataclass
class Replay:
    episode: int
    steps: int
    seed: int | None
    recorded_success: bool
    fps: float = 10.0
    simulated: bool = False
    replayed_success: bool | None = None
    divergence: dict[str, float] = field(default_factory=dict)  # key -> max abs diff over the episode
    reward_max_abs_diff: float | None = None
    first_divergent_step: int | None = None  # first obs index where a float key differs by > REPRODUCED_ATOL
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
        div = {k: 0.0 for k in ds.observation_spec}
        floats = [k for k, s in ds.observation_spec.items() if s["dtype"] != "uint8"]
        rewards, info = [], {}

        def compare(t: int, obs: dict) -> None:
            for k in div:
                d = np.abs(np.asarray(obs[k], np.float64) - ep["obs"][k][t].astype(np.float64))
                div[k] = max(div[k], float(d.mean() if k not in floats else d.max()))
                if k in floats and result.first_divergent_step is None and d.max() > REPRODUCED_ATOL:
                    result.first_divergent_step = t

        compare(0, obs)
        if render:
            result.frames.append(env.render())
        for t, action in enumerate(ep["action"]):
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(reward)
            compare(t + 1, obs)
            if render:
                result.frames.append(env.render())
            if (terminated or truncated) and t + 1 < len(ep["action"]):
                result.first_divergent_step = t + 1 if result.first_divergent_step is None \
                    else result.first_divergent_step
                break
        result.simulated = True
        result.divergence = div
        result.replayed_success = bool(info.get("success", False))
        n = len(rewards)
        result.reward_max_abs_diff = float(np.max(np.abs(np.array(rewards) - ep["reward"][:n]))) if n else 0.0
    finally:
        env.close()


def format_replay(r: Replay) -> str:
    lines = [f"episode {r.episode}: {r.steps} steps, seed {r.seed if r.seed is not None else '-'}, "
             f"recorded success: {'yes' if r.recorded_success else 'no'}"]
    if r.simulated:
        verdict = "reproduced" if r.reproduced else f"diverged from observation {r.first_divergent_step}"
        lines.append(f"replayed in simulation: {verdict}; success: {'yes' if r.replayed_success else 'no'}; "
                     f"max |reward diff| {r.reward_max_abs_diff:.3g}")
        lines.append("divergence (float keys: max abs; images: max per-frame mean abs pixel error):")
        for k, v in r.divergence.items():
            lines.append(f"  {k}: {v:.3g}")
    elif r.seed is None:
        lines.append("no seed stored: not replayed in simulation")
    return "\n".join(lines)
