"""OME-NGFF metadata: parse 0.4 / 0.5 into plain dataclasses, and write it with ome-zarr-py.

Reading is done by hand because ome-zarr-py's reader resolves whole node graphs eagerly and
hides the per-level chunk layout we plan tiles on; writing goes through
``ome_zarr.writer`` so the JSON matches what the reference implementation emits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.core.errors import InputError

SUPPORTED_VERSIONS = ("0.4", "0.5")
SPACE, CHANNEL, TIME = "space", "channel", "time"


@dataclass(frozen=True)
class Axis:
    """One named NGFF axis: ``name`` (``z``, ``c``...), ``type`` and physical ``unit``."""

    name: str
    type: str | None = None
    unit: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"name": self.name}
        if self.type:
            out["type"] = self.type
        if self.unit:
            out["unit"] = self.unit
        return out


@dataclass(frozen=True)
class Level:
    """One resolution level of a multiscale image: array path, layout and its placement."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    dtype: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]

    @property
    def write_unit(self) -> tuple[int, ...]:
        """The smallest region one writer may own: a shard when sharded, else a chunk."""
        return self.shards or self.chunks

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class ImageMeta:
    """What every multiscale image carries, whether opened for reading or created for writing."""

    url: str
    version: str
    name: str
    axes: tuple[Axis, ...]
    levels: tuple[Level, ...]
    channel_names: tuple[str, ...] | None = None
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)


def default_axes(names: str | Sequence[str], unit: str | None = "micrometer") -> tuple[Axis, ...]:
    """Axes from letters such as ``"czyx"``: t=time, c=channel, anything else space."""
    axes = []
    for name in names:
        if name == "t":
            axes.append(Axis("t", TIME, "second"))
        elif name == "c":
            axes.append(Axis("c", CHANNEL, None))
        else:
            axes.append(Axis(name, SPACE, unit))
    return tuple(axes)


def validate_axes(axes: Sequence[Axis]) -> None:
    """NGFF axis rules: unique names, 2-5 axes, 2-3 spatial, order time < channel < space."""
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise InputError(f"Axis names must be unique, got {names}; name each axis once (e.g. 'zyx').")
    n_space = sum(a.type == SPACE for a in axes)
    if not 2 <= n_space <= 3:
        raise InputError(f"Need 2 or 3 spatial axes, got {n_space} in {names}; e.g. --axes yx or zyx.")
    rank = {TIME: 0, CHANNEL: 1, SPACE: 2}
    order = [rank.get(a.type or "", 1) for a in axes]
    if order != sorted(order):
        raise InputError(
            f"Axes {names} are out of NGFF order (time, then channel, then space); "
            "reorder them, e.g. 'tczyx'."
        )


def parse_multiscales(attrs: dict[str, Any], where: str) -> tuple[str, dict[str, Any], dict | None]:
    """Find the multiscales block and version in group attributes of either NGFF version."""
    if "ome" in attrs:  # 0.5+: everything below attributes["ome"], version there
        ome = attrs["ome"]
        version = str(ome.get("version", ""))
        multiscales = ome.get("multiscales")
        omero = ome.get("omero")
    else:
        multiscales = attrs.get("multiscales")
        omero = attrs.get("omero")
        version = str(multiscales[0].get("version", "")) if multiscales else ""
    if not multiscales:
        raise InputError(
            f"'{where}' is a zarr group but has no OME-NGFF 'multiscales' metadata, so it is not "
            "an OME-Zarr image. Point at the image group inside it, or convert plain data with "
            "`tilewise convert IN OUT.ome.zarr --axes ...`."
        )
    if version not in SUPPORTED_VERSIONS:
        raise InputError(
            f"'{where}' declares OME-NGFF version '{version or 'unknown'}'; tilewise reads "
            f"{' and '.join(SUPPORTED_VERSIONS)}. Re-export it as 0.4 or 0.5 (e.g. with "
            "bioformats2raw / ome-zarr-py) and try again."
        )
    return version, multiscales[0], omero


def _transforms(items: Sequence[dict[str, Any]], ndim: int) -> tuple[np.ndarray, np.ndarray]:
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for item in items or ():
        if item.get("type") == "scale":
            s = np.asarray(item["scale"], dtype=float)
            scale, translation = scale * s, translation * s
        elif item.get("type") == "translation":
            translation = translation + np.asarray(item["translation"], dtype=float)
    return scale, translation


def level_transforms(multiscale: dict[str, Any], ndim: int) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Per-dataset (scale, translation), composed with the multiscale-wide transform if any."""
    g_scale, g_trans = _transforms(multiscale.get("coordinateTransformations", ()), ndim)
    out = []
    for ds in multiscale["datasets"]:
        s, t = _transforms(ds.get("coordinateTransformations", ()), ndim)
        out.append((tuple((s * g_scale).tolist()), tuple((t * g_scale + g_trans).tolist())))
    return out


def parse_axes(multiscale: dict[str, Any], ndim: int, where: str) -> tuple[Axis, ...]:
    raw = multiscale.get("axes")
    if raw is None:
        raise InputError(f"'{where}' has no 'axes' in its multiscales metadata; it is not valid NGFF 0.4/0.5.")
    axes = tuple(
        Axis(a, None, None) if isinstance(a, str) else Axis(a["name"], a.get("type"), a.get("unit"))
        for a in raw
    )
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        raise InputError(f"'{where}': axis names must be unique, got {names}; fix the multiscales 'axes'.")
    if len(axes) != ndim:
        raise InputError(
            f"'{where}': multiscales declares {len(axes)} axes ({', '.join(a.name for a in axes)}) "
            f"but the array has {ndim} dimensions. Fix the metadata, or re-convert the data with "
            "`tilewise convert` and the right --axes."
        )
    return axes


def datasets_json(levels: Sequence[Level]) -> list[dict[str, Any]]:
    out = []
    for level in levels:
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": list(level.scale)}]
        if any(t != 0 for t in level.translation):
            transforms.append({"type": "translation", "translation": list(level.translation)})
        out.append({"path": level.path, "coordinateTransformations": transforms})
    return out


def ome_format(version: str):
    """The ome-zarr-py Format object for an NGFF version we write."""
    from ome_zarr.format import FormatV04, FormatV05

    if version == "0.4":
        return FormatV04()
    if version == "0.5":
        return FormatV05()
    raise InputError(f"Cannot write NGFF version '{version}'; choose 0.5 (default) or 0.4.")


def zarr_format_for(version: str) -> int:
    return 2 if version == "0.4" else 3
