"""Create NGFF images and labels, write them region by region, and finish their metadata.

Arrays and multiscales metadata are created once, by the client, before any task runs; tasks
only write whole write-units (chunks or shards) of arrays that already exist, so no two tasks
ever touch the same object in the store.
"""

from __future__ import annotations

import colorsys
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from pipeline.core.errors import OptionError
from pipeline.core.regions import Region, is_aligned
from pipeline.io import store
from pipeline.io.ngff import (
    SPACE,
    Axis,
    ImageMeta,
    Level,
    datasets_json,
    ome_format,
    validate_axes,
    zarr_format_for,
)

log = logging.getLogger(__name__)

DEFAULT_CHUNK_2D = 1024
DEFAULT_CHUNK_3D = (64, 256, 256)


@dataclass(frozen=True)
class ImageSink(ImageMeta):
    """A created (possibly still empty) multiscale image that tasks write into."""

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> "ImageSink":
        """An existing image, for writing more of it (e.g. when a run resumes)."""
        from pipeline.io.read import open_image

        src = open_image(url, storage_options)
        return cls(src.url, src.version, src.name, src.axes, src.levels, src.channel_names, dict(storage_options or {}))

    def array(self, level: int = 0, mode: str = "r+") -> zarr.Array:
        return store.open_array(store.join(self.url, self.levels[level].path), mode, self.storage_options)

    def write(self, region: Region, data: np.ndarray, level: int = 0) -> None:
        """Write ``data`` into ``region`` of a level; the region must cover whole write units."""
        lv = self.levels[level]
        if not is_aligned(region, lv.shape, lv.write_unit):
            raise ValueError(f"region {region} is not aligned to the write unit {lv.write_unit} of level {level}")
        self.array(level)[region] = data

    def source(self):
        """Re-open the written image for reading."""
        from pipeline.io.read import open_image

        return open_image(self.url, self.storage_options)


def default_chunks(shape: Sequence[int], axes: Sequence[Axis]) -> tuple[int, ...]:
    """Chunks of ~8-16 MB for uint16: 64x256x256 in 3D, 1024x1024 in 2D, 1 along c and t."""
    spatial = [i for i, a in enumerate(axes) if a.type == SPACE]
    chunks = [1] * len(shape)
    wanted = DEFAULT_CHUNK_3D if len(spatial) == 3 else (DEFAULT_CHUNK_2D,) * len(spatial)
    for i, c in zip(spatial, wanted):
        chunks[i] = c
    return tuple(min(c, s) for c, s in zip(chunks, shape))


def pyramid_factors(shape: Sequence[int], axes: Sequence[Axis], scale: Sequence[float],
                    chunks: Sequence[int], n_levels: int | None = None) -> list[tuple[int, ...]]:
    """Per-level downsampling factors relative to level 0.

    An axis is halved while its pixel size is well below the coarsest spatial pixel size, so an
    anisotropic stack (z 2 um, yx 0.4 um) first becomes isotropic; then all axes halve together.
    In auto mode (``n_levels=None``) levels stop when the image fits in one chunk.
    """
    spatial = [i for i, a in enumerate(axes) if a.type == SPACE]
    factors = [tuple([1] * len(shape))]
    while True:
        f = list(factors[-1])
        cur_shape = [math.ceil(s / ff) for s, ff in zip(shape, f)]
        if n_levels is not None and len(factors) >= n_levels:
            break
        if n_levels is None and all(cur_shape[i] <= chunks[i] for i in spatial):
            break
        cur_scale = [scale[i] * f[i] for i in range(len(shape))]
        coarsest = max(cur_scale[i] for i in spatial)
        down = [i for i in spatial if cur_scale[i] * 1.5 <= coarsest and cur_shape[i] > 1]
        if not down:
            down = [i for i in spatial if cur_shape[i] > 1]
        if not down or len(factors) >= 16:
            break
        for i in down:
            f[i] *= 2
        factors.append(tuple(f))
    return factors


def plan_levels(shape: Sequence[int], dtype: Any, axes: Sequence[Axis], scale: Sequence[float],
                translation: Sequence[float], chunks: Sequence[int], shards: Sequence[int] | None,
                n_levels: int | None) -> tuple[Level, ...]:
    """Shapes, layouts and transforms of every level (half-pixel shift per level, pixel centres)."""
    levels = []
    for k, f in enumerate(pyramid_factors(shape, axes, scale, chunks, n_levels)):
        lv_shape = tuple(math.ceil(s / ff) for s, ff in zip(shape, f))
        lv_scale = tuple(float(s * ff) for s, ff in zip(scale, f))
        # round away float noise (0.6000000000000001) so metadata stays readable
        lv_trans = tuple(round(float(t + (ls - s) / 2), 12) for t, ls, s in zip(translation, lv_scale, scale))
        if shards:
            lv_chunks, lv_shards = tuple(chunks), tuple(shards)
        else:
            lv_chunks, lv_shards = tuple(min(c, s) for c, s in zip(chunks, lv_shape)), None
        levels.append(Level(str(k), lv_shape, lv_chunks, lv_shards, np.dtype(dtype).str, lv_scale, lv_trans))
    return tuple(levels)


def _compressor(zarr_format: int):
    if zarr_format == 2:
        from numcodecs import Blosc

        return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _create_array(group: zarr.Group, level: Level, axes: Sequence[Axis], zarr_format: int) -> None:
    kw: dict[str, Any] = dict(
        name=level.path, shape=level.shape, chunks=level.chunks, dtype=np.dtype(level.dtype),
        compressors=_compressor(zarr_format), fill_value=0, overwrite=True,
    )
    if zarr_format == 3:
        kw["dimension_names"] = [a.name for a in axes]
        if level.shards:
            kw["shards"] = level.shards
    else:
        kw["chunk_key_encoding"] = {"name": "v2", "separator": "/"}  # NGFF 0.4 requires "/"
    group.create_array(**kw)


def create_collection(url: str, *, version: str = "0.5", overwrite: bool = False,
                      attributes: Mapping[str, Any] | None = None,
                      storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Create an empty root group that will hold several images (e.g. ``raw/``, ``clean/``)."""
    store.prepare_output(url, overwrite, storage_options)
    group = store.open_group(url, "w", storage_options, zarr_format=zarr_format_for(version))
    if attributes:
        group.attrs.update(dict(attributes))
    return group


def create_image(
    url: str,
    *,
    shape: Sequence[int],
    dtype: Any,
    axes: Sequence[Axis],
    scale: Sequence[float] | None = None,
    translation: Sequence[float] | None = None,
    chunks: Sequence[int] | None = None,
    shards: Sequence[int] | None = None,
    n_levels: int | None = None,
    version: str = "0.5",
    name: str | None = None,
    channel_names: Sequence[str] | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    levels: Sequence[Level] | None = None,
    replace_store: bool = True,
) -> ImageSink:
    """Create every level's (empty) array and the multiscales metadata, once, from the client.

    Parameters
    ----------
    shape, dtype, axes : level-0 geometry, in NGFF axis order.
    scale, translation : physical pixel size and offset of level 0 (defaults 1 and 0).
    chunks, shards : storage layout; shards need NGFF 0.5 (zarr v3) and must be chunk multiples.
    n_levels : number of pyramid levels; ``None`` adds levels until the top fits in one chunk.
    version : ``"0.5"`` (zarr v3, default) or ``"0.4"`` (zarr v2).
    levels : explicit levels (e.g. copied from a source image) instead of the planned pyramid.
    replace_store : ``False`` writes the image into an existing group without removing what
        else it holds (a workflow's shared output: trained models, other steps' records).
    """
    axes = tuple(axes)
    validate_axes(axes)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(axes):
        raise OptionError(f"shape {shape} has {len(shape)} dimensions but axes are {[a.name for a in axes]}.")
    scale = tuple(float(s) for s in (scale or [1.0] * len(shape)))
    translation = tuple(float(t) for t in (translation or [0.0] * len(shape)))
    if len(scale) != len(shape) or len(translation) != len(shape):
        raise OptionError(f"scale/translation need {len(shape)} values (one per axis {[a.name for a in axes]}).")
    chunks = tuple(int(c) for c in (chunks or default_chunks(shape, axes)))
    if shards is not None:
        if version != "0.5":
            raise OptionError("Shards need NGFF 0.5 (zarr v3); drop --shards or write version 0.5.")
        shards = tuple(int(s) for s in shards)
        if any(s % c for s, c in zip(shards, chunks)):
            raise OptionError(f"Shard shape {shards} must be a whole multiple of the chunk shape {chunks}.")
    zarr_format = zarr_format_for(version)
    storage_options = dict(storage_options or {})
    if replace_store:
        store.prepare_output(url, overwrite, storage_options)
    group = store.open_group(url, "w" if replace_store else "a", storage_options, zarr_format=zarr_format)
    if levels is None:
        levels = plan_levels(shape, dtype, axes, scale, translation, chunks, shards, n_levels)
    levels = tuple(levels)
    for level in levels:
        _create_array(group, level, axes, zarr_format)
    from ome_zarr.writer import write_multiscales_metadata

    image_name = name or url.rstrip("/").split("/")[-1]
    write_multiscales_metadata(group, datasets_json(levels), fmt=ome_format(version),
                               axes=[a.to_json() for a in axes], name=image_name)
    return ImageSink(url.rstrip("/"), version, image_name, axes, levels,
                     tuple(channel_names) if channel_names else None, storage_options)


# Largest label id that gets a listed colour. napari-ome-zarr builds its colour map from the list
# alone, so a listed palette must name every id (an id missing from it is drawn transparent);
# above this, the list (about 60 bytes an id in the metadata) is left out and readers colour
# every id themselves.
PALETTE_LIMIT = 4096


def label_colors(n_labels: int, limit: int = PALETTE_LIMIT) -> list[dict[str, Any]] | None:
    """Distinct hues for every label value 1..n, or None (no palette) when n exceeds ``limit``."""
    if n_labels > limit:
        return None
    colors = []
    for value in range(1, n_labels + 1):
        hue = (value * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
        colors.append({"label-value": value, "rgba": [int(r * 255), int(g * 255), int(b * 255), 255]})
    return colors


def create_labels(image: ImageSink, name: str, *, dtype: Any = np.uint32, n_labels: int | None = None,
                  chunks: Sequence[int] | None = None, overwrite: bool = False,
                  levels: Sequence[Level] | None = None,
                  image_label: Mapping[str, Any] | None = None) -> ImageSink:
    """Create ``<image>/labels/<name>`` with the image's geometry and ``image-label`` metadata.

    Labels have no channel axis; their pyramid mirrors the image's (built with the mode).
    ``levels`` and ``image_label`` copy an existing labels image's layout and metadata.
    """
    keep = [i for i, a in enumerate(image.axes) if a.type != "channel"]
    lv0 = image.levels[0]
    return create_label_image(
        store.join(image.url, "labels"), name, shape=[lv0.shape[i] for i in keep], axes=[image.axes[i] for i in keep],
        scale=[lv0.scale[i] for i in keep], translation=[lv0.translation[i] for i in keep],
        chunks=chunks or [lv0.chunks[i] for i in keep], shards=[lv0.shards[i] for i in keep] if lv0.shards else None,
        n_levels=len(image.levels), version=image.version, dtype=dtype, n_labels=n_labels, overwrite=overwrite,
        levels=levels, image_label=image_label, storage_options=image.storage_options)


def create_label_image(labels_url: str, name: str, *, shape: Sequence[int], axes: Sequence[Axis],
                       scale: Sequence[float], translation: Sequence[float], chunks: Sequence[int],
                       shards: Sequence[int] | None = None, n_levels: int | None = None, version: str = "0.5",
                       dtype: Any = np.uint32, n_labels: int | None = None, overwrite: bool = False,
                       levels: Sequence[Level] | None = None, image_label: Mapping[str, Any] | None = None,
                       source_image: str = "../../",
                       storage_options: Mapping[str, Any] | None = None) -> ImageSink:
    """Create ``<labels_url>/<name>``: a labels multiscale inside an NGFF ``labels`` group.

    ``labels_url`` is normally ``<image>/labels``; a segmentation run whose image lives in
    another store writes its own ``labels`` group and points ``source_image`` at that image.
    """
    fmt = ome_format(version)
    parent = store.open_group(labels_url, "a", storage_options, zarr_format=zarr_format_for(version))
    sink = create_image(
        store.join(labels_url, name), shape=shape, dtype=dtype, axes=axes, scale=scale, translation=translation,
        chunks=chunks, shards=shards, n_levels=n_levels, version=version, name=name, overwrite=overwrite,
        storage_options=storage_options, levels=levels,
    )
    from ome_zarr.writer import add_metadata, get_metadata, write_label_metadata

    # write_label_metadata appends ``name``; drop an older entry first so it is listed once.
    existing = [n for n in get_metadata(parent).get("labels", []) if n != name]
    group_meta: dict[str, Any] = {"labels": existing}
    if version != "0.4":
        group_meta["version"] = version  # 0.5 wants the version on the labels group too
    add_metadata(parent, group_meta, fmt=fmt)
    meta = {k: v for k, v in dict(image_label or {}).items() if k != "version"}
    meta.setdefault("source", {"image": source_image})
    if n_labels and "colors" not in meta:
        colors = label_colors(n_labels)
        if colors is not None:
            meta["colors"] = colors
    write_label_metadata(parent, name, fmt=fmt, **meta)
    return sink


def write_omero(sink: ImageSink, windows: Sequence[tuple[float, float, float, float]],
                colors: Sequence[str] | None = None) -> None:
    """Write ``omero`` channel metadata; ``windows`` are (min, max, start, end) per channel.

    Called once by the client after statistics are known, so viewers open with sane contrast.
    """
    from ome_zarr.writer import add_metadata

    n = len(windows)
    default_colors = ["FFFFFF"] if n == 1 else ["FF0000", "00FF00", "0000FF", "FF00FF", "00FFFF", "FFFF00"]
    names = sink.channel_names or tuple(f"channel {i}" for i in range(n))
    channels = []
    for i, (lo, hi, start, end) in enumerate(windows):
        channels.append({
            "label": str(names[i]) if i < len(names) else f"channel {i}",
            "color": (colors[i] if colors else default_colors[i % len(default_colors)]),
            "active": True,
            "coefficient": 1.0,
            "family": "linear",
            "inverted": False,
            "window": {"min": float(lo), "max": float(hi), "start": float(start), "end": float(end)},
        })
    omero: dict[str, Any] = {"channels": channels, "rdefs": {"model": "color" if n > 1 else "greyscale"}}
    if sink.version == "0.4":
        omero["version"] = "0.4"
    group = store.open_group(sink.url, "a", sink.storage_options)
    add_metadata(group, {"omero": omero}, fmt=ome_format(sink.version))

