"""Packed nuclei of a chosen size, many touching: for object-scale estimation and scale-robust
segmentation (tests and the tuning half of ``benchmarks.bench_segment``).

Unlike :mod:`pipeline.data.nuclei` (one nucleus per cell, never touching, rendered region by
region for stores larger than memory), this draws a whole small image at once: nuclei on a
jittered lattice one diameter apart, so neighbours touch and overlap a little, with size and
shape variation, internal texture, blur and noise. Ground truth: each voxel belongs to the
nucleus it lies deepest inside.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage


def touching_nuclei(shape: Sequence[int], diameter: float, *, spacing: Sequence[float] | None = None,
                    seed: int = 0, fill: float = 0.8, texture: float = 0.3, noise: float = 0.04,
                    blur_px: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32, labels uint32)`` of ``shape`` pixels holding nuclei of about ``diameter``
    (physical units, pixel size ``spacing``).

    ``fill`` is the fraction of lattice sites holding a nucleus; ``texture`` the strength of
    internal intensity texture (a nucleus must not split on it); ``noise`` additive Gaussian.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    spacing = np.asarray(spacing if spacing is not None else [1.0] * nd, np.float64)
    extent = np.asarray(shape) * spacing
    step = 1.15 * diameter
    sites = np.stack(np.meshgrid(*[np.arange(step / 2, e, step) for e in extent], indexing="ij"), -1).reshape(-1, nd)
    sites = sites[rng.random(len(sites)) < fill]
    sites = sites + rng.uniform(-0.12, 0.12, sites.shape) * diameter
    depth = np.full(shape, np.inf, np.float32)  # rho^2 of the nucleus a voxel lies deepest in
    labels = np.zeros(shape, np.uint32)
    image = np.zeros(shape, np.float32)
    for i, centre in enumerate(sites, start=1):
        radius = diameter / 2 * rng.uniform(0.85, 1.15)
        elongation = rng.uniform(1.0, 1.35)
        axes = np.full(nd, radius / elongation ** (1 / nd))
        axes[-1] *= elongation
        rot, _ = np.linalg.qr(rng.normal(size=(nd, nd)))
        inv_cov = rot @ np.diag(1.0 / axes**2) @ rot.T
        reach = axes.max() * 1.05
        lo = np.maximum(np.floor((centre - reach) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((centre + reach) / spacing).astype(int) + 1, shape)
        if np.any(lo >= hi):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grids = np.meshgrid(*[np.arange(a, b) * s - c for a, b, s, c in zip(lo, hi, spacing, centre)], indexing="ij")
        offsets = np.stack(grids, -1)
        rho2 = np.einsum("...i,ij,...j->...", offsets, inv_cov, offsets).astype(np.float32)
        inside = (rho2 <= 1.0) & (rho2 < depth[box])
        brightness = rng.uniform(0.6, 1.0)
        value = brightness * (1.0 - 0.3 * rho2)
        if texture:
            tex = ndimage.gaussian_filter(rng.normal(size=rho2.shape), max(diameter / 8 / spacing.min(), 0.7))
            value = value * np.clip(1.0 + texture * tex / (tex.std() + 1e-9), 0.2, None)
        depth[box][inside] = rho2[inside]
        labels[box][inside] = i
        image[box][inside] = value[inside]
    image = ndimage.gaussian_filter(image, blur_px) + 0.1
    image += rng.normal(0, noise, shape).astype(np.float32)
    _, labels = np.unique(labels, return_inverse=True)
    return image.astype(np.float32), labels.reshape(shape).astype(np.uint32)


def shape_for(diameter_px: Sequence[float], objects_per_axis: Sequence[int]) -> tuple[int, ...]:
    """An image shape holding about ``objects_per_axis`` nuclei of ``diameter_px`` per axis."""
    return tuple(int(math.ceil(d * n * 1.15)) for d, n in zip(diameter_px, objects_per_axis))
