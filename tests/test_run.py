"""pipeline.engine.runner: tiled equals untiled, models load once per worker, resume, refusal."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import KernelSpec, build_kernel, resident
from kernels import load_counts
from pipeline.core.errors import OutputExistsError
from pipeline.io import create_image, default_axes, open_image
from pipeline.steps.apply import run_kernel


def _image(tmp_path, name, data, axes, chunks):
    url = str(tmp_path / name)
    sink = create_image(url, shape=data.shape, dtype=data.dtype, axes=default_axes(axes), chunks=chunks, n_levels=1)
    sink.write(tuple(slice(0, s) for s in data.shape), data)
    return url


def _untiled(spec, data, has_c, norm=None):
    """The reference: the kernel on the whole image, padded once by the halo, then cropped."""
    kernel = resident(spec)
    x = data.astype(np.float32)[None] if not has_c else data.astype(np.float32)
    halo = kernel.traits.halo
    pads = [(0, 0)] + [(h, h) for h in halo]
    x = np.pad(x, pads, mode="reflect")
    if norm is not None:
        lo = np.asarray([a for a, _ in norm], np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        hi = np.asarray([b for _, b in norm], np.float32).reshape(lo.shape)
        x = (x - lo) / np.maximum(hi - lo, 1e-12)
    y = kernel.run(x[None])[0]
    return y[(slice(None),) + tuple(slice(h, h + n) for h, n in zip(halo, data.shape[-len(halo):]))]


CASES = [
    ("gaussian-3d", "zyx", (19, 45, 37), (8, 16, 16), KernelSpec.of("gaussian", sigma=[1.0, 2.0, 1.5])),
    ("gaussian-2d-c2", "cyx", (2, 53, 41), (1, 16, 16), KernelSpec.of("gaussian", sigma=[3.0, 5.0], channels=2)),
    ("convnet-3d", "zyx", (13, 35, 29), (8, 16, 16), KernelSpec.of("convnet", ndim=3, depth=3, width=4)),
    ("convnet-2d-c3", "cyx", (3, 47, 39), (1, 16, 16), KernelSpec.of("convnet", ndim=2, in_channels=3, out_channels=2, depth=5, width=6)),
]


@pytest.mark.parametrize("name, axes, shape, chunks, spec", CASES, ids=[c[0] for c in CASES])
def test_tiled_equals_untiled(tmp_path, client, name, axes, shape, chunks, spec):
    data = np.random.default_rng(0).integers(0, 1000, size=shape).astype(np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, axes, chunks)
    summary = run_kernel(url, str(tmp_path / "out.ome.zarr"), spec, client, progress=False,
                         tile_shape=[c for c, a in zip(chunks, axes) if a != "c"])
    assert summary.tiles > 4  # really tiled, with halos crossing tile and volume edges
    out = open_image(str(tmp_path / "out.ome.zarr"))
    tiled = out.read((slice(None),) * len(out.dims))
    norm = None
    if build_kernel(spec).traits.input == "normalised":
        import json

        norm = json.load(open(tmp_path / "out.ome.zarr" / "_tilewise" / "run.json"))["normalisation"]
    ref = _untiled(spec, data, "c" in axes, norm)
    if tiled.ndim == ref.ndim - 1:
        ref = ref[0]
    assert np.abs(tiled - ref).max() <= 1e-5


def test_model_is_loaded_once_per_worker(tmp_path, client):
    data = np.random.default_rng(1).integers(0, 100, size=(16, 64, 64)).astype(np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, "zyx", (8, 16, 16))
    spec = KernelSpec.of("convnet", ndim=3, depth=2, width=4, seed=99)
    summary = run_kernel(url, str(tmp_path / "o.ome.zarr"), spec, client, tile_shape=(8, 16, 16), progress=False)
    assert summary.tiles == 32
    per_worker = client.run(load_counts)
    loads = [counts.get(spec.key, 0) for counts in per_worker.values()]
    assert sum(loads) >= 1 and max(loads) == 1, loads


def test_resume_runs_only_missing_tiles_and_matches_clean_run(tmp_path, client):
    data = np.random.default_rng(2).integers(0, 1000, size=(21, 50, 40)).astype(np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, "zyx", (8, 16, 16))
    spec = KernelSpec.of("gaussian", sigma=[1.0, 1.5, 1.5])
    kw = dict(progress=False, tile_shape=(8, 16, 16))
    clean = run_kernel(url, str(tmp_path / "clean.ome.zarr"), spec, client, **kw)
    first = run_kernel(url, str(tmp_path / "r.ome.zarr"), spec, client, tile_ids=[0, 3, 5], **kw)
    assert first.computed == 3 and clean.tiles == 36
    second = run_kernel(url, str(tmp_path / "r.ome.zarr"), spec, client, **kw)
    assert second.computed == clean.tiles - 3 and second.skipped == 3
    a = open_image(str(tmp_path / "clean.ome.zarr"))
    b = open_image(str(tmp_path / "r.ome.zarr"))
    for k in range(len(a.levels)):
        np.testing.assert_array_equal(a.read((slice(None),) * 3, k), b.read((slice(None),) * 3, k))
    third = run_kernel(url, str(tmp_path / "r.ome.zarr"), spec, client, **kw)
    assert third.computed == 0


def test_resume_verifies_finished_tiles_and_repairs_damaged_ones(tmp_path, client):
    """Finished means verified: a deleted or rewritten output chunk is found by its tile's
    checksum on resume, that tile alone is computed again, and the pyramid is rebuilt from it."""
    from pathlib import Path

    data = np.random.default_rng(5).integers(0, 1000, size=(16, 48, 48)).astype(np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, "zyx", (8, 16, 16))
    spec = KernelSpec.of("gaussian", sigma=[1.0, 1.0, 1.0])
    kw = dict(progress=False, tile_shape=(8, 16, 16))
    out = tmp_path / "r.ome.zarr"
    first = run_kernel(url, str(out), spec, client, **kw)
    assert first.computed == 18
    chunks = sorted(p for p in (out / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[0].unlink()  # deleted
    chunks[5].write_bytes(chunks[5].read_bytes()[:10])  # truncated
    data2 = chunks[9].read_bytes()
    chunks[9].write_bytes(chunks[10].read_bytes())  # another chunk's bytes: decodes, wrong values
    assert data2 != chunks[9].read_bytes()
    again = run_kernel(url, str(out), spec, client, **kw)
    assert again.computed == 3 and again.skipped == 15
    clean = run_kernel(url, str(tmp_path / "clean.ome.zarr"), spec, client, **kw)
    a = open_image(str(tmp_path / "clean.ome.zarr"))
    b = open_image(str(out))
    for k in range(len(a.levels)):
        np.testing.assert_array_equal(a.read((slice(None),) * 3, k), b.read((slice(None),) * 3, k))
    assert clean.computed == 18 and Path(out / "_tilewise" / "run.json").exists()


def test_other_parameters_on_existing_output_are_refused(tmp_path, client):
    data = np.zeros((10, 20, 20), np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, "zyx", (8, 16, 16))
    run_kernel(url, str(tmp_path / "o.ome.zarr"), KernelSpec.of("gaussian", sigma=[1, 1, 1]), client, progress=False)
    with pytest.raises(OutputExistsError, match="other parameters.*--overwrite"):
        run_kernel(url, str(tmp_path / "o.ome.zarr"), KernelSpec.of("gaussian", sigma=[2, 1, 1]), client, progress=False)
    s = run_kernel(url, str(tmp_path / "o.ome.zarr"), KernelSpec.of("gaussian", sigma=[2, 1, 1]), client,
                   progress=False, overwrite=True)
    assert s.computed == s.tiles


def test_batched_tiles_equal_one_tile_per_call(tmp_path, client):
    data = np.random.default_rng(3).integers(0, 1000, size=(13, 45, 37)).astype(np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, "zyx", (8, 16, 16))
    spec = KernelSpec.of("convnet", ndim=3, depth=3, width=4)
    kw = dict(progress=False, tile_shape=(8, 16, 16))
    one = run_kernel(url, str(tmp_path / "one.ome.zarr"), spec, client, **kw)
    many = run_kernel(url, str(tmp_path / "many.ome.zarr"), spec, client, batch=5, **kw)
    assert one.computed == many.computed == 18
    a = open_image(str(tmp_path / "one.ome.zarr")).read((slice(None),) * 3)
    b = open_image(str(tmp_path / "many.ome.zarr")).read((slice(None),) * 3)
    assert np.abs(a - b).max() <= 1e-5


@pytest.mark.parametrize("axes, shape, chunks, window, weights", [
    ("zyx", (21, 45, 38), (8, 16, 16), (12, 20, 20), "gaussian"),
    ("cyx", (2, 70, 53), (1, 16, 16), (24, 24), "cosine"),
])
def test_blended_tiled_equals_blended_untiled(tmp_path, client, axes, shape, chunks, window, weights):
    from pipeline.engine.runner import Blend

    data = np.random.default_rng(4).integers(0, 1000, size=shape).astype(np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, axes, chunks)
    ndim = len(window)
    spec = KernelSpec.of("convnet", ndim=ndim, in_channels=shape[0] if "c" in axes else 1, depth=3, width=4)
    blend = Blend(window, 0.5, weights)
    spatial = [s for s, a in zip(shape, axes) if a != "c"]
    tiled = run_kernel(url, str(tmp_path / "t.ome.zarr"), spec, client, progress=False, blend=blend,
                       tile_shape=[c for c, a in zip(chunks, axes) if a != "c"])
    whole = run_kernel(url, str(tmp_path / "w.ome.zarr"), spec, client, progress=False, blend=blend,
                       tile_shape=spatial)
    assert tiled.tiles > 4 and whole.tiles == 1
    a = open_image(str(tmp_path / "t.ome.zarr")).read((slice(None),) * (ndim + ("c" in axes)))
    b = open_image(str(tmp_path / "w.ome.zarr")).read((slice(None),) * (ndim + ("c" in axes)))
    assert np.abs(a - b).max() <= 1e-5
    # blending really differs from one window's crop: the overlap averages several windows
    run_kernel(url, str(tmp_path / "c.ome.zarr"), spec, client, progress=False)
    c = open_image(str(tmp_path / "c.ome.zarr")).read((slice(None),) * (ndim + ("c" in axes)))
    assert np.abs(a - c).max() > 1e-3


def test_gpu_kernels_run_only_on_workers_with_a_gpu_resource(tmp_path):
    """Routing by ``resources={"GPU": 1}``: on a cluster where one of two workers advertises a
    GPU, every tile of a GPU kernel lands on that worker (CPU-only here, so the label is all).
    The GPU worker is the default cluster's spec: two tiles in flight, one process per device."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from pipeline.engine.cluster import gpu_worker_specs

    data = np.random.default_rng(5).integers(0, 100, size=(16, 32, 32)).astype(np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, "zyx", (8, 16, 16))
    spec = KernelSpec.of("convnet", ndim=3, depth=2, width=4, seed=7)
    workers = {
        "gpu": gpu_worker_specs(n_gpus=1, cores=2, tiles_in_flight=2)["gpu-0"],
        "cpu": {"cls": Nanny, "options": {"nthreads": 1}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as c:
        c.wait_for_workers(2)
        run_kernel(url, str(tmp_path / "o.ome.zarr"), spec, c, progress=False, tile_shape=(8, 16, 16))
        info = c.scheduler_info(n_workers=-1)["workers"]
        assert sorted(w["resources"].get("GPU", 0) for w in info.values()) == [0, 2]
        loads = {info[addr]["name"]: counts.get(spec.key, 0) for addr, counts in c.run(load_counts).items()}
    assert loads == {"gpu": 1, "cpu": 0}



def test_tile_metadata_is_kept_in_the_manifest(tmp_path, client):
    from pipeline.engine.manifest import RunManifest

    data = np.zeros((10, 20, 20), np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, "zyx", (8, 16, 16))
    s = run_kernel(url, str(tmp_path / "o.ome.zarr"), KernelSpec.of("identity"), client, progress=False,
                   tile_shape=(8, 16, 16), batch=3, out_dtype="input")
    meta = RunManifest(str(tmp_path / "o.ome.zarr")).tile_metadata()
    assert sorted(meta) == list(range(s.tiles)) and sum(m["voxels"] for m in meta.values()) == data.size
    assert open_image(str(tmp_path / "o.ome.zarr")).levels[0].dtype == "uint16"


def test_tasks_running_at_once_in_one_worker_load_the_model_once():
    """GPU workers keep several tiles in flight: their first tasks race to load the model."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kernels import resident

    spec = KernelSpec.of("convnet", ndim=3, depth=2, width=4, seed=123)
    start = threading.Barrier(4)

    def first_use(_):
        start.wait()
        return id(resident(spec, "cpu"))

    with ThreadPoolExecutor(4) as pool:
        kernels = set(pool.map(first_use, range(4)))
    assert len(kernels) == 1 and load_counts()[spec.key] == 1


def test_time_lapse_is_processed_per_time_point_in_one_run(tmp_path, client):
    """Time (and other non-space axes) are batch axes: every time point is tiled and processed
    independently in one resumable run, the output keeps the axis, and each time point equals
    the untiled result of that time point alone."""
    from pipeline.io import Axis

    rng = np.random.default_rng(8)
    data = rng.integers(0, 1000, size=(3, 2, 11, 37, 29)).astype(np.uint16)  # t, c, z, y, x
    url = str(tmp_path / "tl.ome.zarr")
    axes = [Axis("t", "time", "second")] + list(default_axes("czyx"))
    create_image(url, shape=data.shape, dtype=np.uint16, axes=axes, scale=(5.0, 1.0, 2.0, 0.5, 0.5),
                 chunks=(1, 1, 8, 16, 16), n_levels=1).write((slice(None),) * 5, data)
    spec = KernelSpec.of("gaussian", sigma=[1.0, 1.5, 1.5], channels=2)
    summary = run_kernel(url, str(tmp_path / "out.ome.zarr"), spec, client, tile_shape=(8, 16, 16), batch=4,
                         progress=False)
    assert summary.tiles == 3 * 2 * 3 * 2 and summary.computed == summary.tiles
    out = open_image(str(tmp_path / "out.ome.zarr"))
    assert out.dims == ("t", "c", "z", "y", "x") and out.axes[0].type == "time" and out.levels[0].scale[0] == 5.0
    tiled = out.read((slice(None),) * 5)
    for t in range(3):
        np.testing.assert_allclose(tiled[t], _untiled(spec, data[t], True), atol=1e-4)
    again = run_kernel(url, str(tmp_path / "out.ome.zarr"), spec, client, tile_shape=(8, 16, 16), batch=4,
                       progress=False)
    assert again.computed == 0 and again.skipped == summary.tiles


def test_tiles_read_as_row_windows_equal_tiles_read_alone(tmp_path, client):
    """A task's tiles side by side along x are read as one window (their shared halo chunks
    decoded once): runs break at row ends, time points and the window's size limit, and the
    output equals one tile per task exactly, here with time points, channels and a halo that
    reaches past the volume's edges."""
    from pipeline.engine.plan import make_plan
    from pipeline.engine.runner import TileReader, TileRows, TileSpace
    from pipeline.io import Axis

    data = np.random.default_rng(4).integers(0, 1000, size=(2, 2, 11, 37, 45)).astype(np.uint16)  # t, c, z, y, x
    url = str(tmp_path / "tl.ome.zarr")
    axes = [Axis("t", "time", "second")] + list(default_axes("czyx"))
    create_image(url, shape=data.shape, dtype=np.uint16, axes=axes, chunks=(1, 1, 8, 16, 16),
                 n_levels=1).write((slice(None),) * 5, data)
    spec = KernelSpec.of("gaussian", sigma=[1.0, 1.5, 1.5], channels=2)
    one = run_kernel(url, str(tmp_path / "one.ome.zarr"), spec, client, tile_shape=(8, 16, 16), progress=False)
    rows = run_kernel(url, str(tmp_path / "rows.ome.zarr"), spec, client, tile_shape=(8, 16, 16), progress=False,
                      max_tasks=1)  # every tile in one task: runs of neighbours share windows
    assert one.tiles == rows.tiles == 2 * 2 * 3 * 3
    a = open_image(str(tmp_path / "one.ome.zarr")).read((slice(None),) * 5)
    b = open_image(str(tmp_path / "rows.ome.zarr")).read((slice(None),) * 5)
    assert np.array_equal(a, b)

    source = open_image(url)
    plan = make_plan(data.shape[2:], "zyx", (8, 16, 16), {"z": 3, "y": 5, "x": 5}, tile_shape=(8, 16, 16))
    space = TileSpace(plan, (2,))
    reader = TileReader(source, 0, True, "reflect", "raw", None)
    runs = TileRows(reader, space).runs(range(len(space)))
    assert [len(r) for r in runs] == [3] * 12  # grid 2 x 3 x 3 per time point: a run per row of x
    assert all(len({space.locate(g)[0] for g in r}) == 1 for r in runs)
    first, second = space.locate(0)[1].read, space.locate(1)[1].read
    two = 2 * 2 * int(np.prod([sl.stop - sl.start for sl in first[:-1]])) * (second[-1].stop - first[-1].start)
    small = TileRows(reader, space, max_bytes=two).runs(range(len(space)))  # uint16, 2 channels
    assert small[:2] == [[0, 1], [2]]  # the first row: two tiles' union fits that budget, three do not


def test_read_window_serves_reads_inside_it_and_only_those(tmp_path, monkeypatch):
    from pipeline.io.read import ImageSource, read_window

    data = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    url = _image(tmp_path, "w.ome.zarr", data, "yx", (8, 8))
    source = open_image(url)
    calls = []
    original = ImageSource.array
    monkeypatch.setattr(ImageSource, "array", lambda self, level=0: calls.append(level) or original(self, level))
    with read_window(source, (slice(2, 18), slice(0, 25))):
        assert len(calls) == 1
        inside = source.read((slice(4, 10), slice(3, 20)))
        assert np.array_equal(inside, data[4:10, 3:20]) and len(calls) == 1
        inside[:] = 0  # a copy: the window is not changed through it
        assert np.array_equal(source.read((slice(4, 10), slice(3, 20))), data[4:10, 3:20])
        assert np.array_equal(source.read((slice(0, 10), slice(3, 20))), data[0:10, 3:20]) and len(calls) == 2
    source.read((slice(4, 10), slice(3, 20)))
    assert len(calls) == 3  # the window is gone with the block


def test_missing_chunks_inside_a_read_window_are_those_outside_it(tmp_path):
    import shutil

    from pipeline.io.read import read_window

    data = np.ones((20, 30), np.uint16)
    url = _image(tmp_path, "m.ome.zarr", data, "yx", (8, 8))
    source = open_image(url)
    chunk_dir = next(p for p in (tmp_path / "m.ome.zarr" / "0").rglob("*") if p.is_file() and p.name == "2"
                     and p.parent.name == "1")  # chunk (1, 2) of a zarr v3 array: c/1/2
    shutil.move(chunk_dir, tmp_path / "moved")
    regions = [(slice(2, 18), slice(10, 25)), (slice(0, 8), slice(0, 8)), (slice(9, 10), slice(16, 17))]
    alone = [source.missing_chunks(r) for r in regions]
    assert alone == [[(1, 2)], [], [(1, 2)]]
    with read_window(source, (slice(0, 20), slice(0, 30))):
        assert [source.missing_chunks(r) for r in regions] == alone


def test_batched_markers_keep_the_tile_as_the_resume_unit(tmp_path):
    """Markers of a task's tiles go into one file per run of consecutive ids; done(),
    tile_metadata() and unmark() see tiles; a block that raises still marks what it finished;
    a long list of scattered ids is cut into names a file system takes."""
    import os

    from pipeline.engine.manifest import MAX_MARKER_NAME, RunManifest, marker_name, marker_tiles

    assert marker_name([7, 3, 4, 5, 9]) == "3-5_7-7_9-9" and marker_tiles("3-5_7-7_9-9") == [3, 4, 5, 7, 9]
    assert marker_tiles("12") == [12]
    manifest = RunManifest(str(tmp_path / "out.ome.zarr"))
    manifest.begin()
    manifest.at("relabel").begin()
    folder = tmp_path / "out.ome.zarr" / "_tilewise" / "done"
    with manifest.batched():
        for t in (16, 17, 18, 19, 30):
            manifest.mark_done(t, {"tile": t})
        manifest.at("relabel").mark_done(5, {"tile": 5})  # another pass's marker is not held back
        assert os.listdir(folder) == [] and (tmp_path / "out.ome.zarr" / "_tilewise" / "done-relabel" / "5").exists()
    manifest.mark_done(2, {"tile": 2})  # outside a batch: its own file at once
    assert sorted(os.listdir(folder)) == ["16-19_30-30", "2"]
    assert manifest.done() == {2, 16, 17, 18, 19, 30}
    assert manifest.tile_metadata([17, 2, 99]) == {2: {"tile": 2}, 17: {"tile": 17}}
    with pytest.raises(RuntimeError), manifest.batched():
        manifest.mark_done(40, {"tile": 40})
        raise RuntimeError("the task failed after tile 40")
    assert 40 in manifest.done()
    manifest.unmark([18])  # the whole batch file goes: its tiles are computed again
    assert manifest.done() == {2, 40}
    with manifest.batched():
        for t in range(0, 2000, 2):  # 1,000 runs of one tile: several files
            manifest.mark_done(t + 1000, {"tile": t + 1000})
    names = os.listdir(folder)
    assert max(len(n) for n in names) <= MAX_MARKER_NAME and len(names) > 3
    assert manifest.done() == {2, 40} | set(range(1000, 3000, 2))
    assert manifest.tile_metadata()[2998] == {"tile": 2998}


def test_a_damaged_tile_in_a_batched_marker_is_redone_with_its_batch(tmp_path, client):
    """A task's tiles share one marker file: when one of them no longer verifies, the file goes
    and every tile it named is computed again; the run ends complete and equal to a clean one."""
    from pathlib import Path

    from pipeline.engine.manifest import RunManifest, marker_tiles

    data = np.random.default_rng(8).integers(0, 1000, size=(48, 48)).astype(np.uint16)
    url = _image(tmp_path, "in.ome.zarr", data, "yx", (4, 4))
    spec = KernelSpec.of("gaussian", sigma=[1.0, 1.0])
    kw = dict(progress=False, tile_shape=(4, 4))
    out = tmp_path / "r.ome.zarr"
    first = run_kernel(url, str(out), spec, client, **kw)
    names = sorted(p.name for p in (out / "_tilewise" / "done").iterdir())
    holding = next(n for n in names if 0 in marker_tiles(n))
    assert first.computed == 144 and len(marker_tiles(holding)) > 1
    chunk = Path(out / "0" / "c" / "0" / "0")
    chunk.write_bytes(chunk.read_bytes()[:10])  # tile 0's output damaged
    again = run_kernel(url, str(out), spec, client, **kw)
    assert again.computed == len(marker_tiles(holding)) and RunManifest(str(out)).done() == set(range(144))
    clean = run_kernel(url, str(tmp_path / "clean.ome.zarr"), spec, client, **kw)
    a, b = open_image(str(tmp_path / "clean.ome.zarr")), open_image(str(out))
    for k in range(len(a.levels)):
        np.testing.assert_array_equal(a.read((slice(None),) * 2, k), b.read((slice(None),) * 2, k))
    assert clean.computed == 144


def _page_faults_of_allocations(n: int = 20, nbytes: int = 2 * 2**20) -> int:
    """Minor page faults of ``n`` tile-sized arrays allocated, filled and freed in turn."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.ones(nbytes // 8)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's allocator")
def test_workers_reuse_tile_sized_allocations(client):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which switches glibc's dynamic mmap threshold
    off: every tile-sized array then page-faults afresh (10-60 % slower numpy in workers). The
    engine's worker plugin sets the threshold back; 20 arrays of 2 MiB fault about once."""
    import subprocess
    import sys

    pages = 20 * 2 * 2**20 // 4096
    code = ("import numpy as np, resource, sys; sys.path.insert(0, {!r}); from tests.test_run import "
            "_page_faults_of_allocations as f; {}print(f())")
    env = {"MALLOC_TRIM_THRESHOLD_": "65536", "PATH": ""}
    root = str(__import__("pathlib").Path(__file__).parents[1])
    plain = int(subprocess.run([sys.executable, "-c", code.format(root, "")], env=env, capture_output=True,
                               text=True, check=True).stdout)
    assert plain > pages / 2  # the problem is real here: every array is a fresh mmap
    fixed = code.format(root, "from pipeline.engine.allocator import set_thresholds; set_thresholds(); ")
    assert int(subprocess.run([sys.executable, "-c", fixed], env=env, capture_output=True, text=True,
                              check=True).stdout) < pages / 10

    from pipeline.engine.allocator import prepare_workers

    prepare_workers(client)
    faults = client.run(_page_faults_of_allocations)
    assert all(f < pages / 10 for f in faults.values()), faults
