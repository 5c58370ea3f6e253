"""Outputs open from their root in the readers users have: napari-ome-zarr's reader (no GUI),
ngff-zarr and ome-zarr-models; a moved store keeps its labels linked to its image."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from conftest import make_image
from pipeline.cli import main


def _napari_layers(path: str) -> list[tuple]:
    from napari_ome_zarr import napari_get_reader

    reader = napari_get_reader(path)
    assert reader is not None, f"napari-ome-zarr does not recognise {path}"
    return reader(path)


@pytest.fixture
def segmented(tmp_path, client):
    url, data, _ = make_image(tmp_path / "img.ome.zarr", client)
    out = tmp_path / "seg.ome.zarr"
    assert main(["-q", "segment", url, str(out), "--classical", "--min-size", "4", "--tile", "8,32,32",
                 "--workers", "1"]) == 0
    return out, data


def test_napari_opens_a_segment_output_from_its_root_with_every_object_coloured(segmented, tmp_path):
    out, data = segmented
    layers = _napari_layers(str(out))
    kinds = [kind for _, _, kind in layers]
    assert kinds.count("image") == 1 and kinds.count("labels") == 1
    image = next(d for d, _, k in layers if k == "image")
    np.testing.assert_array_equal(np.asarray(image[0]), data)  # the input, copied
    labels, meta = next((d, kw) for d, kw, k in layers if k == "labels")
    ids = set(np.unique(np.asarray(labels[0]))) - {0}
    assert ids and ids <= set(meta["colormap"])  # every object has a colour
    moved = tmp_path / "elsewhere" / "moved.ome.zarr"  # a moved store keeps labels and image together
    moved.parent.mkdir()
    shutil.move(str(out), moved)
    assert sorted(k for _, _, k in _napari_layers(str(moved))) == ["image", "labels"]


def test_every_output_validates_and_reads_in_ngff_readers(segmented, tmp_path, client):
    import ngff_zarr
    from ome_zarr_models.v05 import Image, Labels

    out, data = segmented
    Image.from_zarr(zarr.open_group(str(out), mode="r"))
    Labels.from_zarr(zarr.open_group(str(out / "labels"), mode="r"))
    Image.from_zarr(zarr.open_group(str(out / "labels" / "nuclei"), mode="r"))
    assert ngff_zarr.from_ngff_zarr(str(out)).images[0].data.shape == data.shape

    url = str(tmp_path / "img.ome.zarr")
    smooth = tmp_path / "smooth.ome.zarr"
    assert main(["-q", "run-kernel", "gaussian", url, str(smooth), "--tile", "8,32,32", "--workers", "1"]) == 0
    Image.from_zarr(zarr.open_group(str(smooth), mode="r"))
    assert ngff_zarr.from_ngff_zarr(str(smooth)).images[0].data.shape == data.shape
    assert [k for _, _, k in _napari_layers(str(smooth))] == ["image"]


def test_a_segment_output_is_a_spatialdata_object_whose_table_annotates_its_labels(segmented):
    """to_spatialdata: image, labels and table, lazily; spatialdata's own queries find the rows of
    the labels, and its global (physical) frame is the table's."""
    import spatialdata as sd

    from pipeline.io.spatial import to_spatialdata
    from pipeline.io.tables import read_table

    out, data = segmented
    sdata = to_spatialdata(str(out))
    rows = read_table(str(out), "nuclei").set_index("label").sort_index()
    assert set(sdata.images) == {"image"} and set(sdata.labels) == {"nuclei"}
    assert len(sdata["image"]) == len(sdata["nuclei"]) > 1  # every stored level, not only the finest
    np.testing.assert_array_equal(sdata["image"]["scale0"]["image"].values[0], data)
    table = sd.match_table_to_element(sdata, "nuclei", table_name="nuclei_table")
    assert sorted(table.obs["label"]) == list(rows.index)
    voxels = sd.get_values(value_key="voxels", sdata=sdata, element_name="nuclei", table_name="nuclei_table")
    np.testing.assert_array_equal(voxels["voxels"].sort_index().to_numpy(), rows["voxels"].to_numpy())
    # spatialdata's transformation to the global frame maps pixel centroids to the physical ones
    affine = sd.transformations.get_transformation(sdata["nuclei"], "global").to_affine_matrix(
        input_axes=("z", "y", "x"), output_axes=("z", "y", "x"))
    pixels = rows[[f"centroid_{a}" for a in "zyx"]].to_numpy()
    physical = pixels @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(physical, rows[[f"centroid_{a}_micrometer" for a in "zyx"]].to_numpy(), atol=1e-6)


def test_linked_labels_point_at_their_image_by_a_relative_path(tmp_path, client):
    """--image link: no copy; napari IN OUT/labels/NAME shows both, and ome-zarr-py follows the
    relative source link from the labels to the image, also after both folders moved."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    url, _, _ = make_image(tmp_path / "data" / "img.ome.zarr", client)
    out = tmp_path / "results" / "seg.ome.zarr"
    assert main(["-q", "segment", url, str(out), "--classical", "--image", "link", "--tile", "8,32,32",
                 "--workers", "1"]) == 0
    assert not (out / "0").exists()  # no copy of the input
    shutil.move(str(tmp_path), str(tmp_path.parent / (tmp_path.name + "-moved")))
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    labels = moved / "results" / "seg.ome.zarr" / "labels" / "nuclei"
    assert [k for _, _, k in _napari_layers(str(labels))] == ["labels"]
    assert [k for _, _, k in _napari_layers(str(moved / "data" / "img.ome.zarr"))].count("image") == 1
    nodes = list(Reader(parse_url(str(labels)))())
    assert any(str(moved / "data" / "img.ome.zarr") in str(n) for n in nodes)  # the linked image was found
    from pipeline.io.spatial import to_spatialdata

    sdata = to_spatialdata(str(moved / "results" / "seg.ome.zarr"))  # the image through the same link
    assert sdata["image"]["scale0"]["image"].shape[1:] == sdata["nuclei"]["scale0"]["image"].shape


def test_the_lightsheet_sample_opens_from_its_root(tmp_path, client):
    """The noisy image is the sample's root, with its ground-truth labels inside and clean/ beside."""
    from pipeline.data import make_lightsheet
    from pipeline.info import describe

    parts = make_lightsheet(str(tmp_path / "ls.ome.zarr"), client, shape=(8, 48, 48), progress=False)
    assert parts["raw"] == str(tmp_path / "ls.ome.zarr")
    assert sorted(k for _, _, k in _napari_layers(parts["raw"])) == ["image", "labels"]
    text = describe(parts["raw"])
    assert "(root image)" in text and "\n  clean  [z,y,x]  float32" in text and "tables/ground_truth" in text
