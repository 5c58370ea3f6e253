"""The noisy pixel put back: a posterior step for blind-spot denoisers (N2V2, Noise2Self).

A blind-spot network predicts each pixel from its neighbours, so its output ``mu`` throws away
what the pixel's own noisy value ``y`` knows. Laine et al. (2019) showed that combining the two
as a posterior recovers most of the gap to supervised training; they train the network to
predict a per-pixel prior variance. This module does a cheaper version that needs no change to
the network: the output is ``mu + w * (y - mu)``, where the weight ``w`` depends on how much
local structure the prediction has (flat regions: the prediction is good, ``w`` near 0; edges
and texture: the prediction misses detail, ``w`` larger).

The weights are chosen without clean data by Stein's unbiased risk estimate (SURE) per
structure bin, which has a closed form for a linear blend: ``w = 1 - sum(var * (1 - a)) /
sum((y - mu) ** 2)``, with ``var`` the noise variance and ``a = d mu / d y`` at the same pixel
(a network trained with masking still leaks about 5 % of its centre pixel at inference; the
Monte-Carlo divergence of Ramani et al. 2008 measures it). The noise variance is a line in the
predicted intensity (Poisson-Gaussian noise, as in Foi et al. 2008), fitted to the median second
difference of ``y`` (``kernels.noise``) over the flatter half of each intensity bin.

Chosen on scikit-image's ``camera`` (grey, Gaussian sigma 25, the default N2V2 with TTA, through
the engine): 28.73 dB without the step, 29.20 with it (``benchmarks/results/restore_tuning.json``);
in-process on the whole image, the same bins with weights fitted against the clean image (an
oracle) reach 29.25, and a 3-9 pixel window, 4-32 bins, or the spread of the 8 TTA predictions
as the structure measure all land within 0.07 dB. The weights are fitted once, when training
ends, on patches from the whole image (``pipeline.steps.train.posterior_patches``), and stored
on the model card; applying them is a per-pixel function of ``y`` and ``mu`` plus a 5-pixel
window of ``mu``, so tiled still equals untiled when the halo grows by the window's radius.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from kernels.noise import second_difference_variance

WINDOW = 5  # pixels per spatial axis of the local-variance window
RADIUS = WINDOW // 2  # extra halo the step needs beyond the network's receptive field
BINS = 8  # structure bins (camera: 8, 16 and 32 bins within 0.01 dB of each other)
NOISE_BINS = 11  # intensity bins of the noise line: the top 1/2, 1/4, ... 1/1024 of the pixels
EPSILON = 1e-3  # finite-difference step of the divergence probe (normalised units)


def structure(mu: np.ndarray) -> np.ndarray:
    """Local variance of one channel's prediction over a ``WINDOW``-wide box (every axis)."""
    mu = np.asarray(mu, np.float64)
    mean = ndimage.uniform_filter(mu, WINDOW, mode="reflect")
    return np.maximum(ndimage.uniform_filter(mu * mu, WINDOW, mode="reflect") - mean * mean, 0.0)


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each value between sorted ``edges`` (the last edge closes the last bin)."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, max(len(edges) - 2, 0))


def noise_line(d2: np.ndarray, mu: np.ndarray, feature: np.ndarray) -> tuple[float, float, float]:
    """``(offset, slope, floor)`` of the noise variance as a line in the predicted intensity ``mu``,
    from the pixels' ``second_difference_variance`` ``d2`` and local ``structure`` (flattened
    alike): per intensity bin, the median ``d2`` of its less-structured half (edges inflate
    the second difference). The bins halve towards the bright end (the top half of the
    pixels, the next quarter, ... the top 0.1 %): in sparse fluorescence nearly every pixel is
    background, and a line read off the background alone under-estimated the variance of a
    synthetic light-sheet volume's nuclei by 2-4x (0.0033 vs 0.0126 at intensity 0.27). A
    falling line has no physical reading (noise does not fall with signal), so it is replaced
    by the median over the bins. ``floor``, the least variance a bin measured, bounds the line
    from below: fitted through bright bins it can cross zero over the background (light-sheet:
    -0.001 at the background's 0.05, which measures 0.0005), and a variance near zero would
    hand the blend the whole noisy pixel there."""
    d2, m, f = (np.asarray(a, np.float64).ravel() for a in (d2, mu, feature))
    levels = np.concatenate([1.0 - 0.5 ** np.arange(NOISE_BINS), [1.0]])
    edges = np.unique(np.quantile(m, levels))  # a level most pixels share (background) is one bin
    which = bin_index(m, edges)
    centres, variances = [], []
    for b in range(max(len(edges) - 1, 1)):
        sel = which == b
        if sel.sum() >= 32:
            flat = f[sel] <= np.median(f[sel])
            centres.append(float(np.median(m[sel][flat])))
            variances.append(float(np.median(d2[sel][flat])))
    floor = max(min(variances), 1e-12)
    if len(centres) < 2 or np.ptp(centres) == 0:
        return float(np.median(variances)), 0.0, floor
    slope, offset = np.polyfit(centres, variances, 1)
    if slope < 0:
        return float(np.median(variances)), 0.0, floor
    return float(offset), float(slope), floor


def fit_channel(y: np.ndarray, mu: np.ndarray, divergence: np.ndarray, *, bins: int = BINS) -> dict[str, Any]:
    """SURE weights for one channel from ``(N, *spatial)`` patches: the noisy input, the
    network's prediction and the per-pixel divergence probe (see :func:`divergence_probe`)."""
    y, mu, divergence = (np.asarray(a, np.float64) for a in (y, mu, divergence))
    feature = np.stack([structure(m) for m in mu])
    d2 = np.stack([second_difference_variance(p) for p in y])
    inner = interior(y.shape[1:])
    y, mu, divergence, feature, d2 = (a[(slice(None),) + inner].ravel() for a in (y, mu, divergence, feature, d2))
    offset, slope, floor = noise_line(d2, mu, feature)
    var = np.maximum(offset + slope * mu, floor)
    residual2 = (y - mu) ** 2
    which = bin_index(feature, np.quantile(feature, np.linspace(0, 1, bins + 1)))
    centres, weights = [], []
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        w = 1.0 - float((var[sel] * (1.0 - divergence[sel])).sum()) / max(float(residual2[sel].sum()), 1e-30)
        centres.append(float(np.median(feature[sel])))
        weights.append(float(np.clip(w, 0.0, 1.0)))
    return {"centres": centres, "weights": weights, "noise": [offset, slope, floor],
            "divergence": float(divergence.mean())}


def interior(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The part of a patch whose prediction saw no padding of the patch edge (up to 4 pixels
    in from each side, less on short axes)."""
    return tuple(slice(min(4, n // 4), n - min(4, n // 4)) for n in shape)


def apply(y: np.ndarray, mu: np.ndarray, table: dict[str, Any]) -> np.ndarray:
    """The posterior output of ``(C, *spatial)`` input ``y`` and prediction ``mu`` (normalised
    units); ``table``: the card's entry for the inference mode (one fit per channel)."""
    out = np.empty(np.shape(mu), np.float32)
    for c, (yc, mc) in enumerate(zip(y, mu)):
        w = np.interp(structure(mc), table["centres"][c], table["weights"][c])
        out[c] = mc + w * (np.asarray(yc, np.float64) - mc)
    return out


def divergence_probe(predict, inputs: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, a)``: the prediction of ``inputs`` and a per-pixel Monte-Carlo estimate of
    ``d mu / d y`` at the same pixel (one extra pass on inputs nudged by ``EPSILON`` times a
    random sign per pixel; the cross terms average out over a bin)."""
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0], np.float32), size=inputs.shape)
    mu = predict(inputs)
    nudged = predict(inputs + EPSILON * signs)
    return mu, signs * (nudged - mu) / EPSILON
