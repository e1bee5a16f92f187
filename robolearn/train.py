"""The training loop every agent shares: act, store, update, evaluate, checkpoint, resume.

Agents only implement act/update/state_dict (robolearn.agents.base); this loop owns the env,
the replay buffers, counters and RNG. Steps are agent steps; frames are agent steps times the
env's action repeat (DrQ-v2 counts frames, the Panda tasks repeat nothing).
"""

from __future__ import annotations

import json
import math
import time
import typing
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from robolearn import checkpoint as ckpt_io
from robolearn.agents import registry
from robolearn.agents.dormant import probe_agent
from robolearn.agents.errors import NonFiniteActionError, NonFiniteLossError
from robolearn.replay import MappedReplay, MixedReplay, ReplayBuffer
from robolearn.rollout import SUCCESS_KEY, AgentPolicy, episode_success, make_env, run_episodes


@dataclass
class TrainConfig:
    """What to train, for how long, and where; `agent_overrides` set fields of the agent config."""

    agent: str = "serl"
    env: str = "robolearn/PandaPickCube-v0"
    out: str = "runs/serl_pickcube"
    frames: int = 20_000
    seed: int = 0
    demos: str | None = None
    seed_steps: int | None = None  # uniform random actions first; None: the agent's default
    eval_every: int = 2_000  # agent steps
    eval_episodes: int = 20
    target_success: float | None = None  # stop once an evaluation reaches this success rate
    checkpoint_every: int = 5_000  # agent steps; checkpoints are taken at the next episode end
    save_replay: bool = True  # in checkpoints, so that --resume continues exactly
    replay_capacity: int = 1_000_000
    video: bool = True  # an eval episode as mp4 beside the final checkpoint
    env_kwargs: dict = field(default_factory=dict)
    agent_overrides: dict = field(default_factory=dict)
    # The info key the env reports success under (None: it has none); docs/training.md, "Your own env".
    success_key: str | None = SUCCESS_KEY


LOG_EVERY = 250  # agent steps between the update metrics written to TensorBoard (train/*, dormant/*)
# Env options that shape how training episodes start, never how the policy is judged: evaluation starts from the
# env's own resets (docs/resets.md, demo_state).
TRAIN_ONLY_ENV_OPTIONS = ("reset_from_demos", "demo_state_prob")

# The command-line option of each TrainConfig count that must be positive (errors name the option).
POSITIVE_COUNTS = {"frames": "--frames", "eval_every": "--eval-every", "eval_episodes": "--eval-episodes",
                   "checkpoint_every": "--checkpoint-every", "replay_capacity": "replay_capacity"}


def check_train_config(cfg: TrainConfig) -> None:
    """The loop's own numbers, before anything is built; ValueError names the option."""
    for name, option in POSITIVE_COUNTS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} must be a positive integer, got {value!r}")
    if cfg.seed_steps is not None and (isinstance(cfg.seed_steps, bool) or not isinstance(cfg.seed_steps, int)
                                       or cfg.seed_steps < 0):
        raise ValueError(f"seed_steps must be a non-negative integer, got {cfg.seed_steps!r}")
    if cfg.target_success is not None and not 0 <= cfg.target_success <= 1:
        raise ValueError(f"--target-success must be in [0, 1], got {cfg.target_success!r}")


# -- agents --------------------------------------------------------------------------------

# Ranges of agent options by field name (SERLConfig and DrQV2Config name the same things alike).
POSITIVE = {"batch_size", "utd_ratio", "num_critics", "critic_subsample", "nstep", "frame_stack", "feature_dim",
            "hidden_dims", "hidden_dim", "conv_channels", "conv_strides", "action_repeat", "update_every_steps",
            "num_train_frames", "replay_buffer_size", "encoder_chunk_size", "lr", "init_temperature", "actor_steps",
            "critic_passes", "bc_steps", "noise_critic_steps", "simba_hidden_dim", "simba_blocks", "simba_atoms",
            "simba_v_max", "simba_c_shift", "drm_perturb_interval", "actor_moe_topk", "mentor_set_size"}
NON_NEGATIVE = {"aug_pad", "num_seed_frames", "stddev_clip", "drm_perturb_rate", "actor_moe_experts",
                "actor_moe_router_entropy"}
FRACTIONS = {"gamma", "discount", "tau", "critic_target_tau", "drm_min_perturb_factor", "drm_max_perturb_factor",
             "drm_perturb_threshold", "drm_target_beta", "drm_target_lambda"}  # in [0, 1]
RATES = {"critic_dropout"}  # in [0, 1)
OPEN_FRACTIONS = {"drm_expectile"}  # in (0, 1)
# What --set may change on --resume: the learner's pace and step sizes. The rest shapes the saved
# networks or what they compute (sizes, activation, inputs, log-std bounds, channels_last's
# flattening order), or the saved replay's n-step returns (nstep, gamma).
RESUME_SAFE = {"lr", "tau", "critic_target_tau", "batch_size", "utd_ratio", "critic_subsample", "target_entropy",
               "backup_entropy", "aug_pad", "compile", "stddev_schedule", "stddev_clip", "num_seed_frames",
               "update_every_steps", "num_train_frames", "encoder_chunk_size", "fused_adam", "actor_steps",
               "critic_passes", "bc_steps", "drm_perturb_interval", "drm_perturb_rate", "drm_min_perturb_factor",
               "drm_max_perturb_factor", "drm_perturb_threshold", "drm_target_beta", "drm_target_lambda",
               "drm_expectile", "actor_moe_router_entropy"}


def _check_agent_option(key: str, value, hint):
    """`value` for agent config field `key`, checked against its type and range (ValueError names it)."""
    from robolearn.config_check import check_value

    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # --set stddev_schedule=0.2 parses as a number
    check_value(value, hint, key)
    if value is None or key not in POSITIVE | NON_NEGATIVE | FRACTIONS | RATES | OPEN_FRACTIONS:
        pass
    elif isinstance(value, (list, tuple)):
        if not value or min(value) <= 0:
            raise ValueError(f"{key} must be a non-empty list of positive numbers, got {list(value)}")
    elif key in POSITIVE and not value > 0:
        raise ValueError(f"{key} must be positive, got {value!r}")
    elif key in NON_NEGATIVE and not value >= 0:
        raise ValueError(f"{key} must be zero or more, got {value!r}")
    elif key in FRACTIONS and not 0 <= value <= 1:
        raise ValueError(f"{key} must be in [0, 1], got {value!r}")
    elif key in RATES and not 0 <= value < 1:
        raise ValueError(f"{key} must be in [0, 1), got {value!r}")
    elif key in OPEN_FRACTIONS and not 0 < value < 1:
        raise ValueError(f"{key} must be in (0, 1), got {value!r}")
    if key == "activation":
        from robolearn.agents.serl import ACTIVATIONS
        if value not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {value!r}")
    elif key == "network":
        from robolearn.agents.serl import NETWORKS
        if value not in NETWORKS:
            raise ValueError(f"network must be one of {list(NETWORKS)}, got {value!r}")
    elif key == "frozen_arch":
        from robolearn.agents.encoders import FROZEN_ARCHS
        if value not in FROZEN_ARCHS:
            raise ValueError(f"frozen_arch must be one of {list(FROZEN_ARCHS)}, got {value!r}")
    elif key == "stddev_schedule":
        from robolearn.agents.drqv2 import stddev
        try:
            stddev(value, 0)
        except ValueError as err:
            raise ValueError(f"stddev_schedule {value!r}: {err}") from None
    return value


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def make_agent_config(name: str, overrides: dict, seed: int, env=None, saved: dict | None = None):
    """The agent config: the defaults (and what the env decides, e.g. DrQ-v2's action repeat), or a checkpoint's
    `saved` one, with --set `overrides`. Every value is checked against its field's type and range;
    on a saved config only RESUME_SAFE fields may change. ValueError names the option."""
    spec = registry.get(name)
    cfg_cls = spec.config_cls
    hints = typing.get_type_hints(cfg_cls)
    unknown = set(overrides) - set(hints)
    if unknown:
        raise ValueError(f"{name}: unknown agent option(s) {sorted(unknown)}; valid: {sorted(hints)}")
    if saved is None:
        base = {**asdict(cfg_cls()), "seed": seed, **spec.env_defaults(env)}
    else:
        base = dict(saved)
        # A field newer than the checkpoint has its default there (the config class fills it in).
        defaults = asdict(cfg_cls())
        fixed = sorted(k for k, v in overrides.items()
                       if k not in RESUME_SAFE and _plain(v) != _plain(saved.get(k, defaults.get(k))))
        if fixed:
            raise ValueError(f"--set {', '.join(fixed)} cannot change on --resume: the saved networks or replay "
                             f"depend on it; a resumed run may change {', '.join(sorted(RESUME_SAFE & set(hints)))}")
    merged = {**base, **overrides}
    for key in [k for k in merged if k in hints]:
        try:
            merged[key] = _check_agent_option(key, merged[key], hints[key])
        except ValueError as err:
            if saved is None or key in overrides:
                raise ValueError(f"--set {err}") from None
            fix = f"repair it with --resume --set {key}=VALUE" if key in RESUME_SAFE else "--resume cannot change it"
            raise ValueError(f"the checkpoint's agent option {err}; {fix}") from None
    if merged.get("log_std_min", 0) >= merged.get("log_std_max", 1):
        raise ValueError(f"--set log_std_min ({merged['log_std_min']}) must be below log_std_max "
                         f"({merged['log_std_max']})")
    if merged.get("drm_min_perturb_factor", 0) > merged.get("drm_max_perturb_factor", 1):
        raise ValueError(f"--set drm_min_perturb_factor ({merged['drm_min_perturb_factor']}) must not exceed "
                         f"drm_max_perturb_factor ({merged['drm_max_perturb_factor']})")
    cfg = cfg_cls.from_dict(merged)
    if "mentor_perturb" in hints:  # MENTOR's options together (robolearn.agents.mentor), before anything is built
        from robolearn.agents.mentor import check_config
        try:
            check_config(cfg)
        except ValueError as err:
            raise ValueError(f"--set {err}") from None
    return cfg


def build_agent(name: str, env, overrides: dict, seed: int, agent_config: dict | None = None):
    """An agent for env's spaces; agent_config (agent.config_dict() from a checkpoint) wins over defaults,
    and overrides over both (see make_agent_config)."""
    cfg = make_agent_config(name, overrides, seed, env, None if agent_config is None else agent_config["config"])
    return registry.get(name).agent_cls(env.observation_space, env.action_space, cfg), cfg


def make_replay(cfg: TrainConfig, env, params: dict, offline: bool = False, agent=None):
    """The online buffer, mixed 50/50 with the --demos buffer when given; the demos alone when `offline`.

    An agent with a `replay_view()` that returns (space, obs_fn) (SERL with a frozen encoder) gets a
    MappedReplay storing obs_fn of every observation, demos included."""
    view = agent.replay_view() if hasattr(agent, "replay_view") else None
    replay = _make_replay(cfg, env, params, offline, view)
    return replay if view is None else MappedReplay(replay, view[1])


def _make_replay(cfg: TrainConfig, env, params: dict, offline: bool, view: tuple | None):
    online = ReplayBuffer(cfg.replay_capacity, env.observation_space if view is None else view[0], env.action_space,
                          frame_stack=params["frame_stack"], nstep=params["nstep"], gamma=params["gamma"])
    if not cfg.demos:
        return online
    from robolearn.demos.dataset import Dataset

    # Damaged episodes (no steps, non-finite values, wrong shapes, bad checksums) are skipped with a warning
    # naming them, not found later as a NaN loss; a dataset left with none is an error naming it.
    demos = Dataset(cfg.demos).require_episodes("for --demos")
    if "obs_horizon" in params:
        check_demo_lengths(demos, params)
    # Room beyond the dataset for human interventions (MixedReplay copies them into the demo buffer, HIL-SERL):
    # a buffer sized to the dataset alone would overwrite the oldest demos with the first correction.
    room = 0 if offline else min(cfg.replay_capacity, 100_000)
    demo = ReplayBuffer.from_dataset(demos, env.observation_space, env.action_space,
                                     capacity=demos.num_steps + len(demos) + room, view=view,
                                     frame_stack=params["frame_stack"], nstep=params["nstep"], gamma=params["gamma"])
    return demo if offline else MixedReplay(online, demo, demo_ratio=0.5)


def check_demo_lengths(demos, params: dict) -> None:
    """A window agent conditions on obs_horizon observations: an episode with fewer steps has no real
    history to learn from (shorter chunks are fine: windows repeat the last action past the end).
    ValueError names the first such episode."""
    need = params["obs_horizon"]
    for path, n in zip(demos.paths, demos.lengths):
        if n < need:
            raise ValueError(f"--demos: episode {path} has {n} steps, fewer than the agent's obs_horizon {need}")


# -- evaluation ------------------------------------------------------------------------------

def evaluate(agent, env, episodes: int, seed: int = 1_000_000, record: bool = False,
             success_key: str | None = SUCCESS_KEY):
    """Deterministic-policy episodes on fixed seeds: (success rate, mean return, frames of episode 0).
    An env that never reports info[success_key] is named in a warning (robolearn.rollout.warn_unreported)."""
    res = run_episodes(env, AgentPolicy(agent), episodes, seed=seed,
                       video_episode=0 if record else None, success_key=success_key)
    return res.success_rate, float(np.mean(res.returns)), res.frames


def sample_batch(replay, p: dict, rng: np.random.Generator) -> dict:
    """One update's batch of the kind the agent's loop_params ask for: transitions, windows or chunks."""
    if "chunk" in p:  # a critic over executed action chunks (ReplayBuffer.chunk_arrays)
        batch = replay.sample_chunks(p["batch"], p["obs_horizon"], p["chunk"], rng)
        if "bc_batch" in p:  # and a policy that keeps imitating (EXPO's base): windows beside them
            batch["windows"] = replay.sample_windows(p["bc_batch"], p["obs_horizon"], p["pred_horizon"], rng)
        return batch
    if "obs_horizon" in p:
        return replay.sample_windows(p["batch"], p["obs_horizon"], p["pred_horizon"], rng)
    return replay.sample(p["batch"], rng)


class TrainingDiverged(FloatingPointError):
    """A non-finite loss stopped training; names the step and the last good checkpoint."""


# -- the loop ----------------------------------------------------------------------------------

class Trainer:
    """One training run; `run()` trains to the frame budget or the target success."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, console=None,
                 env_factory: Callable[[], typing.Any] | None = None, governor=None):
        """env_factory: builds the training and the eval env (called twice) instead of cfg.env; checkpoints
        then name the env by its gymnasium id, or "module:Class" without one. Contract: docs/training.md."""
        check_train_config(cfg)
        if registry.get(cfg.agent).offline and not cfg.demos:
            raise ValueError(f"--agent {cfg.agent} learns from demonstrations: pass --demos PATH")
        self.governor = governor  # a robolearn.cpu.ThreadGovernor re-choosing torch's threads, or None
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.console = console
        if env_factory is None:
            self.env = make_env(cfg.env, **cfg.env_kwargs)
            # another package's env gets render_mode only when a video is wanted (it may not take one)
            render = cfg.video or cfg.env.startswith("robolearn/")
            eval_kwargs = {k: v for k, v in cfg.env_kwargs.items() if k not in TRAIN_ONLY_ENV_OPTIONS}
            self.eval_env = make_env(cfg.env, **({"render_mode": "rgb_array"} if render else {}), **eval_kwargs)
        else:
            self.env, self.eval_env = env_factory(), env_factory()
            spec, cls = self.env.spec, type(self.env.unwrapped)
            cfg = replace(cfg, env=spec.id if spec is not None else f"{cls.__module__}:{cls.__qualname__}")
        self.cfg = cfg
        self.repeat = getattr(self.env.unwrapped, "action_repeat", 1)
        self.step, self.episode, self.history = 0, 0, {"train": [], "eval": []}
        self.rejected_actions = 0  # non-finite actions the agent sampled; each ended its episode
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        state, self.saved = None, None  # (step, checkpoint) of the last save
        if resume:
            ckpt, weights, config, state, skipped = ckpt_io.load_newest_good(self.out)
            for reason in skipped:
                warnings.warn(f"skipping a damaged checkpoint: {reason}")
            if skipped:
                warnings.warn(f"resuming from {ckpt}, the newest intact checkpoint")
            self._check_resumable(config, ckpt)
            self.agent, self.agent_cfg = build_agent(cfg.agent, self.env, cfg.agent_overrides, cfg.seed,
                                                     config["agent_config"])
            self.agent.load_state_dict(weights)
            if not skipped and json.loads(json.dumps(asdict(self.agent_cfg))) == config["agent_config"]["config"]:
                self.saved = (state["step"], ckpt)  # nothing new to save until the step moves on
        else:
            if (self.ckpt_dir / "latest.json").exists() or any(self.ckpt_dir.glob("step_*")):
                raise ValueError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
            overrides = {**registry.get(cfg.agent).run_defaults(math.ceil(cfg.frames / self.repeat)),
                         **cfg.agent_overrides}
            self.agent, self.agent_cfg = build_agent(cfg.agent, self.env, overrides, cfg.seed)
        self.spec = registry.get(cfg.agent)
        self.params = self.spec.loop_params(self.agent_cfg, self.env)
        if cfg.seed_steps is not None:
            self.params["seed_steps"] = cfg.seed_steps
        elif not cfg.demos:
            self.params["seed_steps"] = max(self.params["seed_steps"], self.spec.seed_steps_without_demos)
        self.replay = make_replay(cfg, self.env, self.params, offline=self.spec.offline, agent=self.agent)
        if state is not None:
            self._restore(ckpt, state)

    # -- checkpoints --
    def _spec(self) -> dict:
        return {"agent": self.cfg.agent, "env_id": self.cfg.env,
                "observation_space": {k: list(v.shape) for k, v in self.env.observation_space.spaces.items()},
                "action_shape": list(self.env.action_space.shape)}

    def _check_resumable(self, config: dict, where: Path) -> None:
        spec = {k: config.get(k) for k in ("agent", "env_id")}
        ckpt_io.check_matches(spec, {"agent": self.cfg.agent, "env_id": self.cfg.env}, where)

    def save(self) -> Path:
        """Checkpoint the run; a step already saved (the final save after a periodic one) is not
        written again, so a kill can never catch its only copy being replaced."""
        if self.saved is not None and self.saved[0] == self.step:
            return self.saved[1]
        weights = self.agent.state_dict()
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # never let a poisoned checkpoint replace the last good one
            raise TrainingDiverged(f"non-finite weights at agent step {self.step} in {bad[:5]}; not saved")
        config = {**self._spec(), "agent_config": self.agent.config_dict(), "train_config": asdict(self.cfg)}
        state = {"step": self.step, "episode": self.episode, "rng": self.rng.bit_generator.state,
                 "history": self.history}
        # An offline run's replay is its --demos, read again on --resume.
        extra = {"replay.h5": self.replay.save} if self.cfg.save_replay and not self.spec.offline else {}
        path = ckpt_io.save_checkpoint(self.ckpt_dir, self.step, weights, config, state, extra)
        self.saved = (self.step, path)
        return path

    def _restore(self, ckpt: Path, state: dict) -> None:
        self.step, self.episode, self.history = state["step"], state["episode"], state["history"]
        self.rng.bit_generator.state = state["rng"]
        ckpt_io.restore_torch_rng(ckpt)
        if (ckpt / "replay.h5").exists():
            self.replay.load(ckpt / "replay.h5")

    # -- main loop --
    def run(self) -> dict:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg
        self._writer = SummaryWriter(str(self.out / "tb"))
        self._next_eval = (self.step // cfg.eval_every + 1) * cfg.eval_every
        self._next_ckpt = (self.step // cfg.checkpoint_every + 1) * cfg.checkpoint_every
        self._t_start, result = time.perf_counter(), {"reached_target": False}
        unit = "updates" if self.spec.offline else "steps"
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} " + unit),
                   TextColumn("{task.fields[fps]:.0f} " + ("updates/s" if self.spec.offline else "fps")),
                   TextColumn("{task.fields[stat]}"), TextColumn("eval {task.fields[ev]}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            self._progress = progress
            self._bar = progress.add_task(f"{cfg.agent} {cfg.env}", total=math.ceil(cfg.frames / self.repeat),
                                          completed=self.step, fps=0.0, stat="", ev="-")
            (self._learn_offline if self.spec.offline else self._learn_online)(result)
        self._writer.close()
        return self._finish(result)

    def _update(self) -> dict:
        """One update call on a batch of the kind the agent needs (transitions or windows)."""
        batch = sample_batch(self.replay, self.params, self.rng)
        if self.step % LOG_EVERY:
            return self.agent.update(batch, self.step)
        # The update at every LOG_EVERY-th agent step is logged, with the dormant ratio of each network it trains
        # (DrM's diagnostic, robolearn.agents.dormant): hooks on that update's own forward passes, no extra pass.
        with probe_agent(self.agent) as probe:
            metrics = self.agent.update(batch, self.step)
        for k, v in metrics.items():
            self._writer.add_scalar(f"train/{k}", v, self.step * self.repeat)
        for k, v in probe.ratios().items():
            self._writer.add_scalar(f"dormant/{k}", v, self.step * self.repeat)
        return metrics

    def _evaluate_and_save(self, result: dict) -> None:
        """At an episode end (online) or between updates (offline): evaluate and checkpoint when due."""
        cfg = self.cfg
        if self.step >= self._next_eval:
            self._next_eval += cfg.eval_every
            rate, ret, _ = evaluate(self.agent, self.eval_env, cfg.eval_episodes, success_key=cfg.success_key)
            elapsed = time.perf_counter() - self._t_start
            self.history["eval"].append([self.step * self.repeat, ret, rate, round(elapsed, 1)])
            self._writer.add_scalar("eval/success", rate, self.step * self.repeat)
            self._writer.add_scalar("eval/return", ret, self.step * self.repeat)
            self._progress.update(self._bar, ev=f"{rate:.0%}")
            self._progress.console.print(f"eval at {self.step * self.repeat} {'updates' if self.spec.offline else 'env steps'}: "
                                         f"success {rate:.0%}, return {ret:.2f}, {elapsed:.0f} s")
            if cfg.target_success is not None and rate >= cfg.target_success:
                result["reached_target"] = True
        if self.step >= self._next_ckpt or result["reached_target"]:
            self._next_ckpt += cfg.checkpoint_every
            self.save()

    def _learn_online(self, result: dict) -> None:
        cfg, p = self.cfg, self.params
        total_steps = math.ceil(cfg.frames / self.repeat)
        recent = deque(maxlen=20)
        obs, _ = self.env.reset(seed=int(self.rng.integers(2**31)))
        self.agent.reset()
        self.replay.add_first(obs)
        ep_return, steps_start, ep_start = 0.0, self.step, self.step
        # An agent with observe_episode(return_) (SERL with mentor_perturb) is told the return of each training
        # episode the policy acted in throughout (none of it in the seed steps), before any checkpoint of its end.
        observe_episode = getattr(self.agent, "observe_episode", None)
        while self.step < total_steps:
            if self.governor is not None:
                self.governor.check()
            if self.step < p["seed_steps"]:
                action = self.rng.uniform(-1, 1, self.env.action_space.shape).astype(np.float32)
            else:
                try:
                    with torch.no_grad():
                        action = self.agent.act(obs, explore=True)
                except NonFiniteActionError as err:  # never step with it: end the episode where it stands
                    self.rejected_actions += 1
                    self._progress.console.print(f"episode {self.episode} ended at env step {self.step}: {err}")
                    obs, _ = self.env.reset(seed=int(self.rng.integers(2**31)))
                    self.agent.reset()
                    self.replay.add_first(obs)  # the broken episode stays, ended without a terminal flag
                    ep_return, ep_start = 0.0, self.step
                    continue
            obs, reward, terminated, truncated, info = self.env.step(action)
            self.replay.add(action, reward, obs, terminated, truncated)
            ep_return += reward
            self.step += 1
            if self.step >= p["seed_steps"] and self.step % p["every"] == 0 and len(self.replay) >= 1:
                self._update()
            if terminated or truncated:
                self.episode += 1
                success = episode_success(info, cfg.success_key)
                recent.append((ep_return, success))
                self.history["train"].append([self.step * self.repeat, ep_return, success])
                self._writer.add_scalar("episode/return", ep_return, self.step * self.repeat)
                self._writer.add_scalar("episode/success", float(success), self.step * self.repeat)
                if observe_episode is not None and ep_start >= p["seed_steps"]:
                    observe_episode(ep_return)
                self._evaluate_and_save(result)
                if result["reached_target"]:
                    break
                obs, _ = self.env.reset(seed=int(self.rng.integers(2**31)))
                self.agent.reset()
                self.replay.add_first(obs)
                ep_return, ep_start = 0.0, self.step
                fps = (self.step - steps_start) * self.repeat / (time.perf_counter() - self._t_start)
                self._progress.update(self._bar, completed=self.step, fps=fps,
                                      stat=f"return {np.mean([r for r, _ in recent]):.2f}  "
                                           f"success {np.mean([s for _, s in recent]):.0%}")

    def _learn_offline(self, result: dict) -> None:
        """Behaviour cloning: `frames` updates on batches from --demos, evaluated in the env as they go."""
        steps_start = self.step
        while self.step < self.cfg.frames:
            if self.governor is not None:
                self.governor.check()
            metrics = self._update()
            self.step += 1
            self._evaluate_and_save(result)
            if result["reached_target"]:
                break
            if self.step % 50 == 0:
                rate = (self.step - steps_start) / (time.perf_counter() - self._t_start)
                loss = next(iter(metrics.values()), float("nan"))
                self._progress.update(self._bar, completed=self.step, fps=rate,
                                      stat=f"{next(iter(metrics), 'loss')} {loss:.4f}")

    def _finish(self, result: dict) -> dict:
        cfg = self.cfg
        final = self.save()
        record = cfg.video and self.eval_env.render_mode == "rgb_array"  # an env_factory's env may not render
        rate, ret, frames = evaluate(self.agent, self.eval_env, cfg.eval_episodes, record=record,
                                     success_key=cfg.success_key)
        minutes = (time.perf_counter() - self._t_start) / 60
        self.history["eval"].append([self.step * self.repeat, ret, rate, round(minutes * 60, 1)])
        ckpt_io.write_json(self.out / "history.json", self.history)
        result.update({"checkpoint": str(final), "env_steps": 0 if self.spec.offline else self.step * self.repeat,
                       "final_success": rate, "final_return": ret, "minutes": minutes,
                       "curve": str(plot_learning_curve(self.history, self.out / "learning_curve.png", cfg,
                                                        "updates" if self.spec.offline else "env steps"))})
        if self.spec.offline:
            result["updates"] = self.step
        if self.rejected_actions:
            result["rejected_actions"] = self.rejected_actions
        if cfg.video and frames:
            from robolearn.video import write_mp4
            result["video"] = str(write_mp4(self.out / "eval.mp4", frames, self.eval_env.metadata.get("render_fps", 10)))
        ckpt_io.write_json(self.out / "result.json", result)
        return result

    def close(self) -> None:
        self.env.close()
        self.eval_env.close()


def plot_learning_curve(history: dict, path: Path, cfg: TrainConfig, xlabel: str = "env steps") -> Path:
    """Return and success against env steps (or updates): training episodes (smoothed) and evaluations."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(10, 3.8))
    train = np.array(history["train"], dtype=float).reshape(-1, 3)
    evals = np.array(history["eval"], dtype=float).reshape(-1, 4)
    if len(train):
        k = max(1, min(20, len(train) // 5))
        smooth = lambda v: np.convolve(v, np.ones(k) / k, mode="valid")  # noqa: E731
        ax_r.plot(train[k - 1:, 0], smooth(train[:, 1]), label=f"train (mean of {k})", alpha=0.7)
        ax_s.plot(train[k - 1:, 0], smooth(train[:, 2]), label=f"train (mean of {k})", alpha=0.7)
    if len(evals):
        ax_r.plot(evals[:, 0], evals[:, 1], "o-", label="eval")
        ax_s.plot(evals[:, 0], evals[:, 2], "o-", label="eval")
    ax_r.set(xlabel=xlabel, ylabel="episode return", title="return")
    ax_s.set(xlabel=xlabel, ylabel="success rate", title="success", ylim=(-0.05, 1.05))
    for ax in (ax_r, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"{cfg.agent} on {cfg.env} (seed {cfg.seed})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(cfg: TrainConfig, resume: bool = False, console=None,
          env_factory: Callable[[], typing.Any] | None = None, governor=None) -> dict:
    trainer = Trainer(cfg, resume=resume, console=console, env_factory=env_factory, governor=governor)
    try:
        return trainer.run()
    except (NonFiniteLossError, TrainingDiverged) as err:
        last = ckpt_io.last_good(trainer.out) or "none yet"  # only one whose weights load
        raise TrainingDiverged(f"{err}\ntraining stopped at agent step {trainer.step}; nothing was saved after "
                               f"the last good checkpoint: {last}") from err
    finally:
        trainer.close()


def _saved_spaces(config: dict):
    """A stand-in env with the spaces a checkpoint's networks were built for (no simulator needed),
    or None for a checkpoint that does not record them."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from gymnasium import spaces

    saved = config["agent_config"].get("observation_space")
    if not saved or "action_shape" not in config:
        return None
    obs = OrderedDict()  # the saved order, as the networks were built (a plain dict would be sorted)
    for key, spec in saved.items():
        dtype = np.dtype(spec["dtype"])
        low, high = (0, 255) if dtype == np.uint8 else (-np.inf, np.inf)
        obs[key] = spaces.Box(low, high, tuple(spec["shape"]), dtype)
    return SimpleNamespace(observation_space=spaces.Dict(obs), unwrapped=None,
                           action_space=spaces.Box(-1.0, 1.0, tuple(config["action_shape"]), np.float32))


def load_agent(path: str | Path, env=None):
    """(agent, config) from a checkpoint; with env given, its id and spaces must match. Without one the
    agent is built from the spaces the checkpoint records, so neither its env nor MuJoCo is needed."""
    ckpt, weights, config, _ = ckpt_io.load_checkpoint(path)
    if env is not None:
        expected = {"observation_space": {k: list(v.shape) for k, v in env.observation_space.spaces.items()},
                    "action_shape": list(env.action_space.shape)}
        ckpt_io.check_matches(config, expected, ckpt)
    if env is None:
        env = _saved_spaces(config) or make_env(config["env_id"])
    agent, _ = build_agent(config["agent"], env, {}, 0, config["agent_config"])
    try:
        agent.load_state_dict(weights)
    except (KeyError, RuntimeError) as err:
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt} does not fit a {config['agent']} agent: {err}") from None
    return agent, config


if __name__ == "__main__":
    print(json.dumps(asdict(TrainConfig()), indent=2))
