"""Segment an image into globally stitched instance labels and an object table.

Runs the three passes of :mod:`pipeline.stitch` through the engine, then writes the labels
pyramid (mode downsampling, ``image-label`` metadata) and finishes the table. Output layout::

    OUT/labels/<name>/     labels multiscale (uint32 ids 1..N; uint64 past 2^32 objects)
    OUT/tables/<name>/     Parquet parts + _attributes.json (region: labels/<name>)
    OUT/_tilewise/         run manifest: parameters, done tiles per pass, summary

The labels' ``image-label.source.image`` points at the input image, so a viewer can pair them
(``napari IN OUT/labels/<name>``). Every pass resumes: re-running the same call skips finished
tiles, and a finished run returns its stored summary.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from kernels import KernelSpec
from pipeline.errors import OptionError
from pipeline.io import store
from pipeline.io.write import ImageSink, create_collection, create_label_image
from pipeline.manifest import RunManifest, check_compatible
from pipeline.plan import TilePlan
from pipeline.run import MAX_TASKS, EngineSetup, gpu_resources, prepare_engine, tiles_per_task
from pipeline.stitch import (
    MAX_TILES,
    LabelTileTask,
    MatchTask,
    RelabelTask,
    StitchFiles,
    resolve,
)
from pipeline.tables import TableSpec, begin_table, combine, finish, table_url, write_part
from pipeline.tasks import run_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentSummary:
    output: str
    labels: str
    table: str | None
    tiles: int
    objects: int
    stitched_objects: int  # objects that span more than one tile
    edges: int
    halo_edge_objects: int  # objects that reached the outer edge of a tile's halo
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inner_chunks(tile_shape: Sequence[int], halo: Sequence[int]) -> tuple[int, ...]:
    """Inner chunks of the raw-id shards: about the halo's depth (>= 16), dividing the tile, so a
    neighbour reading a halo-deep slab decompresses little more than the slab."""
    out = []
    for t, h in zip(tile_shape, halo):
        want = max(16, h)
        out.append(max(d for d in range(1, t + 1) if t % d == 0 and d <= max(want, 1)))
    return tuple(out)


def _groups(ids: Sequence[int], per_task: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i:i + per_task]) for i in range(0, len(ids), per_task)]


def _label_sink(output_url: str, name: str, setup: EngineSetup, n_objects: int, consecutive: bool, input_url: str,
                storage_options: dict | None) -> ImageSink:
    url = store.join(output_url, "labels", name)
    if store.exists(url, storage_options):
        return ImageSink.open(url, storage_options)
    scale, translation, chunks = setup.spatial_levels
    axes = [setup.source.axes[i] for i in setup.spatial]
    n_levels = len(setup.source.levels) - setup.level
    dtype = np.uint32 if consecutive and n_objects < 2**32 - 1 else np.uint64
    source = input_url if "://" in input_url else os.path.abspath(input_url)
    return create_label_image(store.join(output_url, "labels"), name, shape=setup.plan.shape, axes=axes, scale=scale,
                              translation=translation, chunks=chunks, n_levels=n_levels, dtype=dtype,
                              n_labels=min(max(n_objects, 1), 256), source_image=source,
                              storage_options=storage_options)


def segment_labels(input_url: str, output_url: str, kernel: KernelSpec, client: Any, *, name: str = "nuclei",
                   level: int = 0, tile_shape: Sequence[int] | None = None, pad_mode: str | None = None,
                   batch: int = 1, iou: float = 0.5, consecutive: bool = True, table: bool = True,
                   overwrite: bool = False, keep_intermediate: bool = False, progress: bool = True,
                   max_tasks: int = MAX_TASKS, storage_options: dict | None = None) -> SegmentSummary:
    """Run a labels kernel tile by tile and stitch its objects into one global labels image.

    Parameters
    ----------
    kernel : a kernel whose output is instance labels (``labels = True``), e.g.
        ``segment-classical``, ``segment-unet`` or ``relabel``.
    iou : objects of neighbouring tiles are the same object when their IoU inside the overlap
        is at least this (0.5 keeps matches one-to-one).
    consecutive : final ids 1..N (default); otherwise the sparse ``tile << 32 | local`` ids of
        each object's root are kept (no prefix sum needed, uint64).
    pad_mode : what lies beyond the volume edge; by default the kernel's choice: ``constant``
        (zero) for the classical watershed, because a mirrored edge creates mirrored objects whose
        fronts tie exactly on the edge; ``reflect`` for the U-Net, which never saw a flat edge in
        training and labels only inside the volume (it takes the ``valid`` region).
    table : write ``tables/<name>`` (one row per object).
    keep_intermediate : keep ``_tilewise/stitch`` (raw ids, shells, partial sums) after success.
    """
    setup = prepare_engine(input_url, kernel, level=level, tile_shape=tile_shape, pad_mode=pad_mode,
                           storage_options=storage_options)  # None: the kernel's pad_mode
    k, plan = setup.kernel, setup.plan
    if not getattr(k, "labels", False):
        raise OptionError(f"Kernel '{kernel.name}' does not produce instance labels; use segment-classical, "
                          "segment-unet or relabel.")
    if len(plan) > MAX_TILES:
        raise OptionError(f"{len(plan)} tiles exceed the {MAX_TILES} that global ids can number; use a larger --tile.")
    if not 0 < iou <= 1:
        raise OptionError(f"iou must be in (0, 1], got {iou}.")
    batch = max(1, min(batch, int(getattr(k, "max_batch", 1))))
    params = {**setup.params, "name": name, "stitch": {"iou": iou, "consecutive": consecutive}, "table": table}
    manifest = RunManifest(output_url, storage_options or {})
    files = StitchFiles(output_url, storage_options or {})
    if store.exists(output_url, storage_options) and not overwrite:
        check_compatible(output_url, manifest.read_params(), params)
        finished = manifest.read_json("summary")
        if finished is not None:
            log.info("%s is complete; nothing to do", output_url)
            return SegmentSummary(**finished)
    else:
        create_collection(output_url, overwrite=overwrite, storage_options=storage_options,
                          attributes={"tilewise": {"run": params}})
        manifest.write_params(params)
        files.begin()
        files.create_raw(plan.shape, plan.tile_shape, inner_chunks(plan.tile_shape, plan.halo))
        manifest.at("relabel").begin()
    seconds: dict[str, float] = {}
    objects_per_tile, halo_edge = _segment_pass(setup, kernel, client, manifest, files, batch, table, progress,
                                                max_tasks, seconds)
    relabel = manifest.at("relabel")
    per_task = tiles_per_task(len(plan), 1, max_tasks)
    started = time.perf_counter()
    edges = [np.empty((0, 2), np.uint64)]
    for result in run_tasks(client, MatchTask(plan, files, iou), _groups(range(len(plan)), per_task),
                            total=-(-len(plan) // per_task), desc=f"{name}: match", progress=progress):
        edges += result
    edges_all = np.concatenate(edges)
    resolution = resolve(edges_all, objects_per_tile, consecutive)
    seconds["match"] = time.perf_counter() - started
    sink = _label_sink(output_url, name, setup, resolution.n_objects, consecutive, input_url, storage_options)
    spec = None
    t_url = None
    if table:
        scale, translation, _ = setup.spatial_levels
        spec = TableSpec(tuple(setup.spatial_dims), tuple(scale), tuple(translation),
                         tuple(setup.source.axes[i].unit for i in setup.spatial),
                         channels=setup.source.n_channels, region=f"labels/{name}")
        t_url = table_url(output_url, name)
        if not store.exists(t_url, storage_options):
            begin_table(output_url, name, spec, storage_options)
    started = time.perf_counter()
    todo = sorted(set(range(len(plan))) - relabel.done())
    per_task = tiles_per_task(len(todo), 1, max_tasks)
    items = ((group, [resolution.for_tile(t) for t in group]) for group in _groups(todo, per_task))
    task = RelabelTask(plan, files, sink, relabel, t_url, spec)
    for _ in run_tasks(client, task, items, total=-(-len(todo) // per_task), desc=f"{name}: relabel",
                       progress=progress):
        pass
    seconds["relabel"] = time.perf_counter() - started
    started = time.perf_counter()
    if table:
        _finish_stitched_rows(files, t_url, spec, storage_options)
    from pipeline.pyramid import finalize_image

    finalize_image(sink, client, labels=True, progress=progress)
    seconds["pyramid_and_table"] = time.perf_counter() - started
    stitched = int(np.count_nonzero(resolution.is_root))
    summary = SegmentSummary(output_url, sink.url, t_url, len(plan), resolution.n_objects, stitched,
                             int(len(edges_all)), halo_edge, seconds)
    manifest.write_json("summary", summary.to_dict())
    if not keep_intermediate:
        files.remove()
    if halo_edge:
        log.warning("%d objects reached the outer edge of a tile's halo (halo %s): they are larger than the halo, "
                    "and tiles may have cut them differently; raise the halo to be sure", halo_edge, plan.halo)
    log.info("%s: %d objects (%d stitched across tiles) from %d tiles", sink.url, resolution.n_objects, stitched,
             len(plan))
    return summary


def _segment_pass(setup: EngineSetup, kernel: KernelSpec, client: Any, manifest: RunManifest, files: StitchFiles,
                  batch: int, table: bool, progress: bool, max_tasks: int, seconds: dict[str, float]
                  ) -> tuple[np.ndarray, int]:
    """Pass 1 over the tiles not yet done; returns objects per tile and the halo-edge count."""
    plan: TilePlan = setup.plan
    done = manifest.done()
    todo = [t for t in range(len(plan)) if t not in done]
    per_task = tiles_per_task(len(todo), batch, max_tasks)
    task = LabelTileTask(setup.source, setup.level, setup.has_channels, kernel, plan, None, manifest, setup.norm,
                         batch, None, "uint64", getattr(setup.kernel, "native_input", False), files=files,
                         dims=tuple(setup.spatial_dims), measure_intensity=table and getattr(setup.kernel, "measures", True))
    objects = np.zeros(len(plan), np.int64)
    halo_edge = 0
    started = time.perf_counter()
    metas = []
    for results in run_tasks(client, task, _groups(todo, per_task), total=-(-len(todo) // per_task),
                             desc=f"{kernel.name}", progress=progress, unit_size=per_task * int(np.prod(plan.tile_shape)),
                             resources=gpu_resources(client, setup.kernel) or None):
        metas += results
    if done:  # tiles finished by an earlier, interrupted run: their counts are in their markers
        metas += [m for t, m in manifest.tile_metadata().items() if t in done]
    for meta in metas:
        objects[meta["tile"]] = meta["objects"]
        halo_edge += meta.get("halo_edge_objects", 0)
    seconds["segment"] = time.perf_counter() - started
    return objects, halo_edge


def classical_spec(input_url: str, *, level: int = 0, sigma: float | None = None, min_distance: float | None = None,
                   min_size: int = 16, halo: Sequence[int] | None = None, threshold: float | None = None,
                   storage_options: dict | None = None) -> KernelSpec:
    """The ``segment-classical`` kernel for an image: Otsu's threshold computed once from the
    image's global statistics (normalised the way the engine normalises tiles), distances in
    the image's physical units. ``sigma`` and ``min_distance`` default to 1 and 5 pixels of the
    finest axis; ``threshold`` (input units) overrides Otsu."""
    from pipeline.io.read import open_image
    from pipeline.run import kernel_layout
    from pipeline.stats import Normalisation, otsu_threshold

    source = open_image(input_url, storage_options)
    spatial, _ = kernel_layout(source)
    scale = [source.level(level).scale[i] for i in spatial]
    pixel = min(scale)
    norm = Normalisation.of(source)
    value = otsu_threshold(source) if threshold is None else float(threshold)
    normalised = (value - norm.low[0]) / max(norm.high[0] - norm.low[0], 1e-12)
    return KernelSpec.of("segment-classical", threshold=round(normalised, 6), scale=scale,
                         sigma=sigma if sigma is not None else pixel,
                         min_distance=min_distance if min_distance is not None else 5 * pixel,
                         min_size=min_size, halo=list(halo) if halo else None, channels=source.n_channels)


def model_spec(model_dir: str, min_size: int | None = None) -> KernelSpec:
    """The ``segment-unet`` kernel for a model folder, keyed by its weights hash (resume-safe);
    ``min_size`` (voxels) drops smaller objects (default: the kernel's, 12)."""
    from kernels.modelfile import ModelFileError, model_kernel_spec

    try:
        spec = model_kernel_spec(model_dir, "segment", "segment-unet",
                                 "segmentation needs one from `tilewise train segment`")
    except ModelFileError as exc:
        raise OptionError(str(exc)) from None
    if min_size is not None:
        if min_size < 0:
            raise OptionError(f"--min-size must be >= 0 voxels, got {min_size}.")
        spec = KernelSpec.of(spec.name, **spec.params, min_size=int(min_size))
    return spec


def _finish_stitched_rows(files: StitchFiles, t_url: str, spec: TableSpec, storage_options: dict | None) -> None:
    """Sum the partial rows of objects that span tiles (few: they lie on tile borders)."""
    import pandas as pd

    fs, _ = store._fs(files.folder, storage_options)
    frames = []
    for path in files.merged_paths():
        with fs.open(path, "rb") as fh:
            frames.append(pd.read_parquet(fh))
    if frames:
        write_part(t_url, "stitched", finish(combine(pd.concat(frames, ignore_index=True)), spec), spec, storage_options)
