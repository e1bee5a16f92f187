"""Diffusion Policy (Chi et al. 2023, "Diffusion Policy: Visuomotor Policy Learning via Action
Diffusion"): behavior cloning of action chunks with a denoising diffusion model, sized for a CPU.

Read top to bottom: config, noise schedule, denoisers (an MLP for states, Chi's FiLM-conditioned
1-D temporal UNet for images), the agent (act, sample, update, save/load).

The model: the last `obs_horizon` observations are encoded frame by frame (cameras through the
shared DrQ conv encoders, proprioception standardized by dataset statistics) and concatenated
into one conditioning vector; the denoiser predicts the noise added to a chunk of `pred_horizon`
actions (epsilon prediction, MSE at uniformly drawn timesteps of a `train_timesteps`
squared-cosine schedule). Acting samples a chunk with DDIM in `inference_steps` steps (eta 0:
deterministic given the initial noise) from an EMA copy of the weights, and executes actions
[obs_horizon-1, obs_horizon-1+action_horizon) of it before sampling again (Chi's receding horizon).

Where this differs from Chi's code, and why: the image encoder is the shared DrQ conv tower with
random-shift augmentation (Chi: a GroupNorm ResNet-18 with random crops), because a ResNet-18 per
camera and frame does not fit the CPU budget; the default UNet is 64/128/256 channels wide
(Chi: 256/512/1024); the proprio statistics come from the first training batch rather than a pass
over the whole dataset (the agent sees batches, not the dataset), and actions are not normalized
(they arrive in [-1, 1] already, as the env defines them).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robolearn.agents.base import default_device
from robolearn.agents.encoders import DictObsEncoder, image_keys_of
from robolearn.agents.errors import NonFiniteActionError, check_finite
from robolearn.agents.registry import AgentSpec
from robolearn.agents.serialize import agent_config, load_training_state, training_state_to_tensors

DENOISERS = ("mlp", "unet", "auto")


@dataclass
class DiffusionConfig:
    """Defaults follow Chi's diffusion policy (horizons, schedule, DDIM, EMA, AdamW), with a
    smaller UNet and encoder so a chunk samples within tens of milliseconds on a 2-core CPU."""

    # Horizons: condition on the last obs_horizon observations, predict pred_horizon actions
    # starting at the first of them, execute action_horizon of them, then sample again.
    obs_horizon: int = 2
    pred_horizon: int = 16
    action_horizon: int = 8
    # Denoiser: "mlp", "unet" (Chi's 1-D temporal UNet), or "auto" (mlp without cameras, unet with).
    denoiser: str = "auto"
    down_dims: tuple[int, ...] = (64, 128, 256)  # UNet channels per level; Chi: (256, 512, 1024)
    kernel_size: int = 5
    n_groups: int = 8  # GroupNorm groups in the UNet
    diffusion_step_embed_dim: int = 64  # Chi: 256
    mlp_hidden_dims: tuple[int, ...] = (512, 512, 512)
    # Diffusion: squared-cosine betas over train_timesteps; DDIM at inference.
    train_timesteps: int = 100
    inference_steps: int = 10
    eta: float = 0.0  # DDIM noise; 0 makes sampling a deterministic map of the initial noise
    clip_sample: bool = True  # clip each step's predicted clean chunk to [-1, 1] (Chi)
    # EMA of all weights, used for acting (Chi's EMAModel: decay 1 - (1 + k)^-power, capped).
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    # AdamW with linear warm-up, then cosine decay to 0 at lr_schedule_steps updates.
    lr: float = 1e-4
    weight_decay: float = 1e-6
    adam_betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = 500
    lr_schedule_steps: int = 100_000
    batch_size: int = 256
    # Observations
    proprio_keys: tuple[str, ...] = ("state",)
    # Standardize each proprio dimension by the mean and std of the first training batch (Chi
    # normalizes by dataset statistics): raw positions vary over centimetres, which the denoiser
    # barely tells apart. The std is floored at obs_std_min, so near-constant dims (a quaternion)
    # stay near 0 instead of blowing up.
    normalize_obs: bool = True
    obs_std_min: float = 1e-2
    image_keys: tuple[str, ...] | None = None  # None: every images/<cam> in the space
    feature_dim: int = 64  # per camera and frame
    conv_strides: tuple[int, ...] = (2, 2, 2, 1)  # ~5x cheaper than DrQ's (2, 1, 1, 1) at 128x128
    aug_pad: int = 4  # random shift of +-aug_pad pixels at training
    seed: int = 0

    def __post_init__(self):
        from robolearn.config_check import check_fields

        check_fields(self, "DiffusionConfig")
        positive = ("obs_horizon", "pred_horizon", "action_horizon", "kernel_size", "n_groups",
                    "diffusion_step_embed_dim", "train_timesteps", "inference_steps", "lr", "lr_schedule_steps",
                    "batch_size", "feature_dim", "ema_power", "obs_std_min")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"DiffusionConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "warmup_steps", "aug_pad", "eta"):
            if getattr(self, name) < 0:
                raise ValueError(f"DiffusionConfig.{name} must be zero or more, got {getattr(self, name)!r}")
        for name in ("down_dims", "mlp_hidden_dims", "conv_strides"):
            if not getattr(self, name) or min(getattr(self, name)) <= 0:
                raise ValueError(f"DiffusionConfig.{name} must be a non-empty list of positive integers, "
                                 f"got {list(getattr(self, name))}")
        if self.denoiser not in DENOISERS:
            raise ValueError(f"DiffusionConfig.denoiser must be one of {list(DENOISERS)}, got {self.denoiser!r}")
        if self.obs_horizon > self.pred_horizon:
            raise ValueError(f"DiffusionConfig.obs_horizon ({self.obs_horizon}) must be at most pred_horizon "
                             f"({self.pred_horizon})")
        most = self.pred_horizon - self.obs_horizon + 1
        if self.action_horizon > most:
            raise ValueError(f"DiffusionConfig.action_horizon ({self.action_horizon}) must be at most "
                             f"pred_horizon - obs_horizon + 1 = {most}")
        if self.inference_steps > self.train_timesteps:
            raise ValueError(f"DiffusionConfig.inference_steps ({self.inference_steps}) must be at most "
                             f"train_timesteps ({self.train_timesteps})")
        if self.eta > 1:
            raise ValueError(f"DiffusionConfig.eta must be in [0, 1], got {self.eta!r}")
        if not 0 <= self.ema_max_decay <= 1:
            raise ValueError(f"DiffusionConfig.ema_max_decay must be in [0, 1], got {self.ema_max_decay!r}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"DiffusionConfig.adam_betas must be in [0, 1), got {list(self.adam_betas)}")
        if self.denoiser != "mlp":  # "auto" may become unet: check what the UNet needs up front
            levels = 2 ** (len(self.down_dims) - 1)
            if self.pred_horizon % levels:
                raise ValueError(f"DiffusionConfig.pred_horizon ({self.pred_horizon}) must be a multiple of "
                                 f"{levels} for a UNet of {len(self.down_dims)} levels (down_dims)")
            bad = [d for d in self.down_dims if d % self.n_groups]
            if bad:
                raise ValueError(f"DiffusionConfig.down_dims {bad} must be multiples of n_groups ({self.n_groups})")
            if self.kernel_size % 2 == 0:
                raise ValueError(f"DiffusionConfig.kernel_size must be odd (same-length convolutions), "
                                 f"got {self.kernel_size}")
        if self.diffusion_step_embed_dim < 4 or self.diffusion_step_embed_dim % 2:
            raise ValueError(f"DiffusionConfig.diffusion_step_embed_dim must be even and at least 4, "
                             f"got {self.diffusion_step_embed_dim}")

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        """Inverse of asdict after a JSON round trip (lists back to tuples); a dict without
        `normalize_obs` (a checkpoint from before it existed) gets False, as it was trained."""
        tuples = {f.name for f in fields(cls) if "tuple" in str(f.type)}
        d = {"normalize_obs": False, **d}  # a config saved before the field existed: its weights saw raw obs
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in d.items()})


def loop_params(cfg: DiffusionConfig, env) -> dict:
    """The training loop's cadence for behavior cloning: one update per step on windowed batches."""
    return {"batch": cfg.batch_size, "every": 1, "nstep": 1, "gamma": 0.99, "frame_stack": 1, "seed_steps": 0,
            "obs_horizon": cfg.obs_horizon, "pred_horizon": cfg.pred_horizon, "action_horizon": cfg.action_horizon}


def run_defaults(updates: int) -> dict:
    """The cosine schedule ends with the run: a fresh run's lr_schedule_steps is its number of updates."""
    return {"lr_schedule_steps": max(updates, 1)}


def lr_at(cfg: DiffusionConfig, update: int) -> float:
    """The learning rate of update number `update` (from 0): linear warm-up, then cosine to 0."""
    if update < cfg.warmup_steps:
        return cfg.lr * (update + 1) / cfg.warmup_steps
    progress = min(1.0, (update - cfg.warmup_steps) / max(1, cfg.lr_schedule_steps - cfg.warmup_steps))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(cfg: DiffusionConfig, update: int) -> float:
    """Chi's EMAModel decay before the EMA step of update `update` (from 0): 0 for the first two."""
    k = update - 1
    if k <= 0:
        return 0.0
    return min(cfg.ema_max_decay, max(0.0, 1.0 - (1.0 + k) ** -cfg.ema_power))


# -- noise schedule ----------------------------------------------------------------------------

def squared_cosine_alphas_cumprod(timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """alpha-bar_t of the "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021), float64 (T,)."""
    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / timesteps) / f(i / timesteps), max_beta) for i in range(timesteps)],
                         dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_coefficients(alphas_cumprod: torch.Tensor, steps: int, eta: float) -> list[tuple]:
    """Per DDIM step, as Python floats: (t, 1/sqrt(a_t), sqrt(1-a_t), sqrt(a_prev), sqrt(1-a_prev-s^2), s).

    Timesteps are spaced as diffusers' "leading" spacing (T//n apart from 0, descending); the step
    after t=0 uses alpha-bar = 1 (set_alpha_to_one), so the last step returns the clean estimate.
    """
    T = len(alphas_cumprod)
    ratio = T // steps
    out = []
    for t in reversed(range(0, steps * ratio, ratio)):
        a_t = float(alphas_cumprod[t])
        a_prev = float(alphas_cumprod[t - ratio]) if t - ratio >= 0 else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        out.append((t, 1 / math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_prev),
                    math.sqrt(max(0.0, 1 - a_prev - sigma**2)), sigma))
    return out


# -- denoisers --------------------------------------------------------------------------------

class Mish(nn.Module):
    """Mish, x * tanh(softplus(x)), as nn.Mish (no parameters, so state dicts match). Without autograd it
    runs as three vectorised ops: torch's fused CPU kernel took 10 ms on 5120 x 512 floats against 6 ms,
    and Mish was 40% of a fine-tuning agent's batched sampling (docs/diffusion.md#speed). With autograd
    it is F.mish, whose backward is one kernel."""

    dormant_probe = True  # robolearn.agents.dormant reads its output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


def mish(x: torch.Tensor) -> torch.Tensor:
    """F.mish, computed as x * tanh(softplus(x)) when no gradient is recorded (see Mish)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.mish(x)
    return x * torch.tanh(F.softplus(x))


class StepEmbedding(nn.Module):
    """Diffusion step -> sinusoidal features -> Linear -> Mish -> Linear (dim out)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.arange(half) * (-math.log(10000.0) / (half - 1))),
                             persistent=False)
        self.net = nn.Sequential(nn.Linear(dim, 4 * dim), Mish(), nn.Linear(4 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = t.float()[:, None] * self.freqs[None]
        return self.net(torch.cat([x.sin(), x.cos()], dim=-1))


class MLPDenoiser(nn.Module):
    """Flattened noisy chunk, step embedding and observation features in; predicted noise out.
    Linear -> LayerNorm -> Mish per hidden layer."""

    def __init__(self, action_dim: int, pred_horizon: int, cond_dim: int, step_dim: int,
                 hidden_dims: tuple[int, ...]):
        super().__init__()
        self.step = StepEmbedding(step_dim)
        layers, d = [], pred_horizon * action_dim + step_dim + cond_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.LayerNorm(h), Mish()]
            d = h
        layers.append(nn.Linear(d, pred_horizon * action_dim))
        self.net = nn.Sequential(*layers)
        self.chunk_dim, self.step_dim = pred_horizon * action_dim, step_dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.net(torch.cat([x.reshape(b, -1), self.step(t), cond], dim=-1)).reshape(x.shape)

    # Sampling: every row at the same step, the same cond at every step. The first layer splits into its
    # chunk, step and cond columns, so the cond part is computed once per sample call and the step part
    # once per step rather than once per row.
    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, hidden): the first layer's cond columns applied to `cond`, plus its bias."""
        first = self.net[0]
        return F.linear(cond, first.weight[:, self.chunk_dim + self.step_dim:], first.bias)

    def step_eps(self, x: torch.Tensor, t: int, ctx: torch.Tensor) -> torch.Tensor:
        """forward(x, t at every row, cond) for ctx = condition(cond)."""
        first, b = self.net[0], x.shape[0]
        step = self.step(torch.full((1,), t, dtype=torch.long, device=x.device))
        h = (F.linear(x.reshape(b, -1), first.weight[:, :self.chunk_dim])
             + F.linear(step, first.weight[:, self.chunk_dim:self.chunk_dim + self.step_dim]) + ctx)
        return self.net[1:](h).reshape(x.shape)


class Conv1d(nn.Conv1d):
    """nn.Conv1d (same parameters) that runs small batches as one matmul over unfolded windows.

    On CPU, torch sends these short, wide 1-D convolutions to its slow unfused kernel: at batch 1
    a 256-channel, kernel-5 layer over 4 steps took 176 us there and 86 us as unfold + addmm, which
    sped a whole UNet step up ~1.5x. For training batches the native kernel is the faster one.
    """

    SMALL_BATCH = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.SMALL_BATCH or x.device.type != "cpu":
            return super().forward(x)
        k, stride, pad = self.kernel_size[0], self.stride[0], self.padding[0]
        b, c, _ = x.shape
        cols = (F.pad(x, (pad, pad)) if pad else x).unfold(2, k, stride)  # (B, C, L', k)
        length = cols.shape[2]
        cols = cols.permute(0, 2, 1, 3).reshape(b * length, c * k)
        out = torch.addmm(self.bias, cols, self.weight.reshape(self.out_channels, c * k).t())
        return out.view(b, length, self.out_channels).transpose(1, 2)


def conv_block(cin: int, cout: int, kernel: int, groups: int) -> nn.Sequential:
    """Conv1d (same length) -> GroupNorm -> Mish."""
    return nn.Sequential(Conv1d(cin, cout, kernel, padding=kernel // 2), nn.GroupNorm(groups, cout), Mish())


class FiLMResBlock(nn.Module):
    """Two conv blocks; the conditioning scales and shifts the first one's output per channel."""

    def __init__(self, cin: int, cout: int, cond_dim: int, kernel: int, groups: int):
        super().__init__()
        self.conv1 = conv_block(cin, cout, kernel, groups)
        self.conv2 = conv_block(cout, cout, kernel, groups)
        self.film = nn.Linear(cond_dim, 2 * cout)
        self.skip = Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, C, L); cond (B, cond_dim), already through Mish (shared by every block)."""
        scale, shift = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        return self.conv2(torch.addcmul(shift, self.conv1(x), scale)) + self.skip(x)


class UNetDenoiser(nn.Module):
    """Chi's ConditionalUnet1D layout: over the time axis of the chunk, FiLM-conditioned residual
    blocks at len(down_dims) resolutions (halved between levels), a middle pair, and an upsampling
    path joined to the deeper levels' outputs."""

    def __init__(self, action_dim: int, cond_dim: int, down_dims: tuple[int, ...], kernel: int, groups: int,
                 step_dim: int):
        super().__init__()
        self.step = StepEmbedding(step_dim)
        c = step_dim + cond_dim
        dims = (action_dim, *down_dims)
        pairs = list(zip(dims[:-1], dims[1:]))
        self.down = nn.ModuleList()
        for i, (a, b) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down.append(nn.ModuleList([
                FiLMResBlock(a, b, c, kernel, groups), FiLMResBlock(b, b, c, kernel, groups),
                nn.Identity() if last else Conv1d(b, b, 3, stride=2, padding=1)]))
        mid = down_dims[-1]
        self.mid = nn.ModuleList([FiLMResBlock(mid, mid, c, kernel, groups) for _ in range(2)])
        self.up = nn.ModuleList()
        for a, b in reversed(pairs[1:]):
            self.up.append(nn.ModuleList([
                FiLMResBlock(2 * b, a, c, kernel, groups), FiLMResBlock(a, a, c, kernel, groups),
                nn.ConvTranspose1d(a, a, 4, stride=2, padding=1)]))
        self.head = nn.Sequential(conv_block(down_dims[0], down_dims[0], kernel, groups),
                                  Conv1d(down_dims[0], action_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, P, A) noisy chunk; t (B,) steps; cond (B, cond_dim) -> predicted noise (B, P, A)."""
        return self._run(x, mish(torch.cat([self.step(t), cond], dim=-1)))

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """What sampling steps share (for step_eps): the cond itself here."""
        return cond

    def step_eps(self, x: torch.Tensor, t: int, ctx: torch.Tensor) -> torch.Tensor:
        """forward(x, t at every row, ctx), embedding the step once rather than once per row."""
        step = self.step(torch.full((1,), t, dtype=torch.long, device=x.device)).expand(x.shape[0], -1)
        return self._run(x, mish(torch.cat([step, ctx], dim=-1)))

    def _run(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The UNet on x (B, P, A) with the Mish'd conditioning c (B, step_dim + cond_dim)."""
        h = x.transpose(1, 2)
        skips = []
        for block1, block2, down in self.down:
            h = block2(block1(h, c), c)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, c)
        for block1, block2, up in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(block2(block1(h, c), c))
        return self.head(h).transpose(1, 2)


class Standardize(nn.Module):
    """(x - mean) / std for one proprio key, per dimension; identity until set."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class ObsNormalizer(nn.Module):
    """Dataset statistics of the proprio observations, as buffers (so checkpoints and the EMA copy
    carry them) with a `fitted` flag: set once, from the first training batch, never recomputed."""

    def __init__(self, dims: dict[str, int]):
        super().__init__()
        self.stats = nn.ModuleDict({k: Standardize(d) for k, d in dims.items()})
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def statistics(self, obs: dict[str, torch.Tensor], std_min: float) -> dict[str, tuple]:
        """Per key (mean, std floored at std_min) over every frame of windows (B, T, D)."""
        out = {}
        for k in self.stats:
            x = obs[k].float().reshape(-1, obs[k].shape[-1])
            out[k] = (x.mean(0), x.std(0, correction=0).clamp(min=std_min))
        return out

    @torch.no_grad()
    def set(self, stats: dict[str, tuple]) -> None:
        for k, (mean, std) in stats.items():
            self.stats[k].mean.copy_(mean)
            self.stats[k].std.copy_(std)
        self.fitted.fill_(True)

    def forward(self, obs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**obs, **{k: norm(obs[k]) for k, norm in self.stats.items()}}


class DiffusionPolicyNet(nn.Module):
    """Observation normalizer, encoder and denoiser together: the unit the optimizer and the EMA
    both cover (the normalizer has buffers only, which the agent sets in both copies)."""

    def __init__(self, encoder: DictObsEncoder, denoiser: nn.Module, normalizer: ObsNormalizer | None = None):
        super().__init__()
        self.encoder, self.denoiser = encoder, denoiser
        self.normalizer = normalizer

    def encode(self, obs: dict[str, torch.Tensor], keys: tuple[str, ...], augment: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Windows (B, T, ...) -> (B, T * features): proprio standardized, each frame encoded alone,
        then concatenated."""
        if self.normalizer is not None:
            obs = self.normalizer(obs)
        b, t = obs[keys[0]].shape[:2]
        flat = {k: obs[k].reshape(b * t, *obs[k].shape[2:]) for k in keys}
        return self.encoder(flat, augment=augment, generator=generator).reshape(b, -1)


class ChunkHistory:
    """An episode's last obs_horizon observations and the rest of the chunk being executed: the
    acting state of every chunked agent (diffusion, DSRL, EXPO)."""

    def __init__(self, keys: tuple[str, ...], obs_horizon: int):
        self.keys = keys
        self.history: deque[dict[str, np.ndarray]] = deque(maxlen=obs_horizon)
        self.queue: deque[np.ndarray] = deque()

    def clear(self) -> None:
        self.history.clear()
        self.queue.clear()

    def push(self, obs: dict[str, np.ndarray], device) -> dict[str, torch.Tensor] | None:
        """Record `obs`; the window (1, obs_horizon, ...) when a new chunk is due, else None."""
        obs = {k: np.asarray(obs[k]) for k in self.keys}
        if not self.history:
            self.history.extend([obs] * self.history.maxlen)  # an episode's first obs, repeated (as the base)
        else:
            self.history.append(obs)
        if self.queue:
            return None
        return {k: torch.as_tensor(np.stack([o[k] for o in self.history]), device=device).unsqueeze(0)
                for k in self.keys}

    def next_action(self, chunk: torch.Tensor | None = None) -> np.ndarray:
        """The next action, after queueing `chunk` (action_horizon, A) when a new one was sampled."""
        if chunk is not None:
            self.queue.extend(chunk.cpu().numpy().astype(np.float32))
        return self.queue.popleft()


# -- the agent ----------------------------------------------------------------------------------

class DiffusionAgent:
    """Diffusion policy behavior cloning; see the module docstring."""

    name = "diffusion"

    def __init__(self, observation_space, action_space, cfg: DiffusionConfig | None = None,
                 device: torch.device | str | None = None):
        self.cfg = cfg = cfg or DiffusionConfig()
        self.device = torch.device(device) if device is not None else default_device()
        if not (np.all(action_space.low == -1.0) and np.all(action_space.high == 1.0)):
            raise ValueError(f"DiffusionAgent expects a normalized Box(-1, 1) action space, got {action_space}")
        self.observation_space, self.action_space = observation_space, action_space
        self.action_dim = int(np.prod(action_space.shape))
        self.obs_horizon, self.pred_horizon, self.action_horizon = cfg.obs_horizon, cfg.pred_horizon, cfg.action_horizon
        self.image_keys = image_keys_of(observation_space, cfg.image_keys)
        self.obs_keys = (*self.image_keys, *cfg.proprio_keys)
        self.denoiser_kind = cfg.denoiser if cfg.denoiser != "auto" else ("unet" if self.image_keys else "mlp")

        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            try:
                encoder = DictObsEncoder(observation_space, cfg.proprio_keys, self.image_keys, 1, cfg.feature_dim,
                                         cfg.conv_strides, None, cfg.aug_pad)
            except RuntimeError as err:  # a conv tower that shrinks the frames below its 3x3 kernel
                shapes = {k: observation_space[k].shape for k in self.image_keys}
                raise ValueError(f"DiffusionConfig.conv_strides {list(cfg.conv_strides)} do not fit frames of "
                                 f"{shapes}: {str(err).splitlines()[0]}") from None
            cond_dim = encoder.out_dim * cfg.obs_horizon
            if self.denoiser_kind == "unet":
                denoiser = UNetDenoiser(self.action_dim, cond_dim, cfg.down_dims, cfg.kernel_size, cfg.n_groups,
                                        cfg.diffusion_step_embed_dim)
            else:
                denoiser = MLPDenoiser(self.action_dim, cfg.pred_horizon, cond_dim, cfg.diffusion_step_embed_dim,
                                       cfg.mlp_hidden_dims)
            normalizer = None
            if cfg.normalize_obs:
                normalizer = ObsNormalizer({k: int(observation_space[k].shape[-1]) for k in cfg.proprio_keys})
            self.model = DiffusionPolicyNet(encoder, denoiser, normalizer).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self._params = list(self.model.parameters())
        self._ema_params = list(self.ema.parameters())
        self.opt = adamw(self._params, cfg)

        alphas_cumprod = squared_cosine_alphas_cumprod(cfg.train_timesteps)
        self._sqrt_ac = alphas_cumprod.sqrt().float().to(self.device)
        self._sqrt_1m_ac = (1 - alphas_cumprod).sqrt().float().to(self.device)
        self._ddim = ddim_coefficients(alphas_cumprod, cfg.inference_steps, cfg.eta)

        # Separate streams, so acting never changes what the learner draws.
        self.update_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.act_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 2)
        self.updates = torch.zeros((), dtype=torch.int64)
        self._chunks = ChunkHistory(self.obs_keys, cfg.obs_horizon)

    # -- acting ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the observation history and the planned actions (at every episode start)."""
        self._chunks.clear()

    def act(self, obs: dict[str, np.ndarray], explore: bool) -> np.ndarray:
        """The next action (A,) of the current chunk, sampling a new chunk when the last is spent.
        `explore` changes nothing: the policy samples from the learned distribution either way."""
        window = self._chunks.push(obs, self.device)
        if window is None:
            return self._chunks.next_action()
        start = self.obs_horizon - 1
        return self._chunks.next_action(self.sample(window)[0, start:start + self.action_horizon])

    @torch.no_grad()
    def sample(self, obs_window: dict[str, torch.Tensor], noise: torch.Tensor | None = None,
               ema: bool = True) -> torch.Tensor:
        """DDIM action chunks (B, pred_horizon, A) in [-1, 1] for observation windows (B, obs_horizon, ...),
        from `noise` (B, pred_horizon, A) or fresh noise; with eta 0 a deterministic function of the noise."""
        model = self.ema if ema else self.model
        obs = {k: obs_window[k].to(self.device) for k in self.obs_keys}
        b, t = obs[self.obs_keys[0]].shape[:2]
        if t != self.obs_horizon:
            raise ValueError(f"observation windows must hold obs_horizon={self.obs_horizon} steps, got {t}")
        shape = (b, self.pred_horizon, self.action_dim)
        if noise is None:
            x = torch.randn(shape, device=self.device, generator=self.act_gen)
        else:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape} (batch, pred_horizon, action_dim), "
                                 f"got {tuple(noise.shape)}")
            x = noise.to(self.device, torch.float32)
        ctx = model.denoiser.condition(model.encode(obs, self.obs_keys))
        for t_, inv_sqrt_a, sqrt_1m_a, sqrt_a_prev, dir_coef, sigma in self._ddim:
            eps = model.denoiser.step_eps(x, t_, ctx)
            x0 = (x - sqrt_1m_a * eps) * inv_sqrt_a
            if self.cfg.clip_sample:
                x0 = x0.clamp(-1.0, 1.0)
            x = sqrt_a_prev * x0 + dir_coef * eps
            if sigma > 0:
                x = x + sigma * torch.randn(shape, device=self.device, generator=self.act_gen)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteActionError(self._non_finite_message(x, obs, noise))
        return x.clamp(-1.0, 1.0)

    def _non_finite_message(self, x: torch.Tensor, obs: dict[str, torch.Tensor], noise) -> str:
        bad = ~torch.isfinite(x)
        msg = (f"diffusion sample: {int(bad.sum())} of {x.numel()} action values are non-finite "
               f"({int(torch.isnan(x).sum())} NaN)")
        inputs = {f"observation '{k}'": v for k, v in obs.items() if v.is_floating_point()}
        if noise is not None:
            inputs["the initial noise"] = noise
        culprits = [f"{name} ({int((~torch.isfinite(v)).sum())} of {v.numel()})" for name, v in inputs.items()
                    if not bool(torch.isfinite(v).all())]
        if culprits:
            return msg + "; non-finite inputs: " + ", ".join(culprits)
        return msg + "; the inputs are finite, so the weights are not (check the checkpoint or training)"

    # -- learning --------------------------------------------------------------------------------
    def update(self, batch: dict, step: int) -> dict[str, float]:
        """One BC step: noise-prediction MSE on the batch's action chunks at random timesteps, then EMA."""
        actions = batch["action"].to(self.device, torch.float32)
        shape = (self.pred_horizon, self.action_dim)
        if actions.ndim != 3 or tuple(actions.shape[1:]) != shape:
            raise ValueError(f"batch['action'] must be (B, pred_horizon, A) = (B, {shape[0]}, {shape[1]}), "
                             f"got {tuple(actions.shape)}: sample windowed batches (loop_params' pred_horizon)")
        obs = {k: batch["obs"][k].to(self.device) for k in self.obs_keys}
        self._fit_normalizer(obs)
        k = int(self.updates)
        lr = lr_at(self.cfg, k)
        for group in self.opt.param_groups:
            group["lr"] = lr

        cond = self.model.encode(obs, self.obs_keys, augment=True, generator=self.update_gen)
        b = actions.shape[0]
        noise = torch.randn(actions.shape, device=self.device, generator=self.update_gen)
        t = torch.randint(0, self.cfg.train_timesteps, (b,), device=self.device, generator=self.update_gen)
        noisy = self._sqrt_ac[t, None, None] * actions + self._sqrt_1m_ac[t, None, None] * noise
        loss = F.mse_loss(self.model.denoiser(noisy, t, cond), noise)
        check_finite(loss, "bc", step, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            decay = ema_decay(self.cfg, k)
            if decay == 0.0:
                torch._foreach_copy_(self._ema_params, self._params)
            else:
                torch._foreach_lerp_(self._ema_params, self._params, 1.0 - decay)
        self.updates += 1
        return {"bc_loss": loss.item(), "lr": lr}

    def _fit_normalizer(self, obs: dict[str, torch.Tensor]) -> None:
        """Set the proprio statistics of both copies from the first batch; never again once set (a
        loaded or resumed agent keeps its own). Non-finite statistics are not kept: that batch's loss
        is non-finite too and raises."""
        norm = self.model.normalizer
        if norm is None or bool(norm.fitted):
            return
        stats = norm.statistics(obs, self.cfg.obs_std_min)
        if all(bool(torch.isfinite(torch.stack(ms)).all()) for ms in stats.values()):
            norm.set(stats)
            self.ema.normalizer.set(stats)

    # -- checkpoints -----------------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "ema": self.ema}

    def _generators(self) -> dict[str, torch.Generator]:
        return {"update": self.update_gen, "act": self.act_gen}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (safetensors-ready): weights and EMA weights (with the observation
        statistics, `*.normalizer.*`), AdamW moments, the update counter (which sets the learning rate
        and EMA decay) and both RNG streams."""
        return training_state_to_tensors(self._modules(), {"model": self.opt}, self._generators(),
                                         {"counters/updates": self.updates})

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_training_state(state, self._modules(), {"model": self.opt}, self._generators(),
                            {"counters/updates": self.updates}, what="diffusion")
        self.reset()

    def config_dict(self) -> dict:
        """JSON-able: the config, the spaces the networks were built for, and optimizer settings."""
        return agent_config(self, {"model": self.opt}, denoiser=self.denoiser_kind)


def adamw(params, cfg: DiffusionConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the device has one."""
    params = list(params)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except RuntimeError:
        return torch.optim.AdamW(params, **kw)


AGENT = AgentSpec("diffusion", DiffusionAgent, DiffusionConfig, loop_params, run_defaults=run_defaults, offline=True)
