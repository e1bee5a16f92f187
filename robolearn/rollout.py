"""Run a policy in an env for N episodes: success rate, returns, and optionally one episode's video."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from robolearn.demos.dataset import robot_state


@dataclass
class RolloutResult:
    returns: list[float] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.successes)) if self.successes else 0.0


def scripted_policy(env) -> Callable:
    """The task's scripted expert, or a clear error for envs that have none."""
    task = getattr(env.unwrapped, "task", None)
    if task is None or not hasattr(task, "expert"):
        raise ValueError(f"{env.spec.id if env.spec else env}: no scripted expert (Panda tasks only); "
                         "use --policy random")
    return task.expert(env.unwrapped)


def random_policy(env) -> Callable:
    return lambda obs: env.action_space.sample()


POLICIES = {"scripted": scripted_policy, "random": random_policy}


def run_episodes(env, policy: Callable, episodes: int, seed: int = 0, video_episode: int | None = None,
                 on_episode: Callable[[RolloutResult], None] | None = None, recorder=None) -> RolloutResult:
    """Episodes with seeds seed, seed+1, ...; frames of `video_episode` kept for a video.

    recorder: a robolearn.demos.dataset.DatasetWriter that receives every episode.
    """
    result = RolloutResult()
    env.action_space.seed(seed)
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        if recorder is not None:
            recorder.begin_episode(obs, robot=robot_state(env), seed=seed + ep)
        record = ep == video_episode
        if record:
            result.frames.append(env.render())
        total, done, steps = 0.0, False, 0
        while not done:
            action = policy(obs)
            obs, reward, terminated, truncated, info = env.step(action)
            if recorder is not None:
                recorder.add_step(action, obs, reward, terminated, truncated, bool(info.get("success", False)),
                                  robot=robot_state(env))
            total += reward
            steps += 1
            done = terminated or truncated
            if record:
                result.frames.append(env.render())
        if recorder is not None:
            recorder.end_episode()
        result.returns.append(total)
        result.successes.append(bool(info.get("success", False)))
        result.lengths.append(steps)
        if on_episode:
            on_episode(result)
    return result
