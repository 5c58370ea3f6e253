"""How large the objects of an image are: one typical diameter (physical units) and its spread.

Segmentation parameters that are lengths (smoothing, seed distance, smallest object, halo) only
make sense relative to the objects; cellpose made the diameter the first thing a user sets and
then learnt to estimate it. Here it is measured from a foreground mask (the image thresholded
once, globally) or from instance labels (training data), so every tile of an image, and the
model trained on other images, agree on one number.

Pure array code: the engine decides what part of an image is read (``pipeline.engine.stats``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

# a component whose equivalent diameter exceeds its inscribed diameter by more than this is a
# clump of touching objects (or one elongated object): its inscribed diameter is used instead
CLUMP_RATIO = 1.3
# a mask this full has no background to measure objects against (a threshold below the data)
MAX_FOREGROUND = 0.9
MIN_OBJECTS = 3  # fewer objects than this give no scale
# a mask for measuring is smoothed by this fraction of a first estimate, then measured again
SMOOTHING_PER_DIAMETER = 0.1
# how far an estimate may be from the labels' measure before it is called unreliable: about the
# estimates' own error on the benchmark's real images (1-14 %), with room
ESTIMATE_TOLERANCE = 1.25


@dataclass(frozen=True)
class ObjectScale:
    """A typical object diameter (physical units), the 10th..90th percentile range, and how many
    objects it came from."""

    diameter: float
    low: float
    high: float
    n_objects: int
    source: str  # "mask" (estimated from the image), "labels" (measured) or "user"
    unit: str = ""  # of the lengths, for display (e.g. "micrometer")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def given(cls, diameter: float) -> "ObjectScale":
        return cls(float(diameter), float(diameter), float(diameter), 0, "user")

    def describe(self) -> str:
        u = f" {self.unit}" if self.unit else ""
        if self.source == "user":
            return f"{self.diameter:.3g}{u} (given)"
        return (f"{self.diameter:.3g}{u} (10-90%: {self.low:.3g}-{self.high:.3g}, "
                f"{self.n_objects} objects, from the {self.source})")


def equivalent_diameter(volume: np.ndarray | float, ndim: int) -> np.ndarray:
    """Diameter of the disc (2D) or ball (3D) with this area or volume (physical units)."""
    volume = np.asarray(volume, np.float64)
    if ndim == 2:
        return 2.0 * np.sqrt(volume / math.pi)
    return 2.0 * np.cbrt(3.0 * volume / (4.0 * math.pi))


def _weighted_percentiles(values: np.ndarray, weights: np.ndarray, q: Sequence[float]) -> np.ndarray:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return np.interp(np.asarray(q) / 100.0 * cum[-1], cum - weights[order] / 2, values[order])


def _summary(diameters: np.ndarray, source: str, ndim: int) -> ObjectScale | None:
    """Percentiles weighted by object volume: the size of the object a foreground voxel belongs
    to. Fragments (a lobe's extra distance peak, debris) weigh what they cover, not one vote."""
    if diameters.size < MIN_OBJECTS:
        return None
    lo, mid, hi = _weighted_percentiles(diameters, diameters.astype(np.float64) ** ndim, [10, 50, 90])
    return ObjectScale(float(mid), float(lo), float(hi), int(diameters.size), source)


def scale_of_labels(labels: np.ndarray, spacing: Sequence[float]) -> ObjectScale | None:
    """The objects of an instance labels image (e.g. training labels): equivalent diameters."""
    counts = np.bincount(labels.ravel().astype(np.int64))[1:]
    counts = counts[counts > 0]
    return _summary(equivalent_diameter(counts * float(np.prod(spacing)), labels.ndim), "labels", labels.ndim)


def mask_diameters(mask: np.ndarray, spacing: Sequence[float], *, min_voxels: int = 4) -> np.ndarray:
    """One diameter per object of a foreground mask (physical units), touching objects included.

    Each object is a peak of the distance to the background: twice its height is the object's inscribed diameter. Round
    isolated components calibrate how much larger the equivalent diameter is than the inscribed
    one (elongation), so both kinds report the same measure as :func:`scale_of_labels`. Peaks
    closer to the mask's border than their own height are cut objects and left out, unless they
    are most of the mask (a thin window).
    """
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(mask)  # textured nuclei have dark holes, not a second object
    if not mask.any() or mask.mean() > MAX_FOREGROUND:
        return np.zeros(0)  # no objects, or no background between them: nothing to measure
    step = min(spacing)
    dist = ndimage.distance_transform_edt(mask, sampling=spacing)
    # local maxima (plateaus count once); ridge bumps of a lobe add small peaks, which the
    # volume-weighted summary lets weigh only what they cover
    top = (dist == ndimage.maximum_filter(dist, size=3)) & (dist >= step)
    peaks, n = ndimage.label(top, structure=np.ones((3,) * mask.ndim))
    if n == 0:
        return np.zeros(0)
    index = np.arange(1, n + 1)
    height = _inscribed_radius(dist, peaks, index, step)
    centres = np.asarray(ndimage.center_of_mass(np.ones(mask.shape), peaks, index)).reshape(n, mask.ndim)
    keep = _outside_higher_balls(centres * np.asarray(spacing), height)
    centres, height = centres[keep], height[keep]
    room = np.min(np.minimum(centres, np.asarray(mask.shape) - 1 - centres) * np.asarray(spacing), axis=1)
    inner = room >= height
    # in a thin window (a few z slices) most objects touch its border: then keep them all
    weight = height ** mask.ndim
    if inner.sum() >= MIN_OBJECTS and weight[inner].sum() >= 0.5 * weight.sum():
        height = height[inner]
    inscribed = 2.0 * height
    return inscribed * _elongation(mask, dist, spacing, min_voxels)


def _inscribed_radius(dist: np.ndarray, regions: np.ndarray, index: np.ndarray, step: float) -> np.ndarray:
    """Per labelled region, the radius of the largest ball inside the mask. The distance
    transform measures to the nearest background voxel centre, half a voxel past the edge."""
    from scipy import ndimage

    return np.maximum(ndimage.maximum(dist, regions, index) - 0.5 * step, 0.5 * step)


def _outside_higher_balls(points: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: a peak inside the inscribed ball of a higher peak is a bump on
    that object's ridge (a lobe, a rough edge), not an object of its own."""
    from scipy.spatial import cKDTree

    tree = cKDTree(points)
    keep = np.ones(len(points), bool)
    for i in np.argsort(-radius, kind="stable"):
        if keep[i]:
            near = np.asarray(tree.query_ball_point(points[i], radius[i]), int)
            keep[near[radius[near] < radius[i]]] = False
    return keep


def _elongation(mask: np.ndarray, dist: np.ndarray, spacing: Sequence[float], min_voxels: int) -> float:
    """Median equivalent / inscribed diameter of the isolated, roundish components (1 if none)."""
    from scipy import ndimage

    comps, n = ndimage.label(mask)
    index = np.arange(1, n + 1)
    voxels = ndimage.sum_labels(np.ones(mask.shape, np.int64), comps, index)
    inscribed = 2.0 * _inscribed_radius(dist, comps, index, min(spacing))
    ratio = equivalent_diameter(voxels * float(np.prod(spacing)), mask.ndim) / inscribed
    single = (voxels >= min_voxels) & (ratio < CLUMP_RATIO)
    return float(np.median(ratio[single])) if single.sum() >= 3 else 1.0


def estimate_error(measured: float | None, estimated: float | None) -> float | None:
    """``estimated / measured - 1`` (two diameters of one image: its labels' measure and the
    estimate from its pixels) where they are further apart than :data:`ESTIMATE_TOLERANCE`
    allows, else ``None`` (also when either is missing)."""
    if not measured or not estimated:
        return None
    ratio = estimated / measured
    return None if 1 / ESTIMATE_TOLERANCE <= ratio <= ESTIMATE_TOLERANCE else ratio - 1


def scale_of_mask(masks: Sequence[np.ndarray], spacing: Sequence[float]) -> ObjectScale | None:
    """The typical object in one or more foreground masks (windows of one image)."""
    parts = [mask_diameters(m, spacing) for m in masks]
    return _summary(np.concatenate(parts) if parts else np.zeros(0), "mask", len(spacing))


def bimodal_sizes(volumes: np.ndarray, *, ratio: float = 4.0, min_fraction: float = 0.15) -> bool:
    """Whether object volumes fall into two groups ``ratio`` apart in volume, each holding at
    least ``min_fraction`` of the objects: the mark of objects split into fragments."""
    from skimage.filters import threshold_otsu

    v = np.log(np.asarray(volumes, np.float64)[np.asarray(volumes) > 0])
    if v.size < 10 or np.ptp(v) < math.log(ratio):
        return False
    cut = threshold_otsu(v)
    small, large = v[v <= cut], v[v > cut]
    return (min(small.size, large.size) >= min_fraction * v.size
            and float(np.median(large) - np.median(small)) >= math.log(ratio))
