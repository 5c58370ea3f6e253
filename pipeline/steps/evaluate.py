"""Score a segmentation and its uncertainty maps against ground-truth labels.

``evaluate(OUT, TRUTH)`` reads the labels ``OUT/labels/<name>`` and the maps
``OUT/uncertainty/{foreground, entropy, variance}`` written by ``tilewise segment`` with an
uncertainty model, block by block (memory: one block, whatever the volume), and reports

- foreground **Dice** and **IoU** of the written labels against the truth's foreground;
- **accuracy@0.5** (instance matching, ``kernels.metrics``) when the labels fit in memory
  (``max_match_voxels``), else None, said so in ``notes``;
- the **expected calibration error** of the foreground probability (decision ``p > 0.5``,
  confidence ``max(p, 1 - p)``) and its reliability diagram;
- the **AUROC** of each uncertainty map as a detector of the labels' foreground errors, on a
  uniform sample of at most ``max_samples`` pixels.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline.analysis.calibration import Reliability, binary_confidence, error_auroc
from pipeline.core.errors import InputError
from pipeline.core.regions import grow_block, iter_regions
from pipeline.engine.maps import maps_url
from pipeline.io import store
from pipeline.io.read import ImageSource, open_image
from pipeline.io.store import Folder

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 << 20
MAX_MATCH_VOXELS = 1 << 26


def _open(url: str, what: str, storage_options: dict | None) -> ImageSource:
    try:
        return open_image(url, storage_options)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def evaluate(output_url: str, truth_url: str, *, labels: str = "nuclei", report: str | None = None,
             max_samples: int = 2_000_000, max_match_voxels: int = MAX_MATCH_VOXELS, seed: int = 0,
             storage_options: dict | None = None) -> dict[str, Any]:
    """Scores of ``OUT/labels/<labels>`` and its uncertainty maps against the labels image
    ``truth_url`` (same shape); with ``report``, also ``evaluation.json`` and
    ``reliability.png`` in that folder. Returns the scores as a dict."""
    pred = _open(store.join(output_url, "labels", labels), f"'{output_url}' labels '{labels}'", storage_options)
    truth = _open(truth_url, "the ground truth", storage_options)
    if pred.level(0).shape != truth.level(0).shape:
        raise InputError(f"The labels {pred.level(0).shape} and the ground truth {truth.level(0).shape} differ in "
                         "shape; evaluate against labels of the same image and level.")
    names = _map_names(output_url, storage_options)
    maps = {name: _open(maps_url(output_url, name), f"uncertainty map '{name}'", storage_options) for name in names}
    shape = pred.level(0).shape
    block = grow_block(pred.level(0).chunks, shape, 4 * (2 + len(maps)), BLOCK_BYTES)
    fraction = min(1.0, max_samples / max(1, int(np.prod(shape))))
    rng = np.random.default_rng(seed)
    tp = fp = fn = 0
    reliability = Reliability()
    samples: dict[str, list[np.ndarray]] = {name: [] for name in maps if name != "foreground"}
    errors: list[np.ndarray] = []
    for region in iter_regions(shape, block):
        fg_pred, fg_true = pred.read(region) > 0, truth.read(region) > 0
        tp += int(np.count_nonzero(fg_pred & fg_true))
        fp += int(np.count_nonzero(fg_pred & ~fg_true))
        fn += int(np.count_nonzero(~fg_pred & fg_true))
        if "foreground" in maps:
            p = maps["foreground"].read(region)
            reliability = reliability + Reliability.of(binary_confidence(p), (p > 0.5) == fg_true)
        keep = rng.random(fg_pred.shape) < fraction
        errors.append((fg_pred != fg_true)[keep])
        for name in samples:
            samples[name].append(maps[name].read(region)[keep])
    notes: list[str] = []
    if not maps:
        notes.append(f"'{output_url}' has no uncertainty maps: segment with an uncertainty model "
                     "(tilewise train segment --uncertainty ...) for calibration and AUROC")
    error = np.concatenate(errors) if errors else np.zeros(0, bool)
    auroc = {name: error_auroc(np.concatenate(v), error) for name, v in samples.items()}
    scores: dict[str, Any] = {
        "labels": store.join(output_url, "labels", labels), "truth": truth_url, "voxels": int(np.prod(shape)),
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "acc50": _acc50(pred, truth, max_match_voxels, notes),
        "ece": reliability.ece if reliability.total else None,
        "foreground_accuracy": reliability.accuracy if reliability.total else None,
        "auroc": auroc.get("entropy"), "auroc_by_map": auroc,
        "error_rate": float(error.mean()) if error.size else None, "sampled_pixels": int(error.size),
        "reliability": reliability.rows() if reliability.total else None, "notes": notes,
    }
    if report is not None:  # a folder path or URL (a workflow writes OUT/reports/<step>)
        folder = Folder(report, storage_options or {})
        folder.makedirs()
        if reliability.total:
            with folder.open("reliability.png", "wb") as png:
                reliability.plot(png, title=labels)
            scores["reliability_png"] = store.join(report, "reliability.png")
        folder.write_json("evaluation.json", scores)
    return scores


def _map_names(output_url: str, storage_options: dict | None) -> list[str]:
    """The maps a run wrote (listed in ``OUT/uncertainty``'s attributes), or none."""
    if not store.exists(maps_url(output_url), storage_options):
        return []
    attrs = dict(store.open_group_readonly(maps_url(output_url), storage_options).attrs)
    return list(attrs.get("tilewise", {}).get("maps", []))


def _acc50(pred: ImageSource, truth: ImageSource, max_voxels: int, notes: list[str]) -> float | None:
    from kernels.metrics import match

    shape = pred.level(0).shape
    if int(np.prod(shape)) > max_voxels:
        notes.append(f"acc50 needs the whole labels in memory; {int(np.prod(shape)):,} voxels exceed "
                     f"{max_voxels:,} (score a cropped region)")
        return None
    whole = tuple(slice(0, s) for s in shape)
    return float(match(truth.read(whole), pred.read(whole), thresholds=[0.5])[0].accuracy)
