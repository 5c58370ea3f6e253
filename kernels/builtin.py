"""Three simple kernels that make the engine usable and testable without a trained model.

``gaussian``: separable Gaussian smoothing (scipy), halo = scipy's radius, int(truncate * sigma + 0.5).
``convnet``: a small random-weight 3x3(x3) conv-net in PyTorch, seeded; receptive field = depth.
``identity``: copies its input, optionally after a fixed delay; it isolates the engine's own cost
(I/O, scheduling) in benchmarks and stands in for a slow model in fault-tolerance tests.

``gaussian`` is the worked example of ``docs/architecture.md`` ("Adding a kernel"): a ``Params``
model, ``traits`` set in ``__init__``, one ``__call__``, and an entry point in ``pyproject.toml``.
"""

from __future__ import annotations

import math
import time

import numpy as np
from typing import Annotated

from pydantic import Field

from kernels.contract import BatchContext, Kernel, KernelParams, KernelTraits


class GaussianKernel(Kernel):
    """Gaussian smoothing in raw input units (the engine does not normalise its input)."""

    name = "gaussian"

    class Params(KernelParams):
        # per spatial axis, pixels; the halo is 4 sigma, so 1000 px is already a very large read
        sigma: list[Annotated[float, Field(gt=0, le=1000)]] = Field(min_length=2, max_length=3)
        channels: int = Field(1, ge=1)
        truncate: float = Field(4.0, gt=0)

    def __init__(self, params: Params):
        super().__init__(params)
        self.sigma = tuple(float(s) for s in params.sigma)
        halo = tuple(int(params.truncate * s + 0.5) for s in self.sigma)  # scipy's radius
        self.traits = KernelTraits(ndim=len(self.sigma), in_channels=params.channels, out_channels=params.channels,
                                   halo=halo, input="raw", max_batch=64)

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        from scipy import ndimage

        out = np.empty(batch.shape, np.float32)
        for n in range(batch.shape[0]):
            for c in range(batch.shape[1]):
                out[n, c] = ndimage.gaussian_filter(batch[n, c].astype(np.float32), self.sigma,
                                                    truncate=self.params.truncate, mode="reflect")
        return out


class ConvNetKernel(Kernel):
    """``depth`` 3-wide convolutions with ReLU between; random weights from ``seed``.

    ``delay_s`` adds a fixed time per call, standing in for a heavier model (tests use it to
    keep a run going long enough to kill a worker in the middle of it).
    """

    name = "convnet"

    class Params(KernelParams):
        ndim: int = Field(3, ge=2, le=3)
        in_channels: int = Field(1, ge=1)
        out_channels: int = Field(1, ge=1)
        width: int = Field(16, ge=1)
        depth: int = Field(4, ge=1)
        seed: int = 0
        delay_s: float = Field(0.0, ge=0)

    def __init__(self, params: Params):
        super().__init__(params)
        p = params
        self.traits = KernelTraits(ndim=p.ndim, in_channels=p.in_channels, out_channels=p.out_channels,
                                   halo=(p.depth,) * p.ndim,  # each 3-wide conv adds one voxel per side
                                   max_batch=64, device="gpu")
        self.model = None
        self.device = "cpu"

    def build(self):
        import torch
        from torch import nn

        p = self.params
        conv = nn.Conv3d if p.ndim == 3 else nn.Conv2d
        gen = torch.Generator().manual_seed(p.seed)
        layers: list[nn.Module] = []
        channels = [p.in_channels] + [p.width] * (p.depth - 1) + [p.out_channels]
        for i, (a, b) in enumerate(zip(channels[:-1], channels[1:])):
            layer = conv(a, b, kernel_size=3, padding=1)
            with torch.no_grad():
                bound = 1.0 / math.sqrt(a * 3**p.ndim)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
            layers.append(layer)
            if i < p.depth - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).eval()

    def load(self, device: str) -> None:
        self.device = device
        self.model = self.build().to(device)

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        import torch

        if self.model is None:
            raise RuntimeError("convnet kernel used before load()")
        if self.params.delay_s:
            time.sleep(self.params.delay_s)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.model(x).float().cpu().numpy()


class IdentityKernel(Kernel):
    """Output = input; ``delay_s`` seconds per call simulate model time; ``halo`` is declared only."""

    name = "identity"

    class Params(KernelParams):
        ndim: int = Field(3, ge=2, le=3)
        channels: int = Field(1, ge=1)
        delay_s: float = Field(0.0, ge=0)
        halo: int = Field(0, ge=0)

    def __init__(self, params: Params):
        super().__init__(params)
        p = params
        self.traits = KernelTraits(ndim=p.ndim, in_channels=p.channels, out_channels=p.channels,
                                   halo=(p.halo,) * p.ndim, input="raw", max_batch=1024)

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        if self.params.delay_s:
            time.sleep(self.params.delay_s)
        return np.asarray(batch, dtype=np.float32)
