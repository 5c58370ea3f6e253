"""Whole-slide images: tissue detection, H&E nuclei with and without glass skipping, GeoJSON.

    python -m benchmarks.bench_wholeslide [--size 50000] [--parts slide,he] [--workdir DIR]

``slide``: a synthetic H&E slide (``pipeline.data.make_wholeslide``: tissue islands on glass,
nuclei with ground-truth labels, 0.5 um pixels) of ``--size`` squared pixels, written as a
pyramidal JPEG SVS (``pipeline.data.slidefile``) and read **in place** by every command. Each
command runs as its own process on a 2-worker LocalCluster; seconds and peak RSS (client and
largest worker) are measured on its process tree. Reported: tissue detection alone; nuclei
segmentation (classical kernel, auto polarity/stain) with ``--tissue`` and without; tiles/s of
the labelling pass; accuracy at IoU 0.5 against the synthetic labels (matched from per-object
overlap counts accumulated block by block, so memory is objects, not pixels); GeoJSON export
of the skipped run's objects. The slide (7.5 GB of RGB at 50k) is larger than a worker's
memory budget (4 GiB), so the worker peaks show memory bounded by the tile.

``he``: the real H&E crop (stardist's ``histo.jpg``): the objects the classical kernel finds
with the haematoxylin channel (auto) and with the grey level (``--stain none``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import previous, run_measured, save

TILEWISE = [sys.executable, "-m", "pipeline.cli"]


def _summary(out: str) -> dict:
    return json.loads((Path(out) / "_tilewise" / "summary.json").read_text())


def _overlap_accuracy(truth_url: str, pred_url: str, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall at IoU >= ``threshold`` from per-object overlaps counted block by
    block: memory grows with the objects, not the pixels."""
    import pandas as pd

    from pipeline.core.regions import iter_regions
    from pipeline.io import open_image

    truth, pred = open_image(truth_url), open_image(pred_url)
    pairs = []
    for region in iter_regions(truth.shape, (4096, 4096)):
        t = truth.read(region).ravel().astype(np.uint64)
        p = pred.read(region).ravel().astype(np.uint64)
        keys, counts = np.unique((t << np.uint64(32)) | p, return_counts=True)  # ids < 2^32: one sort
        pairs.append(pd.DataFrame({"t": keys >> np.uint64(32), "p": keys & np.uint64(2**32 - 1), "n": counts}))
    table = pd.concat(pairs).groupby(["t", "p"], sort=False)["n"].sum().reset_index()
    size_t = table.groupby("t")["n"].sum()
    size_p = table.groupby("p")["n"].sum()
    both = table[(table.t > 0) & (table.p > 0)]
    iou = both.n.to_numpy() / (size_t.loc[both.t].to_numpy() + size_p.loc[both.p].to_numpy() - both.n.to_numpy())
    tp = int((iou >= threshold).sum())  # IoU > 0.5 pairs are one-to-one
    n_true, n_pred = int((size_t.index > 0).sum()), int((size_p.index > 0).sum())
    fp, fn = n_pred - tp, n_true - tp
    return {"threshold": threshold, "tp": tp, "fp": fp, "fn": fn, "acc": tp / max(tp + fp + fn, 1),
            "precision": tp / max(n_pred, 1), "recall": tp / max(n_true, 1), "truth_objects": n_true}


def part_slide(work: Path, size: int, result: dict, *, key: str = "slide", tissue_scale: float = 600.0,
               full: bool = True, geojson: bool = True) -> dict:
    from distributed import Client, LocalCluster

    from pipeline.data import make_wholeslide
    from pipeline.data.slidefile import write_slide
    from pipeline.io import open_image

    zarr_url, svs = str(work / "slide.ome.zarr"), str(work / "slide.svs")
    started = time.perf_counter()
    if not Path(svs).exists():
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
                Client(cluster) as client:
            urls = make_wholeslide(zarr_url, client, shape=(size, size), seed=0, chunks=(1024, 1024), overwrite=True,
                                   progress=False, tissue_scale=tissue_scale)
        write_slide(open_image(urls["image"]), svs, flavour="svs")
    setup_s = time.perf_counter() - started
    out: dict = {"size": [size, size], "pixels": size * size, "tissue_scale_px": tissue_scale,
                 "slide_bytes": Path(svs).stat().st_size, "raw_rgb_bytes": 3 * size * size,
                 "setup_s": round(setup_s, 1)}
    result[key] = out  # saved after every figure: a long run that stops keeps what it measured

    def keep(what: object) -> None:
        print(what, flush=True)
        _save_merged(result, key)

    keep(out)

    code = ("from pipeline.io import open_image; from pipeline.steps.tissue import detect_tissue; "
            f"t = detect_tissue(open_image({svs!r})); print(t.describe())")
    out["tissue"] = run_measured([sys.executable, "-c", code])
    from pipeline.steps.tissue import detect_tissue

    found = detect_tissue(open_image(svs))
    out["tissue"].update(fraction=round(found.fraction, 4), glass_fraction=round(1 - found.fraction, 4),
                         level=found.level, mask_shape=list(found.mask.shape))
    keep(out["tissue"])

    runs: dict = {}
    out["segment"] = runs
    import zarr

    for name, extra in (("skip", ["--tissue"]), ("all", []))[:2 if full else 1]:
        seg = str(work / f"seg-{name}.ome.zarr")
        shutil.rmtree(seg, ignore_errors=True)
        measured = run_measured(TILEWISE + ["-q", "segment", svs, seg, "--classical", "--image", "link",
                                            "--workers", "2", *extra])
        summary = _summary(seg)
        computed = summary["tiles"] - summary["outside"]
        runs[name] = {**measured, "tiles": summary["tiles"], "tiles_outside": summary["outside"],
                      "tiles_computed": computed, "objects": summary["objects"], "pass_seconds": summary["seconds"],
                      "tiles_per_s": round(computed / summary["seconds"]["segment"], 3),
                      "megapixels_per_s": round(computed / summary["tiles"] * size * size / 1e6
                                                / summary["seconds"]["segment"], 3)}
        keep({name: runs[name]})
        if name == "skip":
            params = dict(zarr.open_group(str(work / "seg-skip.ome.zarr"), mode="r").attrs)["tilewise"]["run"]
            out["kernel"] = {k: v for k, v in params["kernel_params"].items() if k != "object_scale"}
            # accuracy of the skipped run; the full run labels the glass too (its objects there: fp)
            out["accuracy"] = _overlap_accuracy(zarr_url + "/labels/nuclei", seg + "/labels/nuclei")
            keep(out["accuracy"])
    if full:
        out["speedup_from_skipping"] = round(runs["all"]["seconds"] / runs["skip"]["seconds"], 3)
        out["objects_only_without_skipping"] = runs["all"]["objects"] - runs["skip"]["objects"]
    if geojson:
        part_geojson(work, out)
        keep(out["geojson"])
    return out


def part_geojson(work: Path, out: dict) -> None:
    """GeoJSON export of the skipped run's objects (``out``: that slide's results)."""
    geo = str(work / "nuclei.geojson")
    Path(geo).unlink(missing_ok=True)
    objects = out["segment"]["skip"]["objects"]
    out["geojson"] = run_measured(TILEWISE + ["-q", "export-geojson", str(work / "seg-skip.ome.zarr"), geo,
                                              "--workers", "2"])
    out["geojson"].update(bytes=Path(geo).stat().st_size, polygons=objects,
                          polygons_per_s=round(objects / out["geojson"]["seconds"], 1))


def part_he(work: Path) -> dict:
    from distributed import Client, LocalCluster

    from pipeline.data import fetch_sample

    url = str(work / "he.ome.zarr")
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        fetch_sample("he", url, client, overwrite=True, progress=False)
    out = {}
    for name, extra in (("hematoxylin_auto", []), ("grey_level", ["--stain", "none"])):
        seg = str(work / f"he-{name}.ome.zarr")
        shutil.rmtree(seg, ignore_errors=True)
        run_measured(TILEWISE + ["-q", "segment", url, seg, "--classical", "--workers", "2", *extra])
        out[name] = _summary(seg)["objects"]
    return {"image": "histo.jpg (stardist 0.9.2 wheel), 300 x 500 RGB", "objects": out}


def _save_merged(result: dict, *keys: str) -> None:
    """Save ``result``'s ``keys`` (and its command) into the latest results file, keeping what
    other runs of the benchmark saved there meanwhile (parts run as separate processes)."""
    latest = previous("wholeslide")
    latest.update({k: result[k] for k in keys if k in result})
    commands = latest.get("commands") or []
    if result["command"] not in commands:
        commands.append(result["command"])  # every invocation whose figures the file holds
    latest["commands"] = commands
    latest.pop("command", None)
    save("wholeslide", latest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="he,slide,sections",
                        help="he, slide (50k, glass in ~300 um patches), sections (tissue sections millimetres "
                             "across with wide glass between: what skipping gains), geojson (of slide, again), "
                             "sections-geojson (of the sections slide's skipped run)")
    parser.add_argument("--size", type=int, default=50000, help="synthetic slide side, pixels (default 50000)")
    parser.add_argument("--sections-size", type=int, default=20000, help="the sections slide's side (default 20000)")
    parser.add_argument("--full", action="store_true",
                        help="also segment the 50k slide without skipping (its glass is too dispersed for any tile to be "
                             "skipped; the sections slide always runs both ways)")
    parser.add_argument("--workdir", help="keep the slide and outputs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tw-bench-wsi-"))
    work.mkdir(parents=True, exist_ok=True)
    result = previous("wholeslide")
    result["command"] = "python -m benchmarks.bench_wholeslide " + " ".join(argv if argv is not None else sys.argv[1:])
    result.pop("commands", None)
    try:
        parts = args.parts.split(",")
        if "he" in parts:
            result["he"] = part_he(work)
            _save_merged(result, "he")
        if "slide" in parts:
            part_slide(work, args.size, result, full=args.full)
        if "geojson" in parts:
            part_geojson(work, result["slide"])
            _save_merged(result, "slide")
        # the 20k sections slide keeps its key; another size is kept beside it, not over it
        key = "sections" if args.sections_size == 20000 else f"sections_{args.sections_size}"
        sections = work / "sections"
        if "sections" in parts:
            sections.mkdir(exist_ok=True)
            part_slide(sections, args.sections_size, result, key=key, tissue_scale=args.sections_size / 4,
                       geojson=False)
        if "sections-geojson" in parts:
            part_geojson(sections, result[key])
            _save_merged(result, key)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("wrote benchmarks/results/wholeslide.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
