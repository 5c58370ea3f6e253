"""Real sample images, fetched the way users can: from the ``stardist`` wheel on PyPI.

The wheel (BSD-3-Clause) ships a few images under ``stardist/data/images/``. We download it with
``pip download --no-deps`` into a cache and read the files out of the archive; stardist itself
is never imported (it pulls TensorFlow-era dependencies).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError, OptionError

log = logging.getLogger(__name__)
WHEEL = "stardist==0.9.2"
MEMBER_DIR = "stardist/data/images/"


@dataclass(frozen=True)
class RealSample:
    """One real sample: image file, optional labels file, axes and pixel size."""

    image: str
    labels: str | None
    axes: str
    scale: tuple[float, ...]
    description: str


SAMPLES: dict[str, RealSample] = {
    "dsb2018": RealSample("img2d.tif", "mask2d.tif", "yx", (1.0, 1.0),
                          "fluorescence nuclei, 2018 Data Science Bowl (Caicedo et al. 2019), with manual labels"),
    "he": RealSample("histo.jpg", None, "cyx", (1.0, 1.0, 1.0), "H&E stained tissue (The Cancer Imaging Archive)"),
    "nuclei3d": RealSample("img3d.tif", "mask3d.tif", "zyx", (1.0, 1.0, 1.0), "synthetic 3D nuclei with labels"),
}


def cache_dir() -> Path:
    """``$TILEWISE_CACHE`` or ``~/.cache/tilewise``."""
    return Path(os.environ.get("TILEWISE_CACHE", Path.home() / ".cache" / "tilewise"))


def _find_archive(folder: Path) -> Path | None:
    found = sorted(folder.glob("stardist-0.9.2*.whl")) + sorted(folder.glob("stardist-0.9.2*.tar.gz"))
    return found[0] if found else None


def download_archive(folder: Path | None = None) -> Path:
    """The stardist wheel (or sdist) in the cache, downloading it with pip if missing."""
    folder = Path(folder or cache_dir()) / "pip"
    folder.mkdir(parents=True, exist_ok=True)
    archive = _find_archive(folder)
    if archive is None:
        log.info("downloading %s into %s", WHEEL, folder)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL, "-d", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archive = _find_archive(folder)
        if done.returncode != 0 or archive is None:
            raise InputError(
                f"Could not download {WHEEL} from PyPI (pip said: {done.stderr.strip()[-300:]}). Check the "
                f"network, or put the wheel into {folder} by hand."
            )
    return archive


def read_member(archive: Path, filename: str) -> bytes:
    """Bytes of ``stardist/data/images/<filename>`` from a wheel (zip) or sdist (tar.gz)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(MEMBER_DIR + filename)]
            if names:
                return zf.read(names[0])
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.name.endswith(MEMBER_DIR + filename):
                    return tf.extractfile(member).read()
    raise InputError(f"{archive.name} has no {MEMBER_DIR}{filename}; delete it from the cache and fetch again.")


def decode(filename: str, payload: bytes) -> np.ndarray:
    if filename.endswith((".tif", ".tiff")):
        import tifffile

        return tifffile.imread(io.BytesIO(payload))
    import imageio.v3 as iio

    return np.asarray(iio.imread(payload, extension=Path(filename).suffix))


def load_sample_arrays(name: str, archive: Path | None = None) -> tuple[np.ndarray, np.ndarray | None, RealSample]:
    """The sample's image (NGFF axis order) and labels as arrays (they are small: < 1 MB)."""
    if name not in SAMPLES:
        raise OptionError(f"Unknown sample '{name}'; choose from {', '.join(SAMPLES)}.")
    spec = SAMPLES[name]
    archive = archive or download_archive()
    image = decode(spec.image, read_member(archive, spec.image))
    if spec.axes == "cyx" and image.ndim == 3:
        image = np.moveaxis(image, -1, 0)  # RGB last in JPEG -> channel first for NGFF
    labels = decode(spec.labels, read_member(archive, spec.labels)) if spec.labels else None
    log.info("sample %s: image %s %s (sha256 %s)", name, image.shape, image.dtype,
             hashlib.sha256(image.tobytes()).hexdigest()[:12])
    return image, labels, spec


def fetch_sample(name: str, url: str, client: Any, *, overwrite: bool = False, version: str = "0.5",
                 archive: Path | None = None, progress: bool = True) -> str:
    """Write real sample ``name`` as OME-Zarr at ``url`` (image, and ``labels/nuclei`` if any)."""
    from pipeline.io.ngff import default_axes
    from pipeline.io.write import create_image, create_labels
    from pipeline.engine.pyramid import finalize_image

    image, labels, spec = load_sample_arrays(name, archive)
    channel_names = ("R", "G", "B") if spec.axes == "cyx" else None
    sink = create_image(url, shape=image.shape, dtype=image.dtype, axes=default_axes(spec.axes),
                        scale=spec.scale, chunks=tuple(1 if a == "c" else 256 for a in spec.axes),
                        version=version, name=name, channel_names=channel_names, overwrite=overwrite)
    sink.write(tuple(slice(0, s) for s in image.shape), image)  # < 1 MB: one write
    finalize_image(sink, client, progress=progress,
                   colors=("FF0000", "00FF00", "0000FF") if channel_names else None)
    if labels is not None:
        lab = create_labels(sink, "nuclei", dtype=np.uint32, n_labels=int(labels.max()))
        lab.write(tuple(slice(0, s) for s in labels.shape), labels.astype(np.uint32))
        finalize_image(lab, client, labels=True, progress=progress)
    return sink.url
