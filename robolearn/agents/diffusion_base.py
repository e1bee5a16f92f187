"""A diffusion checkpoint as the base policy of an RL fine-tuning agent: DSRL steers it frozen
(robolearn.agents.dsrl), EXPO keeps training it by imitation (robolearn.agents.expo).

What both share, in one place: reading and checking the base checkpoint (`--base`, which sets the
config's `base`), building it for the env's spaces, the base record a fine-tuning checkpoint keeps
in its config (`base_config`, so it loads without the base's file), executed chunks, and acting on
chunks with an observation history.

A fine-tuning config has two fields for this: `base` (the path; provenance only once built) and
`base_config` (filled by the agent from the base checkpoint's config.json; a saved agent rebuilds
its base from it and gets the weights from its own state_dict).
"""

from __future__ import annotations

import copy
import math
from dataclasses import fields, replace

import numpy as np
import torch

from robolearn.agents.base import default_device
from robolearn.agents.diffusion import ChunkHistory, DiffusionAgent, DiffusionConfig
from robolearn.agents.errors import check_batch_finite
from robolearn.agents.serialize import agent_config, load_training_state, training_state_to_tensors
from robolearn.agents.serl import ACTIVATIONS, adam

# Rows per base.sample call: bounds the memory of a UNet base over a batch of thousands of windows.
SAMPLE_ROWS = 1024
# What a fine-tuning config keeps of the base checkpoint's config.json: enough to rebuild it, and its provenance.
BASE_FIELDS = ("agent", "env_id", "observation_space", "action_shape", "agent_config", "weights_sha256")


def one_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def required(what: str) -> str:
    return f"{what}.base is required: the path of a diffusion checkpoint (--base PATH or --set base=PATH)"


def base_record(config: dict, where, what: str) -> dict:
    """The part of a checkpoint config a fine-tuning agent keeps, after checking it is a diffusion checkpoint."""
    agent = config.get("agent")
    if agent != "diffusion":
        raise ValueError(f"{what}.base: {where} is a {agent!r} checkpoint, not a diffusion policy's")
    if "action_shape" not in config or "observation_space" not in config.get("agent_config", {}):
        raise ValueError(f"{what}.base: {where} does not record the spaces its networks were built for")
    return {k: copy.deepcopy(config[k]) for k in BASE_FIELDS if k in config}


def read_base_config(path: str | None, what: str) -> dict:
    """The base record of the checkpoint at `path` (a run or checkpoint directory), without its weights."""
    from robolearn.checkpoint import CheckpointError, read_config

    if path is None:
        raise ValueError(required(what))
    try:
        return base_record(read_config(path), path, what)
    except CheckpointError as err:
        raise ValueError(f"{what}.base: {one_line(err)}") from None


def base_diffusion_config(cfg, what: str) -> DiffusionConfig:
    """The base's DiffusionConfig: from cfg.base_config when saved, else read from the checkpoint at cfg.base."""
    record = cfg.base_config if cfg.base_config is not None else read_base_config(cfg.base, what)
    return DiffusionConfig.from_dict(record["agent_config"]["config"])


def check_horizons(dcfg: DiffusionConfig, env, what: str) -> None:
    """A base whose observation history or executed chunk is longer than the env's episodes cannot act in it."""
    limit = getattr(getattr(getattr(env, "unwrapped", env), "cfg", None), "max_episode_steps", None)
    if limit is None:
        return
    for name in ("obs_horizon", "action_horizon"):
        if getattr(dcfg, name) > limit:
            raise ValueError(f"{what}.base: the base's {name} is {getattr(dcfg, name)} steps, longer than this "
                             f"env's episodes of max_episode_steps={limit}")


def build_base(record: dict, observation_space, action_dim: int, device, what: str,
               overrides: dict | None = None) -> DiffusionAgent:
    """A DiffusionAgent for the base `record` (untrained weights: load them next), refused with a one-line
    ValueError when its action dim or the observations it reads do not fit these spaces. `overrides` set
    DiffusionConfig fields that do not change the networks (EXPO's learning rate and EMA decay)."""
    from robolearn.train import _saved_spaces

    record = base_record(record, "the saved base_config", what)
    base_dim = int(np.prod(record["action_shape"]))
    if base_dim != action_dim:
        raise ValueError(f"{what}.base: the base's action_dim is {base_dim}, the action space's {action_dim}")
    spaces = _saved_spaces(record)  # the base's own spaces: its networks were built for them
    dcfg = DiffusionConfig.from_dict({**record["agent_config"]["config"], **(overrides or {})})
    base = DiffusionAgent(spaces.observation_space, spaces.action_space, dcfg, device)
    ours = observation_space.spaces
    for key in base.obs_keys:
        if key not in ours:
            raise ValueError(f"{what}.base: the base reads observation {key!r}, which the observation "
                             f"space lacks (it has {list(ours)})")
        want = base.observation_space[key]
        if tuple(want.shape) != tuple(ours[key].shape) or want.dtype != ours[key].dtype:
            raise ValueError(f"{what}.base: observation {key!r} is {tuple(ours[key].shape)} {ours[key].dtype} "
                             f"here but {tuple(want.shape)} {want.dtype} for the base")
    return base


def load_base(cfg, observation_space, action_dim: int, device, what: str,
              overrides: dict | None = None) -> tuple[DiffusionAgent, dict, bool]:
    """(base, record, loaded): a fresh agent (cfg.base_config unset) loads the checkpoint at cfg.base with its
    weights; a saved one builds from cfg.base_config and gets the weights from its own load_state_dict."""
    if cfg.base_config is not None:
        return build_base(cfg.base_config, observation_space, action_dim, device, what, overrides), \
            cfg.base_config, False
    from robolearn.checkpoint import CheckpointError, load_checkpoint

    if cfg.base is None:
        raise ValueError(required(what))
    try:
        ckpt, weights, config, _ = load_checkpoint(cfg.base)
    except CheckpointError as err:
        raise ValueError(f"{what}.base: {one_line(err)}") from None
    record = base_record(config, ckpt, what)
    base = build_base(record, observation_space, action_dim, device, what, overrides)
    try:
        base.load_state_dict(weights)
    except (KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"{what}.base: {ckpt} does not fit its own config: {one_line(err)}") from None
    return base, record, True


@torch.no_grad()
def executed(base: DiffusionAgent, obs: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """The executed part (B, action_horizon * A) of the base's EMA chunks for windows `obs` and noise (B, P * A)."""
    start, out = base.obs_horizon - 1, []
    shape = (base.pred_horizon, base.action_dim)
    for i in range(0, noise.shape[0], SAMPLE_ROWS):
        rows = slice(i, i + SAMPLE_ROWS)
        chunk = base.sample({k: obs[k][rows] for k in base.obs_keys}, noise[rows].reshape(-1, *shape))
        out.append(chunk[:, start:start + base.action_horizon].reshape(chunk.shape[0], -1))
    return torch.cat(out)


def check_windows(obs: dict[str, torch.Tensor], keys, obs_horizon: int, part: str, device) -> dict[str, torch.Tensor]:
    """The batch's observation windows for `keys`, on the device; a one-line ValueError for missing or unwindowed ones."""
    missing = [k for k in keys if k not in obs]
    if missing:
        raise ValueError(f"batch['{part}'] lacks {missing}, which the base reads")
    bad = {k: tuple(obs[k].shape) for k in keys if obs[k].ndim < 2 or obs[k].shape[1] != obs_horizon}
    if bad:
        raise ValueError(f"batch['{part}'] must hold windows of obs_horizon={obs_horizon} steps, got shapes "
                         f"{bad}: sample chunk transitions (loop_params' obs_horizon and chunk)")
    return {k: obs[k].to(device) for k in keys}


def config_from_dict(cls, d: dict):
    """A fine-tuning config from asdict after a JSON round trip (lists back to tuples); an unknown field is
    a ValueError naming it and the valid ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {unknown[0]!r}; valid: {', '.join(sorted(known))}")
    tuples = {f.name for f in fields(cls) if "tuple" in str(f.type)}
    return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()})


def check_sac_fields(cfg, positive: tuple[str, ...], unit: tuple[str, ...]) -> None:
    """The checks a fine-tuning config shares: known field types, `positive` fields > 0, `unit` fields in
    [0, 1], the REDQ subsample, hidden dims, activation and log-std bounds; one-line ValueErrors."""
    from robolearn.config_check import check_fields

    what = type(cfg).__name__
    check_fields(cfg, what)
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{what}.{name} must be positive, got {getattr(cfg, name)!r}")
    for name in unit:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"{what}.{name} must be in [0, 1], got {getattr(cfg, name)!r}")
    if cfg.critic_subsample > cfg.num_critics:
        raise ValueError(f"{what}.critic_subsample ({cfg.critic_subsample}) must be at most "
                         f"num_critics ({cfg.num_critics})")
    if not cfg.hidden_dims or min(cfg.hidden_dims) <= 0:
        raise ValueError(f"{what}.hidden_dims must be a non-empty list of positive integers, got {list(cfg.hidden_dims)}")
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"{what}.activation must be one of {sorted(ACTIVATIONS)}, got {cfg.activation!r}")
    if cfg.log_std_min >= cfg.log_std_max:
        raise ValueError(f"{what}.log_std_min ({cfg.log_std_min}) must be below log_std_max ({cfg.log_std_max})")


class FineTuner:
    """What DSRLAgent and EXPOAgent share: the base, the observation features, a SAC actor with its
    temperature, a critic ensemble with its target, the RNG streams, the chunk history, and checkpoints.

    A subclass calls `_setup` first, builds its networks (`actor`, `critic`, and any more), then
    calls `_optimize`; it lists what its checkpoints hold in `_modules`,
    `_optimizers`, `_generators` and `_tensors`."""

    name = ""

    def _setup(self, observation_space, action_space, cfg, device, overrides: dict | None = None):
        """Check the action space, load the base, and return the config with base_config filled."""
        self.what = type(cfg).__name__
        self.device = torch.device(device) if device is not None else default_device()
        if not (np.all(action_space.low == -1.0) and np.all(action_space.high == 1.0)):
            raise ValueError(f"{type(self).__name__} expects a normalized Box(-1, 1) action space, got {action_space}")
        self.observation_space, self.action_space = observation_space, action_space
        self.action_dim = int(np.prod(action_space.shape))
        self.base, record, self._base_loaded = load_base(cfg, observation_space, self.action_dim, self.device,
                                                         self.what, overrides)
        self.obs_keys = self.base.obs_keys
        self.obs_horizon, self.action_horizon = self.base.obs_horizon, self.base.action_horizon
        self.noise_dim = self.base.pred_horizon * self.action_dim
        self.chunk_dim = self.action_horizon * self.action_dim
        # The feature width: one zero window through the base's encoder.
        self.feat_dim = self._features({k: torch.as_tensor(np.zeros((1, self.obs_horizon, *observation_space[k].shape),
                                                                    observation_space[k].dtype))
                                        for k in self.obs_keys}).shape[-1]
        self._chunks = ChunkHistory(self.obs_keys, self.obs_horizon)
        return replace(cfg, base_config=record)

    def _optimize(self) -> None:
        """The critic's target, the temperature, Adam for critic, actor and temperature, the RNG streams
        (separate, so acting never changes what the learner draws) and the update counters."""
        cfg = self.cfg
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(cfg.init_temperature), device=self.device, requires_grad=True)
        self.critic_opt = adam(self.critic.parameters(), cfg.lr)
        self.actor_opt = adam(self.actor.parameters(), cfg.lr)
        self.alpha_opt = adam([self.log_alpha], cfg.lr)
        self._online = list(self.critic.parameters())
        self._target = list(self.critic_target.parameters())
        self.update_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.act_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.critic_updates = torch.zeros((), dtype=torch.int64)
        self.actor_updates = torch.zeros((), dtype=torch.int64)

    def _chunk_batch(self, batch: dict, step: int) -> tuple[int, torch.Tensor, dict, dict]:
        """(rows, action, obs windows, next_obs windows) of a chunk-transition batch, after the checks every
        update makes before any weight changes: the base is loaded, the batch splits into utd_ratio
        minibatches, actions are chunks of action_horizon, the windows fit, and nothing is non-finite."""
        self._require_base("update")
        n, utd = batch["reward"].shape[0], self.cfg.utd_ratio
        if n % utd:
            raise ValueError(f"batch of {n} does not split into utd_ratio={utd} minibatches "
                             f"(sample batch_size * utd_ratio = {self.cfg.batch_size * utd})")
        action = batch["action"]
        if action.ndim != 3 or tuple(action.shape[1:]) != (self.action_horizon, self.action_dim):
            raise ValueError(f"batch['action'] must be (B, action_horizon, A) = (B, {self.action_horizon}, "
                             f"{self.action_dim}), got {tuple(action.shape)}: sample chunk transitions with "
                             f"chunk={self.action_horizon} (loop_params)")
        check_batch_finite(batch, "critic", step)
        check_batch_finite({"obs": batch["next_obs"]}, "critic", step)
        obs, next_obs = (check_windows(batch[part], self.obs_keys, self.obs_horizon, part, self.device)
                         for part in ("obs", "next_obs"))
        return n, action, obs, next_obs

    def _require_base(self, what: str) -> None:
        if not self._base_loaded:
            raise RuntimeError(f"{type(self).__name__}.{what}: the base's weights are not loaded; an agent built "
                               "from a saved config gets them from load_state_dict")

    @torch.no_grad()
    def _features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Observation windows (B, obs_horizon, ...) -> (B, F) through the base's EMA encoder."""
        return self.base.ema.encode({k: obs[k].to(self.device) for k in self.obs_keys}, self.obs_keys).float()

    def reset(self) -> None:
        """Forget the observation history and the planned actions (at every episode start)."""
        self._chunks.clear()

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def _generators(self) -> dict[str, torch.Generator]:
        return {"update": self.update_gen, "act": self.act_gen}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"log_alpha": self.log_alpha, "counters/critic_updates": self.critic_updates,
                "counters/actor_updates": self.actor_updates}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (safetensors-ready): the base, the networks, Adam moments, temperature,
        counters and RNG streams, as the subclass lists them."""
        return training_state_to_tensors(self._modules(), self._optimizers(), self._generators(), self._tensors())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_training_state(state, self._modules(), self._optimizers(), self._generators(), self._tensors(),
                            what=self.name.upper())
        self._base_loaded = True
        self.reset()

    def config_dict(self) -> dict:
        """JSON-able: the config (with the base's in base_config), the spaces, and optimizer settings."""
        return agent_config(self, self._optimizers(), target_entropy=self.target_entropy)
