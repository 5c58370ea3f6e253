"""Two simple kernels that make the engine usable and testable before the model kernels land.

``gaussian``: separable Gaussian smoothing (scipy), halo = ceil(truncate * sigma).
``convnet``: a small random-weight 3x3(x3) conv-net in PyTorch, seeded; receptive field = depth.
``identity``: copies its input, optionally after a fixed delay; it isolates the engine's own cost
(I/O, scheduling) in benchmarks and stands in for a slow model in fault-tolerance tests.
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
    max_batch = 64

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
    """``depth`` 3-wide convolutions with ReLU between; random weights from ``seed``.

    ``delay_s`` adds a fixed time per call, standing in for a heavier model (tests use it to
    keep a run going long enough to kill a worker in the middle of it).
    """

    name = "convnet"
    normalize = True
    uses_gpu = True
    max_batch = 64

    def __init__(self, ndim: int = 3, in_channels: int = 1, out_channels: int = 1, width: int = 16,
                 depth: int = 4, seed: int = 0, delay_s: float = 0.0):
        self.ndim, self.in_channels, self.out_channels = int(ndim), int(in_channels), int(out_channels)
        self.delay_s = float(delay_s)
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
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.model(x).float().cpu().numpy()


@register("identity")
class IdentityKernel:
    """Output = input; ``delay_s`` seconds per call simulate model time; ``halo`` is declared only."""

    name = "identity"
    normalize = False
    max_batch = 1024

    def __init__(self, ndim: int = 3, channels: int = 1, delay_s: float = 0.0, halo: int = 0):
        self.ndim, self.in_channels, self.out_channels = int(ndim), int(channels), int(channels)
        self.delay_s = float(delay_s)
        self.halo = (int(halo),) * self.ndim

    def load(self, device: str) -> None:
        """Nothing to load."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        return np.asarray(batch, dtype=np.float32)
