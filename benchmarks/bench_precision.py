"""What mixed precision costs and gains: fp32 against bf16 and fp16 autocast, through the engine.

    python -m benchmarks.bench_precision [--steps 300]

On the machine's device (CUDA when there is one, else the CPU, where autocast exists too):

- segmentation: the 3-class U-Net trained on the left half of the real DSB-2018 image, run on
  the right half at each precision: accuracy@0.5 against the manual labels, label agreement
  with the fp32 labels (F1 at IoU 0.5), and seconds of a warm run;
- denoising: N2V2 trained on the image with Poisson noise at 20 photons (at the 99.9th
  percentile): PSNR against the clean image at each precision, PSNR of each output against
  the fp32 output, and seconds.

``rows`` = [{task, precision, device, seconds, speedup, acc50 | psnr, agreement}].
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_segment import _store
from benchmarks.measure import previous, save

PRECISIONS = ("fp32", "bf16", "fp16")


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    return float(10 * np.log10(peak**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def _timed(fn):
    fn()  # the first run loads the model on the workers
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def run(work: Path, steps: int) -> list[dict]:
    from distributed import Client, LocalCluster
    from skimage.segmentation import relabel_sequential

    from kernels.metrics import match
    from kernels.resident import default_device
    from pipeline.data.fetch import load_sample_arrays
    from pipeline.io import open_image
    from pipeline.steps.denoise import denoise
    from pipeline.steps.segment import model_spec, segment_labels
    from pipeline.steps.train import train_denoise, train_segment

    device = default_device()
    image, labels, _ = load_sample_arrays("dsb2018")
    half = image.shape[1] // 2
    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        left = _store(str(work / "left.ome.zarr"), np.ascontiguousarray(image[:, :half]), "yx", (128, 128),
                      relabel_sequential(labels[:, :half])[0].astype(np.uint32), client)
        truth = relabel_sequential(labels[:, half:])[0].astype(np.uint32)
        right = _store(str(work / "right.ome.zarr"), np.ascontiguousarray(image[:, half:]), "yx", (128, 128), truth,
                       client)
        seg_model = str(work / "seg")
        train_segment(left, seg_model, labels="nuclei", patch=(64, 64), steps=steps, batch=16, depth=3, width=16,
                      progress=False, overwrite=True)
        found = {}
        for precision in PRECISIONS:
            spec = model_spec(seg_model, min_size=48, precision=precision)
            out = str(work / f"seg-{precision}.ome.zarr")
            summary, seconds = _timed(lambda: segment_labels(right, out, spec, client, tile_shape=(128, 128),
                                                             progress=False, overwrite=True))
            found[precision] = open_image(summary.labels).read((slice(None), slice(None)))
            rows.append({"task": "segment", "precision": precision, "device": device, "seconds": seconds,
                         "acc50": match(truth, found[precision], thresholds=[0.5])[0].accuracy,
                         "agreement_f1": match(found["fp32"], found[precision], thresholds=[0.5])[0].f1})
        clean = image.astype(np.float64)
        scale = 20.0 / np.percentile(clean, 99.9)
        noisy = (np.random.default_rng(0).poisson(np.clip(clean, 0, None) * scale) / scale).astype(np.float32)
        noisy_url = _store(str(work / "noisy.ome.zarr"), noisy, "yx", (128, 128), None, client)
        den_model = str(work / "n2v2")
        train_denoise(noisy_url, den_model, method="n2v2", steps=steps, batch=16, progress=False, overwrite=True)
        outputs = {}
        peak = float(np.percentile(clean, 99.9))
        for precision in PRECISIONS:
            out = str(work / f"den-{precision}.ome.zarr")
            _, seconds = _timed(lambda: denoise(noisy_url, out, den_model, client, precision=precision,
                                                progress=False, overwrite=True))
            outputs[precision] = open_image(out).read((slice(None), slice(None)))
            rows.append({"task": "denoise", "precision": precision, "device": device, "seconds": seconds,
                         "psnr": _psnr(outputs[precision], clean, peak),
                         "psnr_vs_fp32": (_psnr(outputs[precision], outputs["fp32"], peak)
                                          if precision != "fp32" else None)})
    for row in rows:
        base = next(r for r in rows if r["task"] == row["task"] and r["precision"] == "fp32")
        row["speedup"] = base["seconds"] / row["seconds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of both models")
    parser.add_argument("--workdir", help="keep intermediate stores here (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tw-bench-prec-"))
    work.mkdir(parents=True, exist_ok=True)
    result = previous("precision")
    try:
        rows = run(work, args.steps)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    device = rows[0]["device"] if rows else "cpu"
    result[f"rows_{device}"] = rows
    result["command"] = "python -m benchmarks.bench_precision " + " ".join(argv if argv is not None else sys.argv[1:])
    for row in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    print(f"wrote {save('precision', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
