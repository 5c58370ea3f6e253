"""Connect to Dask: a LocalCluster by default, or the user's own scheduler or Client.

Never creates a cluster when one is given (users bring SLURM, Kubernetes or cloud clusters).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from pipeline.core.errors import OptionError

log = logging.getLogger(__name__)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def cuda_devices() -> int:
    """GPUs visible to this process (0 without CUDA or without torch)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


GPU_TILES_IN_FLIGHT = 4
CONNECT_TIMEOUT_S = 10  # a scheduler that does not answer in this long is reported, not waited for


def gpu_worker_specs(n_gpus: int, cores: int, memory_limit: str | int = "auto",
                     tiles_in_flight: int = GPU_TILES_IN_FLIGHT) -> dict[str, dict]:
    """One worker process per GPU, pinned with ``CUDA_VISIBLE_DEVICES``; the cores are shared
    out as threads for CPU stages (as dask-cuda's LocalCUDACluster does, without needing it).

    Each worker advertises ``resources={"GPU": tiles_in_flight}`` and model tasks ask for
    ``{"GPU": 1}``, so tiles are read, normalised and written (CPU and store) while another runs
    on the device. With 1 the GPU waits on every tile's I/O. Measured on an H100 (N2V2 U-Net,
    64x256x256 tiles, ``benchmarks/bench_gpu.py``): tile stage at 0.28 of the direct model rate
    with 1 in flight, 0.55 with 2, 0.89 with 4. Device memory holds that many tiles'
    activations at once: use fewer on small GPUs (``--gpu-tiles``).
    """
    from distributed import Nanny

    threads = max(1, cores // max(n_gpus, 1))
    return {
        f"gpu-{i}": {"cls": Nanny, "options": {
            "nthreads": threads, "resources": {"GPU": tiles_in_flight}, "memory_limit": memory_limit,
            "env": {"CUDA_VISIBLE_DEVICES": str(i)}, "silence_logs": logging.WARNING}}
        for i in range(n_gpus)
    }


def _local_cluster(n_workers: int | None, threads_per_worker: int, memory_limit: str | int,
                   gpu_tiles: int = GPU_TILES_IN_FLIGHT):
    """Default cluster: one process per GPU when there are GPUs, else one per core."""
    from distributed import LocalCluster, Scheduler, SpecCluster

    n_gpus = cuda_devices()
    if n_gpus and not n_workers:
        scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
        return SpecCluster(workers=gpu_worker_specs(n_gpus, default_workers(), memory_limit, gpu_tiles),
                           scheduler=scheduler,
                           silence_logs=logging.WARNING)
    return LocalCluster(
        n_workers=n_workers or default_workers(),
        threads_per_worker=threads_per_worker,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=":0",
        silence_logs=logging.WARNING,
    )


@contextmanager
def connect(
    client: Any = None,
    *,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    security: Any = None,
    memory_limit: str | int = "auto",
    gpu_tiles: int = GPU_TILES_IN_FLIGHT,
) -> Iterator[Any]:
    """Yield a ``distributed.Client``; closes only what it created.

    Parameters
    ----------
    client : an existing ``distributed.Client`` to use as is.
    scheduler, scheduler_file : address or scheduler file of a running cluster.
    n_workers : worker processes of the default LocalCluster (default: one per GPU when CUDA is
        available, else one per core).
    gpu_tiles : tiles in flight per GPU worker of the default cluster (``gpu_worker_specs``).
    security : a ``distributed.Security`` (TLS) passed through to the Client.
    """
    from distributed import Client

    if client is not None:
        yield client
        return
    if scheduler or scheduler_file:
        kw = {"security": security} if security is not None else {}
        try:
            own = Client(address=scheduler, scheduler_file=scheduler_file, timeout=CONNECT_TIMEOUT_S, **kw)
        except (OSError, TimeoutError, ValueError) as exc:
            where = scheduler or f"the scheduler in {scheduler_file}"
            raise OptionError(f"Cannot reach {where} within {CONNECT_TIMEOUT_S} s ({type(exc).__name__}: "
                              f"{str(exc)[:160]}); check the address (tcp://host:8786) and that the scheduler "
                              "is running.") from None
        with own:
            log.info("connected to scheduler %s (dashboard %s)", own.scheduler.address, own.dashboard_link)
            yield own
        return
    cluster = _local_cluster(n_workers, threads_per_worker, memory_limit, gpu_tiles)
    try:
        with Client(cluster) as own:
            log.info("local cluster with %d workers; dashboard: %s", len(cluster.workers), own.dashboard_link)
            yield own
    finally:
        cluster.close()
