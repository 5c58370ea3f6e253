"""Instance segmentation kernels: they map an image block to local instance labels.

A labels kernel returns ``(N, 1, *spatial)`` integer labels (0 = background, ids local to the
block); the engine makes them global (``pipeline.stitch``). Its ``halo`` must cover the largest
object it should see whole, beyond its receptive field.

- ``segment-classical``: Gaussian smoothing, a global threshold (computed once from the image's
  statistics, never per tile, so tiles agree), distance-transform seeded watershed; distances
  use the physical pixel size, so anisotropic stacks are handled.
- ``segment-unet``: a 3-class U-Net (background / interior / boundary, see
  ``kernels.segment_train``) whose interior probability seeds a watershed.
- ``relabel``: takes a labels image and renumbers it per block: the stitching machinery on its
  own (tests, benchmarks, re-stitching labels made elsewhere).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from kernels.base import register
from kernels.modelfile import UNetModelKernel


def seeded_watershed(elevation: np.ndarray, seeds: np.ndarray, mask: np.ndarray, min_size: int) -> np.ndarray:
    """Watershed of ``elevation`` from labelled ``seeds`` inside ``mask``; objects smaller than
    ``min_size`` voxels are dropped. Returns int32 labels."""
    from skimage.segmentation import watershed

    labels = watershed(elevation, seeds, mask=mask)
    if min_size > 1 and labels.max() > 0:
        counts = np.bincount(labels.ravel())
        small = counts < min_size
        small[0] = False
        labels[small[labels]] = 0
    return labels.astype(np.int32)


def distance_seeds(mask: np.ndarray, sampling: Sequence[float], min_distance: float, smooth: float) -> tuple[np.ndarray, np.ndarray]:
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


@register("segment-classical")
class ClassicalSegmentKernel:
    """Smooth, threshold, distance-transform watershed; no training.

    Parameters (pixel sizes in physical units, so 3D anisotropy comes from the NGFF scale)
    ----------
    threshold : foreground threshold in normalised units (the engine's global p1..p99.9 map to
        0..1); ``pipeline.segment`` computes it once with Otsu on a coarse level.
    scale : physical pixel size per spatial axis.
    sigma : smoothing in physical units.
    min_distance : closest two seeds (two nuclei centres) may be, physical units.
    min_size : smallest object kept, in voxels.
    halo : per axis in pixels; should exceed the largest object's diameter.
    """

    name = "segment-classical"
    normalize = True
    labels = True
    max_batch = 8
    pad_mode = "constant"  # mirrored objects at the edge would tie with their originals

    def __init__(self, threshold: float, scale: Sequence[float], sigma: float = 1.0, min_distance: float = 4.0,
                 min_size: int = 16, halo: Sequence[int] | None = None, channels: int = 1):
        self.threshold = float(threshold)
        self.scale = tuple(float(s) for s in scale)
        self.ndim = len(self.scale)
        self.sigma, self.min_distance, self.min_size = float(sigma), float(min_distance), int(min_size)
        self.in_channels, self.out_channels = int(channels), 1
        smooth_reach = [math.ceil(4 * self.sigma / s) for s in self.scale]
        self.halo = tuple(int(h) for h in halo) if halo else tuple(max(32, 2 * r) for r in smooth_reach)

    def load(self, device: str) -> None:
        """Nothing to load."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        from scipy import ndimage

        out = np.zeros((batch.shape[0], 1) + batch.shape[2:], np.int32)
        for n, block in enumerate(batch):
            image = block.mean(axis=0) if block.shape[0] > 1 else block[0]
            smooth = ndimage.gaussian_filter(image.astype(np.float32), [self.sigma / s for s in self.scale])
            mask = smooth > self.threshold
            if not mask.any():
                continue
            dist, seeds = distance_seeds(mask, self.scale, self.min_distance, smooth=self.sigma)
            # the watershed breaks exact ties by flooding order, which depends on the whole
            # block; a faint intensity term makes ties rare, so tiles agree with the whole image
            out[n, 0] = seeded_watershed(-(dist + 1e-3 * smooth), seeds, mask, self.min_size)
        return out


@register("relabel")
class RelabelKernel:
    """Labels in, labels out, renumbered per block: stitching on its own."""

    name = "relabel"
    normalize = False
    native_input = True  # keep the stored integer ids (float32 would round ids above 2^24)
    labels = True
    measures = False  # intensity of a labels image means nothing
    max_batch = 64
    pad_mode = "constant"  # background past the edge

    def __init__(self, ndim: int, halo: Sequence[int] | int = 8):
        self.ndim = int(ndim)
        self.halo = tuple([int(halo)] * self.ndim) if isinstance(halo, int) else tuple(int(h) for h in halo)
        self.in_channels = self.out_channels = 1

    def load(self, device: str) -> None:
        """Nothing to load."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty(batch.shape, np.int64)
        for n in range(batch.shape[0]):
            _, inverse = np.unique(batch[n], return_inverse=True)
            out[n] = inverse.reshape(batch[n].shape)
            if batch[n].min() > 0:  # no background in this block: 0 is an object id, shift up
                out[n] += 1
        return out


@register("segment-unet")
class UNetSegmentKernel(UNetModelKernel):
    """A trained 3-class U-Net (``tilewise train segment``) + seeded watershed on its output.

    The halo is the network's receptive field, and at least ``object_halo`` pixels so whole
    objects are seen by every tile they touch.
    """

    name = "segment-unet"
    normalize = True
    labels = True
    # the network saw only image content in training: a flat (zero) margin past the volume edge
    # reads as foreground to it, so it sees a mirrored edge, and labels only the valid region
    pad_mode = "reflect"
    takes_valid = True

    def __init__(self, model: str, sha256: str = "", min_size: int = 12, object_halo: int = 32):
        super().__init__(model, sha256)
        if self.card.task != "segment":
            raise ValueError(f"'{model}' is a {self.card.task} model, not a segmentation model")
        self.min_size = int(min_size)
        self.halo = tuple(max(h, -(-object_halo // f) * f) for h, f in zip(self.halo, self.align))

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        logits = self.predict(batch)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def __call__(self, batch: np.ndarray, valid: Sequence[tuple[slice, ...]] | None = None) -> np.ndarray:
        """Instance labels of each block; with ``valid`` (the in-volume region of each block),
        the padding is background, so no object grows into (or is mirrored from) it."""
        from kernels.segment_train import BACKGROUND, instances_from_probabilities

        prob = self.probabilities(batch)
        if valid is not None:
            for p, region in zip(prob, valid):
                outside = np.ones(p.shape[1:], bool)
                outside[tuple(region)] = False
                p[:, outside] = 0.0
                p[BACKGROUND, outside] = 1.0
        return np.stack([instances_from_probabilities(p, self.min_size)[None] for p in prob])
