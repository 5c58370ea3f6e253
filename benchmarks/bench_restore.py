"""Restoration quality: single images against non-local means, supervised against
self-supervised training, and what attribution costs (``benchmarks/results/restore.json``).

    python -m benchmarks.bench_restore [--parts single,pairs,attribution,ensemble,posterior_variants,posterior_3d,
                                                posterior_fluorescence,noise_line]
                                       [--images astronaut,coins,moon] [--steps-pairs 1500]
                                       [--pair-datasets dsb2018,lightsheet] [--pair-methods n2v2,n2s,n2n,care]
                                       [--reuse-models] [--workdir W]

``single``: scikit-image's astronaut (as grey), coins and moon, 0..255, Gaussian noise sigma 25
(seed 0, not clipped). Each row is the default ``tilewise train denoise`` (N2V2) then
``tilewise denoise`` through the engine (test-time augmentation ``auto``: on for images this
small) with the posterior step (``kernels.posterior``: the noisy pixel put back; the stages
training chose for the image, ``posterior_choice``, by their estimated risk, ``posterior_risk``),
the same model without augmentation, and with augmentation but without the posterior step; non-local
means at its best ``h`` (oracle-tuned against the clean image: fast mode over h/sigma 0.3..1.4,
the slow mode at three h around the best values found in development) and BM3D (the ``bm3d`` package, true sigma) where it installs.
The training defaults were chosen on astronaut (``kernels.denoise.TrainConfig``), the posterior
step on scikit-image's camera and chelsea (``--images camera,chelsea --results
restore_tuning``); moon was used to choose neither, coins was looked at to find why versions
of the posterior step lost there (``kernels.posterior``; ``noise_line``), nothing chosen on it.
``posterior_variants`` (after ``single`` on the same ``--images`` and ``--workdir``): variants of
the posterior step's two stages on the models ``single`` trained, in-process on the whole image.
``posterior_3d``: the second stage's block width and step between blocks in 3D, on a tuning
light-sheet volume (seed 1).
``posterior_fluorescence``: the same on 2D fluorescence tuning data (a light-sheet slice, seed 3).
Those three also score every choice of stages (``by_choice``) and what the risk estimate picks
on the whole image (``chosen``, ``risk``).
``noise_line`` (after the parts above on the same ``--workdir``): the posterior step's noise
line against the true noise variance, per intensity bin, and the PSNR it costs; the card's line
against the whole image's (which chose, on the tuning images, where 2D training reads it); two
readings meant to resist texture (the least of two orientations of the mask, and the patch
covariance's smallest eigenvalues per bin, Chen et al. 2015), scored and not adopted.
``ensemble``: the MC-dropout model (``--uncertainty mc-dropout``: dropout in every block, kept
at inference, 20 passes averaged) on the same images: its PSNR and its cost.
``pairs``: the real DSB-2018 nuclei image and the synthetic light-sheet volume (its clean
image), scaled to 20 photons at the brightest pixel, two independent Poisson realisations plus
Gaussian read noise (2 % of the peak): N2V2 and N2S train on the first, N2N on (first, second),
CARE on (first, clean); PSNR / SSIM against the clean image, training seconds (N2V2 and N2S:
also without the posterior step, ``psnr_posterior_off``).
``attribution``: seconds per object of integrated gradients, occlusion and Grad-CAM through
the engine (the DSB CARE model, objects from the classical segmenter), and the largest IG
completeness error.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.measure import previous, save

SIGMA = 25.0
RESULTS_NAME = "restore"
# the second stage's (block width, step between blocks) pairs scored on the tuning data
GRIDS_2D = ((8, 1), (8, 2), (10, 2), (12, 2), (12, 3), (16, 3), (16, 4))
GRIDS_3D = ((6, 1), (6, 2), (6, 3), (8, 2), (8, 3), (8, 4), (10, 2), (10, 3), (10, 4), (12, 3), (12, 4), (12, 5),
            (14, 4), (16, 4), (16, 5))
NLM_SLOW_H = {"astronaut": (0.8, 0.9, 1.0), "coins": (0.7, 0.8, 0.9), "moon": (1.0, 1.1, 1.2)}


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return 10 * np.log10(data_range**2 / mse)


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(ref.astype(np.float64), x.astype(np.float64), data_range=data_range))


def grey_image(name: str) -> np.ndarray:
    from skimage import color, data

    image = getattr(data, name)()
    return (color.rgb2gray(image) * 255.0 if image.ndim == 3 else image.astype(np.float64)).astype(np.float64)


def write(url: str, image: np.ndarray, chunks=None, overwrite: bool = False) -> str:
    from pipeline.io import create_image, default_axes

    axes = default_axes("zyx"[-image.ndim:])
    sink = create_image(url, shape=image.shape, dtype=np.float32, axes=axes, n_levels=1, overwrite=overwrite,
                        chunks=chunks or ((256, 256) if image.ndim == 2 else (32, 128, 128)))
    sink.write((slice(None),) * image.ndim, image.astype(np.float32))
    return url


def read(url: str) -> np.ndarray:
    from pipeline.io import open_image

    source = open_image(url)
    return source.read((slice(None),) * len(source.dims))


def nl_means(noisy: np.ndarray, clean: np.ndarray, name: str) -> dict:
    from skimage.restoration import denoise_nl_means

    x, s = noisy / 255.0, SIGMA / 255.0
    rows = {}
    slow = NLM_SLOW_H.get(name, (0.8, 0.9, 1.0))  # other images (the tuning images): astronaut's
    for fast, grid in ((True, np.round(np.arange(0.3, 1.45, 0.1), 2)), (False, slow)):
        t0 = time.perf_counter()
        scores = {float(h): psnr(denoise_nl_means(x, h=h * s, sigma=s, fast_mode=fast) * 255.0, clean, 255.0)
                  for h in grid}
        h = max(scores, key=scores.get)
        rows["nl_means_fast" if fast else "nl_means_slow"] = {"psnr": scores[h], "h_over_sigma": h,
                                                              "seconds_grid": time.perf_counter() - t0}
    best = max(("nl_means_fast", "nl_means_slow"), key=lambda k: rows[k]["psnr"])
    rows["nl_means_best"] = {**rows[best], "mode": best}
    return rows


def bm3d_row(noisy: np.ndarray, clean: np.ndarray) -> dict | None:
    try:
        import bm3d
    except ImportError:
        return None
    t0 = time.perf_counter()
    out = bm3d.bm3d(noisy / 255.0, SIGMA / 255.0) * 255.0
    return {"psnr": psnr(out, clean, 255.0), "seconds": time.perf_counter() - t0}


def learned(noisy_url: str, clean: np.ndarray, data_range: float, work: Path, client, name: str, *,
            method: str = "n2v2", target: str | None = None, steps: int | None = None, patch=None,
            uncertainty: str | None = None, ttas=("auto",), posterior_off: bool = False, reuse: bool = False) -> dict:
    """Train with the library's defaults (``steps``/``patch`` only where given), denoise through
    the engine once per ``tta`` setting (``posterior_off``: and once more with ``tta`` auto and
    the posterior step off); PSNR / SSIM against ``clean``. ``reuse``: a model already in
    ``work`` is not trained again (inference re-measured; ``train_s`` read off its card)."""
    from kernels.modelfile import read_card
    from kernels.posterior import choices
    from pipeline.steps.denoise import denoise
    from pipeline.steps.train import train_denoise

    model = str(work / f"model-{name}")
    extra = {k: v for k, v in {"steps": steps, "patch": patch, "target": target, "uncertainty": uncertainty}.items()
             if v is not None}
    t0 = time.perf_counter()
    reused = reuse and (Path(model) / "card.json").exists()
    if reused:
        card = read_card(model)
        train_s = float(card.training["seconds"])
    else:
        card = train_denoise(noisy_url, model, method=method, overwrite=True, progress=False, device="cpu", **extra)
        train_s = time.perf_counter() - t0
    row = {"method": method, "train_s": train_s, "steps_run": card.training["history"][-1]["step"],
           "width": card.architecture["width"], "validation_loss": card.validation_loss, "model_reused": reused}
    if card.posterior:  # the stages training chose by estimated risk, and the estimates (normalised units)
        row["posterior_choice"] = {mode: choices(card.posterior[mode])[0] for mode in ("plain", "tta")}
        row["posterior_risk"] = {mode: (card.posterior[mode].get("risk") or [None])[0] for mode in ("plain", "tta")}
    for tta, posterior in [(tta, True) for tta in ttas] + ([("auto", False)] if posterior_off else []):
        out = str(work / f"out-{name}-{tta}-{posterior}.ome.zarr")
        t0 = time.perf_counter()
        summary, _ = denoise(noisy_url, out, model, client, progress=False, overwrite=True, tta=tta,
                             posterior="auto" if posterior else "off")
        result = read(out)
        key = ("" if tta == "auto" else f"_tta_{tta}") + ("" if posterior else "_posterior_off")
        row.update({f"psnr{key}": psnr(result, clean, data_range), f"ssim{key}": ssim(result, clean, data_range),
                    f"inference_s{key}": time.perf_counter() - t0})
    row["total_s"] = row["train_s"] + row["inference_s"]
    return row


def noisy_pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) of one scikit-image image: sigma 25, seed 0."""
    clean = grey_image(name)
    return clean, clean + np.random.default_rng(0).normal(0, SIGMA, clean.shape)


def noisy_single(name: str, work: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(clean, noisy, noisy store URL) of one scikit-image image (:func:`noisy_pair`)."""
    clean, noisy = noisy_pair(name)
    return clean, noisy, write(str(work / f"{name}.ome.zarr"), noisy)


def single(names, work: Path, client, results: dict) -> None:
    rows = results.setdefault("single", {})
    for name in names:
        clean, noisy, url = noisy_single(name, work)
        row = {"dataset": name, "shape": list(clean.shape), "noisy": psnr(noisy, clean, 255.0)}
        row["n2v2"] = learned(url, clean, 255.0, work, client, name, ttas=("auto", "off"), posterior_off=True)
        row.update(nl_means(noisy, clean, name))
        row["bm3d"] = bm3d_row(noisy, clean)
        row["n2v2_minus_nl_means_db"] = row["n2v2"]["psnr"] - row["nl_means_best"]["psnr"]
        row["target_met"] = bool(row["n2v2_minus_nl_means_db"] >= 0.5 and row["n2v2"]["total_s"] < 900)
        rows[name] = row
        print(name, {k: round(v["psnr"], 2) for k, v in row.items() if isinstance(v, dict) and "psnr" in v},
              f"n2v2 {row['n2v2']['total_s']:.0f} s", flush=True)
        save(RESULTS_NAME, results)


def _probed(model: str, noisy: np.ndarray):
    """``(y, mu, a, lo, hi, choose)``: the normalised noisy image, the model's prediction with
    TTA and its centre-pixel leak probe (``kernels.posterior.divergence_probe``), in-process;
    ``choose(fit)``: ``kernels.posterior.choose`` on the whole image with a fitted table."""
    from kernels import posterior
    from kernels.denoise import DenoiseKernel

    kernel = DenoiseKernel(DenoiseKernel.Params(model=model, tta=True, posterior="off"))
    kernel.load("cpu")
    lo, hi = np.percentile(noisy, kernel.traits.percentiles)
    y = ((noisy - lo) / (hi - lo)).astype(np.float32)
    mu, a = (v[0, 0].astype(np.float64) for v in posterior.divergence_probe(kernel.predict, y[None, None]))

    def choose(fit: dict) -> dict:
        table = {k: [v] for k, v in fit.items()}
        picked = posterior.choose(posterior.predict_regions(kernel.predict, [y[None]]), table)
        return {"chosen": picked["choice"][0], "risk": picked["risk"][0]}

    return y.astype(np.float64), mu, a, lo, hi, choose


def _stages(y: np.ndarray, mu: np.ndarray, fit: dict, score, blocks: Sequence[int],
            grids: Sequence[tuple[int, int]] = ()) -> dict:
    """The posterior step's two stages scored apart: the first (the per-pixel blend), the
    second (``kernels.blockwiener``) at several block widths on the first's output, and at the
    default width on the prediction alone (the other pilot); then every choice the step can
    make (``by_choice``: per-pixel or per-band first stage, with or without the blocks)."""
    from kernels import blockwiener, posterior

    by_choice = posterior.all_stages(y, mu, fit, posterior.CHOICES)
    first = by_choice["pixel"]
    variance = posterior.noise_variance(mu, fit["noise"])
    default = blockwiener.BLOCK[y.ndim]
    by_block = {str(b): score(blockwiener.apply(y, first, variance, block=b, step=1))
                for b in sorted({*blocks, default})}
    by_grid = {}
    for block, step in grids:  # block width, pixels between block starts
        t0 = time.perf_counter()
        estimate = blockwiener.apply(y, first, variance, block=block, step=step)
        by_grid[f"{block}/{step}"] = {"psnr": score(estimate), "seconds": time.perf_counter() - t0}
    return {"prediction": score(mu), "first_stage": score(first), "second_stage_by_block": by_block,
            "second_stage_by_grid": by_grid,
            "second_stage_prediction_pilot": score(blockwiener.apply(y, mu, variance, block=default)),
            "default": score(by_choice["pixel+blocks"]),  # the default block grid
            "by_choice": {how: score(estimate) for how, estimate in by_choice.items()}}


def posterior_variants(names, work: Path, results: dict) -> None:
    """Variants of the posterior step (``kernels.posterior``) on the models ``single`` trained
    in ``work``, in-process on the whole image with TTA (how the step was chosen): the
    prediction alone; of the first stage, one SURE weight per bin of local structure (its first
    version, re-implemented here for the comparison), the per-pixel window with one leak for
    the image, the default (the leak per structure bin) at several window sizes; of the second
    stage, the block widths and pilots (:func:`_stages`)."""
    from kernels import posterior

    rows = results.setdefault("posterior_variants", {})
    for name in names:
        clean, noisy = noisy_pair(name)
        y, mu, a, lo, hi, choose = _probed(str(work / f"model-{name}"), noisy)

        def score(estimate) -> float:
            return psnr(estimate * (hi - lo) + lo, clean, 255.0)

        def blend(w) -> float:
            return score(mu + w * (y - mu))

        fit = posterior.fit_channel(y[None], mu[None], a[None])
        noise = fit["noise"]
        feature = posterior.structure(mu)
        bins = 8  # the first version's structure bins
        which = posterior.bin_index(feature, np.quantile(feature, np.linspace(0, 1, bins + 1)))
        var = posterior.noise_variance(mu, noise) * (1.0 - a)
        per_bin = np.array([np.clip(1 - var[which == b].sum() / ((y - mu)[which == b] ** 2).sum(), 0, 1)
                            for b in range(bins)])
        row = {"structure_bins_first_version": blend(per_bin[which]),
               "window_one_leak": blend(posterior.weights(y, mu, noise, [0.0], [float(a.mean())])),
               "leak_per_bin": fit["leak"]}
        row["window_by_sigma"] = {str(sigma): blend(posterior.weights(y, mu, noise, fit["leak_centres"], fit["leak"],
                                                                        sigma_2d=sigma))
                                  for sigma in (4.0, 6.0, 8.0, posterior.SIGMA_2D, 14.0, 20.0)}
        row.update(_stages(y, mu, fit, score, blocks=(4, 6, 8, 12), grids=GRIDS_2D), **choose(fit))
        rows[name] = row
        print(name, {k: round(v, 2) for k, v in row.items() if isinstance(v, float)}, row["second_stage_by_block"],
              row["second_stage_by_grid"], row["by_choice"], row["chosen"], flush=True)
        save(RESULTS_NAME, results)


def posterior_3d(work: Path, client, results: dict, steps: int) -> None:
    """The posterior step's block width and step between blocks (``GRIDS_3D``) in 3D, on tuning
    data: the synthetic light-sheet volume made as ``pairs`` makes it but with seed 1 (``pairs``
    reports seed 0), its first noisy realisation, N2V2 trained with ``pairs``' settings (kept in
    ``work`` and reused)."""
    from pipeline.data.synthetic import make_lightsheet
    from pipeline.steps.train import train_denoise

    volume = str(work / "lightsheet-tuning.ome.zarr")
    model = work / "model-lightsheet-tuning"
    first_url = str(work / "lightsheet-tuning-first.ome.zarr")
    if not Path(volume).exists():
        make_lightsheet(volume, client, shape=(32, 128, 128), seed=1, overwrite=True, progress=False)
    clean, first, _ = pair_images(read(volume + "/clean"))
    if not (model / "card.json").exists():
        write(first_url, first)
        train_denoise(first_url, str(model), steps=steps, patch=(16, 32, 32), overwrite=True, progress=False)
    results["posterior_3d"] = {"dataset": "lightsheet seed 1 (tuning)", "shape": list(clean.shape),
                               **_tuning_row(str(model), clean, first, blocks=(4, 6, 8), grids=GRIDS_3D)}
    save(RESULTS_NAME, results)


def _tuning_row(model: str, clean: np.ndarray, noisy: np.ndarray, blocks: Sequence[int],
                grids: Sequence[tuple[int, int]] = ()) -> dict:
    """:func:`_stages` and the step's own choice (:func:`_probed`) for a tuning image."""
    from kernels import posterior

    y, mu, a, lo, hi, choose = _probed(model, noisy)
    fit = posterior.fit_channel(y[None], mu[None], a[None])
    row = _stages(y, mu, fit, lambda e: psnr(e * (hi - lo) + lo, clean, float(clean.max())), blocks=blocks,
                  grids=grids)
    row.update(choose(fit))
    print({k: round(v, 2) for k, v in row.items() if isinstance(v, float)}, row["second_stage_by_block"],
          row["second_stage_by_grid"], row["by_choice"], row["chosen"], flush=True)
    return row


def posterior_fluorescence(work: Path, client, results: dict) -> None:
    """The posterior step on 2D fluorescence tuning data: a slice of a synthetic light-sheet
    volume (seed 3; neither ``pairs``' seed 0 nor ``posterior_3d``'s seed 1) at 20 photons as
    ``pairs`` makes it, N2V2 trained with the defaults (``train denoise`` as a user runs it)."""
    from pipeline.data.synthetic import make_lightsheet
    from pipeline.steps.train import train_denoise

    volume = str(work / "fluorescence-tuning.ome.zarr")
    model = work / "model-fluorescence-tuning"
    first_url = str(work / "fluorescence-tuning-first.ome.zarr")
    if not Path(volume).exists():
        make_lightsheet(volume, client, shape=(6, 448, 448), seed=3, overwrite=True, progress=False)
    clean, first, _ = pair_images(read(volume + "/clean")[3])
    if not (model / "card.json").exists():
        write(first_url, first)
        train_denoise(first_url, str(model), overwrite=True, progress=False)
    results["posterior_fluorescence"] = {"dataset": "lightsheet seed 3, slice 3 (2D tuning)",
                                         "shape": list(clean.shape), **_tuning_row(str(model), clean, first, (8,))}
    save(RESULTS_NAME, results)


def _flat_features(mu: np.ndarray) -> dict:
    """Ways to pick the flatter half of each intensity bin for the noise line: the default
    (``kernels.posterior.structure``: the prediction's variance over a 5-pixel box), none, and
    two features read at a coarser scale (less tied to the same pixels' noise than the default)."""
    from scipy import ndimage

    from kernels import posterior

    return {"structure (default)": posterior.structure(mu), "none": np.zeros_like(mu),
            "variance over 9 of mu smoothed 1.5": posterior.structure(ndimage.gaussian_filter(mu, 1.5), window=9),
            "gradient of mu smoothed 2": ndimage.gaussian_gradient_magnitude(mu, 2.0)}


def _diagonal_second_difference(image: np.ndarray) -> np.ndarray:
    """``kernels.noise.second_difference_variance`` with the 2D mask turned by 45 degrees (the
    second difference along both diagonals; in 3D times the one along the first axis), scaled
    alike: it has the same variance on noise (each tap lands on its own pixel) and answers to
    edges of other orientations."""
    from scipy import ndimage

    from kernels.noise import CHI2_1_MEDIAN, SECOND_DIFFERENCE

    kernel = np.zeros((5, 5))
    for u in (-1, 0, 1):
        for v in (-1, 0, 1):
            kernel[2 + u + v, 2 + u - v] = SECOND_DIFFERENCE[u + 1] * SECOND_DIFFERENCE[v + 1]
    r = np.asarray(image, np.float64)
    if r.ndim == 3:
        r = ndimage.correlate1d(r, SECOND_DIFFERENCE, axis=0, mode="reflect")
        kernel = kernel[None]
    r = ndimage.correlate(r, kernel, mode="reflect")
    return r * r / CHI2_1_MEDIAN / 6.0 ** r.ndim


def _least_orientation_reading(image: np.ndarray) -> np.ndarray:
    """Per pixel the lesser of the axis-aligned and the diagonal second-difference readings,
    rescaled so that its median on pure noise is again the variance (the two responses are
    jointly Gaussian with correlation 8/36 on white noise: the factor is the median of the
    lesser of their squares, by simulation on 10^6 pixels, seed 0)."""
    from kernels.noise import second_difference_variance

    noise = np.random.default_rng(0).normal(size=(1000, 1000))
    factor = np.median(np.minimum(second_difference_variance(noise), _diagonal_second_difference(noise))[4:-4, 4:-4])
    return np.minimum(second_difference_variance(image), _diagonal_second_difference(image)) / factor


def _patch_pca_variance(patches: np.ndarray) -> float:
    """The noise variance of ``(N, D)`` patches by Chen, Zhu & Heng (ICCV 2015): the mean of the
    smallest eigenvalues of their covariance, as many as keep that mean at or below their median
    (signal fills the largest ones)."""
    centred = patches - patches.mean(axis=0)
    eigenvalues = np.sort(np.linalg.eigvalsh(centred.T @ centred / len(centred)))[::-1]
    for i in range(len(eigenvalues)):
        tail = eigenvalues[i:]
        if tail.mean() <= np.median(tail):
            return float(tail.mean())
    return float(eigenvalues[-1])


def _pca_line(y: np.ndarray, m: np.ndarray, which: np.ndarray, inner: tuple[slice, ...]) -> tuple[list, list, list]:
    """``(bins, centres, variances)``: the noise line's per-bin variances read by
    :func:`_patch_pca_variance` off every pixel of each intensity bin (patches 5 x 5 in 2D,
    3 x 3 x 3 in 3D, centred on the bin's pixels) and the bins' median intensities; a bin with
    fewer than 4 patches per dimension is left out."""
    from numpy.lib.stride_tricks import sliding_window_view

    width = 5 if y.ndim == 2 else 3
    origin = tuple(slice(s.start - width // 2, s.stop - width // 2) for s in inner)
    patches = sliding_window_view(y, (width,) * y.ndim)[origin].reshape(-1, width ** y.ndim)
    bins, centres, variances = [], [], []
    for b in np.unique(which):
        sel = which == b
        if sel.sum() >= 4 * patches.shape[1]:
            bins.append(b)
            centres.append(float(np.median(m[sel])))
            variances.append(_patch_pca_variance(patches[sel]))
    return bins, centres, variances


def _noise_line_row(model: str, clean: np.ndarray, noisy: np.ndarray, true_variance: np.ndarray,
                    data_range: float, wanted: Sequence[str]) -> dict:
    """The fitted noise line against the true noise variance: per intensity bin (the line's own
    bins, its flatter half) the measured / true variance, and the PSNR of the ``wanted`` choices
    with the line from each flat-half feature read off the whole image, with the model card's
    line and with the true variance (whole image, TTA)."""
    from kernels import posterior
    from kernels.modelfile import read_card
    from kernels.noise import second_difference_variance

    y, mu, a, lo, hi, _ = _probed(model, noisy)
    true = np.broadcast_to(true_variance, y.shape) / (hi - lo) ** 2  # normalised units

    def score(estimate) -> float:
        return psnr(estimate * (hi - lo) + lo, clean, data_range)

    fit = posterior.fit_channel(y[None], mu[None], a[None])
    inner = posterior.interior(y.shape)
    d2, m, t = (v[inner].ravel() for v in (second_difference_variance(y), mu, true))
    which = posterior.intensity_bins(m)
    row: dict = {"by_feature": {}}
    features = {label: (feature, d2) for label, feature in _flat_features(mu).items()}
    # the second difference of the residual (noisy less prediction) instead of the noisy image:
    # less of the signal's texture, but the prediction carries the neighbours' noise
    features["structure, second difference of the residual"] = (features["structure (default)"][0],
                                                                 second_difference_variance(y - mu)[inner].ravel())
    # the lesser of the mask's response and the same mask turned by 45 degrees: texture of one
    # orientation passes one of them less (Immerkaer's mask cancels edges along the axes only)
    features["structure, least of two orientations"] = (features["structure (default)"][0],
                                                        _least_orientation_reading(y)[inner].ravel())
    for label, (feature, reading) in features.items():
        f = feature[inner].ravel()
        ratios = []
        for b in np.unique(which):
            sel = which == b
            flat = f[sel] <= np.median(f[sel])
            ratios.append(float(np.median(reading[sel][flat]) / t[sel][flat].mean()))
        noise = list(posterior.noise_line(reading, m, f))
        stages = posterior.all_stages(y, mu, dict(fit, noise=noise), wanted)
        row["by_feature"][label] = {"noise": noise, "measured_over_true_by_bin": ratios,
                                    "psnr": {how: score(v) for how, v in stages.items()}}
    # a reading made for texture: the smallest eigenvalues of the patches' covariance per bin
    # (every pixel of the bin, no flat half), the line through them as ``noise_line`` fits one
    bins, centres, variances = _pca_line(y, m, which, inner)
    noise = list(posterior.line_through(centres, variances))
    stages = posterior.all_stages(y, mu, dict(fit, noise=noise), wanted)
    ratios = [float(v / t[which == b].mean()) for b, v in zip(bins, variances)]
    row["patch_pca_line"] = {"noise": noise, "measured_over_true_by_bin": ratios,
                             "psnr": {how: score(v) for how, v in stages.items()}}
    # the line on the model's card: fitted when training ended (read off its patches by models
    # trained before the line moved to the regions); the leak stays the whole image's
    card = read_card(model).posterior["tta"]["noise"][0]
    stages = posterior.all_stages(y, mu, dict(fit, noise=card), wanted)
    row["card_line"] = {"noise": card, "psnr": {how: score(v) for how, v in stages.items()}}
    # the true variance is a line in the clean intensity (a constant for Gaussian noise)
    slope, offset = (np.polyfit(((clean - lo) / (hi - lo)).ravel(), true.ravel(), 1) if np.ptp(true)
                     else (0.0, true.flat[0]))
    exact = [float(offset), float(slope), float(true.min())]
    stages = posterior.all_stages(y, mu, dict(fit, noise=exact), wanted)
    row["true_line"] = {"noise": exact, "psnr": {how: score(v) for how, v in stages.items()}}
    row["true_line_scaled_psnr"] = {  # how much a line off by a few per cent costs
        str(k): score(posterior.all_stages(y, mu, dict(fit, noise=[k * v for v in exact]),
                                           ("pixel+blocks",))["pixel+blocks"]) for k in (0.9, 0.95, 1.05, 1.1)}
    print(Path(model).name, {k: {c: round(v, 3) for c, v in r["psnr"].items()} for k, r in row["by_feature"].items()},
          "pca", {c: round(v, 3) for c, v in row["patch_pca_line"]["psnr"].items()},
          "true", {c: round(v, 3) for c, v in row["true_line"]["psnr"].items()}, flush=True)
    return row


def noise_line(names, work: Path, results: dict) -> None:
    """How far the posterior step's noise line (``kernels.posterior.noise_line``) is from the
    true noise variance, and what that costs (a diagnosis: of it, only the card's line against
    the whole image's on the tuning images, camera, chelsea and the fluorescence slice, chose
    anything: 2D training reads the line off its regions), on
    the models other parts left in ``work``: ``single``'s for ``names`` (sigma 25), the 2D
    fluorescence and 3D light-sheet tuning models (``posterior_fluorescence``,
    ``posterior_3d``; Poisson at 20 photons plus read noise: variance ``clean + 0.16``)."""
    rows = results.setdefault("noise_line", {})
    for name in names:
        clean, noisy = noisy_pair(name)
        rows[name] = _noise_line_row(str(work / f"model-{name}"), clean, noisy, np.full(clean.shape, SIGMA ** 2),
                                     255.0, ("pixel", "pixel+blocks", "band+blocks"))
        save(RESULTS_NAME, results)
    tuning = {"fluorescence-tuning": (lambda c: c[3], ("pixel", "pixel+blocks", "band+blocks")),
              "lightsheet-tuning": (lambda c: c, ("pixel", "pixel+blocks"))}
    for name, (crop, wanted) in tuning.items():
        if not (work / f"model-{name}").exists():
            continue
        clean, first, _ = pair_images(crop(read(str(work / f"{name}.ome.zarr") + "/clean")))
        rows[name] = _noise_line_row(str(work / f"model-{name}"), clean, first, clean + (0.02 * 20.0) ** 2,
                                     float(clean.max()), wanted)
        save(RESULTS_NAME, results)


def ensemble(names, work: Path, client, results: dict) -> None:
    rows = results.setdefault("ensemble", {})
    for name in names:
        clean, _, url = noisy_single(name, work)
        rows[name] = {"dataset": name, **learned(url, clean, 255.0, work, client, f"{name}-mcd",
                                                 uncertainty="mc-dropout")}
        print(name, "mc-dropout", round(rows[name]["psnr"], 2), f"{rows[name]['total_s']:.0f} s", flush=True)
        save(RESULTS_NAME, results)


def pair_images(clean: np.ndarray, peak: float = 20.0):
    """Two independent noisy realisations of ``clean`` scaled to ``peak`` photons."""
    clean = clean.astype(np.float64)
    clean = (clean - clean.min()) / (clean.max() - clean.min()) * peak
    noisy = [(np.random.default_rng(seed).poisson(clean) + np.random.default_rng(seed + 10).normal(0, 0.02 * peak,
                                                                                                   clean.shape))
             for seed in (1, 2)]
    return clean, noisy[0], noisy[1]


def pairs(work: Path, client, results: dict, steps: int, which: Sequence[str] = ("dsb2018", "lightsheet"),
          methods: Sequence[str] = ("n2v2", "n2s", "n2n", "care"), reuse: bool = False) -> None:
    from pipeline.data.fetch import load_sample_arrays
    from pipeline.data.synthetic import make_lightsheet

    datasets = {}
    if "dsb2018" in which:
        datasets["dsb2018"] = load_sample_arrays("dsb2018")[0]
    if "lightsheet" in which:
        ls = str(work / "lightsheet.ome.zarr")
        make_lightsheet(ls, client, shape=(32, 128, 128), seed=0, overwrite=True, progress=False)
        datasets["lightsheet"] = read(ls + "/clean")
    rows = results["rows"] = [r for r in results.get("rows", [])
                              if r["dataset"] not in datasets or r["method"] not in methods]
    for dataset, base in datasets.items():
        clean, first, second = pair_images(base)
        urls = {k: write(str(work / f"{dataset}-{k}.ome.zarr"), v, overwrite=reuse)  # reused: the same images
                for k, v in (("first", first), ("second", second), ("clean", clean))}
        patch = None if base.ndim == 2 else (16, 32, 32)
        for method, target in (("n2v2", None), ("n2s", None), ("n2n", urls["second"]), ("care", urls["clean"])):
            if method not in methods:
                continue
            row = learned(urls["first"], clean, float(clean.max()), work, client, f"{dataset}-{method}",
                          method=method, target=target, steps=steps, patch=patch,
                          posterior_off=method in ("n2v2", "n2s"), reuse=reuse)
            rows.append({"dataset": dataset, "shape": list(clean.shape), "noisy_psnr": psnr(first, clean, clean.max()),
                         **row})
            print(dataset, method, round(row["psnr"], 2), round(row["ssim"], 3), f"{row['train_s']:.0f} s", flush=True)
            save(RESULTS_NAME, results)


def attribution(work: Path, client, results: dict) -> None:
    from pipeline.steps.explain import explain
    from pipeline.steps.segment import classical_spec, segment_labels

    model = work / "model-dsb2018-care"
    if not model.exists():
        results["attribution"] = {"skipped": "run --parts pairs first (it trains the DSB CARE model)"}
        return
    url = str(work / "dsb2018-first.ome.zarr")
    seg = str(work / "dsb-seg.ome.zarr")
    segment_labels(url, seg, classical_spec(url), client, progress=False, overwrite=True)
    rows = {}
    for method in ("ig", "occlusion", "gradcam"):
        summary = explain(seg, str(work / f"explain-{method}.ome.zarr"), client, model=str(model), method=method,
                          objects=list(range(1, 21)), panels=3, progress=False, overwrite=True)
        rows[method] = {"objects": summary.targets, "seconds_per_object": summary.seconds_per_target,
                        "completeness_error_max": summary.completeness_error_max}
        print("attribution", method, rows[method], flush=True)
    results["attribution"] = {"model": "DSB-2018 CARE (pairs part; its --steps-pairs), "
                                       "target: mean denoised value of the object",
                              "defaults": "ig 32 steps doubled per target until complete (figures before stop 41: "
                                          "32 fixed; a denoiser's targets stay at 32), zero baseline; occlusion "
                                          "8-pixel window, stride 4; gradcam deepest encoder block", **rows}
    save(RESULTS_NAME, results)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="single,pairs,attribution")
    parser.add_argument("--images", default="astronaut,coins,moon")
    parser.add_argument("--steps-pairs", type=int, default=1500)
    parser.add_argument("--pair-datasets", default="dsb2018,lightsheet", help="pairs part: datasets to (re)measure")
    parser.add_argument("--pair-methods", default="n2v2,n2s,n2n,care", help="pairs part: methods to (re)measure")
    parser.add_argument("--workdir")
    parser.add_argument("--reuse-models", action="store_true",
                        help="pairs: models already in --workdir are not trained again (inference re-measured)")
    parser.add_argument("--results", default="restore",
                        help="results name (benchmarks/results/NAME.json); parts run side by side need their own")
    args = parser.parse_args(argv)
    global RESULTS_NAME
    RESULTS_NAME = args.results
    parts = args.parts.split(",")
    from distributed import Client, LocalCluster

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tilewise-bench-restore-"))
    work.mkdir(parents=True, exist_ok=True)
    results = previous(RESULTS_NAME)
    results["note"] = __doc__.split("\n\n", 2)[2]
    results.setdefault("commands", {})
    results["commands"][args.parts] = "python -m benchmarks.bench_restore " + " ".join(argv or [])
    with LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        names = args.images.split(",")
        if "single" in parts:
            single(names, work, client, results)
        if "pairs" in parts:
            pairs(work, client, results, args.steps_pairs, args.pair_datasets.split(","), args.pair_methods.split(","),
                  reuse=args.reuse_models)
        if "attribution" in parts:
            attribution(work, client, results)
        if "ensemble" in parts:
            ensemble(names, work, client, results)
        if "posterior_variants" in parts:
            posterior_variants(names, work, results)
        if "posterior_3d" in parts:
            posterior_3d(work, client, results, args.steps_pairs)
        if "posterior_fluorescence" in parts:
            posterior_fluorescence(work, client, results)
        if "noise_line" in parts:
            noise_line(names, work, results)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
