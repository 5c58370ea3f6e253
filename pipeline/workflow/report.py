"""The workflow's HTML report: one self-contained page (figures inline as PNG), so it opens
offline, mails and archives as one file.

Figures come from one plane (the middle of each non-yx axis) of the coarsest pyramid level
that still has at least ``VIEW_PIXELS`` pixels across, so the report reads a bounded amount
whatever the volume's size; the embedding map samples at most ``MAP_ROWS`` objects.
"""

from __future__ import annotations

import html
import json
import numpy as np

from pipeline.analysis.report import object_map, png_data_uri, pyplot
from pipeline.io import store
from pipeline.io.read import ImageSource, open_image
from pipeline.io.store import Folder
from pipeline.workflow.context import Context
from pipeline.workflow.spec import Embed, Evaluate, Segment

VIEW_PIXELS = 512  # the plane shown is read at the coarsest level with at least this many pixels across
MAP_ROWS = 5000


def _view_level(source: ImageSource) -> int:
    ys = [lv.shape[source.dims.index("y")] for lv in source.levels]
    fine_enough = [k for k, n in enumerate(ys) if n >= VIEW_PIXELS]
    return fine_enough[-1] if fine_enough else 0


def plane(source: ImageSource, level: int | None = None, at: dict[str, int] | None = None) -> np.ndarray:
    """One yx plane (channels last, at most 3) of a bounded level: at index ``at[axis]`` of each
    other axis, by default the middle."""
    level = _view_level(source) if level is None else level
    shape = source.level(level).shape
    region = []
    for d, n in zip(source.dims, shape):
        k = min((at or {}).get(d, n // 2), n - 1)
        region.append(slice(0, min(n, 3)) if d == "c" else slice(None) if d in ("y", "x") else slice(k, k + 1))
    data = source.read(tuple(region), level)
    keep = [i for i, d in enumerate(source.dims) if d in ("c", "y", "x")]
    data = data.reshape([data.shape[i] for i in keep])
    if "c" in source.dims:
        data = np.moveaxis(data, 0, -1)
        data = data[..., 0] if data.shape[-1] < 3 else data
    return data


def best_plane(labels: ImageSource, level: int, candidates: int = 9) -> dict[str, int]:
    """The z index (of ``candidates`` evenly spaced planes) with the most labelled pixels, so the
    figures show objects; other non-yx axes stay at their middle."""
    if "z" not in labels.dims:
        return {}
    n = labels.level(level).shape[labels.dims.index("z")]
    picks = sorted({int(round(v)) for v in np.linspace(0, n - 1, min(candidates, n))})
    counts = [np.count_nonzero(plane(labels, level, {"z": z})) for z in picks]
    return {"z": picks[int(np.argmax(counts))]}


def _contrast(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [1, 99.8]) if image.size else (0, 1)
    return np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)


def _figure(panels: list[tuple[str, np.ndarray, str | None]]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, image, cmap) in zip(axes[0], panels):
        ax.imshow(image, cmap=cmap, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    return png_data_uri(fig)


def _overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Object outlines in colour over the (grey) image."""
    from skimage.segmentation import find_boundaries

    grey = _contrast(image if image.ndim == 2 else image.mean(-1))
    rgb = np.repeat(grey[..., None], 3, -1)
    rng = np.random.default_rng(0)
    ids, dense = np.unique(labels, return_inverse=True)  # ids may be sparse (up to 2^64)
    dense = dense.reshape(labels.shape)
    colours = rng.uniform(0.2, 1.0, (len(ids), 3))
    inside = labels > 0
    rgb[inside] = 0.55 * rgb[inside] + 0.45 * colours[dense[inside]]
    edge = find_boundaries(labels, mode="inner")
    rgb[edge] = colours[dense[edge]]
    return rgb


def _images(ctx: Context) -> list[str]:
    so = ctx.options.storage_options
    source = open_image(ctx.input_url, so)
    level = _view_level(source)
    segments = [s for s in ctx.workflow.steps if isinstance(s, Segment)]
    out = open_image(ctx.output_url, so) if ctx.workflow.denoise_step() is not None or segments else None
    at = best_plane(out.label(segments[0].name), level) if segments else {}
    raw = plane(source, level, at)
    panels: list[tuple[str, np.ndarray, str | None]] = [("input", _contrast(raw), "gray")]
    if ctx.workflow.denoise_step() is not None:
        panels.append(("denoised", _contrast(plane(out, level, at)), "gray"))
    figures = [_figure(panels)]
    maps_url = store.join(ctx.output_url, "uncertainty")
    for step in segments:
        labels = plane(out.label(step.name), level, at)
        panels = [(f"labels '{step.name}'", _overlay(plane(out, level, at), labels), None)]
        if store.exists(maps_url, so) and step.model:
            names = dict(store.open_group_readonly(maps_url, so).attrs).get("tilewise", {}).get("maps", [])
            for name in names[:2]:
                panels.append((f"uncertainty: {name}", plane(open_image(store.join(maps_url, name), so), level, at),
                               "magma"))
        figures.append(_figure(panels))
    return figures


def _embedding_maps(ctx: Context) -> list[str]:
    from pipeline.io.tables import embedding_columns, embedding_matrix, read_table

    figures = []
    for step in ctx.workflow.steps:
        if not isinstance(step, Embed):
            continue
        frame = read_table(ctx.output_url, step.labels, ctx.options.storage_options)
        if len(frame) > MAP_ROWS:
            frame = frame.sample(MAP_ROWS, random_state=0)
        columns = embedding_columns(frame)
        chosen = [c for c in ("embed_trained", "embed_untrained_0", "embed_structure") if c in columns] or columns[:1]
        groups = frame["class"].astype(str).to_numpy() if "class" in frame else np.full(len(frame), "object")
        for column in chosen:
            if len(frame) >= 3:
                figures.append(object_map(embedding_matrix(frame, column), groups, f"{step.labels}: {column}"))
    return figures


def _scores(ctx: Context) -> list[tuple[str, dict]]:
    folder = Folder(store.join(ctx.output_url, "reports"), ctx.options.storage_options or {})
    return [(s.name, folder.read_json(f"{s.name}/evaluation.json") or {}) for s in ctx.workflow.steps
            if isinstance(s, Evaluate)]


def _timings(ctx: Context) -> list[tuple[str, str, float]]:
    folder = Folder(store.join(ctx.output_url, "_tilewise", "workflow"), ctx.options.storage_options or {})
    rows = []
    for step in ctx.workflow.steps:
        done = folder.read_json(f"{step.name}.json")
        if done is not None:
            rows.append((step.name, step.step, float(done["seconds"])))
    return rows


def render(ctx: Context) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(ctx.workflow.name)}: tilewise</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "th{background:#eee}</style></head><body>",
             f"<h1>{e(ctx.workflow.name)}</h1><p>{e(ctx.workflow.description)}</p>",
             f"<p>input <code>{e(ctx.input_url)}</code> &rarr; output <code>{e(ctx.output_url)}</code>; open it "
             f"with <code>napari --plugin napari-ome-zarr {e(ctx.output_url)}</code></p>", "<h2>Images</h2>"]
    parts += [f"<img alt='images' src='{src}'>" for src in _images(ctx)]
    maps = _embedding_maps(ctx)
    if maps:
        parts.append("<h2>Embeddings</h2>")
        parts += [f"<img alt='embedding map' src='{src}'>" for src in maps]
    for name, scores in _scores(ctx):
        shown = {k: scores.get(k) for k in ("dice", "iou", "acc50", "ece", "auroc") if k in scores}
        parts.append(f"<h2>Scores against ground truth ({e(name)})</h2><table><tr>"
                     + "".join(f"<th>{e(k)}</th>" for k in shown) + "</tr><tr>"
                     + "".join(f"<td>{v:.3f}</td>" if isinstance(v, (int, float)) else f"<td>{e(json.dumps(v))}</td>"
                               for v in shown.values()) + "</tr></table>")
    rows = _timings(ctx)
    parts.append("<h2>Steps</h2><table><tr><th>step</th><th>kind</th><th>seconds</th></tr>"
                 + "".join(f"<tr><td>{e(n)}</td><td>{e(k)}</td><td>{s:.1f}</td></tr>" for n, k, s in rows)
                 + f"<tr><th>total</th><th></th><th>{sum(s for *_, s in rows):.1f}</th></tr></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(ctx: Context, *, name: str = "report") -> str:
    """``OUT/reports/<name>.html``; returns its URL."""
    folder = Folder(store.join(ctx.output_url, "reports"), ctx.options.storage_options or {})
    folder.makedirs()
    with folder.open(f"{name}.html", "wb") as f:
        f.write(render(ctx).encode())
    return store.join(folder.url, f"{name}.html")

