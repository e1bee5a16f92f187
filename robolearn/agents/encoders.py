"""Image encoders shared by agents: DrQ random shift, a DrQ conv encoder, a frozen pretrained
encoder, and the dict-observation encoder that joins camera features with proprioception.

Images arrive as the replay stores them, uint8 (B, H, W, C*stack); every encoder here converts
them itself, so nothing upstream ever holds a float copy of a frame.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_shift(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ augmentation: replicate-pad by `pad`, then crop back to H x W at a random integer offset.

    Done as one gather with clamped indices, which equals padding then cropping, on uint8 NHWC
    (B, H, W, C) images; no interpolation, unlike the grid_sample version in DrQ-v2.
    """
    if pad <= 0:
        return images
    b, h, w, _ = images.shape
    dev = images.device
    shift = torch.randint(0, 2 * pad + 1, (b, 2), device=dev, generator=generator) - pad
    rows = (torch.arange(h, device=dev) + shift[:, :1]).clamp_(0, h - 1)  # (B, H)
    cols = (torch.arange(w, device=dev) + shift[:, 1:]).clamp_(0, w - 1)  # (B, W)
    return images[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]


def to_nchw_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC in [0, 255] -> float NCHW in [-0.5, 0.5]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5)


def conv_stack(in_channels: int, strides: tuple[int, ...] = (2, 1, 1, 1), channels: int = 32) -> nn.Sequential:
    """DrQ's conv tower: 3x3 convolutions of `channels` filters, ReLU after each."""
    layers, c = [], in_channels
    for s in strides:
        layers += [nn.Conv2d(c, channels, 3, stride=s), nn.ReLU(inplace=True)]
        c = channels
    return nn.Sequential(*layers)


def trunk(in_dim: int, feature_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> tanh: the bounded bottleneck DrQ puts after its conv tower."""
    return nn.Sequential(nn.Linear(in_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


class ConvEncoder(nn.Module):
    """DrQ encoder for one camera: conv tower, flatten, trunk; uint8 (B, H, W, C) -> (B, feature_dim)."""

    def __init__(self, in_channels: int, image_hw: tuple[int, int], feature_dim: int = 50,
                 strides: tuple[int, ...] = (2, 1, 1, 1)):
        super().__init__()
        self.convs = conv_stack(in_channels, strides)
        with torch.no_grad():
            flat = self.convs(torch.zeros(1, in_channels, *image_hw)).numel()
        self.trunk = trunk(flat, feature_dim)
        self.out_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self.convs(to_nchw_float(images)).flatten(1))


# -- frozen pretrained encoders -------------------------------------------------------------

class BasicBlock(nn.Module):
    """The torchvision ResNet basic block, with torchvision's parameter names."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet-10 (blocks 1,1,1,1, as SERL) or ResNet-18 (2,2,2,2) trunk, named like torchvision,
    so `torchvision.models.resnet18(weights=...).state_dict()` saved as safetensors loads here."""

    def __init__(self, blocks: tuple[int, int, int, int] = (1, 1, 1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = cout
        self.out_dim = 512

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


FROZEN_ARCHS = ("resnet10", "resnet18", "drq", "drq_state")


def _state_heads(state: dict[str, torch.Tensor], where) -> nn.ModuleDict:
    """The per-camera regression heads `heads.<cam>.{0,2}.*` of a robolearn.agents.pretrain file."""
    cams = sorted({k.split(".")[1] for k in state if k.startswith("heads.")})
    heads = nn.ModuleDict()
    for cam in cams:
        missing = [k for k in (f"heads.{cam}.0.weight", f"heads.{cam}.2.weight") if k not in state]
        if missing:
            raise ValueError(f"{where}: no tensor {missing[0]}; not a `robolearn pretrain-encoder` file")
        w0, w2 = state[f"heads.{cam}.0.weight"], state[f"heads.{cam}.2.weight"]
        heads[cam] = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.ReLU(), nn.Linear(w2.shape[1], w2.shape[0]))
    return heads


def _metadata(path: str | Path) -> dict:
    """A pretrain file's `metrics` metadata (image_shape, cameras ...), {} where there is none."""
    import json

    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta.get("metrics", "{}"))
    except ValueError:
        return {}


def load_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from .safetensors, or from .pt/.pth with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors (a state_dict), got {type(state).__name__}")
    return state


class FrozenEncoder(nn.Module):
    """A pretrained image encoder kept frozen: uint8 (B, H, W, 3*stack) -> float (B, stack*out_dim).

    arch "resnet10"/"resnet18": torchvision-named ResNet, ImageNet normalisation, global average
    pool (512 features). arch "drq": the DrQ conv tower (e.g. from a trained robolearn encoder,
    select it with `prefix`), average-pooled to 4x4 (512 features). arch "drq_state": a
    `robolearn pretrain-encoder` file's tower and its per-camera heads, whose outputs (the object
    state the frames show, standardized) are the features; forward() then needs the camera's name.
    `weights=None` leaves the random initialisation, which only tests and baselines want.
    """

    def __init__(self, arch: str = "resnet18", weights: str | Path | None = None, prefix: str = ""):
        super().__init__()
        if arch not in FROZEN_ARCHS:
            raise ValueError(f"unknown frozen encoder arch {arch!r}; valid: {FROZEN_ARCHS}")
        self.arch, self.heads, self.meta = arch, None, {}
        if arch == "drq_state" and weights is None:
            raise ValueError("frozen encoder arch 'drq_state' needs weights: a `robolearn pretrain-encoder` file")
        if arch in ("drq", "drq_state"):
            self.net = conv_stack(3)
            self.out_dim = 32 * 16
            mean, std = (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)  # matches to_nchw_float
        else:
            self.net = ResNet((1, 1, 1, 1) if arch == "resnet10" else (2, 2, 2, 2))
            self.out_dim = self.net.out_dim
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        if weights is not None:
            state = load_weight_file(weights)
            if prefix:
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if arch == "drq_state":
                self.heads = _state_heads(state, weights)
                if not self.heads:
                    raise ValueError(f"{weights}: no heads.<camera>.* tensors; arch 'drq_state' takes a "
                                     f"`robolearn pretrain-encoder` file")
                try:
                    self.heads.load_state_dict({k.removeprefix("heads."): v for k, v in state.items()
                                                if k.startswith("heads.")})
                except RuntimeError as err:
                    raise ValueError(f"{weights}: its heads do not load: {str(err).splitlines()[0]}") from None
                self.meta = _metadata(weights)
                self.out_dim = next(iter(self.heads.values()))[-1].out_features
            if arch in ("drq", "drq_state"):  # a ConvEncoder state dict names its tower "convs."
                state = {k.removeprefix("convs."): v for k, v in state.items()
                         if not k.startswith(("trunk.", "heads."))}
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier head
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{weights}: does not fit a {arch} encoder; missing {missing[:6]}, "
                                 f"unexpected {unexpected[:6]}")
        self.requires_grad_(False)
        self.eval()

    def check_fits(self, observation_space, image_keys) -> None:
        """drq_state: every camera has a head, at the image size the file was pretrained on (its metadata);
        ValueError names the camera. Other archs take any camera and size."""
        if self.heads is None:
            return
        trained = self.meta.get("image_shape")
        for key in image_keys:
            cam = key.removeprefix("images/")
            if cam not in self.heads:
                raise ValueError(f"frozen encoder (drq_state) has heads for cameras {sorted(self.heads)}, not {cam!r}")
            shape = list(observation_space.spaces[key].shape)
            if trained and shape[:2] != list(trained[:2]):
                raise ValueError(f"frozen encoder (drq_state) was pretrained on {trained[0]}x{trained[1]} frames; "
                                 f"{key} is {shape[0]}x{shape[1]} (pretrain at this image_size)")

    def train(self, mode: bool = True):
        return super().train(False)  # BatchNorm statistics stay the pretrained ones

    @torch.no_grad()
    def forward(self, images: torch.Tensor, camera: str | None = None) -> torch.Tensor:
        """Features of uint8 (B, H, W, 3*stack) frames; `camera` (e.g. "front") picks drq_state's head."""
        b, h, w, c = images.shape
        x = images.reshape(b, h, w, c // 3, 3).permute(0, 3, 4, 1, 2).reshape(b * (c // 3), 3, h, w)
        x = (x.float() - self.mean) / self.std
        y = self.net(x)
        if self.arch in ("drq", "drq_state"):
            y = F.adaptive_avg_pool2d(y, 4).flatten(1)
        if self.heads is not None:
            if camera not in self.heads:
                raise ValueError(f"frozen encoder (drq_state) has heads for cameras {sorted(self.heads)}, "
                                 f"not {camera!r}")
            y = self.heads[camera](y)
        return y.reshape(b, -1)


# -- dict observations -----------------------------------------------------------------------

def image_keys_of(observation_space, image_keys: tuple[str, ...] | None) -> tuple[str, ...]:
    """The camera keys to use: the given ones (checked), or every `images/...` key in the space."""
    spaces = observation_space.spaces
    if image_keys is None:
        return tuple(k for k in spaces if k.startswith("images/"))
    unknown = [k for k in image_keys if k not in spaces]
    if unknown:
        raise ValueError(f"image keys {unknown} not in the observation space {list(spaces)}")
    return tuple(image_keys)


def feature_key(image_key: str) -> str:
    """Where cached frozen-encoder features of `images/<cam>` live in an obs dict: `features/<cam>`."""
    return "features/" + image_key.removeprefix("images/")


class DictObsEncoder(nn.Module):
    """Dict obs -> flat features: one encoder per camera, then the proprio vectors, concatenated.

    Per camera: a trainable ConvEncoder on the images, or (with `frozen_dim`) a trainable trunk on
    frozen-encoder features found under `features/<cam>` in the obs dict.
    """

    def __init__(self, observation_space, proprio_keys: tuple[str, ...], image_keys: tuple[str, ...],
                 frame_stack: int = 1, feature_dim: int = 50, conv_strides: tuple[int, ...] = (2, 1, 1, 1),
                 frozen_dim: int | None = None, aug_pad: int = 4):
        super().__init__()
        spaces = observation_space.spaces
        unknown = [k for k in proprio_keys if k not in spaces]
        if unknown:
            raise ValueError(f"proprio keys {unknown} not in the observation space {list(spaces)}")
        self.proprio_keys, self.image_keys, self.aug_pad = tuple(proprio_keys), tuple(image_keys), aug_pad
        self.frozen = frozen_dim is not None
        self.cams = nn.ModuleDict()
        for key in self.image_keys:
            h, w, c = spaces[key].shape
            name = key.removeprefix("images/")
            if self.frozen:
                self.cams[name] = trunk(frozen_dim * frame_stack, feature_dim)
            else:
                self.cams[name] = ConvEncoder(c * frame_stack, (h, w), feature_dim, conv_strides)
        proprio_dim = sum(int(spaces[k].shape[0]) for k in self.proprio_keys)
        self.out_dim = feature_dim * len(self.image_keys) + proprio_dim
        if self.out_dim == 0:
            raise ValueError(f"no inputs: neither proprio keys nor cameras among {list(spaces)}")

    def forward(self, obs: dict[str, torch.Tensor], augment: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        parts = []
        for key, enc in zip(self.image_keys, self.cams.values()):
            if self.frozen:
                parts.append(enc(obs[feature_key(key)]))
            else:
                images = obs[key]
                if augment:
                    images = random_shift(images, self.aug_pad, generator)
                parts.append(enc(images))
        parts += [obs[k].float() for k in self.proprio_keys]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
