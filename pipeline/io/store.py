"""The one storage layer: local paths and fsspec URLs, treated the same way.

A store location is a plain string (``/data/x.ome.zarr`` or ``s3://bucket/x.ome.zarr``) plus
optional fsspec ``storage_options``. Keeping it a string keeps everything we send to tasks small
and picklable; tasks open the zarr array themselves. Every file operation of the package goes
through this module: zarr nodes through the ``open_*`` functions, small files (manifests, tile
markers, per-tile intermediates, Parquet parts) through :class:`Folder`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Mapping, Sequence

import fsspec
import zarr

from pipeline.core.errors import InputError, OptionError, OutputExistsError


def join(url: str, *parts: str) -> str:
    """Join path components of a store URL with ``/`` (works for paths and URLs alike)."""
    out = url.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def relative(from_url: str, to_url: str) -> str:
    """The path from ``from_url`` to ``to_url`` (ending in ``/``) when both live on one
    filesystem or bucket, so moving both keeps the link; otherwise ``to_url`` itself."""
    import posixpath

    if "://" in from_url or "://" in to_url:
        a, b = from_url.split("://", 1), to_url.split("://", 1)
        if len(a) == len(b) == 2 and a[0] == b[0] and a[1].split("/")[0] == b[1].split("/")[0]:
            return posixpath.relpath(b[1], a[1]) + "/"
        return to_url
    return os.path.relpath(os.path.abspath(to_url), os.path.abspath(from_url)).replace(os.sep, "/") + "/"


def resolve(base_url: str, link: str) -> str:
    """Where ``link`` (a URL, an absolute path, or a path relative to ``base_url`` such as
    ``../../``, the way NGFF's ``image-label.source.image`` is written) points."""
    import posixpath

    if "://" in link or link.startswith("/"):
        return link.rstrip("/")
    if "://" in base_url:
        scheme, path = base_url.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(path, link))}"
    return os.path.normpath(os.path.join(base_url, link))


# fsspec protocol -> the package that serves it and the tilewise extra that installs it
BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
            "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure")}


def check_name(name: str, what: str) -> str:
    """A name that becomes one path component in a store (an image, labels or table name): no
    separators, no ``.``/``..``, no control characters, so it can never climb out of the store."""
    if (not isinstance(name, str) or not name or name in (".", "..") or len(name) > 255
            or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name)):
        raise InputError(f"{what} name {name!r} is not a plain name (one path component: no '/', '\\' or '..').")
    return name


def _fs(url: str, storage_options: Mapping[str, Any] | None):
    """The fsspec filesystem and path of ``url``; a missing backend is a one-line error."""
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError:
        protocol = url.split("://", 1)[0]
        package, extra = BACKENDS.get(protocol, (f"the fsspec backend for '{protocol}://'", None))
        how = f"pip install 'tilewise[{extra}]'" if extra else "see fsspec's list of implementations"
        raise InputError(f"'{url}' needs {package}, which is not installed: {how}.") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise
        raise InputError(f"'{url}': unknown storage protocol '{url.split('://', 1)[0]}://'; use a local path or an "
                         "fsspec URL such as s3://bucket/image.ome.zarr.") from None


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


def _location(url: str, storage_options: Mapping[str, Any] | None) -> tuple[str, str, Any]:
    """(protocol, canonical path, filesystem): local paths resolved through links and ``..``."""
    fs, path = _fs(url, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        path = os.path.realpath(path)
    return protocol, path.rstrip("/"), fs


def _zarr_root(fs: Any, path: str) -> str:
    """The outermost zarr group holding ``path``: an image inside a store belongs to the store."""
    while "/" in path.strip("/"):
        parent = path.rsplit("/", 1)[0]
        if not parent or not (fs.exists(f"{parent}/zarr.json") or fs.exists(f"{parent}/.zgroup")):
            break
        path = parent
    return path


def check_output_location(output_url: str, input_url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse an output that is the input, lies inside the input's store, or contains it, before
    anything is created or deleted: an input is never written to, even with ``--overwrite``."""
    out_protocol, out_path, _ = _location(output_url, storage_options)
    in_protocol, in_path, fs = _location(input_url, storage_options)
    root = _zarr_root(fs, in_path)
    if out_protocol != in_protocol:
        return
    for what, inside in (("is the input", out_path in (in_path, root)),
                         ("lies inside the input store", out_path.startswith(root + "/")),
                         ("contains the input", root.startswith(out_path + "/") or in_path.startswith(out_path + "/"))):
        if inside:
            raise OptionError(f"Output '{output_url}' {what} ('{input_url}'); tilewise never writes into or deletes "
                              "an input. Choose an output path outside the input store.")


def content_fingerprint(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A digest of every file below ``url`` by name, size and version stamp (ETag, generation or
    modification time), from one listing: any rewritten chunk changes it, no data is read.
    Copying a store changes the stamps too, so a copy counts as changed (the safe side)."""
    import hashlib

    fs, path = _fs(url, storage_options)
    h = hashlib.blake2b(digest_size=16)
    for name, info in sorted(fs.find(path, detail=True).items()):
        stamp = next((info[k] for k in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created")
                      if info.get(k) is not None), "")
        h.update(f"{name[len(path):]}\0{info.get('size')}\0{stamp}\n".encode())
    return h.hexdigest()


def prepare_output(url: str, overwrite: bool, storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuse to clobber an existing output unless ``overwrite``; with it, remove the old one."""
    if exists(url, storage_options):
        if not overwrite:
            raise OutputExistsError(
                f"Output '{url}' already exists; pass --overwrite (overwrite=True) to replace it, "
                "or choose another path."
            )
        remove(url, storage_options)


def _parse_json(text: str | bytes) -> Any:
    """A small JSON document; an empty file reads as ``{}``."""
    return json.loads(text) if text.strip() else {}


@dataclass(frozen=True)
class Folder:
    """A folder in a store, for small files addressed by relative name (``"done/12"``).

    Picklable (a URL and options), so tasks carry it; each call opens what it needs. JSON and
    ``.npz`` helpers cover what the engine stores beside zarr arrays.
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def child(self, *parts: str) -> "Folder":
        return Folder(join(self.url, *parts), self.storage_options)

    def filesystem(self) -> tuple[Any, str]:
        """The fsspec filesystem and this folder's path on it (for pyarrow datasets)."""
        return _fs(self.url, self.storage_options)

    def _path(self, name: str) -> tuple[Any, str]:
        fs, path = self.filesystem()
        return fs, f"{path}/{name}" if name else path

    def exists(self, name: str = "") -> bool:
        fs, path = self._path(name)
        return bool(fs.exists(path))

    def makedirs(self, name: str = "") -> None:
        fs, path = self._path(name)
        fs.makedirs(path, exist_ok=True)

    def open(self, name: str, mode: str = "rb") -> IO:
        fs, path = self._path(name)
        return fs.open(path, mode)

    def names(self, name: str = "", *, folders: bool = False) -> list[str]:
        """Sorted entry names of a sub-folder (files, or with ``folders`` sub-folders only)."""
        fs, path = self._path(name)
        fs.invalidate_cache(path)  # other processes (the workers) add entries: never a cached listing
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=True)
        return sorted(e["name"].rstrip("/").split("/")[-1] for e in entries
                      if (e["type"] == "directory") == folders)

    def remove(self, name: str = "") -> None:
        fs, path = self._path(name)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def write_json(self, name: str, value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
        with self.open(name, "w") as fh:
            json.dump(value, fh, indent=indent, sort_keys=sort_keys)

    def read_json(self, name: str, default: Any = None) -> Any:
        """The parsed file, ``default`` when it does not exist, ``{}`` when it is empty."""
        try:
            with self.open(name, "r") as fh:
                return _parse_json(fh.read())
        except FileNotFoundError:
            return default

    def read_json_many(self, names: Sequence[str], default: Any = None) -> list[Any]:
        """Many small JSON files in one call: an object store fetches them concurrently (fsspec's
        ``cat`` of a list; s3fs batches the requests) where one ``read_json`` each would be one
        round trip each (10^5 tile markers: minutes). As :meth:`read_json`, a file gone reads as
        ``default`` and any other failure is raised."""
        fs, root = self.filesystem()
        paths = [f"{root}/{n}" for n in names]
        got = fs.cat(paths, on_error="return") if paths else {}
        out = []
        for path in paths:
            value = got.get(path, FileNotFoundError(path))
            if isinstance(value, FileNotFoundError):
                out.append(default)
            elif isinstance(value, BaseException):
                raise value
            else:
                out.append(_parse_json(value))
        return out

    def write_arrays(self, name: str, **arrays: Any) -> None:
        """Compressed ``.npz`` (numpy's own format, ``np.load`` reads it), written in one request.

        Written by hand at deflate level 1: ``np.savez_compressed`` has no level and uses 6,
        which took 2.7 ms of a label tile's ~30 ms per file (a 40 x 72 x 72 uint16 shell); level
        1 takes 1.1 ms for a file 1.5x the size."""
        import zipfile

        import numpy as np

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for key, value in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)
        with self.open(name, "wb") as fh:
            fh.write(buf.getvalue())

    def read_arrays(self, name: str, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """The arrays of an ``.npz`` (one request); ``keys``: only these are decompressed."""
        import numpy as np

        with self.open(name, "rb") as fh:
            with np.load(io.BytesIO(fh.read())) as data:
                return {k: data[k] for k in data.files if keys is None or k in keys}

    def iter_files(self, name: str = "") -> Iterator[str]:
        """Relative names (``name/<entry>``) of the files in a sub-folder."""
        for entry in self.names(name):
            yield f"{name}/{entry}" if name else entry
