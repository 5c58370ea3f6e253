"""Convert TIFF files, plain zarr arrays and OME-Zarr 0.4/0.5 into an NGFF image, streamed.

Every task copies one block of whole output write-units; sources are opened once per worker
process (TIFF parsing is not free), so memory stays at a block, never the image.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.core.errors import InputError, OptionError
from pipeline.core.regions import Region, grow_block, iter_regions, n_regions
from pipeline.io import store
from pipeline.io.ngff import default_axes
from pipeline.io.read import ImageSource, SlideSource, open_image
from pipeline.io.slide import RGB, RGB_COLOURS, is_slide_path
from pipeline.io.write import ImageSink, create_image, create_labels, write_omero
from pipeline.engine.submit import run_tasks

log = logging.getLogger(__name__)
BLOCK_BYTES = 32 * 2**20
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")


@dataclass(frozen=True)
class ArrayRef:
    """A picklable pointer to a readable array: a TIFF series or a zarr array (path or URL)."""

    kind: str  # "tiff" | "zarr"
    url: str

    def read(self, region: Region) -> np.ndarray:
        return np.asarray(_open_source(self.kind, self.url)[region])


@functools.lru_cache(maxsize=8)
def _open_source(kind: str, url: str):
    import zarr

    if kind == "tiff":
        import tifffile

        return zarr.open(tifffile.imread(url, aszarr=True), mode="r")
    return zarr.open_array(store=url, mode="r")


@dataclass(frozen=True)
class LevelRef:
    """A picklable pointer to one level of an opened image (OME-Zarr or slide file)."""

    source: ImageSource
    level: int

    def read(self, region: Region) -> np.ndarray:
        return self.source.read(tuple(region), self.level)


def _source_layout(ref: ArrayRef) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...], str | None]:
    arr = _open_source(ref.kind, ref.url)
    hint = None
    if ref.kind == "tiff":
        import tifffile

        with tifffile.TiffFile(ref.url) as tif:
            hint = tif.series[0].axes
    return tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks), hint


def _copy_block(src: ArrayRef, sink: ImageSink, level: int, region: Region) -> int:
    sink.write(region, src.read(region), level)
    return int(np.prod([sl.stop - sl.start for sl in region]))


def copy_block_shape(unit: Sequence[int], shape: Sequence[int], source_chunks: Sequence[int], itemsize: int) -> tuple[int, ...]:
    """Output-aligned blocks that also cover whole source chunks (a TIFF page is read once)."""
    start = [u * -(-min(c, s) // u) for u, c, s in zip(unit, source_chunks, shape)]
    return grow_block(start, shape, itemsize, BLOCK_BYTES) if int(np.prod(start)) * itemsize < BLOCK_BYTES else tuple(start)


def copy_array(src: ArrayRef | LevelRef, sink: ImageSink, level: int, client: Any, source_chunks: Sequence[int], progress: bool) -> None:
    lv = sink.levels[level]
    block = copy_block_shape(lv.write_unit, lv.shape, source_chunks, np.dtype(lv.dtype).itemsize)
    fn = partial(_copy_block, src, sink, level)
    for _ in run_tasks(client, fn, iter_regions(lv.shape, block), total=n_regions(lv.shape, block),
                       desc=f"copy {sink.name} level {level}", progress=progress):
        pass


def _parse_axes(axes: str | None, ndim: int, hint: str | None, where: str) -> str:
    if not axes:
        raise OptionError(
            f"'{where}' has {ndim} dimensions and no axis names; name them with --axes "
            f"(e.g. {'zyx' if ndim == 3 else 'yx' if ndim == 2 else 'czyx'}"
            f"{'; TIFF says ' + hint if hint else ''})."
        )
    if len(axes) != ndim:
        raise OptionError(f"--axes '{axes}' names {len(axes)} axes but '{where}' has {ndim} dimensions {('(' + hint + ')') if hint else ''}.")
    return axes


def _parse_scale(scale: Sequence[float] | None, axes: str) -> tuple[float, ...]:
    if scale is None:
        return tuple(1.0 for _ in axes)
    if len(scale) == len(axes):
        return tuple(float(s) for s in scale)
    spatial = [a for a in axes if a not in "ct"]
    if len(scale) == len(spatial):  # scale given for spatial axes only: 1 for c and t
        it = iter(scale)
        return tuple(1.0 if a in "ct" else float(next(it)) for a in axes)
    raise OptionError(f"--scale has {len(scale)} values; give one per axis of '{axes}' or per spatial axis.")


def convert(src: str, dst: str, client: Any, *, axes: str | None = None, scale: Sequence[float] | None = None,
            chunks: Sequence[int] | None = None, shards: Sequence[int] | None = None, version: str = "0.5",
            overwrite: bool = False, progress: bool = True, storage_options: dict | None = None) -> str:
    """Convert ``src`` (TIFF or slide file, plain zarr array, or OME-Zarr) into an NGFF image at ``dst``.

    Plain sources get a fresh pyramid; OME-Zarr sources and pyramidal slides (SVS, NDPI, tiled
    TIFF, OME-TIFF) keep their levels, transforms (a slide's pixel size), channel names (RGB, with
    its colours) and labels, copied bit for bit. A TIFF whose axes tifffile cannot name needs
    ``axes``; ``axes`` or ``scale`` given read any TIFF as one plain array.
    """
    if not store.exists(src, storage_options):
        raise InputError(f"No file or store at '{src}': the path does not exist. Check the path or URL.")
    store.check_output_location(dst, src, storage_options)
    slide = _try_slide(src, storage_options) if is_slide_path(src) and axes is None and scale is None else None
    if slide is not None and len(slide.levels) > 1:  # a slide, pyramid and all: its levels are kept
        return _convert_ome(slide, dst, client, chunks=chunks, shards=shards, version=version,
                            overwrite=overwrite, progress=progress)
    if slide is not None:  # one level whose axes TIFF names (RGB YXS, an ImageJ ZYX stack): a fresh pyramid
        sink = create_image(dst, shape=slide.shape, dtype=slide.dtype, axes=slide.axes, scale=slide.level(0).scale,
                            chunks=chunks, shards=shards, version=version, overwrite=overwrite, name=slide.name,
                            channel_names=slide.channel_names, storage_options=storage_options)
        copy_array(LevelRef(slide, 0), sink, 0, client, slide.level(0).chunks, progress)
        from pipeline.engine.pyramid import finalize_image

        finalize_image(sink, client, progress=progress)
        _copy_omero(slide, sink)
        return sink.url
    if Path(src).suffix.lower() in TIFF_SUFFIXES:
        ref = ArrayRef("tiff", src)
    else:
        import zarr

        try:
            node = zarr.open(store=src, mode="r")
        except Exception as exc:
            raise InputError(f"'{src}' is neither a TIFF file nor a zarr store ({exc}). Convert it to TIFF first.") from exc
        if isinstance(node, zarr.Group):
            return _convert_ome(open_image(src, storage_options), dst, client, chunks=chunks, shards=shards,
                                version=version, overwrite=overwrite, progress=progress)
        ref = ArrayRef("zarr", src)
    shape, dtype, source_chunks, hint = _source_layout(ref)
    if 0 in shape:
        raise InputError(f"'{src}' has shape {shape}: an empty array has nothing to convert.")
    if not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise InputError(f"'{src}' has dtype {dtype}, which is not numeric; tilewise converts numeric images only.")
    axes = _parse_axes(axes, len(shape), hint, src)
    from pipeline.io.ngff import validate_axes

    validate_axes(default_axes(axes))
    sink = create_image(dst, shape=shape, dtype=dtype, axes=default_axes(axes), scale=_parse_scale(scale, axes),
                        chunks=chunks, shards=shards, version=version, overwrite=overwrite,
                        name=Path(src.rstrip("/")).name, storage_options=storage_options)
    copy_array(ref, sink, 0, client, source_chunks, progress)
    from pipeline.engine.pyramid import finalize_image

    finalize_image(sink, client, progress=progress)
    return sink.url


def _try_slide(src: str, storage_options: dict | None) -> ImageSource | None:
    """The file as a slide, when its TIFF axes name themselves (RGB ``YXS``, ``CYX``, ``ZYX``...);
    None for a TIFF whose axes tifffile cannot name (then ``--axes`` does)."""
    try:
        return open_image(src, storage_options)
    except InputError as exc:
        log.debug("not read as a slide: %s", exc)
        return None


def _convert_ome(src: ImageSource, dst: str, client: Any, *, chunks, shards, version: str, overwrite: bool,
                 progress: bool) -> str:
    def relayout(levels):
        if chunks is None and shards is None and version == src.version:
            return levels
        from dataclasses import replace

        return [replace(lv, chunks=tuple(min(c, s) for c, s in zip(chunks or lv.chunks, lv.shape)),
                        shards=tuple(shards) if shards else None) for lv in levels]

    sink = create_image(dst, shape=src.shape, dtype=src.dtype, axes=src.axes, version=version, name=src.name,
                        channel_names=src.channel_names, overwrite=overwrite, levels=relayout(src.levels))
    _copy_levels(src, sink, client, progress)
    _copy_omero(src, sink)
    for name in src.labels:
        lsrc = src.label(name)
        lsink = create_labels(sink, name, dtype=lsrc.dtype, levels=relayout(lsrc.levels),
                              image_label=lsrc.image_label)
        _copy_levels(lsrc, lsink, client, progress)
    return sink.url


def image_like(src: ImageSource, dst: str, *, from_level: int = 0, version: str | None = None,
               overwrite: bool = False, storage_options: dict | None = None, replace_store: bool = True
               ) -> ImageSink:
    """An empty image at ``dst`` laid out like ``src``'s levels ``from_level`` and coarser (chunks,
    transforms, channel names); :func:`copy_image_data` fills it. ``segment`` copies its input
    this way, so its output holds the image its labels describe."""
    from dataclasses import replace

    version = version or src.version
    levels = [replace(lv, path=str(i), shards=lv.shards if version == "0.5" else None)
              for i, lv in enumerate(src.levels[from_level:])]
    return create_image(dst, shape=levels[0].shape, dtype=src.dtype, axes=src.axes, version=version, name=src.name,
                        channel_names=src.channel_names, overwrite=overwrite, levels=levels,
                        storage_options=storage_options, replace_store=replace_store)


def copy_image_data(src: ImageSource, sink: ImageSink, client: Any, *, from_level: int = 0,
                    progress: bool = True) -> None:
    """Every level's data (task per output-aligned block; idempotent) and the contrast."""
    for k, lv in enumerate(src.levels[from_level:]):
        copy_array(LevelRef(src, from_level + k), sink, k, client, lv.chunks, progress)
    _copy_omero(src, sink)


def _copy_levels(src: ImageSource, sink: ImageSink, client: Any, progress: bool) -> None:
    for k, lv in enumerate(src.levels):
        copy_array(LevelRef(src, k), sink, k, client, lv.chunks, progress)


def _copy_omero(src: ImageSource, sink: ImageSink) -> None:
    """The source's channel colours and contrast windows, when it has them all."""
    channels = _source_channels(src)
    windows = [c.get("window") or {} for c in channels]
    if sink.channel_names is None and src.channel_names:
        from dataclasses import replace

        sink = replace(sink, channel_names=src.channel_names)
    if channels and all({"min", "max", "start", "end"} <= set(w) for w in windows):
        write_omero(sink, [(w["min"], w["max"], w["start"], w["end"]) for w in windows],
                    [c.get("color", "FFFFFF") for c in channels])


def _source_channels(src: ImageSource) -> list[dict]:
    if isinstance(src, SlideSource):  # brightfield RGB: the full range, in its own colours
        if src.channel_names != RGB:
            return []
        top = float(np.iinfo(src.dtype).max) if src.dtype.kind in "iu" else 1.0
        return [{"color": c, "window": {"min": 0.0, "max": top, "start": 0.0, "end": top}} for c in RGB_COLOURS]
    group = store.open_group_readonly(src.url, src.storage_options)
    attrs = dict(group.attrs)
    return list(attrs.get("ome", attrs).get("omero", {}).get("channels", []))

