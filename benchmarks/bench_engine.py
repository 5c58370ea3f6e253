"""Engine benchmarks (issue 3), each part in its own process so its memory is its own.

    python -m benchmarks.bench_engine [--shape 64,512,512] [--sizes-gb 1,4,16] [--parts ...]

- efficiency: conv-net voxels/s through the engine / the same kernel called directly on the same
  padded tiles held in memory, both as tasks on the same 2 single-threaded worker processes,
  interleaved twice (best round of each).
- map_overlap: the engine end to end against the same work done with ``dask.array.map_overlap``
  (same percentiles, level 0 stored, pyramid by ``da.coarsen`` from each stored level, ome-zarr-py
  metadata) on the same LocalCluster, interleaved; its level 0 alone too; task count, peak RSS.
- planning: plan + windowed submission of every tile of a 1 TiB (2048 x 16384 x 16384) and a
  10 TiB (5120 x 32768 x 32768) uint16 store that hold metadata only, with the real job payload
  and a no-op body (each task rebuilds its tiles from their ids and returns).
- memory: peak worker RSS running a Gaussian (halo 4) over 1, 4 and 16 GB uint16 inputs.
- markers_s3: listing and reading 10^4 and 10^5 tile markers in a local S3 server (moto), one
  request each against one concurrent fetch; markers_s3_batched: the same tiles' markers as
  tasks of 8 tiles write them (one file per task).
- scheduler: a real ``dask scheduler`` process under 10^4 .. 10^6 tiles (grouped into tasks as
  the engine does; one ungrouped row): its peak RSS and tasks/s.
- resume_checks: what a resume pays to trust finished work: the input's content fingerprint and
  the checksum verification of every finished tile's output.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measure import invocation, previous, run_measured, save

CONVNET = dict(ndim=3, depth=4, width=16, seed=0)
TILE = (64, 256, 256)


def _client_peak() -> int:
    """Peak RSS of this process (the client, and the LocalCluster's scheduler) in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cluster(workers: int = 2):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=40)
    return cluster, Client(cluster)


def _random_volume(url: str, shape, client, chunks=TILE, seed: int = 0) -> None:
    """A uint16 volume of smooth-ish random data, written chunk by chunk (no pyramid)."""
    from pipeline.core.regions import iter_regions, n_regions
    from pipeline.io import create_image, default_axes
    from pipeline.engine.submit import run_tasks

    sink = create_image(url, shape=shape, dtype=np.uint16, axes=default_axes("zyx"), chunks=chunks, n_levels=1,
                        overwrite=True)

    def fill(region):
        rng = np.random.default_rng([seed, *(sl.start for sl in region)])
        block = rng.poisson(200.0, size=tuple(sl.stop - sl.start for sl in region)).astype(np.uint16)
        sink.write(region, block)
        return 0

    for _ in run_tasks(client, fill, iter_regions(shape, chunks), total=n_regions(shape, chunks), progress=False):
        pass


def _engine_setup(work: Path, shape):
    """The conv-net spec, a 2-worker cluster, the input volume, and both workers warmed up
    (torch imported, model resident) as the direct baseline is."""
    from kernels import KernelSpec
    from pipeline.steps.apply import run_kernel

    spec = KernelSpec.of("convnet", **CONVNET)
    cluster, client = _cluster()
    url = str(work / "in.ome.zarr")
    _random_volume(url, shape, client)
    warm = str(work / "warm.ome.zarr")
    _random_volume(warm, (64, 256, 512), client)
    run_kernel(warm, str(work / "warm-out.ome.zarr"), spec, client, tile_shape=TILE, progress=False, overwrite=True)
    return spec, cluster, client, url


# ---- parts (each runs in a fresh process) ---------------------------------------------------

def part_efficiency(work: Path, shape, rounds: int = 2) -> dict:
    """Engine and direct runs interleaved ``rounds`` times on the same warmed-up worker processes;
    each side's best round is compared (this shared machine's speed drifts by ~10 % over minutes,
    which one engine run followed by one direct run would report as engine overhead)."""
    from pipeline.engine.plan import make_plan
    from pipeline.steps.apply import run_kernel

    spec, cluster, client, url = _engine_setup(work, shape)
    plan = make_plan(shape, "zyx", TILE, {"z": 4, "y": 4, "x": 4}, tile_shape=TILE)
    cores = [tuple(sl.stop - sl.start for sl in t.core) for t in plan]
    engine_s, end_to_end_s, direct_s = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        client.gather(client.map(_direct_tile, cores, pure=False))
        direct_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        summary = run_kernel(url, str(work / "engine.ome.zarr"), spec, client, tile_shape=TILE, progress=False,
                             overwrite=True)
        end_to_end_s.append(time.perf_counter() - t0)
        engine_s.append(summary.seconds)
    client.close()
    cluster.close()
    voxels = int(np.prod(shape))
    engine, end_to_end, direct = min(engine_s), min(end_to_end_s), min(direct_s)
    return {
        "shape": list(shape), "tile": list(TILE), "tiles": summary.tiles, "kernel": spec.params, "rounds": rounds,
        "engine_tile_stage_s_by_round": engine_s, "engine_end_to_end_s_by_round": end_to_end_s,
        "direct_s_by_round": direct_s,
        "engine_tile_stage_s": engine, "engine_voxels_per_s": voxels / engine,
        "engine_end_to_end_s": end_to_end, "engine_end_to_end_voxels_per_s": voxels / end_to_end,
        "direct_s": direct, "direct_voxels_per_s": voxels / direct,
        "efficiency": direct / engine, "efficiency_end_to_end": direct / end_to_end,
        "note": "engine = read + normalise + kernel + crop + write + done marker; end-to-end adds global "
                "statistics and the pyramid. Direct = the kernel on in-memory padded tiles of the same shapes, "
                "as tasks on the same 2 single-threaded worker processes. Best of the interleaved rounds.",
    }


def _direct_tile(core_shape) -> float:
    from kernels import KernelSpec, resident

    kernel = resident(KernelSpec.of("convnet", **CONVNET))
    h = kernel.traits.halo
    block = np.random.default_rng(0).random((1, 1, *(c + 2 * x for c, x in zip(core_shape, h))), dtype=np.float32)
    out = kernel.run(block)
    return float(out[0, 0, 0, 0, 0])


MAP_OVERLAP_LAYOUTS = {"chunks_as_tile": TILE, "chunks_64": (64, 64, 64)}


def part_map_overlap(work: Path, shape, rounds: int = 2) -> dict:
    """The engine end to end (``run_kernel``: global statistics, tiles, pyramid, metadata)
    against ``dask.array.map_overlap`` doing the same work the way a careful dask user writes it:
    the same global percentiles (the engine's own sample), ``map_overlap`` + ``store`` for level
    0, each coarser level from the stored finer one (``da.coarsen`` mean, as the engine's
    pyramid), and ome-zarr-py's multiscales metadata; its level 0 alone too (the earlier
    figure). Two input layouts: chunks the size of the engine's tile, and 64^3 chunks (common
    for light-sheet OME-Zarr), where map_overlap runs on the native chunks and, as the strongest
    dask baseline, after ``rechunk`` to the engine's tile. Rounds are interleaved on the same
    warmed-up workers; the best round of each is reported."""
    spec, cluster, client, url = _engine_setup(work, shape)
    base = _client_peak()
    layouts = {}
    for name, chunks in MAP_OVERLAP_LAYOUTS.items():
        source = url if chunks == TILE else str(work / f"in-{name}.ome.zarr")
        if source != url:
            _random_volume(source, shape, client, chunks=chunks)
        variants = {"map_overlap": None} if chunks == TILE else {"map_overlap": None, "map_overlap_rechunked": TILE}
        layouts[name] = _compare_map_overlap(work, source, spec, client, rounds, variants, chunks)
        print(name, json.dumps(layouts[name])[:400], flush=True)
    peak = _client_peak()
    client.close()
    cluster.close()
    return {"shape": list(shape), "tile": list(TILE), "kernel": spec.params, "rounds": rounds, **layouts,
            "client_scheduler_peak_rss_bytes": peak, "client_rss_at_start_bytes": base}


def _compare_map_overlap(work: Path, url: str, spec, client, rounds: int, variants: dict, chunks) -> dict:
    import dask.array as da
    import zarr

    from pipeline.io import ImageSink
    from pipeline.engine.pyramid import level_factors
    from pipeline.steps.apply import run_kernel

    engine_url = str(work / "engine.ome.zarr")
    times: dict[str, list[float]] = {"engine": [], "engine_tile_stage": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        summary = run_kernel(url, engine_url, spec, client, tile_shape=TILE, progress=False, overwrite=True)
        times["engine"].append(time.perf_counter() - t0)
        times["engine_tile_stage"].append(summary.seconds)
        sink = ImageSink.open(engine_url)
        factors = [level_factors(sink, k) for k in range(1, len(sink.levels))]
        for variant, rechunk in variants.items():
            t0 = time.perf_counter()
            level0 = _map_overlap_same_work(url, str(work / f"{variant}.ome.zarr"), factors, chunks, rechunk)
            times.setdefault(variant, []).append(time.perf_counter() - t0)
            times.setdefault(f"{variant}_level0", []).append(level0 - t0)
    a = da.from_zarr(zarr.open_array(f"{engine_url}/0", mode="r"))
    inner = (slice(4, -4),) * a.ndim  # the volume's faces are padded differently (np.pad vs dask "reflect")
    x = da.from_zarr(zarr.open_array(f"{url}/0", mode="r"))
    best = {k: min(v) for k, v in times.items()}
    row = {"input_chunks": list(chunks), "levels": len(factors) + 1,
           "engine": {"seconds": best["engine"], "tile_stage_s": best["engine_tile_stage"], "tasks": summary.tiles,
                      "seconds_by_round": times["engine"]}}
    for variant, rechunk in variants.items():
        b = da.from_zarr(zarr.open_array(str(work / f"{variant}.ome.zarr" / "0"), mode="r"))
        graph = (x.rechunk(rechunk) if rechunk else x).map_overlap(
            _convnet_block, depth=4, boundary="reflect", dtype=np.float32, lo=0.0, hi=1.0).__dask_graph__()
        row[variant] = {"seconds": best[variant], "level0_s": best[f"{variant}_level0"],
                        "seconds_by_round": times[variant], "level0_tasks": len(graph),
                        "level0_max_abs_difference": float(abs(a[inner] - b[inner]).max().compute()),
                        "engine_speedup": best[variant] / best["engine"]}
    return row


def _map_overlap_same_work(url: str, out: str, factors: list[tuple[int, ...]], chunks, rechunk) -> float:
    """The dask user's version of ``run_kernel`` (output chunks as the input's; ``rechunk``:
    map_overlap over blocks of that shape); returns the clock when level 0 was stored."""
    import dask.array as da
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    from pipeline.io import open_image
    from pipeline.engine.stats import Normalisation

    norm = Normalisation.of(open_image(url))  # the same bounded sample the engine takes
    lo, hi = norm.low[0], norm.high[0]
    x = da.from_zarr(zarr.open_array(f"{url}/0", mode="r"))
    root = zarr.open_group(out, mode="w")
    y = (x.rechunk(rechunk) if rechunk else x).map_overlap(_convnet_block, depth=4, boundary="reflect",
                                                           dtype=np.float32, lo=lo, hi=hi)
    if rechunk:
        y = y.rechunk(chunks)
    da.store(y, root.create_array("0", shape=y.shape, chunks=chunks, dtype="float32"), lock=False)
    level0_done = time.perf_counter()
    for k, f in enumerate(factors, start=1):
        finer = da.from_zarr(root[str(k - 1)])
        pad = [(0, (-n) % q) for n, q in zip(finer.shape, f)]
        if any(p for _, p in pad):
            finer = da.pad(finer, pad, mode="edge")
        coarse = da.coarsen(np.mean, finer, dict(enumerate(f))).astype(np.float32)
        level_chunks = tuple(min(c, n) for c, n in zip(chunks, coarse.shape))
        da.store(coarse.rechunk(level_chunks), root.create_array(str(k), shape=coarse.shape, chunks=level_chunks,
                                                                 dtype="float32"), lock=False)
    scale = np.ones(x.ndim)
    datasets = []
    for k, f in enumerate([(1,) * x.ndim] + factors):
        scale = scale * np.array(f)
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale.tolist()}]})
    write_multiscales_metadata(root, datasets, axes="zyx")
    return level0_done


def _convnet_block(block: np.ndarray, lo: float, hi: float) -> np.ndarray:
    from kernels import KernelSpec, resident

    kernel = resident(KernelSpec.of("convnet", **CONVNET))
    x = (block.astype(np.float32) - lo) / max(hi - lo, 1e-12)
    return kernel.run(x[None, None])[0, 0]


PLANNING_SHAPES = {"1 TB": (2048, 16384, 16384), "10 TB": (5120, 32768, 32768)}  # uint16: 1 TiB, 10 TiB


def part_planning(work: Path, big) -> dict:
    """Plan + submit every tile of a metadata-only uint16 store of shape ``big``, the way
    ``submit_tiles`` does (the job as the task function, tile-id groups as items), with the
    real ``ImageTileJob`` payload and a no-op body (each task rebuilds its tiles from their ids)."""
    from kernels import KernelSpec
    from pipeline.io import create_image, default_axes, open_image
    from pipeline.engine.manifest import RunManifest
    from pipeline.engine.plan import make_plan
    from pipeline.engine.runner import ImageTileJob, TileReader, tiles_per_task
    from pipeline.engine.submit import run_tasks

    big = tuple(big)
    cluster, client = _cluster()
    client.wait_for_workers(2)
    client.run(lambda: 0)  # workers up and idle before the clock starts
    src = create_image(str(work / "tb.ome.zarr"), shape=big, dtype=np.uint16, axes=default_axes("zyx"),
                       chunks=TILE, n_levels=1, overwrite=True)
    out = create_image(str(work / "tb-out.ome.zarr"), shape=big, dtype=np.uint16, axes=default_axes("zyx"),
                       chunks=TILE, n_levels=1, overwrite=True)
    base = _client_peak()
    t0 = time.perf_counter()
    plan = make_plan(big, "zyx", TILE, {"z": 4, "y": 4, "x": 4})  # run_kernel's default tile size
    source = open_image(src.url)
    manifest = RunManifest(str(work / "tb-out.ome.zarr"))
    done = manifest.done()
    todo = [t for t in range(len(plan)) if t not in done]
    reader = TileReader(source, 0, False, plan.pad_mode, "raw", None)
    job = NoopJob(ImageTileJob(KernelSpec.of("identity"), reader, plan, out, manifest))
    per_task = tiles_per_task(len(todo), 1)
    plan_s = time.perf_counter() - t0
    groups = (tuple(todo[i:i + per_task]) for i in range(0, len(todo), per_task))
    n = sum(1 for _ in run_tasks(client, job, groups, total=-(-len(todo) // per_task), progress=False))
    total_s = time.perf_counter() - t0
    peak = _client_peak()
    client.close()
    cluster.close()
    shutil.rmtree(work / "tb.ome.zarr", ignore_errors=True)
    shutil.rmtree(work / "tb-out.ome.zarr", ignore_errors=True)
    return {"shape": list(big), "bytes": int(np.prod(big)) * 2, "tile": list(plan.tile_shape), "halo": list(plan.halo),
            "tiles": len(plan), "tiles_per_task": per_task, "tasks": n, "plan_s": plan_s, "plan_submit_s": total_s,
            "tasks_per_s": n / total_s, "client_rss_bytes": peak, "client_rss_before_bytes": base,
            "job_pickle_bytes": len(pickle.dumps(job))}


def part_markers_s3(work: Path, counts, per_file: int = 1) -> dict:
    """Small files at scale on an object store: ``n`` tile markers in a bucket of a local S3
    server (moto, its own process), then what the client pays to list them and to read them
    all, one request each (as before) and in one concurrent fetch (``Folder.read_json_many``).
    ``per_file`` > 1: the markers as tasks of that many consecutive tiles write them
    (``RunManifest.batched``: one file per task), read back through the manifest."""
    import os
    import socket
    import subprocess

    import s3fs

    from pipeline.engine.manifest import RunManifest, marker_name

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    rows = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        for n in counts:
            bucket = f"markers-{n}-{per_file}"
            fs.mkdir(bucket)
            manifest = RunManifest(f"s3://{bucket}/out.ome.zarr")
            meta = {"tile": 0, "voxels": 2**22, "seconds": 0.5, "missing_input_chunks": 0, "checksum": "0" * 16}
            t0 = time.perf_counter()
            if per_file == 1:
                fs.pipe({f"{bucket}/out.ome.zarr/_tilewise/done/{t}": json.dumps({**meta, "tile": t}).encode()
                         for t in range(n)})  # concurrent puts
            else:
                fs.pipe({f"{bucket}/out.ome.zarr/_tilewise/done/{marker_name(range(a, min(n, a + per_file)))}":
                         json.dumps({str(t): {**meta, "tile": t} for t in range(a, min(n, a + per_file))}).encode()
                         for a in range(0, n, per_file)})
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            done = manifest.done()
            list_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            concurrent = manifest.tile_metadata()
            concurrent_s = time.perf_counter() - t0
            files = -(-n // per_file)
            sample = sorted(done)[:min(n, 2000 * per_file):per_file]  # one request each: a sample, scaled
            t0 = time.perf_counter()
            serial = {}
            for t in sample:  # the file holding tile t, read alone
                if per_file == 1:
                    serial[t] = manifest.folder.read_json(f"done/{t}", {})
                else:
                    serial[t] = manifest.folder.read_json(f"done/{marker_name(range(t, min(n, t + per_file)))}")[str(t)]
            serial_s = (time.perf_counter() - t0) * files / len(sample)
            assert len(done) == n and all(concurrent[t] == serial[t] for t in sample)
            rows.append({"markers": n, "tiles_per_file": per_file, "files": files,
                         "write_concurrent_s": round(write_s, 2),
                         "list_s": round(list_s, 2), "read_one_request_each_s": round(serial_s, 1),
                         "read_concurrent_s": round(concurrent_s, 2), "speedup": round(serial_s / concurrent_s, 1)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait()
    return {"server": "moto_server (moto 5) on loopback, its own process", "rows": rows,
            "note": "one-request-each time measured on up to 2,000 marker files and scaled to all"}


def part_scheduler(work: Path, tile_counts) -> dict:
    """A real ``dask scheduler`` process and two ``dask worker`` processes (1 thread each):
    the engine's submission of 10^4 .. 10^6 tiles (grouped into at most ``MAX_TASKS`` tasks, the
    real job payload, no-op body), the scheduler's peak RSS sampled every 50 ms, and tasks/s.
    One row submits 10^4 tiles one task each, as an ungrouped engine would."""
    import subprocess
    import threading

    import psutil
    from distributed import Client

    from kernels import KernelSpec
    from pipeline.engine.manifest import RunManifest
    from pipeline.engine.plan import make_plan
    from pipeline.engine.runner import ImageTileJob, TileReader, tiles_per_task
    from pipeline.engine.submit import run_tasks
    from pipeline.io import create_image, default_axes, open_image

    bin_dir = Path(sys.executable).parent
    sched_file = work / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    scheduler = subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--scheduler-file", str(sched_file),
                                  "--no-dashboard", "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    rows = []
    try:
        for _ in range(200):
            if sched_file.exists():
                break
            time.sleep(0.1)
        workers = [subprocess.Popen([str(bin_dir / "dask"), "worker", "--scheduler-file", str(sched_file),
                                     "--nthreads", "1", "--nworkers", "1", "--no-dashboard"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
        client = Client(scheduler_file=str(sched_file))
        client.wait_for_workers(2)
        client.run(lambda: 0)
        proc = psutil.Process(scheduler.pid)
        for n_tiles, grouped in [(n, True) for n in tile_counts] + [(tile_counts[0], False)]:
            # a 2D plane of 1024-wide tiles: the tile count is what grows
            big = (1, 1024 * 10, 1024 * -(-n_tiles // 10))
            tile = (1, 1024, 1024)
            src = create_image(str(work / "sched.ome.zarr"), shape=big, dtype=np.uint16, axes=default_axes("zyx"),
                               chunks=tile, n_levels=1, overwrite=True)
            out = create_image(str(work / "sched-out.ome.zarr"), shape=big, dtype=np.uint16, axes=default_axes("zyx"),
                               chunks=tile, n_levels=1, overwrite=True)
            plan = make_plan(big, "zyx", tile, {"z": 0, "y": 4, "x": 4}, tile_shape=tile)
            job = NoopJob(ImageTileJob(KernelSpec.of("identity"), TileReader(open_image(src.url), 0, False,
                                                                             plan.pad_mode, "raw", None),
                                       plan, out, RunManifest(str(work / "sched-out.ome.zarr"))))
            todo = list(range(len(plan)))
            per_task = tiles_per_task(len(todo), 1) if grouped else 1
            before = proc.memory_info().rss
            peak = [before]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            groups = (tuple(todo[i:i + per_task]) for i in range(0, len(todo), per_task))
            n = sum(1 for _ in run_tasks(client, job, groups, total=-(-len(todo) // per_task), progress=False))
            seconds = time.perf_counter() - t0
            stop.set()
            sampler.join()
            rows.append({"tiles": len(plan), "grouped": grouped, "tasks": n, "seconds": round(seconds, 2),
                         "tasks_per_s": round(n / seconds, 1), "tiles_per_s": round(len(plan) / seconds, 1),
                         "scheduler_rss_before_bytes": before, "scheduler_peak_rss_bytes": peak[0]})
            print(json.dumps(rows[-1]), flush=True)
        client.close()
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
        scheduler.terminate()
        scheduler.wait()
        shutil.rmtree(work / "sched.ome.zarr", ignore_errors=True)
        shutil.rmtree(work / "sched-out.ome.zarr", ignore_errors=True)
    return {"scheduler": "dask scheduler + 2 dask worker processes (1 thread each), this machine", "rows": rows}


@dataclass(frozen=True)
class NoopJob:
    """The engine's task shape with no I/O: the real job's payload travels, its tiles are rebuilt."""

    job: Any

    def __call__(self, ids) -> int:
        return sum(len(self.job.plan.tile(i).read) for i in ids)


def part_memory(work: Path, size_gb: float) -> dict:
    side = int(round((size_gb * 1e9 / 2 / 256) ** 0.5 / 256)) * 256
    shape = (256, side, side)
    cluster, client = _cluster()
    url = str(work / f"in-{size_gb}.ome.zarr")
    t0 = time.perf_counter()
    _random_volume(url, shape, client)
    gen_s = time.perf_counter() - t0
    client.close()
    cluster.close()
    return {"shape": list(shape), "bytes": int(np.prod(shape)) * 2, "generate_s": gen_s, "url": url}


def run_memory_engine(url: str, out: str) -> None:
    from kernels import KernelSpec
    from pipeline.steps.apply import run_kernel

    cluster, client = _cluster()
    run_kernel(url, out, KernelSpec.of("gaussian", sigma=[1.0, 1.0, 1.0]), client, tile_shape=TILE, progress=False,
               out_dtype="input", overwrite=True)
    client.close()
    cluster.close()


def part_resume_checks(work: Path, shape) -> dict:
    """What a resume pays to trust finished work (issue 13): the input's content fingerprint (one
    listing of its chunk files, no data read) and the verification of every finished tile's
    output against its checksum (one read of the output), on a finished run of ``shape``."""
    from kernels import KernelSpec
    from pipeline.engine.manifest import RunManifest
    from pipeline.engine.runner import EngineOptions, prepare_engine, verify_done
    from pipeline.io import open_image
    from pipeline.io.store import content_fingerprint
    from pipeline.io.write import ImageSink
    from pipeline.steps.apply import run_kernel

    cluster, client = _cluster()
    url = str(work / "resume-in.ome.zarr")
    _random_volume(url, shape, client, chunks=(16, 128, 128))
    out = str(work / "resume-out.ome.zarr")
    spec = KernelSpec.of("identity")
    run_kernel(url, out, spec, client, tile_shape=TILE, progress=False, overwrite=True, out_dtype="input")
    level = open_image(url).levels[0]
    n_files = int(np.prod([-(-n // c) for n, c in zip(level.shape, level.chunks)]))
    t0 = time.perf_counter()
    content_fingerprint(f"{url}/{level.path}")
    fingerprint_s = time.perf_counter() - t0
    setup = prepare_engine(url, spec, EngineOptions(tile_shape=TILE))
    manifest = RunManifest(out)
    t0 = time.perf_counter()
    intact = verify_done(client, ImageSink.open(out), setup.plan, manifest, progress=False)
    verify_s = time.perf_counter() - t0
    client.close()
    cluster.close()
    out_bytes = int(np.prod(shape)) * 2
    return {"shape": list(shape), "input_chunk_files": n_files, "fingerprint_s": fingerprint_s,
            "fingerprint_files_per_s": n_files / max(fingerprint_s, 1e-9), "tiles": len(setup.plan),
            "tiles_verified": len(intact), "verify_s": verify_s, "verify_mb_per_s": out_bytes / 1e6 / verify_s,
            "note": "fingerprint: one listing of the input level's chunk files (name, size, mtime); verify: "
                    "every finished tile's output read back and hashed (BLAKE2b) on 2 workers; uint16 data"}


PARTS = {"efficiency": part_efficiency, "map_overlap": part_map_overlap, "planning": part_planning,
         "resume_checks": part_resume_checks, "markers_s3": part_markers_s3, "scheduler": part_scheduler,
         "markers_s3_batched": partial(part_markers_s3, per_file=8)}


def _run_part(name: str, work: Path, arg: str) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_engine", "--part", name, "--arg", arg, "--workdir", str(work),
           "--json", str(out)]
    measured = run_measured(cmd)
    result = json.loads(out.read_text())
    result["process_tree"] = measured
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="64,1024,1024", help="volume for efficiency and map_overlap")
    parser.add_argument("--sizes-gb", default="1,4,16", help="input sizes for the memory part")
    parser.add_argument("--parts", default="efficiency,map_overlap,planning,resume_checks,memory")
    parser.add_argument("--markers", default="10000,100000", help="markers_s3 part: marker counts")
    parser.add_argument("--scheduler-tiles", default="10000,100000,1000000", help="scheduler part: tile counts")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--arg", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tilewise-bench-engine-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.part:  # child process: one part
        if args.part == "memory_input":
            result = part_memory(work, float(args.arg))
        elif args.part == "memory_engine":
            url, out = args.arg.split("|")
            run_memory_engine(url, out)
            result = {}
        else:
            result = PARTS[args.part](work, tuple(int(v) for v in args.arg.split(",")))
        Path(args.json).write_text(json.dumps(result))
        return result
    # parts can be run separately (--parts); each run updates its parts in the saved results
    results: dict = {k: v for k, v in previous("engine").items() if k in (*PARTS, "memory")}
    try:
        for name in args.parts.split(","):
            print(f"-- {name}", flush=True)
            if name == "memory":
                # rows of sizes not re-run this time are kept (one row per input shape)
                kept = {tuple(r["shape"]): r for r in results.get("memory", {}).get("rows", [])}
                rows = []
                for gb in (float(v) for v in args.sizes_gb.split(",")):
                    made = _run_part("memory_input", work, str(gb))
                    engine = run_measured([sys.executable, "-m", "benchmarks.bench_engine", "--part", "memory_engine",
                                           "--arg", f"{made['url']}|{work / 'mem-out.ome.zarr'}", "--workdir", str(work),
                                           "--json", str(work / "m.json")])
                    rows.append({"input_gb": made["bytes"] / 1e9, "shape": made["shape"], "seconds": engine["seconds"],
                                 "voxels_per_s": made["bytes"] / 2 / engine["seconds"],
                                 "peak_worker_rss_bytes": engine["peak_rss_worker"],
                                 "peak_client_rss_bytes": engine["peak_rss_client"],
                                 "peak_total_rss_bytes": engine["peak_rss_total"]})
                    print(json.dumps(rows[-1]), flush=True)
                    shutil.rmtree(made["url"], ignore_errors=True)
                    shutil.rmtree(work / "mem-out.ome.zarr", ignore_errors=True)
                kept.update({tuple(r["shape"]): r for r in rows})
                results["memory"] = {"kernel": "gaussian sigma 1 (halo 4), uint16 out, with pyramid; 2 workers x 1 "
                                               "thread", "rows": sorted(kept.values(), key=lambda r: r["input_gb"])}
            elif name == "planning":  # one process per volume: each row's client memory is its own
                rows = []
                for label, big in PLANNING_SHAPES.items():
                    rows.append({"volume": label, **_run_part(name, work, ",".join(map(str, big)))})
                    print(json.dumps(rows[-1], default=str)[:600], flush=True)
                results["planning"] = {"note": "plan + windowed submission of every tile of a metadata-only uint16 "
                                               "store, real ImageTileJob payload, no-op task body; 2 workers",
                                       "command": invocation(), "rows": rows}
            elif name in ("markers_s3", "markers_s3_batched", "scheduler"):
                arg = args.scheduler_tiles if name == "scheduler" else args.markers
                results[name] = {**_run_part(name, work, arg), "command": invocation()}
                print(json.dumps(results[name], default=str)[:1500], flush=True)
            else:
                results[name] = {**_run_part(name, work, args.shape), "command": invocation()}
                print(json.dumps(results[name], default=str)[:600], flush=True)
            save("engine", results)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
