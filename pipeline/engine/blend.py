"""Weight-blended stitching on a global window lattice (``docs/architecture.md``, invariant 3).

For models whose receptive field exceeds any affordable halo, the model runs on fixed-size
windows laid on one lattice over the whole volume (stride = window - overlap, the last window
flush with the far edge), and overlapping window outputs are averaged with smooth weights
(Gaussian or cosine). Because the lattice is global, a tile that owns a core simply evaluates
every lattice window touching its core: the blended value of a voxel is the same whichever tile
computes it, so tiled equals untiled and every output chunk still has one owner. The price is
recomputing the windows that straddle a tile border; larger tiles make it smaller.

Written by hand because MONAI's ``sliding_window_inference`` places windows relative to the
array it is given, which differs tile by tile and so would make seams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np

from pipeline.core.errors import OptionError
from pipeline.core.regions import Region

BlendWeights = Literal["gaussian", "cosine"]


def window_starts(n: int, window: int, stride: int) -> np.ndarray:
    """Lattice of window starts along one axis of length ``n``; the last window ends at ``n``."""
    if n <= window:
        return np.zeros(1, np.int64)
    starts = np.arange(0, n - window, stride, dtype=np.int64)
    return np.append(starts, n - window)


def window_weights(window: Sequence[int], kind: BlendWeights = "gaussian") -> np.ndarray:
    """Separable weights that fall towards the window edge and are never zero."""
    axes = []
    for w in window:
        pos = np.arange(w, dtype=np.float64) + 0.5
        if kind == "gaussian":
            sigma = max(w * 0.125, 0.5)  # MONAI's default sigma_scale
            axes.append(np.exp(-0.5 * ((pos - w / 2) / sigma) ** 2))
        elif kind == "cosine":
            axes.append(np.sin(np.pi * pos / w) ** 2)
        else:
            raise OptionError(f"Unknown blend weights '{kind}'; choose gaussian or cosine.")
    weights = axes[0]
    for a in axes[1:]:
        weights = np.multiply.outer(weights, a)
    weights = weights / weights.max()
    return np.maximum(weights, 1e-6).astype(np.float32)


@dataclass(frozen=True)
class BlendLattice:
    """Windows of ``window`` voxels every ``stride`` voxels over an array of ``shape``."""

    shape: tuple[int, ...]
    window: tuple[int, ...]
    stride: tuple[int, ...]
    weights: BlendWeights = "gaussian"

    @classmethod
    def make(cls, shape: Sequence[int], window: Sequence[int], overlap: float = 0.25,
             weights: BlendWeights = "gaussian") -> "BlendLattice":
        if len(window) != len(shape) or any(w < 1 for w in window):
            raise OptionError(f"Blend window {tuple(window)} must give a positive size per spatial axis {tuple(shape)}.")
        if not 0.0 <= overlap < 1.0:
            raise OptionError(f"Blend overlap must be in [0, 1), got {overlap}.")
        stride = tuple(max(1, int(round(w * (1 - overlap)))) for w in window)
        return cls(tuple(int(s) for s in shape), tuple(int(w) for w in window), stride, weights)

    def windows_touching(self, core: Region) -> list[np.ndarray]:
        """Per axis, the starts of the lattice windows that overlap ``core``."""
        out = []
        for sl, n, w, s in zip(core, self.shape, self.window, self.stride):
            starts = window_starts(n, w, s)
            out.append(starts[(starts < sl.stop) & (starts + w > sl.start)])
        return out

    def read_span(self, core: Region) -> tuple[Region, tuple[tuple[int, int], ...]]:
        """What a tile must read for ``core``: the windows' union clipped to the array, plus
        the padding past the far edge needed where the array is shorter than a window."""
        region, pad = [], []
        for starts, n, w in zip(self.windows_touching(core), self.shape, self.window):
            lo, hi = int(starts[0]), int(starts[-1]) + w
            region.append(slice(lo, min(hi, n)))
            pad.append((0, max(0, hi - n)))
        return tuple(region), tuple(pad)

    def iter_windows(self, core: Region) -> Iterator[tuple[int, ...]]:
        """Global starts of the windows touching ``core``, in lattice (C) order."""
        grids = np.meshgrid(*self.windows_touching(core), indexing="ij")
        for start in zip(*(g.ravel() for g in grids)):
            yield tuple(int(s) for s in start)
