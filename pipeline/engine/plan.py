"""TilePlan: output-chunk-aligned tile cores, each read with a halo covering the receptive field.

Tiles are computed on demand from their id (C-order index in the tile grid), so a plan for a
10^5-tile volume is a few numbers, not a list (planning takes constant memory: ``docs/architecture.md``, invariant 3).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

from kernels.contract import PAD_MODES, PadMode
from pipeline.core.errors import OptionError
from pipeline.core.regions import Region, grid_shape, grow_block, region_of

log = logging.getLogger(__name__)



def pad_block(block: np.ndarray, pad: Sequence[tuple[int, int]], mode: PadMode) -> np.ndarray:
    """Pad the trailing ``len(pad)`` axes of ``block`` (leading axes, e.g. channels, untouched)."""
    if not any(a or b for a, b in pad):
        return block
    lead = [(0, 0)] * (block.ndim - len(pad))
    return np.pad(block, lead + [tuple(p) for p in pad], mode=mode)


def span(core: Region, halo: Sequence[int], shape: Sequence[int]
         ) -> tuple[Region, tuple[tuple[int, int], ...], Region]:
    """``(read, pad, crop)`` of any ``core`` region read with ``halo``: the region to read
    (clipped to ``shape``), the padding beyond the edge, and the core inside the padded block."""
    read, pad, crop = [], [], []
    for sl, h, n in zip(core, halo, shape):
        lo, hi = sl.start - h, sl.stop + h
        read.append(slice(max(lo, 0), min(hi, n)))
        pad.append((max(0, -lo), max(0, hi - n)))
        crop.append(slice(h, h + sl.stop - sl.start))
    return tuple(read), tuple(pad), tuple(crop)


@dataclass(frozen=True)
class Tile:
    """One task's share of the volume.

    ``core`` is what the task owns and writes; ``read`` is core + halo clipped to the array;
    ``pad`` is the halo that lies beyond the array edge (filled with the plan's pad mode); ``crop``
    locates the core inside the padded block the kernel sees.
    """

    id: int
    index: tuple[int, ...]
    core: Region
    read: Region
    pad: tuple[tuple[int, int], ...]
    crop: Region

    @property
    def core_shape(self) -> tuple[int, ...]:
        return tuple(sl.stop - sl.start for sl in self.core)


@dataclass(frozen=True)
class TilePlan:
    """Tiles over an array of ``shape`` with cores of ``tile_shape`` and per-axis ``halo``."""

    shape: tuple[int, ...]
    tile_shape: tuple[int, ...]
    halo: tuple[int, ...]
    pad_mode: PadMode = "reflect"

    @property
    def grid(self) -> tuple[int, ...]:
        return grid_shape(self.shape, self.tile_shape)

    def __len__(self) -> int:
        return int(np.prod(self.grid))

    def tile(self, tile_id: int) -> Tile:
        if not 0 <= tile_id < len(self):
            raise IndexError(f"tile id {tile_id} outside 0..{len(self) - 1}")
        index = tuple(int(i) for i in np.unravel_index(tile_id, self.grid))
        core = region_of(index, self.shape, self.tile_shape)
        return Tile(tile_id, index, core, *span(core, self.halo, self.shape))

    def __iter__(self) -> Iterator[Tile]:
        for tile_id in range(len(self)):
            yield self.tile(tile_id)

    def padded(self, block: np.ndarray, tile: Tile) -> np.ndarray:
        """The read block padded out to core + full halo with the plan's pad mode."""
        return pad_block(block, tile.pad, self.pad_mode)

    def owner_of(self, points: np.ndarray) -> np.ndarray:
        """The id of the tile whose core holds each ``(n, ndim)`` pixel position (floored,
        clipped to the array): who owns an object by its centroid."""
        index = np.clip(np.floor(points).astype(np.int64), 0, np.asarray(self.shape) - 1) // np.asarray(self.tile_shape)
        return np.ravel_multi_index(index.T, self.grid) if len(index) else np.zeros(0, np.int64)

    def foreground_ids(self, mask: np.ndarray) -> list[int]:
        """Ids of tiles whose core overlaps ``True`` in a low-resolution foreground ``mask``.

        The mask covers the same extent as the array at any coarser sampling; a tile is kept when
        any mask pixel mapping into its core (grown by one mask pixel, to be safe at the
        resampling boundary) is set.
        """
        if mask.ndim != len(self.shape):
            raise OptionError(f"foreground mask has {mask.ndim} dims; the plan has {len(self.shape)}.")
        factors = [n / m for n, m in zip(self.shape, mask.shape)]
        keep = []
        for tile in self:
            sel = tuple(slice(max(0, int(sl.start / f) - 1), min(m, int(math.ceil(sl.stop / f)) + 1))
                        for sl, f, m in zip(tile.core, factors, mask.shape))
            if mask[sel].any():
                keep.append(tile.id)
        return keep


# A default tile's working set (padded voxels x the kernel's ``working_bytes``) stays under this:
# a 2-core laptop worker gets a few GiB, and a tile is one task's whole memory (invariant 6).
WORKING_MEMORY = 2 * 2**30


def fit_working_memory(core: Sequence[int], unit: Sequence[int], halo: Sequence[int], working_bytes: int,
                       limit: int = WORKING_MEMORY) -> tuple[int, ...]:
    """Shrink ``core`` by whole write units (the axis with the largest padded extent first) until
    core + halo times ``working_bytes`` fits ``limit``, or one write unit is left; a big halo
    (a deep network's receptive field) is what makes a tile heavy, so it counts in full."""
    core = [int(c) for c in core]
    padded = lambda: int(np.prod([c + 2 * h for c, h in zip(core, halo)]))  # noqa: E731
    while padded() * working_bytes > limit:
        shrinkable = [a for a in range(len(core)) if core[a] > unit[a]]
        if not shrinkable:
            log.warning("the smallest tile (one output chunk %s + halo %s) needs ~%.1f GiB while the kernel runs; "
                        "write the output (or convert the input) with smaller chunks, or give workers more memory",
                        tuple(unit), tuple(halo), padded() * working_bytes / 2**30)
            break
        axis = max(shrinkable, key=lambda a: core[a] + 2 * halo[a])
        core[axis] = max(int(unit[axis]), (core[axis] // 2 // unit[axis]) * unit[axis])
    return tuple(core)


def make_plan(shape: Sequence[int], dims: Sequence[str], write_unit: Sequence[int],
              halo: Mapping[str, int], *, tile_shape: Sequence[int] | None = None,
              itemsize: int = 4, target_bytes: int = 32 * 2**20, pad_mode: PadMode = "reflect",
              align: Sequence[int] | None = None, working_bytes: int = 0) -> TilePlan:
    """Plan tiles whose cores are whole output write units (chunks or shards).

    Parameters
    ----------
    shape, dims : the output array's shape and axis names.
    write_unit : the output chunk (or shard) shape; cores are multiples of it, so no two tiles
        ever write the same chunk.
    halo : halo per axis name (the kernel's receptive field); axes not named get 0.
    tile_shape : explicit core shape (rounded up to write-unit multiples); default grows the
        write unit to ~``target_bytes``, then shrinks it until its padded working set
        (``working_bytes`` per voxel, the kernel's) fits ``WORKING_MEMORY``.
    align : per-axis grid the tile starts must lie on (a U-Net's total down-sampling, so its
        pooling windows fall the same way in every tile as in the whole image).
    """
    if pad_mode not in PAD_MODES:
        raise OptionError(f"Unknown padding mode '{pad_mode}'; choose from {', '.join(PAD_MODES)}.")
    unknown = set(halo) - set(dims)
    if unknown:
        raise OptionError(f"Halo names axes {sorted(unknown)} that the image does not have ({', '.join(dims)}).")
    halo_t = tuple(int(halo.get(d, 0)) for d in dims)
    if any(h < 0 for h in halo_t):
        raise OptionError(f"Halo must be >= 0 per axis, got {dict(halo)}.")
    if align is not None:
        write_unit = [math.lcm(int(u), int(a)) for u, a in zip(write_unit, align)]
    if tile_shape is None:
        core = grow_block(write_unit, shape, itemsize, target_bytes)
        if working_bytes:
            core = fit_working_memory(core, write_unit, halo_t, working_bytes)
    else:
        if len(tile_shape) != len(shape) or any(int(t) < 1 for t in tile_shape):
            raise OptionError(f"--tile needs {len(shape)} positive sizes (one per spatial axis {', '.join(dims)}), "
                              f"got {tuple(tile_shape)}.")
        core = tuple(min(u * max(1, math.ceil(t / u)), u * math.ceil(n / u))
                     for t, u, n in zip(tile_shape, write_unit, shape))
    return TilePlan(tuple(int(s) for s in shape), tuple(int(c) for c in core), halo_t, pad_mode)
