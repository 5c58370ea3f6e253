"""Two simple kernels that make the engine usable and testable before the model kernels land.

``gaussian``: separable Gaussian smoothing (scipy), halo = ceil(truncate * sigma).
``convnet``: a small random-weight 3x3(x3) conv-net in PyTorch, seeded; receptive field = depth.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from kernels.base import register


@register("gaussian")
class GaussianKernel:
    name = "gaussian"
    normalize = False

    def __init__(self, sigma: Sequence[float], channels: int = 1, truncate: float = 4.0):
        self.sigma = tuple(float(s) for s in sigma)
        self.ndim = len(self.sigma)
        self.in_channels = self.out_channels = int(channels)
        self.truncate = float(truncate)
        # scipy's radius is int(truncate * sigma + 0.5)
        self.halo = tuple(int(self.truncate * s + 0.5) for s in self.sigma)

    def load(self, device: str) -> None:
        """Nothing to load: a filter has no weights."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        out = np.empty(batch.shape, np.float32)
        for n in range(batch.shape[0]):
            for c in range(batch.shape[1]):
                out[n, c] = ndimage.gaussian_filter(batch[n, c].astype(np.float32), self.sigma,
                                                    truncate=self.truncate, mode="reflect")
        return out


@register("convnet")
class ConvNetKernel:
    """``depth`` 3-wide convolutions with ReLU between; random weights from ``seed``."""

    name = "convnet"
    normalize = True

    def __init__(self, ndim: int = 3, in_channels: int = 1, out_channels: int = 1, width: int = 16,
                 depth: int = 4, seed: int = 0):
        self.ndim, self.in_channels, self.out_channels = int(ndim), int(in_channels), int(out_channels)
        self.width, self.depth, self.seed = int(width), int(depth), int(seed)
        self.halo = (self.depth,) * self.ndim  # each 3-wide conv adds one voxel per side
        self.model = None
        self.device = "cpu"

    def build(self):
        import torch
        from torch import nn

        conv = nn.Conv3d if self.ndim == 3 else nn.Conv2d
        gen = torch.Generator().manual_seed(self.seed)
        layers: list[nn.Module] = []
        channels = [self.in_channels] + [self.width] * (self.depth - 1) + [self.out_channels]
        for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
            layer = conv(a, b, kernel_size=3, padding=1)
            with torch.no_grad():
                bound = 1.0 / math.sqrt(a * 3**self.ndim)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
            layers.append(layer)
            if i < self.depth - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).eval()

    def load(self, device: str) -> None:
        self.device = device
        self.model = self.build().to(device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if self.model is None:
            raise RuntimeError("convnet kernel used before load()")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.model(x).float().cpu().numpy()
