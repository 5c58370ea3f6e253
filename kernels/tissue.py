"""Where the tissue is, on a low-resolution view of a whole slide (most of which is glass).

Brightfield (RGB transmitted light): the optical density ``-log(I / glass)`` averaged over the
channels, lightly smoothed, thresholded half-way between the background (1st percentile) and
Otsu's threshold (:func:`kernels.brightfield.otsu_gap`), and at least :data:`MIN_OD` (glass
noise and dust stay out); fluorescence or any other image: the mean normalised intensity,
thresholded the same way. Then the mask is
cleaned in physical units: closed over :data:`CLOSE_UM`, holes smaller than :data:`HOLE_UM2`
filled, specks smaller than :data:`SPECK_UM2` dropped. The same recipe as TIAToolbox's Otsu
and morphological maskers and HistoQC, sized in micrometres so it holds at any magnification.
"""

from __future__ import annotations

import numpy as np

from kernels.brightfield import otsu_gap

MIN_OD = 0.04  # mean optical density below which a pixel is glass, whatever Otsu says
CLOSE_UM = 20.0  # gaps this wide inside tissue (between cells, tears) are bridged
HOLE_UM2 = 250.0**2  # holes smaller than this are tissue (vessels, fat, artefacts)
SPECK_UM2 = 25.0**2  # tissue pieces smaller than this (a few cells) are dust or debris
GENEROSITY = 0.5  # the threshold is this share of Otsu's: faint tissue (thin edges, pale stroma) is kept
SMOOTH_UM = 8.0


def tissue_signal(image: np.ndarray, *, brightfield: bool, white: tuple[float, ...] | None = None,
                  low_high: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> np.ndarray:
    """``(C, y, x)`` input units -> ``(y, x)`` float32, high on tissue: the mean optical density
    (``white``: glass brightness per channel, default the dtype's maximum) or, for fluorescence,
    the mean intensity mapped by ``low_high`` (per-channel global percentiles) to 0..1."""
    data = image.astype(np.float32)
    shape = (-1,) + (1,) * (data.ndim - 1)
    if brightfield:
        glass = np.asarray(white if white is not None else _dtype_top(image.dtype, image.shape[0]), np.float32)
        return (-np.log(np.clip((data + 1.0) / (glass.reshape(shape) + 1.0), 1e-4, 1.0))).mean(axis=0)
    if low_high is not None:
        lo = np.asarray(low_high[0], np.float32).reshape(shape)
        hi = np.maximum(np.asarray(low_high[1], np.float32).reshape(shape), lo + 1e-6)
        data = (data - lo) / (hi - lo)
    return data.mean(axis=0)


def _dtype_top(dtype: np.dtype, n: int) -> tuple[float, ...]:
    top = float(np.iinfo(dtype).max) if np.dtype(dtype).kind in "iu" else 1.0
    return (top,) * n


def tissue_mask(signal: np.ndarray, pixel_um: tuple[float, float], *, brightfield: bool,
                threshold: float | None = None) -> tuple[np.ndarray, float]:
    """``(mask, threshold)``: the tissue of a low-resolution ``signal`` (:func:`tissue_signal`)
    with pixels ``pixel_um`` (y, x) micrometres, cleaned in physical units (module docstring)."""
    from scipy import ndimage

    area = float(pixel_um[0] * pixel_um[1])
    smooth = ndimage.gaussian_filter(signal.astype(np.float32), [SMOOTH_UM / 2 / p for p in pixel_um])
    if threshold is None:
        # Otsu splits glass from typical tissue; a missed fringe loses nuclei for good, a kept
        # patch of glass costs one tile's compute, so the mask errs on the generous side
        low = float(np.percentile(smooth, 1))
        threshold = low + GENEROSITY * (otsu_gap(smooth) - low) if smooth.max() > smooth.min() else float(smooth.max())
        if brightfield:
            threshold = max(threshold, MIN_OD)
    mask = smooth > threshold
    radius = [max(0, int(round(CLOSE_UM / 2 / p))) for p in pixel_um]
    if max(radius) > 0:
        structure = np.ones([2 * r + 1 for r in radius], bool)
        # closing without a frame would open the mask at the image edge: pad, close, crop
        padded = np.pad(mask, [(r, r) for r in radius])
        mask = ndimage.binary_closing(padded, structure)[tuple(slice(r, r + n) for r, n in zip(radius, mask.shape))]
    mask = ~_drop_small(~mask, HOLE_UM2 / area)  # small holes filled
    return _drop_small(mask, SPECK_UM2 / area), float(threshold)


def _drop_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """``mask`` without its connected pieces smaller than ``min_pixels``. By hand (ndimage.label
    and a bincount) because scikit-image renamed the size argument of ``remove_small_objects``
    and ``remove_small_holes`` in 0.26 and the project supports 0.22 on."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]
