"""Blocks resampled on one global grid, so a model runs at the scale it was trained at and a
tiled result still equals the untiled one.

Resampling by ``zoom`` ``f`` puts model pixel ``k`` (an integer on a grid shared by the whole
image) at input coordinate ``(k + 0.5) / f - 0.5`` (pixel centres, as ``scipy.ndimage.zoom``
with ``grid_mode=True``). A block only ever resamples the part of that global grid it covers,
starting on a multiple of the network's down-sampling factor, so every block sees exactly the
model pixels the whole image would, in the same pooling phase. ``scipy.ndimage.zoom`` on a
block cannot do this: its output grid starts at the block's own corner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ModelGrid:
    """The model-pixel range ``[start, stop)`` per axis that a block covers, on the global grid."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))


def model_grid(origin: Sequence[int], shape: Sequence[int], zoom: float, align: Sequence[int]) -> ModelGrid:
    """The aligned model pixels whose centres lie inside a block at ``origin`` of ``shape``."""
    start, stop = [], []
    for o, n, a in zip(origin, shape, align):
        first = math.ceil((o + 0.5) * zoom - 0.5 - 1e-9)
        last = math.floor((o + n - 0.5) * zoom - 0.5 + 1e-9)  # inclusive
        k0 = -(-first // a) * a
        k1 = k0 + max((last + 1 - k0) // a, 1) * a
        start.append(k0)
        stop.append(k1)
    return ModelGrid(tuple(start), tuple(stop))


def to_model(block: np.ndarray, origin: Sequence[int], grid: ModelGrid, zoom: float) -> np.ndarray:
    """``(C, *spatial)`` input block -> ``(C, *grid.shape)`` on the model grid (linear)."""
    from scipy import ndimage

    coords = np.meshgrid(*[(np.arange(a, b) + 0.5) / zoom - 0.5 - o for a, b, o in zip(grid.start, grid.stop, origin)],
                         indexing="ij")
    return np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in block]).astype(np.float32)


def from_model(maps: np.ndarray, origin: Sequence[int], shape: Sequence[int], grid: ModelGrid,
               zoom: float) -> np.ndarray:
    """``(C, *grid.shape)`` maps on the model grid -> ``(C, *shape)`` on the input block (linear)."""
    from scipy import ndimage

    coords = np.meshgrid(*[(o + np.arange(n) + 0.5) * zoom - 0.5 - a for o, n, a in zip(origin, shape, grid.start)],
                         indexing="ij")
    return np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in maps]).astype(np.float32)


def input_halo(model_halo: Sequence[int], align: Sequence[int], zoom: float) -> tuple[int, ...]:
    """Input pixels of halo that cover ``model_halo`` model pixels plus the alignment slack and
    the interpolation's one pixel, on each side."""
    return tuple(math.ceil((h + a + 1) / zoom) + 1 for h, a in zip(model_halo, align))
