"""Build pyramid levels 1..n region by region from the level below, in bounded memory.

Each task owns a block of whole write units of the coarser level, reads the matching region of
the finer level and reduces it: mean for intensities, mode for labels (so a coarse level only
ever holds ids that exist at level 0).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Literal, Sequence

import numpy as np

from pipeline.core.regions import Region, grow_block, iter_regions, n_regions, scale_region
from pipeline.io.write import ImageSink
from pipeline.engine.submit import run_tasks

log = logging.getLogger(__name__)
Method = Literal["mean", "mode"]
BLOCK_BYTES = 32 * 2**20
# A display contrast window needs a few percentiles, not 2^24 values: from the global sample's
# budget it took 0.5 s of a 6.5 s conv-net run on the client (64 x 256 x 512, level 1's 1 M voxels;
# a 64 x 1024 x 1024 output's level 1 holds 8 M).
OMERO_SAMPLE_VOXELS = 2**20


def _blocks(data: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """View ``data`` (edge-padded to factor multiples) as (coarse..., factor...) axes."""
    pad = [(0, (-s) % f) for s, f in zip(data.shape, factors)]
    if any(p for _, p in pad):
        # Edge padding makes a partial block's mean the mean of its real pixels when f == 2.
        data = np.pad(data, pad, mode="edge")
    shape = []
    for s, f in zip(data.shape, factors):
        shape += [s // f, f]
    nd = data.ndim
    blocks = data.reshape(shape)
    return blocks.transpose([2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)])


def downsample_mean(data: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Block mean, rounded back to integer dtypes."""
    nd = data.ndim
    out = _blocks(data, factors).mean(axis=tuple(range(nd, 2 * nd)), dtype=np.float64)
    if np.issubdtype(data.dtype, np.integer):
        info = np.iinfo(data.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(data.dtype)


def downsample_mode(data: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Most frequent value per block; ties go to the block's first (nearest) pixel."""
    nd = data.ndim
    blocks = _blocks(data, factors)
    flat = blocks.reshape(blocks.shape[:nd] + (-1,))
    # count matches one position at a time: memory stays at ~2 bytes per input voxel
    counts = np.zeros(flat.shape, np.uint8)
    for j in range(flat.shape[-1]):
        counts += flat == flat[..., j : j + 1]
    pick = np.argmax(counts, axis=-1)
    return np.take_along_axis(flat, pick[..., None], axis=-1)[..., 0]


def _reduce_block(sink: ImageSink, level: int, factors: tuple[int, ...], method: Method, region: Region) -> int:
    finer = sink.levels[level - 1]
    data = sink.array(level - 1, "r")[scale_region(region, factors, finer.shape)]
    reduce = downsample_mode if method == "mode" else downsample_mean
    sink.write(region, reduce(data, factors), level)
    return int(np.prod([sl.stop - sl.start for sl in region]))


def level_factors(sink: ImageSink, level: int) -> tuple[int, ...]:
    """Integer factors between ``level - 1`` and ``level`` (from their NGFF scales)."""
    a, b = sink.levels[level - 1].scale, sink.levels[level].scale
    return tuple(max(1, int(round(sb / sa))) for sa, sb in zip(a, b))


def build_pyramid(sink: ImageSink, client: Any, method: Method = "mean", *, progress: bool = True,
                  block_bytes: int = BLOCK_BYTES) -> None:
    """Fill levels 1..n of ``sink`` from level 0, level by level, one task per block."""
    for level in range(1, len(sink.levels)):
        lv = sink.levels[level]
        factors = level_factors(sink, level)
        itemsize = np.dtype(lv.dtype).itemsize * int(np.prod(factors))  # bytes read per output voxel
        block = grow_block(lv.write_unit, lv.shape, itemsize, block_bytes)
        fn = partial(_reduce_block, sink, level, factors, method)
        for _ in run_tasks(client, fn, iter_regions(lv.shape, block), total=n_regions(lv.shape, block),
                           desc=f"pyramid {sink.name} level {level}", progress=progress):
            pass
    log.info("built %d pyramid levels for %s (%s)", len(sink.levels) - 1, sink.url, method)


def finalize_image(sink: ImageSink, client: Any, *, labels: bool = False, progress: bool = True,
                   colors: Sequence[str] | None = None) -> None:
    """Build the pyramid and, for intensity images, write ``omero`` contrast from global stats.

    Statistics come from a coarse level of at most ``OMERO_SAMPLE_VOXELS`` (see
    :mod:`pipeline.engine.stats`), so this stays cheap.
    """
    build_pyramid(sink, client, "mode" if labels else "mean", progress=progress)
    if not labels:
        from pipeline.io.write import write_omero
        from pipeline.engine.stats import compute_stats

        write_omero(sink, compute_stats(sink.source(), max_voxels=OMERO_SAMPLE_VOXELS).omero_windows(), colors)
