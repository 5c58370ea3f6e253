"""Per-object embeddings: a fixed-size crop centred on each object in, one vector out.

An embedding kernel maps a batch of crops ``(N, C, *crop)`` (normalised intensities) to
``(N, D)`` vectors (``traits.output == "embeddings"``). The crop is the whole context, so the
kernel's halo is 0; the embedding step reads each crop with the tile's halo so an object on a
tile border gets exactly the crop it would get untiled.

- ``embed-encoder``: the encoder of a trained tilewise U-Net (segmentation or denoising): each
  encoder level's output (and the bottleneck's) is averaged over the crop, and the levels are
  concatenated; ``level_slices`` says which columns came from which level (the layer sweep);
- ``embed-untrained``: the same encoder with random weights (``seed``): what the architecture
  alone gives, the baseline a trained encoder must beat;
- ``embed-pixel``: the crop itself, block-averaged to a small grid and flattened.

The fourth baseline, ``structure`` (size, shape, intensity from the object table), needs no
crop and is assembled by the embedding step.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from kernels.contract import BatchContext, Kernel, KernelParams, KernelTraits
from kernels.modelfile import UNetModelKernel


def encoder_levels(net, x) -> list:
    """The outputs of a ``kernels.unet.UNet``'s encoder blocks and bottleneck (fine to coarse)."""
    levels = []
    for enc, down in zip(net.encoders, net.downs):
        x = enc(x)
        levels.append(x)
        x = down(x)
    levels.append(net.bottleneck(x))
    return levels


class _EncoderMixin:
    """Shared by the trained and untrained encoders: pooled level outputs of a U-Net."""

    net = None
    device = "cpu"

    def _widths(self, config) -> list[int]:
        return [config.width * 2**i for i in range(config.depth + 1)]

    def level_slices(self) -> list[tuple[int, int]]:
        """Column ranges of each encoder level (fine to coarse) in the embedding."""
        edges = np.cumsum([0] + self._widths(self.config))
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        from kernels.unet import pad_to_factor

        if self.net is None:
            raise RuntimeError(f"{self.name} kernel used before load()")
        with torch.inference_mode():
            x = pad_to_factor(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device),
                              self.config.factor)
            pooled = [level.mean(dim=tuple(range(2, level.ndim))) for level in encoder_levels(self.net, x)]
            return torch.cat(pooled, dim=1).float().cpu().numpy()


class EncoderEmbedKernel(_EncoderMixin, UNetModelKernel):
    """The encoder of a trained U-Net (any tilewise model folder; an ensemble's first member)."""

    name = "embed-encoder"

    def __init__(self, params: UNetModelKernel.Params):
        super().__init__(params)
        c = self.config
        self.traits = KernelTraits(ndim=c.ndim, in_channels=c.in_channels, out_channels=sum(self._widths(c)),
                                   halo=(0,) * c.ndim, percentiles=self.traits.percentiles, output="embeddings",
                                   max_batch=64, device="gpu")

    def load(self, device: str) -> None:
        super().load(device)
        if self.uncertainty is not None and self.uncertainty.method == "ensemble":
            self.net = self.net[0]

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        return self.embed(batch)


class UntrainedEmbedKernel(_EncoderMixin, Kernel):
    """A randomly initialised encoder of the same architecture (``model``'s, when given)."""

    name = "embed-untrained"

    class Params(KernelParams):
        architecture: dict  # a UNetConfig as a dict (a model card's ``architecture``)
        seed: int = 0

    def __init__(self, params: Params):
        from kernels.unet import UNetConfig

        super().__init__(params)
        arch = dict(params.architecture)
        self.config = UNetConfig(**{**arch, "pool": tuple(arch.get("pool", ())), "dropout": 0.0})
        c = self.config
        self.traits = KernelTraits(ndim=c.ndim, in_channels=c.in_channels, out_channels=sum(self._widths(c)),
                                   halo=(0,) * c.ndim, output="embeddings", max_batch=64, device="gpu")

    def load(self, device: str) -> None:
        import torch

        from kernels.unet import UNet

        torch.manual_seed(self.params.seed)  # torch's default initialisation, from this seed
        self.net, self.device = UNet(self.config).to(device).eval(), device

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        return self.embed(batch)


class PixelEmbedKernel(Kernel):
    """The crop's intensities, block-averaged to ``grid`` per axis (an axis shorter than the
    grid keeps its size) and flattened: the raw-pixel baseline."""

    name = "embed-pixel"

    class Params(KernelParams):
        crop: list[int] = Field(min_length=2, max_length=3)
        channels: int = Field(1, ge=1)
        grid: int = Field(8, ge=1, le=64)

    def __init__(self, params: Params):
        super().__init__(params)
        self.shape = tuple(min(params.grid, c) for c in params.crop)
        ndim = len(params.crop)
        self.traits = KernelTraits(ndim=ndim, in_channels=params.channels,
                                   out_channels=params.channels * int(np.prod(self.shape)), halo=(0,) * ndim,
                                   output="embeddings", max_batch=256)

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        from skimage.transform import resize

        out = [resize(block, (block.shape[0],) + self.shape, order=1, anti_aliasing=True, preserve_range=True)
               for block in batch.astype(np.float32)]
        return np.stack(out).reshape(len(batch), -1).astype(np.float32)
