"""Run a policy in an env for N episodes: success rate, returns, and optionally one episode's video.

Also the pieces every loop over episodes shares (the training loop, evaluation, the dataset
writers): `make_env` (robolearn ids and any other gymnasium id), `episode_success` (the one place
`info[success_key]` is read), `warn_unreported` and `reset_policy`. The env contract is in
docs/training.md, "Your own env".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from robolearn.demos.dataset import robot_state

SUCCESS_KEY = "success"


def make_env(env_id: str, **kwargs):
    """An env by id: robolearn ids through robolearn.sim.make (its unknown-id error lists the valid
    ones); any other id registered with gymnasium, or "module:Id" (the module registers it when
    imported), through gymnasium.make. Only robolearn's own ids need the `sim` extra."""
    import gymnasium as gym

    if not env_id.startswith("robolearn/") and (":" in env_id or env_id in gym.registry):
        return gym.make(env_id, **kwargs)
    try:
        from robolearn.sim import make
    except ImportError as err:
        if env_id.startswith("robolearn/"):
            raise
        raise ValueError(f"unknown env id {env_id!r}: not registered with gymnasium (import the module that "
                         f"registers it with --import-module PKG, or pass 'PKG:{env_id}'); {err}") from None
    return make(env_id, **kwargs)


def episode_success(info: dict, key: str | None = SUCCESS_KEY) -> bool:
    """Whether a step's `info` reports success under `key` (None: the env has no notion of success)."""
    return key is not None and bool(info.get(key, False))


def warn_unreported(env, key: str | None, episodes: int) -> None:
    """One line when `env` never reported `info[key]` in `episodes` episodes: every one scored a failure.
    Quiet for key None and for envs whose metadata says `reports_success: False` (dm_control's suite)."""
    if key is None or episodes < 1 or not env.metadata.get("reports_success", True):
        return
    name = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
    warnings.warn(f"{name} never reported info[{key!r}] in {episodes} episode(s), so every one scored a failure; "
                  f"set success_key (--success-key) to the info key it reports success under", stacklevel=3)


class AgentPolicy:
    """An agent as a rollout policy: its actions (deterministic unless `explore`), and its reset()
    at each episode start, so an agent with a history or action chunks starts each episode afresh."""

    def __init__(self, agent, explore: bool = False):
        self.agent, self.explore = agent, explore

    def __call__(self, obs):
        return self.agent.act(obs, explore=self.explore)

    def reset(self) -> None:
        reset_policy(self.agent)


def reset_policy(policy) -> None:
    """Tell a stateful policy a new episode began: its `reset()`, if it has one."""
    reset = getattr(policy, "reset", None)
    if callable(reset):
        reset()


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
                 on_episode: Callable[[RolloutResult], None] | None = None, recorder=None,
                 success_key: str | None = SUCCESS_KEY) -> RolloutResult:
    """Episodes with seeds seed, seed+1, ...; frames of `video_episode` kept for a video.

    recorder: a robolearn.demos.dataset.DatasetWriter that receives every episode.
    policy.reset() (if it has one) is called before each episode; success is info[success_key]
    at the episode's last step, with a warning naming the env if it never reported that key.
    """
    result = RolloutResult()
    reported = False
    env.action_space.seed(seed)
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        reset_policy(policy)
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
                recorder.add_step(action, obs, reward, terminated, truncated, episode_success(info, success_key),
                                  robot=robot_state(env))
            reported = reported or (success_key is not None and success_key in info)
            total += reward
            steps += 1
            done = terminated or truncated
            if record:
                result.frames.append(env.render())
        if recorder is not None:
            recorder.end_episode()
        result.returns.append(total)
        result.successes.append(episode_success(info, success_key))
        result.lengths.append(steps)
        if on_episode:
            on_episode(result)
    if not reported:
        warn_unreported(env, success_key, episodes)
    return result
