"""The Kernel protocol, kernel specs, and the per-process cache that keeps models resident.

A kernel takes a batch ``(N, C_in, *spatial)`` float32 and returns ``(N, C_out, *spatial)`` of
the same spatial size; its ``halo`` (per spatial axis) bounds its receptive field, so outputs
further than ``halo`` from the block edge equal the untiled result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

log = logging.getLogger(__name__)


class Kernel(Protocol):
    name: str
    ndim: int
    in_channels: int
    out_channels: int
    halo: tuple[int, ...]  # per spatial axis, in the kernel's spatial order
    normalize: bool  # wants inputs scaled by the engine's global statistics

    def load(self, device: str) -> None: ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class KernelSpec:
    """What to build: a registered kernel ``name`` and its JSON-able parameters.

    Frozen and hashable: it is the cache key of the resident model and goes into the run
    manifest, so a resumed run can prove it uses the same kernel.
    """

    name: str
    params_json: str = "{}"

    @classmethod
    def of(cls, name: str, **params: Any) -> "KernelSpec":
        return cls(name, json.dumps(params, sort_keys=True))

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.name}:{self.params_json}".encode()).hexdigest()[:16]


REGISTRY: dict[str, Callable[..., Kernel]] = {}


def register(name: str):
    def deco(factory):
        REGISTRY[name] = factory
        return factory

    return deco


def build_kernel(spec: KernelSpec) -> Kernel:
    """Construct (not load) a kernel from its spec; cheap, usable on the client for its halo."""
    import kernels.builtin  # noqa: F401  (registers the built-in kernels)
    import kernels.denoise  # noqa: F401
    import kernels.segment  # noqa: F401

    if spec.name not in REGISTRY:
        from pipeline.errors import OptionError

        raise OptionError(f"Unknown kernel '{spec.name}'; available: {', '.join(sorted(REGISTRY))}.")
    return REGISTRY[spec.name](**spec.params)


def default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


_RESIDENT: dict[str, Kernel] = {}
_LOADING = threading.Lock()
LOADS: dict[str, int] = {}  # loads per spec key in this process (tests prove "once per worker")


def resident(spec: KernelSpec, device: str | None = None) -> Kernel:
    """The loaded kernel for ``spec`` in this process, loading it on first use only.

    A worker runs several tile tasks at once in its threads (GPU workers keep tiles in flight,
    ``pipeline.cluster.gpu_worker_specs``): the lock makes the first of them load the model and
    the others wait for it, instead of each loading its own copy onto the device.
    """
    kernel = _RESIDENT.get(spec.key)
    if kernel is None:
        with _LOADING:
            kernel = _RESIDENT.get(spec.key)
            if kernel is None:
                kernel = build_kernel(spec)
                kernel.load(device or default_device())
                _RESIDENT[spec.key] = kernel
                LOADS[spec.key] = LOADS.get(spec.key, 0) + 1
                log.info("loaded kernel %s (%s) in process %d", spec.name, spec.key, os.getpid())
    return kernel


def load_counts() -> dict[str, int]:
    return dict(LOADS)
