"""Connect to Dask: a LocalCluster by default, or the user's own scheduler or Client.

Never creates a cluster when one is given (DESIGN: users bring SLURM/Kubernetes/cloud clusters).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

log = logging.getLogger(__name__)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


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
) -> Iterator[Any]:
    """Yield a ``distributed.Client``; closes only what it created.

    Parameters
    ----------
    client : an existing ``distributed.Client`` to use as is.
    scheduler, scheduler_file : address or scheduler file of a running cluster.
    n_workers : worker processes of the default LocalCluster (default: one per core).
    security : a ``distributed.Security`` (TLS) passed through to the Client.
    """
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler or scheduler_file:
        kw = {"security": security} if security is not None else {}
        with Client(address=scheduler, scheduler_file=scheduler_file, **kw) as own:
            log.info("connected to scheduler %s (dashboard %s)", own.scheduler.address, own.dashboard_link)
            yield own
        return
    cluster = LocalCluster(
        n_workers=n_workers or default_workers(),
        threads_per_worker=threads_per_worker,
        processes=True,
        memory_limit=memory_limit,
        dashboard_address=":0",
        silence_logs=logging.WARNING,
    )
    try:
        with Client(cluster) as own:
            log.info("local cluster with %d workers; dashboard: %s", len(cluster.workers), own.dashboard_link)
            yield own
    finally:
        cluster.close()
