"""Apply a kernel with a dense output (an image, probabilities, embeddings) over an image,
tile by tile, into an OME-Zarr image: the step behind ``tilewise run-kernel`` and
``tilewise denoise``.

Output layout: ``OUT`` is the multiscale image itself (named ``<name>`` in its metadata; channel
axis first when the kernel has more than one output channel or the input has channels), so
every NGFF reader opens it from the root (``napari OUT``); ``OUT/_tilewise`` holds the run
manifest, labels made from it later go to ``OUT/labels/<name>``, and a kernel's maps (a
denoiser's per-pixel variance) to ``OUT/uncertainty/<map>``. Outputs written before
this layout (the image at ``OUT/<name>``) are still read and resumed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from kernels import KernelSpec
from pipeline.core.errors import OptionError
from pipeline.engine.blend import BlendLattice
from pipeline.engine.manifest import RunLock, RunManifest, check_compatible
from pipeline.engine.maps import MapSinks
from pipeline.engine.pyramid import finalize_image
from pipeline.engine.runner import (
    EngineOptions,
    EngineSetup,
    ImageTileJob,
    RunSummary,
    check_location,
    output_started,
    prepare_engine,
    report_missing,
    submit_tiles,
    verify_done,
)
from pipeline.io import store
from pipeline.io.write import ImageSink, create_image
from pipeline.steps.tissue import select_tiles

log = logging.getLogger(__name__)


def _output_image(setup: EngineSetup, name: str, dtype: str, options: EngineOptions) -> dict[str, Any]:
    """The keyword arguments of ``create_image`` for this kernel's output over this input."""
    channels = setup.traits.out_channels if setup.has_channels or setup.traits.out_channels > 1 else 0
    return dict(**setup.output_geometry(channels), dtype=dtype, name=name, channel_names=_channel_names(setup),
                version=setup.ngff, storage_options=options.storage_options)


def _channel_names(setup: EngineSetup) -> list[str] | None:
    """The input's channel names, when the output has the same channels (a denoiser's, a filter's)."""
    names = setup.source.channel_names
    if names and setup.traits.out_channels == setup.traits.in_channels == len(names):
        return list(names)
    return None


def _existing_image(output_url: str, name: str, options: EngineOptions) -> str:
    """The image of an existing output: its root, or ``OUT/<name>`` in the earlier layout."""
    legacy = store.join(output_url, name)
    if not store.exists(store.join(output_url, "zarr.json"), options.storage_options) and \
            not store.exists(store.join(output_url, ".zattrs"), options.storage_options):
        return legacy
    attrs = dict(store.open_group_readonly(output_url, options.storage_options).attrs)
    return output_url if "multiscales" in attrs.get("ome", attrs) else legacy


def run_kernel(input_url: str, output_url: str, kernel: KernelSpec, client: Any, options: EngineOptions | None = None,
               *, name: str | None = None, out_dtype: str = "float32", tile_ids: Sequence[int] | None = None,
               **settings: Any) -> RunSummary:
    """Run ``kernel`` over an image, tile by tile, into the image ``output_url`` (named ``name``,
    default: the kernel's name).

    Re-running the same call resumes (finished tiles are skipped); other parameters on an
    existing output are refused unless ``overwrite``. ``tile_ids`` restricts the run to some
    tiles (the pyramid is built once all are done).

    Parameters
    ----------
    options, settings : engine settings (:class:`~pipeline.engine.runner.EngineOptions`), as an
        object or as keywords (``tile_shape=..., batch=4``), the keywords winning.
    out_dtype : ``"float32"``, any numpy dtype name, or ``"input"``; integer outputs are
        rounded and clipped.
    """
    dense = begin_dense(input_url, output_url, kernel, client, options, name=name, out_dtype=out_dtype,
                        tile_ids=tile_ids, **settings)
    return dense.finish(client)


@dataclass
class DenseRun:
    """A dense run's output created (or resumed) and its job ready: :meth:`finish` computes the
    tiles not yet done and builds the pyramid. A fused chain
    (:class:`~pipeline.engine.fused.FusedSource`) lets the next step compute and keep this run's
    tiles first; ``finish`` then only finalises."""

    output_url: str
    kernel: KernelSpec
    setup: EngineSetup
    options: EngineOptions
    job: ImageTileJob
    lock: RunLock
    every: list[int]  # the tiles this run's output is made of (all, or the foreground's)
    wanted: list[int]  # those this call runs (tile_ids)
    todo: list[int]  # those not done when it began
    # per-tile metadata of the tiles ``finish`` computed (what their markers hold), so reports
    # need not read those markers back
    computed: dict[int, dict[str, Any]] = field(default_factory=dict)

    def finish(self, client: Any, *, kept_elsewhere: bool = False) -> RunSummary:
        """Compute the tiles not done when the run began (``kept_elsewhere``: those still not
        done now, a fused step having computed the others), then the pyramid."""
        setup, options, job, manifest = self.setup, self.options, self.job, self.job.manifest
        todo = self.todo
        if kept_elsewhere:
            done = manifest.done()
            todo = [t for t in todo if t not in done]
        started = time.perf_counter()
        voxels = 0
        metas: list[dict[str, Any]] = []
        with self.lock:
            for results in submit_tiles(client, job, todo, setup=setup, options=options, batch=job.batch,
                                        desc=self.kernel.name):
                voxels += sum(meta["voxels"] for meta in results)
                metas += results
            self.computed.update((int(meta["tile"]), meta) for meta in metas)
            seconds = time.perf_counter() - started
            report_missing(metas, setup.source)
            if self.wanted == self.every or set(self.every) <= manifest.done():  # every tile is done
                finalize_image(job.sink, client, progress=options.progress)
                if job.maps is not None:
                    job.maps.finalize(client, progress=options.progress)
        return RunSummary(self.output_url, len(setup.space), len(self.todo), len(self.wanted) - len(self.todo),
                          seconds, voxels / max(seconds, 1e-9), outside=len(setup.space) - len(self.every))


def begin_dense(input_url: str, output_url: str, kernel: KernelSpec, client: Any, options: EngineOptions | None = None,
                *, name: str | None = None, out_dtype: str = "float32", tile_ids: Sequence[int] | None = None,
                **settings: Any) -> DenseRun:
    """:func:`run_kernel`'s first half: check, plan, create or resume the output, verify the
    finished tiles, and build the tile job."""
    options = EngineOptions.of(options, **settings)
    store.check_name(name or kernel.name, "The output image")
    check_location(output_url, input_url, options)
    setup = prepare_engine(input_url, kernel, options)
    plan = setup.plan
    name = name or kernel.name
    dtype = np.dtype(setup.source.levels[setup.level].dtype if out_dtype == "input" else out_dtype).name
    blend = options.blend
    lattice = BlendLattice.make(list(plan.shape), blend.window, blend.overlap, blend.weights) if blend else None
    params = {
        **setup.params, "name": name, "dtype": dtype,
        "blend": {"window": list(lattice.window), "stride": list(lattice.stride), "weights": lattice.weights}
        if lattice else None,
    }
    manifest = RunManifest(output_url, options.storage_options or {}, workspace=options.workspace)
    lock = RunLock(output_url, options.storage_options or {}, workspace=options.workspace)
    exists = output_started(output_url, manifest, options)
    if exists:
        lock.check()  # before resuming into it, or deleting it with overwrite
    if exists and not options.overwrite:
        check_compatible(output_url, manifest.read_params(), params)
        # omero (and with it the channel names) is written at the end: carry the names on resume
        sink = replace(ImageSink.open(_existing_image(output_url, name, options), options.storage_options),
                       channel_names=tuple(_channel_names(setup) or ()) or None)
        maps = MapSinks.open(output_url, setup.traits.maps, options.storage_options) if setup.traits.maps else None
    else:
        sink = create_image(output_url, overwrite=options.overwrite, replace_store=not options.shared_output,
                            **_output_image(setup, name, dtype, options))
        if not options.shared_output:  # a workflow records its steps at the root itself
            store.open_group(output_url, "a", options.storage_options).attrs.update({"tilewise": {"run": params}})
        maps = MapSinks.create(output_url, setup.traits.maps, setup.output_geometry(), version=setup.ngff,
                               n_levels=len(sink.levels), storage_options=options.storage_options) \
            if setup.traits.maps else None
        manifest.write_params(params)
    space = setup.space  # every spatial tile at every index of the batch axes
    done = verify_done(client, sink, plan, manifest, progress=options.progress,
                       batch_shape=setup.batch_shape) if manifest.done() else set()
    if tile_ids is not None and any(not 0 <= int(t) < len(space) for t in tile_ids):
        raise OptionError(f"Tile ids must be in 0..{len(space) - 1} for this plan (grid {plan.grid}, batch axes "
                          f"{setup.batch_shape}).")
    kept = select_tiles(setup, output_url, options.foreground, client, storage_options=options.storage_options)
    every = list(range(len(space))) if kept is None else list(kept)
    keep = set(every)
    wanted = every if tile_ids is None else [int(t) for t in tile_ids if int(t) in keep]
    job = ImageTileJob(kernel=kernel, reader=setup.reader(), plan=plan, sink=sink, manifest=manifest,
                       batch=setup.batch(options.batch), blend=lattice, out_dtype=dtype,
                       batch_shape=setup.batch_shape, maps=maps)
    return DenseRun(output_url, kernel, setup, options, job, lock, every, wanted,
                    [t for t in wanted if t not in done])
