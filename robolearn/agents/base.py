"""The interface every agent implements, and the batch layout the replay buffer produces.

Training loops, evaluation and the ROS node treat agents alike through five verbs:
`reset()` at each episode start, `act(obs, explore)` at every step, `update(batch) -> metrics`,
`state_dict()`, `load_state_dict()`. An agent with an observation history or action chunks
(robolearn.agents.diffusion) keeps them itself: it fills its history at reset() and replans
inside act() when its chunk runs out, so every loop honours them by calling these two.
Each agent module registers itself (robolearn.agents.registry) with its update schedule and
the batch it needs.

A batch (from robolearn.replay) is a dict of torch tensors on the agent's device:
    obs, next_obs   dict[str, Tensor]: "state" float32 (B, D); "images/<cam>" uint8 (B, H, W, C*stack)
    action          float32 (B, A), in [-1, 1]
    reward          float32 (B,): n-step discounted return r_t + g r_{t+1} + ... (g^k up to n-1)
    discount        float32 (B,): g^n for bootstrapping, 0 where the episode terminated within n
                    (truncation is not termination: it bootstraps)
Images stay uint8 HWC until the agent's encoder, which converts them as it likes.
An agent that learns from windows gets ReplayBuffer.sample_windows' layout instead (docs/replay.md).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Agent(Protocol):
    name: str

    def reset(self) -> None:
        """An episode starts: forget the observation history and any planned actions."""

    def act(self, obs: dict[str, np.ndarray], explore: bool) -> np.ndarray:
        """One action in [-1, 1] for one (unbatched) observation."""

    def update(self, batch: dict, step: int) -> dict[str, float]:
        """One learner step (or several, for high update-to-data); returns scalar metrics."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to resume: networks, targets, optimizer moments, temperature."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def default_device() -> torch.device:
    """CUDA when present, otherwise CPU; nothing assumes a GPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def obs_to_torch(obs: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Add a batch axis of one and move an env observation to the device (images stay uint8)."""
    return {k: torch.as_tensor(np.asarray(v), device=device).unsqueeze(0) for k, v in obs.items()}
