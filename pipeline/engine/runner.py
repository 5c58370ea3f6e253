"""The engine's tile runner: plan a pass over an input, read each tile's core + halo straight
from the store, run the resident kernel, and hand each tile's result to an output.

What a step does with a tile's result differs (a dense image is cropped and written, instance
labels go through the stitching passes), so the engine provides the parts every pass shares:
:func:`prepare_engine` (layout, kernel traits, plan, global statistics, manifest parameters),
:class:`TileReader` (padded, normalised blocks), :func:`apply_kernel` (batched kernel calls
with their :class:`~kernels.BatchContext`), :class:`ImageTileJob` (the dense output) and
:func:`submit_tiles` (tasks over the tiles not yet done). It reads only a kernel's declared
:class:`~kernels.KernelTraits`; what the kernel's output means is the kernel's business.
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kernels import BatchContext, Kernel, KernelError, KernelSpec, KernelTraits, Scaling, build_kernel, resident
from pipeline.core.errors import InputError, OptionError
from pipeline.core.regions import Region
from pipeline.engine.blend import BlendLattice, BlendWeights, window_weights
from pipeline.engine.manifest import WORKSPACE, RunManifest
from pipeline.engine.maps import MapSinks
from pipeline.engine.plan import Tile, TilePlan, make_plan, pad_block
from pipeline.engine.stats import Normalisation, nonfinite_message
from pipeline.engine.submit import cluster_threads, run_tasks
from pipeline.io.ngff import SPACE, Axis
from pipeline.io.store import check_output_location, content_fingerprint, exists
from pipeline.io.read import ImageSource, as_source, ngff_problems, read_window
from pipeline.io.write import ImageSink

log = logging.getLogger(__name__)

# a task's round trip through the scheduler costs ~2-4 ms on 2 busy cores whatever it carries (bench_engine
# planning): 1,024 tasks keep a 1 TB pass's submission under 5 s and still give 8 tasks per thread to 128 threads
MAX_TASKS = 1024
# A task's tiles side by side along the last axis are read as one window (``TileRows``) of at most
# this many tiles and stored bytes: the chunks their halos share are decoded once, not per tile.
READ_WINDOW_TILES = 8
READ_WINDOW_BYTES = 128 * 2**20
# a pass keeps at least this many tasks per worker thread (load balance) when it groups tiles
TASKS_PER_THREAD = 8


@dataclass(frozen=True)
class Blend:
    """Weight-blended stitching: the kernel runs on ``window``-sized windows on a global lattice
    overlapping by ``overlap`` and outputs are averaged with ``weights`` (see ``engine.blend``)."""

    window: tuple[int, ...]
    overlap: float = 0.25
    weights: BlendWeights = "gaussian"


FOREGROUND_TILE_PIXELS = 2**20  # default tile with a foreground mask: 1024 x 1024 in 2D, ~101^3 in 3D


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs a pass over an image; every step takes the same settings.

    level : pyramid level of the input to process.
    tile_shape : tile core per spatial axis (rounded to the output chunks); default ~32 MB.
    pad_mode : what a kernel sees past the volume edge; ``None`` takes the kernel's own.
    batch : tiles per kernel call where their shapes agree (GPU kernels gain from 2-8),
        capped by the kernel's ``max_batch``.
    blend : weight-blend lattice windows instead of crop-stitching halos (dense outputs only).
    max_tasks : tiles are grouped so a pass has at most about this many tasks; the
        scheduler's per-task cost (a few ms) then stays seconds at 10^5 tiles and more.
    window : tasks in flight at once (default: from the cluster's size).
    resources : Dask resources per task; default ``{"GPU": 1}`` for GPU kernels when the
        cluster's workers advertise GPUs.
    overwrite : replace an existing output (the input is never modified).
    missing_chunks : what an input chunk absent from the store means: ``fill`` (default) reads
        it as the array's fill value and counts it (zarr leaves out chunks that hold only the
        fill value), ``error`` refuses it (for stores known to be complete).
    ngff : NGFF version of the outputs, ``"0.4"`` (zarr v2) or ``"0.5"`` (zarr v3); ``None``
        writes the input's version, so a derived store never mixes versions with its source.
    foreground : compute only the tiles a low-resolution mask keeps: ``"tissue"`` detects the
        tissue of a slide once (written as ``OUT/labels/tissue``), or the URL of a mask (any
        labels image, nonzero = keep); the rest of the output stays empty
        (``pipeline.steps.tissue``).
    workspace : the folder under the output for the run's manifest, lock and intermediates. A
        workflow gives each step its own (``_tilewise/steps/<step>``): the output is then
        *shared*, written by several steps, so a step neither deletes it nor reads its existence
        as its own (``shared_output``), and may read an image that an earlier step wrote there.
    """

    level: int = 0
    tile_shape: Sequence[int] | None = None
    pad_mode: str | None = None
    batch: int = 1
    blend: Blend | None = None
    max_tasks: int = MAX_TASKS
    window: int | None = None
    resources: dict[str, float] | None = None
    progress: bool = True
    overwrite: bool = False
    storage_options: dict[str, Any] | None = None
    ngff: str | None = None
    missing_chunks: str = "fill"
    foreground: str | None = None
    workspace: str = WORKSPACE

    @property
    def shared_output(self) -> bool:
        return self.workspace != WORKSPACE

    @classmethod
    def of(cls, options: "EngineOptions | None" = None, **settings: Any) -> "EngineOptions":
        """``options`` with some settings replaced; unknown names are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise OptionError(f"Unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        options = replace(options or cls(), **settings)
        if options.batch < 1:
            raise OptionError(f"batch must be >= 1, got {options.batch}.")
        if options.missing_chunks not in ("fill", "error"):
            raise OptionError(f"missing_chunks must be 'fill' or 'error', got {options.missing_chunks!r}.")
        if options.ngff not in (None, "0.4", "0.5"):
            raise OptionError(f"ngff must be 0.4 or 0.5, got {options.ngff!r}.")
        if options.max_tasks < 1:
            raise OptionError(f"max_tasks must be >= 1, got {options.max_tasks}.")
        return options


@dataclass(frozen=True)
class RunSummary:
    output: str
    tiles: int
    computed: int
    skipped: int  # already done by an earlier run
    seconds: float
    voxels_per_s: float
    outside: int = 0  # tiles outside the foreground mask (never read)


def image_layout(source: ImageSource) -> tuple[list[int], bool, list[int]]:
    """(batch axes, has a channel axis, spatial axes) of an image laid out as NGFF orders them:
    batch axes (time, or any custom type) first, then ``c``, then space. Kernels see
    ``(c,) + spatial`` blocks; every index of the batch axes is processed independently."""
    dims = source.dims
    spatial = [i for i, a in enumerate(source.axes) if a.type == SPACE or (a.type is None and a.name in "zyx")]
    has_c = "c" in dims
    batch = [i for i, d in enumerate(dims) if i not in spatial and d != "c"]
    if [*batch, *([dims.index("c")] if has_c else []), *spatial] != list(range(len(dims))):
        raise InputError(f"'{source.url}' axes {dims} are not in NGFF order (time or other axes, then c, then space); "
                         "convert it to NGFF order first.")
    return batch, has_c, spatial


@dataclass(frozen=True)
class TileSpace:
    """Every tile of a pass: the spatial plan, repeated for each index of the batch axes (time
    points, custom axes), which are processed independently; global tile id
    ``g = batch_index * len(plan) + spatial_tile_id``."""

    plan: TilePlan
    batch_shape: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(np.prod(self.batch_shape, dtype=np.int64)) * len(self.plan)

    def locate(self, g: int) -> tuple[tuple[int, ...], Tile]:
        """(batch index, spatial tile) of global tile ``g``."""
        b, t = divmod(int(g), len(self.plan))
        at = tuple(int(i) for i in np.unravel_index(b, self.batch_shape)) if self.batch_shape else ()
        return at, self.plan.tile(t)


def batch_slices(at: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(i, i + 1) for i in at)


def tiles_per_task(n_tiles: int, batch: int, max_tasks: int = MAX_TASKS, *, threads: int | None = None) -> int:
    """Tiles per task: a whole number of batches, and enough that the run has <= ``max_tasks``
    tasks. Small runs get one batch per task (best balance); 10^5-tile runs get a few dozen
    tiles per task, so scheduling overhead stays small while memory stays one batch. Given the
    cluster's ``threads``, a run with many tiles per thread groups up to ``READ_WINDOW_TILES``
    per task (neighbours share their halo reads), keeping ``TASKS_PER_THREAD`` tasks a thread."""
    per_task = max(batch, -(-n_tiles // max(max_tasks, 1)))
    if threads:
        per_task = max(per_task, min(READ_WINDOW_TILES, n_tiles // (TASKS_PER_THREAD * threads)))
    return -(-per_task // batch) * batch


@dataclass(frozen=True)
class TileRows:
    """Splits a task's tiles into runs of neighbours along the last spatial axis (same batch
    index, same place on the other axes), each read as one window (``read_window``): a chunk
    their halos share is decoded once per run instead of once per tile. A run holds at most
    ``max_tiles`` tiles and ``max_bytes`` of stored input, so a worker's memory stays bounded
    by a few tiles (see ``docs/architecture.md``, invariant 6). A source that is not
    ``windowable`` (a fused chain computes its input on read) gives one run without a window."""

    reader: "TileReader"
    space: TileSpace
    max_tiles: int = READ_WINDOW_TILES
    max_bytes: int = READ_WINDOW_BYTES

    def runs(self, ids: Sequence[int]) -> list[list[int]]:
        if not self.reader.source.windowable:
            return [[int(g) for g in ids]]
        lv = self.reader.source.level(self.reader.level)
        per_voxel = np.dtype(lv.dtype).itemsize * (self.reader.source.n_channels if self.reader.has_channels else 1)
        runs: list[list[int]] = []
        last: tuple[tuple[int, ...], Region] | None = None
        for g in ids:
            at, tile = self.space.locate(g)
            read = tile.read
            if runs and last is not None and last[0] == at and read[:-1] == last[1][:-1] \
                    and read[-1].start <= last[1][-1].stop and len(runs[-1]) < self.max_tiles:
                union = last[1][:-1] + (slice(last[1][-1].start, read[-1].stop),)
                if per_voxel * int(np.prod([sl.stop - sl.start for sl in union])) <= self.max_bytes:
                    runs[-1].append(int(g))
                    last = (at, union)
                    continue
            runs.append([int(g)])
            last = (at, read)
        return runs

    def window(self, run: Sequence[int]) -> AbstractContextManager:
        """The read window of a run (nothing for a lone tile or a computed source)."""
        if len(run) < 2 or not self.reader.source.windowable:
            return nullcontext()
        first, end = self.space.locate(run[0]), self.space.locate(run[-1])
        at, read = first[0], first[1].read
        union = read[:-1] + (slice(read[-1].start, end[1].read[-1].stop),)
        return read_window(self.reader.source, self.reader.index(union, at), self.reader.level)


def gpu_resources(client: Any, traits: KernelTraits) -> dict[str, float]:
    """``{"GPU": 1}`` for a GPU kernel on a cluster whose workers advertise GPUs.

    Tasks then run only on GPU workers, one per GPU at a time (``docs/architecture.md``,
    invariant 5); CPU-only clusters and CPU kernels get no restriction.
    """
    if traits.device != "gpu" or client is None:
        return {}
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    has_gpu = any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values())
    return {"GPU": 1} if has_gpu else {}


def build_checked(spec: KernelSpec) -> Kernel:
    """The kernel built on the client, its errors turned into the pipeline's (exit code 2)."""
    try:
        return build_kernel(spec)
    except KernelError as exc:
        raise OptionError(str(exc)) from None


@dataclass(frozen=True)
class TileReader:
    """Reads ``(C, *spatial)`` blocks of one input level: padded past the volume edge, then
    float32 (``raw``), normalised with the global scaling (``normalised``) or as stored
    (``native``), as the kernel declared. Small and picklable: tasks carry it."""

    source: ImageSource
    level: int
    has_channels: bool
    pad_mode: str
    input: str  # KernelTraits.input
    scaling: Scaling | None
    missing_policy: str = "fill"

    def index(self, region: Region, at: Sequence[int]) -> tuple[slice, ...]:
        return batch_slices(at) + ((slice(None),) if self.has_channels else ()) + tuple(region)

    def missing(self, region: Region, at: Sequence[int] = ()) -> int:
        """How many input chunks ``region`` (at batch index ``at``) touches that the store does
        not hold (read as the fill value); with the ``error`` policy, an :class:`InputError`."""
        absent = self.source.missing_chunks(self.index(region, at), self.level)
        if absent and self.missing_policy == "error":
            raise InputError(f"'{self.source.url}' level {self.source.level(self.level).path}: chunk {absent[0]} is "
                             f"missing ({len(absent)} missing near {tuple((s.start, s.stop) for s in region)}); restore "
                             "it, or pass --missing-chunks fill if the store leaves out empty chunks.")
        return len(absent)

    def read(self, region: Region, pad: Sequence[tuple[int, int]], at: Sequence[int] = ()) -> np.ndarray:
        """``(C, *spatial)`` of ``region`` at batch index ``at`` (time point, ...)."""
        return self.prepare(self.source.read(self.index(region, at), self.level), pad, region, len(at))

    def prepare(self, block: np.ndarray, pad: Sequence[tuple[int, int]], region: Region, n_batch: int = 0
                ) -> np.ndarray:
        """``block``, ``region`` as the source stores it (``n_batch`` leading batch axes of one
        index each), made into what the kernel sees: checked, float32, channels first, padded
        and normalised."""
        block = block.reshape(block.shape[n_batch:])  # the batch axes have one index each
        if block.dtype.kind == "f" and not np.isfinite(block).all():
            raise InputError(nonfinite_message(self.source.url, f"in {tuple((s.start, s.stop) for s in region)}"))
        if self.input != "native":
            block = block.astype(np.float32, copy=False)
        if not self.has_channels:
            block = block[None]
        block = pad_block(block, pad, self.pad_mode)
        return self.scaling.apply(block) if self.input == "normalised" and self.scaling is not None else block


@dataclass(frozen=True)
class EngineSetup:
    """What every tiled pass over an input works out first, on the client: the input's layout,
    the built (not loaded) kernel, the tile plan, global statistics and the run parameters that
    go into the manifest."""

    source: ImageSource
    level: int
    spatial: list[int]  # indices of the spatial axes in the input
    has_channels: bool
    kernel: Kernel  # built, not loaded: the client reads its traits only
    plan: TilePlan
    scaling: Normalisation | None
    params: dict[str, Any]
    batch_axes: tuple[int, ...] = ()  # indices of the batch axes (time, custom), processed independently

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.source.level(self.level).shape[i] for i in self.batch_axes)

    @property
    def space(self) -> TileSpace:
        return TileSpace(self.plan, self.batch_shape)

    @property
    def traits(self) -> KernelTraits:
        return self.kernel.traits

    @property
    def spatial_dims(self) -> list[str]:
        return [self.source.dims[i] for i in self.spatial]

    @property
    def spatial_levels(self) -> tuple[list[float], list[float], list[int]]:
        """(scale, translation, chunks) of the input level over the spatial axes."""
        lv = self.source.level(self.level)
        return ([lv.scale[i] for i in self.spatial], [lv.translation[i] for i in self.spatial],
                [lv.chunks[i] for i in self.spatial])

    def output_geometry(self, channels: int = 0) -> dict[str, Any]:
        """``shape``, ``axes``, ``scale``, ``translation`` and ``chunks`` of an output over the
        processed level: the batch axes (one index per chunk), a channel axis when ``channels``,
        then the spatial axes (the input's chunks)."""
        lv, batch = self.source.level(self.level), list(self.batch_axes)
        scale, translation, chunks = self.spatial_levels
        lead = [1] if channels else []
        return dict(shape=list(self.batch_shape) + ([channels] if channels else []) + list(self.plan.shape),
                    axes=[self.source.axes[i] for i in batch] + ([Axis("c", "channel")] if channels else [])
                    + [self.source.axes[i] for i in self.spatial],
                    scale=[lv.scale[i] for i in batch] + [1.0] * len(lead) + scale,
                    translation=[lv.translation[i] for i in batch] + [0.0] * len(lead) + translation,
                    chunks=[1] * (len(batch) + len(lead)) + chunks)

    def reader(self) -> TileReader:
        return TileReader(self.source, self.level, self.has_channels, self.plan.pad_mode, self.traits.input,
                          self.scaling, self.params["missing_chunks"])

    @property
    def ngff(self) -> str:
        """The NGFF version outputs are written in (the option, else the input's)."""
        return str(self.params["ngff"])

    def batch(self, wanted: int) -> int:
        return max(1, min(int(wanted), self.traits.max_batch))


def check_location(output_url: str, input_url: str, options: EngineOptions) -> None:
    """Refuse an output that is, holds or lies inside the input (``check_output_location``);
    a workflow step (``options.shared_output``) reads images the workflow wrote into its own
    output, which the workflow checked against the user's input once, before its first step."""
    if not options.shared_output:
        check_output_location(output_url, input_url, options.storage_options)


def output_started(output_url: str, manifest: RunManifest, options: EngineOptions) -> bool:
    """Whether this run's output exists: the store, or (a workflow step's shared output) the
    step's own manifest."""
    return manifest.started() if options.shared_output else exists(output_url, options.storage_options)


def prepare_engine(input: str | ImageSource, kernel: KernelSpec, options: EngineOptions) -> EngineSetup:
    """Open the input (a URL, or an opened source: a fused chain's computed image), check the
    kernel fits it, plan the tiles and compute global statistics.

    Normalised kernels see each channel's global percentiles (at the levels the kernel
    declares: a model's card) mapped to 0..1, computed once per input from a coarse level.
    """
    source = as_source(input, options.storage_options)
    input_url = source.url
    problems = ngff_problems(source)
    if problems:
        log.warning("'%s' is not valid NGFF %s (%s); tilewise can read it, other tools may not", input_url,
                    source.version, problems)
    batch, has_c, spatial = image_layout(source)
    source.level(options.level)  # refuses a level the image lacks, by name
    k = build_checked(kernel)
    traits = k.traits
    if traits.ndim != len(spatial):
        raise OptionError(f"Kernel '{kernel.name}' is {traits.ndim}D but '{input_url}' has {len(spatial)} "
                          "spatial axes.")
    if np.dtype(source.dtype).kind not in "biuf":
        raise InputError(f"'{input_url}' holds {np.dtype(source.dtype).name} values; kernels take real numbers "
                         "(convert complex data to magnitude or phase first).")
    if traits.in_channels != source.n_channels:
        raise OptionError(f"Kernel '{kernel.name}' takes {traits.in_channels} channel(s); the image has "
                          f"{source.n_channels}.")
    plan = plan_for(source, traits, options)
    scaling = Normalisation.of(source, traits.percentiles) if traits.input == "normalised" else None
    params = {
        "input": input_url, "level": options.level, "kernel": kernel.name, "kernel_params": kernel.params,
        "tile_shape": list(plan.tile_shape), "halo": list(plan.halo), "pad_mode": plan.pad_mode,
        "normalisation": scaling.pairs() if scaling else None,
        "ngff": options.ngff or ("0.4" if source.version == "0.4" else "0.5"),
        "missing_chunks": options.missing_chunks,
        "foreground": options.foreground,
        # what the input was when the run started: a resume onto an edited input is refused
        "input_fingerprint": content_fingerprint(source.level_url(options.level), options.storage_options),
    }
    return EngineSetup(source, options.level, spatial, has_c, k, plan, scaling, params, tuple(batch))


def plan_for(source: ImageSource, traits: KernelTraits, options: EngineOptions) -> TilePlan:
    """The tile plan of a kernel (its traits) over one level of ``source``."""
    _, _, spatial = image_layout(source)
    lv = source.level(options.level)
    spatial_dims = [source.dims[i] for i in spatial]
    halo = dict(zip(spatial_dims, (0,) * len(spatial) if options.blend else traits.halo))
    tile_shape = options.tile_shape
    if tile_shape is None and options.foreground is not None:
        # skipping needs tiles that can fall on glass: squares (the default grows chunks into
        # strips along x, 256 x 11008 on a slide, which nearly always touch tissue)
        side = int(round(FOREGROUND_TILE_PIXELS ** (1 / len(spatial))))
        tile_shape = [min(side, lv.shape[i]) for i in spatial]
    return make_plan([lv.shape[i] for i in spatial], spatial_dims, [lv.chunks[i] for i in spatial], halo,
                     tile_shape=tile_shape, itemsize=4 * max(traits.in_channels, traits.out_channels),
                     pad_mode=options.pad_mode or traits.pad_mode, align=traits.align,
                     working_bytes=traits.working_bytes)


def valid_region(read: Region, pad: Sequence[tuple[int, int]]) -> Region:
    """The part of a padded block that lies inside the volume (block coordinates)."""
    return tuple(slice(lo, lo + (r.stop - r.start)) for (lo, _), r in zip(pad, read))


def block_origin(read: Region, pad: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Global position of a padded block's first pixel (negative where padded)."""
    return tuple(r.start - lo for r, (lo, _) in zip(read, pad))


def apply_kernel(model: Kernel, blocks: Sequence[np.ndarray], *, valid: Sequence[Region],
                 origins: Sequence[tuple[int, ...]], scaling: Scaling | None, batch: int) -> list[np.ndarray]:
    """The kernel on each block, blocks of one shape stacked up to ``batch`` per call, each call
    with its blocks' context (valid regions, origins, global scaling)."""
    return [out for out, _ in apply_kernel_with_maps(model, blocks, valid=valid, origins=origins, scaling=scaling,
                                                     batch=batch)]


def apply_kernel_with_maps(model: Kernel, blocks: Sequence[np.ndarray], *, valid: Sequence[Region],
                           origins: Sequence[tuple[int, ...]], scaling: Scaling | None, batch: int
                           ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """:func:`apply_kernel`, keeping each block's maps (``traits.maps``; None without)."""
    outputs: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(blocks)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, block in enumerate(blocks):
        by_shape.setdefault(block.shape, []).append(i)
    for idx in by_shape.values():
        for k in range(0, len(idx), batch):
            group = idx[k:k + batch]
            context = BatchContext(tuple(valid[i] for i in group), tuple(origins[i] for i in group), scaling)
            out, maps = model.with_maps(np.stack([blocks[i] for i in group]), context)
            for j, i in enumerate(group):
                outputs[i] = (out[j], None if maps is None else maps[j])
    return outputs  # type: ignore[return-value]


def run_batches(kernel: KernelSpec, tile_ids: Sequence[int], batch: int,
                run_batch: Callable[[Kernel, list[int]], list[dict[str, Any]]], *,
                rows: TileRows | None = None) -> list[dict[str, Any]]:
    """A task's body: the resident kernel, then ``run_batch`` on the task's tile ids ``batch`` at
    a time (memory: one batch of blocks, and with ``rows`` one run's read window); returns every
    tile's metadata."""
    model = resident(kernel)
    results: list[dict[str, Any]] = []
    for run in rows.runs(tile_ids) if rows is not None else [[int(t) for t in tile_ids]]:
        with rows.window(run) if rows is not None else nullcontext():
            for k in range(0, len(run), batch):
                results += run_batch(model, run[k:k + batch])
    return results


@dataclass(frozen=True)
class ImageTileJob:
    """A dense output: each tile's kernel output over its core (crop-stitched, or blended from
    lattice windows) is written as whole output chunks, then the tile is marked done with the
    kernel's per-tile description. Small and picklable; called with a group of tile ids."""

    kernel: KernelSpec
    reader: TileReader
    plan: TilePlan
    sink: ImageSink
    manifest: RunManifest
    batch: int = 1
    blend: BlendLattice | None = None  # None: crop-stitching
    out_dtype: str = "float32"
    batch_shape: tuple[int, ...] = ()  # shape of the batch axes (time, ...): see TileSpace
    maps: MapSinks | None = None  # the kernel's maps (traits.maps), cropped or blended like the output

    def __call__(self, tile_ids: Sequence[int]) -> list[dict[str, Any]]:
        with self.manifest.batched():  # one marker file per run of consecutive tiles
            return run_batches(self.kernel, tile_ids, self.batch, self.run_batch,
                               rows=TileRows(self.reader, TileSpace(self.plan, self.batch_shape)))

    def run_batch(self, model: Kernel, ids: list[int]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        space = TileSpace(self.plan, self.batch_shape)
        located = [space.locate(g) for g in ids]
        missing = [self.reader.missing(tile.read, at) for at, tile in located]  # before any work
        if self.blend is None:
            blocks = [self.reader.read(tile.read, tile.pad, at) for at, tile in located]
            tiles = [tile for _, tile in located]
            outs = apply_kernel_with_maps(model, blocks, valid=[valid_region(t.read, t.pad) for t in tiles],
                                          origins=[block_origin(t.read, t.pad) for t in tiles],
                                          scaling=self.reader.scaling, batch=self.batch)
            crop = [(slice(None),) + t.crop for t in tiles]
            triples = [(block[c], out[c], None if maps is None else maps[c])
                       for c, block, (out, maps) in zip(crop, blocks, outs)]
        else:
            triples = [self.blended(model, tile, at) for at, tile in located]
        seconds = (time.perf_counter() - started) / len(ids)
        return [self.keep(model, g, at, tile, inputs, outputs, maps, seconds=seconds, missing=n_missing)
                for g, (at, tile), n_missing, (inputs, outputs, maps) in zip(ids, located, missing, triples)]

    def keep(self, model: Kernel, g: int, at: Sequence[int], tile: Tile, inputs: np.ndarray, outputs: np.ndarray,
             maps: np.ndarray | None, *, seconds: float, missing: int) -> dict[str, Any]:
        """Finish tile ``g``: its core's output (and maps) written, the tile marked done with the
        kernel's description of it (``inputs``, ``outputs``, ``maps``: the core's)."""
        meta = {"tile": g, "voxels": int(np.prod(tile.core_shape)), "seconds": seconds,
                "missing_input_chunks": missing, **model.describe_tile(inputs, outputs, self.reader.scaling)}
        if self.maps is not None and maps is not None:
            self.maps.write(batch_slices(at), tile.core, maps)
        meta["checksum"] = self.write(tile, outputs, at)
        self.manifest.mark_done(g, meta)
        return meta

    def blended(self, model: Kernel, tile: Tile, at: Sequence[int] = ()
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Input core, and the weight-blended output and maps over ``tile.core`` from every
        lattice window touching it (see ``engine.blend``)."""
        lattice = self.blend
        assert lattice is not None
        region, pad = lattice.read_span(tile.core)
        block = self.reader.read(region, pad, at)
        origin = block_origin(region, pad)
        inside = valid_region(region, pad)
        weights = window_weights(lattice.window, lattice.weights)
        starts = list(lattice.iter_windows(tile.core))
        local = [tuple(slice(s - o, s - o + w) for s, o, w in zip(st, origin, lattice.window)) for st in starts]
        windows = [block[(slice(None),) + sel] for sel in local]
        valid = [tuple(slice(min(max(v.start - s.start, 0), w), min(max(v.stop - s.start, 0), w))
                       for v, s, w in zip(inside, sel, lattice.window)) for sel in local]
        pairs = apply_kernel_with_maps(model, windows, valid=valid, origins=[tuple(st) for st in starts],
                                       scaling=self.reader.scaling, batch=self.batch)
        n_out = pairs[0][0].shape[0]
        outs = [out if maps is None else np.concatenate([out, maps]) for out, maps in pairs]  # maps blend alike
        acc = wsum = None
        for start, out in zip(starts, outs):
            win_sel, core_sel = [], []
            for s, w, sl in zip(start, lattice.window, tile.core):
                lo, hi = max(s, sl.start), min(s + w, sl.stop)
                win_sel.append(slice(lo - s, hi - s))
                core_sel.append(slice(lo - sl.start, hi - sl.start))
            if acc is None:
                acc = np.zeros((out.shape[0],) + tile.core_shape, np.float32)
                wsum = np.zeros(tile.core_shape, np.float32)
            w = weights[tuple(win_sel)]
            acc[(slice(None),) + tuple(core_sel)] += out[(slice(None),) + tuple(win_sel)] * w
            wsum[tuple(core_sel)] += w
        core_in = block[(slice(None),) + tuple(slice(sl.start - o, sl.stop - o) for sl, o in zip(tile.core, origin))]
        blended = acc / wsum
        return core_in, blended[:n_out], (blended[n_out:] if len(blended) > n_out else None)

    def write(self, tile: Tile, out: np.ndarray, at: Sequence[int] = ()) -> str:
        """Write a tile's core (at batch index ``at``); returns the checksum of what was written
        (kept in its marker)."""
        out = self.cast(out)
        out_lead = (slice(None),) if len(self.sink.dims) > len(tile.core) + len(at) else ()
        data = out if out_lead else out[0]
        self.sink.write(batch_slices(at) + out_lead + tile.core, data.reshape((1,) * len(at) + data.shape))
        return checksum(data)


    def cast(self, out: np.ndarray) -> np.ndarray:
        """The kernel's output as stored: the output dtype (integers rounded and clipped)."""
        dtype = np.dtype(self.out_dtype)
        if dtype.kind in "iu" and out.dtype.kind == "f":
            info = np.iinfo(dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(dtype, copy=False)


def checksum(data: np.ndarray) -> str:
    """A digest of an array's values (BLAKE2b, 128 bits): about 1 GB/s, a few ms per tile."""
    return hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class VerifyTiles:
    """Reads finished tiles' output back and compares it with the checksum in their markers;
    returns the ids that do not match (a chunk deleted, truncated or rewritten since)."""

    sink: ImageSink
    plan: TilePlan
    batch_shape: tuple[int, ...] = ()

    def __call__(self, items: Sequence[tuple[int, str]]) -> list[int]:
        lead = (slice(None),) if len(self.sink.dims) > len(self.plan.shape) + len(self.batch_shape) else ()
        space = TileSpace(self.plan, self.batch_shape)
        bad = []
        source = self.sink.source()
        for tile_id, expected in items:
            at, tile = space.locate(tile_id)
            try:
                data = source.read(batch_slices(at) + lead + tile.core)
            except InputError:  # undecodable: certainly not what was written
                bad.append(int(tile_id))
                continue
            if checksum(data) != expected:
                bad.append(int(tile_id))
        return bad


def verify_done(client: Any, sink: ImageSink, plan: TilePlan, manifest: RunManifest, *, progress: bool,
                batch_shape: tuple[int, ...] = ()) -> set[int]:
    """The finished tiles whose output still matches its checksum; the others are unmarked
    (and so recomputed), and with them the other tiles of their batched marker files, so what
    is returned is the manifest's done set after unmarking. Costs one read of the finished
    output, no recomputation."""
    metas = manifest.tile_metadata()
    items = [(t, m["checksum"]) for t, m in metas.items() if "checksum" in m]
    per_task = max(1, -(-len(items) // MAX_TASKS))
    bad: list[int] = []
    for result in run_tasks(client, VerifyTiles(sink, plan, batch_shape), [items[i:i + per_task] for i in range(0, len(items),
                                                                                                 per_task)],
                            total=-(-len(items) // per_task), desc="verify", progress=progress):
        bad += result
    if bad:
        log.warning("%d finished tiles no longer match what was written (tiles %s): computing them again",
                    len(bad), sorted(bad)[:10])
        manifest.unmark(bad)
        return manifest.done()
    return set(metas)


def report_missing(metas: Sequence[dict[str, Any]], source: ImageSource) -> int:
    """Log (once per run) how many tiles read absent input chunks as the fill value."""
    tiles = [m["tile"] for m in metas if m.get("missing_input_chunks")]
    if tiles:
        log.warning("%d tiles of '%s' read input chunks that are not in the store, as the fill value (zarr leaves "
                    "out chunks that hold only the fill value; if chunks were lost, restore them or re-run with "
                    "--missing-chunks error): tiles %s", len(tiles), source.url, sorted(tiles)[:10])
    return len(tiles)


def submit_tiles(client: Any, job: Any, todo: Sequence[int], *, setup: EngineSetup, options: EngineOptions,
                 batch: int, desc: str) -> Iterator[list[dict[str, Any]]]:
    """Run ``job`` over the ``todo`` tiles as tasks of a whole number of batches, with GPU
    resources for GPU kernels; yields each task's per-tile metadata as it finishes."""
    plan = setup.plan
    per_task = tiles_per_task(len(todo), batch, options.max_tasks, threads=cluster_threads(client))
    groups = (tuple(todo[i:i + per_task]) for i in range(0, len(todo), per_task))
    resources = options.resources if options.resources is not None else gpu_resources(client, setup.traits)
    log.info("%s: %d tiles, %d to run (halo %s, %d per task, %d per call%s)", desc, len(plan), len(todo), plan.halo,
             per_task, batch, f", resources {resources}" if resources else "")
    yield from run_tasks(client, job, groups, total=-(-len(todo) // per_task), desc=desc, progress=options.progress,
                         window=options.window, unit_size=per_task * int(np.prod(plan.tile_shape)),
                         resources=resources or None)
