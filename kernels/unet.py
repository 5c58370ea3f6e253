"""A 2D/3D U-Net with the N2V2 options, and its exact receptive field (the engine's halo).

N2V2 (Hoeck et al. 2022) removes the checkerboard artefacts of Noise2Void with max-blur-pool
down-sampling, no top-level skip connection and no residual connection; all three are options
here so one class serves denoising (N2V2, Noise2Self) and segmentation. Dropout slots after
every block serve MC-dropout uncertainty later (off unless ``dropout > 0``).

Tiling: pooling makes outputs depend on a voxel's position modulo the total down-sampling
factor, so tiles must start on that grid (``align``) and the halo is rounded up to it; then a
tiled result equals the untiled one exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["batch", "group", "instance", "none"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net; JSON-able, stored in model cards."""

    ndim: int = 2
    in_channels: int = 1
    out_channels: int = 1
    depth: int = 2  # number of down-sampling steps
    width: int = 32  # channels of the top level; doubled per level
    norm: Norm = "batch"
    pool: tuple[int, ...] = ()  # down-sampling factor per spatial axis (1 or 2); default 2 on all
    blurpool: bool = False  # N2V2 max-blur-pool
    skip_top: bool = True  # N2V2: False
    residual: bool = False  # output += input (needs in == out channels)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.pool:
            object.__setattr__(self, "pool", (2,) * self.ndim)
        object.__setattr__(self, "pool", tuple(int(p) for p in self.pool))
        if len(self.pool) != self.ndim or any(p not in (1, 2) for p in self.pool):
            raise ValueError(f"pool must give 1 or 2 per spatial axis ({self.ndim}), got {self.pool}")
        if self.residual and self.in_channels != self.out_channels:
            raise ValueError("a residual U-Net needs as many output as input channels")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pool"] = list(self.pool)
        return d

    @property
    def factor(self) -> tuple[int, ...]:
        """Total down-sampling per axis: tiles and padded blocks must be multiples of it."""
        return tuple(p**self.depth for p in self.pool)


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _norm(kind: Norm, ndim: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm3d if ndim == 3 else nn.BatchNorm2d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm3d if ndim == 3 else nn.InstanceNorm2d)(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two 3-wide convolutions, each followed by a norm and ReLU, then optional dropout."""

    def __init__(self, ndim: int, cin: int, cout: int, norm: Norm, dropout: float):
        conv = _conv(ndim)
        layers: list[nn.Module] = []
        for a, b in ((cin, cout), (cout, cout)):
            layers += [conv(a, b, 3, padding=1), _norm(norm, ndim, b), nn.ReLU(inplace=True)]
        layers.append((nn.Dropout3d if ndim == 3 else nn.Dropout2d)(dropout) if dropout > 0 else nn.Identity())
        super().__init__(*layers)


class Down(nn.Module):
    """Max-pool by ``pool`` per axis; with ``blur``, N2V2's max-blur-pool: a 2-wide max with
    stride 1, then a [1, 2, 1] low-pass filter applied with the stride."""

    def __init__(self, ndim: int, pool: Sequence[int], blur: bool):
        super().__init__()
        self.ndim, self.pool, self.blur = ndim, tuple(pool), blur
        if blur:
            taps = torch.tensor([1.0, 2.0, 1.0])
            kernel = taps
            for _ in range(ndim - 1):
                kernel = kernel[..., None] * taps
            self.register_buffer("kernel", (kernel / kernel.sum())[None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.blur:
            return (F.max_pool3d if self.ndim == 3 else F.max_pool2d)(x, self.pool, self.pool)
        pad = []
        for p in reversed(self.pool):
            pad += [0, 1] if p > 1 else [0, 0]
        k = [2 if p > 1 else 1 for p in self.pool]
        x = (F.max_pool3d if self.ndim == 3 else F.max_pool2d)(F.pad(x, pad, mode="replicate"), k, 1)
        c = x.shape[1]
        weight = self.kernel.expand(c, 1, *self.kernel.shape[2:]).to(x.dtype)
        sl = [slice(None), slice(None)] + [slice(None) if p > 1 else slice(1, 2) for p in self.pool]
        weight = weight[tuple(sl)] * (2.0 ** sum(p == 1 for p in self.pool))  # centre tap is 1/2 of an axis
        conv = F.conv3d if self.ndim == 3 else F.conv2d
        return conv(x, weight, stride=self.pool, padding=[1 if p > 1 else 0 for p in self.pool], groups=c)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        widths = [c.width * 2**i for i in range(c.depth + 1)]
        self.encoders = nn.ModuleList()
        cin = c.in_channels
        for w in widths[:-1]:
            self.encoders.append(ConvBlock(c.ndim, cin, w, c.norm, c.dropout))
            cin = w
        self.downs = nn.ModuleList(Down(c.ndim, c.pool, c.blurpool) for _ in range(c.depth))
        self.bottleneck = ConvBlock(c.ndim, widths[-2] if c.depth else c.in_channels, widths[-1], c.norm, c.dropout)
        self.decoders = nn.ModuleList()
        for level in reversed(range(c.depth)):
            skip = widths[level] if (level > 0 or c.skip_top) else 0
            self.decoders.append(ConvBlock(c.ndim, widths[level + 1] + skip, widths[level], c.norm, c.dropout))
        self.head = _conv(c.ndim)(widths[0], c.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        inp = x
        skips = []
        for enc, down in zip(self.encoders, self.downs):
            x = enc(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for level, dec in zip(reversed(range(c.depth)), self.decoders):
            x = F.interpolate(x, scale_factor=c.pool, mode="nearest")
            if level > 0 or c.skip_top:
                x = torch.cat([x, skips[level]], dim=1)
            x = dec(x)
        x = self.head(x)
        return x + inp if c.residual else x

    def forward_padded(self, x: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
        """Forward any spatial size: pad the far end to a multiple of ``factor``, crop back.

        ``tta``: the mean over the flips and 90-degree rotations of the last two axes (the
        dihedral group, 8 passes; 4 flips when those axes pool differently). Padding comes
        first, so a block that starts on the pooling grid keeps every pixel on the same grid
        phase in every orientation, and a tiled result still equals the untiled one.
        """
        shape = x.shape[2:]
        xp = pad_to_factor(x, self.config.factor)
        y = self(xp) if not tta else self._dihedral_mean(xp)
        return y[(slice(None), slice(None)) + tuple(slice(0, n) for n in shape)]

    def _dihedral_mean(self, x: torch.Tensor) -> torch.Tensor:
        square = self.config.pool[-1] == self.config.pool[-2]
        total, passes = None, 0
        for k in (0, 1, 2, 3) if square else (0, 2):  # rotation by 180 degrees is a flip of both axes
            for flip in (False, True):
                t = torch.rot90(x, k, (-2, -1))
                t = torch.flip(t, (-1,)) if flip else t
                y = self(t)
                y = torch.flip(y, (-1,)) if flip else y
                y = torch.rot90(y, -k, (-2, -1))
                total, passes = (y if total is None else total + y), passes + 1
        return total / passes


def pad_to_factor(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Replicate-pad the far end of each spatial axis to a multiple of ``factor`` (the U-Net's
    total down-sampling), so any block size goes through the network."""
    pad: list[int] = []
    for n, f in zip(reversed(x.shape[2:]), reversed(factor)):
        pad += [0, (-n) % f]
    return F.pad(x, pad, mode="replicate") if any(pad) else x


@dataclass(frozen=True)
class ReceptiveField:
    """How far (voxels) outputs reach towards lower and higher indices, per axis."""

    low: tuple[int, ...]
    high: tuple[int, ...]
    factor: tuple[int, ...] = field(default=())

    @property
    def halo(self) -> tuple[int, ...]:
        """Symmetric halo covering both sides, rounded up to the down-sampling grid."""
        return tuple(-(-max(lo, hi) // f) * f for lo, hi, f in zip(self.low, self.high, self.factor))


def receptive_field(config: UNetConfig) -> ReceptiveField:
    """Exact reach of a U-Net's output into its input, from the layer arithmetic.

    Walks the deepest path (encoder, bottleneck, decoder; skips reach less): a 3-wide conv at
    sampling step J reaches J both ways; max-blur-pool adds J up (2-wide max) and J both ways
    (3-tap blur); a plain 2-max-pool adds J up; nearest up-sampling by f reaches (f-1)J down.
    """
    low, high = [], []
    for p in config.pool:
        lo = hi = 0
        jump = 1
        for _ in range(config.depth):
            lo += 2 * jump
            hi += 2 * jump
            if p > 1:
                hi += jump  # 2-wide max, to the right
                if config.blurpool:
                    lo += jump
                    hi += jump
            jump *= p
        lo += 2 * jump  # bottleneck
        hi += 2 * jump
        for _ in range(config.depth):
            lo += (p - 1) * (jump // p)  # nearest up-sampling: coarse voxel i feeds fine p*i..p*i+p-1
            jump //= p
            lo += 2 * jump
            hi += 2 * jump
        low.append(lo)
        high.append(hi)
    return ReceptiveField(tuple(low), tuple(high), config.factor)
