"""The per-pixel maps a kernel returns beside its output (``KernelTraits.maps``: uncertainty),
written as one float32 multiscale image each under ``OUT/uncertainty/<name>``.

Each map has the output's geometry (batch axes, then space; no channel axis), chunks and
tile plan, so a tile writes its core of every map into whole chunks it owns, like its main
output (``docs/architecture.md``, invariant 2). Levels 1..n are the mean of level 0, and
``omero`` windows come from global statistics, so viewers open them with a sensible contrast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.core.regions import Region
from pipeline.io import store
from pipeline.io.write import ImageSink, create_collection, create_image

FOLDER = "uncertainty"


def maps_url(output_url: str, name: str | None = None) -> str:
    """``OUT/uncertainty`` or ``OUT/uncertainty/<name>``."""
    return store.join(output_url, FOLDER, name) if name else store.join(output_url, FOLDER)


@dataclass(frozen=True)
class MapSinks:
    """The map images of one run, in ``traits.maps`` order; small and picklable."""

    sinks: tuple[ImageSink, ...]

    @classmethod
    def create(cls, output_url: str, names: Sequence[str], geometry: Mapping[str, Any], *, version: str,
               n_levels: int | None = None, storage_options: Mapping[str, Any] | None = None) -> "MapSinks":
        """Empty map images (``geometry``: ``EngineSetup.output_geometry()``), replacing old ones."""
        create_collection(maps_url(output_url), version=version, overwrite=True, storage_options=storage_options,
                          attributes={"tilewise": {"maps": list(names)}})
        return cls(tuple(create_image(maps_url(output_url, name), **geometry, dtype="float32", name=name,
                                      channel_names=(name,), n_levels=n_levels, version=version, overwrite=True,
                                      storage_options=storage_options) for name in names))

    @classmethod
    def open(cls, output_url: str, names: Sequence[str], storage_options: Mapping[str, Any] | None = None
             ) -> "MapSinks":
        return cls(tuple(ImageSink.open(maps_url(output_url, name), storage_options) for name in names))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sink.name for sink in self.sinks)

    def write(self, lead: tuple[slice, ...], core: Region, maps: np.ndarray) -> None:
        """A tile's core of every map (``(M, *core)``) at ``lead`` (its batch indices)."""
        if len(maps) != len(self.sinks):
            raise ValueError(f"the kernel returned {len(maps)} maps for {len(self.sinks)} declared")
        for sink, data in zip(self.sinks, maps):
            sink.write(lead + tuple(core), data.astype(np.float32).reshape((1,) * len(lead) + data.shape))

    def finalize(self, client: Any, *, progress: bool) -> None:
        """Mean pyramids and ``omero`` windows."""
        from pipeline.engine.pyramid import finalize_image

        for sink in self.sinks:
            finalize_image(sink, client, progress=progress)
