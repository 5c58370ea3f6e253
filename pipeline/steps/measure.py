"""Per-object measurements, computed per tile as mergeable partial sums and finished once the
objects are known.

A tile measures the objects in its core as *partial* rows (voxel count, coordinate sums,
bounding box, intensity sums, min and max), which add up exactly when an object is split over
several tiles. After stitching, an object that lives in one tile is finished by that tile's
task; only the partial rows of stitched objects travel to the client, where they are summed per
final id (their number grows with the tile *surface*, not with the volume). How tables are
stored is ``pipeline.io.tables``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pipeline.io.tables import INSTANCE_KEY, REGION_KEY, TableSpec


def partial_stats(labels: np.ndarray, n: int, origin: Sequence[int], dims: Sequence[str],
                  intensity: np.ndarray | None = None, batch: Mapping[str, int] | None = None,
                  maps: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Mergeable sums for objects ``1..n`` of a block whose every id ``1..n`` is present.

    ``origin`` is the block's position in the labels image (pixel coordinates come out global);
    ``intensity`` is ``(C, *block)`` in input units, or None; ``maps`` are named per-pixel maps
    (uncertainty) whose per-object mean and maximum the table gets.
    """
    from scipy import ndimage

    flat = labels.ravel()
    cols: dict[str, np.ndarray] = {"voxels": np.bincount(flat, minlength=n + 1)[1:n + 1].astype(np.int64),
                                   "tiles": np.ones(n, np.int64)}
    boxes = ndimage.find_objects(labels, max_label=n)
    for axis, (d, o) in enumerate(zip(dims, origin)):
        shape = [1] * labels.ndim
        shape[axis] = labels.shape[axis]
        coord = np.broadcast_to(np.arange(o, o + labels.shape[axis], dtype=np.float64).reshape(shape), labels.shape)
        cols[f"sum_{d}"] = np.bincount(flat, weights=coord.ravel(), minlength=n + 1)[1:n + 1]
        cols[f"min_{d}"] = np.array([b[axis].start + o for b in boxes], np.int64)
        cols[f"max_{d}"] = np.array([b[axis].stop + o for b in boxes], np.int64)  # exclusive
    for name, index_at in dict(batch or {}).items():  # the time point (or other batch index) of the block
        cols[f"sum_{name}"] = cols["voxels"] * float(index_at)
        cols[f"min_{name}"] = np.full(n, index_at, np.int64)
        cols[f"max_{name}"] = np.full(n, index_at + 1, np.int64)
    if intensity is not None:
        index = np.arange(1, n + 1)
        for c, img in enumerate(intensity):
            img = img.astype(np.float64, copy=False)
            vals = img.ravel()
            cols[f"isum_{c}"] = np.bincount(flat, weights=vals, minlength=n + 1)[1:n + 1]
            cols[f"isq_{c}"] = np.bincount(flat, weights=vals * vals, minlength=n + 1)[1:n + 1]
            cols[f"imin_{c}"] = np.asarray(ndimage.minimum(img, labels, index), np.float64).reshape(n)
            cols[f"imax_{c}"] = np.asarray(ndimage.maximum(img, labels, index), np.float64).reshape(n)
    for name, values in dict(maps or {}).items():
        values = values.astype(np.float64, copy=False)
        cols[f"usum_{name}"] = np.bincount(flat, weights=values.ravel(), minlength=n + 1)[1:n + 1]
        cols[f"umax_{name}"] = np.asarray(ndimage.maximum(values, labels, np.arange(1, n + 1)), np.float64).reshape(n)
    return cols


def combine(partials):
    """Sum the partial rows of objects split over tiles (``label`` holds the final id)."""
    agg = {}
    for col in partials.columns:
        if col == INSTANCE_KEY:
            continue
        agg[col] = ("min" if col.startswith(("min_", "imin_")) else
                    "max" if col.startswith(("max_", "imax_", "umax_")) else "sum")
    return partials.groupby(INSTANCE_KEY, sort=True).agg(agg).reset_index()


def finish(partials, spec: TableSpec):
    """Partial sums -> the table's rows (pandas DataFrame), one per object."""
    import pandas as pd

    count = partials["voxels"].to_numpy(np.float64)
    out = {INSTANCE_KEY: partials[INSTANCE_KEY].to_numpy(np.uint64),
           REGION_KEY: pd.Categorical([spec.region] * len(partials)),
           "voxels": partials["voxels"].to_numpy(np.int64),
           "volume": count * float(np.prod(spec.scale))}
    for d, s, t, u in zip(spec.dims, spec.scale, spec.translation, spec.units):
        centroid = partials[f"sum_{d}"].to_numpy() / count
        out[f"centroid_{d}"] = centroid
        out[f"centroid_{d}_{u or 'physical'}"] = t + s * centroid
    for d in spec.dims:
        out[f"bbox_min_{d}"] = partials[f"min_{d}"].to_numpy(np.int64)
        out[f"bbox_max_{d}"] = partials[f"max_{d}"].to_numpy(np.int64)
    for c in range(spec.channels):
        if f"isum_{c}" not in partials:
            break
        suffix = "" if spec.channels == 1 else f"_{c}"
        mean = partials[f"isum_{c}"].to_numpy() / count
        out[f"intensity_mean{suffix}"] = mean
        out[f"intensity_std{suffix}"] = np.sqrt(np.maximum(partials[f"isq_{c}"].to_numpy() / count - mean**2, 0))
        out[f"intensity_min{suffix}"] = partials[f"imin_{c}"].to_numpy()
        out[f"intensity_max{suffix}"] = partials[f"imax_{c}"].to_numpy()
    for name in spec.maps:  # uncertainty: where in an object the model was unsure, and how much
        out[f"{name}_mean"] = partials[f"usum_{name}"].to_numpy() / count
        out[f"{name}_max"] = partials[f"umax_{name}"].to_numpy()
    for name in spec.batch:  # an object lives at one time point: its index, as a column
        out[name] = np.rint(partials[f"sum_{name}"].to_numpy() / count).astype(np.int64)
    out["tiles"] = partials["tiles"].to_numpy(np.int64)
    return pd.DataFrame(out)
