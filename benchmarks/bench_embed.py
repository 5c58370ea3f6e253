"""Per-object embeddings against their baselines: what a trained encoder adds, if anything.

    python -m benchmarks.bench_embed [--steps 300] [--shape 48,256,256]

- ``lightsheet``: the synthetic light-sheet volume (seed 1), whose object table carries each
  nucleus's shape/texture class. The trained encoder is a 3-class segmentation U-Net trained
  on *another* volume (seed 0) from its labels; it never saw the classes. Rows: mAP of
  retrieving same-class objects (copairs, permutation p-value), 1-NN and linear-probe accuracy,
  for the trained encoder (all levels, and each level), three untrained seeds, pixels and
  structure.
- ``dsb2018-replicates``: the real DSB-2018 image as two independent noisy realisations
  (Poisson noise at 20 photons at the brightest percentile, different seeds). Every object of A
  should retrieve its own replicate in B among all objects of both: mAP with the object id as
  the group. The trained encoder is the 3-class U-Net trained on the left half of the clean
  image (as ``bench_segment``); rows score the right half.
- ``throughput``: objects embedded per second through the engine (every embedding at once).

``rows`` = [{embedding, dataset, map, map_p, knn_acc, probe_acc}]; ``winner`` per dataset and
the trained encoder's margin over the best baseline.
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


def _rows(result: dict, dataset: str) -> list[dict]:
    return [{"embedding": k, "dataset": dataset, **{m: s.get(m) for m in ("map", "map_p", "knn_acc", "probe_acc")}}
            for k, s in result["scores"].items()]


def part_lightsheet(work: Path, client, shape: tuple[int, ...], steps: int) -> tuple[list[dict], dict]:
    from pipeline.data import make_lightsheet
    from pipeline.steps.analyze import analyze
    from pipeline.steps.embed import embed_objects
    from pipeline.steps.train import train_segment

    train = make_lightsheet(str(work / "ls-train.ome.zarr"), client, shape=shape, seed=0, overwrite=True,
                            progress=False)
    test = make_lightsheet(str(work / "ls-test.ome.zarr"), client, shape=shape, seed=1, overwrite=True,
                           progress=False)
    model = str(work / "ls-model")
    card = train_segment(train["raw"], model, labels="nuclei", steps=steps, batch=4, depth=3, width=16,
                         progress=False, overwrite=True)
    started = time.perf_counter()
    summary = embed_objects(test["raw"], str(work / "ls-embed.zarr"), client, labels="nuclei", model=model,
                            progress=False, overwrite=True)
    seconds = time.perf_counter() - started
    result = analyze(f"{summary.table}", group_by="class_name", out=str(work / "ls-report.html"))
    info = {"objects": summary.objects, "groups": result["groups"], "model_train_seconds": card.training["seconds"],
            "embed_seconds": seconds, "objects_per_s": summary.objects / seconds,
            "confounds": result["confounds"], "over_best_baseline": result["over_best_baseline"],
            "notes": result["notes"]}
    return _rows(result, "lightsheet-classes"), info


def part_replicates(work: Path, client, steps: int, photons: float = 20.0) -> tuple[list[dict], dict]:
    import pandas as pd
    from skimage.segmentation import relabel_sequential

    from pipeline.data.fetch import load_sample_arrays
    from pipeline.io.tables import embedding_columns, read_attributes, read_table, write_table
    from pipeline.steps.analyze import analyze
    from pipeline.steps.embed import embed_objects
    from pipeline.steps.train import train_segment

    image, labels, _ = load_sample_arrays("dsb2018")
    half = image.shape[1] // 2
    left_truth = relabel_sequential(labels[:, :half])[0].astype(np.uint32)
    right_truth = relabel_sequential(labels[:, half:])[0].astype(np.uint32)
    left = _store(str(work / "dsb-left.ome.zarr"), np.ascontiguousarray(image[:, :half]), "yx", (128, 128), left_truth,
                  client)
    model = str(work / "dsb-model")
    train_segment(left, model, labels="nuclei", patch=(64, 64), steps=steps, batch=16, depth=3, width=16,
                  progress=False, overwrite=True)
    clean = image[:, half:].astype(np.float64)
    scale = photons / np.percentile(clean, 99.9)
    frames, embeds = [], {}
    started, objects = time.perf_counter(), 0
    for replicate in ("A", "B"):
        rng = np.random.default_rng({"A": 1, "B": 2}[replicate])
        noisy = (rng.poisson(np.clip(clean, 0, None) * scale) / scale).astype(np.float32)
        url = _store(str(work / f"dsb-{replicate}.ome.zarr"), noisy, "yx", (128, 128), right_truth, client)
        _truth_table(url, right_truth)
        summary = embed_objects(url, str(work / f"dsb-{replicate}-embed.zarr"), client, labels="nuclei",
                                model=model, progress=False, overwrite=True)
        objects += summary.objects
        frame = read_table(str(work / f"dsb-{replicate}-embed.zarr"), "nuclei")
        frame["replicate"] = replicate
        frames.append(frame)
    seconds = time.perf_counter() - started
    both = pd.concat(frames, ignore_index=True)
    for column in embedding_columns(both):
        embeds[column] = np.stack(both.pop(column).to_numpy())
    both["object"] = both["label"].astype(str)
    both["label"] = np.arange(1, len(both) + 1, dtype=np.uint64)  # unique ids across the two replicates
    attrs = read_attributes(str(work / "dsb-A-embed.zarr"), "nuclei")
    write_table(str(work / "dsb-both.zarr"), "nuclei", both, attrs, embeddings=embeds)
    result = analyze(str(work / "dsb-both.zarr" / "tables" / "nuclei"), group_by="object",
                     out=str(work / "dsb-report.html"))
    info = {"objects_per_replicate": int(len(both) // 2), "photons": photons, "embed_seconds": seconds,
            "objects_per_s": objects / seconds, "over_best_baseline": result["over_best_baseline"],
            "confounds": result["confounds"]}
    return _rows(result, "dsb2018-replicates"), info


def _truth_table(url: str, labels: np.ndarray) -> None:
    """``tables/nuclei`` of the true objects (ids, sizes, pixel centroids): what embedding needs."""
    import pandas as pd
    from skimage.measure import regionprops_table

    from pipeline.io.tables import TableSpec, write_table

    props = regionprops_table(labels, properties=("label", "area", "centroid"))
    spec = TableSpec(("y", "x"), (1.0, 1.0), (0.0, 0.0), ("pixel", "pixel"), region="nuclei")
    frame = pd.DataFrame({"label": props["label"].astype(np.uint64), "region": "nuclei",
                          "voxels": props["area"].astype(np.int64), "volume": props["area"].astype(np.float64),
                          "centroid_y": props["centroid-0"], "centroid_x": props["centroid-1"],
                          "centroid_y_pixel": props["centroid-0"], "centroid_x_pixel": props["centroid-1"]})
    write_table(url, "nuclei", frame, spec.attributes())


def winners(rows: list[dict]) -> dict:
    out = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == dataset]
        best = max(sub, key=lambda r: r["map"])
        baselines = [r for r in sub if r["embedding"].startswith(("untrained", "pixel", "structure"))]
        trained = [r for r in sub if r["embedding"] == "trained"]
        out[dataset] = {"best": best["embedding"], "best_map": best["map"],
                        "best_baseline": max(baselines, key=lambda r: r["map"])["embedding"] if baselines else None,
                        "trained_minus_best_baseline_map": (trained[0]["map"] - max(r["map"] for r in baselines))
                        if trained and baselines else None}
    return out


def main(argv: list[str] | None = None) -> int:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="lightsheet,replicates")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each encoder's U-Net")
    parser.add_argument("--shape", default="48,256,256", help="light-sheet volume shape")
    parser.add_argument("--workdir", help="keep intermediate stores here (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tw-bench-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    result = previous("embed")
    rows = [r for r in result.get("rows", [])]
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
                Client(cluster) as client:
            parts = args.parts.split(",")
            if "lightsheet" in parts:
                new, result["lightsheet"] = part_lightsheet(work, client, tuple(int(s) for s in args.shape.split(",")),
                                                            args.steps)
                rows = [r for r in rows if r["dataset"] != "lightsheet-classes"] + new
                print(new, flush=True)
            if "replicates" in parts:
                new, result["replicates"] = part_replicates(work, client, args.steps)
                rows = [r for r in rows if r["dataset"] != "dsb2018-replicates"] + new
                print(new, flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result["rows"] = rows
    result["winners"] = winners(rows)
    result["command"] = "python -m benchmarks.bench_embed " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"wrote {save('embed', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
