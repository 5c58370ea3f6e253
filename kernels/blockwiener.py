"""Empirical Wiener filtering in a sliding block DCT, guided by a pilot estimate.

The posterior step's first stage (``kernels.posterior``) blends the noisy pixel back into a
blind-spot prediction with one weight per pixel, so it cannot tell a fine texture from noise at
the same place. This second stage does what BM3D's second step does without its block
matching (Dabov et al. 2007; the sliding-window DCT of Yaroslavsky 1996): every ``B``-wide
block of the noisy image is taken to the DCT domain, each coefficient is scaled by the Wiener
gain ``P ** 2 / (P ** 2 + var)`` read off the same coefficient ``P`` of the pilot (the first
stage's output), and the blocks are put back, each pixel the average of the blocks that cover
it, weighted by ``1 / sum(gain ** 2)`` (BM3D's aggregation: a block whose
gains keep less noise counts more). ``var`` is the noise variance averaged over the block, from
the model card's noise line, so Poisson-Gaussian noise is followed block by block.

Chosen on tuning data the benchmark's figures do not use (``python -m benchmarks.bench_restore
--parts posterior_variants,posterior_3d``, ``benchmarks/results/restore_tuning.json``). In 2D,
scikit-image's camera and chelsea (sigma 25): the first stage's 29.44 / 30.40 dB become 29.70 /
30.60 with 8-pixel blocks (4: 29.26 / 30.14, 12: 29.72 / 30.66, at twice the cost). In 3D, a
synthetic light-sheet volume (seed 1; the benchmark's is seed 0) at 20 photons: 39.46 dB after
the first stage, 39.72 / 40.42 / 40.64 with every block of 4 / 6 / 8 voxels. Every block is
costly in 3D (``B ** 3`` coefficients for each voxel: on an H200 the stage with blocks of 6 took
~9x the network's time per tile), so as in BM3D (whose reference code steps 3 pixels between
blocks) blocks start only every ``STEP`` voxels, on a grid anchored at global position 0 so that
tiles share it: blocks of 10 every 3 voxels (37 coefficients per voxel, against 216) scored
40.48 dB, blocks of 6 every 2 / 3 voxels 39.97 / 39.64, of 8 every 2 / 3 / 4 40.32 / 40.22 /
39.84, of 10 every 2 / 4 40.49 / 40.18, of 12 every 3 / 4 / 5 40.40 / 40.31 / 40.27, of 14 / 16
every 4 40.43 / 40.34 (``second_stage_by_grid``); in numpy on one tile of 96 x 192 x 192 voxels
0.20 M voxels/s against 0.08 for every block of 6. On the benchmark's volume (seed 0, reported,
not used to choose) the same models lost 0.12 dB (N2V2) and 0.24 dB (N2S) with it against every
block of 6. In 2D every block is kept: no grid beat every block of 8 (29.70 / 30.60) on both
camera and chelsea (8 every 2: 29.61 / 30.50; 12 every 2: 29.67 / 30.61; 16 every 3: 29.65 /
30.65; 16 every 4: 29.61 / 30.59), and 2D costs less. The pilot is the first stage's output,
which is the better pilot in 2D (the network's prediction as pilot: camera 29.11, chelsea
30.29); on that volume the prediction alone was the better one (40.81 with blocks of 6), because
there the first stage loses to the prediction: the prediction's error in the background is under
1 % of the noise variance, so the noise line's reading, 4-27 % under the true variance across
intensity bins, makes it blend 7-13 % of the noisy voxel back in where almost none belongs. That
is a known shortfall of the first stage, not fixed here. BM3D's own Wiener step (the ``bm3d``
package, the first stage's output as its pilot) scored lower on camera and chelsea (29.57 /
30.52): with a learned pilot, block matching bought nothing, so it is not built.

The same machinery gives the posterior step a first stage per frequency band (:func:`shrink`):
each block coefficient ``c`` of the residual (noisy image less prediction) keeps the share ``1 -
G[var] / G[c ** 2]`` of itself, ``G`` a Gaussian window around the block (the per-pixel stage's
window, 10 pixels in 2D), i.e. the per-pixel stage's SURE weight taken frequency by frequency,
so a texture the network smoothed away comes back while noise at other frequencies of the same
place does not. On camera / chelsea (in-process, TTA): the per-pixel stage 29.44 / 30.40 dB, per
band 29.45 / 30.52, each followed by the Wiener step 29.70 / 30.60 and 29.71 / 30.76 (with the
window at 14 pixels, blocks of 4 / 6 / 8 / 12 for the band stage gave 29.71 / 29.72 / 29.73 /
29.72 and 30.74 / 30.76 / 30.78 / 30.77: 8, the Wiener step's width, is kept, and the window
stays the card's, 10, for 0.02 dB). It estimates the kept share from fewer independent samples
than the per-pixel stage (sliding blocks overlap), so where the residual is noise alone it keeps
a little noise by chance: on a 2D fluorescence slice (20 photons), where the network's
prediction is already within a few percent of the noise in the background, it lost 0.9 dB
against the prediction alone (39.83 -> 38.91). Which stages a 2D model applies is therefore
chosen per image by estimated risk (``kernels.posterior.choose``).

scipy has a DCT but no sliding one, and a whole block stack (``B ** ndim`` coefficients per
pixel) would hold 64x the tile, so the coefficients are computed one at a time with separable 1D
correlations on the padded tile (scipy's ``correlate1d`` or sums of strided slices, or torch's
``conv1d``, one per DCT row), and the gains' sums in a first pass. Every output pixel reads the
pilot, the image and the noise within ``B - 1`` pixels of it (:func:`reach`; the band stage also
the window's radius), which the halo covers, so tiled equals untiled."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.fft import dct

BLOCK = {2: 8, 3: 10}  # the Wiener stage's block width per number of spatial axes (module docstring)
STEP = {2: 1, 3: 3}  # the Wiener stage's pixels between block starts (1: every block)
BAND_BLOCK = {2: 8, 3: 6}  # the band stage's block width (every block: its gains are smoothed across blocks)


def reach(ndim: int) -> int:
    """Pixels the Wiener stage reads beyond each side of a pixel."""
    return BLOCK[ndim] - 1


def band_reach(ndim: int) -> int:
    """Pixels the band stage's blocks read beyond each side of a pixel (besides its window)."""
    return BAND_BLOCK[ndim] - 1


def basis(width: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: row ``u`` is the ``u``-th basis vector."""
    return dct(np.eye(width), norm="ortho", axis=0)


def _correlate_rows(x, rows: np.ndarray, axis: int, start: int = 0, step: int = 1):
    """``sum_a rows[k, a] * x[start + j * step + a]`` along ``axis`` for every row ``k`` and
    every ``j`` whose window lies inside: a sequence of maps, for numpy arrays (scipy, or sums
    of strided slices) and torch tensors (``conv1d``) alike. Each value depends only on the
    samples it reads (what tiled == untiled needs).

    On a GPU the stage is bound by memory traffic and by cuDNN's float64 kernels, not by
    arithmetic. Measured on an H200 (``bench_gpu --parts posterior``, 2026-12-04): as sums of
    shifted slices (the first form) every tap cost a pass over the tile, and the Wiener stage took
    2.13 s on a 3D tile of 128 x 256 x 256 voxels (the network: 0.2 s); one ``conv1d`` with a
    channel per row brought it to 1.85 s (the band stage 8.2 -> 2.9 s, 0.87 -> 0.19 s on 2048^2),
    but 1.27 s of that went to cuDNN's float64 implicit GEMM for the 6-channel convolutions (11.8
    ms each) where a 1-channel one ran its direct kernel in 0.29 ms; hence one 1-channel
    ``conv1d`` per row."""
    rows = np.atleast_2d(rows)
    width = rows.shape[1]
    count = (x.shape[axis] - width - start) // step + 1
    if isinstance(x, np.ndarray):
        index = [slice(None)] * x.ndim
        if step == 1:  # scipy's correlation, its centred window shifted to the start
            index[axis] = slice(start + width // 2, start + width // 2 + count)
            return [ndimage.correlate1d(x, taps, axis=axis, mode="constant")[tuple(index)] for taps in rows]
        maps = []
        for taps in rows:
            total = 0.0
            for a, t in enumerate(taps):
                index[axis] = slice(start + a, start + a + (count - 1) * step + 1, step)
                total = total + t * x[tuple(index)]
            maps.append(total)
        return maps
    import torch
    import torch.nn.functional as F

    moved = x.movedim(axis, -1)[..., start:]
    lines = moved.reshape(-1, 1, moved.shape[-1])  # one copy, shared by the rows
    weights = torch.as_tensor(np.ascontiguousarray(rows), dtype=x.dtype, device=x.device)
    maps = []
    for taps in weights:
        out = F.conv1d(lines, taps.view(1, 1, -1), stride=step)  # conv1d correlates (no flip)
        maps.append(out.reshape(*moved.shape[:-1], out.shape[-1]).movedim(-1, axis))
    return maps


def _correlate_valid(x, taps: np.ndarray, axis: int, start: int = 0, step: int = 1):
    """:func:`_correlate_rows` of a single row of taps."""
    return _correlate_rows(x, taps, axis, start, step)[0]


def _scatter_rows(parts, rows: np.ndarray, axis: int, length: int, start: int = 0, step: int = 1):
    """The transpose of :func:`_correlate_rows` onto an axis of ``length`` samples:
    ``out[start + j * step + a] += rows[k, a] * parts[k][j]`` summed over the rows: blocks'
    coefficients put back onto the pixels they cover. numpy: sums of strided slices; torch:
    one ``conv_transpose1d`` over all rows."""
    rows = np.atleast_2d(rows)
    count = parts[0].shape[axis]
    if isinstance(parts[0], np.ndarray):
        shape = list(parts[0].shape)
        shape[axis] = length
        out = np.zeros(shape, np.result_type(parts[0], rows))
        index = [slice(None)] * out.ndim
        for z, taps in zip(parts, rows):
            for a, t in enumerate(taps):
                index[axis] = slice(start + a, start + a + (count - 1) * step + 1, step)
                out[tuple(index)] += t * z
        return out
    import torch
    import torch.nn.functional as F

    moved = torch.stack(parts).movedim(axis + 1, -1).movedim(0, -2)  # (other axes, rows, count)
    weight = torch.as_tensor(np.ascontiguousarray(rows), dtype=moved.dtype, device=moved.device).unsqueeze(1)
    out = F.conv_transpose1d(moved.reshape(-1, len(rows), count), weight, stride=step)  # (pixels, 1, covered)
    out = F.pad(out, (start, length - start - out.shape[-1]))
    return out.reshape(*moved.shape[:-2], length).movedim(-1, axis)


def _scatter_full(z, taps: np.ndarray, axis: int, length: int, start: int = 0, step: int = 1):
    """:func:`_scatter_rows` of a single map and row of taps."""
    return _scatter_rows([z], taps, axis, length, start, step)


def _separable(x, taps: np.ndarray, starts=None, step: int = 1):
    """:func:`_correlate_valid` along every axis."""
    for axis in range(x.ndim):
        x = _correlate_valid(x, taps, axis, starts[axis] if starts else 0, step)
    return x


def _crop(x, reach: int):
    """``x`` without ``reach`` samples at both ends of every axis."""
    return x[tuple(slice(reach, n - reach) for n in x.shape)] if reach else x


def _coefficient_maps(x, rows: np.ndarray, starts, step: int, axis: int = 0):
    """The DCT coefficients of every block of the padded ``x`` on the grid (``starts``, ``step``),
    one map at a time (the partial transforms along the leading axes shared between
    coefficients; along the last axis all rows in one pass, ``B`` maps held)."""
    if axis == x.ndim - 1:
        yield from _correlate_rows(x, rows, axis, starts[axis], step)
        return
    for taps in rows:
        yield from _coefficient_maps(_correlate_valid(x, taps, axis, starts[axis], step), rows, starts, step, axis + 1)


def _filtered(y, pilot, rows: np.ndarray, scale, lengths, starts, step: int, axis: int = 0):
    """The filtered blocks put back onto the padded grid (``lengths`` samples per axis):
    ``scale(c, p)`` of each coefficient of ``y`` and ``pilot``, then the transpose of the
    transform, axis by axis (the same shared partial transforms as :func:`_coefficient_maps`)."""
    if axis == y.ndim - 1:
        coefficients = zip(_correlate_rows(y, rows, axis, starts[axis], step),
                           _correlate_rows(pilot, rows, axis, starts[axis], step))
        return _scatter_rows([scale(c, p) for c, p in coefficients], rows, axis, lengths[axis], starts[axis], step)
    total = None
    for taps in rows:
        part = _filtered(_correlate_valid(y, taps, axis, starts[axis], step),
                         _correlate_valid(pilot, taps, axis, starts[axis], step), rows, scale, lengths, starts, step,
                         axis + 1)
        part = _scatter_full(part, taps, axis, lengths[axis], starts[axis], step)
        total = part if total is None else total + part
    return total


def _aggregate(y, pilot, width: int, gain, crop: int = 0, starts=None, step: int = 1):
    """Every block of ``y`` on the grid (first block at ``starts`` per axis, then every
    ``step``: all of them by default) filtered in the DCT domain by ``gain(p)`` of the same
    coefficient ``p`` of ``pilot``, and the blocks put back with BM3D's weights (``1 /
    sum(gain ** 2)`` per block: a block whose gains keep less noise counts more); ``gain``
    reads ``crop`` maps' samples beyond each side (its output is that much shorter; only on
    the full grid). Returns the result without the ``width - 1`` padding the blocks need."""
    rows = basis(width)
    starts = tuple(starts or (0,) * y.ndim)
    assert not crop or (step == 1 and not any(starts)), "a cropping gain needs the full grid"
    lengths = tuple(n - 2 * crop for n in y.shape)  # the output frame starts ``crop`` samples in
    # the sum of squared gains per block must be known before any block is put back, so the
    # pilot's coefficients are made twice rather than all held (B ** ndim maps of the tile)
    kept = None
    for p in _coefficient_maps(pilot, rows, starts, step):
        kept = gain(p) ** 2 if kept is None else kept + gain(p) ** 2
    block_weight = 1.0 / (kept + 1e-12)
    out = _filtered(y, pilot, rows, lambda c, p: block_weight * gain(p) * _crop(c, crop), lengths, starts, step)
    weight = block_weight
    for axis in range(y.ndim):
        weight = _scatter_full(weight, np.ones(width), axis, lengths[axis], starts[axis], step)
    return _crop(out, width - 1) / _crop(weight, width - 1)  # (with a step, padding beyond may hold no block)


def grid_starts(origin, width: int, step: int) -> tuple[int, ...]:
    """Per axis, the first block start of an array padded by ``width - 1`` whose unpadded first
    pixel lies at global position ``origin``: blocks start where the global position is a
    multiple of ``step``, so every tile of a run and the whole image share one block grid."""
    return tuple((width - 1 - o) % step for o in origin)


def filter_padded(y, pilot, variance, width: int, *, step: int = 1, starts=None):
    """The Wiener filter on arrays padded by ``width - 1`` on every side (numpy arrays or float64
    torch tensors alike), blocks on the grid ``starts`` / ``step`` (:func:`grid_starts`; every
    block by default); returns the unpadded result."""
    starts = tuple(starts or (0,) * y.ndim)
    noise = _separable(variance, np.full(width, 1.0 / width), starts, step)  # the noise averaged over each block
    return _aggregate(y, pilot, width, lambda p: p * p / (p * p + noise), starts=starts, step=step)


def shrink_padded(residual, variance, width: int, window: np.ndarray):
    """The per-frequency form of the posterior step's first stage, on arrays padded by ``width -
    1 + len(window) // 2`` (numpy or float64 torch): each block DCT coefficient ``c`` of the
    ``residual`` (noisy image less prediction) kept in the share ``1 - G[var] / G[c ** 2]``
    (clipped to [0, 1]), ``G`` the sum over the taps ``window`` around the block along every
    axis: Stein's unbiased risk estimate of a kept share minimised over the window, for each
    frequency apart. Returns the unpadded filtered residual."""
    noise = _separable(_separable(variance, np.full(width, 1.0 / width)), window)

    def gain(c):
        energy = _separable(c * c, window)
        if isinstance(energy, np.ndarray):
            return np.clip(1.0 - noise / np.maximum(energy, 1e-30), 0.0, 1.0)
        return (1.0 - noise / energy.clamp_min(1e-30)).clamp(0.0, 1.0)

    return _aggregate(residual, residual, width, gain, crop=len(window) // 2)


def apply(y: np.ndarray, pilot: np.ndarray, variance: np.ndarray, *, block: int | None = None,
          step: int | None = None, origin: tuple[int, ...] | None = None) -> np.ndarray:
    """The filtered image of one channel: ``y`` the noisy image, ``pilot`` an estimate of it,
    ``variance`` the noise variance per pixel (all the same spatial shape, normalised units);
    blocks every ``step`` pixels (default :data:`STEP`) from global position ``origin`` of the
    first pixel (default 0: a whole image; a tile passes its own, so tiles share the grid)."""
    ndim = np.ndim(y)
    width, step = block or BLOCK[ndim], step or STEP[ndim]
    padded = (np.pad(np.asarray(a, np.float64), width - 1, mode="symmetric") for a in (y, pilot, variance))
    return filter_padded(*padded, width, step=step, starts=grid_starts(origin or (0,) * ndim, width, step))


def shrink(residual: np.ndarray, variance: np.ndarray, window: np.ndarray, *, block: int | None = None) -> np.ndarray:
    """:func:`shrink_padded` of one channel's whole ``residual`` (``variance``: the noise
    variance per pixel; ``window``: the SURE window's taps along one axis)."""
    width = block or BAND_BLOCK[np.ndim(residual)]
    pad = width - 1 + len(window) // 2
    padded = (np.pad(np.asarray(a, np.float64), pad, mode="symmetric") for a in (residual, variance))
    return shrink_padded(*padded, width, np.asarray(window, np.float64))
