"""Models stay resident: each worker process builds and loads a kernel once, on first use.

The cache is keyed by the spec (a model folder's spec carries its weights' hash), so a changed
model is a new key, never a stale hit.
"""

from __future__ import annotations

import logging
import os
import threading

from kernels.contract import Kernel
from kernels.registry import KernelSpec, build_kernel

log = logging.getLogger(__name__)

_RESIDENT: dict[str, Kernel] = {}
_LOADING = threading.Lock()
_LOADS: dict[str, int] = {}  # loads per spec key in this process (tests prove "once per worker")


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def resident(spec: KernelSpec, device: str | None = None) -> Kernel:
    """The loaded kernel for ``spec`` in this process, loading it on first use only.

    A worker runs several tile tasks at once in its threads (GPU workers keep tiles in flight):
    the lock makes the first of them load the model and the others wait for it, instead of each
    loading its own copy onto the device.
    """
    kernel = _RESIDENT.get(spec.key)
    if kernel is None:
        with _LOADING:
            kernel = _RESIDENT.get(spec.key)
            if kernel is None:
                kernel = build_kernel(spec)
                wanted = device or (default_device() if kernel.traits.device == "gpu" else "cpu")
                kernel.load(wanted)
                _RESIDENT[spec.key] = kernel
                _LOADS[spec.key] = _LOADS.get(spec.key, 0) + 1
                log.info("loaded kernel %s (%s) on %s in process %d", spec.name, spec.key, wanted, os.getpid())
    return kernel


def load_counts() -> dict[str, int]:
    return dict(_LOADS)
