"""pipeline.io: NGFF 0.4/0.5 reading, writing, round trips, schema validity, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import make_image, tree_digest
from pipeline.core.errors import InputError, OutputExistsError
from pipeline.io import create_image, default_axes, open_image
from pipeline.steps.convert import convert


def _validate(url: str, version: str) -> None:
    group = zarr.open_group(url, mode="r")
    if version == "0.5":
        from ome_zarr_models.v05 import Image
    else:
        from ome_zarr_models.v04 import Image
    Image.from_zarr(group)  # raises on any schema violation


def _read_with_ome_zarr_py(url: str):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(url))())
    return nodes[0]


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_written_store_is_valid_ngff_and_reads_back(tmp_path, client, version):
    url, data, labels = make_image(tmp_path / "a.ome.zarr", client, version=version)
    _validate(url, version)
    src = open_image(url)
    assert src.version == version
    assert src.dims == ("z", "y", "x")
    assert [a.unit for a in src.axes] == ["micrometer"] * 3
    assert src.channel_names == ("dapi",)
    assert src.labels == ("cells",)
    np.testing.assert_array_equal(src.read((slice(None),) * 3), data)
    np.testing.assert_array_equal(src.label("cells").read((slice(None),) * 3), labels)
    node = _read_with_ome_zarr_py(url)
    assert len(node.data) == len(src.levels)
    np.testing.assert_array_equal(np.asarray(node.data[0]), data)


def test_level_transforms_have_half_pixel_translation(ome_image):
    url, _, _ = ome_image
    src = open_image(url)
    for lv in src.levels[1:]:
        for s0, t0, s, t in zip(src.levels[0].scale, src.levels[0].translation, lv.scale, lv.translation):
            assert t == pytest.approx(t0 + (s - s0) / 2)


def test_xarray_has_physical_coordinates(ome_image):
    url, data, _ = ome_image
    da = open_image(url).xarray(0)
    assert da.dims == ("z", "y", "x")
    assert da.coords["z"].values[3] == pytest.approx(6.0)
    assert da.coords["x"].values[5] == pytest.approx(2.0)
    assert da.coords["x"].attrs["units"] == "micrometer"
    np.testing.assert_array_equal(da.isel(z=4).values, data[4])


def test_fsspec_url_reads_like_a_path(ome_image):
    url, data, _ = ome_image
    src = open_image("file://" + url)
    np.testing.assert_array_equal(src.read((slice(0, 3), slice(5, 9), slice(None))), data[0:3, 5:9])


@pytest.mark.parametrize("source_version", ["0.4", "0.5"])
def test_round_trip_to_05_is_bit_exact(tmp_path, client, source_version):
    url, _, _ = make_image(tmp_path / "in.ome.zarr", client, version=source_version)
    before = tree_digest(url)
    out = str(tmp_path / "out.ome.zarr")
    convert(url, out, client, version="0.5", progress=False)
    assert tree_digest(url) == before, "the input store was modified"
    _validate(out, "0.5")
    a, b = open_image(url), open_image(out)
    assert b.version == "0.5"
    assert (a.axes, a.channel_names, a.labels) == (b.axes, b.channel_names, b.labels)
    assert [(l.shape, l.scale, l.translation, l.dtype) for l in a.levels] == \
           [(l.shape, l.scale, l.translation, l.dtype) for l in b.levels]
    for k in range(len(a.levels)):
        np.testing.assert_array_equal(a.read((slice(None),) * 3, k), b.read((slice(None),) * 3, k))
    la, lb = a.label("cells"), b.label("cells")
    assert lb.image_label["colors"] == la.image_label["colors"]
    for k in range(len(la.levels)):
        np.testing.assert_array_equal(la.read((slice(None),) * 3, k), lb.read((slice(None),) * 3, k))


def test_label_pyramid_holds_only_level0_ids(ome_image):
    url, _, labels = ome_image
    lab = open_image(url).label("cells")
    ids0 = set(np.unique(labels))
    assert len(lab.levels) > 2
    for k in range(1, len(lab.levels)):
        assert set(np.unique(lab.read((slice(None),) * 3, k))) <= ids0


def test_shards_round_trip(tmp_path):
    sink = create_image(str(tmp_path / "s.ome.zarr"), shape=(40, 100), dtype=np.float32, axes=default_axes("yx"),
                        chunks=(8, 16), shards=(16, 32), n_levels=2)
    data = np.random.default_rng(0).random((40, 100)).astype(np.float32)
    sink.write((slice(0, 40), slice(0, 100)), data)
    src = open_image(sink.url)
    assert src.levels[0].shards == (16, 32)
    np.testing.assert_array_equal(src.read((slice(None),) * 2), data)
    with pytest.raises(ValueError, match="not aligned"):
        sink.write((slice(8, 16), slice(0, 32)), data[8:16, :32])


# --- bad input: each a clear error naming problem and fix; the input never touched -------------

def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_image(str(tmp_path / "nope.ome.zarr"))


def test_zarr_without_ome_metadata(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("a", shape=(4, 4), dtype="u1")
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="a")["a"][:] = 1
    before = tree_digest(tmp_path / "plain.zarr")
    with pytest.raises(InputError, match="no OME-NGFF 'multiscales'.*tilewise convert"):
        open_image(str(tmp_path / "plain.zarr"))
    assert tree_digest(tmp_path / "plain.zarr") == before


def test_plain_zarr_array_is_pointed_to_convert(tmp_path):
    zarr.open_array(str(tmp_path / "arr.zarr"), mode="w", shape=(5, 5), dtype="u2")
    with pytest.raises(InputError, match="plain zarr array.*tilewise convert"):
        open_image(str(tmp_path / "arr.zarr"))


def _edit_attrs(url: str, edit) -> None:
    meta = Path(url) / "zarr.json"
    doc = json.loads(meta.read_text())
    edit(doc["attributes"])
    meta.write_text(json.dumps(doc))


def test_unsupported_version(ome_image):
    url, _, _ = ome_image
    _edit_attrs(url, lambda a: a["ome"].__setitem__("version", "0.3"))
    with pytest.raises(InputError, match="version '0.3'.*reads 0.4 and 0.5"):
        open_image(url)


def test_axes_that_do_not_match_the_array(ome_image):
    url, _, _ = ome_image
    _edit_attrs(url, lambda a: a["ome"]["multiscales"][0]["axes"].pop(0))
    with pytest.raises(InputError, match="declares 2 axes.*3 dimensions"):
        open_image(url)


def test_non_numeric_dtype(tmp_path):
    url = str(tmp_path / "s.ome.zarr")
    create_image(url, shape=(4, 4), dtype=np.uint8, axes=default_axes("yx"), n_levels=1)
    zarr.open_group(url, mode="a").create_array("0", shape=(4, 4), dtype=np.dtype("<U3"), overwrite=True)
    with pytest.raises(InputError, match="not numeric"):
        open_image(url)


def test_empty_array(tmp_path):
    url = str(tmp_path / "e.ome.zarr")
    create_image(url, shape=(4, 4), dtype=np.uint8, axes=default_axes("yx"), n_levels=1)
    zarr.open_group(url, mode="a").create_array("0", shape=(0, 4), dtype="u1", overwrite=True)
    with pytest.raises(InputError, match="empty array"):
        open_image(url)


def test_output_exists_is_refused_then_overwritten(tmp_path):
    url = str(tmp_path / "o.ome.zarr")
    create_image(url, shape=(4, 4), dtype=np.uint8, axes=default_axes("yx"), n_levels=1)
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite"):
        create_image(url, shape=(4, 4), dtype=np.uint8, axes=default_axes("yx"))
    create_image(url, shape=(6, 6), dtype=np.uint8, axes=default_axes("yx"), n_levels=1, overwrite=True)
    assert open_image(url).shape == (6, 6)
