"""The kernel contract: what a kernel declares (:class:`KernelTraits`), how it is called
(one signature, with a :class:`BatchContext`), and the :class:`Kernel` base every kernel extends.

A kernel maps a batch ``(N, C_in, *spatial)`` to ``(N, C_out, *spatial)`` of the same spatial
size. Everything the engine needs to know about it is a declared trait, read on the client
before any work is planned; the engine never probes a kernel for undeclared attributes. What a
kernel's output means (input units, labels, probabilities) is the kernel's business: it gets
the global intensity scaling in its context and maps its own output back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from kernels.errors import KernelError

Region = tuple[slice, ...]
PadMode = Literal["reflect", "symmetric", "edge", "constant"]
PAD_MODES: tuple[str, ...] = ("reflect", "symmetric", "edge", "constant")
OutputKind = Literal["image", "labels", "probabilities", "embeddings"]
InputKind = Literal["normalised", "raw", "native"]
Device = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class KernelTraits:
    """What a kernel declares; the planner and runner read these and nothing else.

    Attributes
    ----------
    ndim, in_channels, out_channels : spatial dimensionality and channel counts.
    halo : per spatial axis, how far (pixels) an output depends on its input; tiles are read
        with this much context, so outputs equal the untiled result (crop-stitching).
    align : per spatial axis, the grid tile starts must lie on (a U-Net's total down-sampling).
    pad_mode : what the kernel should see past the volume edge (what it saw in training).
    input : ``normalised`` (float32, each channel's global ``percentiles`` mapped to 0..1),
        ``raw`` (float32 in input units) or ``native`` (the stored dtype, e.g. label ids).
    percentiles : the (low, high) percentiles of the global normalisation.
    output : ``image`` (intensities), ``labels`` (instance ids, local to the block; the engine
        stitches them), ``probabilities`` or ``embeddings`` (``(N, D)``: one vector per block, a
        crop centred on an object; see ``kernels.embed``).
    max_batch : most blocks per call (memory).
    device : ``gpu`` runs on a GPU when the worker has one (tasks then ask for one).
    measures : for labels kernels, whether object tables get the input's intensity statistics.
    working_bytes : memory the kernel needs per voxel of a padded tile (core + halo) while it
        runs, e.g. a network's activations; the engine sizes default tiles so one fits
        ``WORKING_MEMORY`` (0: only the tile's own arrays count).
    maps : names of per-pixel float maps the kernel returns beside its output (uncertainty:
        ``foreground``, ``entropy``, ``variance``), from :meth:`Kernel.with_maps`; the engine
        writes each as a one-channel image under ``OUT/uncertainty/<name>`` and, for labels,
        adds its per-object mean and max to the table.
    """

    ndim: int
    in_channels: int
    out_channels: int
    halo: tuple[int, ...]
    align: tuple[int, ...] = ()
    pad_mode: PadMode = "reflect"
    input: InputKind = "normalised"
    percentiles: tuple[float, float] = (1.0, 99.9)
    output: OutputKind = "image"
    max_batch: int = 1
    device: Device = "cpu"
    measures: bool = True
    maps: tuple[str, ...] = ()
    working_bytes: int = 0

    def __post_init__(self) -> None:
        halo = tuple(int(h) for h in self.halo)
        align = tuple(int(a) for a in self.align) or (1,) * self.ndim
        object.__setattr__(self, "halo", halo)
        object.__setattr__(self, "align", align)
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        object.__setattr__(self, "maps", tuple(str(m) for m in self.maps))
        if len(set(self.maps)) != len(self.maps) or not all(m.isidentifier() for m in self.maps):
            raise KernelError(f"maps must be distinct identifiers, got {list(self.maps)}")
        if self.ndim not in (2, 3):
            raise KernelError(f"a kernel is 2D or 3D, got ndim={self.ndim}")
        if len(halo) != self.ndim or any(h < 0 for h in halo):
            raise KernelError(f"halo needs one non-negative size per spatial axis ({self.ndim}), got {halo}")
        if len(align) != self.ndim or any(a < 1 for a in align):
            raise KernelError(f"align needs one positive size per spatial axis ({self.ndim}), got {align}")
        if self.pad_mode not in PAD_MODES:
            raise KernelError(f"pad_mode must be one of {', '.join(PAD_MODES)}, got {self.pad_mode!r}")
        if self.in_channels < 1 or self.out_channels < 1 or self.max_batch < 1:
            raise KernelError("channels and max_batch must be at least 1")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise KernelError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    @property
    def is_labels(self) -> bool:
        return self.output == "labels"


@dataclass(frozen=True)
class Scaling:
    """Per-channel affine map between input units and the normalised units a kernel sees:
    ``low`` maps to 0 and ``high`` to 1. Built once per input from global statistics."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    def _bounds(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) shaped to broadcast over ``(C, *spatial)``; high > low."""
        shape = (-1,) + (1,) * (ndim - 1)
        lo = np.asarray(self.low, np.float32).reshape(shape)
        return lo, np.maximum(np.asarray(self.high, np.float32).reshape(shape), lo + 1e-6)

    def apply(self, block: np.ndarray) -> np.ndarray:
        """``(C, *spatial)`` in input units -> normalised float32."""
        lo, hi = self._bounds(block.ndim)
        return (block.astype(np.float32) - lo) / (hi - lo)

    def invert(self, block: np.ndarray) -> np.ndarray:
        """Normalised ``(C, *spatial)`` -> input units."""
        lo, hi = self._bounds(block.ndim)
        return block * (hi - lo) + lo

    def invert_variance(self, block: np.ndarray) -> np.ndarray:
        """A variance in normalised units ``(C, *spatial)`` -> input units squared."""
        lo, hi = self._bounds(block.ndim)
        return block * (hi - lo) ** 2


@dataclass(frozen=True)
class BatchContext:
    """What a kernel may know about the blocks of one call, besides their pixels.

    ``valid``: per block, the region inside the volume (the rest is padding). ``origins``: per
    block, the global position of its first pixel (negative where padded). ``scaling``: the
    global normalisation, so a kernel can map its output back to input units.
    """

    valid: tuple[Region, ...]
    origins: tuple[tuple[int, ...], ...]
    scaling: Scaling | None = None

    @classmethod
    def whole(cls, batch: np.ndarray, scaling: Scaling | None = None) -> "BatchContext":
        """The context of blocks that are whole images (nothing padded, origin 0)."""
        spatial = batch.shape[2:]
        n = batch.shape[0]
        return cls(tuple(tuple(slice(0, s) for s in spatial) for _ in range(n)), ((0,) * len(spatial),) * n, scaling)


class KernelParams(BaseModel):
    """Base of every kernel's parameters: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Kernel(ABC):
    """Base of all kernels: declare ``name`` and ``Params``, set ``traits`` in ``__init__``.

    ``load(device)`` builds weights once per worker process (see ``kernels.resident``);
    ``__call__(batch, context)`` runs one batch; ``describe_tile`` may summarise a tile's
    output (e.g. a denoiser's residual) into the run's per-tile metadata.
    """

    name: ClassVar[str]
    Params: ClassVar[type[KernelParams]] = KernelParams
    traits: KernelTraits

    def __init__(self, params: KernelParams):
        self.params = params

    def load(self, device: str) -> None:
        """Load weights onto ``device``; kernels without weights have nothing to do."""

    @abstractmethod
    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        """``(N, C_in, *spatial)`` -> ``(N, C_out, *spatial)``."""

    def with_maps(self, batch: np.ndarray, context: BatchContext) -> tuple[np.ndarray, np.ndarray | None]:
        """The output and ``(N, len(traits.maps), *spatial)`` float32 maps (None without maps).
        Kernels declaring ``maps`` override this, and ``__call__`` returns its first half."""
        return self(batch, context), None

    def describe_tile(self, inputs: np.ndarray, outputs: np.ndarray, scaling: Scaling | None) -> dict[str, Any]:
        """Small JSON-able facts about one tile's core (``(C, *core)`` in, out); none by default."""
        return {}

    def run(self, batch: np.ndarray, scaling: Scaling | None = None) -> np.ndarray:
        """Call on whole images (no padding): for notebooks, tests and benchmarks."""
        return self(batch, BatchContext.whole(batch, scaling))


def per_axis(value: int | float | Sequence[int | float], ndim: int, what: str) -> tuple:
    """One value per spatial axis from a scalar or a sequence (normalised once at the entry)."""
    if isinstance(value, (int, float)):
        return (value,) * ndim
    out = tuple(value)
    if len(out) != ndim:
        raise KernelError(f"{what} needs one value or {ndim} values (one per spatial axis), got {list(out)}")
    return out

