"""Pretrain a small image encoder offline, for SERL to use frozen with cached features.

SERL learns from cameras on a GPU with a frozen ImageNet ResNet-10. On a CPU, and where no pretrained
weights can be downloaded, this module makes the encoder itself: DrQ's conv tower (the `drq` arch of
`encoders.FrozenEncoder`, whose features are the tower's output average-pooled to 4 x 4, 512 per
camera) is trained to regress what the task's frames show and proprioception does not: the simulator's
object state (`task.object_state`, the cube's position for PandaPickCube) and its offset from the tool.
SERL then reads either the heads' predictions (`frozen_arch=drq_state`: 6 standardized numbers per
camera for PickCube) or the tower's pooled output (`frozen_arch=drq`).

Frames come from simulator episodes of three kinds, so they cover what training will see: the task's
scripted expert (the demos' distribution), the expert with Gaussian action noise, and uniform random
actions. One tower serves every camera, with a regression head per camera (the wrist camera sees the
object relative to the tool, the front camera in the workcell's frame); frames get DrQ's random shift.
The tower is saved as safetensors under ConvEncoder's names (`convs.*`) and the heads as
`heads.<camera>.*`, with the recipe and held-out errors in the file's metadata. Then:

    robolearn pretrain-encoder --env robolearn/PandaPickCubePixels-v0 --env-set image_size=64 --out enc.safetensors
    robolearn train --agent serl --env robolearn/PandaPickCubePixels-v0 --env-set image_size=64 \\
        --set frozen_encoder=enc.safetensors --set frozen_arch=drq_state --demos DEMOS

and `robolearn train` stores the features in the replay in place of the frames (SERLAgent.replay_view).
The labels need a simulator, so on a robot this recipe applies to frames of a simulated copy of the
workcell; a ResNet-10 from ImageNet (`frozen_arch=resnet10`) needs none.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robolearn.agents.encoders import FrozenEncoder, random_shift


@dataclass
class PretrainConfig:
    """What `robolearn pretrain-encoder` collects and how it fits the tower."""

    expert_episodes: int = 20  # the scripted expert as it is
    noisy_episodes: int = 20  # the expert with Gaussian action noise of std `noise`
    random_episodes: int = 20  # uniform random actions
    noise: float = 0.5
    epochs: int = 25
    batch_size: int = 128
    lr: float = 1e-3
    aug_pad: int = 4  # DrQ random shift during pretraining
    holdout: float = 0.1  # share of episodes held out for the reported errors
    seed: int = 0

    def check(self) -> None:
        """Every field's type and range; a one-line ValueError names the first bad one."""
        for name in ("expert_episodes", "noisy_episodes", "random_episodes", "epochs", "batch_size", "aug_pad",
                     "seed"):
            value, least = getattr(self, name), 1 if name in ("epochs", "batch_size") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"pretrain: {name} must be a {'positive' if least else 'non-negative'} integer, "
                                 f"got {value!r}")
        if self.expert_episodes + self.noisy_episodes + self.random_episodes < 2:
            raise ValueError(f"pretrain: need at least 2 episodes in all, got "
                             f"{self.expert_episodes + self.noisy_episodes + self.random_episodes}")
        for name in ("noise", "lr", "holdout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"pretrain: {name} must be a number, got {value!r}")
        for name in ("noise", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pretrain: {name} must be a positive number, got {getattr(self, name)!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"pretrain: holdout must be in [0, 1), got {self.holdout!r}")


def labels_of(env) -> np.ndarray:
    """The regression target for the frames the env shows now: object state, then its offset from the tool."""
    u = env.unwrapped
    obj = np.asarray(u.task.object_state(u.arm), np.float32)
    tool = np.asarray(u.arm.read().tool_pos, np.float32)
    return np.concatenate([obj, obj[:3] - tool]) if obj.size >= 3 else obj


def collect(env, cfg: PretrainConfig, progress=None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Frames per camera (N, H, W, 3) uint8, labels (N, L) and each frame's episode index (N,)."""
    from robolearn.rollout import scripted_policy

    cams = [k for k in env.observation_space.spaces if k.startswith("images/")]
    if not cams:
        raise ValueError(f"{env.spec.id if env.spec else env}: no cameras to pretrain on (use a *Pixels env)")
    expert = scripted_policy(env)
    rng = np.random.default_rng(cfg.seed)
    kinds = ["expert"] * cfg.expert_episodes + ["noisy"] * cfg.noisy_episodes + ["random"] * cfg.random_episodes
    frames: dict[str, list] = {k: [] for k in cams}
    labels, episode = [], []
    for ep, kind in enumerate(kinds):
        obs, _ = env.reset(seed=cfg.seed * 100_000 + ep)
        if hasattr(expert, "reset"):
            expert.reset()
        done = False
        while True:
            for k in cams:
                frames[k].append(obs[k])
            labels.append(labels_of(env))
            episode.append(ep)
            if done:
                break
            if kind == "random":
                action = rng.uniform(-1, 1, env.action_space.shape)
            else:
                action = np.asarray(expert(obs), np.float64)
                if kind == "noisy":
                    action = action + rng.normal(0, cfg.noise, action.shape)
            obs, _, terminated, truncated, _ = env.step(np.clip(action, -1, 1).astype(np.float32))
            done = terminated or truncated
        if progress is not None:
            progress(ep + 1, len(kinds))
    labels = np.stack(labels).astype(np.float32)
    if labels.shape[1] == 0:
        raise ValueError(f"{env.spec.id if env.spec else env}: its task reports no object state to regress")
    return {k: np.stack(v) for k, v in frames.items()}, labels, np.asarray(episode)


class _Regressor(nn.Module):
    """The frozen encoder's tower and pooling, with one regression head per camera."""

    def __init__(self, cams: list[str], label_dim: int):
        super().__init__()
        self.encoder = FrozenEncoder("drq")
        self.encoder.requires_grad_(True)
        self.heads = nn.ModuleDict({c.removeprefix("images/"): nn.Sequential(
            nn.Linear(self.encoder.out_dim, 256), nn.ReLU(), nn.Linear(256, label_dim)) for c in cams})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        x = (images.permute(0, 3, 1, 2).float() - enc.mean) / enc.std
        return F.adaptive_avg_pool2d(enc.net(x), 4).flatten(1)

    def forward(self, cam: str, images: torch.Tensor) -> torch.Tensor:
        return self.heads[cam.removeprefix("images/")](self.features(images))


def fit(frames: dict[str, np.ndarray], labels: np.ndarray, episode: np.ndarray, cfg: PretrainConfig,
        progress=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the tower; returns its state dict (ConvEncoder names) and held-out errors per camera."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    cams = list(frames)
    eps = np.unique(episode)
    n_held = min(int(round(cfg.holdout * len(eps))), len(eps) - 1)  # at least one episode to train on
    held = np.random.default_rng(cfg.seed).permutation(eps)[:n_held]
    test = np.isin(episode, held)
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    mean, std = labels[train_idx].mean(0), labels[train_idx].std(0) + 1e-3
    target = torch.as_tensor((labels - mean) / std)
    images = {c: torch.as_tensor(v) for c, v in frames.items()}
    model = _Regressor(cams, labels.shape[1])
    steps_per_epoch = max(1, len(train_idx) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    losses = []
    for epoch in range(cfg.epochs):
        order = torch.as_tensor(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        model.train()
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = sum(F.mse_loss(model(c, random_shift(images[c][idx], cfg.aug_pad, gen)), target[idx])
                       for c in cams) / len(cams)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        if progress is not None:
            progress(epoch + 1, cfg.epochs, float(np.mean(losses[-steps_per_epoch:])))
    metrics = {"train_loss": float(np.mean(losses[-steps_per_epoch:])), "frames": int(len(labels)),
               "held_out_frames": int(len(test_idx))}
    if len(test_idx):
        model.eval()
        with torch.no_grad():
            for c in cams:
                pred = torch.cat([model(c, images[c][test_idx[i:i + 512]]) for i in range(0, len(test_idx), 512)])
                err = (pred.numpy() * std + mean) - labels[test_idx]
                metrics[f"{c.removeprefix('images/')}_rmse_m"] = [round(float(e), 4)
                                                                   for e in np.sqrt((err ** 2).mean(0))]
        metrics["label_std_m"] = [round(float(s), 4) for s in labels[test_idx].std(0)]
    state = {f"convs.{k}": v.detach().contiguous() for k, v in model.encoder.net.state_dict().items()}
    state.update({f"heads.{k}": v.detach().contiguous() for k, v in model.heads.state_dict().items()})
    return state, metrics


def pretrain_encoder(env_id: str, out: str | Path, env_kwargs: dict | None = None, cfg: PretrainConfig | None = None,
                     on_episode=None, on_epoch=None) -> dict:
    """Collect frames in `env_id`, fit the tower and save it to `out` (.safetensors); returns the metrics.

    on_episode(done, total) and on_epoch(done, total, loss) report progress."""
    from safetensors.torch import save_file

    from robolearn.rollout import make_env

    cfg = cfg or PretrainConfig()
    cfg.check()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the encoder is written as safetensors; name it *.safetensors")
    env = make_env(env_id, **(env_kwargs or {}))
    t0 = time.perf_counter()
    try:
        frames, labels, episode = collect(env, cfg, on_episode)
    finally:
        env.close()
    t1 = time.perf_counter()
    state, metrics = fit(frames, labels, episode, cfg, on_epoch)
    metrics.update({"collect_s": round(t1 - t0, 1), "fit_s": round(time.perf_counter() - t1, 1),
                    "cameras": [c.removeprefix("images/") for c in frames],
                    "image_shape": list(next(iter(frames.values())).shape[1:])})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"arch": "drq", "env": env_id, "env_kwargs": json.dumps(env_kwargs or {}),
                                         "recipe": json.dumps(asdict(cfg)), "metrics": json.dumps(metrics)})
    tmp.replace(out)
    return metrics
