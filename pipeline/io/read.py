"""Open an OME-Zarr image (NGFF 0.4 or 0.5, local or fsspec URL) as an :class:`ImageSource`.

The source is plain, picklable metadata plus methods that open zarr lazily, so it can be sent
to every task and each task reads its own region straight from the store.
"""

from __future__ import annotations

import contextvars
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, NamedTuple

import numpy as np
import zarr

from pipeline.core.errors import InputError
from pipeline.core.regions import explicit
from pipeline.io import store
from pipeline.io.ngff import (
    CHANNEL,
    SPACE,
    ImageMeta,
    Level,
    level_transforms,
    parse_axes,
    parse_multiscales,
)

log = logging.getLogger(__name__)

class _Window(NamedTuple):
    """One region of a source read once, served to the reads inside it (see read_window)."""

    source: tuple[str, str]  # _source_key
    level: int
    bounds: tuple[slice, ...]  # explicit start:stop on every axis
    data: np.ndarray
    memo: dict  # what was worked out once for the whole window (its absent chunks)


# per thread (each worker thread runs one task at a time), None outside a window
_WINDOW: contextvars.ContextVar[_Window | None] = contextvars.ContextVar("read_window", default=None)


@contextmanager
def read_window(source: "ImageSource", region: tuple[slice, ...], level: int = 0) -> Iterator[None]:
    """Within the block, this thread's reads of ``source`` (``level``) that lie inside ``region``
    are cut from one read of ``region``.

    Why: a tile's halo reaches into its neighbours' chunks, and a chunk is decoded whole, so
    a tile read on its own decodes up to 3^d chunks (27 in 3D) for one chunk's worth of data
    (a 40 x 72 x 72 halo block of 32 x 64 x 64 chunks: 17.8 ms against 1.6 ms for its core).
    Tiles side by side along the last axis, read as one window, decode the chunks they share
    once. zarr caches no decoded chunks, so the window does it, for one run of tiles at a time.
    """
    bounds = explicit(region, source.level(level).shape)
    token = _WINDOW.set(_Window(_source_key(source), level, bounds, source.read(bounds, level), {}))
    try:
        yield
    finally:
        _WINDOW.reset(token)


def _source_key(source: "ImageSource") -> tuple[str, str]:
    return type(source).__name__, source.url


def _window_holding(source: "ImageSource", region: tuple[slice, ...],
                    level: int) -> tuple[_Window, tuple[slice, ...]] | None:
    """The open window and ``region`` made explicit, if the window holds ``region`` of
    ``source`` at ``level``; else None."""
    window = _WINDOW.get()
    if window is None or window.source != _source_key(source) or window.level != level:
        return None
    if any(sl.step not in (None, 1) for sl in region):
        return None
    full = explicit(region, source.level(level).shape)
    if not all(w.start <= r.start and r.stop <= w.stop for r, w in zip(full, window.bounds)):
        return None
    return window, full


def _from_window(source: "ImageSource", region: tuple[slice, ...], level: int) -> np.ndarray | None:
    """The part of the open window ``region`` is, as a new array; None when outside it."""
    held = _window_holding(source, region, level)
    if held is None:
        return None
    window, full = held
    return window.data[tuple(slice(r.start - w.start, r.stop - w.start) for r, w in zip(full, window.bounds))].copy()


@dataclass(frozen=True)
class ImageSource(ImageMeta):
    """A multiscale image: named axes, levels with their chunk layout, channels and labels.

    Arrays are never held: :meth:`read`, :meth:`dask` and :meth:`xarray` open the store on use.
    """

    labels: tuple[str, ...] = ()
    image_label: Mapping[str, Any] | None = None

    # whether the image lives in an NGFF store whose metadata can be validated (a slide file,
    # or an image computed on read, does not)
    is_ngff_store: ClassVar[bool] = True
    # reads can be cut from a read_window (the data is stored, not computed on read)
    windowable: ClassVar[bool] = True

    @property
    def readable_levels(self) -> tuple[Level, ...]:
        """The levels that hold data now (all; an image computed on read has only its first),
        which statistics choose their sample from."""
        return self.levels

    # -- shape helpers --------------------------------------------------------------------
    @property
    def spatial_dims(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes if a.type == SPACE or (a.type is None and a.name in "zyx"))

    def spatial_scale(self, level: int = 0) -> tuple[float, ...]:
        """Physical pixel size along the spatial axes of a level."""
        lv = self.level(level)
        return tuple(float(lv.scale[i]) for i, d in enumerate(self.dims) if d in self.spatial_dims)

    @property
    def spatial_unit(self) -> str:
        """The unit of the spatial axes ("" when the metadata names none)."""
        return next((a.unit for a in self.axes if a.name in self.spatial_dims and a.unit), "")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.levels[0].shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.levels[0].dtype)

    @property
    def n_channels(self) -> int:
        return self.shape[self.dims.index("c")] if "c" in self.dims else 1

    def level(self, level: int = 0) -> Level:
        try:
            return self.levels[level]
        except IndexError:
            raise InputError(
                f"'{self.url}' has {len(self.levels)} levels (0..{len(self.levels) - 1}); level {level} does not exist."
            ) from None

    # -- data access ----------------------------------------------------------------------
    def level_url(self, level: int = 0) -> str:
        """Where a level's data lives (what a resume fingerprints)."""
        return store.join(self.url, self.level(level).path)

    def array(self, level: int = 0) -> zarr.Array:
        """The zarr array of a level, opened read-only."""
        return store.open_array(store.join(self.url, self.level(level).path), "r", self.storage_options)

    def read(self, region: tuple[slice, ...], level: int = 0) -> np.ndarray:
        """Read one region (a tuple of slices in this image's axis order) into memory.

        A chunk that cannot be decoded (truncated, overwritten, wrong codec) is an
        :class:`InputError` naming the array and region; I/O errors pass through (retried).
        Inside a :func:`read_window` that holds ``region``, it is cut from the window.
        """
        cut = _from_window(self, region, level)
        if cut is not None:
            return cut
        try:
            return np.asarray(self.array(level)[region])
        except (RuntimeError, ValueError, TypeError) as exc:
            where = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise InputError(f"'{self.url}' level {self.level(level).path}: a chunk in [{where}] cannot be decoded "
                             f"(corrupt or truncated? {type(exc).__name__}: {str(exc)[:200]}).") from None

    def missing_chunks(self, region: tuple[slice, ...], level: int = 0) -> list[tuple[int, ...]]:
        """Grid positions of the stored chunks (shards) that ``region`` touches but the store does
        not hold. zarr leaves out chunks that hold only the fill value, so a missing chunk is not
        always a lost one; callers decide (``EngineOptions.missing_chunks``)."""
        held = _window_holding(self, region, level)
        if held is not None:  # the window's chunks are checked once, for every tile inside it
            window, full = held
            if "absent" not in window.memo:
                window.memo["absent"] = self._absent_chunks(window.bounds, level)
            absent, grid = window.memo["absent"]
            touched = [range(r.start // g, -(-r.stop // g)) for r, g in zip(full, grid)]
            return [idx for idx in absent if all(i in t for i, t in zip(idx, touched))]
        return self._absent_chunks(region, level)[0]

    def _absent_chunks(self, region: tuple[slice, ...], level: int) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        """(grid positions of the absent chunks ``region`` touches, the chunk grid)."""
        import asyncio
        from itertools import product

        from zarr.core.sync import sync

        arr = self.array(level)
        grid = getattr(arr, "shards", None) or arr.chunks
        ranges = []
        for sl, n, g in zip(region, arr.shape, grid):
            start, stop, _ = sl.indices(n)
            ranges.append(range(start // g, -(-stop // g)) if stop > start else range(0))
        path, encode = arr.store_path, arr.metadata.encode_chunk_key
        chunks = list(product(*ranges))

        async def present() -> list[bool]:  # one hand-off to zarr's event loop, not one per chunk
            return await asyncio.gather(*[(path / encode(idx)).exists() for idx in chunks])

        return [idx for idx, there in zip(chunks, sync(present())) if not there], tuple(grid)

    def dask(self, level: int = 0):
        """A lazy dask array of a level, one dask chunk per zarr chunk."""
        import dask.array as da

        return da.from_zarr(self.array(level))

    def xarray(self, level: int = 0):
        """A lazy ``xarray.DataArray`` with named dims and physical coordinates (pixel centres)."""
        import xarray as xr

        lv = self.level(level)
        coords: dict[str, Any] = {}
        for i, axis in enumerate(self.axes):
            if axis.type == CHANNEL and self.channel_names and len(self.channel_names) == lv.shape[i]:
                coords[axis.name] = list(self.channel_names)
            elif axis.type != CHANNEL:
                values = lv.translation[i] + lv.scale[i] * np.arange(lv.shape[i])
                coords[axis.name] = xr.Variable(axis.name, values, attrs={"units": axis.unit} if axis.unit else {})
        return xr.DataArray(self.dask(level), dims=self.dims, coords=coords, name=self.name,
                            attrs={"ngff_version": self.version, "url": self.url})

    def label(self, name: str) -> "ImageSource":
        """Open one labels image of this image (``labels/<name>``)."""
        if name not in self.labels:
            raise InputError(
                f"'{self.url}' has no labels '{name}'; it has: {', '.join(self.labels) or 'none'}."
            )
        return open_image(store.join(self.url, "labels", name), self.storage_options)


@dataclass(frozen=True)
class SlideLevel:
    """One level of a slide as an array in NGFF axis order (what :meth:`ImageSource.array`
    gives for OME-Zarr): shape, dtype, chunks and region reads, for dask and the statistics."""

    source: "SlideSource"
    level: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.level(self.level).shape

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.source.level(self.level).chunks

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.source.level(self.level).dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, region: tuple[slice, ...]) -> np.ndarray:
        return self.source.read(tuple(region), self.level)


@dataclass(frozen=True)
class SlideSource(ImageSource):
    """A TIFF-family slide (SVS, NDPI, tiled TIFF, OME-TIFF) read in place, level by level,
    through :mod:`pipeline.io.slide`: every engine pass reads it tile by tile without a
    conversion. Axes ``c, y, x`` for RGB (samples become channels)."""

    order: tuple[int, ...] = ()
    vendor: str = ""
    is_ngff_store: ClassVar[bool] = False

    def level_url(self, level: int = 0) -> str:
        return self.url  # one file holds every level

    def array(self, level: int = 0) -> SlideLevel:  # type: ignore[override]
        self.level(level)
        return SlideLevel(self, level)

    def read(self, region: tuple[slice, ...], level: int = 0) -> np.ndarray:
        from pipeline.io.slide import read_level

        region = tuple(region) + (slice(None),) * (len(self.dims) - len(region))
        cut = _from_window(self, region, level)
        if cut is not None:
            return cut
        try:
            return read_level(self.url, self.level(level).path, self.order, region, self.storage_options)
        except (RuntimeError, ValueError, TypeError) as exc:
            where = ", ".join(f"{s.start}:{s.stop}" for s in region)
            raise InputError(f"'{self.url}' level {level}: a tile in [{where}] cannot be decoded "
                             f"(corrupt or truncated? {type(exc).__name__}: {str(exc)[:200]}).") from None

    def missing_chunks(self, region: tuple[slice, ...], level: int = 0) -> list[tuple[int, ...]]:
        return []  # a TIFF has every tile of every level (an empty one reads as zeros)

    def dask(self, level: int = 0):
        import dask.array as da

        return da.from_array(self.array(level), chunks=self.level(level).chunks, asarray=True,
                             name=f"slide-{self.url}-{level}")

    def label(self, name: str) -> "ImageSource":
        raise InputError(f"'{self.url}' is a slide file: it has no labels images; run tilewise on it and "
                         "find labels in the output store.")


def open_slide(url: str, storage_options: Mapping[str, Any] | None = None) -> SlideSource:
    """A slide file as an :class:`ImageSource` (see :mod:`pipeline.io.slide`)."""
    from pipeline.io.slide import slide_layout

    layout = slide_layout(url, storage_options)
    return SlideSource(url=url, version="tiff", name=url.rstrip("/").split("/")[-1], axes=layout.axes,
                       levels=layout.levels, channel_names=layout.channel_names,
                       storage_options=dict(storage_options or {}), order=layout.order, vendor=layout.vendor)


def _list_labels(group: zarr.Group) -> tuple[str, ...]:
    try:
        labels_group = group["labels"]
    except KeyError:
        return ()
    attrs = dict(labels_group.attrs)
    names = attrs.get("ome", attrs).get("labels", [])
    # a name is one path component: a listed '../../x' would be read from outside the store
    return tuple(store.check_name(str(n), f"'{group.store_path}' lists a labels") for n in names)


def _level_layout(arr: zarr.Array) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    shards = getattr(arr, "shards", None)
    return tuple(int(c) for c in arr.chunks), (tuple(int(s) for s in shards) if shards else None)


def as_source(image: "str | ImageSource", storage_options: Mapping[str, Any] | None = None) -> ImageSource:
    """``image`` opened (:func:`open_image`), or as it is when it already is a source (a fused
    chain's image computed on read)."""
    return image if isinstance(image, ImageSource) else open_image(image, storage_options)


def open_image(url: str, storage_options: Mapping[str, Any] | None = None) -> ImageSource:
    """Open the OME-Zarr image at ``url`` (the group holding ``multiscales``), or a TIFF-family
    slide file (``.svs``, ``.ndpi``, ``.tif``...; :func:`open_slide`).

    A store whose root is a collection (e.g. a tilewise output or sample with ``raw/`` and
    ``clean/``) is accepted when it holds exactly one image; otherwise the error lists them.
    """
    from pipeline.io.slide import is_slide_path

    storage_options = dict(storage_options or {})
    if is_slide_path(url):
        return open_slide(url, storage_options)
    group = store.open_group_readonly(url, storage_options)
    attrs = dict(group.attrs)
    if not _is_image(group):
        children = [path for path, _ in _walk(group, "")]
        if len(children) == 1:
            return open_image(store.join(url, children[0]), storage_options)
        if children:
            raise InputError(
                f"'{url}' holds several images ({', '.join(children)}); name one, e.g. "
                f"'{store.join(url, children[0])}'."
            )
    try:
        return _parse_image(url, group, attrs, storage_options)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # metadata that the checks above did not foresee: one line naming it, not a traceback
        raise InputError(f"'{url}': invalid NGFF metadata ({type(exc).__name__}: {str(exc)[:200]}).") from None


def _parse_image(url: str, group: zarr.Group, attrs: dict, storage_options: dict) -> ImageSource:
    version, multiscale, omero = parse_multiscales(attrs, url)
    datasets = multiscale.get("datasets") or []
    if not datasets:
        raise InputError(f"'{url}': multiscales lists no datasets; the image has no arrays.")
    levels = []
    first_ndim = None
    for ds in datasets:
        try:
            arr = group[ds["path"]]
        except KeyError:
            raise InputError(f"'{url}': dataset '{ds['path']}' is listed in multiscales but missing.") from None
        if not isinstance(arr, zarr.Array):
            raise InputError(f"'{url}': dataset '{ds['path']}' is a group, not an array.")
        first_ndim = first_ndim or arr.ndim
        levels.append((ds["path"], arr))
    axes = parse_axes(multiscale, first_ndim, url)
    transforms = level_transforms(multiscale, len(axes))
    out_levels = []
    for (path, arr), (scale, translation) in zip(levels, transforms):
        where = f"'{url}' level '{path}'"
        if arr.ndim != len(axes):
            raise InputError(
                f"{where} has {arr.ndim} dimensions but the axes are {[a.name for a in axes]}; "
                "fix the metadata or re-convert with the right --axes."
            )
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise InputError(
                f"{where} has dtype {arr.dtype}, which is not numeric; tilewise processes integer, "
                "float and boolean images. Convert the data to a numeric type first."
            )
        if 0 in arr.shape:
            raise InputError(f"{where} has shape {tuple(arr.shape)}: an empty array has nothing to process.")
        chunks, shards = _level_layout(arr)
        out_levels.append(Level(path, tuple(arr.shape), chunks, shards, str(arr.dtype), scale, translation))
    channel_names = None
    if omero and omero.get("channels"):
        channel_names = tuple(str(ch.get("label", i)) for i, ch in enumerate(omero["channels"]))
    image_label = attrs.get("ome", attrs).get("image-label")
    return ImageSource(
        url=url.rstrip("/"),
        version=version,
        name=str(multiscale.get("name") or url.rstrip("/").split("/")[-1]),
        axes=axes,
        levels=tuple(out_levels),
        channel_names=channel_names,
        labels=_list_labels(group),
        image_label=image_label,
        storage_options=storage_options,
    )


def ngff_problems(source: ImageSource) -> str | None:
    """What the NGFF schema (ome-zarr-models, the maintained pydantic models of the spec) finds
    wrong with an image's metadata, in one line, or None when it validates. tilewise's own
    reading is more lenient; this tells users when other tools may refuse the store."""
    from pydantic import ValidationError

    if not source.is_ngff_store:
        return None  # not NGFF: a slide file (read through tiffslide, written out as NGFF), a computed image
    try:
        from ome_zarr_models import v04, v05

        model = v04.Image if source.version == "0.4" else v05.Image
        model.from_zarr(store.open_group_readonly(source.url, source.storage_options))
    except ValidationError as exc:
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'attributes'}: {e['msg']}" for e in exc.errors()[:3])
    except Exception as exc:  # the validator itself could not run on this store
        return f"could not be validated ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def _is_image(group: zarr.Group) -> bool:
    attrs = dict(group.attrs)
    return "multiscales" in attrs or "multiscales" in attrs.get("ome", {})


def walk_images(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[tuple[str, zarr.Group]]:
    """Yield ``(relative path, group)`` for every image group in a store (not labels).

    The root itself is yielded as ``""`` when it is an image; images nested in an image group
    (the light-sheet sample's ``clean/`` inside its root image) are found too.
    """
    group = store.open_group_readonly(url, storage_options)
    if _is_image(group):
        yield "", group
    yield from _walk(group, "")


def _walk(group: zarr.Group, prefix: str) -> Iterator[tuple[str, zarr.Group]]:
    with warnings.catch_warnings():  # our tables/ folders are Parquet, not zarr: expected
        warnings.simplefilter("ignore")
        children = sorted(group.groups(), key=lambda kv: kv[0])
    for name, child in children:
        if name in ("labels", "tables", "_tilewise"):
            continue
        path = f"{prefix}{name}"
        if _is_image(child):
            yield path, child
        yield from _walk(child, path + "/")


def list_tables(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names of the tables under ``tables/`` of a store (Parquet datasets tilewise wrote)."""
    return store.Folder(store.join(url, "tables"), storage_options or {}).names(folders=True)
