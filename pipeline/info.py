"""A readable summary of a store: images, levels, chunks, dtypes, labels and tables."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.io import store
from pipeline.io.read import ImageSource, SlideSource, list_tables, ngff_problems, open_image, walk_images
from pipeline.io.slide import is_slide_path
from pipeline.io.tables import count_rows


def _fmt(values) -> str:
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _describe_image(src: ImageSource, title: str, indent: str) -> list[str]:
    units = {a.unit for a in src.axes if a.unit}
    if isinstance(src, SlideSource):
        kind, problems = f"slide ({src.vendor or 'generic TIFF'}), read in place", None
    else:
        kind, problems = f"NGFF {src.version}", ngff_problems(src)
    lines = [f"{indent}{title}  [{','.join(src.dims)}]  {src.dtype}  {kind}"
             + (f"  ({', '.join(sorted(units))})" if units else "")
             + ("" if isinstance(src, SlideSource) else "  valid" if problems is None else f"  NOT VALID: {problems}")]
    if src.channel_names:
        lines.append(f"{indent}  channels: {', '.join(src.channel_names)}")
    for k, lv in enumerate(src.levels):
        shard = f"  shards {_fmt(lv.shards)}" if lv.shards else ""
        offset = f"  translation {_fmt(lv.translation)}" if any(lv.translation) else ""
        lines.append(f"{indent}  level {k}: shape {_fmt(lv.shape)}  chunks {_fmt(lv.chunks)}{shard}  "
                     f"scale {_fmt(lv.scale)}{offset}  ({lv.nbytes / 2**20:.1f} MiB)")
    for name in src.labels:
        lab = src.label(name)
        lines.append(f"{indent}  labels/{name}: {lab.dtype}, {len(lab.levels)} levels, shape {_fmt(lab.shape)}")
    return lines


def _table_rows(url: str, name: str, storage_options) -> int | None:
    try:
        return count_rows(url, name, storage_options)
    except Exception:  # an unreadable table is reported without a row count
        return None


def _standalone_labels(url: str, storage_options) -> list[str]:
    """Names in a root-level ``labels`` group (written by ``tilewise segment``)."""

    try:
        group = store.open_group(store.join(url, "labels"), "r", storage_options)
    except Exception:  # no labels group at the root
        return []
    attrs = group.attrs.asdict()
    return list(attrs.get("ome", attrs).get("labels", []))


def describe(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The text ``tilewise info`` prints."""
    lines = [f"{url}"]
    if is_slide_path(url):
        return "\n".join(lines + _describe_image(open_image(url, storage_options), "(slide)", "  "))
    images = list(walk_images(url, storage_options))
    for path, _ in images:
        src = open_image(store.join(url, path) if path else url, storage_options)
        lines += _describe_image(src, path or "(root image)", "  ")
    root_is_image = any(path == "" for path, _ in images)
    standalone = [] if root_is_image else _standalone_labels(url, storage_options)
    for name in standalone:  # a segmentation output: labels of an image that lives elsewhere
        lab = open_image(store.join(url, "labels", name), storage_options)
        lines.append(f"  labels/{name}: {lab.dtype}, {len(lab.levels)} levels, shape {_fmt(lab.levels[0].shape)}")
    if not images and not standalone:
        lines.append("  (no images)")
    for name in list_tables(url, storage_options):
        rows = _table_rows(url, name, storage_options)
        lines.append(f"  tables/{name}" + (f": {rows} rows" if rows is not None else ""))
    workflow = _describe_workflow(url, storage_options)
    lines += workflow or _describe_run(url, storage_options)
    return "\n".join(lines)


def _describe_workflow(url: str, storage_options) -> list[str]:
    """A workflow's record: each step with its time, models, versions, or what is unfinished."""
    folder = store.Folder(store.join(url, "_tilewise"), storage_options or {})
    try:
        record = folder.read_json("provenance.json") or folder.read_json("workflow.json")
    except Exception:  # not a workflow's output
        return []
    if not record or "workflow" not in record:
        return []
    steps = record["workflow"]["steps"]
    finished = "steps" in record
    lines = [f"  workflow '{record['workflow']['name']}' on {record['input']}"
             + (f", written {record.get('written')}, {record.get('seconds_total', 0):.0f} s" if finished
                else ": NOT FINISHED (re-run the same `tilewise run` to resume)")]
    for step in steps:
        done = record.get("steps", {}).get(step["name"]) or folder.read_json(f"workflow/{step['name']}.json")
        when = f"{done['seconds']:.1f} s" if done else "not done"
        lines.append(f"    {step['step']:<16} {step['name']:<12} {when}")
    for name, model in record.get("models", {}).items():
        lines.append(f"  model {name}: {model['path']} (sha256 {model['weights_sha256'][:12]})")
    if record.get("versions"):
        lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()))
    lines.append(f"  input fingerprint: {record.get('input_fingerprint')}")
    return lines


def _describe_run(url: str, storage_options) -> list[str]:
    """The run that wrote an output (its ``_tilewise`` manifest): kernel and object scale."""
    from kernels.objectscale import ObjectScale
    from pipeline.engine.manifest import RunManifest

    try:
        params = RunManifest(url, storage_options or {}).read_params()
    except Exception:  # not an output of tilewise, or an unreadable manifest: nothing to add
        return []
    if not params:
        return []
    if "specs" in params:  # tilewise embed
        return [f"  run: embed table {params.get('table')} of {params.get('input')} "
                f"({', '.join(params['specs'])}; crop {params.get('crop')} px)"]
    lines = [f"  run: kernel {params.get('kernel')} on {params.get('input')}"]
    scale = (params.get("kernel_params") or {}).get("object_scale")
    if scale:
        lines.append(f"  object diameter: {ObjectScale(**scale).describe()}")
    return lines
