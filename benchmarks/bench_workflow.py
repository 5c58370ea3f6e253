"""The demo workflow end to end: ``python -m benchmarks.bench_workflow`` (in ``make bench``).

Runs ``workflows/lightsheet.yaml`` on the demo sample (``tilewise run``, measured as a process
tree: wall time, peak memory), then reads the output's provenance for the time of every step,
and sets each tiled inference step's voxels per second beside the bare kernel's: the same
model called once on the whole volume in this process (no tiling, no Dask, no storage).
Scores against the sample's ground truth come from the workflow's own ``evaluate`` step.

Fused against unfused: the chain "denoise, then segment the denoised volume" with the models the
demo trained (its U-Net segmenter, and the classical watershed), run as a workflow with
``engine.fuse`` on and off (``tilewise run``, each measured the same way), and the two stores
compared: the denoised image (largest difference, relative to its range) and the labels
(object for object: ids are numbered by tile). Twice: with each step's default tiles, and on
one tile grid for both runs, which isolates fusion. ``--chains-only`` re-runs just this part
with the models of an earlier run in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import run_measured, save

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "lightsheet.yaml"


def bare_kernel_rate(image_url: str, spec) -> float:
    """Voxels per second of the kernel called once on the whole (small) volume, with the global
    scaling the engine computes for it."""
    from kernels import build_kernel
    from pipeline.engine.runner import EngineOptions, prepare_engine
    from pipeline.io import open_image

    setup = prepare_engine(image_url, spec, EngineOptions(progress=False))
    volume = open_image(image_url).read((slice(None),) * 3).astype(np.float32)
    if setup.traits.input == "normalised":  # what the engine's reader hands the kernel
        volume = setup.scaling.apply(volume[None])[0]
    kernel = build_kernel(spec)
    kernel.load("cpu")
    started = time.perf_counter()
    kernel.run(volume[None, None], setup.scaling)
    return volume.size / (time.perf_counter() - started)


CHAINS = {"unet": "{step: segment, name: nuclei, model: %(segmenter)s}",
          "classical": "{step: segment, name: nuclei}"}


def same_objects(a: np.ndarray, b: np.ndarray) -> dict:
    """Whether two labels images hold the same objects (ids may differ: they are numbered by
    tile), and how many voxels lie in a different object after matching each object of ``a`` to
    the object of ``b`` it overlaps most."""
    pairs, counts = np.unique(np.stack([a.ravel(), b.ravel()]).astype(np.int64), axis=1, return_counts=True)
    best: dict[int, tuple[int, int]] = {}
    for (x, y), n in zip(pairs.T, counts):
        if x not in best or n > best[x][1]:
            best[int(x)] = (int(y), int(n))
    agreeing = sum(n for _, n in best.values())
    identical = pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))
    return {"identical": bool(identical), "voxels_in_another_object": int(a.size - agreeing),
            "objects": [int(len(np.unique(a)) - 1), int(len(np.unique(b)) - 1)]}


def fused_vs_unfused(sample: Path, models: Path, work: Path) -> dict:
    """Each chain run fused and unfused into its own store (wall time, peak memory, how far
    apart the two stores are): with each step's default tiles (what a user gets), and on one
    tile grid for both (the denoiser's default, which fusion uses), which isolates fusion."""
    import zarr

    tilewise = [sys.executable, "-m", "pipeline.cli"]
    rows = {}
    for chain, segment in CHAINS.items():
        for grid in ("default tiles", "one tile grid"):
            row, stores = {}, {}
            for fuse in (False, True):
                engine = f"{{fuse: {str(fuse).lower()}" + (", tile: %(tile)s}" if grid == "one tile grid" else "}")
                path = work / f"chain-{chain}-{grid.replace(' ', '-')}-{'fused' if fuse else 'unfused'}.yaml"
                tile = json.loads((work / f"chain-{chain}-default-tiles-fused.ome.zarr" / "_tilewise" / "steps" /
                                   "denoised" / "run.json").read_text())["tile_shape"] if grid == "one tile grid" else None
                path.write_text(f"name: chain\nengine: {engine % {'tile': tile}}\nsteps:\n"
                                f"  - {{step: denoise, model: {models / 'denoiser'}, tta: 'off'}}\n"
                                f"  - {segment % {'segmenter': models / 'segmenter'}}\n")
                out = work / f"{path.stem}.ome.zarr"
                measured = run_measured([*tilewise, "-q", "run", str(path), str(sample), str(out), "--overwrite"])
                prov = json.loads((out / "_tilewise" / "provenance.json").read_text())
                tiles = {k: json.loads((out / "_tilewise" / "steps" / k / "run.json").read_text())["tile_shape"]
                         for k in ("denoised", "nuclei")}
                row["fused" if fuse else "unfused"] = {**measured, "tiles": tiles,
                                                       "steps": {k: v["seconds"] for k, v in prov["steps"].items()}}
                stores[fuse] = out
            a, b = (zarr.open_array(str(stores[f] / "0"), mode="r")[:] for f in (True, False))
            la, lb = (zarr.open_array(str(stores[f] / "labels" / "nuclei" / "0"), mode="r")[:] for f in (True, False))
            row["denoised_max_abs_difference_of_range"] = float(np.abs(a - b).max() / (b.max() - b.min()))
            row["labels"] = same_objects(la, lb)
            row["fused_seconds_over_unfused"] = row["fused"]["seconds"] / row["unfused"]["seconds"]
            rows[f"{chain}, {grid}"] = row
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="32,256,256", help="demo sample shape (make demo's)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--chains-only", action="store_true",
                        help="only the fused / unfused chains, with the models of an earlier run in --workdir; "
                             "updates that part of benchmarks/results/workflow.json")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tilewise-bench-workflow-"))
    work.mkdir(parents=True, exist_ok=True)
    sample, out = work / "lightsheet.ome.zarr", work / "result.ome.zarr"
    if args.chains_only:
        result = json.loads((ROOT / "benchmarks" / "results" / "workflow.json").read_text())
        for key in ("benchmark", "machine", "date"):  # save() writes them afresh
            result.pop(key, None)
        result["fused_vs_unfused"] = fused_vs_unfused(sample, out / "models", work)
        result["fused_vs_unfused_command"] = f"python -m benchmarks.bench_workflow --chains-only --workdir {work}"
        path = save("workflow", result)
        print(json.dumps(result["fused_vs_unfused"], indent=2))
        print(f"wrote {path}")
        return result
    tilewise = [sys.executable, "-m", "pipeline.cli"]
    if not sample.exists():
        subprocess.run([*tilewise, "-q", "sample", "lightsheet", str(sample), "--shape", args.shape,
                        "--chunks", "16,128,128"], check=True)  # make demo's
    command = [*tilewise, "-q", "run", str(WORKFLOW), str(sample), str(out), "--overwrite"]
    measured = run_measured(command)
    prov = json.loads((out / "_tilewise" / "provenance.json").read_text())
    evaluation = json.loads((out / "reports" / "evaluate" / "evaluation.json").read_text())

    from pipeline.io import open_image
    from pipeline.steps.denoise import model_spec as denoise_spec
    from pipeline.steps.segment import model_spec as segment_spec

    voxels = int(np.prod(open_image(str(sample)).level(0).shape))
    bare = {"denoised": bare_kernel_rate(str(sample), denoise_spec(str(out / "models" / "denoiser"))),
            "nuclei": bare_kernel_rate(str(out), segment_spec(str(out / "models" / "segmenter")))}
    steps = {}
    for name, step in prov["steps"].items():
        row = {"step": step["step"], "seconds": step["seconds"]}
        if name in bare:
            row["voxels_per_s"] = voxels / step["seconds"]
            row["bare_kernel_voxels_per_s"] = bare[name]
            row["of_bare_kernel"] = row["voxels_per_s"] / bare[name]
        steps[name] = row
    result = {
        "command": "python -m benchmarks.bench_workflow --shape " + args.shape,
        "workflow": "workflows/lightsheet.yaml", "shape": [int(v) for v in args.shape.split(",")],
        "end_to_end": {**measured, "command": " ".join(["tilewise", *command[3:]])},
        "steps": steps,
        "scores": {k: evaluation.get(k) for k in ("dice", "iou", "acc50", "ece", "auroc")},
        "fused_vs_unfused": fused_vs_unfused(sample, out / "models", work),
        "notes": "step seconds include each step's start (model load, planning) and its pyramid; a step's "
                 "bare kernel is one call on the whole volume in one process, so small volumes favour it",
    }
    path = save("workflow", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
