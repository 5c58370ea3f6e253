"""The Runner: one task per tile, read core + halo straight from the store, run the resident
kernel, crop, write whole output chunks, mark the tile done. Resumable, bounded, retried.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kernels.base import KernelSpec, build_kernel, resident
from pipeline.errors import InputError, OptionError
from pipeline.io import store
from pipeline.io.ngff import SPACE, Axis
from pipeline.io.read import ImageSource, open_image
from pipeline.io.write import ImageSink, create_collection, create_image
from pipeline.manifest import RunManifest, check_compatible
from pipeline.plan import TilePlan, make_plan
from pipeline.stats import compute_stats
from pipeline.tasks import run_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileTask:
    """Everything a tile task needs; small and picklable (no arrays, no open stores)."""

    source: ImageSource
    level: int
    has_channels: bool
    kernel: KernelSpec
    plan: TilePlan  # over the spatial axes
    sink: ImageSink
    manifest: RunManifest
    norm: tuple[tuple[float, float], ...] | None  # (low, high) per input channel

    def __call__(self, tile_id: int) -> dict[str, Any]:
        started = time.perf_counter()
        tile = self.plan.tile(tile_id)
        lead = (slice(None),) if self.has_channels else ()
        block = self.source.read(lead + tile.read, self.level).astype(np.float32, copy=False)
        if not self.has_channels:
            block = block[None]
        block = np.stack([self.plan.padded(ch, tile) for ch in block])
        if self.norm is not None:
            lo = np.asarray([a for a, _ in self.norm], np.float32).reshape((-1,) + (1,) * (block.ndim - 1))
            hi = np.asarray([b for _, b in self.norm], np.float32).reshape(lo.shape)
            block = (block - lo) / np.maximum(hi - lo, 1e-12)
        out = resident(self.kernel)(block[None])[0]
        out = out[(slice(None),) + tile.crop]
        out_lead = (slice(None),) if len(self.sink.dims) > len(tile.core) else ()
        self.sink.write(out_lead + tile.core, out if out_lead else out[0])
        self.manifest.mark_done(tile_id)
        return {"tile": tile_id, "voxels": int(np.prod(tile.core_shape)), "seconds": time.perf_counter() - started}


@dataclass(frozen=True)
class RunSummary:
    output: str
    tiles: int
    computed: int
    skipped: int
    seconds: float
    voxels_per_s: float


def _spatial(source: ImageSource) -> tuple[list[int], bool]:
    dims = source.dims
    if "t" in dims:
        raise InputError(f"'{source.url}' has a time axis; run-kernel processes one time point: convert one first.")
    spatial = [i for i, a in enumerate(source.axes) if a.type == SPACE or (a.type is None and a.name in "zyx")]
    has_c = "c" in dims
    if [*([dims.index("c")] if has_c else []), *spatial] != list(range(len(dims))):
        raise InputError(f"'{source.url}' axes {dims} are not (c,) + spatial; convert it to NGFF order first.")
    return spatial, has_c


def run_kernel(input_url: str, output_url: str, kernel: KernelSpec, client: Any, *, level: int = 0,
               tile_shape: Sequence[int] | None = None, pad_mode: str = "reflect", overwrite: bool = False,
               tile_ids: Sequence[int] | None = None, progress: bool = True, window: int | None = None,
               storage_options: dict | None = None) -> RunSummary:
    """Run ``kernel`` over an image, tile by tile, into ``<output_url>/<kernel name>``.

    Re-running the same call resumes (finished tiles are skipped); other parameters on an
    existing output are refused unless ``overwrite``. ``tile_ids`` restricts the run to some tiles.
    """
    source = open_image(input_url, storage_options)
    spatial, has_c = _spatial(source)
    lv = source.level(level)
    k = build_kernel(kernel)
    if k.ndim != len(spatial):
        raise OptionError(f"Kernel '{kernel.name}' is {k.ndim}D but '{input_url}' has {len(spatial)} spatial axes.")
    if k.in_channels != source.n_channels:
        raise OptionError(f"Kernel '{kernel.name}' takes {k.in_channels} channel(s); the image has {source.n_channels}.")
    spatial_dims = [source.dims[i] for i in spatial]
    spatial_shape = [lv.shape[i] for i in spatial]
    out_axes: list[Axis] = ([Axis("c", "channel")] if (has_c or k.out_channels > 1) else []) + [source.axes[i] for i in spatial]
    out_shape = ([k.out_channels] if len(out_axes) > len(spatial) else []) + spatial_shape
    chunks = ([1] if len(out_axes) > len(spatial) else []) + [lv.chunks[i] for i in spatial]
    out_chunk_spatial = chunks[-len(spatial):]
    plan = make_plan(spatial_shape, spatial_dims, out_chunk_spatial, dict(zip(spatial_dims, k.halo)),
                     tile_shape=tile_shape, itemsize=4 * max(k.in_channels, k.out_channels), pad_mode=pad_mode)
    stats = compute_stats(source) if k.normalize else None
    norm = tuple((c.percentile(1.0), c.percentile(99.9)) for c in stats.channels) if stats else None
    params = {
        "input": input_url, "level": level, "kernel": kernel.name, "kernel_params": kernel.params,
        "tile_shape": list(plan.tile_shape), "halo": list(plan.halo), "pad_mode": pad_mode,
        "normalisation": [list(n) for n in norm] if norm else None,
    }
    manifest = RunManifest(output_url, storage_options or {})
    image_url = store.join(output_url, kernel.name)
    if store.exists(output_url, storage_options) and not overwrite:
        check_compatible(output_url, manifest.read_params(), params)
        sink = ImageSink.open(image_url, storage_options)
    else:
        create_collection(output_url, overwrite=overwrite, storage_options=storage_options,
                          attributes={"tilewise": {"run": params}})
        manifest.write_params(params)
        sink = create_image(image_url, shape=out_shape, dtype=np.float32, axes=out_axes,
                            scale=[lv.scale[i] for i in spatial] if len(out_axes) == len(spatial)
                            else [1.0] + [lv.scale[i] for i in spatial],
                            translation=([0.0] if len(out_axes) > len(spatial) else []) + [lv.translation[i] for i in spatial],
                            chunks=chunks, name=kernel.name, storage_options=storage_options)
    done = manifest.done()
    wanted = range(len(plan)) if tile_ids is None else [int(t) for t in tile_ids]
    if tile_ids is not None and any(not 0 <= t < len(plan) for t in wanted):
        raise OptionError(f"Tile ids must be in 0..{len(plan) - 1} for this plan (grid {plan.grid}).")
    todo = [t for t in wanted if t not in done]
    task = TileTask(source, level, has_c, kernel, plan, sink, manifest, norm)
    log.info("%s: %d tiles, %d done, %d to run (halo %s)", kernel.name, len(plan), len(done), len(todo), plan.halo)
    started = time.perf_counter()
    voxels = 0
    for result in run_tasks(client, task, todo, total=len(todo), desc=kernel.name, progress=progress,
                            window=window, unit_size=int(np.prod(plan.tile_shape))):
        voxels += result["voxels"]
    seconds = time.perf_counter() - started
    if tile_ids is None or len(manifest.done()) == len(plan):
        from pipeline.pyramid import finalize_image

        finalize_image(sink, client, progress=progress)
    return RunSummary(output_url, len(plan), len(todo), len(wanted) - len(todo), seconds, voxels / max(seconds, 1e-9))
