"""``tilewise analyze OUT/tables/NAME --group-by COLUMN --out REPORT.html``: score every
embedding of a table (``embed_*`` columns from ``tilewise embed``) beside its baselines, and
write a self-contained HTML report and the scores as JSON.

Per embedding: retrieval mAP of same-group objects with permutation p-values (copairs), held-out
1-NN and linear-probe accuracy, and confound probes (held-out R^2 of predicting log size, mean
intensity and local crowding from the embedding); every learned embedding's figures also as a
difference over the best baseline. Embeddings wider than ``max_dims`` (pixels) are first
PCA-reduced, which the report notes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kernels.objectscale import equivalent_diameter
from pipeline.core.errors import InputError, OptionError
from pipeline.io import store
from pipeline.io.read import open_image
from pipeline.io.tables import embedding_columns, embedding_matrix, read_attributes, read_table

log = logging.getLogger(__name__)

MAX_DIMS = 64


def split_table_url(table_url: str) -> tuple[str, str]:
    """``OUT/tables/NAME`` -> (``OUT``, ``NAME``)."""
    head, sep, name = table_url.rstrip("/").rpartition("/tables/")
    if not sep or not name:
        raise OptionError(f"'{table_url}' is not a table path; give OUT/tables/NAME (from `tilewise embed`).")
    return head, name


def confound_targets(frame, attrs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per-object nuisances: log size, mean intensity (when the table has it) and local
    crowding (neighbours within two median diameters, from physical centroids)."""
    from scipy.spatial import cKDTree

    out = {"log_size": np.log1p(frame["voxels"].to_numpy(np.float64))}
    if "intensity_mean" in frame:
        out["intensity"] = frame["intensity_mean"].to_numpy(np.float64)
    dims, units = attrs.get("axes", []), attrs.get("units", [])
    cols = [f"centroid_{d}_{u or 'physical'}" for d, u in zip(dims, units)]
    if cols and all(c in frame for c in cols) and len(frame) > 2:
        xyz = frame[cols].to_numpy(np.float64)
        volume = frame["volume"].to_numpy(np.float64) if "volume" in frame else frame["voxels"].to_numpy(np.float64)
        diameter = float(np.median(equivalent_diameter(volume, len(cols))))
        counts = cKDTree(xyz).query_ball_point(xyz, r=2 * diameter, return_length=True)
        out["crowding"] = np.asarray(counts, np.float64) - 1
    return out


def analyze(table_url: str, *, group_by: str, out: str | None = None, null_size: int = 1000, seed: int = 0,
            storage_options: dict | None = None) -> dict[str, Any]:
    """Scores (and, with ``out``, an HTML report beside ``<out>.json``) for every embedding."""
    from pipeline.analysis import report
    from pipeline.analysis.representation import (confound_r2, knn_accuracy, over_best_baseline, probe_accuracy,
                                                  retrieval_map)

    output_url, name = split_table_url(table_url)
    frame = read_table(output_url, name, storage_options)
    attrs = read_attributes(output_url, name, storage_options)
    columns = embedding_columns(frame)
    if not columns:
        raise InputError(f"Table '{table_url}' has no embed_* columns; run `tilewise embed` first.")
    if group_by not in frame:
        others = [c for c in frame.columns if c not in columns]
        raise OptionError(f"Table '{table_url}' has no column '{group_by}'; group by one of: {', '.join(others)}.")
    groups = frame[group_by].astype(str).to_numpy()
    counts = dict(zip(*np.unique(groups, return_counts=True)))
    keep = np.asarray([counts[g] >= 2 for g in groups])
    notes = []
    if not keep.all():
        notes.append(f"{int((~keep).sum())} objects in groups of one were left out (nothing to retrieve).")
    if len(set(groups[keep])) < 2:
        raise InputError(f"Column '{group_by}' needs at least two groups with two objects or more.")
    frame, groups = frame[keep].reset_index(drop=True), groups[keep]
    targets = confound_targets(frame, attrs)
    scores: dict[str, dict[str, float]] = {}
    confounds: dict[str, dict[str, float]] = {}
    maps: dict[str, str] = {}
    for column in columns:
        kind = column.removeprefix("embed_")
        x = reduced(embedding_matrix(frame, column), kind, notes)
        ret = retrieval_map(x, groups, null_size=null_size, seed=seed)
        scores[kind] = {"map": ret["map"], "map_p": ret["map_p"], "knn_acc": knn_accuracy(x, groups, seed=seed),
                        "probe_acc": probe_accuracy(x, groups, seed=seed)}
        confounds[kind] = {t: confound_r2(x, y, seed=seed) for t, y in targets.items()}
        if out is not None and "_l" not in kind:  # the level sweep is in the tables, not the maps
            maps[kind] = report.object_map(x, groups, kind)
        log.info("%s: %s", kind, scores[kind])
    differences = over_best_baseline(scores)
    result = {"table": table_url, "group_by": group_by, "objects": int(len(frame)), "groups": len(set(groups)),
              "scores": scores, "over_best_baseline": differences, "confounds": confounds, "notes": notes}
    if out is not None:
        page = report.render(title=f"Embeddings of {name}", group_by=group_by, scores=scores, differences=differences,
                             confounds=confounds, maps=maps, gallery_png=_gallery(output_url, attrs, frame, groups,
                                                                                  storage_options), notes=notes)
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page)
        path.with_suffix(".json").write_text(json.dumps(result, indent=2))
        result["report"] = str(path)
    return result


def reduced(x: np.ndarray, kind: str, notes: list[str], max_dims: int = MAX_DIMS) -> np.ndarray:
    """Embeddings wider than ``max_dims`` PCA-reduced to it (cosine on thousands of raw pixels
    is dominated by background)."""
    if x.shape[1] <= max_dims or len(x) <= max_dims:
        return x
    from sklearn.decomposition import PCA

    notes.append(f"{kind}: {x.shape[1]} dimensions PCA-reduced to {max_dims} before scoring.")
    return PCA(max_dims, random_state=0).fit_transform(x)


def _gallery(output_url: str, attrs: Mapping[str, Any], frame, groups: np.ndarray, storage_options,
             per_group: int = 6, half: int = 16) -> str | None:
    """A few crops per group from the image the table describes (middle plane in 3D)."""
    from pipeline.analysis.report import gallery

    if "image" not in attrs:
        return None
    try:
        image = open_image(store.resolve(output_url, attrs["image"]), storage_options)
    except InputError:
        return None
    dims = list(attrs.get("axes", []))
    spatial = [image.dims.index(d) for d in dims]
    shape = image.level(0).shape
    crops: dict[str, list[np.ndarray]] = {}
    for g in sorted(set(groups))[:12]:
        rows = frame[groups == g].head(per_group)
        for _, row in rows.iterrows():
            index = [slice(None)] * len(shape)
            for axis, d in zip(spatial, dims):
                c = int(row[f"centroid_{d}"])
                index[axis] = c if (len(dims) == 3 and d == dims[0]) else slice(max(0, c - half), c + half)
            crop = np.asarray(image.read(tuple(index)), np.float32)
            while crop.ndim > 2:  # channels: their mean
                crop = crop.mean(axis=0)
            lo, hi = np.percentile(crop, (1, 99.5)) if crop.size else (0, 1)
            crops.setdefault(g, []).append(np.clip((crop - lo) / max(hi - lo, 1e-6), 0, 1))
    return gallery(crops) if crops else None
