"""Shared fixtures: one small local Dask cluster per session, and small stores in tmp folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           memory_limit="4GiB")
    with Client(cluster) as c:
        yield c
    cluster.close()


def tree_digest(path: str | Path) -> str:
    """Hash of every file's name, size and bytes below ``path``: proves an input was untouched."""
    h = hashlib.sha256()
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(root) if p != root else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def ome_image(tmp_path, client):
    """A small 3D NGFF image (0.5) with a pyramid, omero and labels; shape not a chunk multiple."""
    return make_image(tmp_path / "img.ome.zarr", client, version="0.5")


def make_image(path, client, version="0.5", shape=(21, 70, 83), chunks=(8, 32, 32)):
    from pipeline.io import create_image, create_labels, default_axes
    from pipeline.engine.pyramid import finalize_image

    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, size=shape, dtype=np.uint16)
    sink = create_image(str(path), shape=shape, dtype=np.uint16, axes=default_axes("zyx"), scale=(2.0, 0.4, 0.4),
                        chunks=chunks, version=version, channel_names=("dapi",))
    sink.write(tuple(slice(0, s) for s in shape), data)
    finalize_image(sink, client, progress=False)
    labels = np.zeros(shape, np.uint32)
    labels[2:9, 10:30, 5:40] = 7
    labels[10:20, 40:69, 50:82] = 3
    labels[0:3, 0:5, 0:5] = 12
    lab = create_labels(sink, "cells", n_labels=12)
    lab.write(tuple(slice(0, s) for s in shape), labels)
    finalize_image(lab, client, labels=True, progress=False)
    return str(path), data, labels
