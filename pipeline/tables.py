"""Per-object tables: computed per tile as mergeable partial sums, finished once objects are known.

A tile measures the objects in its core as *partial* rows (voxel count, coordinate sums,
bounding box, intensity sums, min and max), which add up exactly when an object is split over
several tiles. After stitching, an object that lives in one tile is finished by that tile's
task; only the partial rows of stitched objects travel to the client, where they are summed per
final id (their number grows with the tile *surface*, not with the volume).

Layout (one Parquet dataset per table, readable by pandas, pyarrow, DuckDB, Spark):
``tables/<name>/part-*.parquet`` plus ``tables/<name>/_attributes.json`` with the link to the
labels image (``region``), the instance and region key columns, units and the pixel size; the
same attributes are in each Parquet file's schema metadata. :func:`to_anndata` reads it as
AnnData with the spatialdata conventions (``uns["spatialdata_attrs"]``, ``obsm["spatial"]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.io import store

INSTANCE_KEY = "label"
REGION_KEY = "region"


@dataclass(frozen=True)
class TableSpec:
    """How raw partial sums become rows: axis names, pixel size and offset of the labels level."""

    dims: tuple[str, ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...]
    units: tuple[str | None, ...]
    channels: int = 1
    region: str = "labels/nuclei"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def attributes(self) -> dict[str, Any]:
        return {"region": self.region, "region_key": REGION_KEY, "instance_key": INSTANCE_KEY,
                "axes": list(self.dims), "scale": list(self.scale), "translation": list(self.translation),
                "units": list(self.units), "format": "tilewise-table/0.1", **dict(self.extra)}


def partial_stats(labels: np.ndarray, n: int, origin: Sequence[int], dims: Sequence[str],
                  intensity: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mergeable sums for objects ``1..n`` of a block whose every id ``1..n`` is present.

    ``origin`` is the block's position in the labels image (pixel coordinates come out global);
    ``intensity`` is ``(C, *block)`` in input units, or None.
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
    if intensity is not None:
        index = np.arange(1, n + 1)
        for c, img in enumerate(intensity):
            img = img.astype(np.float64, copy=False)
            vals = img.ravel()
            cols[f"isum_{c}"] = np.bincount(flat, weights=vals, minlength=n + 1)[1:n + 1]
            cols[f"isq_{c}"] = np.bincount(flat, weights=vals * vals, minlength=n + 1)[1:n + 1]
            cols[f"imin_{c}"] = np.asarray(ndimage.minimum(img, labels, index), np.float64).reshape(n)
            cols[f"imax_{c}"] = np.asarray(ndimage.maximum(img, labels, index), np.float64).reshape(n)
    return cols


def combine(partials):
    """Sum the partial rows of objects split over tiles (``label`` holds the final id)."""
    agg = {}
    for col in partials.columns:
        if col == INSTANCE_KEY:
            continue
        agg[col] = "min" if col.startswith(("min_", "imin_")) else "max" if col.startswith(("max_", "imax_")) else "sum"
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
    out["tiles"] = partials["tiles"].to_numpy(np.int64)
    return pd.DataFrame(out)


def table_url(output_url: str, name: str) -> str:
    return store.join(output_url, "tables", name)


def begin_table(output_url: str, name: str, spec: TableSpec, storage_options: Mapping[str, Any] | None = None) -> str:
    """Create (empty) ``tables/<name>`` with its attributes; returns its URL."""
    url = table_url(output_url, name)
    fs, path = store._fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/_attributes.json", "w") as fh:
        json.dump(spec.attributes(), fh, indent=2)
    return url


def write_part(url: str, part: str, rows, spec: TableSpec, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write one Parquet part (``part-<part>.parquet``); the attributes ride in its schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(rows, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"tilewise": json.dumps(spec.attributes()).encode()})
    fs, path = store._fs(url, storage_options)
    with fs.open(f"{path}/part-{part}.parquet", "wb") as fh:
        pq.write_table(table, fh)


def read_attributes(output_url: str, name: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    fs, path = store._fs(table_url(output_url, name), storage_options)
    with fs.open(f"{path}/_attributes.json", "r") as fh:
        return json.load(fh)


def read_table(output_url: str, name: str, storage_options: Mapping[str, Any] | None = None, columns=None):
    """The whole table as a pandas DataFrame sorted by label (for tables that fit in memory;
    use ``pyarrow.dataset`` on ``tables/<name>`` to stream larger ones)."""
    import pyarrow.dataset as ds

    fs, path = store._fs(table_url(output_url, name), storage_options)
    frame = ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns).to_pandas()
    return frame.sort_values(INSTANCE_KEY, kind="stable").reset_index(drop=True)


def to_anndata(output_url: str, name: str, storage_options: Mapping[str, Any] | None = None):
    """The table as AnnData: numeric measurements in ``X``, ids and region in ``obs``, physical
    centroids in ``obsm["spatial"]``, the labels link in ``uns["spatialdata_attrs"]``."""
    import pandas as pd

    try:
        import anndata
    except ImportError:  # pragma: no cover - optional
        from pipeline.errors import OptionError

        raise OptionError("Reading a table as AnnData needs the 'anndata' package: pip install anndata.") from None
    frame = read_table(output_url, name, storage_options)
    attrs = read_attributes(output_url, name, storage_options)
    obs_cols = [INSTANCE_KEY, REGION_KEY]
    spatial_cols = [f"centroid_{d}_{u or 'physical'}" for d, u in zip(attrs["axes"], attrs["units"])]
    features = [c for c in frame.columns if c not in obs_cols]
    obs = frame[obs_cols].copy()
    obs.index = obs[INSTANCE_KEY].astype(str)
    adata = anndata.AnnData(X=frame[features].to_numpy(np.float64), obs=obs,
                            var=pd.DataFrame(index=features))
    adata.obsm["spatial"] = frame[spatial_cols].to_numpy(np.float64)
    adata.uns["spatialdata_attrs"] = {"region": attrs["region"], "region_key": REGION_KEY,
                                      "instance_key": INSTANCE_KEY}
    adata.uns["tilewise"] = attrs
    return adata
