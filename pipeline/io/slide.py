"""Pyramidal TIFF-family slides (SVS, NDPI, generic tiled TIFF, OME-TIFF, ...), read lazily.

Which library and why: **tiffslide** (pure Python, on tifffile) for what differs between vendors
(which pages are the pyramid, the pixel size in Aperio / Hamamatsu / Leica / Ventana / Philips /
generic resolution tags) and **tifffile's zarr store** (``TiffSlide.zarr_group``) for the
pixels, so a region read decodes only the TIFF tiles it touches: memory is the region, never a
level. OpenSlide (a C library, via openslide-bin) reads more formats (MIRAX, VMS) but needs a
native library on every worker and decodes through its own cache; tiffslide installs from a
pure wheel, reads fsspec URLs (S3) and gives zarr arrays the engine already reads.

A level's array is in the TIFF's own axis order (``YXS`` for RGB); :class:`SlideLayout` says
how to reorder it into NGFF order (``c, y, x``: RGB samples become channels).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Mapping

import numpy as np

from pipeline.core.errors import InputError
from pipeline.io.ngff import CHANNEL, SPACE, TIME, Axis, Level

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".btf", ".tf8", ".scn", ".bif", ".qptiff")
# tifffile's axis letters -> NGFF axis names; S (samples: RGB) is a channel axis like C
AXIS_NAMES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}
NGFF_ORDER = "tczyx"
RGB = ("R", "G", "B")
RGB_COLOURS = ("FF0000", "00FF00", "0000FF")


def is_slide_path(url: str) -> bool:
    """Whether ``url`` names a TIFF-family file (by suffix; ``.ome.tif`` included)."""
    return PurePosixPath(url.split("?")[0].rstrip("/")).suffix.lower() in SLIDE_SUFFIXES


@dataclass(frozen=True)
class SlideLayout:
    """What a slide file is, in the terms an NGFF image uses: its axes, its levels (paths are
    the zarr group's level names), channel names, and the permutation from each level array's
    TIFF order to NGFF order."""

    axes: tuple[Axis, ...]
    levels: tuple[Level, ...]
    channel_names: tuple[str, ...] | None
    order: tuple[int, ...]  # NGFF axis i is TIFF axis order[i]
    vendor: str
    pixel_size: tuple[float, float] | None  # (y, x) in micrometres at level 0, None when unknown


@functools.lru_cache(maxsize=16)
def _open(url: str, options: tuple) -> Any:
    """One TiffSlide per file per process (parsing the TIFF is not free); thread-safe reads."""
    import tiffslide

    try:
        return tiffslide.TiffSlide(url, storage_options=dict(options) or None)
    except FileNotFoundError:
        raise InputError(f"No slide at '{url}': the file does not exist. Check the path or URL.") from None
    except Exception as exc:  # tifffile's and tiffslide's many parse errors
        raise InputError(f"'{url}' cannot be read as a TIFF slide ({type(exc).__name__}: {str(exc)[:200]}); "
                         "is it a TIFF-family file (SVS, NDPI, tiled TIFF, OME-TIFF)?") from None


def _key(options: Mapping[str, Any] | None) -> tuple:
    return tuple(sorted((options or {}).items()))


def level_array(url: str, path: str, options: Mapping[str, Any] | None = None) -> Any:
    """The zarr array of one level, in the TIFF's axis order, opened once per process."""
    return _open(url, _key(options)).zarr_group[path]


def _ome_pixel_size(tif: Any) -> tuple[float, float] | None:
    """PhysicalSizeY/X (micrometres) of an OME-TIFF's first image, which tiffslide leaves out."""
    if not tif.is_ome:
        return None
    import tifffile

    try:
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
        units = {"µm": 1.0, "um": 1.0, "micrometer": 1.0, "nm": 1e-3, "mm": 1e3}
        y, x = (float(pixels[f"PhysicalSize{a}"]) * units.get(pixels.get(f"PhysicalSize{a}Unit", "µm"), 1.0)
                for a in "YX")
        return y, x
    except (KeyError, TypeError, ValueError):
        return None


def slide_layout(url: str, options: Mapping[str, Any] | None = None) -> SlideLayout:
    """Open a slide's metadata: levels, pixel size, axes (no pixels are read)."""
    try:
        return _layout(url, _open(url, _key(options)))
    except (NotImplementedError, KeyError, ValueError, TypeError) as exc:  # layouts tiffslide does not read
        raise InputError(f"'{url}' is a TIFF that tilewise cannot read as a slide ({type(exc).__name__}: "
                         f"{str(exc)[:160]}); convert it with `tilewise convert IN OUT.ome.zarr --axes ...`.") from None


def _layout(url: str, slide: Any) -> SlideLayout:
    props = slide.properties
    tif_axes = str(slide.ts_tifffile.series[0].axes)
    unknown = [a for a in tif_axes if a not in AXIS_NAMES]
    names = [AXIS_NAMES.get(a, a) for a in tif_axes]
    if unknown or len(set(names)) != len(names):
        raise InputError(f"'{url}' has TIFF axes '{tif_axes}', which tilewise cannot map to NGFF axes; convert it "
                         "with `tilewise convert IN OUT.ome.zarr --axes ...` naming them.")
    order = tuple(sorted(range(len(names)), key=lambda i: NGFF_ORDER.index(names[i])))
    ngff_names = [names[i] for i in order]
    mpp = (props.get("tiffslide.mpp-y"), props.get("tiffslide.mpp-x"))
    pixel = (float(mpp[0]), float(mpp[1])) if None not in mpp else _ome_pixel_size(slide.ts_tifffile)
    if pixel is None:
        log.warning("'%s' records no pixel size: lengths (diameters, scales) are in pixels", url)
    unit = "micrometer" if pixel else None
    axes = tuple(Axis(n, TIME if n == "t" else CHANNEL if n == "c" else SPACE, None if n in "tc" else unit)
                 for n in ngff_names)
    group = slide.zarr_group
    paths = sorted((k for k, _ in group.arrays()), key=int)
    base = None
    levels = []
    for path in paths:
        arr = group[path]
        shape = tuple(int(arr.shape[i]) for i in order)
        chunks = tuple(min(int(arr.chunks[i]), s) for i, s in zip(order, shape))
        base = base or shape
        # pixel size grows with the level's downsampling; centres shift by half the growth
        scale, translation = [], []
        for name, n0, n in zip(ngff_names, base, shape):
            step = n0 / n if name in "zyx" else 1.0
            size = (pixel[0] if name == "y" else pixel[1] if name == "x" else 1.0) if pixel else 1.0
            scale.append(round(size * step, 12))
            translation.append(round(size * (step - 1) / 2, 12))
        levels.append(Level(path, shape, chunks, None, str(arr.dtype), tuple(scale), tuple(translation)))
    n_channels = levels[0].shape[ngff_names.index("c")] if "c" in ngff_names else 1
    channel_names = RGB if "S" in tif_axes and n_channels == 3 else None
    return SlideLayout(axes, tuple(levels), channel_names, order, str(props.get("tiffslide.vendor") or ""),
                       pixel)


def read_level(url: str, path: str, order: tuple[int, ...], region: tuple[slice, ...],
               options: Mapping[str, Any] | None = None) -> np.ndarray:
    """``region`` (NGFF axis order) of one level: the TIFF tiles it touches, decoded, reordered."""
    tif_region = [slice(None)] * len(order)
    for i, sl in zip(order, region):
        tif_region[i] = sl
    data = np.asarray(level_array(url, path, options)[tuple(tif_region)])
    return np.transpose(data, order)  # NGFF axis i is TIFF axis order[i]
