"""Where a store lives: local paths and fsspec URLs, treated the same way.

A store location is a plain string (``/data/x.ome.zarr`` or ``s3://bucket/x.ome.zarr``) plus
optional fsspec ``storage_options``. Keeping it a string keeps everything we send to tasks small
and picklable; tasks open the zarr array themselves.
"""

from __future__ import annotations

from typing import Any, Mapping

import fsspec
import zarr

from pipeline.errors import InputError, OutputExistsError


def join(url: str, *parts: str) -> str:
    """Join path components of a store URL with ``/`` (works for paths and URLs alike)."""
    out = url.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def _fs(url: str, storage_options: Mapping[str, Any] | None):
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = _fs(url, storage_options)
    return bool(fs.exists(path))


def remove(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete a store (used only for ``--overwrite`` on outputs)."""
    fs, path = _fs(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _kwargs(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    # zarr refuses storage_options for plain local paths, so pass them only when given.
    return {"storage_options": dict(storage_options)} if storage_options else {}


def open_group_readonly(url: str, storage_options: Mapping[str, Any] | None = None) -> zarr.Group:
    """Open a zarr group (v2 or v3) read-only; the input store is never modified."""
    if not exists(url, storage_options):
        raise InputError(f"No store at '{url}': the path does not exist. Check the path or URL.")
    try:
        node = zarr.open(store=url, mode="r", **_kwargs(storage_options))
    except Exception as exc:  # zarr raises several types for "not zarr"
        raise InputError(
            f"'{url}' is not a zarr store ({exc.__class__.__name__}: {exc}). Convert TIFF or other "
            "files with `tilewise convert IN OUT --axes ...`."
        ) from exc
    if not isinstance(node, zarr.Group):
        raise InputError(
            f"'{url}' is a plain zarr array, not an OME-Zarr image. Convert it with "
            f"`tilewise convert {url} OUT.ome.zarr --axes zyx` (name its axes)."
        )
    return node


def open_array(url: str, mode: str = "r", storage_options: Mapping[str, Any] | None = None) -> zarr.Array:
    return zarr.open_array(store=url, mode=mode, **_kwargs(storage_options))


def open_group(url: str, mode: str = "a", storage_options: Mapping[str, Any] | None = None, zarr_format: int | None = None) -> zarr.Group:
    kw = _kwargs(storage_options)
    if zarr_format is not None:
        kw["zarr_format"] = zarr_format
    return zarr.open_group(store=url, mode=mode, **kw)


def prepare_output(url: str, overwrite: bool, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse to clobber an existing output unless ``overwrite``; with it, remove the old one."""
    if exists(url, storage_options):
        if not overwrite:
            raise OutputExistsError(
                f"Output '{url}' already exists; pass --overwrite (overwrite=True) to replace it, "
                "or choose another path."
            )
        remove(url, storage_options)
