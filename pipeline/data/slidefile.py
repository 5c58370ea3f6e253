"""Write an image as a pyramidal, tiled, JPEG-compressed TIFF slide, the way scanners do.

For tests and benchmarks of slide input (and for users who want a sample slide file): each
level of an OME-Zarr image becomes one TIFF level (level 0 the main image, the others its
SubIFDs, as OME-TIFF and generic pyramidal TIFFs store them; or consecutive pages with an
Aperio description, as SVS does), written with tifffile from a stream of tiles, one row of
tiles read at a time, so memory is a strip, never a level.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from pipeline.core.errors import OptionError
from pipeline.io.read import ImageSource

FLAVOURS = ("generic", "svs", "ome", "ndpi")


def _tiles(source: ImageSource, level: int, tile: int) -> Iterator[np.ndarray]:
    """``(tile, tile, C)`` tiles of one level in row-major order, padded at the right and bottom."""
    c, h, w = source.level(level).shape
    for y in range(0, h, tile):
        strip = source.read((slice(None), slice(y, min(y + tile, h)), slice(None)), level)
        strip = np.moveaxis(strip, 0, -1)
        for x in range(0, w, tile):
            block = strip[:, x:x + tile]
            if block.shape[:2] != (tile, tile):
                block = np.pad(block, [(0, tile - block.shape[0]), (0, tile - block.shape[1]), (0, 0)])
            yield np.ascontiguousarray(block)


def write_slide(source: ImageSource, path: str, *, flavour: str = "generic", tile: int = 256,
                quality: int = 90, max_levels: int | None = None) -> str:
    """Write the RGB (``c, y, x`` uint8) image ``source`` as a pyramidal JPEG TIFF at ``path``.

    ``flavour``: ``generic`` (SubIFDs, resolution tags in centimetres), ``svs`` (Aperio: pages
    with an ``Aperio Image Library`` description carrying ``MPP``) or ``ome`` (OME-XML with the
    physical pixel size) or ``ndpi`` (Hamamatsu: consecutive pages carrying NDPI's private tags
    (format 65420, source lens 65421, offsets from the slide centre 65422/3) and
    ``Make = Hamamatsu``, resolution in centimetres; tifffile cannot write NDPI's own 32-bit TIFF
    with 64-bit offsets, so the file is a BigTIFF that tifffile and tiffslide read as NDPI).
    Pixel size is the source's (micrometres).
    """
    import tifffile

    if flavour not in FLAVOURS:
        raise OptionError(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}.")
    if source.dims != ("c", "y", "x") or source.n_channels != 3 or source.dtype != np.uint8:
        raise OptionError(f"'{source.url}' is not an RGB uint8 image with axes c, y, x (it has {source.dims}, "
                          f"{source.dtype}); slides are written from RGB images.")
    levels = list(range(len(source.levels)))[:max_levels]
    mpp = float(source.spatial_scale(0)[1])
    common = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                  dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True, ome=flavour == "ome") as tw:
        for k in levels:
            c, h, w = source.level(k).shape
            step = source.level(0).shape[2] / w
            extra: dict = {}
            if flavour == "svs":
                extra["description"] = (f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
                                        f"JPEG/RGB Q={quality}|AppMag = 20|MPP = {mpp * step:.6f}")
                extra["subfiletype"] = 0 if k == 0 else 1
            elif flavour == "ndpi":
                extra["extratags"] = [(271, "s", 0, "Hamamatsu", True), (272, "s", 0, "C13210", True),
                                      (65420, "I", 1, 1, True), (65421, "f", 1, 20.0 / step, True),
                                      (65422, "i", 1, 0, True), (65423, "i", 1, 0, True)]
                extra["metadata"] = None  # no tifffile "shaped" description: it would be read before NDPI's tags
            elif k == 0:
                extra["subifds"] = len(levels) - 1
                if flavour == "ome":
                    extra["metadata"] = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp,
                                         "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
            else:
                extra["subfiletype"] = 1
            if flavour != "ome":
                extra.update(resolution=(1e4 / (mpp * step), 1e4 / (mpp * step)), resolutionunit="CENTIMETER")
            if flavour == "ome" and k > 0:
                extra["metadata"] = None
            tw.write(_tiles(source, k, tile), shape=(h, w, 3), **common, **extra)
    return path
