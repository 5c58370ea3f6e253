"""pipeline.data: synthetic samples are deterministic, tile-consistent and carry ground truth."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pyarrow.dataset as pads
import pytest
import tifffile

from pipeline.data import fetch_sample, make_lightsheet, make_wholeslide
from pipeline.data.fetch import MEMBER_DIR, download_archive
from pipeline.data.nuclei import CLASSES
from pipeline.io import open_image

ALL = (slice(None),) * 3


def test_lightsheet_is_deterministic_and_independent_of_chunking(tmp_path, client):
    shape = (30, 90, 110)
    a = make_lightsheet(str(tmp_path / "a.ome.zarr"), client, shape=shape, seed=5, chunks=(16, 32, 32), progress=False)
    b = make_lightsheet(str(tmp_path / "b.ome.zarr"), client, shape=shape, seed=5, chunks=(30, 64, 48), progress=False)
    c = make_lightsheet(str(tmp_path / "c.ome.zarr"), client, shape=shape, seed=6, chunks=(16, 32, 32), progress=False)
    clean_a, clean_b = open_image(a["clean"]).read(ALL), open_image(b["clean"]).read(ALL)
    np.testing.assert_allclose(clean_a, clean_b, rtol=1e-5, atol=1e-3)  # blur halos make blocks agree
    lab_a, lab_b = open_image(a["labels"]).read(ALL), open_image(b["labels"]).read(ALL)
    np.testing.assert_array_equal(lab_a, lab_b)
    assert not np.array_equal(lab_a, open_image(c["labels"]).read(ALL))
    a2 = make_lightsheet(str(tmp_path / "a2.ome.zarr"), client, shape=shape, seed=5, chunks=(16, 32, 32), progress=False)
    np.testing.assert_array_equal(open_image(a["raw"]).read(ALL), open_image(a2["raw"]).read(ALL))


def test_lightsheet_noise_and_ground_truth(tmp_path, client):
    out = make_lightsheet(str(tmp_path / "l.ome.zarr"), client, shape=(24, 128, 128), seed=1, progress=False)
    raw = open_image(out["raw"]).read(ALL).astype(np.float64)
    clean = open_image(out["clean"]).read(ALL).astype(np.float64)
    labels = open_image(out["labels"]).read(ALL)
    resid = raw - clean
    assert abs(resid.mean()) < 1.0  # clean is the expectation of raw
    model_var = 8.0 * (clean - 100.0) + 6.0**2  # gain * signal + read noise^2 (Poisson-Gaussian)
    assert np.var(resid) == pytest.approx(model_var.mean(), rel=0.1)
    table = pads.dataset(str(tmp_path / "l.ome.zarr" / "tables" / "ground_truth")).to_table().to_pandas()
    assert table["label"].is_unique
    ids = set(np.unique(labels)) - {0}
    assert set(table["label"]) == ids  # one row per object, classes recorded
    assert set(table["class_name"]) <= {c.name for c in CLASSES} and table["class"].nunique() > 1
    row = table.iloc[0]
    zz, yy, xx = np.nonzero(labels == row["label"])
    assert zz.mean() == pytest.approx(row["centroid_z"]) and yy.mean() == pytest.approx(row["centroid_y"])
    assert len(zz) == row["voxels"]
    from pipeline.io.tables import to_anndata  # the samples' tables share every table's schema

    adata = to_anndata(str(tmp_path / "l.ome.zarr"), "ground_truth")
    assert adata.n_obs == len(ids) and adata.uns["spatialdata_attrs"]["region"] == "nuclei"
    np.testing.assert_allclose(adata.obsm["spatial"][:, 0], adata.obs_vector("centroid_z") * 1.0)
    assert set(adata.obs["class_name"]) <= {c.name for c in CLASSES}
    adata.write_h5ad(tmp_path / "gt.h5ad")


def test_wholeslide_rgb_with_labels(tmp_path, client):
    out = make_wholeslide(str(tmp_path / "w.ome.zarr"), client, shape=(700, 1100), seed=2, progress=False)
    img = open_image(out["image"])
    assert img.dims == ("c", "y", "x") and img.dtype == np.uint8 and img.channel_names == ("R", "G", "B")
    rgb = img.read(ALL)
    labels = open_image(out["labels"]).read((slice(None),) * 2)
    nuclei = labels > 0
    assert nuclei.any() and (~nuclei).any()
    # haematoxylin nuclei are darker and bluer than the surrounding image
    assert rgb[:, nuclei].mean() < rgb[:, ~nuclei].mean()
    assert rgb[2, nuclei].mean() > rgb[1, nuclei].mean()


def _fake_wheel(path, images):
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in images.items():
            buf = io.BytesIO()
            tifffile.imwrite(buf, arr)
            zf.writestr(MEMBER_DIR + name, buf.getvalue())


def test_fetch_sample_reads_from_the_wheel(tmp_path, client):
    img = np.random.default_rng(0).integers(0, 1000, (64, 80), dtype=np.uint16)
    mask = np.zeros((64, 80), np.uint16)
    mask[5:20, 5:30] = 1
    mask[30:50, 40:70] = 2
    wheel = tmp_path / "stardist-0.9.2-cp311-none-any.whl"
    _fake_wheel(wheel, {"img2d.tif": img, "mask2d.tif": mask})
    url = fetch_sample("dsb2018", str(tmp_path / "d.ome.zarr"), client, archive=wheel, progress=False)
    src = open_image(url)
    np.testing.assert_array_equal(src.read((slice(None),) * 2), img)
    np.testing.assert_array_equal(src.label("nuclei").read((slice(None),) * 2), mask)


def test_fetch_sample_downloads_the_real_wheel(tmp_path, client, monkeypatch):
    """The real path users take: pip download of stardist 0.9.2 (needs PyPI)."""
    monkeypatch.setenv("TILEWISE_CACHE", str(tmp_path / "cache"))
    from pipeline.core.errors import InputError

    try:
        download_archive()
    except InputError as exc:
        if "Could not download" in str(exc) and ("connection" in str(exc).lower() or "network" in str(exc).lower()
                                                 or "resolve" in str(exc).lower()):
            pytest.skip(f"PyPI unreachable: {exc}")
        raise
    url = fetch_sample("dsb2018", str(tmp_path / "dsb.ome.zarr"), client, progress=False)
    src = open_image(url)
    assert src.shape == (512, 512) and src.dtype == np.uint16
    mask = src.label("nuclei").read((slice(None),) * 2)
    assert len(np.unique(mask)) - 1 == 125  # the 125 manually annotated nuclei


def test_sample_wholeslide_takes_chunks(tmp_path, client):
    from pipeline.cli import main

    out = str(tmp_path / "w.ome.zarr")
    assert main(["-q", "sample", "wholeslide", out, "--shape", "600,700", "--chunks", "128,128", "--workers", "1"]) == 0
    img = open_image(out)
    assert img.levels[0].chunks == (1, 128, 128) and len(img.levels) > 1
