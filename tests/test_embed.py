"""Embeddings: scores on hand-made embeddings with known answers, crops of objects on tile
borders equal to untiled crops (2D and 3D), tables to AnnData, the HTML report, the CLI."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest

from pipeline.analysis.representation import (confound_r2, knn_accuracy, over_best_baseline, probe_accuracy,
                                              retrieval_map)


def test_scores_on_hand_made_embeddings():
    rng = np.random.default_rng(0)
    groups = np.repeat(["a", "b", "c", "d"], 25)
    codes = np.searchsorted(np.unique(groups), groups)
    separated = np.eye(4)[codes] * 4 + rng.normal(0, 1, (100, 4))
    noise = rng.normal(0, 1, (100, 4))
    good, chance = retrieval_map(separated, groups, null_size=200), retrieval_map(noise, groups, null_size=200)
    assert good["map"] > 0.9 and good["map_p"] < 0.05 and good["significant_groups"] == 1.0
    assert chance["map"] < 0.4 and chance["map_p"] > 0.05  # about 1/4, the share of group-mates
    assert knn_accuracy(separated, groups) > 0.95 and knn_accuracy(noise, groups) < 0.5
    assert probe_accuracy(separated, groups) > 0.95 and probe_accuracy(noise, groups) < 0.5
    size = rng.normal(0, 1, 100)
    assert confound_r2(np.c_[size, noise], size) > 0.95 and confound_r2(noise, size) < 0.1
    diff = over_best_baseline({"trained": {"map": 0.6, "map_p": 0.01}, "untrained_0": {"map": 0.5},
                               "untrained_1": {"map": 0.7}, "pixel": {"map": 0.2}})
    assert diff == {"trained": {"map": pytest.approx(-0.1)}}  # p-values are not "better when higher"


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, client):
    """2D and 3D images with objects, their labels and table (the relabel kernel's output)."""
    from test_segment import segmented_blobs

    out = {}
    for ndim, shape, chunks, scale in ((2, (70, 83), (16, 16), (1.0, 1.0)), (3, (14, 40, 36), (7, 16, 16), (2.0, 1.0, 1.0))):
        root = tmp_path_factory.mktemp(f"e{ndim}")
        seg = segmented_blobs(root, client, shape, chunks, scale, 10 if ndim == 2 else 6, 6.0, seed=ndim + 10)
        out[ndim] = (seg, str(root), shape, chunks)
    return out


def _model(path, ndim):
    """A tiny trained-shape model folder (random weights: the crops' tiling is what is tested)."""
    import torch

    from kernels.modelfile import ModelCard, save_model
    from kernels.unet import UNet, UNetConfig

    config = UNetConfig(ndim=ndim, in_channels=1, out_channels=3, depth=2, width=4, norm="batch",
                        pool=(1, 2, 2) if ndim == 3 else ())
    torch.manual_seed(0)
    save_model(path, UNet(config).state_dict(), ModelCard(task="segment", method="unet3class",
                                                          architecture=config.to_dict(),
                                                          normalisation={"percentiles": [1.0, 99.9]}))
    return str(path)


@pytest.mark.parametrize("ndim", [2, 3])
def test_border_objects_get_their_untiled_crops(segmented, client, tmp_path, ndim):
    from pipeline.io.tables import embedding_columns, embedding_matrix, read_table, to_anndata
    from pipeline.steps.embed import embed_objects

    image, _, shape, chunks = segmented[ndim]
    model = _model(tmp_path / "m", ndim)
    tiled = embed_objects(image, str(tmp_path / "t.zarr"), client, labels="nuclei", model=model, seeds=2,
                          tile_shape=chunks, progress=False)
    whole = embed_objects(image, str(tmp_path / "w.zarr"), client, labels="nuclei", model=model, seeds=2,
                          tile_shape=shape, progress=False)
    assert tiled.tiles >= 4 and whole.tiles == 1 and tiled.objects == whole.objects > 3
    a, b = read_table(str(tmp_path / "t.zarr"), "nuclei"), read_table(str(tmp_path / "w.zarr"), "nuclei")
    assert list(a["label"]) == list(b["label"])
    columns = embedding_columns(a)
    assert {"embed_trained", "embed_untrained_0", "embed_untrained_1", "embed_pixel", "embed_structure",
            "embed_trained_l0"} <= set(columns)
    for column in columns:
        x, y = embedding_matrix(a, column), embedding_matrix(b, column)
        assert x.shape == y.shape and np.allclose(x, y, atol=1e-5), column
        assert np.isfinite(x).all() and x.std() > 0
    untrained = embedding_matrix(a, "embed_untrained_0"), embedding_matrix(a, "embed_untrained_1")
    assert not np.allclose(*untrained)  # two seeds, two networks
    adata = to_anndata(str(tmp_path / "t.zarr"), "nuclei")
    assert adata.n_obs == tiled.objects and adata.obsm["X_embed_trained"].shape == (tiled.objects, 4 + 8 + 16)
    assert "embed_trained" not in adata.var_names


def test_report_renders_with_every_image(segmented, client, tmp_path):
    from pipeline.cli import main
    from pipeline.io.tables import read_attributes, read_table, write_table
    from pipeline.steps.analyze import analyze
    from pipeline.steps.embed import embed_objects

    seg, _, _, _ = segmented[2]
    embed_objects(seg, str(tmp_path / "e.zarr"), client, labels="nuclei", seeds=1, progress=False)
    frame = read_table(str(tmp_path / "e.zarr"), "nuclei")
    frame["size_class"] = np.where(frame["voxels"] > frame["voxels"].median(), "large", "small")
    embeds = {c: np.stack(frame.pop(c).to_numpy()) for c in [c for c in frame.columns if c.startswith("embed_")]}
    write_table(str(tmp_path / "e.zarr"), "nuclei", frame, read_attributes(str(tmp_path / "e.zarr"), "nuclei"),
                embeddings=embeds)
    out = tmp_path / "report.html"
    result = analyze(str(tmp_path / "e.zarr" / "tables" / "nuclei"), group_by="size_class", out=str(out), null_size=50)
    assert set(result["scores"]) == {"untrained_0", "pixel", "structure"} and result["over_best_baseline"] == {}
    assert result["confounds"]["structure"]["log_size"] > 0.5  # the structure features include the size

    class Images(HTMLParser):
        sources: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.sources.append(dict(attrs)["src"])

    parser = Images()
    parser.feed(out.read_text())
    assert len(parser.sources) >= 4  # the mAP chart, an object map per embedding, the gallery
    import base64

    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.with_suffix(".json").exists()
    assert main(["-q", "analyze", str(tmp_path / "e.zarr" / "tables" / "nuclei"), "--group-by", "nope"]) == 2
    assert main(["-q", "embed", seg, str(tmp_path / "x.zarr"), "--labels", "nope"]) == 2


def test_patch_grid_embeddings_of_an_rgb_slide(tmp_path, client):
    """Whole slides: a grid of patches, no labels; tiled equals untiled."""
    from pipeline.data import make_wholeslide
    from pipeline.io.tables import embedding_matrix, read_table
    from pipeline.steps.embed import embed_patches

    url = str(tmp_path / "ws.ome.zarr")
    make_wholeslide(url, client, shape=(256, 320), chunks=(64, 64), scale_um=0.5, progress=False)
    tiled = embed_patches(url, str(tmp_path / "t.zarr"), client, patch=16.0, seeds=1, tile_shape=(64, 64),
                          progress=False)  # 16 um = 32 pixels
    whole = embed_patches(url, str(tmp_path / "w.zarr"), client, patch=16.0, seeds=1, tile_shape=(256, 320),
                          progress=False)
    a, b = read_table(str(tmp_path / "t.zarr"), "patches"), read_table(str(tmp_path / "w.zarr"), "patches")
    assert tiled.objects == whole.objects == 8 * 10 and tiled.tiles > 1
    assert "embed_structure" not in a and {"patch_y", "patch_x"} <= set(a.columns)
    for column in ("embed_untrained_0", "embed_pixel"):
        assert np.allclose(embedding_matrix(a, column), embedding_matrix(b, column), atol=1e-5)
    assert embedding_matrix(a, "embed_pixel").shape[1] == 3 * 8 * 8  # RGB channels kept

