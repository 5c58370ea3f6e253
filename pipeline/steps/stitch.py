"""Globally stitched instance labels: unique ids without a serial chain, IoU matching in the
halos, union-find on the sparse match edges, and a chunk-aligned relabel pass.

Three passes over the tiles, each a set of independent tasks that talk only through storage
(``docs/architecture.md``, invariants 1, 2 and 8):

1. **Segment** (:class:`LabelTileJob`). A tile's kernel labels its whole core + halo. Objects
   present in the core are numbered ``1..n`` first, so a tile's ids are consecutive; the global
   id is ``tile_id << 32 | local``: unique with no coordination. The block's local ids go to a
   small per-tile file (the "shell": its halo part is matched, its core relabelled), the
   halo-wide rims of its core (what neighbours match against) to another, and per-object
   partial sums for the table (``pipeline.steps.measure``). No shared array is written: a zarr
   call costs milliseconds of event-loop hand-off, and these files are read whole by one task.
2. **Match** (:class:`MatchTask`). For each neighbour B of tile A, inside the region where A's
   halo overlaps B's core, A's labels are compared with what B wrote (B's rim file): object
   pairs with IoU >= ``iou`` (0.5 makes matches one-to-one) become edges. Objects are matched by overlap *inside
   the halo*, not by touching faces, so two different objects that touch across a tile border
   are never merged. The edges (a few per object on tile borders) go to the client.
3. **Relabel** (:class:`RelabelTask`). The client runs union-find over the edges
   (:func:`resolve`) - cost near-linear in *stitched* objects - and gives each tile task only its
   own part of the answer: the final ids of its merged objects and the offset of its consecutive
   range. The task rewrites its core chunks, finishes the table rows of objects that live only in
   that tile, and leaves the partial rows of stitched objects for the client to sum.

A tile's objects that reach the outer edge of its halo are counted and reported: such objects
are larger than the halo, and their shape can differ between tiles (raise the halo).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from kernels import Kernel, KernelSpec
from kernels.metrics import overlap_iou
from pipeline.core.regions import Region
from pipeline.engine.fused import FusedSource
from pipeline.engine.manifest import WORKSPACE, RunManifest
from pipeline.engine.maps import MapSinks
from pipeline.engine.plan import Tile, TilePlan
from pipeline.engine.runner import (
    TileReader,
    TileRows,
    TileSpace,
    apply_kernel_with_maps,
    batch_slices,
    block_origin,
    checksum,
    run_batches,
    valid_region,
)
from pipeline.io import store
from pipeline.io.store import Folder
from pipeline.io.tables import INSTANCE_KEY, TableSpec, write_part
from pipeline.steps.measure import finish, partial_stats

log = logging.getLogger(__name__)

LOCAL_BITS = 32
LOCAL_MASK = np.uint64((1 << LOCAL_BITS) - 1)
MAX_TILES = 1 << 31  # ids stay below 2^63, so they survive int64 round trips (Parquet, pandas)


def global_ids(tile_id: int, local: np.ndarray) -> np.ndarray:
    """``tile_id << 32 | local`` for nonzero ``local``; background stays 0."""
    out = local.astype(np.uint64)
    out[local > 0] |= np.uint64(tile_id) << np.uint64(LOCAL_BITS)
    return out


def tile_of(ids: np.ndarray) -> np.ndarray:
    return (ids >> np.uint64(LOCAL_BITS)).astype(np.int64)


def local_of(ids: np.ndarray) -> np.ndarray:
    return (ids & LOCAL_MASK).astype(np.int64)


def renumber_core_first(labels: np.ndarray, core: Region) -> tuple[np.ndarray, int]:
    """Renumber a block's labels so the ``n`` objects present in ``core`` are ``1..n`` (in the
    order of their old ids) and the objects seen only in the halo follow; returns (uint32, n)."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"a labels kernel must return integer labels, got {labels.dtype}")
    top = int(labels.max(initial=0))
    dense = top <= 4 * labels.size  # small ids: count them; sparse ids: sort them
    if dense:
        present = np.bincount(labels.ravel(), minlength=top + 1) > 0
        in_core = np.bincount(labels[core].ravel(), minlength=top + 1) > 0
        ids = np.flatnonzero(present)
        ids_core = np.flatnonzero(in_core)
    else:
        ids = np.unique(labels)
        ids_core = np.unique(labels[core])
    ids, ids_core = ids[ids > 0], ids_core[ids_core > 0]
    halo_only = np.setdiff1d(ids, ids_core, assume_unique=True)
    order = np.concatenate([ids_core, halo_only])
    new = np.empty(labels.shape, np.uint32)
    if dense:
        lut = np.zeros(top + 1, np.uint32)
        lut[order] = np.arange(1, len(order) + 1, dtype=np.uint32)
        new[...] = lut[labels]
    else:
        sorter = np.argsort(order)
        pos = np.searchsorted(order, labels, sorter=sorter)
        pos = np.minimum(pos, len(order) - 1)
        hit = order[sorter[pos]] == labels
        new[...] = np.where(hit, sorter[pos] + 1, 0)
    return new, len(ids_core)


def intersect(a: Region, b: Region) -> Region | None:
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
    return out if all(sl.stop > sl.start for sl in out) else None


def shift(region: Region, origin: Sequence[int]) -> Region:
    return tuple(slice(sl.start - o, sl.stop - o) for sl, o in zip(region, origin))


@dataclass(frozen=True)
class StitchFiles:
    """The per-tile files the passes share, under ``_tilewise/stitch``."""

    output_url: str
    storage_options: Mapping[str, Any]
    workspace: str = WORKSPACE

    @property
    def folder(self) -> Folder:
        return Folder(store.join(self.output_url, self.workspace, "stitch"), self.storage_options)

    def begin(self) -> None:
        for kind in ("shell", "partial", "merged", "rim"):
            self.folder.makedirs(kind)

    def save(self, kind: str, tile_id: int, **arrays: np.ndarray) -> None:
        self.folder.write_arrays(f"{kind}/{int(tile_id)}.npz", **arrays)

    def load(self, kind: str, tile_id: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return self.folder.read_arrays(f"{kind}/{int(tile_id)}.npz", keys)

    def save_merged_rows(self, tile_id: int, rows: Mapping[str, np.ndarray]) -> None:
        """Partial table rows of a tile's stitched objects (columns of one length), for the
        client to sum."""
        self.folder.write_arrays(f"merged/{int(tile_id)}.npz", **rows)

    def merged_rows(self) -> Iterator[dict[str, np.ndarray]]:
        """Each tile's partial rows of stitched objects (columns), one tile at a time.

        Column arrays, not a small Parquet file per tile through pandas: at 10^6 objects reading
        1,024 of those grew the client by 82 MB for a 23 MB frame, and it took 2.3 ms of each
        relabel task's tile to write one."""
        for name in self.folder.iter_files("merged"):
            yield self.folder.read_arrays(name)

    def remove(self) -> None:
        self.folder.remove()


def rim_slabs(core: np.ndarray, halo: Sequence[int]) -> dict[str, np.ndarray]:
    """The ``halo``-wide slabs of a tile's core on each face (``<axis>_lo``, ``<axis>_hi``):
    everything of this core that a neighbour's halo can overlap, so the match pass reads them
    from one small file (zarr slabs of a shared array cost ~4 ms a read: 61 % of a stitch run
    once waited on zarr calls)."""
    out = {}
    for axis, h in enumerate(halo):
        n = core.shape[axis]
        out[f"{axis}_lo"] = np.take(core, range(min(h, n)), axis=axis)
        out[f"{axis}_hi"] = np.take(core, range(max(0, n - h), n), axis=axis)
    return out


def rim_face(step: Sequence[int]) -> tuple[int, str]:
    """The rim slab a neighbour at ``-step`` reads: the face along the first axis it differs on
    (the low face when the neighbour lies before the core on that axis)."""
    axis = next(k for k, s in enumerate(step) if s)
    return axis, "lo" if step[axis] > 0 else "hi"


def rim_key(step: Sequence[int]) -> str:
    axis, side = rim_face(step)
    return f"{axis}_{side}"


def from_rims(rims: Mapping[str, np.ndarray], region: Region, core: Region, step: Sequence[int],
              halo: Sequence[int]) -> np.ndarray:
    """``region`` (global coordinates, inside ``core``) cut from the rim slabs of the tile that
    owns ``core``, seen from the neighbour at ``-step``."""
    slab = rims[rim_key(step)]
    axis, side = rim_face(step)
    n, h = core[axis].stop - core[axis].start, halo[axis]
    start = [sl.start for sl in core]
    start[axis] = core[axis].start if side == "lo" else core[axis].start + max(0, n - h)
    local = shift(region, start)
    if any(sl.start < 0 or sl.stop > size for sl, size in zip(local, slab.shape)):
        raise ValueError(f"region {region} is not inside the {rim_key(step)} rim of core {core} (halo {halo})")
    return slab[local]


def reaches_halo_edge(local: np.ndarray, n_core: int, read: Region, shape: Sequence[int]) -> int:
    """How many core objects touch a face of the read block that is not the volume edge: they
    extend beyond the halo, so this tile saw them cut off."""
    faces = []
    for axis, (sl, n) in enumerate(zip(read, shape)):
        if sl.start > 0:
            faces.append(np.take(local, 0, axis=axis).ravel())
        if sl.stop < n:
            faces.append(np.take(local, -1, axis=axis).ravel())
    if not faces:
        return 0
    ids = np.unique(np.concatenate(faces))
    return int(np.count_nonzero((ids > 0) & (ids <= n_core)))


@dataclass(frozen=True)
class LabelTileJob:
    """Pass 1: label each tile's core + halo, write global ids, the shell and partial sums."""

    kernel: KernelSpec
    reader: TileReader
    plan: TilePlan
    manifest: RunManifest
    files: StitchFiles
    dims: tuple[str, ...]
    batch: int = 1
    measure_intensity: bool = True
    batch_shape: tuple[int, ...] = ()  # time points (and custom axes): each labelled on its own
    maps: MapSinks | None = None  # the kernel's maps (uncertainty): written per core, measured per object

    def __call__(self, tile_ids: Sequence[int]) -> list[dict[str, Any]]:
        with self.manifest.batched():  # one marker file per run of consecutive tiles
            return run_batches(self.kernel, tile_ids, self.batch, self.run_batch,
                               rows=TileRows(self.reader, TileSpace(self.plan, self.batch_shape)))

    def edge_pad(self, tile: Tile) -> tuple[tuple[int, int], ...]:
        """A full halo of padding wherever the read block meets the volume edge.

        Instance labelling is not local: a watershed flooding an object that touches the volume
        edge sees the padding even when the tile's core is a halo away from that edge. Padding
        every edge-touching block by the full halo makes each tile see the edge exactly as the
        untiled run does.
        """
        return tuple((h if r.start == 0 else 0, h if r.stop == n else 0)
                     for r, h, n in zip(tile.read, self.plan.halo, self.plan.shape))

    def run_batch(self, model: Kernel, ids: list[int]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        space = TileSpace(self.plan, self.batch_shape)
        located = [space.locate(g) for g in ids]
        tiles = [tile for _, tile in located]
        missing = [self.reader.missing(tile.read, at) for at, tile in located]  # before any work
        pads = [self.edge_pad(tile) for tile in tiles]
        if isinstance(self.reader.source, FusedSource):  # a fused chain: the first step's output, its cores kept
            raw = self.reader.source.read_owned([(g, at, tile) for g, (at, tile) in zip(ids, located)], missing)
            blocks = [self.reader.prepare(block, pad, tile.read, len(at))
                      for block, (at, tile), pad in zip(raw, located, pads)]
        else:
            blocks = [self.reader.read(tile.read, pad, at) for (at, tile), pad in zip(located, pads)]
        outputs = apply_kernel_with_maps(model, blocks, valid=[valid_region(t.read, p) for t, p in zip(tiles, pads)],
                                         origins=[block_origin(t.read, p) for t, p in zip(tiles, pads)],
                                         scaling=self.reader.scaling, batch=self.batch)
        seconds = (time.perf_counter() - started) / len(tiles)
        return [self.finish_tile(g, at, tile, pad, block, out[0], seconds, n_missing, maps)
                for g, (at, tile), pad, block, (out, maps), n_missing in zip(ids, located, pads, blocks, outputs, missing)]

    def finish_tile(self, g: int, at: tuple[int, ...], tile: Tile, pad: tuple[tuple[int, int], ...],
                    block: np.ndarray, labels: np.ndarray, seconds: float, missing: int = 0,
                    maps: np.ndarray | None = None) -> dict[str, Any]:
        """One tile's labels (global tile id ``g``, batch index ``at``) into its shell, its rims
        and its partial table rows; its maps' core into the map images."""
        unpadded = valid_region(tile.read, pad)
        core_in_read = shift(tile.core, [sl.start for sl in tile.read])
        local, n_core = renumber_core_first(labels[unpadded], core_in_read)
        core = local[core_in_read]
        core_maps = None
        if self.maps is not None and maps is not None:
            core_maps = maps[(slice(None),) + shift(tile.core, block_origin(tile.read, pad))]
            self.maps.write(batch_slices(at), tile.core, core_maps)
        # the whole read block's local ids: the halo for matching, the core for relabelling
        # (stored in the smallest unsigned type that holds them: half the bytes to compress)
        small = local.astype(np.min_scalar_type(int(local.max(initial=0))), copy=False)
        self.files.save("shell", g, labels=small, start=np.array([sl.start for sl in tile.read]),
                        n_core=np.array(n_core))
        self.files.save("rim", g, **rim_slabs(small[core_in_read], self.plan.halo))
        intensity = None
        if self.measure_intensity:
            intensity = block[(slice(None),) + shift(tile.core, block_origin(tile.read, pad))]
            if self.reader.input == "normalised" and self.reader.scaling is not None:
                intensity = self.reader.scaling.invert(intensity)
        partial = partial_stats(core, n_core, [sl.start for sl in tile.core], self.dims, intensity,
                                batch=dict(zip(self.batch_names, at)),
                                maps=None if core_maps is None else dict(zip(self.maps.names, core_maps)))
        self.files.save("partial", g, **partial)
        meta = {"tile": g, "voxels": int(np.prod(tile.core_shape)), "seconds": seconds, "objects": n_core,
                "missing_input_chunks": missing,
                "halo_edge_objects": reaches_halo_edge(local, n_core, tile.read, self.plan.shape)}
        self.manifest.mark_done(g, meta)
        return meta

    @property
    def batch_names(self) -> tuple[str, ...]:
        return tuple(self.reader.source.dims[i] for i in range(len(self.batch_shape)))


def neighbours(plan: TilePlan, tile: Tile) -> Iterator[Tile]:
    """The up to 3^d - 1 tiles around ``tile`` (faces, edges and corners)."""
    for step in itertools.product((-1, 0, 1), repeat=len(plan.grid)):
        index = tuple(i + s for i, s in zip(tile.index, step))
        if any(step) and all(0 <= i < g for i, g in zip(index, plan.grid)):
            yield plan.tile(int(np.ravel_multi_index(index, plan.grid)))


def match_pairs(a: np.ndarray, b: np.ndarray, iou: float) -> np.ndarray:
    """``(k, 2)`` pairs of local ids (a, b), both < 2^32, whose IoU inside this region is >= ``iou``."""
    pa, pb, pair_iou = overlap_iou(a, b)
    keep = pair_iou >= iou
    return np.stack([pa[keep], pb[keep]], axis=1)


@dataclass(frozen=True)
class MatchTask:
    """Pass 2: edges between this tile's core objects and its neighbours' objects, by IoU of
    their overlap inside this tile's halo."""

    plan: TilePlan
    files: StitchFiles
    iou: float = 0.5
    batch_shape: tuple[int, ...] = ()  # objects are matched within one time point, never across

    def _rims(self, tile_id: int, step: Sequence[int], seen: dict) -> Mapping[str, np.ndarray]:
        """The one rim slab of ``tile_id`` that the neighbour at ``-step`` overlaps (the others
        stay compressed: decompressing all 2·d was most of the match pass), loaded once per
        task (``seen``: tiles of one task share neighbours)."""
        key = (tile_id, rim_key(step))
        if key not in seen:
            try:
                seen[key] = self.files.load("rim", tile_id, [key[1]])
            except FileNotFoundError:
                seen[key] = {}
        return seen[key]

    def __call__(self, tile_ids: Sequence[int]) -> list[np.ndarray]:
        space = TileSpace(self.plan, self.batch_shape)
        seen: dict = {}
        out = []
        for g in tile_ids:
            at, tile = space.locate(g)
            base = int(g) - tile.id  # global id of this batch index's first tile
            shell = self.files.load("shell", g)
            labels, start, n_core = shell["labels"], shell["start"], int(shell["n_core"])
            edges = [np.empty((0, 2), np.uint64)]
            for other in neighbours(self.plan, tile):
                region = intersect(tile.read, other.core)
                if region is None:
                    continue
                mine = labels[shift(region, start)]
                mine = np.where(mine <= n_core, mine, 0)  # halo-only objects belong to other tiles' cores
                step = tuple(o - t for o, t in zip(other.index, tile.index))
                rims = self._rims(base + other.id, step, seen)  # none: a tile not computed (outside the mask)
                theirs = from_rims(rims, region, other.core, step, self.plan.halo) if rims else np.zeros_like(mine)
                pairs = match_pairs(mine, theirs.reshape(mine.shape).astype(np.int64), self.iou)
                edges.append(np.stack([global_ids(g, pairs[:, 0]), global_ids(base + other.id, pairs[:, 1])], axis=1))
            out.append(np.unique(np.concatenate(edges), axis=0))
        return out


@dataclass(frozen=True)
class Resolution:
    """The union-find answer: every id on a stitched object, its final id and whether it is
    its component's root (smallest id); plus each tile's offset in the consecutive numbering."""

    ids: np.ndarray  # sorted uint64 global ids that are part of a stitched object
    final: np.ndarray  # their final ids
    is_root: np.ndarray
    offsets: np.ndarray | None  # per tile (consecutive numbering), else None
    n_objects: int

    def for_tile(self, tile_id: int) -> dict[str, Any]:
        """This tile's part only: no task ever receives the whole table."""
        lo = np.searchsorted(self.ids, np.uint64(tile_id) << np.uint64(LOCAL_BITS))
        hi = np.searchsorted(self.ids, np.uint64(tile_id + 1) << np.uint64(LOCAL_BITS))
        return {"merged": local_of(self.ids[lo:hi]), "final": self.final[lo:hi],
                "nonroot": local_of(self.ids[lo:hi][~self.is_root[lo:hi]]),
                "offset": int(self.offsets[tile_id]) if self.offsets is not None else None}


def resolve(edges: np.ndarray, objects_per_tile: np.ndarray, consecutive: bool = True) -> Resolution:
    """Union-find over the match edges (connected components of a sparse graph).

    Each component's root is its smallest id. With ``consecutive``, final ids are 1..N in tile
    order: tile T's unmerged objects and roots keep their order after an offset that is the
    prefix sum of the roots in earlier tiles. Cost O(E log E) in the number of edges.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_tiles = len(objects_per_tile)
    edges = np.asarray(edges, np.uint64).reshape(-1, 2)
    ids, inverse = np.unique(edges, return_inverse=True)
    inverse = inverse.reshape(-1, 2)
    n = len(ids)
    graph = coo_matrix((np.ones(len(edges), np.int8), (inverse[:, 0], inverse[:, 1])), shape=(n, n))
    n_comp, comp = connected_components(graph, directed=False)
    roots = np.full(n_comp, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(roots, comp, ids)
    root = roots[comp]
    is_root = root == ids
    nonroot_tiles = tile_of(ids[~is_root])
    dropped = np.bincount(nonroot_tiles, minlength=n_tiles) if n_tiles else np.zeros(0, np.int64)
    if not consecutive:
        return Resolution(ids, root, is_root, None, int(np.sum(objects_per_tile) - len(nonroot_tiles)))
    kept = np.asarray(objects_per_tile, np.int64) - dropped
    offsets = np.concatenate([[0], np.cumsum(kept)[:-1]]).astype(np.int64)
    nonroots = ids[~is_root]  # sorted, since ids is
    r_tile = tile_of(root)
    # rank of each root among its tile's surviving ids: local - (non-roots of that tile below it)
    below = np.searchsorted(nonroots, root) - np.searchsorted(nonroots, r_tile.astype(np.uint64) << np.uint64(LOCAL_BITS))
    final = (offsets[r_tile] + local_of(root) - below).astype(np.uint64)
    return Resolution(ids, final, is_root, offsets, int(kept.sum()))


def tile_lut(tile_id: int, n_core: int, part: Mapping[str, Any]) -> np.ndarray:
    """Local id -> final id for one tile (index 0 stays background)."""
    local = np.arange(n_core + 1, dtype=np.int64)
    if part["offset"] is None:
        lut = global_ids(tile_id, local)
    else:
        lut = (part["offset"] + local - np.searchsorted(part["nonroot"], local)).astype(np.uint64)
    lut[part["merged"]] = part["final"]
    lut[0] = 0
    return lut


@dataclass(frozen=True)
class RelabelTask:
    """Pass 3: write a tile's final ids and finish the table rows of its unstitched objects."""

    plan: TilePlan
    files: StitchFiles
    sink: Any  # ImageSink of the labels image
    manifest: RunManifest
    table_url: str | None
    table_spec: TableSpec | None
    batch_shape: tuple[int, ...] = ()

    def __call__(self, item: tuple[Sequence[int], Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
        with self.manifest.batched():  # one marker file per run of consecutive tiles
            return self.relabel(*item)

    def relabel(self, tile_ids: Sequence[int], parts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        import pandas as pd

        dtype = np.dtype(self.sink.levels[0].dtype)
        space = TileSpace(self.plan, self.batch_shape)
        results = []
        for g, part in zip(tile_ids, parts):
            at, tile = space.locate(g)
            partial = self.files.load("partial", g)
            n_core = len(partial["voxels"])
            lut = tile_lut(int(g), n_core, part)
            shell = self.files.load("shell", g, ["labels", "start"])
            local = shell["labels"][shift(tile.core, shell["start"])]
            final = lut[local].astype(dtype).reshape((1,) * len(at) + local.shape)
            self.sink.write(batch_slices(at) + tile.core, final)
            if self.table_url is not None and n_core:
                columns = {INSTANCE_KEY: lut[1:].astype(np.int64), **partial}
                stitched = np.zeros(n_core, bool)
                stitched[np.asarray(part["merged"], np.int64) - 1] = True
                if (~stitched).any():
                    rows = pd.DataFrame({key: values[~stitched] for key, values in columns.items()})
                    write_part(self.table_url, str(g), finish(rows, self.table_spec), self.table_spec,
                               self.files.storage_options)
                if stitched.any():
                    self.files.save_merged_rows(int(g), {key: values[stitched] for key, values in columns.items()})
            meta = {"tile": int(g), "objects": n_core, "stitched": int(len(part["merged"])),
                    "checksum": checksum(final)}
            self.manifest.mark_done(int(g), meta)
            results.append(meta)
        return results
