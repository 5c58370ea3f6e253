"""Segmentation quality on real data, and stitching at scale.

    python -m benchmarks.bench_segment [--parts dsb,stitch] [--steps 2000] [--cells 24,200,200]

``dsb``: the real DSB-2018 nuclei image (fetched from the stardist wheel) with its manual
labels. Models are chosen and trained on the left half and evaluated on the right half
(matched at IoU 0.5..0.9, accuracy = TP / (TP + FP + FN)). The classical kernel's one free
parameter (seed distance) is picked on the left half; the 3-class U-Net trains on the left half,
and its one post-processing parameter (smallest object) is picked there too.
Both run through the tiled engine (128 x 128 tiles) like any user's image.

``scale``: DSB-2018 (right half) and the 3D nuclei sample (lower z half) rescaled x0.5, x1, x2,
x3 (linear for the image, nearest for the labels): accuracy@0.5 and F1 of the classical kernel
with the estimated object scale and with the fixed pixel defaults of before, of a U-Net trained
on the other half at x1 with and without resampling to its training scale, beside plain Otsu +
watershed (``scale_rows``; ``scale_spread`` is worst/best per method). Lengths per diameter were chosen on
synthetic packed nuclei (``pipeline.data.touching``), the edge and threshold rules on those and
on the other halves of these images (``classical_tuning``), never on the halves reported.

``classical_tuning``: the classical kernel on the data its rules are chosen on (the other halves
of those images, synthetic packed nuclei 2D and 3D), at the same factors (``classical_tuning``).

``stitch``: a synthetic labels volume with ~10^6 objects, one per lattice cell of 5^3 voxels, in
1,024 tiles, re-stitched by the ``relabel`` kernel. Reported: seconds per pass and per million
objects, peak RSS of the client (with the scheduler) and of the largest worker, measured on the
run's own process tree; and a chunk-by-chunk check that the result is the input object for object.
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

from benchmarks.measure import invocation, previous, run_measured, save

CELL = 5


def _store(url: str, image: np.ndarray, axes: str, chunks, labels: np.ndarray | None = None, client=None) -> str:
    from pipeline.io import create_image, create_labels, default_axes
    from pipeline.engine.pyramid import finalize_image

    sink = create_image(url, shape=image.shape, dtype=image.dtype, axes=default_axes(axes), chunks=chunks,
                        overwrite=True)
    sink.write(tuple(slice(0, s) for s in image.shape), image)
    finalize_image(sink, client, progress=False)
    if labels is not None:
        lab = create_labels(sink, "nuclei", n_labels=int(labels.max()))
        lab.write(tuple(slice(0, s) for s in labels.shape), labels)
        finalize_image(lab, client, labels=True, progress=False)
    return url


def _scores(truth: np.ndarray, labels_url: str) -> dict:
    from kernels.metrics import summary
    from pipeline.io import open_image

    pred = open_image(labels_url).read((slice(None), slice(None)))
    return summary(truth, pred)


def part_dsb(work: Path, steps: int) -> dict:
    from distributed import Client, LocalCluster
    from skimage.segmentation import relabel_sequential

    from kernels.metrics import match
    from pipeline.data.fetch import load_sample_arrays
    from pipeline.steps.segment import classical_spec, model_spec, segment_labels
    from pipeline.steps.train import train_segment

    image, labels, _ = load_sample_arrays("dsb2018")
    half = image.shape[1] // 2
    left_truth = relabel_sequential(labels[:, :half])[0]
    right_truth = relabel_sequential(labels[:, half:])[0]
    out: dict = {"image": "DSB-2018 img2d/mask2d (stardist 0.9.2 wheel)", "shape": list(image.shape),
                 "train": f"left half [:, :{half}] ({int(left_truth.max())} objects)",
                 "test": f"right half [:, {half}:] ({int(right_truth.max())} objects)", "tile": [128, 128]}
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        left = _store(str(work / "left.ome.zarr"), np.ascontiguousarray(image[:, :half]), "yx", (128, 128),
                      left_truth.astype(np.uint32), client)
        right = _store(str(work / "right.ome.zarr"), np.ascontiguousarray(image[:, half:]), "yx", (128, 128),
                       right_truth.astype(np.uint32), client)
        # classical: pick the seed distance on the training half only
        choice = {}
        for d in (3.0, 5.0, 7.0, 9.0, 11.0):
            res = segment_labels(left, str(work / f"cl-left-{d}.ome.zarr"), classical_spec(left, min_distance=d), client,
                                 tile_shape=(128, 128), progress=False, table=False, overwrite=True)
            choice[d] = _scores(left_truth, res.labels)["0.50"]["accuracy"]
        best_d = max(choice, key=choice.get)
        started = time.perf_counter()
        res = segment_labels(right, str(work / "cl-right.ome.zarr"), classical_spec(right, min_distance=best_d), client,
                             tile_shape=(128, 128), progress=False, overwrite=True)
        out["classical"] = {"min_distance_px": best_d, "left_half_accuracy_by_min_distance": choice,
                            "seconds": time.perf_counter() - started, "objects": res.objects,
                            "scores": _scores(right_truth, res.labels)}
        print(f"classical (min distance {best_d}): {out['classical']['scores']['0.50']}", flush=True)
        model = str(work / "unet")
        card = train_segment(left, model, labels="nuclei", patch=(64, 64), steps=steps, batch=16, depth=3, width=16,
                             progress=False, overwrite=True)
        # its one free post-processing parameter (smallest object), picked on the training half
        size_choice = {}
        for size in (12, 24, 48, 96, 192):
            res = segment_labels(left, str(work / f"unet-left-{size}.ome.zarr"), model_spec(model, min_size=size),
                                 client, tile_shape=(128, 128), progress=False, table=False, overwrite=True)
            size_choice[size] = _scores(left_truth, res.labels)["0.50"]["accuracy"]
        best_size = max(size_choice, key=size_choice.get)
        spec = model_spec(model, min_size=best_size)
        started = time.perf_counter()
        res = segment_labels(right, str(work / "unet-right.ome.zarr"), spec, client, tile_shape=(128, 128),
                             progress=False, overwrite=True)
        seg_s = time.perf_counter() - started
        whole = segment_labels(right, str(work / "unet-right-whole.ome.zarr"), spec, client,
                               tile_shape=right_truth.shape, progress=False, overwrite=True)
        from pipeline.io import open_image

        tiled_vs_whole = match(open_image(whole.labels).read((slice(None),) * 2),
                               open_image(res.labels).read((slice(None),) * 2), thresholds=[0.5])[0].f1
        out["unet"] = {"min_size_px": best_size, "left_half_accuracy_by_min_size": size_choice,
                       "architecture": card.architecture, "train_steps_run": card.training["history"][-1]["step"],
                       "train_seconds": card.training["seconds"], "validation_loss": card.validation_loss,
                       "segment_seconds": seg_s, "objects": res.objects, "tiled_vs_untiled_f1": tiled_vs_whole,
                       "scores": _scores(right_truth, res.labels)}
        print(f"unet: {out['unet']['scores']['0.50']} (train {card.training['seconds']:.0f} s)", flush=True)
    out["reference"] = {"stardist_demo_accuracy_0.5": 0.835, "classical_reference_accuracy_0.5": 0.59}
    out["target"] = "U-Net accuracy@0.5 >= 0.80"
    return out


# --- scale: the same real images rescaled ---------------------------------------------------

def otsu_watershed(image: np.ndarray) -> np.ndarray:
    """The plain baseline with default parameters: Otsu, distance transform, a seed at every
    local maximum (3^n footprint, as in scikit-image's watershed example), watershed."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    mask = image > threshold_otsu(image)
    dist = ndimage.distance_transform_edt(mask)
    comps, _ = ndimage.label(mask)
    peaks = peak_local_max(dist, footprint=np.ones((3,) * image.ndim), labels=comps, exclude_border=False)
    seeds = np.zeros(image.shape, np.int32)
    seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, seeds, mask=mask)


def part_scale(work: Path, factors: tuple[float, ...], steps: int) -> list[dict]:
    """Rows per (data, factor, method): the classical kernel with the estimated object scale and
    with the fixed pixel defaults of before (sigma 1, seed distance 5, smallest 16 voxels, halo
    32, one threshold level), the plain baseline, and a 3-class U-Net trained once per image on one half at x1 (DSB
    left half; the 3D sample's upper z half), run with tiles resampled to its training scale and
    without. Rows score the other half only (DSB right half; 3D lower half, the middle slice
    left out). Nothing here was tuned on these images."""
    from distributed import Client, LocalCluster
    from scipy import ndimage
    from skimage.segmentation import relabel_sequential

    from kernels.metrics import summary
    from kernels.objectscale import scale_of_labels
    from pipeline.data.fetch import load_sample_arrays
    from pipeline.io import open_image
    from pipeline.steps.segment import classical_spec, model_spec, model_zoom, segment_labels
    from pipeline.steps.train import train_segment

    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        image, labels, _ = load_sample_arrays("dsb2018")
        half = image.shape[1] // 2
        left = _store(str(work / "scale-left.ome.zarr"), np.ascontiguousarray(image[:, :half]), "yx", (128, 128),
                      relabel_sequential(labels[:, :half])[0].astype(np.uint32), client)
        sets = scale_sets(work)  # the reported halves, and where their U-Nets are kept
        model, model3d = sets[0][5], sets[1][5]
        train_segment(left, model, labels="nuclei", patch=(64, 64), steps=steps, batch=16, depth=3, width=16,
                      progress=False, overwrite=True)
        vol, vol_labels, _ = load_sample_arrays("nuclei3d")
        mid = vol.shape[0] // 2
        top = _store(str(work / "scale-top.ome.zarr"), np.ascontiguousarray(vol[:mid]), "zyx", (16, 64, 64),
                     relabel_sequential(vol_labels[:mid])[0].astype(np.uint32), client)
        train_segment(top, model3d, labels="nuclei", patch=(8, 32, 32), steps=steps, batch=8, depth=2, width=16,
                      progress=False, overwrite=True)
        for data, axes, tile, image, labels, unet in sets:
            for factor in factors:
                img = ndimage.zoom(image.astype(np.float32), factor, order=1)
                truth = ndimage.zoom(labels, factor, order=0)
                url = _store(str(work / f"{data}-{factor}.ome.zarr"), img, axes, tile, client=client)
                true_d = scale_of_labels(truth, (1.0,) * img.ndim).diameter
                estimated = classical_spec(url)
                est_d = (estimated.params.get("object_scale") or {}).get("diameter")
                specs = {"classical (estimated scale)": (estimated, est_d),
                         "classical (fixed pixel defaults)": (estimated.with_params(
                             diameter=None, object_scale=None, sigma=1.0, min_distance=5.0, min_size=16,
                             halo=[32] * img.ndim, background=None), None)}
                if unet:
                    zoom, _ = model_zoom(url, unet)
                    specs["U-Net (at its training scale)"] = (model_spec(unet, zoom=zoom), est_d)
                    specs["U-Net (as is)"] = (model_spec(unet), None)
                for method, (spec, d) in specs.items():
                    res = segment_labels(url, str(work / f"{data}-{factor}-{len(rows)}.ome.zarr"), spec, client,
                                         tile_shape=tile, progress=False, table=False, image="link", overwrite=True)
                    pred = open_image(res.labels).read((slice(None),) * img.ndim)
                    sc = summary(truth, pred)["0.50"]
                    rows.append({"data": data, "factor": factor, "method": method, "acc50": sc["accuracy"],
                                 "f1": sc["f1"], "estimated_diameter": d, "true_diameter": true_d,
                                 **({"zoom": spec.params.get("zoom", 1.0)} if "U-Net" in method else {})})
                    print(json.dumps(rows[-1]), flush=True)
                sc = summary(truth, otsu_watershed(img))["0.50"]
                rows.append({"data": data, "factor": factor, "method": "Otsu + watershed (defaults)",
                             "acc50": sc["accuracy"], "f1": sc["f1"], "estimated_diameter": None, "true_diameter": true_d})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def tuning_sets() -> list[tuple]:
    """The data the classical kernel's rules are chosen on, never reported as its quality: the
    other halves of the scale part's images (DSB-2018 left, the 3D sample's upper half) and
    synthetic packed nuclei (``pipeline.data.touching``: textured, noisy, 2D and 3D), each as
    (name, image, labels, axes, tile)."""
    from pipeline.data.fetch import load_sample_arrays
    from pipeline.data.touching import touching_nuclei

    image, labels, _ = load_sample_arrays("dsb2018")
    vol, vol_labels, _ = load_sample_arrays("nuclei3d")
    half, mid = image.shape[1] // 2, vol.shape[0] // 2
    sets = [("dsb2018 left", image[:, :half], labels[:, :half], "yx", (128, 128)),
            ("nuclei3d upper", vol[:mid], vol_labels[:mid], "zyx", (32, 64, 64))]
    for seed in (0, 1):
        sets.append((f"touching 3D seed {seed}", *touching_nuclei((30, 70, 70), 12, seed=seed, noise=0.08, texture=0.5),
                     "zyx", (16, 32, 32)))
        sets.append((f"touching 2D seed {seed}", *touching_nuclei((150, 170), 16, seed=seed, noise=0.08, texture=0.5),
                     "yx", (64, 64)))
    return sets


def scale_sets(work: Path) -> list[tuple]:
    """The reported halves of the scale part, each as (name, axes, tile, image, labels, U-Net
    trained on the other half in ``work``): DSB-2018's right half, the 3D sample's lower half
    (its middle slice left out)."""
    from skimage.segmentation import relabel_sequential

    from pipeline.data.fetch import load_sample_arrays

    image, labels, _ = load_sample_arrays("dsb2018")
    vol, vol_labels, _ = load_sample_arrays("nuclei3d")
    half, mid = image.shape[1] // 2, vol.shape[0] // 2
    return [("dsb2018", "yx", (128, 128), np.ascontiguousarray(image[:, half:]),
             relabel_sequential(labels[:, half:])[0], str(work / "scale-unet")),
            ("nuclei3d", "zyx", (32, 64, 64), np.ascontiguousarray(vol[mid + 1:]),
             relabel_sequential(vol_labels[mid + 1:])[0], str(work / "scale-unet3d"))]


def part_scale_diagnosis(work: Path, factors: tuple[float, ...]) -> list[dict]:
    """Why a U-Net row of the scale part falls short, on the stores and models the scale part
    left in ``work`` (run it first with the same ``--workdir``). Per data and factor:

    - ``zoom from the training labels``: the U-Net resampled by the zoom the card's *measured*
      training diameter implies (labels, not the estimate on the training image that
      ``model_zoom`` compares like with like) against this image's estimate;
    - ``x1 labels on this grid``: the U-Net's own labels at x1 (at its training scale) brought to
      this factor's grid (nearest neighbour), scored against this grid's truth: what rasterising
      the objects at this factor costs a segmentation that was as good as at x1.
    Diagnosis only: nothing is chosen from it."""
    from distributed import Client, LocalCluster
    from scipy import ndimage

    from kernels.metrics import summary
    from kernels.modelfile import read_card
    from pipeline.engine.stats import estimate_object_scale
    from pipeline.io import open_image
    from pipeline.steps.segment import model_spec, model_zoom, segment_labels

    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        for data, _axes, tile, image, labels, unet in scale_sets(work):
            def run(url: str, zoom: float, out: str) -> np.ndarray:
                res = segment_labels(url, str(work / out), model_spec(unet, zoom=zoom), client, tile_shape=tile,
                                     progress=False, table=False, image="link", overwrite=True)
                return open_image(res.labels).read((slice(None),) * image.ndim)

            x1 = run(str(work / f"{data}-1.0.ome.zarr"), model_zoom(str(work / f"{data}-1.0.ome.zarr"), unet)[0],
                     f"diag-{data}-x1.ome.zarr")
            trained = read_card(unet).training["object_scale"]
            for factor in factors:
                url = str(work / f"{data}-{factor}.ome.zarr")
                if not Path(url).exists():
                    raise SystemExit(f"{url} is missing: run --parts scale with this --workdir first")
                truth = ndimage.zoom(labels, factor, order=0)
                est_zoom, _ = model_zoom(url, unet)
                here = estimate_object_scale(open_image(url)).diameter  # px: the stores' pixel is 1
                label_zoom = round(trained["labels"]["diameter"] / trained["image"]["pixel"] / here, 3)
                by_labels = run(url, label_zoom, f"diag-{data}-{factor}.ome.zarr")
                on_grid = ndimage.zoom(x1, factor, order=0)
                for method, pred, zoom in (("U-Net, zoom from the training labels", by_labels, label_zoom),
                                           ("U-Net x1 labels on this grid", on_grid, None)):
                    sc = summary(truth, pred)["0.50"]
                    rows.append({"data": data, "factor": factor, "method": method, "acc50": sc["accuracy"],
                                 "f1": sc["f1"], "zoom": zoom, "zoom_from_estimates": est_zoom,
                                 "training_diameter_labels": trained["labels"]["diameter"],
                                 "training_diameter_estimated": trained["image"]["diameter"]})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def part_classical_tuning(work: Path, factors: tuple[float, ...]) -> dict:
    """accuracy@0.5 of the classical kernel with the estimated scale on :func:`tuning_sets` at
    each factor, through the engine: what a change to its rules is judged on before the
    reported ``scale_rows`` are measured."""
    from distributed import Client, LocalCluster
    from scipy import ndimage
    from skimage.segmentation import relabel_sequential

    from kernels.metrics import summary
    from kernels.objectscale import scale_of_labels
    from pipeline.io import open_image
    from pipeline.steps.segment import classical_spec, segment_labels

    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        for name, image, labels, axes, tile in tuning_sets():
            image = np.ascontiguousarray(image).astype(np.float32)
            labels = relabel_sequential(np.asarray(labels))[0]
            for factor in factors:
                img = ndimage.zoom(image, factor, order=1)
                truth = ndimage.zoom(labels, factor, order=0)
                stem = f"tune-{name.replace(' ', '-')}-{factor}"
                url = _store(str(work / f"{stem}.ome.zarr"), img, axes, tile, client=client)
                spec = classical_spec(url)
                res = segment_labels(url, str(work / f"{stem}-out.ome.zarr"), spec, client, tile_shape=tile,
                                     progress=False, table=False, image="link", overwrite=True)
                sc = summary(truth, open_image(res.labels).read((slice(None),) * img.ndim))["0.50"]
                rows.append({"data": name, "factor": factor, "acc50": sc["accuracy"], "f1": sc["f1"],
                             "threshold": spec.params["threshold"], "estimated_diameter": spec.params["diameter"],
                             "true_diameter": scale_of_labels(truth, (1.0,) * img.ndim).diameter})
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "mean_acc50": float(np.mean([r["acc50"] for r in rows]))}


def scale_spread(rows: list[dict]) -> dict:
    """Per data and method: worst / best accuracy over the factors (goal: >= 0.9)."""
    out: dict = {}
    for r in rows:
        out.setdefault(f"{r['data']}: {r['method']}", []).append(r["acc50"])
    return {k: {"min": min(v), "max": max(v), "worst_over_best": (min(v) / max(v)) if max(v) else None}
            for k, v in out.items()}


# --- stitching at scale ---------------------------------------------------------------------

def _cell_boxes(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell box offset (0..1) and size (2..4) per axis from a hash of the cell index."""
    h = (cells.astype(np.uint64) * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    offset = (h % np.uint64(2)).astype(np.int64)
    size = (2 + (h >> np.uint64(3)) % np.uint64(3)).astype(np.int64)
    return offset, size


def lattice_labels(region: tuple[slice, ...], grid: tuple[int, ...]) -> np.ndarray:
    """Labels of ``region``: one box-shaped object per 5^3 cell, id = cell index + 1, rendered
    from a formula so any region is computed on its own (no whole-volume array)."""
    coords = np.meshgrid(*[np.arange(sl.start, sl.stop) for sl in region], indexing="ij")
    cell = [c // CELL for c in coords]
    flat = np.ravel_multi_index(cell, grid)
    inside = np.ones(coords[0].shape, bool)
    for axis, c in enumerate(coords):
        offset, size = _cell_boxes(flat * 3 + axis)
        pos = c - cell[axis] * CELL
        inside &= (pos >= offset) & (pos < offset + size)
    return np.where(inside, flat + 1, 0).astype(np.uint32)


def _write_chunk(url: str, grid: tuple[int, ...], region: tuple[slice, ...]) -> int:
    from pipeline.io import store

    store.open_array(url, "r+")[region] = lattice_labels(region, grid)
    return 1


def _compare_chunk(truth_grid: tuple[int, ...], labels_url: str, region: tuple[slice, ...]) -> np.ndarray:
    from pipeline.io import store

    got = store.open_array(labels_url, "r")[region].astype(np.uint64)
    want = lattice_labels(region, truth_grid).astype(np.uint64)
    if ((got > 0) != (want > 0)).any():
        raise AssertionError(f"foreground differs in {region}")
    return np.unique(want[want > 0] << np.uint64(32) | got[want > 0])


def stitch_run(work: str) -> None:
    """The measured process: stitch the lattice volume on a fresh local cluster."""
    from distributed import Client, LocalCluster

    from kernels import KernelSpec
    from pipeline.steps.segment import segment_labels

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40,
                      memory_limit="8GiB") as cluster, Client(cluster) as client:
        summary = segment_labels(f"{work}/lattice.ome.zarr", f"{work}/stitched.ome.zarr",
                                 KernelSpec.of("relabel", ndim=3, halo=4), client, tile_shape=(32, 64, 64),
                                 progress=False, table=True, image="link")  # stitching alone, no input copy
    Path(work, "summary.json").write_text(json.dumps(summary.to_dict()))


def part_stitch(work: Path, cells: tuple[int, ...]) -> dict:
    from distributed import Client, LocalCluster

    from pipeline.core.regions import iter_regions
    from pipeline.io import create_image, default_axes, store
    from pipeline.engine.submit import run_tasks

    shape = tuple(c * CELL for c in cells)
    url = str(work / "lattice.ome.zarr")
    sink = create_image(url, shape=shape, dtype=np.uint32, axes=default_axes("zyx"), chunks=(32, 64, 64), n_levels=1)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        level0 = store.join(sink.url, sink.levels[0].path)
        for _ in run_tasks(client, lambda r: _write_chunk(level0, cells, r), iter_regions(shape, (32, 256, 256)),
                           progress=False):
            pass
    n_objects = int(np.prod(cells))
    measured = run_measured([sys.executable, "-m", "benchmarks.bench_segment", "--stitch-run", str(work)])
    summary = json.loads(Path(work, "summary.json").read_text())
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=40) as cluster, \
            Client(cluster) as client:
        pairs = np.unique(np.concatenate(list(run_tasks(
            client, lambda r: _compare_chunk(cells, summary["labels"] + "/0", r), iter_regions(shape, (32, 256, 256)),
            progress=False))))
    truth_ids, got_ids = pairs >> np.uint64(32), pairs & np.uint64(2**32 - 1)
    bijection = len(pairs) == len(np.unique(truth_ids)) == len(np.unique(got_ids)) == n_objects
    from pipeline.io.tables import read_table

    table = read_table(str(work / "stitched.ome.zarr"), "nuclei", columns=["label", "voxels", "tiles"])
    return {"shape": list(shape), "voxels": int(np.prod(shape)), "objects": n_objects, "tiles": summary["tiles"],
            "tile": [32, 64, 64], "halo": 4, "stitched_objects": summary["stitched_objects"], "edges": summary["edges"],
            "seconds_by_pass": summary["seconds"], "seconds_total": measured["seconds"],
            "seconds_per_million_objects": measured["seconds"] / (n_objects / 1e6),
            "peak_rss_client_mb": measured["peak_rss_client"] / 2**20,
            "peak_rss_worker_mb": measured["peak_rss_worker"] / 2**20,
            "object_for_object_identical": bool(bijection), "table_rows": len(table),
            "table_rows_spanning_tiles": int((table["tiles"] > 1).sum())}


def part_stitch_scaling(work: Path, lattices: str, result: dict) -> dict:
    """The stitch part at growing object counts (same density and tile), each on a fresh
    lattice that is deleted once measured; saved after every row (a 10^7 run is long)."""
    rows = []
    for text in lattices.split(";"):
        cells = tuple(int(c) for c in text.split(","))
        folder = work / ("scaling-" + "x".join(map(str, cells)))
        folder.mkdir(parents=True, exist_ok=True)
        r = part_stitch(folder, cells)
        shutil.rmtree(folder, ignore_errors=True)
        rows.append({"objects": r["objects"], "tiles": r["tiles"], "seconds": round(r["seconds_total"], 1),
                     "s_per_million": round(r["seconds_per_million_objects"], 1),
                     "peak_client_rss_bytes": int(r["peak_rss_client_mb"] * 2**20),
                     "peak_worker_rss_bytes": int(r["peak_rss_worker_mb"] * 2**20),
                     "seconds_by_pass": {k: round(v, 1) for k, v in r["seconds_by_pass"].items()},
                     "stitched_objects": r["stitched_objects"], "object_for_object_identical":
                         r["object_for_object_identical"], "shape": r["shape"]})
        print(f"stitch_scaling: {json.dumps(rows[-1])}", flush=True)
        result["stitch_scaling"] = {"tile": [32, 64, 64], "halo": 4, "kernel": "relabel (stitching alone)",
                                    "workers": "2 x 1 thread", "command": invocation(), "rows": rows}
        save("segment", {k: v for k, v in result.items() if k not in ("benchmark", "machine", "date")})
    return result["stitch_scaling"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="dsb,scale,stitch")
    parser.add_argument("--factors", default="0.5,1,2,3", help="scale part: rescaling factors")
    parser.add_argument("--scale-steps", type=int, default=800, help="scale part: U-Net training steps at most")
    parser.add_argument("--steps", type=int, default=2000, help="U-Net training steps at most")
    parser.add_argument("--cells", default="24,200,200", help="object lattice (objects per axis)")
    parser.add_argument("--scaling-cells", default="24,64,64;24,200,200;24,640,640",
                        help="stitch_scaling part: object lattices, ';'-separated (10^5, 10^6, 10^7 objects)")
    parser.add_argument("--workdir", help="keep intermediate stores here (default: a temporary folder)")
    parser.add_argument("--stitch-run", metavar="WORK", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stitch_run:
        stitch_run(args.stitch_run)
        return 0
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tw-bench-seg-"))
    work.mkdir(parents=True, exist_ok=True)
    result = previous("segment")
    try:
        parts = args.parts.split(",")
        if "dsb" in parts:
            result["dsb"] = part_dsb(work, args.steps)
        if "scale" in parts:
            result["scale_rows"] = part_scale(work, tuple(float(f) for f in args.factors.split(",")),
                                              args.scale_steps)
            result["scale_spread"] = scale_spread(result["scale_rows"])
            result["scale_goal"] = "no rescaling factor below 0.9 x the best accuracy@0.5 of that method"
        if "scale_diagnosis" in parts:
            result["scale_diagnosis"] = part_scale_diagnosis(work, tuple(float(f) for f in args.factors.split(",")))
        if "classical_tuning" in parts:
            result["classical_tuning"] = part_classical_tuning(work, tuple(float(f) for f in args.factors.split(",")))
        if "stitch" in parts:
            result["stitch"] = part_stitch(work, tuple(int(c) for c in args.cells.split(",")))
            print(f"stitch: {json.dumps(result['stitch'])}", flush=True)
        if "stitch_scaling" in parts:
            result["stitch_scaling"] = part_stitch_scaling(work, args.scaling_cells, result)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    for key in ("benchmark", "machine", "date"):
        result.pop(key, None)
    print(f"wrote {save('segment', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
