"""Tissue detection: a low-resolution mask of where a slide holds tissue, and the tiles it keeps.

The mask is computed once per image on a coarse pyramid level (about
:data:`MASK_PIXEL_UM` per pixel, at most :data:`MAX_MASK_PIXELS`), by :mod:`kernels.tissue`,
and written as the labels image ``labels/tissue`` (1 = tissue) of the output, so napari shows
it over the image. Tiled passes given it never read the glass tiles at full resolution
(:meth:`pipeline.engine.plan.TilePlan.foreground_ids`); their output there stays empty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.errors import InputError, OptionError
from pipeline.io import store
from pipeline.io.read import ImageSource, open_image
from pipeline.io.slide import RGB
from pipeline.io.write import create_label_image

log = logging.getLogger(__name__)

MASK_PIXEL_UM = 8.0  # about a 1.25x objective: tissue is obvious, a 100k-pixel slide is ~6k pixels across
MAX_MASK_PIXELS = 2**24
ASSUMED_PIXEL_UM = 0.5  # level 0 of a slide that records no pixel size (a 20x scan)
MICROMETRE = ("micrometer", "micrometre", "µm", "um")
TISSUE = "tissue"


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask (``(y, x)`` bool) at one level's grid, and how it was made."""

    mask: np.ndarray
    level: int
    scale: tuple[float, float]  # physical pixel size (y, x) of the mask, the image's units
    translation: tuple[float, float]
    threshold: float
    brightfield: bool
    unit: str | None = None

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())

    def describe(self) -> str:
        kind = "optical density" if self.brightfield else "intensity"
        return (f"tissue covers {100 * self.fraction:.1f}% of the image (level {self.level}, "
                f"{self.mask.shape[0]} x {self.mask.shape[1]} px, {kind} > {self.threshold:.3g})")


def _mask_level(source: ImageSource, spatial: list[int], micrometres_per_unit: float) -> int:
    """The finest level at least :data:`MASK_PIXEL_UM` per pixel that fits the budget (else the
    coarsest level that fits)."""
    fits = [k for k, lv in enumerate(source.levels) if np.prod([lv.shape[i] for i in spatial]) <= MAX_MASK_PIXELS]
    if not fits:
        raise InputError(f"'{source.url}' has no pyramid level of at most {MAX_MASK_PIXELS} pixels to detect tissue "
                         "on; build one first (`tilewise convert IN OUT.ome.zarr` writes a pyramid).")
    coarse_enough = [k for k in fits if min(source.spatial_scale(k)) * micrometres_per_unit >= MASK_PIXEL_UM]
    return coarse_enough[0] if coarse_enough else fits[-1]


def detect_tissue(source: ImageSource) -> TissueMask:
    """The tissue of a 2D image (``y, x`` with or without channels), from one coarse level."""
    from kernels.tissue import tissue_mask, tissue_signal
    from pipeline.engine.stats import Normalisation

    dims = source.dims
    spatial = [i for i, d in enumerate(dims) if d in source.spatial_dims]
    if len(spatial) != 2 or any(d not in ("c", *source.spatial_dims) for d in dims):
        raise InputError(f"'{source.url}' has axes {dims}: tissue detection is for 2D slides (c, y, x or y, x).")
    unit = source.spatial_unit
    if unit in MICROMETRE:
        per_unit = 1.0
    else:  # no physical size: lengths in pixels; assume a 20x scan so the mask's sizes mean something
        per_unit = ASSUMED_PIXEL_UM / min(source.spatial_scale(0))
        log.warning("'%s' records no pixel size in micrometres; tissue detection assumes %.2g um per pixel at "
                    "level 0", source.url, ASSUMED_PIXEL_UM)
    level = _mask_level(source, spatial, per_unit)
    image = source.read(tuple(slice(None) for _ in dims), level)
    image = image if "c" in dims else image[None]
    brightfield = source.n_channels == 3 and (source.channel_names == RGB or source.dtype == np.uint8)
    if brightfield:  # the glass: the brightest pixels of each channel
        white = tuple(float(w) for w in np.percentile(image.reshape(3, -1), 99.5, axis=1))
        signal = tissue_signal(image, brightfield=True, white=white)
    else:
        norm = Normalisation.of(source)
        signal = tissue_signal(image, brightfield=False, low_high=(norm.low, norm.high))
    scale = source.spatial_scale(level)
    mask, threshold = tissue_mask(signal, tuple(s * per_unit for s in scale), brightfield=brightfield)
    lv = source.level(level)
    translation = tuple(float(lv.translation[i]) for i in spatial)
    return TissueMask(mask, level, (float(scale[0]), float(scale[1])), translation, threshold, brightfield,
                      unit or None)


def write_tissue(output_url: str, tissue: TissueMask, client: Any, *, version: str = "0.5",
                 storage_options: dict | None = None) -> str:
    """``OUT/labels/tissue``: the mask as a labels image (1 = tissue) on its own coarse grid, with
    as many levels as the output's image (NGFF readers and ome-zarr-models expect that) built
    by mode downsampling."""
    from pipeline.engine.pyramid import finalize_image
    from pipeline.io.ngff import default_axes

    try:
        n_levels = len(open_image(output_url, storage_options).levels)
    except InputError:  # no image at the output's root (--image link): the mask's own pyramid
        n_levels = None
    sink = create_label_image(store.join(output_url, "labels"), TISSUE, shape=tissue.mask.shape,
                              axes=default_axes("yx", tissue.unit), scale=tissue.scale,
                              translation=tissue.translation, chunks=[min(1024, n) for n in tissue.mask.shape],
                              n_levels=n_levels, version=version, dtype=np.uint8, n_labels=1, overwrite=True,
                              storage_options=storage_options)
    sink.write(tuple(slice(0, n) for n in tissue.mask.shape), tissue.mask.astype(np.uint8))
    finalize_image(sink, client, labels=True, progress=False)
    return sink.url


def read_mask(url: str, storage_options: dict | None = None) -> np.ndarray:
    """A foreground mask (any labels or image; nonzero = keep) read whole from its level 0,
    which must be small (a mask is low-resolution by design)."""
    mask = open_image(url, storage_options)
    if np.prod(mask.shape) > MAX_MASK_PIXELS:
        raise InputError(f"'{url}' has {int(np.prod(mask.shape))} pixels; a foreground mask must be low-resolution "
                         f"(at most {MAX_MASK_PIXELS}): use a coarse level or `--tissue`.")
    data = mask.read(tuple(slice(None) for _ in mask.dims))
    if "c" in mask.dims:
        data = data.any(axis=mask.dims.index("c"))
    return np.asarray(data) != 0


def foreground_tiles(plan: Any, batch_size: int, mask: np.ndarray) -> list[int]:
    """Global tile ids (every index of the batch axes) whose core overlaps the mask."""
    spatial = plan.foreground_ids(mask)
    return [b * len(plan) + t for b in range(batch_size) for t in spatial]


def foreground_option(tissue: bool, mask: str | None) -> str | None:
    """What the run records (and a resume must repeat): ``"tissue"``, a mask URL, or None."""
    if tissue and mask:
        raise OptionError("--tissue detects a mask and --mask reads one: give one of them.")
    return TISSUE if tissue else mask


def select_tiles(setup: Any, output_url: str, foreground: str | None, client: Any, *,
                 storage_options: dict | None = None) -> list[int] | None:
    """The global ids of the tiles to compute (None: all). ``foreground`` ``"tissue"`` detects
    the tissue once and writes ``OUT/labels/tissue`` (a resumed run reads it back); a URL reads
    that mask. The share of tiles left out is logged."""
    if foreground is None:
        return None
    if foreground == TISSUE:
        written = store.join(output_url, "labels", TISSUE)
        if store.exists(written, storage_options):
            mask = read_mask(written, storage_options)
        else:
            found = detect_tissue(setup.source)
            log.info("%s", found.describe())
            write_tissue(output_url, found, client, version=setup.ngff, storage_options=storage_options)
            mask = found.mask
    else:
        mask = read_mask(foreground, storage_options)
    batch = int(np.prod(setup.batch_shape, dtype=np.int64))
    kept = foreground_tiles(setup.plan, batch, mask)
    total = len(setup.space)
    log.info("%d of %d tiles lie outside the %s and are skipped (%.1f%%)", total - len(kept), total,
             "tissue" if foreground == TISSUE else "mask", 100 * (total - len(kept)) / max(total, 1))
    return kept
