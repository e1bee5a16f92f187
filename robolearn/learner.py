"""The learner of an actor/learner run: episodes in, updates, weights out, checkpoints that survive a kill.

No rclpy here: robolearn/ros/learner_node.py moves the bytes (robolearn.payload) over ROS 2, and a
test can drive a Learner directly. What a kill -9 may cost is bounded: every episode is written to
`out/inbox/` (atomically) before it is acknowledged, a checkpoint holds the agent, the replay and
the ids of the episodes inside it, and a restart re-reads the inbox files the checkpoint lacks.
docs/actor_learner.md has the picture.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from robolearn import checkpoint as ckpt_io
from robolearn import payload
from robolearn.agents import registry


@dataclass
class LearnerConfig:
    """What to learn and how often to publish and save; `agent_overrides` as `robolearn train --set`."""

    agent: str = "serl"
    out: str = "runs/learner"
    demos: str | None = None
    init_checkpoint: str | None = None  # start from these weights and agent config (a robolearn checkpoint)
    seed: int = 0
    frames: int = 20_000  # the run's planned env steps (schedules that depend on a run's length)
    agent_overrides: dict = field(default_factory=dict)
    seed_steps: int | None = None  # env steps before the first update (None: the agent's; SERL without demos: 1000)
    update_ratio: float = 1.0  # times the agent's own updates per env step (1: as `robolearn train`)
    publish_every_updates: int = 50  # weights to the actors every N update calls (SERL: 50) ...
    publish_every_s: float = 4.0  # ... or every N seconds, whichever comes first
    checkpoint_every_s: float = 60.0
    replay_capacity: int = 1_000_000

    def check(self) -> None:
        registry.get(self.agent)
        if registry.get(self.agent).offline:
            raise ValueError(f"agent {self.agent!r} learns offline (robolearn train); the learner needs an online agent")
        for name in ("frames", "publish_every_updates", "replay_capacity"):
            if getattr(self, name) <= 0:
                raise ValueError(f"learner {name} must be positive, got {getattr(self, name)}")
        for name in ("update_ratio", "publish_every_s", "checkpoint_every_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"learner {name} must be a positive number, got {value}")
        if self.demos and not Path(self.demos).exists():
            raise ValueError(f"learner demos: {self.demos} does not exist")
        if self.init_checkpoint:
            config = ckpt_io.read_config(self.init_checkpoint)  # CheckpointError names a missing or damaged one
            if config.get("agent") != self.agent:
                raise ValueError(f"learner init_checkpoint {self.init_checkpoint} holds a {config.get('agent')!r} "
                                 f"agent; this learner trains {self.agent!r}")


def spaces_env(spec: dict):
    """A stand-in env with a spec's spaces (the learner never steps an env)."""
    from gymnasium import spaces

    obs = OrderedDict()
    for key, s in spec["observation_space"].items():
        dtype = np.dtype(s["dtype"])
        low, high = (0, 255) if dtype == np.uint8 else (-np.inf, np.inf)
        obs[key] = spaces.Box(low, high, tuple(s["shape"]), dtype)
    return SimpleNamespace(observation_space=spaces.Dict(obs), unwrapped=SimpleNamespace(),
                           action_space=spaces.Box(-1.0, 1.0, tuple(spec["action_shape"]), np.float32))


def episode_key(meta: dict) -> str:
    """actor/run/index: `run` tells a restarted actor's episodes from the ones before its restart."""
    return f"{meta['actor']}/{meta.get('run', 0)}/{int(meta['index'])}"


class Learner:
    """Builds its agent from the first episode's spec (or the checkpoint's), then trains as data arrives."""

    def __init__(self, cfg: LearnerConfig, log=print):
        cfg.check()
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.inbox = self.out / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.agent = self.spec = self.replay = self.params = None
        self.env_steps = self.updates = self.version = 0
        self.ingested: set[str] = set()  # episode keys inside the replay
        self.history: dict[str, list] = {"train": [], "eval": []}  # [env steps, return, success, minutes]
        self.rng = np.random.default_rng(cfg.seed)
        self.t0, self.minutes_before = time.monotonic(), 0.0  # minutes of earlier runs of this `out`
        self.resumed_from: Path | None = None
        self._in_inbox: set[str] = set()  # keys whose episode file is in the inbox
        self._covered: set[str] = set()  # of those, the ones the previous checkpoint (the oldest kept) holds
        torch.manual_seed(cfg.seed)
        if ckpt_io.last_good(self.out) is not None:
            self._resume()
        self._read_inbox()

    # -- building ----------------------------------------------------------------------------
    def _build(self, spec: dict, agent_config: dict | None = None) -> None:
        from robolearn.train import TrainConfig, build_agent, make_replay

        if spec.get("agent") != self.cfg.agent:
            raise payload.PayloadError(f"episode is for agent {spec.get('agent')!r}; this learner trains {self.cfg.agent!r}")
        env = spaces_env(spec)
        overrides = self.cfg.agent_overrides
        if agent_config is None:
            overrides = {**registry.get(self.cfg.agent).run_defaults(self.cfg.frames), **overrides}
        init = None
        if agent_config is None and self.cfg.init_checkpoint:
            _, init, config, _ = ckpt_io.load_checkpoint(self.cfg.init_checkpoint)
            agent_config = config["agent_config"]
        self.agent, agent_cfg = build_agent(self.cfg.agent, env, overrides, self.cfg.seed, agent_config)
        if init is not None:
            self.agent.load_state_dict(init)
        self.params = registry.get(self.cfg.agent).loop_params(agent_cfg, env)
        if self.cfg.seed_steps is not None:
            self.params["seed_steps"] = self.cfg.seed_steps
        elif not self.cfg.demos:
            self.params["seed_steps"] = max(self.params["seed_steps"],
                                            registry.get(self.cfg.agent).seed_steps_without_demos)
        train_cfg = TrainConfig(agent=self.cfg.agent, demos=self.cfg.demos, replay_capacity=self.cfg.replay_capacity)
        self.replay = make_replay(train_cfg, env, self.params, agent=self.agent)
        self.spec = spec

    def _resume(self) -> None:
        ckpt, weights, config, state, skipped = ckpt_io.load_newest_good(self.out)
        for reason in skipped:
            self.log(f"skipping a damaged checkpoint: {reason}")
        self._build(config["spec"], config["agent_config"])
        self.agent.load_state_dict(weights)
        self.env_steps, self.updates, self.version = state["env_steps"], state["updates"], state["version"]
        self.ingested, self.history = set(state["ingested"]), state["history"]
        self.minutes_before = state.get("minutes", 0.0)
        self.rng.bit_generator.state = state["rng"]
        ckpt_io.restore_torch_rng(ckpt)
        if (ckpt / "replay.h5").exists():
            self.replay.load(ckpt / "replay.h5")
        self.resumed_from = ckpt
        self.log(f"resumed from {ckpt}: {self.env_steps} env steps, {self.updates} updates, "
                 f"{len(self.ingested)} episodes")

    def _read_inbox(self) -> None:
        """Episodes acknowledged before a crash that no checkpoint holds; an unreadable file is set aside as .bad."""
        late = 0
        for path in sorted(self.inbox.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            try:
                late += self.ingest(path.read_bytes(), stored=True)[1]
            except (payload.PayloadError, ValueError, KeyError) as err:
                path.rename(path.with_suffix(".bad"))
                self.log(f"set aside {path.name} as .bad: {err}")
        if late:
            self.log(f"{late} episodes from {self.inbox} that no checkpoint held")

    # -- data --------------------------------------------------------------------------------
    def ingest(self, data: bytes, stored: bool = False) -> tuple[dict, bool]:
        """Store one episode (inbox file first, then replay); returns (its metadata, False for a duplicate).
        PayloadError names what is wrong with a bad one, which is then neither stored nor acknowledged."""
        episode, spec, meta = payload.unpack_episode(data, self.spec, "episode")
        try:
            key = episode_key(meta)
        except (KeyError, TypeError, ValueError) as err:
            raise payload.PayloadError(f"episode: metadata needs actor and an integer index ({err!r})") from None
        if key in self.ingested:
            if stored:  # a file a checkpoint already holds: it goes with the next saves
                self._in_inbox.add(key)
            return meta, False
        if self.agent is None:
            self._build(spec)
        if not stored:
            ckpt_io.write_bytes(self._inbox_path(key), data)
        self._in_inbox.add(key)
        T = len(episode["action"])
        self.replay.add_first({k: v[0] for k, v in episode["obs"].items()})
        for t in range(T):
            self.replay.add(episode["action"][t], float(episode["reward"][t]),
                            {k: v[t + 1] for k, v in episode["obs"].items()}, bool(episode["terminated"][t]),
                            bool(episode["truncated"][t]), bool(episode["intervention"][t]))
        (self.replay.online if hasattr(self.replay, "online") else self.replay).end_episode()
        self.ingested.add(key)
        self.env_steps += T
        if meta.get("final", True):  # a segment cut by a hold is not an episode of its own
            row = [self.env_steps, float(meta.get("return", episode["reward"].sum())), bool(meta.get("success", False)),
                   round(self.minutes(), 3)]
            self.history["eval" if meta.get("eval") else "train"].append(row)
        return meta, True

    def minutes(self) -> float:
        return self.minutes_before + (time.monotonic() - self.t0) / 60

    def _inbox_path(self, key: str) -> Path:
        return self.inbox / (key.replace("/", "__").replace(os.sep, "_") + ".safetensors")

    # -- learning ----------------------------------------------------------------------------
    def owed(self) -> int:
        """Update calls due for the env steps received (the agent's own schedule times update_ratio)."""
        if self.agent is None or self.env_steps < self.params["seed_steps"] or len(self.replay) < 1:
            return 0
        due = int((self.env_steps - self.params["seed_steps"]) / self.params["every"] * self.cfg.update_ratio)
        return max(0, due - self.updates)

    def behind(self) -> int:
        """Env steps received whose updates are still owed (what an actor's `max_learner_lag` compares)."""
        owed = self.owed()  # 0 before the first episode builds the agent (and its params)
        return math.ceil(owed * self.params["every"] / self.cfg.update_ratio) if owed else 0

    def update(self) -> dict:
        from robolearn.train import sample_batch

        metrics = self.agent.update(sample_batch(self.replay, self.params, self.rng), self.env_steps)
        self.updates += 1
        return metrics

    def weights(self) -> bytes:
        """The agent's weights for the actors (not its optimizer moments or random streams); bumps the version."""
        self.version += 1
        state = {k: v for k, v in self.agent.state_dict().items() if not k.startswith(payload.LEARNER_ONLY)}
        return payload.pack_weights(state, self.spec, self.agent.config_dict(), self.version,
                                    {"seed_steps": int(self.params["seed_steps"]), "updates": self.updates,
                                     "env_steps": self.env_steps, "behind": self.behind()})

    def recent_success(self, n: int = 10, kind: str = "eval") -> float | None:
        rows = self.history[kind][-n:]
        return float(np.mean([r[2] for r in rows])) if len(rows) >= n else None

    def save(self) -> Path | None:
        """A checkpoint with the replay; the inbox files it covers are removed afterwards."""
        if self.agent is None:
            return None
        weights = self.agent.state_dict()
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(f"non-finite weights after {self.updates} updates in {bad[:5]}; not saved")
        config = {"agent": self.cfg.agent, "env_id": "actor/learner", "spec": self.spec,
                  "observation_space": {k: v["shape"] for k, v in self.spec["observation_space"].items()},
                  "action_shape": self.spec["action_shape"], "agent_config": self.agent.config_dict(),
                  "learner_config": asdict(self.cfg), "env_kwargs": self.spec.get("env", {})}
        state = {"env_steps": self.env_steps, "updates": self.updates, "version": self.version,
                 "ingested": sorted(self.ingested), "history": self.history, "rng": self.rng.bit_generator.state,
                 "minutes": self.minutes()}
        path = ckpt_io.save_checkpoint(self.out / "checkpoints", self.updates, weights, config, state,
                                       {"replay.h5": self.replay.save})
        ckpt_io.write_json(self.out / "history.json", self.history)
        # Two checkpoints are kept: an episode's file goes once the older one holds it too, so a damaged newest
        # checkpoint (load_newest_good falls back) still finds its episodes in the inbox.
        for key in self._covered:  # only files still there: a save costs the new episodes, not all of them
            self._inbox_path(key).unlink(missing_ok=True)
        self._in_inbox -= self._covered
        self._covered = set(self._in_inbox)
        return path

    def summary(self) -> dict:
        return {"env_steps": self.env_steps, "updates": self.updates, "episodes": len(self.ingested),
                "version": self.version, "eval_success": self.recent_success(),
                "train_success": self.recent_success(20, "train")}


def read_history(out: str | Path) -> dict:
    return json.loads((Path(out) / "history.json").read_text())
