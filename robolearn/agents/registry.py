"""The agents that `robolearn train`, evaluation and the policy node know, found by name.

One module per agent, and the module says how it is driven: it defines `AGENT = AgentSpec(...)`
with its agent and config classes, its update schedule and the batch it needs. Adding an agent
is writing its module and naming it in MODULES; nothing else branches on agent names.
Modules load on first use, so naming an agent costs no import of the others.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

MODULES = {"diffusion": "robolearn.agents.diffusion", "drqv2": "robolearn.agents.drqv2",
           "dsrl": "robolearn.agents.dsrl", "expo": "robolearn.agents.expo", "serl": "robolearn.agents.serl"}


def _nothing(env) -> dict:
    return {}


@dataclass(frozen=True)
class AgentSpec:
    """How the training loop drives one agent.

    loop_params(cfg, env) -> dict: `batch` (size per update call), `every` (an update each k env
    steps), `nstep`, `gamma`, `frame_stack` (the replay's), `seed_steps` (uniform random actions
    first), and for agents that learn from windows, `obs_horizon` and `pred_horizon` (the replay
    then samples windows, robolearn.replay.ReplayBuffer.sample_windows), or `obs_horizon` and
    `chunk` for a critic over executed action chunks (ReplayBuffer.sample_chunks), plus `bc_batch` and
    `pred_horizon` for windows beside them in batch["windows"] (EXPO's base keeps imitating).
    env_defaults(env) -> dict: config fields the env decides (DrQ-v2's action_repeat).
    run_defaults(steps) -> dict: config fields a fresh run's length decides (a schedule's end); --set wins.
    seed_steps_without_demos: random actions first when a run has no --demos (SERL: 1000).
    offline: learns from --demos alone (behaviour cloning); the run's steps are updates, not env steps.
    """

    name: str
    agent_cls: type
    config_cls: type
    loop_params: Callable[..., dict]
    env_defaults: Callable[..., dict] = _nothing
    run_defaults: Callable[..., dict] = _nothing
    seed_steps_without_demos: int = 0
    offline: bool = False


def names() -> tuple[str, ...]:
    return tuple(sorted(MODULES))


def get(name: str) -> AgentSpec:
    """The spec of agent `name`; ValueError naming the valid ones for an unknown name."""
    if name not in MODULES:
        raise ValueError(f"unknown agent {name!r}; valid: {', '.join(names())}")
    spec = importlib.import_module(MODULES[name]).AGENT
    if spec.name != name:
        raise RuntimeError(f"{MODULES[name]}.AGENT is named {spec.name!r}, registered as {name!r}")
    return spec
