"""A self-contained HTML report of an embedding analysis: every figure inline (PNG as base64),
so the one file can be mailed, archived or opened offline.

Sections: the scores of every embedding beside the baselines (and as a difference over the best
baseline), mAP as a bar chart with baselines in grey, the confound table, a 2D map of the
objects per embedding (PCA; UMAP when ``umap-learn`` is installed) coloured by group, and a
gallery of example crops per group.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Mapping, Sequence

import numpy as np

from pipeline.analysis.representation import BASELINES


def png_data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_baseline(name: str) -> bool:
    return name.startswith(BASELINES)


def map_chart(scores: Mapping[str, Mapping[str, float]]) -> str:
    plt = pyplot()
    names = list(scores)
    values = [scores[n].get("map", np.nan) for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names)), 3))
    ax.bar(range(len(names)), values, color=["0.65" if is_baseline(n) else "tab:blue" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylabel("mAP (same group)")
    ax.set_title("retrieval mAP; grey = baselines")
    return png_data_uri(fig)


def object_map(vectors: np.ndarray, groups: Sequence, title: str) -> str:
    """2D map of the objects: UMAP when installed, else PCA."""
    plt = pyplot()
    x = np.asarray(vectors, np.float64)
    method = "PCA"
    try:
        import umap  # type: ignore[import-not-found]

        xy = umap.UMAP(random_state=0).fit_transform(x)
        method = "UMAP"
    except ImportError:
        from sklearn.decomposition import PCA

        xy = PCA(2, random_state=0).fit_transform(x) if min(x.shape) >= 2 else np.c_[x[:, :1], np.zeros(len(x))]
    labels = np.asarray(groups).astype(str)
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    for g in np.unique(labels):
        sel = labels == g
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, label=g)
    ax.set_title(f"{title} ({method})", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    if len(np.unique(labels)) <= 12:
        ax.legend(fontsize=6, markerscale=2, loc="best")
    return png_data_uri(fig)


def gallery(crops: Mapping[str, Sequence[np.ndarray]]) -> str:
    """A row of example crops (2D, normalised) per group."""
    plt = pyplot()
    rows = list(crops)
    cols = max((len(v) for v in crops.values()), default=1)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols, 1.3 * len(rows)), squeeze=False)
    for r, group in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(crops[group]):
                ax.imshow(crops[group][c], cmap="gray")
        axes[r][0].set_title(str(group), fontsize=8, loc="left")
    return png_data_uri(fig)


def _table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(*, title: str, group_by: str, scores: Mapping[str, Mapping[str, float]],
           differences: Mapping[str, Mapping[str, float]], confounds: Mapping[str, Mapping[str, float]],
           maps: Mapping[str, str], gallery_png: str | None, notes: Sequence[str]) -> str:
    """The report as one HTML string."""
    metrics = ["map", "map_p", "knn_acc", "probe_acc"]
    score_rows = [{"embedding": n + (" (baseline)" if is_baseline(n) else ""), **s} for n, s in scores.items()]
    diff_rows = [{"embedding": n, **d} for n, d in differences.items()]
    conf_cols = sorted({k for c in confounds.values() for k in c})
    conf_rows = [{"embedding": n, **c} for n, c in confounds.items()]
    images = "".join(f'<img alt="{html.escape(n)}" src="{src}">' for n, src in maps.items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{margin:4px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Groups: <code>{html.escape(group_by)}</code>. Baselines (untrained encoders, pixels, structure) are "
        "always shown: a learned embedding is only worth its difference over the best of them.</p>",
        "<h2>Scores</h2>", _table(score_rows, ["embedding"] + metrics),
        "<h2>Over the best baseline</h2>", _table(diff_rows, ["embedding", "map", "knn_acc", "probe_acc"]) if diff_rows else
        "<p>No learned embedding in this table (baselines only).</p>",
        f'<h2>mAP</h2><img alt="mAP per embedding" src="{map_chart(scores)}">',
        "<h2>Confounds</h2><p>Held-out R² of predicting each nuisance from the embedding: high values mean groups "
        "may be told apart by size, brightness or crowding rather than by what they are.</p>",
        _table(conf_rows, ["embedding"] + conf_cols),
        f"<h2>Objects</h2>{images}",
    ]
    if gallery_png:
        parts.append(f'<h2>Examples per group</h2><img alt="gallery" src="{gallery_png}">')
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
