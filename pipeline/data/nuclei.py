"""A deterministic field of nuclei in 2D or 3D that can be rendered region by region.

Space is cut into a grid of cells; each cell holds at most one nucleus whose parameters come
from a random stream seeded by ``(seed, cell index)``, and the nucleus stays inside its cell.
So any region can be rendered exactly, on its own, by looking only at the cells it overlaps:
the generator scales to stores far larger than memory and tiles agree at their borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from pipeline.core.regions import Region


@dataclass(frozen=True)
class NucleusClass:
    """A shape/texture class: radius (um), elongation, relative brightness, texture strength."""

    name: str
    radius_um: float
    elongation: float
    brightness: float
    texture: float


CLASSES: tuple[NucleusClass, ...] = (
    NucleusClass("round", 4.0, 1.0, 1.0, 0.05),
    NucleusClass("elongated", 3.0, 1.8, 0.9, 0.05),
    NucleusClass("textured", 4.4, 1.1, 0.8, 0.6),
    NucleusClass("small_bright", 2.5, 1.0, 1.7, 0.0),
)
MAX_HALF_AXIS_UM = max(c.radius_um * c.elongation for c in CLASSES) * 1.15


@dataclass(frozen=True)
class Nucleus:
    """One object: id, class index, centre (pixels), pixel-space quadric and bounding box."""

    id: int
    cls: int
    center: tuple[float, ...]
    quadric: np.ndarray  # x^T Q x <= 1 for pixel offsets x from the centre
    lo: tuple[int, ...]  # bounding box, inclusive lower corner (pixels)
    hi: tuple[int, ...]  # exclusive upper corner
    brightness: float
    texture_seed: int


def hash_uniform(seed: int, *indices: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) values from integer lattice indices (splitmix64 mixing, vectorised)."""
    with np.errstate(over="ignore"):
        h = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
        for idx in indices:
            h = h ^ (np.asarray(idx).astype(np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15) + (h << np.uint64(6)) + (h >> np.uint64(2)))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def value_noise(region: Region, spacing: float, seed: int) -> np.ndarray:
    """Smooth noise in [0, 1) on a lattice of ``spacing`` pixels, evaluated on ``region``.

    A pure function of absolute pixel position, so neighbouring regions join seamlessly.
    """
    coords = [np.arange(sl.start, sl.stop) / spacing for sl in region]
    base = [np.floor(c).astype(np.int64) for c in coords]
    smooth = [(c - b) * (c - b) * (3 - 2 * (c - b)) for c, b in zip(coords, base)]
    # hash only the lattice nodes the region touches, then gather: far cheaper than per pixel
    first = [int(b[0]) for b in base]
    nodes = np.meshgrid(*[np.arange(f, int(b[-1]) + 2) for f, b in zip(first, base)], indexing="ij")
    lattice = hash_uniform(seed, *nodes)
    nd = len(region)
    out = np.zeros([sl.stop - sl.start for sl in region])
    for corner in np.ndindex(*(2,) * nd):
        idx, weight = [], np.ones(1)
        for axis, bit in enumerate(corner):
            shape = [1] * nd
            shape[axis] = -1
            idx.append((base[axis] - first[axis] + bit).reshape(shape))
            w = smooth[axis] if bit else 1 - smooth[axis]
            weight = weight * w.reshape(shape)
        out += weight * lattice[tuple(idx)]
    return out


@dataclass(frozen=True)
class NucleiField:
    """Nuclei over an image of ``shape`` (spatial axes only) with pixel size ``scale`` (um)."""

    shape: tuple[int, ...]
    scale: tuple[float, ...]
    seed: int = 0
    density: float = 0.7

    @property
    def cell(self) -> tuple[int, ...]:
        return tuple(int(math.ceil(2 * MAX_HALF_AXIS_UM / s)) + 2 for s in self.scale)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / c) for n, c in zip(self.shape, self.cell))

    @property
    def max_id(self) -> int:
        return int(np.prod(self.grid))

    def nucleus(self, cell_index: Sequence[int]) -> Nucleus | None:
        """The nucleus of one cell, or None when the cell is empty (deterministic)."""
        rng = np.random.default_rng([self.seed, *(int(i) for i in cell_index)])
        if rng.random() >= self.density:
            return None
        nd = len(self.shape)
        cls = int(rng.integers(len(CLASSES)))
        kind = CLASSES[cls]
        r = kind.radius_um * rng.uniform(0.85, 1.15)
        half_axes = np.full(nd, r)
        half_axes[-1] *= kind.elongation
        half_axes[:-1] /= math.sqrt(kind.elongation)
        if nd == 3:
            q, rr = np.linalg.qr(rng.normal(size=(3, 3)))
            rot = q * np.sign(np.diag(rr))
        else:
            a = rng.uniform(0, np.pi)
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        cov_phys = rot @ np.diag(half_axes**2) @ rot.T  # ellipsoid d^T cov^-1 d <= 1 (um)
        scale = np.asarray(self.scale)
        cov_px = cov_phys / np.outer(scale, scale)
        half_px = np.sqrt(np.diag(cov_px))
        cell = np.asarray(self.cell)
        cell_lo = np.asarray(cell_index) * cell
        room = np.maximum(cell - 2 * half_px - 2, 0)
        center = cell_lo + 1 + half_px + rng.uniform(0, 1, nd) * room
        lo = np.floor(center - half_px).astype(int)
        hi = np.ceil(center + half_px).astype(int) + 1
        return Nucleus(
            id=int(np.ravel_multi_index(tuple(int(i) for i in cell_index), self.grid)) + 1,
            cls=cls, center=tuple(center.tolist()), quadric=np.linalg.inv(cov_px),
            lo=tuple(lo.tolist()), hi=tuple(hi.tolist()),
            brightness=kind.brightness * rng.uniform(0.8, 1.2),
            texture_seed=int(rng.integers(2**31)),
        )

    def nuclei_in(self, region: Region) -> Iterator[Nucleus]:
        """Nuclei whose cell overlaps ``region`` (only those can touch it)."""
        ranges = []
        for sl, c, g in zip(region, self.cell, self.grid):
            ranges.append(range(max(0, sl.start // c), min(g, -(-sl.stop // c))))
        for index in np.ndindex(*(len(r) for r in ranges)):
            cell_index = tuple(r[i] for r, i in zip(ranges, index))
            nucleus = self.nucleus(cell_index)
            if nucleus is not None:
                yield nucleus

    def render(self, region: Region) -> tuple[np.ndarray, np.ndarray, list[Nucleus]]:
        """Intensity (float32, brightness units) and labels (uint32) of ``region``.

        Region coordinates may extend beyond the image (for blur halos); objects are clipped to
        the image so labels never point outside it.
        """
        shape = tuple(sl.stop - sl.start for sl in region)
        intensity = np.zeros(shape, np.float32)
        labels = np.zeros(shape, np.uint32 if self.max_id < 2**32 else np.uint64)
        found = []
        for nuc in self.nuclei_in(region):
            lo = [max(a, sl.start, 0) for a, sl in zip(nuc.lo, region)]
            hi = [min(b, sl.stop, n) for b, sl, n in zip(nuc.hi, region, self.shape)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            found.append(nuc)
            inside, value = self._rasterize(nuc, lo, hi)
            dst = tuple(slice(a - sl.start, b - sl.start) for a, b, sl in zip(lo, hi, region))
            intensity[dst][inside] = value[inside]
            labels[dst][inside] = nuc.id
        return intensity, labels, found

    def _rasterize(self, nuc: Nucleus, lo: Sequence[int], hi: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Mask and intensity of ``nuc`` over the box ``lo:hi`` (pixels)."""
        grids = np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo, hi, nuc.center)], indexing="ij")
        offsets = np.stack(grids, axis=-1)
        rho2 = np.einsum("...i,ij,...j->...", offsets, nuc.quadric, offsets)
        inside = rho2 <= 1.0
        value = nuc.brightness * (1.0 - 0.35 * rho2)
        kind = CLASSES[nuc.cls]
        if kind.texture:
            box = tuple(b - a for a, b in zip(nuc.lo, nuc.hi))
            trng = np.random.default_rng(nuc.texture_seed)
            tex = ndimage.gaussian_filter(trng.normal(size=box), 1.0)
            tex /= tex.std() + 1e-9
            crop = tuple(slice(a - l0, b - l0) for a, b, l0 in zip(lo, hi, nuc.lo))
            value = value * np.clip(1.0 + kind.texture * tex[crop], 0.1, None)
        return inside, value

    def visible(self, nuc: Nucleus) -> tuple[tuple[int, ...], tuple[float, ...], int] | None:
        """First voxel (C order), centroid and voxel count of the part of ``nuc`` inside the image.

        The first voxel names one owner block per object, so per-block tables never repeat rows.
        """
        lo = [max(a, 0) for a in nuc.lo]
        hi = [min(b, n) for b, n in zip(nuc.hi, self.shape)]
        if any(a >= b for a, b in zip(lo, hi)):
            return None
        inside, _ = self._rasterize(nuc, lo, hi)
        where = np.nonzero(inside)
        if not where[0].size:
            return None
        first = tuple(int(w[0]) + a for w, a in zip(where, lo))
        centroid = tuple(float(w.mean()) + a for w, a in zip(where, lo))
        return first, centroid, int(where[0].size)
