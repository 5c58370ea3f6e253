"""The run manifest in the output store: parameters of the run and which tiles are done.

Everything a run needs to resume lives in the output (DESIGN invariant 7): ``_tilewise/run.json``
holds the parameters (input, kernel spec, tiling, statistics); ``_tilewise/done/<tile id>`` is
written by a task after its output chunks, so a marker always means "written completely". A
marker holds the tile's small JSON metadata (timings, and whatever the kernel reports, e.g. the
residual statistics of a denoiser), so run reports survive interruptions too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.errors import OutputExistsError
from pipeline.io import store


@dataclass(frozen=True)
class RunManifest:
    url: str  # the output store
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    stage: str = ""  # runs with several passes over the tiles keep one done-set per pass

    def at(self, stage: str) -> "RunManifest":
        """The same run's manifest for another pass (e.g. ``"relabel"`` after segmentation)."""
        return RunManifest(self.url, self.storage_options, stage)

    @property
    def done_folder(self) -> str:
        return "done" if not self.stage else f"done-{self.stage}"

    @property
    def folder(self) -> str:
        return store.join(self.url, "_tilewise")

    def _fs(self):
        return store._fs(self.folder, self.storage_options)

    def read_params(self) -> dict[str, Any] | None:
        fs, path = self._fs()
        try:
            with fs.open(f"{path}/run.json", "r") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def write_params(self, params: Mapping[str, Any]) -> None:
        fs, path = self._fs()
        fs.makedirs(f"{path}/{self.done_folder}", exist_ok=True)
        with fs.open(f"{path}/run.json", "w") as fh:
            json.dump(params, fh, indent=2, sort_keys=True)

    def write_json(self, name: str, value: Any) -> None:
        """A small JSON document beside the run parameters (e.g. a finished run's summary)."""
        fs, path = self._fs()
        with fs.open(f"{path}/{name}.json", "w") as fh:
            json.dump(value, fh, indent=2)

    def read_json(self, name: str) -> Any:
        fs, path = self._fs()
        try:
            with fs.open(f"{path}/{name}.json", "r") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    def begin(self) -> None:
        """Create this pass's done folder (the client calls it once, before any task runs)."""
        fs, path = self._fs()
        fs.makedirs(f"{path}/{self.done_folder}", exist_ok=True)

    def mark_done(self, tile_id: int, metadata: Mapping[str, Any] | None = None) -> None:
        fs, path = self._fs()
        with fs.open(f"{path}/{self.done_folder}/{int(tile_id)}", "w") as fh:
            json.dump(dict(metadata or {}), fh)

    def tile_metadata(self) -> dict[int, dict[str, Any]]:
        """The metadata every finished tile left in its marker (one small file per tile)."""
        fs, path = self._fs()
        out = {}
        for tile_id in sorted(self.done()):
            with fs.open(f"{path}/{self.done_folder}/{tile_id}", "r") as fh:
                text = fh.read()
            out[tile_id] = json.loads(text) if text.strip() else {}
        return out

    def done(self) -> set[int]:
        fs, path = self._fs()
        if not fs.exists(f"{path}/{self.done_folder}"):
            return set()
        return {int(p.rstrip("/").split("/")[-1]) for p in fs.ls(f"{path}/{self.done_folder}", detail=False)}


def check_compatible(url: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """Refuse to resume into an output written with other parameters (or by something else)."""
    if old is None:
        raise OutputExistsError(
            f"Output '{url}' exists but holds no tilewise run manifest; pass --overwrite to replace it, "
            "or choose another path."
        )
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise OutputExistsError(
            f"Output '{url}' was written by a run with other parameters ({detail}). Re-run with the "
            "original parameters to resume, pass --overwrite to start fresh, or choose another output."
        )
