"""From maps to instances: the watershed steps the segmentation kernels and the segmentation
training share (the 3-class targets are made here, and undone here at inference).

Kept apart from ``kernels.segment`` (the kernels) and ``kernels.segment_train`` (the training
loop) so that neither imports the other.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def rank_ids(labels: np.ndarray) -> np.ndarray:
    """Each value's rank among the block's distinct values (int64, same shape): what
    ``np.unique(labels, return_inverse=True)`` gives. When the ids span a range no wider than a
    few times the block, a lookup table over that range (O(n)) replaces the sort (O(n log n)):
    ~5x faster on a 40 x 72 x 72 block of a thousand objects."""
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(labels.shape, np.int64)
    low, high = int(flat.min()), int(flat.max())
    if labels.dtype.kind in "iu" and high - low <= 4 * flat.size:
        present = np.zeros(high - low + 1, bool)
        shifted = flat - labels.dtype.type(low)
        present[shifted] = True
        lut = np.cumsum(present, dtype=np.int64) - 1
        return lut[shifted].reshape(labels.shape)
    return np.unique(flat, return_inverse=True)[1].reshape(labels.shape)


def seeded_watershed(elevation: np.ndarray, seeds: np.ndarray, mask: np.ndarray, min_size: int) -> np.ndarray:
    """Watershed of ``elevation`` from labelled ``seeds`` inside ``mask``; objects smaller than
    ``min_size`` voxels are dropped. Returns int32 labels."""
    from skimage.segmentation import watershed

    return drop_small(watershed(elevation, seeds, mask=mask), min_size)


def drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` (int32; in place when they are int32 already) with objects of fewer than
    ``min_size`` voxels set to 0."""
    labels = labels.astype(np.int32, copy=False)
    if min_size > 1 and labels.max() > 0:
        counts = np.bincount(labels.ravel())
        small = counts < min_size
        small[0] = False
        labels[small[labels]] = 0
    return labels


def grow_and_trim(cores: np.ndarray, signal: np.ndarray, within: np.ndarray, *, background: float,
                  keep_above: float, min_size: int, tie_break: np.ndarray | None = None) -> np.ndarray:
    """Objects grown from their bright ``cores`` (labels) over ``within`` along the ``signal``,
    then each trimmed to the voxels above ``background + keep_above * (its peak - background)``.

    One global threshold serves bright and dim nuclei badly: where it splits the bright ones
    from their neighbours it cuts the dim ones to their centres, or misses them. The cores fix
    how many objects there are and where; growing down a lower level gives each the extent of
    its own edge (a dim nucleus its rim, a bright one's halo of blur trimmed by its own peak).
    ``tie_break`` (small, e.g. a distance inside the cores) orders a flat plateau, such as a
    saturated region, that the flooding order would otherwise split by block position."""
    from scipy import ndimage

    elevation = -signal if tie_break is None else -(signal + tie_break)
    labels = seeded_watershed(elevation, cores, within | (cores > 0), 0)
    n = int(labels.max())
    if n:
        peaks = np.asarray(ndimage.maximum(signal, labels, np.arange(1, n + 1)), np.float64)
        cut = np.concatenate([[np.inf], background + keep_above * (peaks - background)])
        labels[signal <= cut[labels]] = 0
    return drop_small(labels, min_size)


def distance_seeds(mask: np.ndarray, sampling: Sequence[float], min_distance: float, smooth: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(distance transform, labelled seeds at its local maxima at least ``min_distance`` apart
    in physical units). Smoothing the distance merges the plateaus of elongated objects."""
    from scipy import ndimage
    from skimage.feature import peak_local_max

    dist = ndimage.distance_transform_edt(mask, sampling=sampling)
    if smooth > 0:
        dist = ndimage.gaussian_filter(dist, [smooth / s for s in sampling])
    footprint_radius = [max(1, int(round(min_distance / s))) for s in sampling]
    footprint = np.ones([2 * r + 1 for r in footprint_radius], bool)
    peaks = peak_local_max(dist, footprint=footprint, labels=mask.astype(np.int32), exclude_border=False)
    seeds = np.zeros(mask.shape, np.int32)
    seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return dist, seeds


def three_class(labels: np.ndarray) -> np.ndarray:
    """Instance labels -> uint8 classes: 0 background, 1 interior, 2 boundary (inner rim)."""
    from skimage.segmentation import find_boundaries

    classes = (labels > 0).astype(np.uint8)
    classes[find_boundaries(labels, mode="inner") & (labels > 0)] = BOUNDARY
    return classes


def instances_from_probabilities(prob: np.ndarray, min_size: int = 12, threshold: float = 0.5) -> np.ndarray:
    """``(3, *spatial)`` class probabilities -> int32 instance labels.

    Seeds are the connected interior regions (touching objects are split by the boundary
    class); a watershed on the interior probability grows them over the foreground.
    """
    from scipy import ndimage

    foreground = prob[BACKGROUND] < threshold
    seeds, _ = ndimage.label(prob[INTERIOR] > threshold)
    if seeds.max() == 0:
        return np.zeros(prob.shape[1:], np.int32)
    return seeded_watershed(1.0 - prob[INTERIOR], seeds, foreground | (seeds > 0), min_size)
