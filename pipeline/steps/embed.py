"""Per-object embeddings through the tiled engine, always with their baselines.

``embed_objects(IMAGE, OUT, labels=NAME, model=M)`` reads the object table that describes
``IMAGE/labels/NAME`` (its centroids), plans tiles over the image whose halo is half a crop,
and gives each tile the objects whose centroid lies in its core. A task reads its core + halo
once, cuts a fixed-size crop centred on each of its objects (physical size, so an anisotropic z
gets fewer planes; padded past the volume edge like any tile), and runs every embedding kernel
on the crops: so an object on a tile border gets exactly the crop it gets untiled.

Embeddings, one ``embed_<kind>`` column each in ``OUT/tables/<table>`` (the source table's
columns carried over, e.g. the sample's ``class``):

- ``trained``: the model's encoder, every level average-pooled and concatenated, plus
  ``trained_l<k>`` per level (the layer sweep);
- ``untrained_<s>``: the same architecture with random weights, seeds ``0..seeds-1``;
- ``pixel``: the crop block-averaged to 8 per axis;
- ``structure``: size, shape (inertia) and intensity statistics of the object's mask in its
  crop, standardised over all objects.

``embed_patches(IMAGE, OUT)`` embeds a grid of patches instead (whole-slide images, no labels
needed): one row per patch, the same embeddings but ``structure``.

Resumable like every step: each tile's vectors are a file under ``OUT/_tilewise/embed`` and a
done marker; the table is written last.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kernels import KernelSpec, resident
from kernels.errors import KernelError
from kernels.modelfile import model_kernel_spec, read_card
from kernels.objectscale import equivalent_diameter
from pipeline.core.errors import InputError, OptionError
from pipeline.engine.manifest import RunLock, RunManifest, check_compatible
from pipeline.engine.plan import TilePlan, make_plan
from pipeline.engine.runner import (
    EngineOptions,
    TileReader,
    block_origin,
    check_location,
    image_layout,
    output_started,
    tiles_per_task,
)
from pipeline.engine.stats import Normalisation
from pipeline.engine.submit import run_tasks
from pipeline.io import store
from pipeline.io.read import ImageSource, open_image
from pipeline.io.store import Folder
from pipeline.io.tables import INSTANCE_KEY, read_attributes, read_table, write_table

log = logging.getLogger(__name__)

MIN_CROP = 16  # pixels per axis: enough for three poolings of the encoder
UNTRAINED_DEFAULT = {"depth": 3, "width": 16, "norm": "batch"}  # without a model: the segmenter's shape


@dataclass(frozen=True)
class EmbedSummary:
    table: str
    objects: int
    embeddings: dict[str, int]  # column -> dimension
    tiles: int
    seconds: float

    @property
    def objects_per_s(self) -> float:
        return self.objects / max(self.seconds, 1e-9)


def find_table(source: ImageSource, labels: str, table: str | None, storage_options: dict | None) -> str:
    """The table of ``source`` that describes ``labels`` (its ``region``), or ``table``."""
    names = Folder(store.join(source.url, "tables"), storage_options or {}).names(folders=True)
    if table is not None:
        if table not in names:
            raise InputError(f"'{source.url}' has no table '{table}'; it has: {', '.join(names) or 'none'}.")
        return table
    for name in names:
        if read_attributes(source.url, name, storage_options).get("region") == labels:
            return name
    raise InputError(f"'{source.url}' has no object table for labels '{labels}' (tables: {', '.join(names) or 'none'}); "
                     "`tilewise segment` writes one beside its labels, or name one with --table.")


def crop_shape(frame, scale: Sequence[float], crop: float | None) -> tuple[int, ...]:
    """Crop per spatial axis in pixels: ``crop`` physical units across (default: twice the
    90th-percentile object diameter, from the table's volumes), at least ``MIN_CROP``
    pixels on the finest axis, even."""
    if crop is None:
        diameters = equivalent_diameter(frame["voxels"].to_numpy(np.float64) * float(np.prod(scale)), len(scale))
        crop = 2 * float(np.percentile(diameters, 90)) if len(diameters) else MIN_CROP * min(scale)
    crop = max(float(crop), MIN_CROP * min(scale))
    return even_pixels(crop, scale)


def even_pixels(size: float, scale: Sequence[float]) -> tuple[int, ...]:
    """``size`` physical units as an even number of pixels per axis (at least 4): crops centre
    on a pixel the same way on every axis."""
    return tuple(max(4, 2 * math.ceil(size / s / 2)) for s in scale)


def embedding_specs(model: str | None, *, ndim: int, channels: int, crop: Sequence[int], seeds: int
                    ) -> dict[str, KernelSpec]:
    """``{kind: spec}``: the trained encoder (with a model), its untrained twins, the pixels."""
    specs: dict[str, KernelSpec] = {}
    if model is not None:
        try:
            card = read_card(model)
            specs["trained"] = model_kernel_spec(model, card.task, "embed-encoder", "")
        except KernelError as exc:
            raise OptionError(str(exc)) from None
        arch = card.architecture
    else:
        arch = {"ndim": ndim, "in_channels": channels, "out_channels": 1, **UNTRAINED_DEFAULT}
    if arch["ndim"] != ndim or arch["in_channels"] != channels:
        raise OptionError(f"The model is {arch['ndim']}D with {arch['in_channels']} channel(s); the image is {ndim}D "
                          f"with {channels}.")
    for seed in range(seeds):
        specs[f"untrained_{seed}"] = KernelSpec.of("embed-untrained", architecture=arch, seed=seed)
    specs["pixel"] = KernelSpec.of("embed-pixel", crop=list(crop), channels=channels)
    return specs


def structure_features(mask: np.ndarray, image: np.ndarray, scale: Sequence[float]) -> np.ndarray:
    """Size, shape and intensity of one object in its crop: log voxels, the square roots of
    its inertia eigenvalues (physical units, sorted), and per channel the mean, std, 10th and
    90th percentile inside the mask and the inside/outside contrast."""
    ndim = mask.ndim
    n = int(mask.sum())
    feats = [math.log1p(n)]
    if n:
        coords = np.argwhere(mask) * np.asarray(scale, np.float64)
        cov = np.cov(coords.T) if n > 1 else np.zeros((ndim, ndim))
        feats += list(np.sqrt(np.clip(np.sort(np.linalg.eigvalsh(np.atleast_2d(cov)))[::-1], 0, None)))
    else:
        feats += [0.0] * ndim
    for channel in image:
        inside, outside = channel[mask], channel[~mask]
        if inside.size:
            p10, p90 = np.percentile(inside, (10, 90))
            feats += [inside.mean(), inside.std(), p10, p90,
                      inside.mean() - (outside.mean() if outside.size else 0.0)]
        else:
            feats += [0.0] * 5
    return np.asarray(feats, np.float32)


@dataclass(frozen=True)
class EmbedTileJob:
    """One group of tiles: read core + halo of image and labels, crop each object, embed."""

    reader: TileReader
    labels: TileReader | None  # None: patches (no objects, no structure features)
    plan: TilePlan
    specs: tuple[tuple[str, KernelSpec], ...]
    crop: tuple[int, ...]
    scale: tuple[float, ...]
    manifest: RunManifest
    parts: Folder

    def __call__(self, item: tuple[Sequence[int], Sequence[np.ndarray]]) -> list[dict[str, Any]]:
        tile_ids, objects = item
        with self.manifest.batched():  # one marker file per run of consecutive tiles
            return [self.run_tile(int(t), rows) for t, rows in zip(tile_ids, objects)]

    def crops(self, tile_id: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(n, C, *crop)`` normalised image crops and ``(n, *crop)`` object masks (empty
        without labels)."""
        tile = self.plan.tile(tile_id)
        block = self.reader.read(tile.read, tile.pad)
        lab = self.labels.read(tile.read, tile.pad)[0] if self.labels is not None else None
        origin = block_origin(tile.read, tile.pad)
        images, masks = [], []
        for row in rows:
            start = [int(math.floor(c)) - h // 2 - o for c, h, o in zip(row[1:], self.crop, origin)]
            sel = tuple(slice(s, s + h) for s, h in zip(start, self.crop))
            images.append(block[(slice(None),) + sel])
            if lab is not None:
                masks.append(lab[sel] == row[0])
        return np.stack(images), np.stack(masks) if masks else np.zeros((0,) + self.crop, bool)

    def run_tile(self, tile_id: int, rows: np.ndarray) -> dict[str, Any]:
        started = time.perf_counter()
        out: dict[str, np.ndarray] = {"label": rows[:, 0].astype(np.uint64)}
        if len(rows):
            images, masks = self.crops(tile_id, rows)
            for name, spec in self.specs:
                kernel = resident(spec)
                step = kernel.traits.max_batch  # crops are whole blocks: kernel.run gives each its context
                out[name] = np.concatenate([kernel.run(images[k:k + step])
                                            for k in range(0, len(images), step)]).astype(np.float32)
            if self.labels is not None:
                out["structure"] = np.stack([structure_features(m, im, self.scale) for m, im in zip(masks, images)])
        self.parts.write_arrays(f"{tile_id}.npz", **out)
        meta = {"tile": tile_id, "objects": int(len(rows)), "seconds": time.perf_counter() - started}
        self.manifest.mark_done(tile_id, meta)
        return meta


@dataclass(frozen=True)
class _Items:
    """What to embed: rows with pixel centroids, the table they go to, and its attributes."""

    frame: Any  # pandas DataFrame: label + centroid_<d> (+ any columns to carry)
    name: str
    attributes: dict[str, Any]
    labels: ImageSource | None  # objects' labels (structure features); None for patches
    crop: tuple[int, ...]


def _open(image_url: str, output_url: str, options: EngineOptions) -> tuple[ImageSource, bool, list[int]]:
    check_location(output_url, image_url, options)
    source = open_image(image_url, options.storage_options)
    _, has_c, spatial = image_layout(source)
    if len(spatial) != len(source.dims) - int(has_c):
        raise InputError(f"'{image_url}' has time or other batch axes; embed one time point at a time.")
    return source, has_c, spatial


def embed_objects(image_url: str, output_url: str, client: Any, options: EngineOptions | None = None, *,
                  labels: str = "nuclei", table: str | None = None, model: str | None = None, seeds: int = 3,
                  crop: float | None = None, **settings: Any) -> EmbedSummary:
    """Embed every object of ``IMAGE/labels/<labels>`` into ``OUT/tables/<table>``.

    ``model``: a tilewise model folder whose encoder gives the ``trained`` embedding (without
    one, only the baselines); ``seeds``: untrained twins; ``crop``: crop size in physical units
    (default twice the 90th-percentile object diameter). Engine settings (``tile_shape``,
    ``overwrite``, ``progress``...) as for every step.
    """
    options = EngineOptions.of(options, **settings)
    source, has_c, spatial = _open(image_url, output_url, options)
    lab_source = source.label(labels)
    name = find_table(source, labels, table, options.storage_options)
    frame = read_table(source.url, name, options.storage_options)
    dims = [source.dims[i] for i in spatial]
    missing = [f"centroid_{d}" for d in dims if f"centroid_{d}" not in frame]
    if missing:
        raise InputError(f"Table '{name}' of '{image_url}' lacks {', '.join(missing)}; embed needs pixel centroids.")
    lv = source.level(options.level)
    crop_px = crop_shape(frame, tuple(lv.scale[i] for i in spatial), crop)
    so = options.storage_options or {}
    attrs = {**read_attributes(source.url, name, so),
             "labels_path": store.relative(output_url, lab_source.url).rstrip("/")}  # from OUT, as every table
    return _embed(source, has_c, spatial, output_url, client, options,
                  _Items(frame, name, attrs, lab_source, crop_px), model=model, seeds=seeds)


def embed_patches(image_url: str, output_url: str, client: Any, options: EngineOptions | None = None, *,
                  patch: float | None = None, name: str = "patches", model: str | None = None, seeds: int = 3,
                  **settings: Any) -> EmbedSummary:
    """Embed a grid of patches (no labels needed: whole-slide images) into ``OUT/tables/<name>``:
    one row per patch (``patch_<d>`` grid index, centroids), ``patch`` physical units across
    (default 64 pixels on the finest axis), the same embeddings as objects but ``structure``."""
    import pandas as pd

    options = EngineOptions.of(options, **settings)
    source, has_c, spatial = _open(image_url, output_url, options)
    store.check_name(name, "The table")
    lv = source.level(options.level)
    scale = tuple(lv.scale[i] for i in spatial)
    shape = tuple(lv.shape[i] for i in spatial)
    crop_px = even_pixels(patch or 64 * min(scale), scale)
    dims = [source.dims[i] for i in spatial]
    grid = [np.arange(0, n, c) for n, c in zip(shape, crop_px)]
    index = np.stack(np.meshgrid(*[np.arange(len(g)) for g in grid], indexing="ij"), -1).reshape(-1, len(dims))
    frame = pd.DataFrame({INSTANCE_KEY: np.arange(1, len(index) + 1, dtype=np.uint64), "region": name})
    units = [source.axes[i].unit for i in spatial]
    for axis, (d, c, s, u) in enumerate(zip(dims, crop_px, scale, units)):
        frame[f"patch_{d}"] = index[:, axis]
        frame[f"centroid_{d}"] = index[:, axis] * c + c // 2  # the crop then starts on the grid
        frame[f"centroid_{d}_{u or 'physical'}"] = lv.translation[spatial[axis]] + s * frame[f"centroid_{d}"]
    attrs = {"region": name, "region_key": "region", "instance_key": INSTANCE_KEY, "axes": dims, "scale": list(scale),
             "translation": [lv.translation[i] for i in spatial], "units": units, "patch": list(crop_px),
             "format": "tilewise-table/0.2", "batch_axes": []}
    return _embed(source, has_c, spatial, output_url, client, options, _Items(frame, name, attrs, None, crop_px),
                  model=model, seeds=seeds)


def _embed(source: ImageSource, has_c: bool, spatial: list[int], output_url: str, client: Any, options: EngineOptions,
           items: _Items, *, model: str | None, seeds: int) -> EmbedSummary:
    """The tiled pass both entry points share, then the table."""
    if seeds < 0:
        raise OptionError(f"--seeds must be >= 0, got {seeds}.")
    so = options.storage_options or {}
    lv = source.level(options.level)
    dims = [source.dims[i] for i in spatial]
    scale = tuple(lv.scale[i] for i in spatial)
    shape = tuple(lv.shape[i] for i in spatial)
    specs = embedding_specs(model, ndim=len(spatial), channels=source.n_channels, crop=items.crop, seeds=seeds)
    percentiles = (1.0, 99.9)
    if "trained" in specs:
        from kernels.modelfile import card_percentiles

        percentiles = card_percentiles(read_card(model))
    halo = {d: h // 2 + 1 for d, h in zip(dims, items.crop)}
    plan = make_plan(shape, dims, [lv.chunks[i] for i in spatial], halo, tile_shape=options.tile_shape,
                     itemsize=4 * source.n_channels, pad_mode="reflect")
    params = {"input": source.url, "table": items.name, "level": options.level, "crop": list(items.crop),
              "tile_shape": list(plan.tile_shape), "specs": {k: s.key for k, s in specs.items()},
              "labels": items.labels.url if items.labels is not None else None}
    manifest, lock, parts = begin_parts_run(output_url, params, options, "embed")
    reader = TileReader(source, options.level, has_c, "reflect", "normalised", Normalisation.of(source, percentiles))
    lab_reader = (TileReader(items.labels, options.level, False, "constant", "native", None)
                  if items.labels is not None else None)
    frame = items.frame
    centroids = np.column_stack([frame[INSTANCE_KEY].to_numpy(np.float64)] +
                                [frame[f"centroid_{d}"].to_numpy(np.float64) for d in dims])
    owner = plan.owner_of(centroids[:, 1:])
    job = EmbedTileJob(reader, lab_reader, plan, tuple(specs.items()), items.crop, scale, manifest, parts)
    started = time.perf_counter()
    with lock:
        run_owned_tiles(client, job, range(len(plan)), centroids, owner, manifest, options, f"embed {items.name}")
        seconds = time.perf_counter() - started
        attrs = {**items.attributes, "image": store.relative(output_url, source.url)}
        url, dims_out = _write_table(output_url, items.name, frame, parts, plan, specs, attrs,
                                     structure=items.labels is not None, storage_options=so)
    log.info("%s: %d rows embedded (%s) in %.1f s", url, len(frame), ", ".join(dims_out), seconds)
    return EmbedSummary(url, len(frame), dims_out, len(plan), seconds)


def begin_parts_run(output_url: str, params: dict[str, Any], options: EngineOptions, kind: str
                    ) -> tuple[RunManifest, RunLock, Folder]:
    """Start or resume a run that keeps per-tile parts under ``OUT/_tilewise/<kind>`` (embed,
    explain): a resume must have the same parameters; ``overwrite`` starts the output afresh."""
    so = options.storage_options or {}
    manifest, lock = RunManifest(output_url, so, workspace=options.workspace), RunLock(output_url, so,
                                                                                       workspace=options.workspace)
    exists = output_started(output_url, manifest, options)
    if exists:
        lock.check()
    if exists and not options.overwrite:
        check_compatible(output_url, manifest.read_params(), params)
    else:
        if not options.shared_output:  # a workflow's output exists already, holding its other steps
            from pipeline.io.write import create_collection

            create_collection(output_url, overwrite=options.overwrite, storage_options=options.storage_options,
                              attributes={"tilewise": {"run": params}})
        manifest.write_params(params)
    parts = Folder(store.join(output_url, options.workspace, kind), so)
    parts.makedirs()
    return manifest, lock, parts


def run_owned_tiles(client: Any, job: Any, tiles: Sequence[int], rows: np.ndarray, owner: np.ndarray,
                    manifest: RunManifest, options: EngineOptions, desc: str) -> None:
    """The ``tiles`` not yet done, in groups of about ``options.max_tasks`` tasks, each tile
    handed the ``rows`` it owns (``owner``): embed's objects, explain's targets."""
    done = manifest.done()
    todo = [t for t in tiles if t not in done]
    per_task = tiles_per_task(len(todo), 1, options.max_tasks)
    groups = [todo[k:k + per_task] for k in range(0, len(todo), per_task)]
    tasks = ((g, [rows[owner == t] for t in g]) for g in groups)
    for _ in run_tasks(client, job, tasks, total=len(groups), desc=desc, progress=options.progress):
        pass


def _write_table(output_url: str, name: str, frame, parts: Folder, plan: TilePlan, specs: dict[str, KernelSpec],
                 attributes: dict[str, Any], *, structure: bool, storage_options: dict) -> tuple[str, dict[str, int]]:
    """Every tile's vectors joined to the rows (row order kept), the trained encoder's level
    sweep split out, structure standardised; one Parquet part."""
    from kernels import build_kernel

    arrays = [parts.read_arrays(f"{t}.npz") for t in range(len(plan))]
    ids = np.concatenate([a["label"] for a in arrays]) if arrays else np.zeros(0, np.uint64)
    order = {int(i): k for k, i in enumerate(ids)}
    take = np.asarray([order[int(i)] for i in frame[INSTANCE_KEY].to_numpy()], np.int64)
    vectors: dict[str, np.ndarray] = {}
    for kind in list(specs) + (["structure"] if structure else []):
        chunks = [a[kind] for a in arrays if kind in a and len(a["label"])]
        vectors[kind] = np.concatenate(chunks)[take] if chunks else np.zeros((0, 1), np.float32)
    if "trained" in specs:
        for k, (a, b) in enumerate(build_kernel(specs["trained"]).level_slices()):
            vectors[f"trained_l{k}"] = vectors["trained"][:, a:b]
    if structure and len(vectors["structure"]):
        s = vectors["structure"]
        vectors["structure"] = (s - s.mean(0)) / np.where(s.std(0) > 0, s.std(0), 1.0)
    attrs = {**attributes, "embeddings": {f"embed_{k}": int(v.shape[1]) for k, v in vectors.items()},
             "embed_specs": {k: spec.params for k, spec in specs.items()}}
    url = write_table(output_url, name, frame, attrs, embeddings={f"embed_{k}": v for k, v in vectors.items()},
                      storage_options=storage_options)
    return url, attrs["embeddings"]
