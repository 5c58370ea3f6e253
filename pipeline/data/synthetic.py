"""Synthetic samples with ground truth, generated block by block (bounded memory, any size).

``make_lightsheet``: a 3D fluorescence volume of nuclei (several shape/texture classes),
anisotropic Gaussian PSF, mild depth attenuation, Poisson-Gaussian noise; writes ``raw``
(uint16) at the store's root, ``clean/`` (float32, the noise-free expectation of ``raw``),
``labels/nuclei`` and a ground-truth table ``tables/ground_truth`` with each object's class.

``make_wholeslide``: a 2D RGB H&E-like slide (tissue islands, eosin stroma, haematoxylin nuclei)
with ``labels/nuclei``.

Both are deterministic from ``seed``: every block is rendered from absolute positions only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from pipeline.data.nuclei import CLASSES, NucleiField, value_noise
from pipeline.core.errors import OptionError
from pipeline.core.regions import Region, grow_block, iter_regions, n_regions
from pipeline.io import store
from pipeline.io.ngff import default_axes
from pipeline.io.tables import INSTANCE_KEY, REGION_KEY, TableSpec, begin_table, table_url, write_part
from pipeline.io.write import ImageSink, create_image, create_labels
from pipeline.engine.pyramid import finalize_image
from pipeline.engine.submit import run_tasks

log = logging.getLogger(__name__)
BLOCK_BYTES = 16 * 2**20
LIGHTSHEET_PARTS = ("raw", "clean", "labels")


@dataclass(frozen=True)
class LightsheetModel:
    """Imaging model of the synthetic light-sheet volume (physical units: micrometres)."""

    scale: tuple[float, float, float] = (1.0, 0.5, 0.5)
    psf_sigma_um: tuple[float, float, float] = (1.5, 0.35, 0.35)
    photons: float = 60.0  # expected photons at the centre of a nucleus of brightness 1
    background: float = 4.0  # photons per voxel
    attenuation_um: float = 600.0  # depth attenuation length along z
    gain: float = 8.0  # ADU per photon
    offset: float = 100.0  # camera offset, ADU
    read_noise: float = 6.0  # ADU

    @property
    def sigma_px(self) -> tuple[float, ...]:
        return tuple(s / p for s, p in zip(self.psf_sigma_um, self.scale))

    @property
    def halo_px(self) -> tuple[int, ...]:
        return tuple(int(math.ceil(4 * s)) for s in self.sigma_px)


def _check_shape(shape: Sequence[int], what: str, axes: str, example: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    ndim = len(axes.split(", "))
    if len(shape) != ndim or min(shape) < 1:
        raise OptionError(f"The {what} sample is {ndim}D ({axes}); got shape {shape}. Use e.g. --shape {example}.")
    return shape


def _ground_truth_spec(scale: Sequence[float], dims: str) -> TableSpec:
    """The ground-truth table has the schema of every tilewise table (``pipeline.io.tables``)."""
    return TableSpec(tuple(dims), tuple(scale), (0.0,) * len(dims), ("micrometer",) * len(dims),
                     region="nuclei", extra={"ground_truth": True})


def _ground_truth_rows(field: NucleiField, nuclei, core: Region, spec: TableSpec):
    """One row per object whose first in-image voxel lies in ``core`` (so exactly one block)."""
    import pandas as pd

    rows: dict[str, list] = {"label": [], "voxels": []}
    rows.update({f"centroid_{d}": [] for d in spec.dims})
    rows.update({"class": [], "class_name": []})
    for nuc in nuclei:
        seen = field.visible(nuc)
        if seen is None or not all(sl.start <= f < sl.stop for f, sl in zip(seen[0], core)):
            continue
        rows["label"].append(nuc.id)
        rows["class"].append(nuc.cls)
        rows["class_name"].append(CLASSES[nuc.cls].name)
        rows["voxels"].append(seen[2])
        for d, c in zip(spec.dims, seen[1]):
            rows[f"centroid_{d}"].append(c)
    count = np.asarray(rows["voxels"], np.int64)
    out = {INSTANCE_KEY: np.asarray(rows["label"], np.uint64),
           REGION_KEY: pd.Categorical([spec.region] * len(count)),
           "voxels": count, "volume": count * float(np.prod(spec.scale))}
    for d, s, t, u in zip(spec.dims, spec.scale, spec.translation, spec.units):
        centroid = np.asarray(rows[f"centroid_{d}"], np.float64)
        out[f"centroid_{d}"] = centroid
        out[f"centroid_{d}_{u}"] = t + s * centroid
    out["class"] = np.asarray(rows["class"], np.int64)
    out["class_name"] = rows["class_name"]
    return pd.DataFrame(out)


def _part_name(region: Region, block: Sequence[int]) -> str:
    return "-".join(str(sl.start // b) for sl, b in zip(region, block))


def _lightsheet_block(model: LightsheetModel, field: NucleiField, sinks: dict[str, ImageSink],
                      root: str, block: tuple[int, ...], region: Region) -> int:
    halo = model.halo_px
    ext = tuple(slice(sl.start - h, sl.stop + h) for sl, h in zip(region, halo))
    intensity, labels, nuclei = field.render(ext)
    photons = model.background + model.photons * intensity
    z_um = np.arange(ext[0].start, ext[0].stop) * model.scale[0]
    photons *= np.exp(-np.clip(z_um, 0, None) / model.attenuation_um)[:, None, None].astype(np.float32)
    photons = ndimage.gaussian_filter(photons, model.sigma_px, mode="nearest", truncate=4.0)
    core = tuple(slice(h, h + sl.stop - sl.start) for sl, h in zip(region, halo))
    photons = photons[core]
    if "clean" in sinks:
        sinks["clean"].write(region, (model.gain * photons + model.offset).astype(np.float32))
    if "raw" in sinks:
        rng = np.random.default_rng([field.seed, 7919, *(sl.start // b for sl, b in zip(region, block))])
        raw = model.gain * rng.poisson(photons).astype(np.float32) + model.offset
        raw += rng.normal(0.0, model.read_noise, raw.shape).astype(np.float32)
        sinks["raw"].write(region, np.clip(np.rint(raw), 0, 65535).astype(np.uint16))
    if "labels" in sinks:
        sinks["labels"].write(region, labels[core])
        spec = _ground_truth_spec(model.scale, "zyx")
        rows = _ground_truth_rows(field, nuclei, region, spec)
        if len(rows):
            write_part(table_url(root, "ground_truth"), _part_name(region, block), rows, spec,
                       sinks["labels"].storage_options)
    return int(np.prod([sl.stop - sl.start for sl in region]))


def make_lightsheet(
    url: str,
    client: Any,
    *,
    shape: Sequence[int] = (96, 512, 512),
    seed: int = 0,
    chunks: Sequence[int] | None = None,
    model: LightsheetModel = LightsheetModel(),
    parts: Sequence[str] = LIGHTSHEET_PARTS,
    version: str = "0.5",
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
) -> dict[str, str]:
    """Write the synthetic light-sheet sample to ``url``; returns the URL of each part written."""
    shape = _check_shape(shape, "light-sheet", "z, y, x", "96,512,512")
    unknown = set(parts) - set(LIGHTSHEET_PARTS)
    if unknown or not parts:
        raise OptionError(f"Unknown parts {sorted(unknown)}; choose from {LIGHTSHEET_PARTS}.")
    field = NucleiField(shape, model.scale, seed)
    axes = default_axes("zyx")
    common = dict(shape=shape, axes=axes, scale=model.scale, chunks=chunks, version=version,
                  storage_options=storage_options)
    # the noisy image is the store's root (NGFF readers open it from there, with its labels);
    # the clean image, when asked for, sits inside it as clean/
    sinks: dict[str, ImageSink] = {}
    root = "raw" if ("raw" in parts or "labels" in parts) else "clean"
    if root == "raw":
        sinks["raw"] = create_image(url, dtype=np.uint16, name="raw", overwrite=overwrite, **common)
    if "clean" in parts:
        sinks["clean"] = create_image(url if root == "clean" else store.join(url, "clean"), dtype=np.float32,
                                      name="clean", overwrite=overwrite and root == "clean", **common)
    store.open_group(url, "a", storage_options).attrs.update(
        {"tilewise": {"sample": "lightsheet", "seed": seed, "shape": list(shape)}})
    if "labels" in parts:
        sinks["labels"] = create_labels(sinks["raw"], "nuclei", dtype=np.uint32, n_labels=field.max_id)
    if "raw" not in parts:
        sinks.pop("raw")  # created only as the labels' parent image
    if "labels" in parts:
        begin_table(url, "ground_truth", _ground_truth_spec(model.scale, "zyx"), storage_options)
    lv0 = next(iter(sinks.values())).levels[0]
    block = grow_block(lv0.write_unit, shape, 4, BLOCK_BYTES)
    fn = partial(_lightsheet_block, model, field, sinks, url, block)
    voxels = sum(run_tasks(client, fn, iter_regions(shape, block), total=n_regions(shape, block),
                           desc="lightsheet", progress=progress, unit_size=int(np.prod(block))))
    for part, sink in sinks.items():
        finalize_image(sink, client, labels=(part == "labels"), progress=progress)
    log.info("wrote light-sheet sample %s: %d voxels, parts %s", url, voxels, list(sinks))
    return {part: sink.url for part, sink in sinks.items()}


# --- whole slide ------------------------------------------------------------------------------

HEMATOXYLIN = np.array([0.65, 0.70, 0.29])
EOSIN = np.array([0.07, 0.99, 0.11])


def _tissue(region: Region, seed: int, scale: float = 600.0) -> np.ndarray:
    """Smooth tissue density in [0, 1): islands of tissue where it exceeds ~0.45, about
    ``scale`` pixels across, with edges rough at a quarter of that."""
    return 0.65 * value_noise(region, scale, seed + 1) + 0.35 * value_noise(region, scale / 4, seed + 2)


def _wholeslide_block(field: NucleiField, sinks: dict[str, ImageSink], block: tuple[int, ...],
                      tissue_scale: float, region: Region) -> int:
    yx = region[1:]
    seed = field.seed
    # tissue over the block plus one nucleus cell, so every overlapping nucleus's centre is inside
    margin = field.cell
    ext = tuple(slice(sl.start - m, sl.stop + m) for sl, m in zip(yx, margin))
    tissue_ext = _tissue(ext, seed, tissue_scale)
    alpha = np.clip((tissue_ext[tuple(slice(m, -m) for m in margin)] - 0.45) / 0.04, 0.0, 1.0)
    intensity, labels, nuclei = field.render(yx)
    # nuclei live only in tissue: keep those whose centre lies in it (decided per object, so a
    # nucleus cut by a block border is kept or dropped identically in both blocks)
    keep = [n.id for n in nuclei
            if tissue_ext[tuple(int(c) - e.start for c, e in zip(n.center, ext))] > 0.47]
    in_tissue = np.isin(labels, list(keep)) if keep else np.zeros(labels.shape, bool)
    labels = np.where(in_tissue, labels, 0)
    stroma = alpha * (0.35 + 0.25 * value_noise(yx, 12.0, seed + 3))
    haem = np.where(in_tissue, 0.55 + 0.45 * intensity, 0.0) + 0.04 * alpha
    od = haem[..., None] * HEMATOXYLIN + stroma[..., None] * EOSIN
    rng = np.random.default_rng([seed, 104729, *(sl.start // b for sl, b in zip(yx, block[1:]))])
    rgb = 245.0 * np.exp(-1.6 * od) + rng.normal(0.0, 2.0, od.shape)
    sinks["image"].write(region, np.clip(np.rint(rgb), 0, 255).astype(np.uint8).transpose(2, 0, 1))
    sinks["labels"].write(yx, labels.astype(sinks["labels"].levels[0].dtype))
    return int(np.prod(labels.shape))


def make_wholeslide(
    url: str,
    client: Any,
    *,
    shape: Sequence[int] = (4096, 4096),
    seed: int = 0,
    scale_um: float = 0.5,
    chunks: Sequence[int] | None = None,
    version: str = "0.5",
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
    tissue_scale: float = 600.0,
) -> dict[str, str]:
    """Write an RGB whole-slide-like image (axes c, y, x; uint8) with nuclei labels at ``url``.

    ``tissue_scale``: the size of the tissue islands in pixels (600: islands of ~300 um between
    glass, every millimetre-wide tile holds some tissue; a few thousand: sections millimetres
    across with wide glass between, as most real slides)."""
    shape = _check_shape(shape, "whole-slide", "y, x", "4096,4096")
    if chunks is not None and (len(chunks) != 2 or min(chunks) < 1):
        raise OptionError(f"The whole-slide sample's chunks are y, x (e.g. --chunks 256,256); got {tuple(chunks)}.")
    field = NucleiField(shape, (scale_um, scale_um), seed, density=0.8)
    image = create_image(url, shape=(3, *shape), dtype=np.uint8, axes=default_axes("cyx"),
                         scale=(1.0, scale_um, scale_um), chunks=(1, *(chunks or (1024, 1024))),
                         version=version, name="wholeslide", channel_names=("R", "G", "B"),
                         overwrite=overwrite, storage_options=storage_options)
    labels = create_labels(image, "nuclei", dtype=np.uint32, n_labels=field.max_id)
    sinks = {"image": image, "labels": labels}
    block = (3, *grow_block(labels.levels[0].write_unit, shape, 3, BLOCK_BYTES))
    fn = partial(_wholeslide_block, field, sinks, block, float(tissue_scale))
    full = (3, *shape)
    sum(run_tasks(client, fn, iter_regions(full, block), total=n_regions(full, block), desc="wholeslide",
                  progress=progress, unit_size=int(np.prod(block[1:]))))
    finalize_image(image, client, progress=progress, colors=("FF0000", "00FF00", "0000FF"))
    finalize_image(labels, client, labels=True, progress=progress)
    return {"image": image.url, "labels": labels.url}
