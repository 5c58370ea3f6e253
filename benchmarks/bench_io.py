"""Write throughput and peak RSS: tilewise sample generation + pyramid, and a copy + pyramid of
the same data by tilewise (convert) beside a plain ``dask.array.to_zarr`` (+ coarsen pyramid).

    python -m benchmarks.bench_io [--shape 160,1600,1600]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.measure import run_measured, save

DASK_BASELINE = r"""
import sys, dask, dask.array as da, zarr
src, dst = sys.argv[1], sys.argv[2]
x = da.from_zarr(zarr.open_array(src, mode="r"))
levels = [x]
while max(levels[-1].shape[1:]) > 256:
    prev = levels[-1]
    axes = {i: 2 for i in range(prev.ndim) if prev.shape[i] > 1 and (i > 0 or len(levels) > 2)}
    levels.append(da.coarsen(da.mean, prev, axes, trim_excess=True).astype(x.dtype))
with dask.config.set(scheduler="threads", num_workers=2):
    for k, lv in enumerate(levels):
        lv.rechunk((64, 256, 256)).to_zarr(f"{dst}/{k}", overwrite=True)
"""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="160,1600,1600", help="light-sheet shape (z,y,x); default ~4.1 GB of voxels")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    voxels = int(np.prod(shape))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tilewise-bench-io-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    try:
        sample = work / "sample.ome.zarr"
        gen = run_measured([py, "-m", "pipeline.cli", "-q", "sample", "lightsheet", str(sample), "--shape", args.shape,
                            "--overwrite", "--workers", "2"])
        gen_bytes = voxels * (2 + 4 + 4)  # raw uint16 + clean float32 + labels uint32
        raw0 = sample / "0"  # level 0 of the noisy image, the sample's root
        copy = run_measured([py, "-m", "pipeline.cli", "-q", "convert", str(raw0), str(work / "copy.ome.zarr"),
                             "--axes", "zyx", "--scale", "1,0.5,0.5", "--overwrite", "--workers", "2"])
        dask_run = run_measured([py, "-c", DASK_BASELINE, str(raw0), str(work / "dask.zarr")])
        raw_bytes = voxels * 2
        result = {
            "shape": list(shape),
            "generate_and_pyramid": {
                "voxel_bytes": gen_bytes, "disk_bytes": _dir_bytes(sample), **gen,
                "mb_per_s": gen_bytes / 1e6 / gen["seconds"],
            },
            "copy_and_pyramid_uint16": {
                "tilewise_convert": {**copy, "mb_per_s": raw_bytes / 1e6 / copy["seconds"]},
                "dask_to_zarr_coarsen": {**dask_run, "mb_per_s": raw_bytes / 1e6 / dask_run["seconds"]},
                "voxel_bytes": raw_bytes,
            },
            "command": f"python -m benchmarks.bench_io --shape {args.shape}",
        }
        path = save("io", result)
        print(path.read_text())
        return result
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
