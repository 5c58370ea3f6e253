"""The input is sacred, and outputs open in the readers users have (issue 13, first part):
an output that is, lies inside or contains an input is refused before anything is deleted;
every label id has a colour; tables read as AnnData save to .h5ad and AnnData zarr."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cli import main
from conftest import make_image, tree_digest


@pytest.mark.parametrize("where", ["same", "image-inside-store", "inside", "contains"])
def test_output_overlapping_the_input_is_refused_even_with_overwrite(tmp_path, client, capsys, where):
    store = tmp_path / "data" / "img.ome.zarr"
    url, _, _ = make_image(store, client)
    before = tree_digest(tmp_path / "data")
    out = {"same": store, "image-inside-store": store, "inside": store / "derived.ome.zarr",
           "contains": tmp_path / "data"}[where]
    source = str(store / "labels" / "cells") if where == "image-inside-store" else url
    code = main(["-q", "run-kernel", "gaussian", source, str(out), "--overwrite", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "never writes into or deletes an input" in err and len(err.strip().splitlines()) == 1
    assert tree_digest(tmp_path / "data") == before


def test_segment_and_convert_refuse_their_input_as_output(tmp_path, client):
    from kernels import KernelSpec
    from pipeline.core.errors import OptionError
    from pipeline.steps.convert import convert
    from pipeline.steps.segment import segment_labels

    url, _, _ = make_image(tmp_path / "img.ome.zarr", client)
    before = tree_digest(url)
    with pytest.raises(OptionError, match="is the input"):
        segment_labels(url, url, KernelSpec.of("relabel", ndim=3), client, overwrite=True, progress=False)
    with pytest.raises(OptionError, match="lies inside the input store"):
        convert(url, str(tmp_path / "img.ome.zarr" / "copy"), client, overwrite=True, progress=False)
    assert tree_digest(url) == before


def test_every_label_id_has_a_colour_or_none_is_listed(tmp_path, client):
    """napari-ome-zarr colours only the ids the palette lists: a cap would hide objects."""
    import zarr

    from kernels import KernelSpec
    from pipeline.io import create_image, default_axes
    from pipeline.io.write import PALETTE_LIMIT, label_colors
    from pipeline.steps.segment import segment_labels

    labels = np.zeros((40, 200), np.uint16)
    for i in range(300):  # 300 objects of 2 x 4 pixels, more than the old cap of 256
        r, c = divmod(i, 30)
        labels[4 * r:4 * r + 2, 6 * c:6 * c + 4] = i + 1
    url = str(tmp_path / "objects.ome.zarr")
    create_image(url, shape=labels.shape, dtype=np.uint16, axes=default_axes("yx"), chunks=(16, 64),
                 n_levels=1).write((slice(None), slice(None)), labels)
    seg = segment_labels(url, str(tmp_path / "seg.ome.zarr"), KernelSpec.of("relabel", ndim=2, halo=8), client,
                         name="objects", tile_shape=(16, 64), progress=False)
    assert seg.objects == 300
    attrs = zarr.open_group(seg.labels, mode="r").attrs.asdict()
    colors = attrs.get("ome", attrs)["image-label"]["colors"]
    assert sorted(c["label-value"] for c in colors) == list(range(1, 301))
    assert label_colors(PALETTE_LIMIT + 1) is None  # past the limit no list: readers colour every id


def test_tables_as_anndata_save_to_h5ad_and_zarr(tmp_path, client):
    import anndata

    from pipeline.io.tables import to_anndata
    from pipeline.steps.segment import classical_spec, segment_labels

    url, _, _ = make_image(tmp_path / "img.ome.zarr", client)
    out = str(tmp_path / "seg.ome.zarr")
    segment_labels(url, out, classical_spec(url, min_size=4), client, name="nuclei", progress=False)
    adata = to_anndata(out, "nuclei")
    assert adata.n_obs > 0
    adata.write_h5ad(tmp_path / "t.h5ad")
    adata.write_zarr(tmp_path / "t.zarr")
    back = anndata.read_h5ad(tmp_path / "t.h5ad")
    assert list(back.obs["label"]) == list(adata.obs["label"])
    np.testing.assert_allclose(back.obsm["spatial"], adata.obsm["spatial"])
    assert anndata.read_zarr(tmp_path / "t.zarr").n_obs == adata.n_obs


@pytest.mark.parametrize("source, flag, expected", [("0.4", None, "0.4"), ("0.5", None, "0.5"), ("0.4", "0.5", "0.5")])
def test_outputs_follow_the_input_ngff_version_unless_asked(tmp_path, client, source, flag, expected):
    """Derived stores are written in the input's NGFF version (or --ngff), never mixed."""
    import zarr

    url, _, _ = make_image(tmp_path / "img.ome.zarr", client, version=source)
    extra = ["--ngff", flag] if flag else []
    assert main(["-q", "run-kernel", "gaussian", url, str(tmp_path / "o.ome.zarr"), "--tile", "8,32,32",
                 "--workers", "1"] + extra) == 0
    assert main(["-q", "segment", url, str(tmp_path / "s.ome.zarr"), "--classical", "--tile", "8,32,32",
                 "--workers", "1"] + extra) == 0
    fmt = 2 if expected == "0.4" else 3
    for path in ("o.ome.zarr", "s.ome.zarr", "s.ome.zarr/labels", "s.ome.zarr/labels/nuclei"):
        assert zarr.open_group(str(tmp_path / path), mode="r").metadata.zarr_format == fmt, path
    from ome_zarr_models import v04, v05

    model = v04 if expected == "0.4" else v05
    model.Image.from_zarr(zarr.open_group(str(tmp_path / "o.ome.zarr"), mode="r"))
    model.Labels.from_zarr(zarr.open_group(str(tmp_path / "s.ome.zarr" / "labels"), mode="r"))
    # a resume that asks for the other version is refused, not mixed in
    other = "0.5" if expected == "0.4" else "0.4"
    assert main(["-q", "run-kernel", "gaussian", url, str(tmp_path / "o.ome.zarr"), "--tile", "8,32,32",
                 "--workers", "1", "--ngff", other]) == 2
