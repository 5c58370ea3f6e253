"""Fault tolerance on a real cluster: ``dask scheduler`` + two ``dask worker`` processes on
loopback; one worker is killed mid-run. The run must finish and equal a clean run bit for bit,
because every output chunk has one owner and a tile is marked done only after its chunks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from kernels import KernelSpec
from pipeline.io import create_image, default_axes, open_image
from pipeline.engine.manifest import RunManifest
from pipeline.steps.apply import run_kernel


def _spawn(args: list[str], log_path) -> subprocess.Popen:
    # a session of its own, so killing the group takes the worker with its nanny
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture
def loopback_cluster(tmp_path):
    sched_file = tmp_path / "scheduler.json"
    procs = [_spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--dashboard-address", ":0", "--scheduler-file", str(sched_file)], tmp_path / "scheduler.log")]
    deadline = time.time() + 60
    while not sched_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    for name in ("worker-a", "worker-b"):
        procs.append(_spawn(["distributed.cli.dask_worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                             "--nworkers", "1", "--host", "127.0.0.1", "--name", name,
                             "--memory-limit", "2GiB"], tmp_path / f"{name}.log"))
    try:
        yield sched_file, {"worker-a": procs[1], "worker-b": procs[2]}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def test_killing_a_worker_mid_run_still_gives_the_clean_result(tmp_path, loopback_cluster, client):
    from distributed import Client

    sched_file, workers = loopback_cluster
    data = np.random.default_rng(6).integers(0, 4000, size=(24, 96, 80)).astype(np.uint16)
    url = str(tmp_path / "in.ome.zarr")
    sink = create_image(url, shape=data.shape, dtype=data.dtype, axes=default_axes("zyx"), chunks=(8, 16, 16), n_levels=1)
    sink.write((slice(None),) * 3, data)
    # a conv-net with a delay, so the run lasts long enough to kill a worker in the middle of it
    spec = KernelSpec.of("convnet", ndim=3, depth=3, width=4, delay_s=0.15)
    kw = dict(progress=False, tile_shape=(8, 16, 16))

    clean = run_kernel(url, str(tmp_path / "clean.ome.zarr"), spec, client, **kw)
    out = str(tmp_path / "killed.ome.zarr")
    manifest = RunManifest(out)
    killed_at: list[int] = []

    def kill_when_started():
        while not killed_at:
            try:
                n = len(manifest.done())
            except Exception:
                n = 0
            if n >= 8:
                os.killpg(workers["worker-a"].pid, signal.SIGKILL)
                killed_at.append(n)
            time.sleep(0.05)

    with Client(scheduler_file=str(sched_file)) as c:
        c.wait_for_workers(2, timeout=60)
        killer = threading.Thread(target=kill_when_started, daemon=True)
        killer.start()
        summary = run_kernel(url, out, spec, c, **kw)
        killer.join(timeout=5)
        survivors = len(c.scheduler_info(n_workers=-1)["workers"])
    assert killed_at and killed_at[0] < clean.tiles, "the worker was not killed mid-run"
    assert workers["worker-a"].poll() is not None and survivors == 1
    assert summary.computed == clean.tiles and len(manifest.done()) == clean.tiles
    a, b = open_image(str(tmp_path / "clean.ome.zarr")), open_image(out)
    assert len(a.levels) == len(b.levels)
    for level in range(len(a.levels)):
        np.testing.assert_array_equal(a.read((slice(None),) * 3, level), b.read((slice(None),) * 3, level))
