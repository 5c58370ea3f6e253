"""pipeline.steps.stitch / pipeline.steps.segment: tiled labels come back object-for-object identical."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels import KernelSpec
from kernels.metrics import match
from pipeline.io import create_image, default_axes, open_image
from pipeline.steps.segment import segment_labels
from pipeline.steps.stitch import global_ids, renumber_core_first, resolve, tile_lut


def _store(tmp_path, name, data, axes, chunks):
    url = str(tmp_path / name)
    sink = create_image(url, shape=data.shape, dtype=data.dtype, axes=default_axes(axes), chunks=chunks, n_levels=2)
    sink.write(tuple(slice(0, s) for s in data.shape), data)
    return url


def _ball(shape, centre, radii):
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def straddling_labels(shape, tile, rng):
    """Objects centred on tile corners (2^d tiles), edges and faces, plus touching pairs."""
    labels = np.zeros(shape, np.uint32)
    ndim = len(shape)
    next_id = 1
    centres = []
    for index in np.ndindex(*[max(1, s // t) for s, t in zip(shape, tile)]):
        corner = [(i + 1) * t for i, t in zip(index, tile)]
        if all(c < s for c, s in zip(corner, shape)):
            centres.append(corner)  # straddles 2^ndim tiles
        face = list(corner)
        face[0] = min(shape[0] - 3, index[0] * tile[0] + tile[0] // 2)
        centres.append(face)  # straddles 2^(ndim-1) tiles
        mid = [i * t + t // 2 for i, t in zip(index, tile)]
        mid[-1] = min(shape[-1] - 1, corner[-1])
        centres.append(mid)  # straddles 2 tiles
    for centre in centres:
        radii = [float(rng.uniform(2.0, 3.5)) for _ in range(ndim)]
        ball = _ball(shape, centre, radii) & (labels == 0)
        if ball.sum() > 3:
            labels[ball] = next_id
            next_id += 1
    # two objects touching face to face across a tile border: they must stay two objects
    sl = tuple(slice(max(0, t - 3), t) if k == ndim - 1 else slice(1, 4) for k, t in enumerate(tile))
    labels[sl] = next_id
    sl2 = tuple(slice(t, t + 3) if k == ndim - 1 else slice(1, 4) for k, t in enumerate(tile))
    labels[sl2] = next_id + 1
    return labels


def assert_same_objects(truth, result):
    assert ((truth > 0) == (result > 0)).all()
    pairs = np.unique(np.stack([truth.ravel(), result.ravel()]), axis=1)
    pairs = pairs[:, pairs[0] > 0]
    n_truth = len(np.unique(truth)) - 1
    assert pairs.shape[1] == n_truth == len(np.unique(result)) - 1  # a bijection of objects
    m = match(truth, result, thresholds=[0.99])[0]
    assert m.f1 == 1.0


CASES = [
    ("2d", "yx", (45, 58), (16, 16), 6),
    ("3d", "zyx", (21, 37, 30), (8, 12, 12), 4),
]


@pytest.mark.parametrize("name, axes, shape, tile, halo", CASES, ids=[c[0] for c in CASES])
def test_stitched_labels_equal_untiled(tmp_path, client, name, axes, shape, tile, halo):
    truth = straddling_labels(shape, tile, np.random.default_rng(3))
    url = _store(tmp_path, "labels.ome.zarr", truth, axes, tile)
    out = str(tmp_path / "out.ome.zarr")
    summary = segment_labels(url, out, KernelSpec.of("relabel", ndim=len(shape), halo=halo), client, name="cells",
                             tile_shape=tile, progress=False)
    assert summary.tiles >= 9
    assert summary.stitched_objects > 10  # many objects really spanned tiles
    result = open_image(summary.labels).read((slice(None),) * len(shape))
    assert_same_objects(truth, result)
    assert result.dtype == np.uint32 and result.max() == summary.objects == len(np.unique(truth)) - 1
    assert sorted(np.unique(result)[1:]) == list(range(1, summary.objects + 1))  # consecutive ids
    # every tile in one task: neighbours along x are read as one window (shared halo chunks)
    windowed = segment_labels(url, str(tmp_path / "rows.ome.zarr"), KernelSpec.of("relabel", ndim=len(shape), halo=halo),
                              client, name="cells", tile_shape=tile, progress=False, max_tasks=1)
    assert np.array_equal(open_image(windowed.labels).read((slice(None),) * len(shape)), result)


def test_sparse_ids_and_resume(tmp_path, client):
    shape, tile = (40, 50), (16, 16)
    truth = straddling_labels(shape, tile, np.random.default_rng(5))
    url = _store(tmp_path, "labels.ome.zarr", truth, "yx", tile)
    out = str(tmp_path / "out.ome.zarr")
    spec = KernelSpec.of("relabel", ndim=2, halo=6)
    first = segment_labels(url, out, spec, client, tile_shape=tile, consecutive=False, progress=False)
    result = open_image(first.labels).read((slice(None), slice(None)))
    assert result.dtype == np.uint64 and result.max() > 2**32  # tile-packed ids, no prefix sum
    assert_same_objects(truth, result)
    again = segment_labels(url, out, spec, client, tile_shape=tile, consecutive=False, progress=False)
    assert again == first  # a finished run is not redone


def test_a_damaged_finished_segmentation_is_found_and_redone(tmp_path, client):
    """Finished means verified: a labels chunk rewritten after the run is found by its tile's
    checksum, and the output is segmented again (its intermediates are gone)."""
    shape, tile = (40, 50), (16, 16)
    truth = straddling_labels(shape, tile, np.random.default_rng(6))
    url = _store(tmp_path, "labels.ome.zarr", truth, "yx", tile)
    out = str(tmp_path / "out.ome.zarr")
    spec = KernelSpec.of("relabel", ndim=2, halo=6)
    first = segment_labels(url, out, spec, client, tile_shape=tile, progress=False)
    expected = open_image(first.labels).read((slice(None), slice(None)))
    chunks = sorted(p for p in Path(first.labels, "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[1].write_bytes(chunks[0].read_bytes())  # decodes, holds another tile's ids
    again = segment_labels(url, out, spec, client, tile_shape=tile, progress=False)
    np.testing.assert_array_equal(open_image(again.labels).read((slice(None), slice(None))), expected)
    assert again.objects == first.objects


def test_objects_larger_than_halo_are_reported(tmp_path, client):
    shape, tile = (40, 64), (16, 16)
    truth = np.zeros(shape, np.uint32)
    truth[5:12, 3:60] = 1  # 57 px long, halo 4: no tile sees it whole
    url = _store(tmp_path, "labels.ome.zarr", truth, "yx", tile)
    summary = segment_labels(url, str(tmp_path / "out.ome.zarr"), KernelSpec.of("relabel", ndim=2, halo=4), client,
                             tile_shape=tile, progress=False)
    assert summary.halo_edge_objects >= 2
    result = open_image(summary.labels).read((slice(None), slice(None)))
    assert_same_objects(truth, result)  # still one object: the IoU chain links every tile


def test_renumber_core_first():
    block = np.array([[5, 5, 0, 9], [7, 7, 0, 9], [0, 0, 3, 3]])
    core = (slice(0, 2), slice(0, 2))
    new, n = renumber_core_first(block, core)
    assert n == 2  # 5 and 7 are in the core
    assert new[0, 0] == 1 and new[1, 0] == 2  # core objects first, in id order
    assert set(np.unique(new[:, 2:])) == {0, 3, 4}  # halo-only objects follow


@pytest.mark.parametrize("dtype, low, high", [(np.uint32, 320_000, 321_000), (np.int16, -50, 150), (np.uint8, 0, 255),
                                              (np.uint64, 0, 2**40), (np.float32, 0, 5)])
def test_rank_ids_is_the_inverse_of_unique(dtype, low, high):
    """The relabel kernel's renumbering: a lookup table over a narrow id range, a sort over a
    wide one (or non-integer values); both give what np.unique's inverse gives."""
    from kernels.instances import rank_ids

    values = np.random.default_rng(1).integers(low, high, (6, 20, 30), dtype=np.int64).astype(dtype)
    np.testing.assert_array_equal(rank_ids(values), np.unique(values, return_inverse=True)[1].reshape(values.shape))


def test_resolve_consecutive_numbering():
    # tile 0 has 3 objects, tile 1 has 2, tile 2 has 2; (0,2)~(1,1) and (1,2)~(2,1)~(0,3)
    g = lambda t, l: int(global_ids(t, np.array([l]))[0])  # noqa: E731
    edges = np.array([[g(0, 2), g(1, 1)], [g(1, 2), g(2, 1)], [g(2, 1), g(0, 3)]], np.uint64)
    res = resolve(edges, np.array([3, 2, 2]))
    assert res.n_objects == 4  # 7 pieces, 3 of them merged away
    luts = [tile_lut(t, n, res.for_tile(t)) for t, n in enumerate([3, 2, 2])]
    assert list(luts[0]) == [0, 1, 2, 3]
    assert list(luts[1]) == [0, 2, 3]  # 1 joins tile 0's object 2; 2 joins object 3
    assert list(luts[2]) == [0, 3, 4]


def blob_image(shape, n, radius, rng, scale=None):
    """Bright ellipsoidal nuclei (some touching) on a dark, noisy background."""
    from scipy import ndimage

    scale = scale or (1.0,) * len(shape)
    image = np.zeros(shape, np.float32)
    for _ in range(n):
        centre = [rng.uniform(0, s) for s in shape]
        radii = [rng.uniform(0.7, 1.0) * radius / sc for sc in scale]
        image[_ball(shape, centre, radii)] = rng.uniform(0.6, 1.0)
    image = ndimage.gaussian_filter(image, [1.0 / sc for sc in scale])
    image += rng.normal(0, 0.05, shape).astype(np.float32)
    return np.clip(image * 3000 + 200, 0, 65535).astype(np.uint16)


SEG_CASES = [
    ("2d", "yx", (150, 170), (32, 32), None, 60, 7.0),
    ("3d-anisotropic", "zyx", (22, 70, 75), (8, 32, 32), (2.0, 1.0, 1.0), 30, 6.0),
]


@pytest.mark.parametrize("name, axes, shape, tile, scale, n, radius", SEG_CASES, ids=[c[0] for c in SEG_CASES])
def test_classical_tiled_equals_untiled_and_table(tmp_path, client, monkeypatch, name, axes, shape, tile, scale, n,
                                                   radius):
    """... with the stitched objects' rows summed a few fragments at a time and written in
    parts of 4 rows (as at 10^7 objects, in miniature): the table still equals regionprops."""
    from skimage.measure import regionprops

    import pipeline.steps.segment as segment_step
    from pipeline.steps.segment import classical_spec
    from pipeline.io.tables import read_table, to_anndata

    monkeypatch.setattr(segment_step, "STITCHED_BATCH_ROWS", 3)
    monkeypatch.setattr(segment_step, "STITCHED_PART_ROWS", 4)

    image = blob_image(shape, n, radius, np.random.default_rng(11), scale)
    url = str(tmp_path / "img.ome.zarr")
    sink = create_image(url, shape=shape, dtype=np.uint16, axes=default_axes(axes), chunks=tile, n_levels=2,
                        scale=scale)
    sink.write(tuple(slice(0, s) for s in shape), image)
    spec = classical_spec(url, min_distance=radius)
    assert spec.params["background"] < spec.params["threshold"]  # two levels: cores grown to their edges
    tiled = segment_labels(url, str(tmp_path / "tiled.ome.zarr"), spec, client, tile_shape=tile, progress=False)
    whole = segment_labels(url, str(tmp_path / "whole.ome.zarr"), spec, client, tile_shape=shape, progress=False)
    assert tiled.tiles >= 9 and whole.tiles == 1
    lab_t = open_image(tiled.labels).read((slice(None),) * len(shape))
    lab_w = open_image(whole.labels).read((slice(None),) * len(shape))
    assert whole.objects >= n // 3
    assert match(lab_w, lab_t, thresholds=[0.5])[0].f1 >= 0.99

    table = read_table(str(tmp_path / "tiled.ome.zarr"), "nuclei")
    props = regionprops(lab_t.astype(np.int64), intensity_image=image)
    assert list(table["label"]) == [p.label for p in props]
    assert list(table["voxels"]) == [int(p.area) for p in props]
    dims = list(axes)
    centroids = table[[f"centroid_{d}" for d in dims]].to_numpy()
    assert np.allclose(centroids, [p.centroid for p in props], atol=1e-9)
    assert np.allclose(table["intensity_mean"], [p.intensity_mean for p in props], rtol=1e-4)
    assert np.allclose(table["intensity_max"], [p.intensity_max for p in props], rtol=1e-4)
    bbox = table[[f"bbox_min_{d}" for d in dims] + [f"bbox_max_{d}" for d in dims]].to_numpy()
    assert (bbox == np.array([p.bbox for p in props])).all()
    assert (table["tiles"] > 1).sum() == tiled.stitched_objects  # stitched rows were merged
    parts = list((tmp_path / "tiled.ome.zarr").rglob("part-stitched-*.parquet"))
    assert tiled.stitched_objects > 8 and len(parts) == -(-tiled.stitched_objects // 4)
    physical = table[f"centroid_{dims[0]}_micrometer"].to_numpy()
    assert np.allclose(physical, centroids[:, 0] * (scale or (1.0,) * len(shape))[0])

    adata = to_anndata(str(tmp_path / "tiled.ome.zarr"), "nuclei")
    assert adata.n_obs == tiled.objects
    assert adata.uns["spatialdata_attrs"] == {"region": "nuclei", "region_key": "region", "instance_key": "label"}
    assert adata.obsm["spatial"].shape == (tiled.objects, len(shape))


def test_labels_output_is_ngff_labels(tmp_path, client):
    """The labels image carries image-label metadata and a mode pyramid (ids only from level 0)."""
    import zarr

    shape, tile = (40, 50), (16, 16)
    truth = straddling_labels(shape, tile, np.random.default_rng(2))
    url = _store(tmp_path, "labels.ome.zarr", truth, "yx", tile)
    out = str(tmp_path / "out.ome.zarr")
    summary = segment_labels(url, out, KernelSpec.of("relabel", ndim=2, halo=6), client, tile_shape=tile,
                             progress=False)
    group = zarr.open_group(out + "/labels", mode="r")
    assert group.attrs["ome"]["labels"] == ["nuclei"]
    meta = zarr.open_group(summary.labels, mode="r").attrs["ome"]
    assert "image-label" in meta and meta["image-label"]["source"]["image"] == "../../"  # inside the copied image
    np.testing.assert_array_equal(open_image(out).read((slice(None), slice(None))), truth)
    linked = segment_labels(url, str(tmp_path / "sub" / "link.ome.zarr"), KernelSpec.of("relabel", ndim=2, halo=6),
                            client, tile_shape=tile, progress=False, image="link")
    source = zarr.open_group(linked.labels, mode="r").attrs["ome"]["image-label"]["source"]["image"]
    assert not source.startswith("/") and Path(linked.labels, source).resolve() == Path(url).resolve()
    img = open_image(summary.labels)
    assert len(img.levels) == 2
    coarse = img.read((slice(None), slice(None)), 1)
    assert set(np.unique(coarse)) <= set(np.unique(img.read((slice(None), slice(None)), 0)))


def test_time_lapse_labels_are_stitched_per_time_point(tmp_path, client):
    """Each time point is segmented and stitched on its own (objects never match across t); the
    labels keep the time axis, equal the untiled result per time point, and the table says when."""
    from pipeline.io import Axis
    from pipeline.io.tables import read_table

    shape, tile = (40, 50), (16, 16)
    frames = [straddling_labels(shape, tile, np.random.default_rng(20 + t)) for t in range(3)]
    stack = np.stack(frames)
    url = str(tmp_path / "tl.ome.zarr")
    axes = [Axis("t", "time", "second")] + list(default_axes("yx"))
    create_image(url, shape=stack.shape, dtype=stack.dtype, axes=axes, chunks=(1,) + tile, n_levels=1).write(
        (slice(None),) * 3, stack)
    out = str(tmp_path / "seg.ome.zarr")
    summary = segment_labels(url, out, KernelSpec.of("relabel", ndim=2, halo=6), client, tile_shape=tile,
                             progress=False)
    labels = open_image(summary.labels)
    assert labels.dims == ("t", "y", "x")
    result = labels.read((slice(None),) * 3)
    for t in range(3):
        assert_same_objects(frames[t], result[t])
    ids = [set(np.unique(result[t])) - {0} for t in range(3)]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])  # never the same object across time
    assert summary.objects == sum(len(i) for i in ids)
    table = read_table(out, "nuclei")
    assert sorted(table["t"].unique()) == [0, 1, 2] and len(table) == summary.objects
    for t in range(3):
        assert set(table.loc[table["t"] == t, "label"]) == ids[t]


@pytest.mark.parametrize("name, axes, shape, tile, halo", CASES, ids=[c[0] for c in CASES])
def test_match_reads_neighbours_from_rim_files_as_from_their_whole_shells(tmp_path, client, name, axes, shape, tile,
                                                                          halo):
    """Pass 2 reads each neighbour's core ids from the one rim slab it needs (a small file, one
    member decompressed); they equal the core ids in the neighbour's whole-block shell, which
    pass 3 relabels from, and the edges equal those matched against the shells' cores."""
    from pipeline.engine.plan import make_plan
    from pipeline.io.store import Folder
    from pipeline.steps.stitch import MatchTask, StitchFiles, from_rims, intersect, neighbours, rim_key, rim_slabs, shift

    truth = straddling_labels(shape, tile, np.random.default_rng(7))
    url = _store(tmp_path, "labels.ome.zarr", truth, axes, tile)
    out = str(tmp_path / "out.ome.zarr")
    segment_labels(url, out, KernelSpec.of("relabel", ndim=len(shape), halo=halo), client, tile_shape=tile,
                   progress=False, keep_intermediate=True)
    files = StitchFiles(out, {})
    plan = make_plan(shape, axes, tile, dict(zip(axes, (halo,) * len(shape))), tile_shape=tile)
    ids = list(range(len(plan)))
    assert len(files.folder.names("rim")) == len(files.folder.names("shell")) == len(plan)
    assert not files.folder.exists("raw")  # no shared id array: each pass reads per-tile files

    def core_of(t):
        shell = files.load("shell", t.id)
        return shell["labels"][shift(t.core, shell["start"])]

    tile = plan.tile(0)
    for other in neighbours(plan, tile):
        step = tuple(o - t for o, t in zip(other.index, tile.index))
        region = intersect(tile.read, other.core)
        rims = files.load("rim", other.id, [rim_key(step)])
        assert list(rims) == [rim_key(step)]  # only the slab it needs
        cut = from_rims(rims, region, other.core, step, plan.halo)
        assert np.array_equal(cut, core_of(other)[shift(region, [sl.start for sl in other.core])])
    with_rims = MatchTask(plan, files)(ids)
    # the same rims rebuilt from the shells' cores give the same edges
    rims = Folder(files.folder.url, {})
    rims.remove("rim")
    rims.makedirs("rim")
    for t in ids:
        files.save("rim", t, **rim_slabs(core_of(plan.tile(t)), plan.halo))
    again = MatchTask(plan, files)(ids)
    assert sum(len(e) for e in with_rims) > 10
    assert all(np.array_equal(a, b) for a, b in zip(with_rims, again))


def test_a_run_begun_with_earlier_stitching_files_is_refused(tmp_path, client):
    """A segmentation interrupted under an earlier tilewise (cores in a shared raw array) is not
    resumed with files this version does not read: a clear error naming the fix, nothing touched."""
    import json

    from pipeline.core.errors import OutputExistsError
    from tests.conftest import tree_digest

    truth = straddling_labels((40, 52), (16, 16), np.random.default_rng(3))
    url = _store(tmp_path, "labels.ome.zarr", truth, "yx", (16, 16))
    out = tmp_path / "out.ome.zarr"

    def run():
        return segment_labels(url, str(out), KernelSpec.of("relabel", ndim=2, halo=4), client, tile_shape=(16, 16),
                              progress=False)

    run()
    manifest = out / "_tilewise" / "run.json"
    params = json.loads(manifest.read_text())
    del params["stitch"]["files"]  # as an earlier version wrote it
    manifest.write_text(json.dumps(params))
    (out / "_tilewise" / "summary.json").unlink()  # as if interrupted
    before = tree_digest(str(out))
    with pytest.raises(OutputExistsError, match="earlier tilewise.*--overwrite"):
        run()
    assert tree_digest(str(out)) == before


def test_size_check_reads_a_sample_of_a_large_table(tmp_path):
    """The object-size check reads a column of every part of a small table, and of evenly
    spaced per-tile parts only (never the big stitched parts) of a large one."""
    import pandas as pd

    from pipeline.io.tables import begin_table, sample_column, write_part

    url = begin_table(str(tmp_path / "out.ome.zarr"), "nuclei", {"region": "nuclei"})
    for t in range(300):
        write_part(url, str(t), pd.DataFrame({"label": [2 * t + 1, 2 * t + 2], "voxels": [t, t]}), {})
    write_part(url, "stitched-0", pd.DataFrame({"label": np.arange(10**4) + 10**6, "voxels": -1}), {})
    whole = sample_column(str(tmp_path / "out.ome.zarr"), "nuclei", "voxels", max_parts=1000)
    assert len(whole) == 600 + 10**4
    part = sample_column(str(tmp_path / "out.ome.zarr"), "nuclei", "voxels", max_parts=50)
    assert 80 <= len(part) <= 100 and (part >= 0).all() and len(set(part.tolist())) >= 40


def test_objects_split_into_fragments_are_reported(tmp_path, client, caplog):
    """Object sizes in two groups far apart (large objects and small fragments) get one warning."""
    labels = np.zeros((48, 96), np.uint16)
    for i in range(24):
        r, c = divmod(i, 8)
        labels[16 * r:16 * r + 8, 12 * c:12 * c + 8] = 2 * i + 1  # 64 pixels
        labels[16 * r + 11:16 * r + 13, 12 * c:12 * c + 2] = 2 * i + 2  # 4 pixels
    url = _store(tmp_path, "fragments.ome.zarr", labels, "yx", (16, 32))
    with caplog.at_level("WARNING"):
        segment_labels(url, str(tmp_path / "out.ome.zarr"), KernelSpec.of("relabel", ndim=2, halo=4), client,
                       tile_shape=(16, 32), progress=False)
    assert "two groups far apart" in caplog.text


def test_an_image_without_objects_gets_one_line_warnings_not_an_error(tmp_path, client, caplog):
    """A blank field (a slide's empty corner, a volume before the sample): the size estimate says
    it found nothing to measure and falls back to pixel defaults, and the finished labels say
    they hold 0 objects; both one line each, and the run still finishes."""
    from pipeline.steps.segment import classical_spec

    ramp = np.add.outer(np.linspace(0, 50, 64), np.linspace(0, 50, 96)).astype(np.float32)
    url = _store(tmp_path, "blank.ome.zarr", ramp, "yx", (32, 32))
    with caplog.at_level("WARNING"):
        spec = classical_spec(url, threshold=1000.0)  # input units: above every pixel
        result = segment_labels(url, str(tmp_path / "out.ome.zarr"), spec, client, tile_shape=(32, 32), progress=False)
    assert spec.params["diameter"] is None
    assert result.objects == 0 and open_image(result.labels).read((slice(None),) * 2).max() == 0
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("the object size cannot be estimated" in line for line in lines), lines
    assert any(": 0 objects:" in line for line in lines), lines
    assert all("\n" not in line for line in lines)
