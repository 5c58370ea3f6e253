"""Fused chains: a dense kernel's output computed where the next step reads it, so the
intermediate image is never read back from storage.

Two per-tile steps in a row (a denoiser, then a segmenter of the denoised image) can run as one
task per tile: the task computes the first kernel's output over the second step's read region
(its core + halo) from the input read with the first kernel's halo around *that* (the halos
add up), writes the first output's core exactly as the unfused step would (same tile grid, same
marker in that step's manifest), and hands the block to the second kernel.

:class:`FusedSource` is that intermediate image as an :class:`~pipeline.io.read.ImageSource`
whose reads compute it, so the second step plans, normalises and estimates object scale from the
values it would have read from storage (``docs/architecture.md``, "Fused chains"). It has one
level: where the unfused step samples a coarse level of a large image for its statistics, the
fused one samples chunks of the full-resolution level, which is why the two can differ slightly
on images above the statistics' sample budget.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from kernels import resident
from pipeline.core.errors import InputError
from pipeline.core.regions import Region, explicit, iter_regions
from pipeline.engine.plan import Tile, span
from pipeline.engine.runner import ImageTileJob, apply_kernel_with_maps, block_origin, valid_region
from pipeline.io.ngff import Level
from pipeline.io.read import ImageSource

CACHED_VOXELS = 2**24  # the client's statistics read the same sample several times: keep the last two
CACHED_READS = 2


@dataclass(frozen=True)
class FusedSource(ImageSource):
    """The output of ``job`` (a dense step's tile job over its input), computed on read: level 0
    (the levels above it are listed, as the output will have them, but hold data only once the
    first step's pyramid is built)."""

    job: ImageTileJob | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)
    is_ngff_store: ClassVar[bool] = False
    windowable: ClassVar[bool] = False  # computed on read: a read window would compute its whole region

    @classmethod
    def of(cls, job: ImageTileJob) -> "FusedSource":
        sink = job.sink
        return cls(url=sink.url, version=sink.version, name=sink.name, axes=sink.axes, levels=tuple(sink.levels),
                   channel_names=sink.channel_names, storage_options=dict(sink.storage_options), job=job)

    @property
    def readable_levels(self) -> tuple[Level, ...]:
        return self.levels[:1]  # the pyramid is built once every tile is written

    def __getstate__(self) -> dict[str, Any]:  # tasks carry the recipe, not the client's cache
        return {**self.__dict__, "_cache": {}}

    @property
    def _job(self) -> ImageTileJob:
        assert self.job is not None
        return self.job

    @property
    def _n_batch(self) -> int:
        return len(self._job.batch_shape)

    @property
    def _has_channel_axis(self) -> bool:
        return len(self.dims) > len(self._job.plan.shape) + self._n_batch

    def level_url(self, level: int = 0) -> str:
        """The input's level: what the chain's result depends on (and a resume fingerprints)."""
        reader = self._job.reader
        return reader.source.level_url(reader.level)

    def array(self, level: int = 0):  # type: ignore[override]
        raise InputError(f"'{self.url}' is computed on read (a fused chain); it has no stored array yet.")

    def dask(self, level: int = 0):
        raise InputError(f"'{self.url}' is computed on read (a fused chain); it has no stored array yet.")

    def missing_chunks(self, region: tuple[slice, ...], level: int = 0) -> list[tuple[int, ...]]:
        """The input chunks the computation of ``region`` reads that the store does not hold
        (``region`` at one index of each batch axis)."""
        job = self._job
        at = tuple(sl.start for sl in region[:self._n_batch])
        read, _, _ = span(tuple(region[-len(job.plan.shape):]), job.plan.halo, job.plan.shape)
        reader = job.reader
        return reader.source.missing_chunks(reader.index(read, at), reader.level)

    def read(self, region: tuple[slice, ...], level: int = 0) -> np.ndarray:
        """Compute ``region`` (in this image's axis order) block by block, a tile's size at a time."""
        if level != 0:
            raise InputError(f"'{self.url}' is computed on read (a fused chain) at one level; level {level} "
                             "does not exist yet.")
        full = explicit(region, self.levels[0].shape)
        key = tuple((sl.start, sl.stop) for sl in full)
        if key in self._cache:
            return self._cache[key].copy()
        job, nb = self._job, self._n_batch
        spatial = full[-len(job.plan.shape):]
        channels = full[nb] if self._has_channel_axis else slice(None)
        out = np.empty(tuple(sl.stop - sl.start for sl in full), np.dtype(job.out_dtype))
        rel = tuple(slice(0, sl.stop - sl.start) for sl in spatial)
        for at in itertools.product(*(range(sl.start, sl.stop) for sl in full[:nb])):
            pos = tuple(i - sl.start for i, sl in zip(at, full[:nb]))
            for part in iter_regions(tuple(r.stop for r in rel), job.plan.tile_shape):
                piece = tuple(slice(s.start + p.start, s.start + p.stop) for s, p in zip(spatial, part))
                _, values, _ = self.compute([(at, piece)])[0]
                values = job.cast(values)[channels]
                out[pos + ((slice(None),) if self._has_channel_axis else ()) + part] = \
                    values if self._has_channel_axis else values[0]
        if out.size <= CACHED_VOXELS:
            while len(self._cache) >= CACHED_READS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = out.copy()
        return out

    def compute(self, items: Sequence[tuple[tuple[int, ...], Region]]
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """For each ``(batch index, spatial region)``: the first kernel's input (as it sees it),
        output (float, before the output dtype) and maps over the region, computed from the
        region + the kernel's halo, batched as the kernel allows."""
        job, model = self._job, resident(self._job.kernel)
        align = model.traits.align or (1,) * len(job.plan.shape)
        # each block starts on the kernel's pooling grid, as the first step's own tiles do (its
        # tile starts and halo are multiples of it), so a U-Net pools the same windows
        grown = [tuple(slice(sl.start - sl.start % a, sl.stop) for sl, a in zip(region, align)) for _, region in items]
        spans = [span(region, job.plan.halo, job.plan.shape) for region in grown]
        blocks = [job.reader.read(read, pad, at) for (at, _), (read, pad, _) in zip(items, spans)]
        outs = apply_kernel_with_maps(model, blocks, valid=[valid_region(read, pad) for read, pad, _ in spans],
                                      origins=[block_origin(read, pad) for read, pad, _ in spans],
                                      scaling=job.reader.scaling, batch=job.batch)
        results = []
        for block, (out, maps), (_, _, crop), (_, region), big in zip(blocks, outs, spans, items, grown):
            c = (slice(None),) + tuple(slice(k.start + r.start - g.start, k.stop) for k, r, g in zip(crop, region, big))
            results.append((block[c], out[c], None if maps is None else maps[c]))
        return results

    def read_owned(self, tiles: Sequence[tuple[int, tuple[int, ...], Tile]], missing: Sequence[int]
                   ) -> list[np.ndarray]:
        """The blocks the next step reads for its tiles ``(id, batch index, tile)`` (each tile's
        read region, as stored), computed once; each tile's core of the first output is written
        and marked done in the first step's manifest on the way (its tiles are the same grid),
        with ``missing``, the input chunks the next step's reader counted for the tile."""
        job, model = self._job, resident(self._job.kernel)
        started = time.perf_counter()
        computed = self.compute([(at, tile.read) for _, at, tile in tiles])
        seconds = (time.perf_counter() - started) / max(len(tiles), 1)
        blocks = []
        for (g, at, tile), (inputs, outputs, maps), n_missing in zip(tiles, computed, missing):
            own = job.plan.tile(g % len(job.plan))
            if own.core != tile.core:
                raise RuntimeError(f"fused steps tile differently: tile {g} is {own.core} and {tile.core}")
            core = (slice(None),) + tuple(slice(c.start - r.start, c.stop - r.start) for c, r in zip(tile.core, tile.read))
            job.keep(model, g, at, own, inputs[core], outputs[core], None if maps is None else maps[core],
                     seconds=seconds, missing=n_missing)
            stored = job.cast(outputs)
            stored = stored if self._has_channel_axis else stored[0]
            blocks.append(stored.reshape((1,) * len(at) + stored.shape))
        return blocks
