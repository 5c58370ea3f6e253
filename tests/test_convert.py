"""pipeline.steps.convert: TIFF and plain zarr arrays become NGFF images, streamed, input untouched."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from conftest import tree_digest
from pipeline.cli import main
from pipeline.io import open_image


def test_tiff_stack_converts_bit_exact_with_axes_and_scale(tmp_path, client, capsys):
    data = np.random.default_rng(3).integers(0, 60000, size=(13, 150, 97), dtype=np.uint16)
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, data)
    before = tree_digest(tif)
    out = tmp_path / "stack.ome.zarr"
    rc = main(["-q", "convert", str(tif), str(out), "--axes", "zyx", "--scale", "2,0.4,0.4", "--chunks", "4,64,64"])
    assert rc == 0
    assert tree_digest(tif) == before
    src = open_image(str(out))
    assert src.dims == ("z", "y", "x") and src.levels[0].scale == (2.0, 0.4, 0.4)
    assert src.levels[0].chunks == (4, 64, 64)
    np.testing.assert_array_equal(src.read((slice(None),) * 3), data)
    assert len(src.levels) > 1


def test_plain_zarr_array_converts(tmp_path, client):
    data = np.random.default_rng(4).random((3, 40, 50)).astype(np.float32)
    zarr.save_array(str(tmp_path / "a.zarr"), data)
    rc = main(["-q", "convert", str(tmp_path / "a.zarr"), str(tmp_path / "a.ome.zarr"), "--axes", "cyx",
               "--scale", "0.5,0.5", "--ngff", "0.4"])
    assert rc == 0
    src = open_image(str(tmp_path / "a.ome.zarr"))
    assert src.version == "0.4" and src.dims == ("c", "y", "x") and src.levels[0].scale == (1.0, 0.5, 0.5)
    np.testing.assert_array_equal(src.read((slice(None),) * 3), data)


@pytest.mark.parametrize("axes, message", [
    (None, "name them with --axes"),
    ("yx", "names 2 axes but"),
    ("xzy", None),  # valid order: all spatial
    ("zcx", "out of NGFF order"),
])
def test_convert_axes_errors(tmp_path, client, capsys, axes, message):
    tif = tmp_path / "s.tif"
    tifffile.imwrite(tif, np.zeros((3, 8, 8), np.uint8))
    args = ["-q", "convert", str(tif), str(tmp_path / "o.ome.zarr")] + (["--axes", axes] if axes else [])
    rc = main(args)
    if message is None:
        assert rc == 0
    else:
        assert rc == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("tilewise: error:") and err.count("\n") == 1


@pytest.mark.parametrize("compression, dtype, lossless", [
    ("lzw", np.uint16, True), ("deflate", np.uint16, True), ("zstd", np.uint16, True),
    ("jpeg", np.uint8, False), ("jpeg2000", np.uint16, True),
])
def test_compressed_tiffs_convert(tmp_path, client, compression, dtype, lossless):
    """What microscopes write: compressed TIFFs read out of the box (imagecodecs is declared)."""
    rng = np.random.default_rng(7)
    smooth = np.add.outer(np.arange(64), np.arange(48)).astype(np.float64)
    data = np.stack([smooth * (k + 1) + rng.integers(0, 4, smooth.shape) for k in range(3)])
    data = (data / data.max() * (250 if dtype == np.uint8 else 4000)).astype(dtype)
    tif = tmp_path / f"{compression}.tif"
    tifffile.imwrite(tif, data, compression=compression, photometric="minisblack")
    out = tmp_path / f"{compression}.ome.zarr"
    assert main(["-q", "convert", str(tif), str(out), "--axes", "zyx"]) == 0
    back = open_image(str(out)).read((slice(None),) * 3)
    if lossless:
        np.testing.assert_array_equal(back, data)
    else:
        assert np.abs(back.astype(float) - data).mean() < 3
