"""Attribution maps for chosen objects or a region, through the engine, with a cheating check.

``explain(IMAGE, OUT, model=M, method=ig|occlusion|gradcam, objects=[ids] | "all" | region=...)``:

- a *target* is one object of ``IMAGE/labels/<labels>`` (its pixels within a box of twice the
  90th-percentile object diameter around its centroid, as ``embed`` crops) or one region (a
  box in pixels); the model's output averaged over it is explained
  (``kernels.attribution``);
- each target's crop reaches the model's receptive field (plus one occlusion window) beyond
  its box and starts on the network's down-sampling grid, so its map is the one the whole
  image would give, however the image is tiled. Targets are grouped into tasks by the tile that
  owns their centroid; a task reads each of its crops (bounded memory) and runs the
  worker-resident kernel (GPU when there is one); parts and done markers make it resumable;
- ``OUT/attribution/<method>``: a float32 multiscale image, the sum of the targets' maps
  (integrated gradients and occlusion are linear in the target, so where maps overlap this is
  the attribution of the targets' sum); ``OUT/attribution/panels/<method>-<label>.png``: input,
  output and attribution for the first ``panels`` targets;
- ``OUT/tables/attribution_<method>``: one row per target with the source table's columns and
  ``attribution_inside`` (the share of the attribution's absolute mass that lies on the object:
  an object found from its surroundings has a low share: the cheating check), the target at the
  input and at the baseline, and (IG) the completeness error and the points on the path it took
  (``ig_steps``).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kernels import KernelSpec, resident
from kernels.attribution import METHODS
from kernels.errors import KernelError
from kernels.modelfile import model_kernel_spec, read_card
from pipeline.core.errors import InputError, OptionError
from pipeline.engine.manifest import RunManifest
from pipeline.engine.plan import make_plan
from pipeline.engine.runner import EngineOptions, TileReader, image_layout
from pipeline.engine.stats import Normalisation
from pipeline.io import store
from pipeline.io.read import ImageSource, open_image
from pipeline.io.store import Folder
from pipeline.io.tables import INSTANCE_KEY, read_attributes, read_table, write_table
from pipeline.steps.embed import begin_parts_run, crop_shape, even_pixels, find_table, run_owned_tiles

log = logging.getLogger(__name__)

MAX_REGION_PIXELS = 2**24  # one region is one crop in memory (and its gradients)


@dataclass(frozen=True)
class ExplainSummary:
    method: str
    targets: int
    tiles: int
    seconds: float
    image: str
    table: str
    panels: list[str]
    completeness_error_max: float | None  # IG: the largest |sum of attributions - target difference|

    @property
    def seconds_per_target(self) -> float:
        return self.seconds / max(self.targets, 1)


def parse_region(text: str, dims: Sequence[str], shape: Sequence[int]) -> tuple[slice, ...]:
    """``"y0:y1,x0:x1"`` (pixels of the chosen level, one range per spatial axis in order)."""
    try:
        parts = [tuple(int(v) for v in p.split(":")) for p in text.split(",")]
        box = tuple(slice(a, b) for a, b in parts)
    except ValueError:
        box = ()
    if len(box) != len(dims) or any(not 0 <= s.start < s.stop <= n for s, n in zip(box, shape)):
        raise OptionError(f"--region '{text}' must give start:stop in pixels for each of {', '.join(dims)} inside "
                          f"{tuple(shape)}, e.g. {','.join(f'0:{min(n, 64)}' for n in shape)}.")
    if math.prod(s.stop - s.start for s in box) > MAX_REGION_PIXELS:
        raise OptionError(f"--region '{text}' is larger than {MAX_REGION_PIXELS} pixels; explain smaller regions "
                          "(an attribution crop and its gradients are held in memory).")
    return box


def crop_of(box: Sequence[slice], margin: Sequence[int], factor: Sequence[int]) -> tuple[slice, ...]:
    """The box grown by ``margin`` and rounded outwards to the down-sampling grid (global pixels)."""
    return tuple(slice((b.start - m) // f * f, -(-(b.stop + m) // f) * f) for b, m, f in zip(box, margin, factor))


def inside_share(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the absolute attribution mass on the target's own pixels (NaN when all zero)."""
    total = float(np.abs(attribution).sum())
    return float(np.abs(attribution[mask]).sum()) / total if total > 0 else float("nan")


@dataclass(frozen=True)
class ExplainJob:
    """One group of tiles: for each target, read its crop (and labels), run the kernel."""

    reader: TileReader
    labels: TileReader | None
    spec: KernelSpec
    shape: tuple[int, ...]
    manifest: RunManifest
    parts: Folder

    def __call__(self, item: tuple[Sequence[int], Sequence[np.ndarray]]) -> list[dict[str, Any]]:
        tile_ids, targets = item
        with self.manifest.batched():  # one marker file per run of consecutive tiles
            return [self.run_tile(int(t), rows) for t, rows in zip(tile_ids, targets)]

    def read(self, reader: TileReader, crop: Sequence[slice]) -> np.ndarray:
        read = tuple(slice(max(0, c.start), min(n, c.stop)) for c, n in zip(crop, self.shape))
        pad = tuple((max(0, -c.start), max(0, c.stop - n)) for c, n in zip(crop, self.shape))
        return reader.read(read, pad)

    def run_tile(self, tile_id: int, rows: np.ndarray) -> dict[str, Any]:
        """``rows``: per target, its label then box start and stop per axis (global pixels)."""
        started = time.perf_counter()
        kernel = resident(self.spec)
        ndim = len(self.shape)
        out: dict[str, np.ndarray] = {"label": rows[:, 0].astype(np.uint64)}
        for k, row in enumerate(rows):
            box = tuple(slice(int(a), int(b)) for a, b in zip(row[1:1 + ndim], row[1 + ndim:]))
            crop = crop_of(box, kernel.margin, kernel.config.factor)
            image = self.read(self.reader, crop)
            local = tuple(slice(b.start - c.start, b.stop - c.start) for b, c in zip(box, crop))
            mask = np.zeros(image.shape[1:], bool)
            mask[local] = True
            if self.labels is not None:
                mask &= self.read(self.labels, crop)[0] == row[0]
            t0 = time.perf_counter()
            result = kernel.explain(image[None], mask[None], np.asarray([[c.start for c in crop]]))
            out.update({f"{k}/{name}": value[0] for name, value in result.items()})
            out.update({f"{k}/image": image.astype(np.float32), f"{k}/mask": mask,
                        f"{k}/start": np.asarray([c.start for c in crop], np.int64),
                        f"{k}/inside": np.float32(inside_share(result["attribution"][0], mask)),
                        f"{k}/seconds": np.float32(time.perf_counter() - t0)})
        self.parts.write_arrays(f"{tile_id}.npz", **out)
        meta = {"tile": tile_id, "targets": int(len(rows)), "seconds": time.perf_counter() - started}
        self.manifest.mark_done(tile_id, meta)
        return meta


def attribution_spec(model: str, method: str, *, steps: int | None, baseline: str, window: Sequence[int] | None,
                     stride: Sequence[int] | None, level: int | None) -> KernelSpec:
    if method not in METHODS:
        raise OptionError(f"Unknown attribution method '{method}'; choose {', '.join(METHODS)}.")
    try:
        card = read_card(model)
        base = model_kernel_spec(model, card.task, "attribution", "")
    except KernelError as exc:
        raise OptionError(str(exc)) from None
    if card.task not in ("segment", "denoise"):
        raise OptionError(f"'{model}' is a {card.task} model; explain takes segmentation or denoising models.")
    params = {"method": method, "steps": steps, "baseline": baseline, "level": level,
              "window": list(window) if window else None, "stride": list(stride) if stride else None}
    spec = base.with_params(**{k: v for k, v in params.items() if v is not None})
    from kernels import build_kernel

    try:
        build_kernel(spec)
    except (KernelError, ValueError) as exc:
        raise OptionError(str(exc).splitlines()[0]) from None
    return spec


def explain(image_url: str, output_url: str, client: Any, options: EngineOptions | None = None, *, model: str,
            method: str = "ig", objects: Sequence[int] | str | None = None, region: str | None = None,
            labels: str = "nuclei", table: str | None = None, steps: int | None = None, baseline: str = "zero",
            window: float | None = None, stride: float | None = None, level: int | None = None, panels: int = 20,
            **settings: Any) -> ExplainSummary:
    """Explain ``model``'s output on ``objects`` (ids of ``IMAGE/labels/<labels>``, or ``"all"``)
    or on ``region`` (``"y0:y1,x0:x1"`` pixels) with ``method``; see the module docstring.

    ``steps`` (default: 32 per target, doubled until complete: ``kernels.attribution``),
    ``baseline`` (``zero`` or ``blur``): integrated gradients; ``window``, ``stride``:
    occlusion, physical units (default 8 pixels and half of it); ``level``: Grad-CAM's encoder
    level (default the deepest encoder block).
    """
    options = EngineOptions.of(options, **settings)
    so = options.storage_options or {}
    store.check_output_location(output_url, image_url, options.storage_options)
    source = open_image(image_url, options.storage_options)
    _, has_c, spatial = image_layout(source)
    if len(spatial) != len(source.dims) - int(has_c):
        raise InputError(f"'{image_url}' has time or other batch axes; explain one time point at a time.")
    if (objects is None) == (region is None):
        raise OptionError("Name what to explain: --objects IDS (or all) from the labels, or --region y0:y1,x0:x1.")
    lv = source.level(options.level)
    dims = [source.dims[i] for i in spatial]
    scale = tuple(lv.scale[i] for i in spatial)
    shape = tuple(lv.shape[i] for i in spatial)
    window_px = even_pixels(window, scale) if window else None
    stride_px = tuple(max(1, round(stride / s)) for s in scale) if stride else None
    spec = attribution_spec(model, method, steps=steps, baseline=baseline, window=window_px, stride=stride_px,
                            level=level)
    frame, attrs, lab_source = _targets(source, dims, shape, scale, output_url, objects=objects, region=region,
                                        labels=labels, table=table, storage_options=so)
    boxes = np.column_stack([frame[INSTANCE_KEY].to_numpy(np.int64)] +
                            [frame[f"box_start_{d}"].to_numpy(np.int64) for d in dims] +
                            [frame[f"box_stop_{d}"].to_numpy(np.int64) for d in dims])
    plan = make_plan(shape, dims, [lv.chunks[i] for i in spatial], {d: 0 for d in dims},
                     tile_shape=options.tile_shape, itemsize=4 * source.n_channels)
    name = f"attribution_{method}"
    params = {"input": source.url, "level": options.level, "spec": spec.key, "targets": boxes.tolist(),
              "tile_shape": list(plan.tile_shape), "labels": lab_source.url if lab_source is not None else None}
    manifest, lock, parts = begin_parts_run(output_url, params, options, "explain")
    card = read_card(model)
    from kernels.modelfile import card_percentiles

    reader = TileReader(source, options.level, has_c, "reflect", "normalised",
                        Normalisation.of(source, card_percentiles(card)))
    lab_reader = (TileReader(lab_source, options.level, False, "constant", "native", None)
                  if lab_source is not None else None)
    centres = (boxes[:, 1:1 + len(dims)] + boxes[:, 1 + len(dims):]) / 2.0
    owner = plan.owner_of(centres)
    owning = np.unique(owner).tolist()  # only tiles that own a target become tasks
    job = ExplainJob(reader, lab_reader, spec, shape, manifest, parts)
    started = time.perf_counter()
    with lock:
        run_owned_tiles(client, job, owning, boxes, owner, manifest, options, f"explain ({method})")
        seconds = time.perf_counter() - started
        results = _collect(parts, owning, frame)
        image_url = _write_attribution(output_url, source, spatial, options.level, method, results, client,
                                       progress=options.progress, storage_options=so)
        panel_urls = _write_panels(output_url, method, results[:max(0, panels)], card.task, so)
        columns = {"attribution_inside": "inside", "target_value": "value", "baseline_value": "baseline_value",
                   "completeness_error": "completeness_error", "ig_steps": "steps", "seconds": "seconds"}
        frame = frame.assign(**{c: np.asarray([float(r[k]) for r in results], np.float64)
                                for c, k in columns.items()})
        table_url = write_table(output_url, name, frame,
                                {**attrs, "image": store.relative(output_url, source.url), "method": method,
                                 "kernel": spec.params}, storage_options=so)
    errors = [float(r["completeness_error"]) for r in results if np.isfinite(r["completeness_error"])]
    summary = ExplainSummary(method, len(frame), len(plan), seconds, image_url, table_url, panel_urls,
                             max(errors) if errors else None)
    log.info("%s: %d targets explained (%s) in %.1f s", image_url, len(frame), method, seconds)
    return summary


def _targets(source: ImageSource, dims: list[str], shape: tuple[int, ...], scale: tuple[float, ...], output_url: str,
             *, objects, region, labels: str, table: str | None, storage_options: dict):
    """(rows with ``box_start_<d>`` / ``box_stop_<d>``, table attributes, labels or None)."""
    import pandas as pd

    if region is not None:
        box = parse_region(region, dims, shape)
        frame = pd.DataFrame({INSTANCE_KEY: np.zeros(1, np.uint64), "region": "attribution_region"})
        for d, b in zip(dims, box):
            frame[f"centroid_{d}"] = (b.start + b.stop - 1) / 2.0
            frame[f"box_start_{d}"], frame[f"box_stop_{d}"] = b.start, b.stop
        attrs = {"region": "attribution_region", "region_key": "region", "instance_key": INSTANCE_KEY, "axes": dims,
                 "scale": list(scale), "format": "tilewise-table/0.2", "batch_axes": []}
        return frame, attrs, None
    lab_source = source.label(labels)
    name = find_table(source, labels, table, storage_options)
    frame = read_table(source.url, name, storage_options)
    missing = [f"centroid_{d}" for d in dims if f"centroid_{d}" not in frame]
    if missing:
        raise InputError(f"Table '{name}' of '{source.url}' lacks {', '.join(missing)}; explain needs pixel centroids.")
    if objects != "all":
        wanted = [int(i) for i in objects]
        absent = sorted(set(wanted) - set(frame[INSTANCE_KEY].astype(np.int64).tolist()))
        if absent:
            raise OptionError(f"Objects {absent[:10]} are not in labels '{labels}' (table '{name}'); "
                              f"it has {len(frame)} objects.")
        frame = frame[frame[INSTANCE_KEY].astype(np.int64).isin(wanted)].reset_index(drop=True)
    box = crop_shape(frame, scale, None)
    for d, b in zip(dims, box):
        start = np.floor(frame[f"centroid_{d}"].to_numpy(np.float64)).astype(np.int64) - b // 2
        frame[f"box_start_{d}"], frame[f"box_stop_{d}"] = start, start + b
    attrs = {**read_attributes(source.url, name, storage_options),
             "labels_path": store.relative(output_url, lab_source.url).rstrip("/")}
    return frame, attrs, lab_source


def _collect(parts: Folder, tiles: list[int], frame) -> list[dict[str, Any]]:
    """Every target's arrays, in the order of ``frame``'s rows."""
    found: dict[int, dict[str, Any]] = {}
    for t in tiles:
        arrays = parts.read_arrays(f"{t}.npz")
        for k, label in enumerate(arrays["label"]):
            found[int(label)] = {key.split("/", 1)[1]: arrays[key] for key in arrays if key.startswith(f"{k}/")}
            found[int(label)]["label"] = int(label)
    return [found[int(i)] for i in frame[INSTANCE_KEY].to_numpy()]


def _write_attribution(output_url: str, source: ImageSource, spatial: list[int], level: int, method: str,
                       results: list[dict[str, Any]], client: Any, *, progress: bool, storage_options: dict) -> str:
    """``OUT/attribution/<method>``: the targets' maps added up crop by crop on the client (a
    crop at a time in memory; few targets), then the pyramid."""
    from pipeline.engine.pyramid import finalize_image
    from pipeline.io.write import create_image

    lv = source.level(level)
    url = store.join(output_url, "attribution", method)
    sink = create_image(url, shape=[lv.shape[i] for i in spatial], dtype=np.float32,
                        axes=[source.axes[i] for i in spatial], scale=[lv.scale[i] for i in spatial],
                        translation=[lv.translation[i] for i in spatial], chunks=[lv.chunks[i] for i in spatial],
                        overwrite=True, storage_options=storage_options, name=f"attribution ({method})")
    array = sink.array(0)
    shape = tuple(lv.shape[i] for i in spatial)
    for r in results:
        start, attr = r["start"], r["attribution"]
        region = tuple(slice(max(0, s), min(n, s + a)) for s, a, n in zip(start, attr.shape, shape))
        local = tuple(slice(g.start - s, g.stop - s) for g, s in zip(region, start))
        array[region] = array[region] + attr[local]
    finalize_image(sink, client, progress=progress)
    return url


def _write_panels(output_url: str, method: str, results: list[dict[str, Any]], task: str,
                  storage_options: dict) -> list[str]:
    """One PNG per target: input, model output with the target's outline, attribution overlay
    (the middle plane of a 3D crop)."""
    from pipeline.analysis.report import pyplot

    plt = pyplot()

    folder = Folder(store.join(output_url, "attribution", "panels"), storage_options)
    folder.makedirs()
    urls = []
    for r in results:
        image, mask, out, attr = r["image"], r["mask"], r["output"], r["attribution"]
        if mask.ndim == 3:
            z = int(np.argmax(mask.sum((1, 2)))) if mask.any() else mask.shape[0] // 2
            image, mask, out, attr = image[:, z], mask[z], out[z], attr[z]
        grey = image.mean(0)
        shown = np.moveaxis(np.clip(image, 0, 1), 0, -1) if image.shape[0] == 3 else grey
        limit = float(np.abs(attr).max()) or 1.0
        fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
        axes[0].imshow(shown, cmap=None if image.shape[0] == 3 else "gray", vmin=0, vmax=1)
        axes[0].set_title("input")
        axes[1].imshow(out, cmap="magma")
        axes[1].set_title("interior probability" if task == "segment" else "denoised")
        axes[2].imshow(grey, cmap="gray")
        axes[2].imshow(attr, cmap="inferno" if method == "gradcam" else "RdBu_r", alpha=0.6,
                       vmin=0 if method == "gradcam" else -limit, vmax=limit)
        axes[2].set_title(f"{method}: {100 * r['inside']:.0f}% on the object" if np.isfinite(r["inside"]) else method)
        for ax in axes[1:]:
            if mask.any() and not mask.all():
                ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
        for ax in axes:
            ax.set_axis_off()
        fig.suptitle(f"target {r['label']}: value {float(r['value']):.3f}, baseline {float(r['baseline_value']):.3f}")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80)
        plt.close(fig)
        name = f"{method}-{r['label']}.png"
        with folder.open(name, "wb") as fh:
            fh.write(buffer.getvalue())
        urls.append(store.join(folder.url, name))
    return urls
