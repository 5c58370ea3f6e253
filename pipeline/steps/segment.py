"""Segment an image into globally stitched instance labels and an object table.

Runs the three passes of :mod:`pipeline.steps.stitch` through the engine, then writes the labels
pyramid (mode downsampling, ``image-label`` metadata) and finishes the table. Output layout
(NGFF's own: labels inside the image they describe, so ``napari OUT`` shows both)::

    OUT/                   the input image, copied (the processed level and coarser ones)
    OUT/labels/<name>/     labels multiscale (uint32 ids 1..N; uint64 past 2^32), source ../../
    OUT/tables/<name>/     Parquet parts + _attributes.json (region: <name>, the labels element)
    OUT/_tilewise/         run manifest: parameters, done tiles per pass, summary

With ``image="link"`` (volumes too large to copy) ``OUT`` holds only ``labels/``, ``tables/``
and ``_tilewise/``, and the labels' ``source.image`` is the relative path to the input (which
ome-zarr-py follows; napari-ome-zarr 0.10 does not, so open both: ``napari IN OUT/labels/<name>``)
and survives moving both stores together.
Every pass resumes: re-running the same call skips finished tiles, and a finished run returns
its stored summary.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from kernels import KernelSpec
from kernels.brightfield import ObjectSignal, otsu_gap, without_fill
from kernels.objectscale import ESTIMATE_TOLERANCE, ObjectScale, bimodal_sizes, estimate_error
from pipeline.core.errors import OptionError, OutputExistsError
from pipeline.engine.manifest import RunLock, RunManifest, check_compatible
from pipeline.engine.maps import MapSinks
from pipeline.engine.pyramid import finalize_image
from pipeline.engine.runner import (
    EngineOptions,
    EngineSetup,
    build_checked,
    check_location,
    image_layout,
    output_started,
    prepare_engine,
    report_missing,
    submit_tiles,
    tiles_per_task,
    verify_done,
)
from pipeline.engine.stats import Normalisation
from pipeline.engine.submit import cluster_threads, run_tasks
from pipeline.io import store
from pipeline.io.read import ImageSource, as_source
from pipeline.io.tables import INSTANCE_KEY, TableSpec, begin_table, table_url, write_part
from pipeline.io.write import ImageSink, create_collection, create_label_image
from pipeline.steps.convert import copy_image_data, image_like
from pipeline.steps.measure import combine, finish
from pipeline.steps.models import model_spec as _model_spec
from pipeline.steps.stitch import (
    MAX_TILES,
    LabelTileJob,
    MatchTask,
    RelabelTask,
    Resolution,
    StitchFiles,
    resolve,
)
from pipeline.steps.tissue import select_tiles

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
    outside: int = 0  # tiles outside the foreground mask (tissue): never read, empty in the output

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# what the passes leave for each other under _tilewise/stitch: 3 = whole-block shells + rim files,
# stitched objects' rows as .npz (2: as Parquet; 1, unnamed: cores in a shared zarr array); a run
# begun with other files cannot be resumed
STITCH_FILES = 3
STITCHED_BATCH_ROWS = 2**20  # fragments of stitched objects summed at once on the client, at least
STITCHED_PART_ROWS = 2**18  # table rows of stitched objects per Parquet part


def check_stitch_files(output_url: str, old: dict[str, Any] | None) -> None:
    """Refuse, in one line, to resume a run whose stitching files an earlier tilewise wrote."""
    stitch = (old or {}).get("stitch")
    if isinstance(stitch, dict) and stitch.get("files") != STITCH_FILES:
        raise OutputExistsError(f"Output '{output_url}' was begun by an earlier tilewise whose stitching files this "
                                "version does not read; pass --overwrite to start it again, or choose another output.")


def _groups(ids: Sequence[int], per_task: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i:i + per_task]) for i in range(0, len(ids), per_task)]


@dataclass(frozen=True)
class SegmentRun:
    """One segmentation run's fixed parts, shared by its three passes."""

    input_url: str
    output_url: str
    name: str
    image: str  # "copy" or "link"
    kernel: KernelSpec
    setup: EngineSetup
    options: EngineOptions
    manifest: RunManifest
    files: StitchFiles

    @property
    def storage_options(self) -> dict:
        return self.options.storage_options or {}

    def maps(self) -> MapSinks | None:
        """The kernel's map images (uncertainty), created with the output; None without maps."""
        names = self.setup.traits.maps
        return MapSinks.open(self.output_url, names, self.storage_options) if names else None


def segment_labels(input_url: str | ImageSource, output_url: str, kernel: KernelSpec, client: Any,
                   options: EngineOptions | None = None, *, name: str = "nuclei", iou: float = 0.5,
                   consecutive: bool = True, table: bool = True, keep_intermediate: bool = False,
                   image: str = "copy", **settings: Any) -> SegmentSummary:
    """Run a labels kernel tile by tile and stitch its objects into one global labels image.

    Parameters
    ----------
    kernel : a kernel whose output is instance labels (``traits.output == "labels"``), e.g.
        ``segment-classical``, ``segment-unet`` or ``relabel``.
    options, settings : engine settings (:class:`~pipeline.engine.runner.EngineOptions`). By
        default ``pad_mode`` is the kernel's: ``constant`` (zero) for the classical watershed,
        because a mirrored edge creates mirrored objects whose fronts tie exactly on the edge;
        ``reflect`` for the U-Net, which never saw a flat edge in training and labels only
        inside the volume.
    iou : objects of neighbouring tiles are the same object when their IoU inside the overlap
        is at least this (0.5 keeps matches one-to-one).
    consecutive : final ids 1..N (default); otherwise the sparse ``tile << 32 | local`` ids of
        each object's root are kept (no prefix sum needed, uint64).
    table : write ``tables/<name>`` (one row per object).
    keep_intermediate : keep ``_tilewise/stitch`` (shells, rims, partial sums) after success.
    image : ``copy`` (default) writes the input image (the processed level and coarser) at the
        output's root, so the output is self-contained; ``link`` writes only labels and table and
        links the labels to the input by a relative path (no second copy of a large volume);
        ``in-place``: a workflow step whose output root already is the input image (written by
        its denoise step) adds labels, table and maps beside it.

    ``input_url`` may also be an opened source: a fused chain's
    :class:`~pipeline.engine.fused.FusedSource` (``image="in-place"``), whose tiles compute the
    first step's output (writing its cores) and segment it in the same task.
    """
    options = EngineOptions.of(options, **settings)
    store.check_name(name, "The labels")
    given, input_url = input_url, input_url.url if isinstance(input_url, ImageSource) else input_url
    check_location(output_url, input_url, options)
    setup = prepare_engine(given, kernel, options)
    plan = setup.plan
    if not setup.traits.is_labels:
        raise OptionError(f"Kernel '{kernel.name}' does not produce instance labels; use segment-classical, "
                          "segment-unet or relabel.")
    if len(setup.space) > MAX_TILES:
        raise OptionError(f"{len(setup.space)} tiles exceed the {MAX_TILES} that global ids can number; use a larger --tile.")
    if not 0 < iou <= 1:
        raise OptionError(f"iou must be in (0, 1], got {iou}.")
    if image not in ("copy", "link", "in-place"):
        raise OptionError(f"image must be 'copy' or 'link', got {image!r}.")
    if image == "in-place" and not (options.shared_output and output_url == input_url):
        raise OptionError("image='in-place' is for a workflow step segmenting the image its output already holds.")
    params = {**setup.params, "name": name, "stitch": {"iou": iou, "consecutive": consecutive, "files": STITCH_FILES},
              "table": table, "image": image}
    so, workspace = options.storage_options or {}, options.workspace
    run = SegmentRun(input_url, output_url, name, image, kernel, setup, options,
                     RunManifest(output_url, so, workspace=workspace), StitchFiles(output_url, so, workspace))
    lock = RunLock(output_url, so, workspace=workspace)
    exists = output_started(output_url, run.manifest, options)
    if exists:
        lock.check()  # before resuming into it, or deleting it with overwrite
    fresh = not exists or options.overwrite
    if not fresh:
        old = run.manifest.read_params()
        check_stitch_files(output_url, old)
        check_compatible(output_url, old, params)
        finished = run.manifest.read_json("summary")
        if finished is not None:
            if _finished_output_intact(run, client, SegmentSummary(**finished)):
                log.info("%s is complete and verified; nothing to do", output_url)
                return SegmentSummary(**finished)
            fresh = True  # its intermediates are gone: the only repair is to segment again
    if fresh:
        _begin_output(run, params, overwrite=True if exists else options.overwrite)
    with lock:
        if image == "copy" and not run.manifest.read_json("image"):
            _copy_input_image(run, client)
        kept = select_tiles(setup, output_url, options.foreground, client, storage_options=options.storage_options)
        tiles = list(range(len(setup.space))) if kept is None else kept
        summary = _run_passes(run, client, tiles, iou=iou, consecutive=consecutive, table=table)
        if not keep_intermediate:
            run.files.remove()
    if summary.halo_edge_objects:
        log.warning("%d objects reached the outer edge of a tile's halo (halo %s): they are larger than the halo, "
                    "and tiles may have cut them differently; raise the halo to be sure", summary.halo_edge_objects,
                    plan.halo)
    log.info("%s: %d objects (%d stitched across tiles) from %d tiles", summary.labels, summary.objects,
             summary.stitched_objects, len(plan))
    for warning in size_warnings(run, summary):
        log.warning("%s", warning)
    return summary


def size_warnings(run: SegmentRun, summary: SegmentSummary) -> list[str]:
    """One line each for what a user should look at before trusting the labels: no objects at
    all, or object sizes in two groups far apart (fragments of split objects)."""
    from pipeline.io.tables import sample_column

    if summary.objects == 0:
        return [f"{summary.labels}: 0 objects: nothing was above the threshold, or every object was smaller "
                "than min_size; check --threshold, --diameter and --min-size"]
    if summary.table is None:
        return []
    volumes = sample_column(run.output_url, run.name, "voxels", storage_options=run.storage_options)
    if bimodal_sizes(volumes):
        return [f"{summary.labels}: object sizes fall into two groups far apart (likely objects split into "
                "fragments, or debris): check the object diameter (--diameter) and --min-size"]
    return []


def _run_passes(run: SegmentRun, client: Any, tiles: list[int], *, iou: float, consecutive: bool,
                table: bool) -> SegmentSummary:
    """The three passes over ``tiles`` (all, or those inside the foreground mask), the table
    and the pyramid; the summary is written last, so a run whose summary exists is finished."""
    plan = run.setup.plan
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    objects_per_tile, halo_edge = label_tiles(run, client, tiles, measure=table)
    seconds["segment"] = time.perf_counter() - started
    started = time.perf_counter()
    resolution, n_edges = match_tiles(run, client, tiles, iou=iou, objects_per_tile=objects_per_tile,
                                      consecutive=consecutive)
    seconds["match"] = time.perf_counter() - started
    started = time.perf_counter()
    sink = _label_sink(run, resolution.n_objects, consecutive)
    table_spec = _begin_table(run) if table else None
    relabel_tiles(run, client, tiles, resolution=resolution, sink=sink, table_spec=table_spec)
    seconds["relabel"] = time.perf_counter() - started
    started = time.perf_counter()
    if table_spec is not None:
        _finish_stitched_rows(run, table_spec)
    finalize_image(sink, client, labels=True, progress=run.options.progress)
    maps = run.maps()
    if maps is not None:
        maps.finalize(client, progress=run.options.progress)
    seconds["pyramid_and_table"] = time.perf_counter() - started
    stitched = int(np.count_nonzero(resolution.is_root))
    summary = SegmentSummary(run.output_url, sink.url, table_url(run.output_url, run.name) if table else None,
                             len(plan), resolution.n_objects, stitched, n_edges, halo_edge, seconds,
                             outside=len(run.setup.space) - len(tiles))
    run.manifest.write_json("summary", summary.to_dict())
    return summary


def _finished_output_intact(run: SegmentRun, client: Any, summary: SegmentSummary) -> bool:
    """Whether a finished run's labels still hold what each tile wrote (checksums in the relabel
    markers; one read of the labels, no recomputation)."""
    relabel = run.manifest.at("relabel")
    expected = len(relabel.done())
    intact = verify_done(client, ImageSink.open(summary.labels, run.storage_options), run.setup.plan, relabel,
                         progress=run.options.progress, batch_shape=run.setup.batch_shape)
    if len(intact) < expected:
        log.warning("%s: %d of %d tiles of the finished labels changed since they were written; segmenting again",
                    run.output_url, expected - len(intact), expected)
        return False
    return True


def _begin_output(run: SegmentRun, params: dict[str, Any], *, overwrite: bool) -> None:
    """A fresh output: the root (the input image's layout, or a plain group when linking), the
    manifest and the stitch folder."""
    shared = run.options.shared_output  # a workflow's output: write beside its other steps, record nothing at the root
    if run.image == "copy":
        image_like(run.setup.source, run.output_url, from_level=run.setup.level, version=run.setup.ngff,
                   overwrite=overwrite, storage_options=run.options.storage_options, replace_store=not shared)
        if not shared:
            store.open_group(run.output_url, "a", run.storage_options).attrs.update({"tilewise": {"run": params}})
    elif run.image == "link":
        create_collection(run.output_url, version=run.setup.ngff, overwrite=overwrite,
                          storage_options=run.options.storage_options, attributes={"tilewise": {"run": params}})
    run.manifest.write_params(params)
    run.files.begin()
    if run.setup.traits.maps:
        MapSinks.create(run.output_url, run.setup.traits.maps, run.setup.output_geometry(), version=run.setup.ngff,
                        n_levels=len(run.setup.source.levels) - run.setup.level,
                        storage_options=run.storage_options)
    run.manifest.at("relabel").begin()


def label_tiles(run: SegmentRun, client: Any, tiles: Sequence[int], *, measure: bool) -> tuple[np.ndarray, int]:
    """Pass 1 over the ``tiles`` not yet done: local labels, global ids, shells and partial sums.
    Returns objects per tile (0 for tiles not computed) and how many objects reached a tile's
    halo edge."""
    setup, plan = run.setup, run.setup.plan
    markers = run.manifest.marker_files()  # the tiles done by an earlier, interrupted run
    todo = [t for t in tiles if t not in markers]
    batch = setup.batch(run.options.batch)
    job = LabelTileJob(kernel=run.kernel, reader=setup.reader(), plan=plan, manifest=run.manifest, files=run.files,
                       dims=tuple(setup.spatial_dims), batch=batch, measure_intensity=measure and setup.traits.measures,
                       batch_shape=setup.batch_shape, maps=run.maps())
    metas = []
    for results in submit_tiles(client, job, todo, setup=setup, options=run.options, batch=batch,
                                desc=run.kernel.name):
        metas += results
    if markers:  # tiles finished by an earlier, interrupted run: their counts are in their markers
        metas += list(run.manifest.tile_metadata([t for t in tiles if t in markers], files=markers).values())
    report_missing(metas, setup.source)
    objects = np.zeros(len(setup.space), np.int64)
    for meta in metas:
        objects[meta["tile"]] = meta["objects"]
    return objects, sum(meta.get("halo_edge_objects", 0) for meta in metas)


def match_tiles(run: SegmentRun, client: Any, tiles: Sequence[int], *, iou: float, objects_per_tile: np.ndarray,
                consecutive: bool) -> tuple[Resolution, int]:
    """Pass 2: match objects across the borders of ``tiles``, then union-find on the client.
    Returns the resolution and the number of match edges. Cheap, so it runs again on resume.
    A neighbour outside ``tiles`` has no objects (its rim file is absent)."""
    plan, n = run.setup.plan, len(tiles)
    per_task = tiles_per_task(n, 1, run.options.max_tasks, threads=cluster_threads(client))
    edges = [np.empty((0, 2), np.uint64)]
    task = MatchTask(plan, run.files, iou, run.setup.batch_shape)
    for result in run_tasks(client, task, _groups(list(tiles), per_task), total=-(-n // per_task),
                            desc=f"{run.name}: match", progress=run.options.progress):
        edges += result
    all_edges = np.concatenate(edges)
    return resolve(all_edges, objects_per_tile, consecutive), int(len(all_edges))


def relabel_tiles(run: SegmentRun, client: Any, tiles: Sequence[int], *, resolution: Resolution, sink: ImageSink,
                  table_spec: TableSpec | None) -> None:
    """Pass 3 over the ``tiles`` not yet relabelled: final ids into the labels image, and the
    table rows of each tile's unstitched objects. Each task gets only its tiles' part of the
    resolution."""
    plan = run.setup.plan
    relabel = run.manifest.at("relabel")
    if relabel.done():  # an interrupted pass 3: what it wrote must still be there
        verify_done(client, sink, plan, relabel, progress=run.options.progress, batch_shape=run.setup.batch_shape)
    todo = sorted(set(tiles) - relabel.done())
    per_task = tiles_per_task(len(todo), 1, run.options.max_tasks, threads=cluster_threads(client))
    items = ((group, [resolution.for_tile(t) for t in group]) for group in _groups(todo, per_task))
    t_url = table_url(run.output_url, run.name) if table_spec is not None else None
    task = RelabelTask(plan, run.files, sink, relabel, t_url, table_spec, run.setup.batch_shape)
    for _ in run_tasks(client, task, items, total=-(-len(todo) // per_task), desc=f"{run.name}: relabel",
                       progress=run.options.progress):
        pass


def _copy_input_image(run: SegmentRun, client: Any) -> None:
    """The input image's data into the output's root (idempotent; marked done when complete)."""
    copy_image_data(run.setup.source, ImageSink.open(run.output_url, run.storage_options), client,
                    from_level=run.setup.level, progress=run.options.progress)
    run.manifest.write_json("image", {"copied_from": run.input_url, "level": run.setup.level})


def _begin_table(run: SegmentRun) -> TableSpec:
    setup = run.setup
    scale, translation, _ = setup.spatial_levels
    spec = TableSpec(tuple(setup.spatial_dims), tuple(scale), tuple(translation),
                     tuple(setup.source.axes[i].unit for i in setup.spatial),
                     channels=setup.source.n_channels, region=run.name,
                     batch=tuple(setup.source.dims[i] for i in setup.batch_axes), maps=setup.traits.maps)
    if not store.exists(table_url(run.output_url, run.name), run.storage_options):
        begin_table(run.output_url, run.name, spec, run.storage_options)
    return spec


def _label_sink(run: SegmentRun, n_objects: int, consecutive: bool) -> ImageSink:
    url = store.join(run.output_url, "labels", run.name)
    if store.exists(url, run.storage_options):
        return ImageSink.open(url, run.storage_options)
    setup = run.setup
    dtype = np.uint32 if consecutive and n_objects < 2**32 - 1 else np.uint64
    n_labels = max(n_objects, 1) if consecutive else None
    n_levels = len(setup.source.levels) - setup.level
    # copy / in-place: NGFF's layout, inside the image (../../); link: the relative way to the input
    source = store.relative(url, setup.source.url) if run.image == "link" else "../../"
    return create_label_image(store.join(run.output_url, "labels"), run.name, **setup.output_geometry(),
                              n_levels=n_levels, dtype=dtype, version=setup.ngff, n_labels=n_labels,
                              source_image=source, storage_options=run.storage_options)


def classical_spec(input_url: str | ImageSource, *, level: int = 0, diameter: float | None = None, sigma: float | None = None,
                   min_distance: float | None = None, min_size: int | None = None, halo: Sequence[int] | None = None,
                   threshold: float | None = None, polarity: str = "auto", stain: str = "auto",
                   storage_options: dict | None = None) -> KernelSpec:
    """The ``segment-classical`` kernel for an image: Otsu's threshold computed once from the
    image's global statistics (normalised the way the engine normalises tiles; once the
    diameter is known, on the signal smoothed as the kernel smooths it) and the background's
    level below it (the median of that smoothed signal under the threshold; the kernel grows
    objects from their cores towards it, see :data:`kernels.segment.GROW_TO`; not for H&E's
    haematoxylin, :func:`kernels.segment.grows_from_cores`), distances in
    the image's physical units, and its lengths (smoothing, seed distance, smallest object,
    halo) from the typical object ``diameter`` (physical units), estimated once from the whole
    image (:func:`~pipeline.engine.stats.estimate_object_scale`) unless given. Explicit
    ``sigma``, ``min_distance``, ``min_size`` or ``halo`` win; ``threshold`` (input units;
    haematoxylin optical density with ``stain="hematoxylin"``) overrides Otsu.

    ``polarity`` (``bright``, ``dark``, ``auto``) and ``stain`` (``none``, ``hematoxylin``,
    ``auto``) say what an object looks like (:mod:`kernels.brightfield`); ``auto`` decides once
    per image from the global sample (:func:`object_signal`), never per tile."""
    from kernels.segment import grows_from_cores, smoothing
    from pipeline.engine.stats import background_level, estimate_object_scale, smoothed_signal, window_blocks

    if diameter is not None and not (math.isfinite(diameter) and diameter > 0):
        raise OptionError(f"--diameter must be a positive length in the image's units, got {diameter}.")
    source = as_source(input_url, storage_options)
    input_url = source.url
    image_layout(source)  # refuses axes in an order the engine cannot tile
    scale = list(source.spatial_scale(level))
    norm = Normalisation.of(source)
    blocks = window_blocks(source, level=level)  # full resolution: the objects must be in it
    sample = np.concatenate([b.reshape(b.shape[0], -1) for b in blocks], axis=1)
    signal = object_signal(source, norm, sample, polarity=polarity, stain=stain)
    if threshold is None:
        value = otsu_gap(signal(sample, norm))
    elif signal.stain == "hematoxylin":
        value = float(threshold)
    else:  # input units of the (first) channel, seen the way the kernel sees it
        value = float(signal(np.full((source.n_channels, 1), float(threshold)), norm)[0])
    found = ObjectScale.given(diameter) if diameter is not None else estimate_object_scale(
        source, level=level, threshold=value, signal=signal, scaling=norm)
    if found is None:
        log.warning("no objects above the threshold in '%s': the object size cannot be estimated; using "
                    "pixel-sized defaults (set --diameter or --threshold)", input_url)
    else:
        found = replace(found, unit=source.spatial_unit)
        log.info("object diameter %s", found.describe())
    # the levels are read off what the kernel thresholds: the signal smoothed by its sigma;
    # smoothed only when a level is wanted (a given threshold on H&E needs none)
    otsu_again = threshold is None and found is not None
    two_levels = grows_from_cores(signal.stain)  # one level for H&E's haematoxylin
    background = None
    if otsu_again or two_levels:
        smoothed = smoothed_signal(blocks, scale, signal=signal, scaling=norm,
                                   sigma=smoothing(sigma, found.diameter if found else None, scale))
        if otsu_again:
            value = otsu_gap(smoothed)
        if two_levels:
            background = background_level(smoothed, value)
    return KernelSpec.of("segment-classical", threshold=round(value, 6),
                         background=round(background, 6) if background is not None else None, scale=scale,
                         diameter=round(found.diameter, 6) if found else None,
                         object_scale=found.to_dict() if found else None,
                         sigma=sigma, min_distance=min_distance, min_size=min_size,
                         halo=list(halo) if halo else None, channels=source.n_channels,
                         polarity=signal.polarity, stain=signal.stain,
                         white=[round(w, 3) for w in signal.white] if signal.white else None)


def object_signal(source: ImageSource, norm: Normalisation, sample: np.ndarray, *, polarity: str = "auto",
                  stain: str = "auto") -> ObjectSignal:
    """What an object looks like in this image, decided once from a ``sample`` at full
    resolution (``(C, n)`` input units, the values of :func:`~pipeline.engine.stats.window_blocks`). ``auto`` polarity: ``dark`` when the channel mean's distribution
    has its long tail on the dark side (negative skewness: a bright background, glass or
    stroma, with dark nuclei; brightfield), else ``bright`` (fluorescence: a dark background
    with a long bright tail). Chosen on the project's samples: skewness -1.2 on the synthetic
    slide, -0.1 on the real H&E crop, +0.6 to +4.3 on the fluorescence ones.
    ``auto`` stain: ``hematoxylin`` for a dark-on-bright RGB image (H&E), else ``none``. The glass
    brightness for deconvolution is each channel's 99.9th percentile."""
    from kernels.brightfield import POLARITIES, STAINS
    from pipeline.io.slide import RGB

    if polarity not in POLARITIES + ("auto",):
        raise OptionError(f"--polarity must be bright, dark or auto, got {polarity!r}.")
    if stain not in STAINS + ("auto",):
        raise OptionError(f"--stain must be none, hematoxylin or auto, got {stain!r}.")
    if polarity == "auto":
        from scipy.stats import skew

        mean = without_fill(ObjectSignal()(sample, norm))  # a zero-padded margin is no dark tail
        polarity = "dark" if float(skew(mean)) < 0 else "bright"
        log.info("objects are %s on %s background (decided once from a full-resolution sample; set --polarity to "
                 "choose)", "darker" if polarity == "dark" else "brighter", "a bright" if polarity == "dark" else "a dark")
    rgb = source.n_channels == 3 and (source.channel_names == RGB or source.dtype == np.uint8)
    if stain == "auto":
        stain = "hematoxylin" if rgb and polarity == "dark" else "none"
        if stain == "hematoxylin":
            log.info("dark objects on a bright RGB image: segmenting the haematoxylin channel (set --stain none "
                     "to use the grey level)")
    if stain == "hematoxylin" and source.n_channels != 3:
        raise OptionError(f"--stain hematoxylin needs an RGB image (3 channels); '{source.url}' has "
                          f"{source.n_channels}.")
    white = tuple(float(w) for w in np.percentile(sample, 99.9, axis=1)) if stain == "hematoxylin" else None
    return ObjectSignal(polarity, stain, white)


def model_spec(model_dir: str, min_size: int | None = None, *, zoom: float = 1.0, samples: int | None = None,
               uncertainty: bool | None = None, precision: str = "fp32",
               input_variance: float | None = None) -> KernelSpec:
    """The ``segment-unet`` kernel for a model folder, keyed by its weights hash (resume-safe);
    ``min_size`` (model pixels) drops smaller objects (default: the kernel's, 12); ``zoom``
    resamples tiles to the model's scale (:func:`model_zoom` finds it for an image);
    ``samples``: forward passes of an MC-dropout model (default: its card's); ``uncertainty``:
    write the maps (default: when the model has an uncertainty method); ``precision``: ``fp32``
    (default) or ``bf16`` / ``fp16`` autocast (opt-in; recorded in the manifest);
    ``input_variance``: an ADF model's input noise variance in normalised units (default: its
    training value; raise it for noisier images than the training data)."""
    if min_size is not None and min_size < 0:
        raise OptionError(f"--min-size must be >= 0 voxels, got {min_size}.")
    extra = ({} if min_size is None else {"min_size": int(min_size)}) | ({} if zoom == 1.0 else {"zoom": zoom}) \
        | ({} if samples is None else {"samples": int(samples)}) \
        | ({} if uncertainty is None else {"uncertainty": bool(uncertainty)}) \
        | ({} if precision == "fp32" else {"precision": precision}) \
        | ({} if input_variance is None else {"input_variance": float(input_variance)})
    spec = _model_spec(model_dir, "segment", **extra)
    if samples is not None or precision != "fp32" or input_variance is not None:
        build_checked(spec)  # an option the model refuses: one line now, not after a cluster starts
    return spec


RESCALE_TOLERANCE = ESTIMATE_TOLERANCE  # within the estimates' own error a model runs as is: resampling has a cost
MAX_ZOOM = 8.0  # an estimate this far from the training objects is more likely wrong than right


def model_zoom(input_url: str | ImageSource, model_dir: str, *, level: int = 0, diameter: float | None = None,
               storage_options: dict | None = None) -> tuple[float, str | None]:
    """``(zoom, note)``: how much to resample an image so its objects are as many pixels across
    as the model's training objects, and one line saying so; ``(1.0, None)`` when they already
    match or the model's card has no record of its training objects.

    Like is compared with like: this image's estimate with the estimate on the training image
    (the estimator's bias on similar images cancels), or a ``diameter`` given in the image's
    physical units (a measure) with the training labels' measure. Where the estimate on the
    training image was off its labels by more than the estimates' own error, it is known to be
    wrong and the labels' measure stands in for it (a crowded 3D sample: estimated 16.3 px,
    labelled 11.8; the other half of the same sample, estimated within 9 % at every scale,
    was resampled x2.6 where x2.0 was right)."""
    from kernels.modelfile import read_card
    from pipeline.engine.stats import estimate_object_scale

    objects = read_card(model_dir).training.get("object_scale") or {}
    seen, measured = objects.get("image"), (objects.get("labels") or {}).get("diameter")
    if not seen or "pixel" not in seen:
        return 1.0, None
    source = as_source(input_url, storage_options)
    input_url = source.url
    pixel = min(source.spatial_scale(level))
    found = ObjectScale.given(diameter) if diameter is not None else estimate_object_scale(source, level=level)
    if found is None:
        return 1.0, (f"'{input_url}': no objects above the threshold to compare with the model's training "
                     "objects; running at the image's own scale (set --diameter)")
    here = found.diameter / pixel
    off = estimate_error(measured, seen["diameter"])
    by_labels = bool(measured) and (diameter is not None or off is not None)
    trained = (measured if by_labels else seen["diameter"]) / seen["pixel"]
    zoom = trained / here
    if 1 / RESCALE_TOLERANCE <= zoom <= RESCALE_TOLERANCE:
        return 1.0, None
    if not 1 / MAX_ZOOM <= zoom <= MAX_ZOOM:
        return 1.0, (f"'{input_url}': objects estimated {here:.3g} px across against {trained:.3g} px in the "
                     f"model's training, a factor past {MAX_ZOOM:g}: not trusted, running at the image's own scale "
                     "(set --diameter)")
    note = (f"objects are about {here:.3g} px across here and {trained:.3g} px in the model's training: tiles are "
            f"resampled x{zoom:.3g} to the model's scale")
    if off is not None and diameter is None:  # this image's estimate against the training labels' measure
        note += (f" (the estimate on the training image was {100 * off:+.0f} % off its labels, so their measure is "
                 "used: if objects come out too large or too small, give --diameter)")
    return round(zoom, 3), note


def _finish_stitched_rows(run: SegmentRun, spec: TableSpec) -> None:
    """Sum the partial rows of objects that span tiles (they lie on tile borders: ~13 % of the
    objects of a 10^7-object lattice in 32 x 64 x 64 tiles) and write their table rows.

    The sums run as the tiles' rows arrive (sums of sums, minima of minima: the order does not
    matter), in batches at least as long as the running totals, so the client holds the totals
    and one batch instead of every fragment at once; rows are finished and written a part of
    ``STITCHED_PART_ROWS`` at a time."""
    import pandas as pd

    totals, pending, pending_rows = None, [], 0

    def fold() -> Any:
        batch = pd.DataFrame({key: np.concatenate([p[key] for p in pending]) for key in pending[0]})
        return combine(batch if totals is None else pd.concat([totals, batch], ignore_index=True))

    for part in run.files.merged_rows():
        pending.append(part)
        pending_rows += len(part[INSTANCE_KEY])
        if pending_rows >= max(STITCHED_BATCH_ROWS, 0 if totals is None else len(totals)):
            totals, pending, pending_rows = fold(), [], 0
    if pending:
        totals = fold()
    if totals is None:
        return
    for k, start in enumerate(range(0, len(totals), STITCHED_PART_ROWS)):
        write_part(table_url(run.output_url, run.name), f"stitched-{k}",
                   finish(totals.iloc[start:start + STITCHED_PART_ROWS], spec), spec, run.storage_options)
