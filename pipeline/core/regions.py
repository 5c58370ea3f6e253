"""Regular block grids over an array: the regions that tasks own.

Every block is a whole number of write units (chunks or shards), so two tasks never write the
same chunk (``docs/architecture.md``, invariant 2).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

Region = tuple[slice, ...]


def grow_block(unit: Sequence[int], shape: Sequence[int], itemsize: int, target_bytes: int) -> tuple[int, ...]:
    """Grow ``unit`` by whole multiples (last axis first) until a block holds ~``target_bytes``.

    Never grows an axis past the array's extent, so small arrays get a single block.
    """
    block = [int(u) for u in unit]
    while int(np.prod(block)) * itemsize < target_bytes:
        for axis in reversed(range(len(block))):
            if block[axis] < shape[axis]:
                block[axis] += unit[axis]
                break
        else:
            break
    return tuple(block)


def grid_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.ceil(s / b) for s, b in zip(shape, block))


def region_of(index: Sequence[int], shape: Sequence[int], block: Sequence[int]) -> Region:
    """The region of block ``index``, clipped at the array edge."""
    return tuple(slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(index, block, shape))


def iter_regions(shape: Sequence[int], block: Sequence[int]) -> Iterator[Region]:
    """All block regions in C order; lazy, so a 10^5-block grid costs no memory."""
    for index in np.ndindex(*grid_shape(shape, block)):
        yield region_of(index, shape, block)


def n_regions(shape: Sequence[int], block: Sequence[int]) -> int:
    return int(np.prod(grid_shape(shape, block)))


def explicit(region: Sequence[slice], shape: Sequence[int]) -> Region:
    """``region`` with one ``start:stop`` slice per axis of ``shape`` (missing trailing axes are
    whole, ``None`` bounds resolved, steps dropped)."""
    region = tuple(region) + (slice(None),) * (len(shape) - len(region))
    return tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(region, shape))


def is_aligned(region: Region, shape: Sequence[int], unit: Sequence[int]) -> bool:
    """True when ``region`` covers whole write units (edges may stop at the array end)."""
    for sl, s, u in zip(region, shape, unit):
        start, stop, _ = sl.indices(s)
        if start % u or (stop % u and stop != s):
            return False
    return True


def scale_region(region: Region, factors: Sequence[int], shape: Sequence[int]) -> Region:
    """The region of the finer level (``factors`` times larger) that a coarse region covers."""
    return tuple(slice(sl.start * f, min(sl.stop * f, s)) for sl, f, s in zip(region, factors, shape))
