"""Macenko stain normalisation of H&E images (Macenko et al., ISBI 2009).

Slides from different labs, scanners and staining batches differ in colour; a model or a
threshold tuned on one drifts on another. Macenko's method finds an image's two stain vectors
(haematoxylin, eosin) in optical-density space, and each pixel's stain concentrations; the
image is then re-coloured with a reference's stain vectors and concentration range.

The estimate (:func:`macenko_stains`) is made **once per slide** from its global sample (the
pipeline's coarse-level statistics), never per tile, so every tile is mapped by the same
matrices and the tiled result equals the untiled one exactly (the kernel is per-pixel, halo 0).
scikit-image has the deconvolution (``rgb2hed``) with fixed stain vectors but no estimate of an
image's own, so that part is written here (about 20 lines of linear algebra).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from kernels.contract import BatchContext, Kernel, KernelParams, KernelTraits

# Macenko's reference (the values of the widely used implementations): H and E unit vectors in
# optical density (R, G, B), and the 99th percentile of their concentrations
REFERENCE_STAINS = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
REFERENCE_MAX = (1.9705, 1.0308)
BACKGROUND_OD = 0.15  # pixels whose optical density vector is shorter are glass, left out of the fit
# (the length, not every channel as in the original: pale eosin absorbs little red and blue, and
# requiring all three channels left pure-eosin pixels out, biasing the eosin vector towards H)
ANGLE_PERCENTILE = 1.0  # robust extremes of the stain angles


def optical_density(rgb: np.ndarray, white: float) -> np.ndarray:
    """``(3, ...)`` transmitted light -> optical density ``-log(I / white)`` (>= 0)."""
    return -np.log(np.clip((rgb.astype(np.float64) + 1.0) / (white + 1.0), 1e-6, 1.0))


def macenko_stains(rgb: np.ndarray, white: float = 240.0) -> tuple[np.ndarray, np.ndarray]:
    """``(stains (3, 2), max_concentrations (2,))`` of an image from a ``(3, n)`` RGB sample:
    the plane of the two largest eigenvectors of the tissue's optical densities, the extreme
    angles in it (1st and 99th percentile) as the two stains, haematoxylin first (more red
    absorption), and the 99th percentile of each stain's concentration."""
    od = optical_density(rgb.reshape(3, -1), white)
    tissue = od[:, np.linalg.norm(od, axis=0) > BACKGROUND_OD]
    if tissue.shape[1] < 100:
        raise ValueError(f"only {tissue.shape[1]} stained pixels: too little tissue to estimate stain vectors")
    _, vectors = np.linalg.eigh(np.cov(tissue))
    plane = vectors[:, 1:3]  # the two largest eigenvalues
    plane = plane * np.sign(plane[0:1, :] + 1e-12)  # point both into positive OD (a sign convention)
    projected = plane.T @ tissue
    angles = np.arctan2(projected[1], projected[0])
    lo, hi = np.percentile(angles, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
    stains = stains / np.linalg.norm(stains, axis=0, keepdims=True)
    concentrations = np.linalg.lstsq(stains, tissue, rcond=None)[0]
    return stains, np.percentile(concentrations, 99, axis=1)


class StainNormalizeKernel(Kernel):
    """Re-colour RGB tiles from the slide's stains to the reference's (per pixel; halo 0).

    Parameters
    ----------
    stains, max_concentrations : this slide's (3 x 2 H, E vectors; 99th percentile of each
        concentration), from :func:`macenko_stains` on its global sample.
    reference_stains, reference_max : the target (default: Macenko's reference).
    white : transmitted light through glass, input units (240 for 8-bit scans, as Macenko).
    """

    name = "stain-normalize"

    class Params(KernelParams):
        stains: list[list[float]] = Field(min_length=3, max_length=3)
        max_concentrations: list[float] = Field(min_length=2, max_length=2)
        reference_stains: list[list[float]] = Field([list(r) for r in REFERENCE_STAINS], min_length=3, max_length=3)
        reference_max: list[float] = Field(list(REFERENCE_MAX), min_length=2, max_length=2)
        white: float = Field(240.0, gt=0)

    def __init__(self, params: Params):
        super().__init__(params)
        self.stains = np.asarray(params.stains, np.float64)
        self.reference = np.asarray(params.reference_stains, np.float64)
        self.scale = np.asarray(params.reference_max, np.float64) / np.maximum(params.max_concentrations, 1e-6)
        self.unmix = np.linalg.pinv(self.stains)  # (2, 3): least-squares concentrations
        self.traits = KernelTraits(ndim=2, in_channels=3, out_channels=3, halo=(0, 0), input="raw", max_batch=16)

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        white = self.params.white
        out = np.empty(batch.shape, np.float32)
        for n, block in enumerate(batch):
            od = optical_density(block, white).reshape(3, -1)
            concentrations = (self.unmix @ od) * self.scale[:, None]
            rgb = white * np.exp(-(self.reference @ concentrations))
            out[n] = np.clip(rgb, 0, 255).reshape(block.shape)
        return out
