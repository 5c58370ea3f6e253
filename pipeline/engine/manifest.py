"""The run manifest in the output store: parameters of the run and which tiles are done.

Everything a run needs to resume lives in the output (``docs/architecture.md``, invariant 7): ``_tilewise/run.json``
holds the parameters (input, kernel spec, tiling, statistics); a *marker* under ``_tilewise/done/``
is written after a tile's output chunks, so a marker always means "written completely". It holds
the tile's small JSON metadata (timings, and whatever the kernel reports, e.g. the residual
statistics of a denoiser), so run reports survive interruptions too.

The resume unit is the tile, but a marker file need not be: inside :meth:`RunManifest.batched`
(a task's body) the tiles' markers are kept and written when the task ends as one file per run
of consecutive tile ids, named by its ranges (``done/16-23``, ``done/40-47_56-63``; a lone tile
that is not batched: ``done/12``). Listing the folder still says which tiles are done, and a
run of 10^5 tiles in tasks of 8 writes and reads 12,500 small files instead of 10^5 (on an
object store each is a request). A task that fails writes the markers of the tiles it finished.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

from pipeline.core.errors import OutputExistsError
from pipeline.io import store
from pipeline.io.store import Folder

log = logging.getLogger(__name__)

# The folder under an output that holds a run's manifest, lock and intermediates. A workflow gives
# each of its steps its own (``_tilewise/steps/<step>``), so several steps write into one store.
WORKSPACE = "_tilewise"
MAX_MARKER_NAME = 200  # characters of one batched marker's name (file systems allow 255)

# markers kept by the innermost ``RunManifest.batched()`` of this thread / task: (manifest, {tile: metadata})
_BATCH: ContextVar[tuple["RunManifest", dict[int, dict[str, Any]]] | None] = ContextVar("tilewise_markers",
                                                                                         default=None)


def _runs(tiles: Iterable[int]) -> list[list[int]]:
    """``[first, last]`` of each run of consecutive ids of ``tiles`` (sorted)."""
    runs: list[list[int]] = []
    for t in sorted(tiles):
        if runs and t == runs[-1][1] + 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return runs


def marker_name_of_runs(runs: Iterable[Sequence[int]]) -> str:
    return "_".join(f"{a}-{b}" for a, b in runs)


def marker_name(tiles: Iterable[int]) -> str:
    """``"16-23_40-40"``: the runs of consecutive ids of ``tiles`` (sorted)."""
    return marker_name_of_runs(_runs(tiles))


def marker_tiles(name: str) -> list[int]:
    """The tile ids a marker file stands for (see :func:`marker_name`; a plain number: one tile)."""
    if "-" not in name:
        return [int(name)]
    out: list[int] = []
    for part in name.split("_"):
        a, b = part.split("-")
        out += range(int(a), int(b) + 1)
    return out


def batch_names(tiles: Iterable[int]) -> list[tuple[str, list[int]]]:
    """``tiles`` cut into marker files whose names stay under ``MAX_MARKER_NAME`` characters
    (whole runs to a file; a run's part of a name is far shorter than the limit)."""
    files: list[list[list[int]]] = [[]]
    for run in _runs(tiles):
        if files[-1] and len(marker_name_of_runs(files[-1] + [run])) > MAX_MARKER_NAME:
            files.append([])
        files[-1].append(run)
    return [(marker_name_of_runs(runs), [t for a, b in runs for t in range(a, b + 1)]) for runs in files if runs]


@dataclass(frozen=True)
class RunManifest:
    url: str  # the output store
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    stage: str = ""  # runs with several passes over the tiles keep one done-set per pass
    workspace: str = WORKSPACE

    def at(self, stage: str) -> "RunManifest":
        """The same run's manifest for another pass (e.g. ``"relabel"`` after segmentation)."""
        return RunManifest(self.url, self.storage_options, stage, self.workspace)

    @property
    def done_folder(self) -> str:
        return "done" if not self.stage else f"done-{self.stage}"

    @property
    def folder(self) -> Folder:
        return Folder(store.join(self.url, self.workspace), self.storage_options)

    def started(self) -> bool:
        """Whether this run's parameters were written (a workflow step's output shares its store
        with other steps, so the store existing says nothing about the step)."""
        return self.read_params() is not None

    def read_params(self) -> dict[str, Any] | None:
        return self.folder.read_json("run.json")

    def write_params(self, params: Mapping[str, Any]) -> None:
        self.folder.makedirs(self.done_folder)
        self.folder.write_json("run.json", params, sort_keys=True)

    def write_json(self, name: str, value: Any) -> None:
        """A small JSON document beside the run parameters (e.g. a finished run's summary)."""
        self.folder.write_json(f"{name}.json", value)

    def read_json(self, name: str) -> Any:
        return self.folder.read_json(f"{name}.json")

    def begin(self) -> None:
        """Create this pass's done folder (the client calls it once, before any task runs)."""
        self.folder.makedirs(self.done_folder)

    def mark_done(self, tile_id: int, metadata: Mapping[str, Any] | None = None) -> None:
        """Tile ``tile_id`` is written completely: its marker now, or when the enclosing
        :meth:`batched` ends."""
        kept = _BATCH.get()
        if kept is not None and kept[0] == self:
            kept[1][int(tile_id)] = dict(metadata or {})
        else:
            self.folder.write_json(f"{self.done_folder}/{int(tile_id)}", dict(metadata or {}), indent=None)

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Keep the markers of this block's tiles and write them as few files when it ends
        (also when it raises: the tiles finished before are done)."""
        kept: dict[int, dict[str, Any]] = {}
        token = _BATCH.set((self, kept))
        try:
            yield
        finally:
            _BATCH.reset(token)
            for name, tiles in batch_names(kept):
                self.folder.write_json(f"{self.done_folder}/{name}", {str(t): kept[t] for t in tiles}, indent=None)

    def marker_files(self) -> dict[int, str]:
        """Each finished tile and the name of the marker file that holds it (one listing; pass
        it to :meth:`tile_metadata` to read markers of tiles found done without listing again)."""
        return {t: name for name in self.folder.names(self.done_folder) for t in marker_tiles(name)}

    def unmark(self, tile_ids: Iterable[int]) -> None:
        """Forget tiles (their output did not verify): the next pass computes them again. A
        batched marker goes whole, so the other tiles it names are computed again too."""
        files = self.marker_files()
        for name in {files[int(t)] for t in tile_ids if int(t) in files}:
            self.folder.remove(f"{self.done_folder}/{name}")

    def tile_metadata(self, tiles: Iterable[int] | None = None, *,
                      files: Mapping[int, str] | None = None) -> dict[int, dict[str, Any]]:
        """The metadata every finished tile (or each of ``tiles``, finished) left in its marker
        (the marker files are fetched concurrently from object stores); ``files``: a listing
        from :meth:`marker_files`."""
        where = self.marker_files() if files is None else files
        wanted = sorted(where if tiles is None else (int(t) for t in tiles if int(t) in where))
        names = sorted({where[t] for t in wanted})
        found = dict(zip(names, self.folder.read_json_many([f"{self.done_folder}/{n}" for n in names], {})))
        # a batched file maps tile ids to metadata; a lone tile's file is its metadata
        return {t: found[where[t]].get(str(t), {}) if "-" in where[t] else found[where[t]] for t in wanted}

    def done(self) -> set[int]:
        return set(self.marker_files())


LOCK = "lock.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@dataclass
class RunLock:
    """Marks an output as being written, so a second run (or an ``--overwrite``) refuses to
    touch it while the first is running.

    The lock is ``_tilewise/lock.json`` (host, pid, start time, a token). Stores have no atomic
    create-if-absent across local disks and object stores, so the token is read back after
    writing: of two runs starting in the same instant, the one whose token survived goes on.
    A lock left by a run on this host whose process is gone is stale and taken over (logged);
    one from another host is explained, with how to remove it.
    """

    url: str  # the output store
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    token: str = ""
    workspace: str = WORKSPACE

    @property
    def folder(self) -> Folder:
        return Folder(store.join(self.url, self.workspace), self.storage_options)

    def holder(self) -> dict[str, Any] | None:
        """The live lock on this output that is not ours, or None."""
        held = self.folder.read_json(LOCK)
        if not held or held.get("token") == self.token:
            return None
        if held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1))):
            log.warning("taking over a stale lock on %s (process %s on this host is gone)", self.url, held.get("pid"))
            return None
        return held

    def check(self) -> None:
        """Refuse (one line) if another run holds the output."""
        held = self.holder()
        if held is not None:
            raise OutputExistsError(
                f"Output '{self.url}' is being written by another run (process {held.get('pid')} on "
                f"{held.get('host')}, since {held.get('started')}); wait for it to finish, or, if no run is "
                f"writing it, remove {store.join(self.url, self.workspace, LOCK)}.")

    def acquire(self) -> "RunLock":
        self.check()
        self.token = uuid.uuid4().hex
        self.folder.makedirs()
        self.folder.write_json(LOCK, {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                                      "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        time.sleep(0.05)  # let a racing writer's lock land before reading ours back
        if (self.folder.read_json(LOCK) or {}).get("token") != self.token:
            self.token = ""
            self.check()
        return self

    def release(self) -> None:
        if self.token and (self.folder.read_json(LOCK) or {}).get("token") == self.token:
            self.folder.remove(LOCK)
        self.token = ""

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_compatible(url: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> None:
    """Refuse to resume into an output written with other parameters (or by something else)."""
    if old is None:
        raise OutputExistsError(
            f"Output '{url}' exists but holds no tilewise run manifest; pass --overwrite to replace it, "
            "or choose another path."
        )
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed == ["input_fingerprint"]:
        raise OutputExistsError(
            f"The input of '{url}' changed since this output was started (its chunks differ), so finished tiles "
            "would not match the rest; pass --overwrite to start again, or restore the input.")
    if changed:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise OutputExistsError(
            f"Output '{url}' was written by a run with other parameters ({detail}). Re-run with the "
            "original parameters to resume, pass --overwrite to start fresh, or choose another output."
        )
