"""Global intensity statistics, computed once per input (``docs/architecture.md``, invariant 4).

Read from the finest pyramid level that fits a voxel budget, or from randomly sampled chunks
of the coarsest level when no level is that small; never from the whole of level 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from kernels import Scaling
from kernels.brightfield import without_fill
from pipeline.core.errors import InputError
from pipeline.core.regions import grid_shape, region_of
from pipeline.io.read import ImageSource

if TYPE_CHECKING:
    from kernels.brightfield import ObjectSignal
    from kernels.objectscale import ObjectScale

PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
DEFAULT_PERCENTILES = (1.0, 99.9)  # what kernels see as 0..1 unless they declare other levels


@dataclass(frozen=True)
class ChannelStats:
    """Summary of one channel: min/max/mean/std and the percentiles in ``PERCENTILES``."""

    min: float
    max: float
    mean: float
    std: float
    percentiles: tuple[float, ...]

    def percentile(self, q: float) -> float:
        return self.percentiles[PERCENTILES.index(q)]


@dataclass(frozen=True)
class ImageStats:
    """Per-channel statistics and where they came from (level, voxels sampled)."""

    channels: tuple[ChannelStats, ...]
    level: int
    n_voxels: int

    def omero_windows(self) -> list[tuple[float, float, float, float]]:
        """(min, max, start, end) per channel: contrast from the 0.1 and 99.9 percentiles."""
        return [(c.min, c.max, c.percentile(0.1), c.percentile(99.9)) for c in self.channels]


def _summarise(values: np.ndarray) -> ChannelStats:
    values = values.astype(np.float64, copy=False).ravel()
    return ChannelStats(float(values.min()), float(values.max()), float(values.mean()), float(values.std()),
                        tuple(float(p) for p in np.percentile(values, PERCENTILES)))


def sample_values(source: ImageSource, *, max_voxels: int = 2**24, seed: int = 0) -> tuple[np.ndarray, int]:
    """``(C, n)`` voxel values from at most ~``max_voxels`` voxels, and the level they came from.

    The finest level that fits the budget is read whole; otherwise random chunks of the
    coarsest level are sampled (bounded memory whatever the volume size).
    """
    dims = source.dims
    c_axis = dims.index("c") if "c" in dims else None
    levels = source.readable_levels
    level = next((k for k, lv in enumerate(levels) if np.prod(lv.shape) <= max_voxels), None)
    if level is not None:
        data = source.read(tuple(slice(None) for _ in dims), level)
        data = np.moveaxis(data, c_axis, 0) if c_axis is not None else data[None]
        return data.reshape(data.shape[0], -1), level
    level = len(levels) - 1
    lv = levels[level]
    grid = grid_shape(lv.shape, lv.chunks)
    per_chunk = int(np.prod(lv.chunks))
    n_pick = max(1, min(int(np.prod(grid)), max_voxels // per_chunk))
    picks = np.random.default_rng(seed).choice(int(np.prod(grid)), size=n_pick, replace=False)
    pieces = []
    for flat in picks:
        block = source.read(region_of(np.unravel_index(flat, grid), lv.shape, lv.chunks), level)
        pieces.append(np.moveaxis(block, c_axis, 0).reshape(block.shape[c_axis], -1) if c_axis is not None
                      else block.reshape(1, -1))
    return np.concatenate(pieces, axis=1), level


def compute_stats(source: ImageSource, *, max_voxels: int = 2**24, seed: int = 0) -> ImageStats:
    """Statistics per channel from at most ~``max_voxels`` voxels (bounded memory)."""
    data, level = sample_values(source, max_voxels=max_voxels, seed=seed)
    return ImageStats(tuple(_summarise(row) for row in data), level, int(data.size))


def otsu_threshold(source: ImageSource, channel: int = 0, *, max_voxels: int = 2**24) -> float:
    """Otsu's global threshold (input units) of one channel, from the same bounded sample.

    A coarse level is a block mean of level 0, i.e. already smoothed, which is the image a
    threshold is usually taken on.
    """
    from kernels.brightfield import otsu_gap

    data, _ = sample_values(source, max_voxels=max_voxels)
    return otsu_gap(data[channel])


def nonfinite_message(url: str, where: str) -> str:
    return (f"'{url}' has NaN or infinite voxels ({where}); tilewise does not guess values for them: replace them "
            "(e.g. with 0 or the background level) first.")


@dataclass(frozen=True)
class Normalisation(Scaling):
    """Per-channel (low, high) global percentiles mapped to (0, 1): the :class:`kernels.Scaling`
    the engine hands normalised kernels, and what training records in a model card."""

    percentiles: tuple[float, float] = DEFAULT_PERCENTILES

    @classmethod
    def of(cls, source: ImageSource, percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> "Normalisation":
        """From the global statistics of an ``ImageSource`` (one bounded sample, see
        :func:`sample_values`), at the given percentile levels of each channel's values without
        a fill (:func:`kernels.brightfield.without_fill`)."""
        lo, hi = (float(p) for p in percentiles)
        data, level = sample_values(source)  # one bounded sample for the check and the percentiles
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            # NaN or Inf would make the percentiles, and every output of a network, NaN
            raise InputError(nonfinite_message(source.url, f"level {level}"))
        # a fill (a zero-padded margin, an empty edge) is no part of the image's range: 3 % of
        # zeros put the 3D nuclei sample's p1 at 0 and its background at 0.55 instead of ~0.15
        values = np.array([np.percentile(without_fill(row.astype(np.float64)), [lo, hi]) for row in data]).T
        return cls(tuple(float(v) for v in values[0]), tuple(float(v) for v in values[1]), (lo, hi))

    def pairs(self) -> list[list[float]]:
        """``[[low, high], ...]`` per channel, as recorded in run manifests."""
        return [[a, b] for a, b in zip(self.low, self.high)]

    def to_dict(self) -> dict:
        return {"low": list(self.low), "high": list(self.high), "percentiles": list(self.percentiles)}


def window_blocks(source: ImageSource, *, level: int = 0, max_voxels: int = 2**22) -> list[np.ndarray]:
    """``(C, *spatial)`` blocks (input units) of windows spread evenly over one level at its own
    resolution (together about ``max_voxels`` pixels; the first index of any batch axis).
    Decisions that depend on the objects themselves (polarity, stain, a threshold between
    objects and background) are made on these: at a whole slide's coarse levels the nuclei are
    below a pixel, and only glass and tissue are left."""
    spatial = [i for i, d in enumerate(source.dims) if d in source.spatial_dims]
    return _read_windows(source, level, spatial, max_voxels, _channels)


def _windows(shape: tuple[int, ...], spacing: tuple[float, ...], max_voxels: int) -> list[tuple[slice, ...]]:
    """Up to 2^ndim..3^ndim windows spread evenly over ``shape``, together about ``max_voxels``,
    equal in physical extent per axis (so an anisotropic z gets fewer, thicker voxels)."""
    nd = len(shape)
    if np.prod(shape) <= max_voxels:
        return [tuple(slice(0, s) for s in shape)]
    per_axis = 3 if nd == 2 else 2
    side = (max_voxels / per_axis**nd * float(np.prod(spacing))) ** (1.0 / nd)
    size = [min(n, max(8, int(side / s))) for n, s in zip(shape, spacing)]
    starts = [sorted({int(round(x)) for x in np.linspace(0, n - w, per_axis)}) for n, w in zip(shape, size)]
    return [tuple(slice(a, a + w) for a, w in zip(corner, size)) for corner in np.array(np.meshgrid(*starts, indexing="ij")).reshape(nd, -1).T]


def estimate_object_scale(source: ImageSource, *, level: int = 0, threshold: float | None = None,
                          signal: ObjectSignal | None = None, scaling: Scaling | None = None,
                          max_voxels: int = 2**22) -> ObjectScale | None:
    """The typical object diameter of an image (physical units), measured once for all tiles.

    The coarsest level within ``max_voxels`` is read whole when objects are still well resolved
    there; otherwise windows of the processed level (together about ``max_voxels``: small
    objects need full resolution). The image is thresholded at ``threshold`` (input units; Otsu
    of the global sample by default) and measured by :func:`kernels.objectscale.scale_of_mask`.
    Channels are averaged, or with ``signal`` (and the input's ``scaling``) the pixels become
    that object signal and ``threshold`` is in its units (dark objects, haematoxylin); the first
    index of any time or other batch axis is used. ``None`` when too few objects are above the
    threshold.
    """
    dims = source.dims
    spatial = [i for i, d in enumerate(dims) if d in source.spatial_dims]
    if signal is not None and threshold is None:
        raise ValueError("an object signal needs its threshold")
    value = otsu_threshold(source) if threshold is None else float(threshold)
    read = partial(_signal_block, signal=signal, scaling=scaling)
    # large objects: a coarser level read whole sees them all, uncut; accepted where they are
    # still well resolved there, else windows of the processed level (small objects)
    levels = source.readable_levels
    coarse = next((k for k in range(level, len(levels)) if np.prod([levels[k].shape[i] for i in spatial]) <= max_voxels),
                  None)
    if coarse is not None and coarse > level:
        found = _scale_of_level(source, coarse, value, spatial, max_voxels, read)
        if found is not None and found.diameter >= WELL_RESOLVED_PX * min(source.spatial_scale(coarse)):
            return found
    return _scale_of_level(source, level, value, spatial, max_voxels, read)


def _read_windows(source: ImageSource, level: int, spatial: list[int], max_voxels: int,
                  read: Callable[..., np.ndarray]) -> list[np.ndarray]:
    """The windows of one level (:func:`_windows`), each read and made a spatial block by ``read``."""
    lv = source.level(level)
    dims = source.dims
    blocks = []
    for window in _windows(tuple(lv.shape[i] for i in spatial), source.spatial_scale(level), max_voxels):
        region, it = [], iter(window)
        for i, d in enumerate(dims):
            region.append(next(it) if i in spatial else (slice(None) if d == "c" else slice(0, 1)))
        blocks.append(read(source.read(tuple(region), level), dims, spatial))
    return blocks


def smoothed_signal(blocks: list[np.ndarray], spacing: Sequence[float], *, sigma: float, signal: ObjectSignal,
                    scaling: Scaling | None) -> np.ndarray:
    """The object signal of ``blocks`` (:func:`window_blocks`, pixel size ``spacing``) smoothed
    by ``sigma`` (physical units), flat: the values the classical kernel thresholds, so its
    global levels are read off them. Noise widens the raw histogram's two classes unequally, so
    Otsu on raw values sits off the smoothed image's valley (on the left half of DSB-2018, 0.204
    against 0.199 normalised). Fills (:func:`kernels.brightfield.fill_values`, found on all
    blocks together) are left out with the voxels their smoothing reaches."""
    from scipy import ndimage

    from kernels.brightfield import fill_values

    signals = [signal(block, scaling) for block in blocks]
    fills = fill_values(np.concatenate([b.ravel() for b in signals]))
    reach = [2 * math.ceil(2 * sigma / s) + 1 for s in spacing]
    values = []
    for block in signals:
        smooth = ndimage.gaussian_filter(block, [sigma / s for s in spacing])
        if fills:
            near = ndimage.maximum_filter(np.isin(block, fills), size=reach)
            smooth = smooth[~near]
        values.append(smooth.ravel())
    return np.concatenate(values)


def background_level(values: np.ndarray, threshold: float) -> float | None:
    """The background's level among ``values`` (:func:`smoothed_signal`): the median of those
    below ``threshold``; None when there are none."""
    below = values[values < threshold]
    return float(np.median(below)) if below.size else None


WELL_RESOLVED_PX = 12  # an object this many pixels across is measured as well as at full resolution

# Small objects are measured on a finer grid: below ~12 pixels across, where a nucleus's largest
# inscribed ball rests on the voxel grid decides a good part of its measured size, and the
# estimate fell with the scale (synthetic packed nuclei, 2D: 0.61 of the labels' diameter at
# 8 px, 0.80 at 16 px and above; 3D: 0.57 at 6 px, 0.64 at 12 px, 0.90 at 25 px).
# Interpolating the smoothed image (linearly) and thresholding it there puts the edges between
# voxels: 2D 0.83 at 8 px, 3D 0.90 / 0.88 at 6 / 12 px (``bench_segment``'s tuning sets,
# in-process; the 3D sample's upper half 1.31 / 1.29 at x0.5 / x1, where it was 1.03 / 1.29).
UPSAMPLED_VOXELS = 2**24  # the finer grid's budget: ~64 MB of float32, its mask and distances


def _channels(block: np.ndarray, dims: tuple[str, ...], spatial: list[int]) -> np.ndarray:
    """One read window (batch axes at one index) as ``(C, *spatial)``, input units."""
    channels = np.moveaxis(block, dims.index("c"), 0) if "c" in dims else block[None]
    return channels.reshape((channels.shape[0],) + tuple(block.shape[i] for i in spatial))


def _signal_block(block: np.ndarray, dims: tuple[str, ...], spatial: list[int], *, signal: ObjectSignal | None,
                  scaling: Scaling | None) -> np.ndarray:
    """One read window (batch axes at one index) as a spatial float32 block: the channel mean,
    or the object signal."""
    channels = _channels(block, dims, spatial)
    if signal is not None:
        return signal(channels, scaling)
    return channels.astype(np.float32).mean(axis=0)


def _scale_of_level(source: ImageSource, level: int, value: float, spatial: list[int], max_voxels: int,
                    read: Callable[..., np.ndarray]) -> ObjectScale | None:
    """Measure on the windows of one level: first with half a pixel of smoothing (noise), then
    once more smoothed in proportion to the first answer, which joins the texture of large
    nuclei back into one object (the answer moves < 5 % after that)."""
    from scipy import ndimage

    from kernels.objectscale import SMOOTHING_PER_DIAMETER, scale_of_mask

    spacing = source.spatial_scale(level)
    blocks = _read_windows(source, level, spatial, max_voxels, read)

    def measure(sigma: float, up: tuple[int, ...] = ()) -> ObjectScale | None:
        # lazily: one smoothed block at a time, and none past the finer grid's budget
        smooth = (ndimage.gaussian_filter(b, [sigma / s for s in spacing]) for b in blocks)
        if not up:
            return scale_of_mask([b > value for b in smooth], spacing)
        kept, left = [], UPSAMPLED_VOXELS // int(np.prod(up))  # input voxels the finer grid's budget holds
        for b in smooth:
            if left < 8**b.ndim:
                break
            b = b[central_window(b.shape, left)]
            kept.append(ndimage.zoom(b, up, order=1, mode="nearest", grid_mode=True) > value)
            left -= b.size
        return scale_of_mask(kept, [s / u for s, u in zip(spacing, up)])

    first = measure(0.5 * min(spacing))
    if first is None:
        return None
    sigma = max(0.5 * min(spacing), SMOOTHING_PER_DIAMETER * first.diameter)
    return measure(sigma, finer_grid(first.diameter, spacing)) or first


def central_window(shape: Sequence[int], voxels: int) -> tuple[slice, ...]:
    """The centred window of ``shape`` holding at most ``voxels`` (every axis shrunk alike)."""
    f = min(1.0, (voxels / float(np.prod(shape))) ** (1.0 / len(shape)))
    size = [max(1, int(n * f)) for n in shape]
    return tuple(slice((n - w) // 2, (n - w) // 2 + w) for n, w in zip(shape, size))


def finer_grid(diameter: float, spacing: Sequence[float], *, most: int = 4) -> tuple[int, ...]:
    """Per axis, the integer factor that puts ``WELL_RESOLVED_PX`` voxels across an object of
    ``diameter`` (at most ``most``); ``()`` when every axis already has them."""
    up = tuple(int(min(most, max(1, math.ceil(WELL_RESOLVED_PX * s / diameter)))) for s in spacing)
    return up if any(u > 1 for u in up) else ()
