"""Per-object tables in storage: how they are laid out, written part by part, and read back.

What goes into the rows (mergeable partial sums per tile) is ``pipeline.steps.measure``.

Layout (one Parquet dataset per table, readable by pandas, pyarrow, DuckDB, Spark):
``tables/<name>/part-*.parquet`` plus ``tables/<name>/_attributes.json`` with the link to the
labels image (``region``), the instance and region key columns, units and the pixel size; the
same attributes are in each Parquet file's schema metadata. :func:`to_anndata` reads it as
AnnData with the spatialdata conventions (``uns["spatialdata_attrs"]``, ``obsm["spatial"]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pipeline.io import store
from pipeline.io.store import Folder

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
    region: str = "nuclei"  # the labels element the rows describe (SpatialData's sense): its name
    extra: Mapping[str, Any] = field(default_factory=dict)
    batch: tuple[str, ...] = ()  # time (or custom) axes: one column each with the object's index
    maps: tuple[str, ...] = ()  # per-pixel maps (uncertainty): columns <map>_mean and <map>_max

    def attributes(self) -> dict[str, Any]:
        """The table's attributes; ``labels_path`` is where the labels image lies in the store."""
        return {"region": self.region, "region_key": REGION_KEY, "instance_key": INSTANCE_KEY,
                "labels_path": f"labels/{self.region}", "axes": list(self.dims), "scale": list(self.scale),
                "translation": list(self.translation), "units": list(self.units), "format": "tilewise-table/0.2",
                "batch_axes": list(self.batch), "maps": list(self.maps),
                **dict(self.extra)}


def table_url(output_url: str, name: str) -> str:
    return store.join(output_url, "tables", name)


def begin_table(output_url: str, name: str, spec: TableSpec | Mapping[str, Any],
                storage_options: Mapping[str, Any] | None = None) -> str:
    """Create (empty) ``tables/<name>`` with its attributes (a spec's, or given); returns its URL."""
    url = table_url(output_url, name)
    folder = Folder(url, storage_options or {})
    folder.remove()
    folder.makedirs()
    folder.write_json("_attributes.json", _attributes(spec))
    return url


def _attributes(spec: TableSpec | Mapping[str, Any]) -> dict[str, Any]:
    return spec.attributes() if isinstance(spec, TableSpec) else dict(spec)


def write_part(url: str, part: str, rows, spec: TableSpec | Mapping[str, Any],
               storage_options: Mapping[str, Any] | None = None, *,
               embeddings: Mapping[str, np.ndarray] | None = None) -> None:
    """Write one Parquet part (``part-<part>.parquet``); the attributes ride in its schema.
    ``embeddings``: one fixed-size list column each (float32, ``(n, d)`` in row order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(rows, preserve_index=False)
    for column, values in dict(embeddings or {}).items():
        values = np.ascontiguousarray(values, np.float32)
        if values.ndim != 2 or len(values) != len(rows):
            raise ValueError(f"embedding {column} has shape {values.shape}; needs ({len(rows)}, d)")
        table = table.append_column(column, pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1]))
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"tilewise": json.dumps(_attributes(spec)).encode()})
    with Folder(url, storage_options or {}).open(f"part-{part}.parquet", "wb") as fh:
        pq.write_table(table, fh)


def read_attributes(output_url: str, name: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return Folder(table_url(output_url, name), storage_options or {}).read_json("_attributes.json")


def count_rows(output_url: str, name: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Rows of a table, from the Parquet footers only."""
    import pyarrow.dataset as ds

    fs, path = Folder(table_url(output_url, name), storage_options or {}).filesystem()
    return ds.dataset(path, filesystem=fs, format="parquet").count_rows()


EMBED_PREFIX = "embed_"


def write_table(output_url: str, name: str, rows, attributes: Mapping[str, Any], *,
                embeddings: Mapping[str, np.ndarray] | None = None,
                storage_options: Mapping[str, Any] | None = None) -> str:
    """``tables/<name>`` as one Parquet part: ``rows`` (pandas) plus one fixed-size list column
    per embedding (``embed_<kind>``) and ``attributes``."""
    url = begin_table(output_url, name, attributes, storage_options)
    write_part(url, "0", rows, attributes, storage_options, embeddings=embeddings)
    return url


def embedding_columns(frame) -> list[str]:
    return [c for c in frame.columns if str(c).startswith(EMBED_PREFIX)]


def embedding_matrix(frame, column: str) -> np.ndarray:
    """An ``embed_*`` column (one array per row) as an ``(n, d)`` float32 matrix."""
    values = frame[column].to_numpy()
    return np.stack([np.asarray(v, np.float32) for v in values]) if len(values) else np.zeros((0, 0), np.float32)


def read_table(output_url: str, name: str, storage_options: Mapping[str, Any] | None = None, columns=None):
    """The whole table as a pandas DataFrame sorted by label (for tables that fit in memory;
    use ``pyarrow.dataset`` on ``tables/<name>`` to stream larger ones)."""
    import pyarrow.dataset as ds

    import pandas as pd

    fs, path = Folder(table_url(output_url, name), storage_options or {}).filesystem()
    dataset = ds.dataset(path, filesystem=fs, format="parquet")
    if not dataset.files:  # a run that found no objects wrote no parts
        return pd.DataFrame({INSTANCE_KEY: np.array([], np.uint64)})
    frame = dataset.to_table(columns=columns).to_pandas()
    return frame.sort_values(INSTANCE_KEY, kind="stable").reset_index(drop=True)


def sample_column(output_url: str, name: str, column: str, *, max_parts: int = 256,
                  storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """One column of a table, from every part when it has at most ``max_parts`` (exact), else
    from ``max_parts`` of its per-tile parts evenly spaced (the parts of objects stitched across
    tiles hold 2^18 rows each, all from tile borders, so they would outweigh the sample). For
    statistics a sample answers: a 10^7-object table is 10^4 parts, and reading a column of
    every row sorted on the client costs hundreds of MB."""
    import pyarrow.dataset as ds

    fs, path = Folder(table_url(output_url, name), storage_options or {}).filesystem()
    files = ds.dataset(path, filesystem=fs, format="parquet").files
    if len(files) > max_parts:
        per_tile = [f for f in files if not f.rsplit("/", 1)[-1].startswith("part-stitched")]
        files = per_tile[::-(-len(per_tile) // max_parts)]
    if not files:
        return np.zeros(0)
    return ds.dataset(files, filesystem=fs, format="parquet").to_table(columns=[column]).column(column).to_numpy()


def to_anndata(output_url: str, name: str, storage_options: Mapping[str, Any] | None = None):
    """The table as AnnData: numeric measurements in ``X``, ids and region in ``obs``, physical
    centroids in ``obsm["spatial"]``, the labels link in ``uns["spatialdata_attrs"]``."""
    import pandas as pd

    try:
        import anndata
    except ImportError:  # pragma: no cover - optional
        from pipeline.core.errors import OptionError

        raise OptionError("Reading a table as AnnData needs the 'anndata' package: pip install anndata.") from None
    frame = read_table(output_url, name, storage_options)
    attrs = read_attributes(output_url, name, storage_options)
    embedded = embedding_columns(frame)  # one vector per object: obsm["X_embed_<kind>"]
    # ids, the region and any text column (a class name, say) describe objects: obs, not X
    obs_cols = [INSTANCE_KEY, REGION_KEY] + [c for c in frame.columns if c not in (INSTANCE_KEY, REGION_KEY)
                                             and c not in embedded and not pd.api.types.is_numeric_dtype(frame[c])]
    spatial_cols = [f"centroid_{d}_{u or 'physical'}" for d, u in zip(attrs["axes"], attrs["units"])]
    features = [c for c in frame.columns if c not in obs_cols and c not in embedded]
    obs = frame[obs_cols].copy()
    obs.index = pd.Index(obs[INSTANCE_KEY].astype(str).to_numpy(), name=None)  # a named index clashes on save
    adata = anndata.AnnData(X=frame[features].to_numpy(np.float64), obs=obs,
                            var=pd.DataFrame(index=features))
    adata.obsm["spatial"] = frame[spatial_cols].to_numpy(np.float64)
    for column in embedded:
        adata.obsm[f"X_{column}"] = embedding_matrix(frame, column)
    adata.uns["spatialdata_attrs"] = {"region": attrs["region"], "region_key": REGION_KEY,
                                      "instance_key": INSTANCE_KEY}
    adata.uns["tilewise"] = attrs
    return adata
