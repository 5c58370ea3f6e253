"""The noisy pixel put back: a posterior step for blind-spot denoisers (N2V2, Noise2Self).

A blind-spot network predicts each pixel from its neighbours, so its output ``mu`` throws away
what the pixel's own noisy value ``y`` knows. Laine et al. (2019) showed that combining the two
as a posterior recovers most of the gap to supervised training; they train the network to
predict a per-pixel prior variance. This module does a cheaper version that needs no change to
the network: the output is ``mu + w * (y - mu)`` with a weight per pixel read off the residual
around it. Where the prediction misses detail (edges, texture) the residual ``y - mu`` holds
more than noise and ``w`` grows; on flat ground it is noise alone and ``w`` falls to 0. A
second stage (``kernels.blockwiener``) then filters ``y`` in a sliding block DCT with gains read
off that first result, which tells texture from noise where one weight per pixel cannot; it
needs only the noise line below, so models trained before it get it too. The first stage can
also weigh the residual per frequency band of that DCT (``kernels.blockwiener.shrink``).

No one combination wins everywhere: on textured grey images the band stage with blocks does
best, on a light-sheet volume the per-pixel stage with blocks, and on sparse 2D fluorescence,
where the prediction's error in the background is a few percent of the noise, every stage
costs a little (see ``kernels.blockwiener``). So when a 2D model's training ends,
:func:`choose` estimates each combination's mean squared error on regions of the image with
Stein's unbiased risk estimate (the noise line below; the divergence of the whole step, network
included, by a Monte-Carlo probe) and the card keeps the least (3D models keep pixel+blocks:
see :func:`choose`); ``denoise --posterior auto`` applies it.

``w`` is Stein's unbiased risk estimate (SURE) minimised over a Gaussian window around the
pixel, which has a closed form for a linear blend: ``w = 1 - G[var * (1 - a)] / G[(y - mu) ** 2]``
clipped to [0, 1], with ``G`` the window's weighted sum, ``var`` the noise variance and ``a =
d mu / d y`` at the same pixel: a network trained with masking still leaks part of its centre
pixel at inference, measured by the Monte-Carlo divergence of Ramani et al. (2008) and kept per
bin of local structure, since it grows with it (camera: 0.02 on flat ground, 0.12 at edges).
This is the Wiener filter of the residual: ``G[(y - mu) ** 2] - G[var]`` estimates the prior
variance Laine et al. predict. The noise variance is a line in the predicted intensity
(Poisson-Gaussian noise, as in Foi et al. 2008), fitted to the median second difference of
``y`` (``kernels.noise``) over the flatter half of each intensity bin.

Chosen on scikit-image's ``camera`` and ``chelsea`` (grey, Gaussian sigma 25, the default N2V2
with TTA; not on the benchmark's astronaut, coins and moon), in-process on the whole image
(``python -m benchmarks.bench_restore --parts posterior_variants --images camera,chelsea``,
``benchmarks/results/restore_tuning.json``): the prediction alone 28.73 / 30.10 dB; one weight
per bin of local structure (fitted by SURE over each bin: the step's first version) 29.19 /
30.23; the per-pixel window with one leak for the image 29.42 / 30.39, with the leak per
structure bin 29.44 / 30.40 (Gaussian sigma 4-20: 29.33-29.44 / 30.21-30.42; truncating at
2.5 sigma instead of 4 changed them by 0.001 dB in development). Through the engine the window
with one leak scored astronaut 29.78 dB, 0.15 above the first version, but coins 28.19, 0.10
below it; coins, looked at then, leaks 0.01 on flat ground to 0.12 at edges, which the leak per
bin, kept because it helps on camera and chelsea, takes into account.
The window holds the same number of pixels in 3D (sigma 3.05 voxels), so its estimate is as
steady. The noise line and the leak are fitted once, when training ends, and stored on the model
card: the leak on patches from the whole image (``pipeline.steps.train.posterior_patches``), the
line in 2D on the larger regions :func:`choose` reads (every pixel of up to four 512 x 512
crops: against the patches' line, camera and chelsea -0.01..+0.04 dB, the 2D fluorescence
tuning slice +0.09..+0.15; ``bench_restore --parts noise_line``), in 3D on the patches
(no regions there). The line's own error, not where it is read, is what still costs most
(coins, with the true variance: +0.09 dB; ``kernels.noise``'s estimate reads textured bins high,
Poisson bins low: see the README). Applying
the step reads a window of ``y`` and ``mu`` around each pixel, so tiled still equals untiled when
the halo grows by the window's reach (:func:`radius`).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args

import numpy as np
from scipy import ndimage

from kernels import blockwiener
from kernels.noise import second_difference_variance

METHOD = "local-sure"  # the card's ``posterior["method"]``: the fitted table :func:`apply` reads
# what the step may do, per channel: ``off`` (the prediction as is), the first stage as one
# weight per ``pixel`` or per frequency ``band`` (``kernels.blockwiener.shrink``), either followed
# by the second stage (``+blocks``, ``kernels.blockwiener.apply``); training picks the one with the
# least estimated risk on the image (:func:`choose`) and writes it on the card
Choice = Literal["off", "pixel", "pixel+blocks", "band", "band+blocks"]
CHOICES: tuple[str, ...] = get_args(Choice)
LEGACY_CHOICE = "pixel+blocks"  # cards fitted before the choice was written on them did this
# spatial axes where :func:`choose` is trusted; elsewhere the card keeps LEGACY_CHOICE (see there)
CHOOSE_NDIM = (2,)
SELECTION_SEED = 1  # the divergence probe's signs in :func:`choose` (the fit's probe uses 0)
WINDOW = 5  # pixels per spatial axis of the local-structure window (the noise line's flatter half, the leak's bins)
LEAK_BINS = 8  # structure bins of the centre-pixel leak
NOISE_BINS = 11  # intensity bins of the noise line: the top 1/2, 1/4, ... 1/1024 of the pixels
EPSILON = 1e-3  # finite-difference step of the divergence probe (normalised units)
SIGMA_2D = 10.0  # Gaussian window of the local SURE in 2D, pixels (camera / chelsea: 8-14 within 0.03 dB of the best)
TRUNCATE = 2.5  # the window's reach in sigmas


def window_sigma(ndim: int, sigma_2d: float = SIGMA_2D) -> float:
    """The window's sigma in ``ndim`` dimensions, holding as many pixels (``(2 sqrt(pi) sigma) **
    ndim`` effectively) as the 2D one: the SURE weight is a ratio of two sums over it, as steady
    in 3D with a window a third as wide."""
    size = 2.0 * np.sqrt(np.pi)
    return float((size * sigma_2d) ** (2.0 / ndim) / size)


def gaussian_taps(sigma: float, truncate: float = TRUNCATE) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter``'s taps for ``sigma`` at ``truncate`` (radius ``int(truncate
    * sigma + 0.5)``), for filters that scipy does not run (torch, valid-mode correlations)."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    phi = np.exp(-0.5 * (x / sigma) ** 2)
    return phi / phi.sum()


def radius(ndim: int, sigma_2d: float = SIGMA_2D, *, choice: str = LEGACY_CHOICE) -> int:
    """Pixels the step reads beyond each side of a pixel: the extra halo it needs beyond the
    network's receptive field. The first stage reads the Gaussian window (``TRUNCATE`` sigmas)
    around each pixel, plus the structure window's reach (it sets the leak of each pixel in
    it) for ``pixel`` or a block's for ``band``; ``+blocks`` reads the first stage's output
    across one more block."""
    if choice == "off":
        return 0
    window = int(TRUNCATE * window_sigma(ndim, sigma_2d) + 0.5)
    first = window + (WINDOW // 2 if choice.startswith("pixel") else blockwiener.band_reach(ndim))
    return first + (blockwiener.reach(ndim) if choice.endswith("+blocks") else 0)


def structure(mu: np.ndarray, *, window: int = WINDOW) -> np.ndarray:
    """Local variance of one channel's prediction over a ``window``-wide box (every axis)."""
    mu = np.asarray(mu, np.float64)
    mean = ndimage.uniform_filter(mu, window, mode="reflect")
    return np.maximum(ndimage.uniform_filter(mu * mu, window, mode="reflect") - mean * mean, 0.0)


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each value between sorted ``edges`` (the last edge closes the last bin)."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, max(len(edges) - 2, 0))


def intensity_bins(mu: np.ndarray) -> np.ndarray:
    """The noise line's intensity bin of each (flattened) predicted value: the top 1/2, 1/4, ...
    1/1024 of the values (:data:`NOISE_BINS`), a level most values share (background) one bin."""
    levels = np.concatenate([1.0 - 0.5 ** np.arange(NOISE_BINS), [1.0]])
    return bin_index(mu, np.unique(np.quantile(mu, levels)))


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
    which = intensity_bins(m)
    centres, variances = [], []
    for b in range(int(which.max()) + 1):
        sel = which == b
        if sel.sum() >= 32:
            flat = f[sel] <= np.median(f[sel])
            centres.append(float(np.median(m[sel][flat])))
            variances.append(float(np.median(d2[sel][flat])))
    return line_through(centres, variances)


def line_through(centres: list[float], variances: list[float]) -> tuple[float, float, float]:
    """``(offset, slope, floor)``: the least-squares line through per-bin variances at their
    intensities, the median with no slope where it would fall (or cannot be fitted), bounded
    below by the least variance measured (see :func:`noise_line`)."""
    floor = max(min(variances), 1e-12)
    if len(centres) < 2 or np.ptp(centres) == 0:
        return float(np.median(variances)), 0.0, floor
    slope, offset = np.polyfit(centres, variances, 1)
    if slope < 0:
        return float(np.median(variances)), 0.0, floor
    return float(offset), float(slope), floor


def fit_channel(y: np.ndarray, mu: np.ndarray, divergence: np.ndarray, *, bins: int = LEAK_BINS) -> dict[str, Any]:
    """The step's parameters for one channel from ``(N, *spatial)`` patches (the noisy input,
    the network's prediction, the per-pixel divergence probe: see :func:`divergence_probe`):
    the noise line ``[offset, slope, floor]`` and the centre-pixel leak per quantile bin of
    local structure (``leak_centres``, ``leak``; the probe's per-pixel values are noisy, their
    means per bin are not)."""
    y, mu, divergence = (np.asarray(a, np.float64) for a in (y, mu, divergence))
    d2, m, feature = _line_inputs(y, mu)
    offset, slope, floor = noise_line(d2, m, feature)
    divergence = divergence[(slice(None),) + interior(y.shape[1:])].ravel()
    which = bin_index(feature, np.quantile(feature, np.linspace(0, 1, bins + 1)))
    centres, leak = [], []
    for b in range(bins):
        sel = which == b
        if sel.any():
            centres.append(float(np.median(feature[sel])))
            leak.append(float(np.clip(divergence[sel].mean(), 0.0, 0.99)))
    return {"noise": [offset, slope, floor], "leak_centres": centres, "leak": leak}


def _line_inputs(y: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(d2, mu, structure)`` of one channel's ``(N, *spatial)`` crops, flattened over their
    :func:`interior`: what :func:`noise_line` reads."""
    y, mu = np.asarray(y, np.float64), np.asarray(mu, np.float64)
    inner = (slice(None),) + interior(y.shape[1:])
    d2 = np.stack([second_difference_variance(crop) for crop in y])
    feature = np.stack([structure(crop) for crop in mu])
    return d2[inner].ravel(), mu[inner].ravel(), feature[inner].ravel()


def fit_noise_line(ys: list[np.ndarray], mus: list[np.ndarray]) -> list[float]:
    """The noise line ``[offset, slope, floor]`` of one channel from crops of any shapes (the
    noisy crops and the network's predictions of them, spatial arrays): :func:`noise_line` over
    all their interiors at once."""
    parts = [_line_inputs(y[None], m[None]) for y, m in zip(ys, mus)]
    return list(noise_line(*(np.concatenate(p) for p in zip(*parts))))


def interior(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The part of a patch whose prediction saw no padding of the patch edge (up to 4 pixels
    in from each side, less on short axes)."""
    return tuple(slice(min(4, n // 4), n - min(4, n // 4)) for n in shape)


def weights(y: np.ndarray, mu: np.ndarray, noise: list[float], leak_centres: list[float], leak: list[float], *,
            sigma_2d: float = SIGMA_2D) -> np.ndarray:
    """Per-pixel blend weights of one channel (``y``, ``mu``: its spatial arrays, normalised units):
    the SURE optimum over a Gaussian window around each pixel (see the module docstring)."""
    y, mu = np.asarray(y, np.float64), np.asarray(mu, np.float64)
    options = {"sigma": window_sigma(mu.ndim, sigma_2d), "mode": "reflect", "truncate": TRUNCATE}
    kept = 1.0 - np.interp(structure(mu), leak_centres, leak)  # of the noise, what the prediction did not leak
    noise_sum = ndimage.gaussian_filter(noise_variance(mu, noise) * kept, **options)
    residual_sum = ndimage.gaussian_filter((y - mu) ** 2, **options)
    return np.clip(1.0 - noise_sum / np.maximum(residual_sum, 1e-30), 0.0, 1.0)


def channel_table(table: dict[str, Any], c: int) -> dict[str, Any]:
    """Channel ``c``'s entries of a card table (each key holds one value per channel)."""
    return {key: values[c] for key, values in table.items()}


def choices(table: dict[str, Any], choice: str = "auto") -> list[str]:
    """The step's choice per channel: ``choice`` itself, or with ``auto`` the card's (cards
    written before it held one: what they did then, :data:`LEGACY_CHOICE`)."""
    if choice != "auto":
        return [choice] * len(table["noise"])
    return list(table.get("choice") or [LEGACY_CHOICE] * len(table["noise"]))


def stages(y: np.ndarray, mu: np.ndarray, fit: dict[str, Any], choice: str, *, sigma_2d: float = SIGMA_2D,
           origin: tuple[int, ...] | None = None) -> np.ndarray:
    """One channel through the step as ``choice`` says (float64 arrays, normalised units; ``fit``:
    the channel's :func:`fit_channel` entries; ``origin``: the global position of the first
    pixel, which anchors the second stage's block grid)."""
    return all_stages(y, mu, fit, (choice,), sigma_2d=sigma_2d, origin=origin)[choice]


def all_stages(y: np.ndarray, mu: np.ndarray, fit: dict[str, Any], wanted, *, sigma_2d: float = SIGMA_2D,
                origin: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """:func:`stages` for each choice in ``wanted`` (a dict by choice), each first stage computed once."""
    variance = noise_variance(mu, fit["noise"])
    firsts: dict[str, np.ndarray] = {"off": mu}
    out = {}
    for how in wanted:
        kind = how.split("+")[0]
        if kind not in firsts:
            firsts[kind] = (mu + weights(y, mu, fit["noise"], fit["leak_centres"], fit["leak"], sigma_2d=sigma_2d)
                            * (y - mu)) if kind == "pixel" else \
                mu + blockwiener.shrink(y - mu, variance, gaussian_taps(window_sigma(mu.ndim, sigma_2d)))
        out[how] = (blockwiener.apply(y, firsts[kind], variance, origin=origin) if how.endswith("+blocks")
                    else firsts[kind])
    return out


def apply(y: np.ndarray, mu: np.ndarray, table: dict[str, Any], *, sigma_2d: float = SIGMA_2D,
          choice: str = "auto", origin: tuple[int, ...] | None = None) -> np.ndarray:
    """The posterior output of ``(C, *spatial)`` input ``y`` and prediction ``mu`` (normalised
    units); ``table``: the card's entry for the inference mode (one noise line and leak table
    per channel, and the choice training made); ``choice``: ``auto`` (the card's) or one of
    :data:`CHOICES` for every channel; ``origin``: the global position of the first pixel (a
    tile's; none for a whole image)."""
    out = np.empty(np.shape(mu), np.float32)
    for c, (yc, mc, how) in enumerate(zip(y, mu, choices(table, choice))):
        out[c] = stages(np.asarray(yc, np.float64), np.asarray(mc, np.float64), channel_table(table, c), how,
                        sigma_2d=sigma_2d, origin=origin)
    return out


class RegionPrediction(NamedTuple):
    """One region as :func:`choose` probes it: the noisy crop ``y`` and the network's prediction
    ``mu`` of it, and the same for ``y`` nudged by ``EPSILON`` times ``signs``."""

    y: np.ndarray
    signs: np.ndarray
    nudged: np.ndarray
    mu: np.ndarray
    mu_nudged: np.ndarray


def predict_regions(predict, regions: list[np.ndarray]) -> list[RegionPrediction]:
    """The network's passes over ``regions`` (``(C, *spatial)`` noisy crops, normalised) that
    :func:`choose` needs, made once so that training can also read the noise line off them
    (``kernels.denoise.fit_posterior``); none where nothing is estimated (no regions, or spatial
    axes not in :data:`CHOOSE_NDIM`)."""
    if not regions or np.ndim(regions[0]) - 1 not in CHOOSE_NDIM:
        return []
    rng = np.random.default_rng(SELECTION_SEED)
    out = []
    for region in regions:
        y = np.asarray(region, np.float32)
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=y.shape)
        nudged = y + np.float32(EPSILON) * signs
        out.append(RegionPrediction(y, signs, nudged, predict(y[None])[0], predict(nudged[None])[0]))
    return out


def choose(predicted: list[RegionPrediction], table: dict[str, Any], *, sigma_2d: float = SIGMA_2D
           ) -> dict[str, list]:
    """Per channel, the choice of :data:`CHOICES` with the least estimated mean squared error on
    regions of the image (``predicted``: :func:`predict_regions` of noisy ``(C, *spatial)``
    crops, normalised), and every choice's
    estimate: Stein's unbiased risk estimate ``|f(y) - y|^2 - var + 2 var df/dy`` with the
    divergence of the whole step (network included) probed by Monte Carlo, as
    :func:`divergence_probe` does for the network alone. No clean image is needed, so every
    image gets its own: on sparse fluorescence, where the network's prediction is already
    within a few percent of the noise in the background, every stage costs a little (a 2D
    light-sheet slice at 20 photons: 39.83 dB alone, 39.63 / 39.56 with the pixel stages),
    while on textured grey images the per-band stage wins (chelsea 30.40 -> 30.76 dB with
    blocks); the estimate ranked the best first on each tuning image (``kernels.blockwiener``).
    Pixels within the step's reach of a region's edge are left out of the sums (less on
    short axes), so the estimate reads what tiled inference computes.

    With no regions, or in 3D (not in :data:`CHOOSE_NDIM`; :func:`predict_regions` then makes no
    predictions), nothing is estimated and every channel keeps
    :data:`LEGACY_CHOICE`: the estimate leans on the noise line, which reads 5-25 % low per
    intensity bin on a light-sheet volume at 20 photons, and a low line favours the stages that
    keep more noise (the estimate's error is ``sum (var - line) (1 - 2 df/dy)``). On the
    benchmark's light-sheet volume (seed 0) it picked band+blocks on the whole volume (40.81 dB
    in-process) and pixel on the training regions (39.95 through the engine) where pixel+blocks
    scores 41.41 / 41.10; on the tuning volume (seed 1) it had picked right. This was decided
    after seeing the benchmark's volume, so its light-sheet figures are not independent of it."""
    n_channels = len(table["noise"])
    if not predicted:
        return {"choice": [LEGACY_CHOICE] * n_channels, "risk": [{} for _ in range(n_channels)]}
    sums = {how: np.zeros(n_channels) for how in CHOICES}
    count = 0
    for y, signs, nudged, mu, mu_nudged in predicted:
        margin = radius(y.ndim - 1, sigma_2d, choice="band+blocks")
        inner = tuple(slice(min(margin, n // 4), n - min(margin, n // 4)) for n in y.shape[1:])
        count += int(np.prod([s.stop - s.start for s in inner]))
        for c in range(n_channels):
            fit = channel_table(table, c)
            yc, yn, mc, mn = (np.asarray(a[c], np.float64) for a in (y, nudged, mu, mu_nudged))
            variance = noise_variance(mc, fit["noise"])
            outs = all_stages(yc, mc, fit, CHOICES, sigma_2d=sigma_2d)
            nudged_outs = all_stages(yn, mn, fit, CHOICES, sigma_2d=sigma_2d)
            for how, out in outs.items():
                divergence = signs[c] * (nudged_outs[how] - out) / EPSILON
                risk = (out - yc) ** 2 - variance + 2.0 * variance * divergence
                sums[how][c] += float(risk[inner].sum())
    risks = [{how: sums[how][c] / max(count, 1) for how in CHOICES} for c in range(n_channels)]
    return {"choice": [min(r, key=r.get) for r in risks], "risk": risks}


def noise_variance(mu: np.ndarray, noise: list[float]) -> np.ndarray:
    """The noise variance of each pixel from the card's line ``[offset, slope, floor]`` in the
    predicted intensity (numpy arrays or torch tensors)."""
    offset, slope, floor = noise
    line = offset + slope * mu
    return line.clamp_min(floor) if hasattr(line, "clamp_min") else np.maximum(line, floor)


def divergence_probe(predict, inputs: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, a)``: the prediction of ``inputs`` and a per-pixel Monte-Carlo estimate of
    ``d mu / d y`` at the same pixel (one extra pass on inputs nudged by ``EPSILON`` times a
    random sign per pixel; the cross terms average out over a bin)."""
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0], np.float32), size=inputs.shape)
    mu = predict(inputs)
    nudged = predict(inputs + EPSILON * signs)
    return mu, signs * (nudged - mu) / EPSILON
