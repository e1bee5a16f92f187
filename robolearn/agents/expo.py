"""EXPO (Dong et al. 2025, "EXPO: Stable Reinforcement Learning with Expressive Policies"): off-policy
RL with a diffusion base that keeps training by imitation and a light edit policy that corrects its
chunks towards higher value.

Read top to bottom: config, the agent (act, update, save/load), loop parameters.

Three parts, over the base's executed chunks a (action_horizon x A), as DSRL's critic:
  - the base (robolearn.agents.diffusion, loaded from --base) keeps its BC loss on windows drawn from
    the replay, demos and online data alike, one step per update; it never sees a value gradient;
  - the edit policy pi_E(delta | s, a): a tanh-Gaussian over the chunk, scaled to +-edit_scale, trained
    by SAC to maximise Q(s, clip(a + delta)) on chunks the base samples, with a temperature;
  - Q: a REDQ LayerNorm ensemble (SERL's EnsembleCritic), trained by TD on the replay's chunk
    transitions, demos included.
The on-the-fly policy: num_samples base chunks and their edits (2 N candidates) compete and the one
with the highest Q (ensemble mean) is executed; the TD target takes the same max over candidates at
s', each scored by the min over a random critic_subsample of target members.

One update: a batch of batch_size * utd_ratio chunk transitions plus batch_size * bc_steps BC windows
(batch["windows"]); the candidates at every next_obs are sampled at once (base and edit policy do
not change during the critic steps), then utd_ratio * critic_passes critic steps on the utd_ratio
strided minibatches in turn, actor_steps edit-policy and temperature steps, and bc_steps base BC
steps. The training loop calls it once per executed chunk (every action_horizon env steps):
utd_ratio is per decision, as the paper's.

Features: the critic and the edit policy read the base's EMA encoding of the observation window
(states: the normalized window; cameras: the base's conv features, which drift as the base trains).

Checkpoints are self-contained: the base's full training state (weights, EMA, AdamW moments) is in
state_dict() under base_*, its config in EXPOConfig.base_config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from robolearn.agents.diffusion_base import (FineTuner, base_diffusion_config, check_horizons, check_sac_fields,
                                             check_windows, config_from_dict, executed)
from robolearn.agents.errors import NonFiniteActionError, check_batch_finite
from robolearn.agents.registry import AgentSpec
from robolearn.agents.serl import (EnsembleCritic, TanhGaussianActor, critic_step, mean_metrics, redq_min,
                                   sac_actor_step)

# A learning-rate schedule this long is constant for any fine-tuning run: the base's cosine schedule ended
# with its BC run, and EXPO keeps it learning at base_lr.
CONSTANT_SCHEDULE = 10**12


@dataclass
class EXPOConfig:
    """The paper's settings where they fit a 2-core CPU; each field says where it departs and why."""

    base: str | None = None  # the diffusion checkpoint to start from (a run or checkpoint dir); required
    # Filled by the agent from the base's checkpoint config; a saved EXPO agent builds its base from it.
    base_config: dict | None = None
    edit_scale: float = 0.05  # paper: the edit is bounded by beta = 0.05 (actions in [-1, 1])
    num_samples: int = 8  # paper: N = 8 base samples per state, each with its edit
    gamma: float = 0.99  # per env step; a chunk of m steps is discounted by gamma^m (the replay's)
    tau: float = 0.005
    lr: float = 3e-4  # critic, edit policy and temperature
    batch_size: int = 256
    # Critic steps per executed chunk. Paper: 20 per step on a GPU; on this CPU each step's candidates
    # cost batch_size * num_samples base samples, so 4 per chunk keeps an update near a second.
    utd_ratio: int = 4
    # Passes over those utd_ratio minibatches: critic steps per update = utd_ratio * critic_passes. The
    # candidates at s' are sampled once per update, so a pass adds critic steps (the targets recomputed by the
    # moving target critic) without adding base samples, which are nearly all of an update's cost here.
    critic_passes: int = 1
    # Edit-policy (and temperature) steps per update, each on batch_size rows with fresh base chunks, and the
    # base's BC steps per update, each on its own batch_size windows. The paper steps both with every critic
    # step; here a BC step costs ~20 ms and an edit step ~70 ms (its base samples), against ~1.4 s for the
    # critic's candidates.
    actor_steps: int = 1
    bc_steps: int = 1
    num_critics: int = 10  # paper and SERL: 10 LayerNorm members, REDQ min over 2 in the target
    critic_subsample: int = 2
    hidden_dims: tuple[int, ...] = (256, 256)
    activation: str = "tanh"  # SERL's
    init_temperature: float = 0.01  # SERL's
    target_entropy: float | None = None  # None: -dim/2 of the squashed edit (SERL's rule)
    log_std_min: float = -20.0
    log_std_max: float = 2.0
    # The base keeps imitating: bc_steps BC steps per update at this constant rate, EMA (which acts) at this decay.
    base_lr: float = 1e-4  # Chi's rate; the BC run's cosine schedule had decayed it to 0
    base_ema_decay: float = 0.995  # the BC run's 0.9999 would hide 10k updates of improvement
    seed: int = 0

    def __post_init__(self):
        check_sac_fields(self, ("edit_scale", "num_samples", "lr", "batch_size", "utd_ratio", "critic_passes",
                                "actor_steps", "bc_steps", "num_critics", "critic_subsample", "init_temperature",
                                "base_lr"), ("gamma", "tau", "base_ema_decay"))
        if self.edit_scale > 2:
            raise ValueError(f"EXPOConfig.edit_scale must be at most 2 (the width of [-1, 1]), got {self.edit_scale!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "EXPOConfig":
        """Inverse of asdict after a JSON round trip; an unknown field is a ValueError."""
        return config_from_dict(cls, d)


def base_overrides(cfg: EXPOConfig) -> dict:
    """The base's DiffusionConfig fields EXPO sets: a constant learning rate and a faster EMA."""
    return {"lr": cfg.base_lr, "warmup_steps": 0, "lr_schedule_steps": CONSTANT_SCHEDULE,
            "ema_max_decay": cfg.base_ema_decay}


class EXPOAgent(FineTuner):
    """EXPO over a diffusion base that keeps imitating; see the module docstring."""

    name = "expo"

    def __init__(self, observation_space, action_space, cfg: EXPOConfig | None = None,
                 device: torch.device | str | None = None):
        cfg = cfg or EXPOConfig()
        self.cfg = cfg = self._setup(observation_space, action_space, cfg, device, base_overrides(cfg))
        self.target_entropy = -self.chunk_dim / 2.0 if cfg.target_entropy is None else float(cfg.target_entropy)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            self.actor = TanhGaussianActor(self.feat_dim + self.chunk_dim, self.chunk_dim, cfg.hidden_dims,
                                           cfg.activation, cfg.log_std_min, cfg.log_std_max).to(self.device)
            self.critic = EnsembleCritic(self.feat_dim + self.chunk_dim, cfg.hidden_dims, cfg.num_critics,
                                         cfg.activation).to(self.device)
        self._optimize()

    # -- the on-the-fly policy -----------------------------------------------------------------
    def _edit(self, feat: torch.Tensor, chunk: torch.Tensor, explore: bool, generator) -> torch.Tensor:
        """clip(chunk + edit) for chunks (B, m*A): the edit policy's sample, or tanh(mean) when not exploring."""
        x = torch.cat([feat, chunk], dim=-1)
        squashed = self.actor.sample(x, generator)[0] if explore else torch.tanh(self.actor(x)[0])
        return (chunk + self.cfg.edit_scale * squashed).clamp(-1.0, 1.0)

    @torch.no_grad()
    def candidates(self, obs: dict[str, torch.Tensor], feat: torch.Tensor, explore: bool,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(feat, chunks) of the 2N candidates per row: rows (B * 2N, F) and (B * 2N, m*A), in B blocks of
        N base chunks followed by their N edits."""
        b, n = feat.shape[0], self.cfg.num_samples
        rep = {k: v.repeat_interleave(n, dim=0) for k, v in obs.items()}
        noise = torch.randn(b * n, self.noise_dim, device=self.device, generator=generator)
        base = executed(self.base, rep, noise)  # (B*N, m*A)
        feat_n = feat.repeat_interleave(n, dim=0)
        edited = self._edit(feat_n, base, explore, generator)
        chunks = torch.stack([base.reshape(b, n, -1), edited.reshape(b, n, -1)], dim=1).reshape(b * 2 * n, -1)
        return feat.repeat_interleave(2 * n, dim=0), chunks

    @torch.no_grad()
    def act(self, obs: dict[str, np.ndarray], explore: bool) -> np.ndarray:
        """The next action (A,) of the current chunk; a spent chunk is replaced by the candidate with the
        highest Q (ensemble mean) among N base chunks and their edits (sampled when exploring, else the mean)."""
        self._require_base("act")
        window = self._chunks.push(obs, self.device)
        if window is None:
            return self._chunks.next_action()
        feat = self._features(window)
        f, chunks = self.candidates(window, feat, explore, self.act_gen)
        best = self.critic(f, chunks).mean(dim=0).argmax()
        chunk = chunks[best]
        if not bool(torch.isfinite(chunk).all()):  # an edit adds to the base's checked sample: check again
            raise NonFiniteActionError(f"EXPO: the chosen chunk has {int((~torch.isfinite(chunk)).sum())} non-finite "
                                       f"values; the base's samples are finite, so the edit policy's weights are not")
        return self._chunks.next_action(chunk.reshape(self.action_horizon, self.action_dim))

    # -- learning ------------------------------------------------------------------------------
    def update(self, batch: dict, step: int) -> dict[str, float]:
        """utd_ratio * critic_passes critic steps on utd_ratio strided slices of a chunk-transition batch,
        actor_steps edit-policy and temperature steps, then bc_steps BC steps of the base on batch["windows"]."""
        cfg, utd = self.cfg, self.cfg.utd_ratio
        if "windows" not in batch:
            raise ValueError("batch['windows'] is missing: EXPO's base imitates windows sampled beside the chunk "
                             "transitions (loop_params' bc_batch)")
        n, action, obs, next_obs = self._chunk_batch(batch, step)
        self._check_windows(batch["windows"], step)  # the base's step comes last: check its batch now
        with torch.no_grad():
            feat, next_feat = self._features(obs), self._features(next_obs)
            # Every row's 2N candidates at s' at once: base and edit policy are fixed until the critic steps end.
            next_f, next_chunks = self.candidates(next_obs, next_feat, True, self.update_gen)
        k = 2 * cfg.num_samples
        rows = {"feat": feat, "action": action.to(self.device, torch.float32).reshape(n, -1),
                "reward": batch["reward"].to(self.device), "discount": batch["discount"].to(self.device),
                "next_f": next_f.reshape(n, k, -1), "next_chunks": next_chunks.reshape(n, k, -1)}
        steps = []
        for i in range(utd * cfg.critic_passes):  # strided, as serl.minibatches: each keeps the demo/online mix
            part = {key: v[i % utd::utd] for key, v in rows.items()}
            with torch.no_grad():
                m = part["reward"].shape[0]
                next_q = redq_min(self, part["next_f"].reshape(m * k, -1), part["next_chunks"].reshape(m * k, -1))
                target = part["reward"] + part["discount"] * next_q.reshape(m, k).max(dim=1).values
            steps.append(critic_step(self, self.critic(part["feat"], part["action"]), target, step, batch))
        result = mean_metrics(steps)
        result.update(self._update_edit_policy(obs, feat, step, batch))
        values = dict(zip(result, torch.stack(list(result.values())).tolist()))
        values["alpha"] = float(self.log_alpha.detach().exp())
        n_bc, windows, losses = cfg.bc_steps, batch["windows"], []
        for i in range(n_bc):  # strided, as the critic's minibatches: each keeps the demo/online mix
            part = {"obs": {key: v[i::n_bc] for key, v in windows["obs"].items()},
                    "action": windows["action"][i::n_bc]}
            losses.append(self.base.update(part, step)["bc_loss"])
        values["bc_loss"] = float(np.mean(losses))
        return values

    def _check_windows(self, windows: dict, step: int) -> None:
        """The BC windows fit the base (pred_horizon actions, obs_horizon observations) and are finite."""
        shape = (self.base.pred_horizon, self.action_dim)
        action = windows.get("action")
        if action is None or action.ndim != 3 or tuple(action.shape[1:]) != shape:
            got = None if action is None else tuple(action.shape)
            raise ValueError(f"batch['windows']['action'] must be (B, pred_horizon, A) = (B, {shape[0]}, {shape[1]}), "
                             f"got {got}: sample windows of the base's pred_horizon (loop_params)")
        if action.shape[0] < self.cfg.bc_steps:
            raise ValueError(f"batch['windows'] holds {action.shape[0]} windows, fewer than bc_steps="
                             f"{self.cfg.bc_steps} BC steps need (loop_params' bc_batch is batch_size * bc_steps)")
        check_windows(windows.get("obs", {}), self.obs_keys, self.obs_horizon, "windows']['obs", self.device)
        check_batch_finite(windows, "bc", step)

    def _update_edit_policy(self, obs: dict, feat: torch.Tensor, step: int, batch: dict) -> dict[str, torch.Tensor]:
        """actor_steps SAC steps on the edit, each maximising Q(s, clip(a + edit)) - alpha log pi_E for base
        chunks a at batch_size rows of the batch (all of them sampled from the base in one call)."""
        bs, scale = self.cfg.batch_size, self.cfg.edit_scale
        rows = torch.randint(0, feat.shape[0], (bs * self.cfg.actor_steps,), device=self.device,
                             generator=self.update_gen)
        noise = torch.randn(len(rows), self.noise_dim, device=self.device, generator=self.update_gen)
        chunks = executed(self.base, {key: v[rows] for key, v in obs.items()}, noise)
        steps = []
        for j in range(self.cfg.actor_steps):
            f, chunk = feat[rows[j * bs:(j + 1) * bs]], chunks[j * bs:(j + 1) * bs]
            squashed, metrics = sac_actor_step(
                self, torch.cat([f, chunk], dim=-1),
                lambda e, f=f, chunk=chunk: self.critic(f, (chunk + scale * e).clamp(-1.0, 1.0), detach=True)
                .mean(dim=0), batch, step)
            steps.append({**metrics, "edit_abs": squashed.abs().mean() * scale})
        return mean_metrics(steps)

    # -- checkpoints ---------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        return {"base_model": self.base.model, "base_ema": self.base.ema, "actor": self.actor,
                "critic": self.critic, "critic_target": self.critic_target}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"base": self.base.opt, "critic": self.critic_opt, "actor": self.actor_opt, "alpha": self.alpha_opt}

    def _generators(self) -> dict[str, torch.Generator]:
        return {**super()._generators(), "base_update": self.base.update_gen, "base_act": self.base.act_gen}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._tensors(), "counters/base_updates": self.base.updates}


def loop_params(cfg: EXPOConfig, env) -> dict:
    """One update per executed chunk, on chunk transitions of the base's horizons and BC windows beside them."""
    base = base_diffusion_config(cfg, "EXPOConfig")
    check_horizons(base, env, "EXPOConfig")
    return {"batch": cfg.batch_size * cfg.utd_ratio, "every": base.action_horizon, "nstep": 1, "gamma": cfg.gamma,
            "frame_stack": 1, "seed_steps": 0, "obs_horizon": base.obs_horizon, "chunk": base.action_horizon,
            "bc_batch": cfg.batch_size * cfg.bc_steps, "pred_horizon": base.pred_horizon}


AGENT = AgentSpec("expo", EXPOAgent, EXPOConfig, loop_params)
