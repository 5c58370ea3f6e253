"""Denoising quality (PSNR, dB) and speed, every row measured in one run on the same images.

    python -m benchmarks.bench_denoise [--steps-2d 2500] [--steps-3d 1000] [--lightsheet 32,192,192]
                                       [--images dsb,lightsheet]

``--images`` re-runs some images only; the rows of the others are kept from the last results.

Images: the real DSB-2018 nuclei image (fetched from the stardist wheel) scaled to 5 and 20
expected photons at the brightest pixel, with Poisson noise and Gaussian read noise of sigma 2 %
of that range; and the synthetic light-sheet volume (its ``clean`` image is the reference).
Rows: the noisy input, a Gaussian filter (best sigma on a grid), non-local means (skimage, best h
on a grid), Noise2Self and N2V2 (trained on the noisy image itself, run through the engine).
The Gaussian and NLM rows are oracle-tuned against the clean image; the learned rows are not.
About 55 minutes on 2 CPU cores (training dominates); minutes on a GPU.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import previous, save


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((x.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return 10 * np.log10(data_range**2 / mse)


def best_gaussian(noisy, clean, rng_):
    from scipy import ndimage

    sigmas = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
    scores = {s: psnr(ndimage.gaussian_filter(noisy, s), clean, rng_) for s in sigmas}
    s = max(scores, key=scores.get)
    return scores[s], {"sigma": s}


def best_nlm(noisy, clean, rng_):
    from skimage.restoration import denoise_nl_means

    sigma = float(np.std(noisy - clean))  # oracle noise level, like the oracle h grid
    scale = float(noisy.max() - noisy.min()) or 1.0
    x = (noisy - noisy.min()) / scale
    s = sigma / scale
    kw = dict(patch_size=5, patch_distance=6, fast_mode=True) if noisy.ndim == 2 else dict(patch_size=3, patch_distance=4, fast_mode=True)
    scores = {}
    for f in (0.4, 0.6, 0.8, 1.0, 1.2, 1.5):
        out = denoise_nl_means(x, h=f * s, sigma=s, **kw) * scale + noisy.min()
        scores[f] = psnr(out, clean, rng_)
    f = max(scores, key=scores.get)
    return scores[f], {"h_over_sigma": f, "noise_sigma": sigma, **{k: v for k, v in kw.items()}}


def learned(noisy: np.ndarray, clean: np.ndarray, rng_: float, method: str, steps: int, work: Path, client,
            patch, width: int, batch: int, scale=None) -> tuple[float, dict]:
    from pipeline.steps.denoise import denoise
    from pipeline.io import create_image, default_axes, open_image
    from pipeline.steps.train import train_denoise

    axes = default_axes("zyx"[-noisy.ndim:])
    url = str(work / f"noisy-{noisy.ndim}d.ome.zarr")
    if not Path(url).exists():
        chunks = (256, 256) if noisy.ndim == 2 else (32, 128, 128)
        sink = create_image(url, shape=noisy.shape, dtype=np.float32, axes=axes, scale=scale, chunks=chunks,
                            n_levels=1)
        sink.write((slice(None),) * noisy.ndim, noisy.astype(np.float32))
    model = str(work / f"model-{method}-{noisy.ndim}d")
    t0 = time.perf_counter()
    card = train_denoise(url, model, method=method, patch=patch, steps=steps, batch=batch, width=width,
                         overwrite=True, progress=False, device="cpu")
    train_s = time.perf_counter() - t0
    out = str(work / f"out-{method}-{noisy.ndim}d.ome.zarr")
    summary, report = denoise(url, out, model, client, progress=False, overwrite=True)
    result = open_image(out).read((slice(None),) * noisy.ndim)
    return psnr(result, clean, rng_), {
        "train_seconds": train_s, "steps_run": card.training["history"][-1]["step"],
        "validation_loss": card.validation_loss, "inference_voxels_per_s": summary.voxels_per_s,
        "inference_seconds": summary.seconds, "tiles_flagged": len(report.flagged), "patch": list(patch),
        "pool": card.training["pool"], "width": width, "batch": batch}


def rows_for(name, noisy, clean, rng_, work, client, steps, patch, width, batch, scale=None) -> dict:
    rows = {"noisy": {"psnr_db": psnr(noisy, clean, rng_)}}
    t0 = time.perf_counter()
    db, info = best_gaussian(noisy, clean, rng_)
    rows["gaussian"] = {"psnr_db": db, **info, "seconds_grid": time.perf_counter() - t0}
    t0 = time.perf_counter()
    db, info = best_nlm(noisy, clean, rng_)
    rows["nl_means"] = {"psnr_db": db, **info, "seconds_grid": time.perf_counter() - t0}
    for method in ("n2s", "n2v2"):
        db, info = learned(noisy, clean, rng_, method, steps, work, client, patch, width, batch, scale)
        rows[method] = {"psnr_db": db, **info}
    rows["n2v2_minus_nlm_db"] = rows["n2v2"]["psnr_db"] - rows["nl_means"]["psnr_db"]
    print(name, {k: round(v["psnr_db"], 2) if isinstance(v, dict) else round(v, 2) for k, v in rows.items()}, flush=True)
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps-2d", type=int, default=2500)
    parser.add_argument("--steps-3d", type=int, default=1000)
    parser.add_argument("--lightsheet", default="32,192,192", help="synthetic light-sheet shape")
    parser.add_argument("--photons", default="5,20")
    parser.add_argument("--images", default="dsb,lightsheet", help="which images to (re-)run")
    parser.add_argument("--workdir")
    args = parser.parse_args(argv)
    images = set(args.images.split(","))
    if images - {"dsb", "lightsheet"}:
        parser.error(f"--images takes dsb and/or lightsheet, got {args.images}")
    from distributed import Client, LocalCluster

    from pipeline.data.fetch import load_sample_arrays
    from pipeline.data.synthetic import make_lightsheet
    from pipeline.io import open_image

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tilewise-bench-denoise-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = previous("denoise") if images != {"dsb", "lightsheet"} else {}
    results["note"] = __doc__.split("\n\n")[3]  # the images and rows
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        image, _, _ = load_sample_arrays("dsb2018")
        base = image.astype(np.float64) / image.max()
        for peak in (float(p) for p in args.photons.split(",")) if "dsb" in images else ():
            rng = np.random.default_rng(int(peak))
            clean = base * peak
            noisy = (rng.poisson(clean) + rng.normal(0, 0.02 * peak, clean.shape)).astype(np.float32)
            sub = work / f"dsb-{peak:g}"
            sub.mkdir(exist_ok=True)
            results[f"dsb2018_{peak:g}_photons"] = rows_for(f"dsb {peak:g}", noisy, clean.astype(np.float32), peak,
                                                            sub, client, args.steps_2d, (64, 64), 16, 8)
            save("denoise", results)
        if "lightsheet" in images:
            shape = tuple(int(v) for v in args.lightsheet.split(","))
            ls = str(work / "lightsheet.ome.zarr")
            make_lightsheet(ls, client, shape=shape, seed=0, overwrite=True, progress=False)
            raw = open_image(ls)
            noisy = raw.read((slice(None),) * 3).astype(np.float32)
            clean = open_image(ls + "/clean").read((slice(None),) * 3).astype(np.float32)
            sub = work / "lightsheet"
            sub.mkdir(exist_ok=True)
            results["lightsheet"] = {"shape": list(shape), **rows_for("lightsheet", noisy, clean,
                                                                      float(clean.max() - clean.min()), sub, client,
                                                                      args.steps_3d, (8, 32, 32), 16, 8,
                                                                      scale=raw.level(0).scale)}
            save("denoise", results)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
