"""Run a workflow over one input into one output store, resumably, and record what ran.

The output is the documented layout (``docs/architecture.md``, "Workflows"): the root image
(denoised, or the input copied), ``labels/``, ``tables/``, ``uncertainty/``, ``models/`` the
workflow trained, ``reports/``; ``_tilewise/`` holds the record:

- ``workflow.json``: the workflow as run (every default written out), the input and its
  fingerprint: a resume must match it, or it is refused (``--overwrite`` starts afresh);
- ``steps/<name>/``: each tiled step's own resume manifest (done tiles, per pass);
- ``workflow/<name>.json``: a finished step's summary and seconds (so a resumed workflow skips
  finished steps and resumes the unfinished one tile by tile);
- ``provenance.json``: written last: versions, model hashes, per-step timings (``tilewise info``).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from pipeline.core.errors import InputError, OptionError, OutputExistsError
from pipeline.engine.manifest import RunLock
from pipeline.engine.runner import EngineOptions
from pipeline.io import store
from pipeline.io.read import ImageSource, open_image
from pipeline.io.store import Folder
from pipeline.workflow.context import Context
from pipeline.workflow.execute import RUNNERS, denoise_segment, fusable
from pipeline.workflow.load import load_workflow
from pipeline.workflow.spec import TRAINING, EngineSettings, Step, Workflow

log = logging.getLogger(__name__)

RECORD = "workflow.json"
PROVENANCE = "provenance.json"
PACKAGES = ("numpy", "torch", "zarr", "ome-zarr", "dask", "distributed", "scikit-image", "scipy", "pydantic",
            "pyarrow", "tifffile")


@dataclass(frozen=True)
class WorkflowSummary:
    output: str
    steps: dict[str, dict[str, Any]]  # name -> {"step", "seconds", "summary", "resumed"}
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str]:
    """tilewise's, Python's and the main dependencies' versions."""
    from importlib.metadata import PackageNotFoundError, version

    import pipeline

    found = {"tilewise": pipeline.__version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _record(workflow: Workflow, input_url: str, source: ImageSource, options: EngineOptions) -> dict[str, Any]:
    """What a resume must match: the workflow as run, the input and its level's content
    fingerprint (names, sizes, stamps; no data read), as every step's manifest has it."""
    return {"workflow": workflow.model_dump(mode="json"), "input": input_url,
            "input_fingerprint": store.content_fingerprint(source.level_url(options.level), options.storage_options)}


def _check_resume(output_url: str, old: dict | None, new: dict) -> None:
    if old is None:
        raise OutputExistsError(f"Output '{output_url}' exists but holds no tilewise workflow record; pass "
                                "--overwrite to replace it, or choose another output.")
    if old.get("input_fingerprint") != new["input_fingerprint"] and old.get("input") == new["input"]:
        raise OutputExistsError(f"The input of '{output_url}' changed since this workflow started; pass --overwrite "
                                "to start again.")
    changed = [k for k in ("input", "workflow") if old.get(k) != new.get(k)]
    if changed:
        detail = _first_difference(old.get("workflow", {}), new["workflow"]) if changed == ["workflow"] else \
            f"input {old.get('input')!r} -> {new['input']!r}"
        raise OutputExistsError(f"Output '{output_url}' was written by another workflow or input ({detail}); "
                                "re-run the same workflow to resume, pass --overwrite to start afresh, or choose "
                                "another output.")


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _first_difference(a, b, f"{path}[{i}]")
    return f"{path}: {old!r} -> {new!r}"


def check_training_output(workflow: Workflow, output_url: str) -> None:
    """Model folders are local folders (``kernels.modelfile``): a workflow that trains writes
    them inside its output, which must then be a local path, refused here before anything runs
    (a folder named after the URL would be made on this machine, out of the workers' reach)."""
    trains = [s for s in workflow.steps if s.step in TRAINING]
    if trains and "://" in output_url and not output_url.startswith("file://"):
        raise OptionError(f"{trains[0].step} '{trains[0].name}': a workflow that trains models writes them into "
                          f"its output, which must be a local path, not '{output_url}'; run it into a local (or "
                          "shared-filesystem) output, or train first and name the model folder in the workflow.")


def check_models(workflow: Workflow) -> None:
    """Model folders named by path (not trained here) must exist before anything runs."""
    from pipeline.steps.models import check_model_folder

    trained = {s.name for s in workflow.steps if s.step in TRAINING}
    for step in workflow.steps:
        ref = getattr(step, "model", None)
        if ref is not None and ref not in trained:
            check_model_folder(ref, f"{step.step} '{step.name}': model")


def run_workflow(workflow: Workflow, input_url: str, output_url: str, client: Any, *, overwrite: bool = False,
                 progress: bool = True, storage_options: dict | None = None,
                 on_step: Callable[[str], None] | None = None) -> WorkflowSummary:
    """Run ``workflow`` over ``input_url`` into ``output_url``; re-running the same call resumes
    (finished steps are skipped, the unfinished one resumes tile by tile)."""
    say = on_step or (lambda text: log.info("%s", text))
    check_training_output(workflow, output_url)
    store.check_output_location(output_url, input_url, storage_options)
    source = open_image(input_url, storage_options)  # a readable image, before anything is created
    e: EngineSettings = workflow.engine
    options = EngineOptions.of(level=e.level, tile_shape=e.tile, batch=e.batch, ngff=e.ngff,
                               missing_chunks=e.missing_chunks, foreground=e.foreground, progress=progress,
                               storage_options=storage_options)
    ctx = Context(workflow, input_url, output_url, client, options)
    check_models(workflow)
    record = _record(workflow, input_url, source, options)
    folder = Folder(store.join(output_url, "_tilewise"), storage_options or {})
    lock = RunLock(output_url, storage_options or {})
    if store.exists(output_url, storage_options):
        lock.check()
        if overwrite:
            store.remove(output_url, storage_options)
        else:
            _check_resume(output_url, folder.read_json(RECORD), record)
    started = time.perf_counter()
    done: dict[str, dict[str, Any]] = {}
    with lock:
        if folder.read_json(RECORD) is None:
            folder.write_json(RECORD, record, sort_keys=True)
        steps, n, k = workflow.steps, len(workflow.steps), 0
        while k < n:
            step, after = steps[k], steps[k + 1] if k + 1 < n else None
            if after is not None and fusable(step, after, ctx) and folder.read_json(_marker(step)) is None:
                done.update(_run_fused(step, after, ctx, folder, f"[{k + 1}-{k + 2}/{n}]", say))
                k += 2
                continue
            done[step.name] = _run_step(step, ctx, folder, f"[{k + 1}/{n}]", say)
            k += 1
        seconds = time.perf_counter() - started
        provenance = _provenance(ctx, record, done)
        folder.write_json(PROVENANCE, provenance)
        _mark_root(ctx, provenance)
    say(f"done in {seconds:.0f} s: {output_url}")
    return WorkflowSummary(output_url, done, seconds, provenance)


def _marker(step: Step) -> str:
    return f"workflow/{step.name}.json"


def _finish_step(step: Step, folder: Folder, seconds: float, summary: dict) -> dict:
    entry = {"step": step.step, "seconds": seconds, "summary": summary,
             "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    folder.makedirs("workflow")
    folder.write_json(_marker(step), entry)  # written last: a marker means the step finished
    return {**entry, "resumed": False}


def _run_step(step: Step, ctx: Context, folder: Folder, counter: str, say: Callable[[str], None]) -> dict:
    finished = folder.read_json(_marker(step))
    if finished is not None:
        say(f"{counter} {step.step} '{step.name}': done earlier ({finished['seconds']:.0f} s)")
        return {**finished, "resumed": True}
    say(f"{counter} {step.step} '{step.name}' ...")
    started = time.perf_counter()
    summary = RUNNERS[type(step)](step, ctx)
    seconds = time.perf_counter() - started
    say(f"{counter} {step.step} '{step.name}': {seconds:.0f} s")
    return _finish_step(step, folder, seconds, summary)


def _run_fused(first: Step, second: Step, ctx: Context, folder: Folder, counter: str,
               say: Callable[[str], None]) -> dict[str, dict]:
    """Two steps as one task per tile (``engine.fuse``); each gets its own marker and seconds
    (the second's include computing the first's tiles)."""
    say(f"{counter} {first.step} '{first.name}' + {second.step} '{second.name}' (fused) ...")
    started = time.perf_counter()
    summaries = denoise_segment(first, second, ctx)
    say(f"{counter} {first.step} + {second.step}: {time.perf_counter() - started:.0f} s")
    # the second's marker first: a resume between the two sees the pair unfinished and re-runs
    # it fused, which finds both steps' tiles done
    entries = {step.name: _finish_step(step, folder, summary.pop("seconds"), summary)
               for step, summary in reversed(list(zip((first, second), summaries)))}
    return {first.name: entries[first.name], second.name: entries[second.name]}


def _provenance(ctx: Context, record: dict, done: dict[str, dict]) -> dict[str, Any]:
    """Everything needed to say how this output was made."""
    from kernels.modelfile import read_card

    models = {}
    for step in ctx.workflow.steps:
        ref = getattr(step, "model", None) if step.step not in TRAINING else step.name
        if ref:
            url = ctx.model_dir(ref)
            models[ref] = {"path": url, "weights_sha256": read_card(url).weights_sha256}
    return {**record, "versions": versions(), "models": models,
            "steps": {name: {"step": d["step"], "seconds": round(d["seconds"], 2), "finished": d.get("finished")}
                      for name, d in done.items()},
            "seconds_total": round(sum(d["seconds"] for d in done.values()), 2),
            "written": time.strftime("%Y-%m-%d %H:%M:%S")}


def _mark_root(ctx: Context, provenance: dict) -> None:
    """The root group names the workflow (readers see it in the attributes); a workflow that
    wrote no root image gets a plain group, so the store opens as zarr."""
    url, so = ctx.output_url, ctx.options.storage_options
    group = store.open_group(url, "a", so)
    group.attrs.update({"tilewise": {"workflow": ctx.workflow.name, "provenance": f"_tilewise/{PROVENANCE}",
                                     "steps": [s.name for s in ctx.workflow.steps]}})


class Pipeline:
    """Steps composed into one run over one input image into one output store.

    >>> from pipeline.workflow import Pipeline, TrainDenoiser, Denoise, Segment
    >>> Pipeline([TrainDenoiser(steps=200), Denoise(model="denoiser"), Segment()])  # doctest: +SKIP

    ``run(input, output)`` connects to a cluster (a local one by default, or ``client`` /
    ``scheduler``), runs every step, resumes an interrupted run, and returns a summary; a YAML
    workflow (:meth:`from_yaml`) builds the same object.
    """

    def __init__(self, steps: Iterable[Step], *, name: str = "pipeline", description: str = "",
                 engine: EngineSettings | dict | None = None):
        self.workflow = Workflow(name=name, description=description, steps=list(steps),
                                 engine=engine if engine is not None else EngineSettings())

    @classmethod
    def from_yaml(cls, path: str) -> "Pipeline":
        pipe = cls.__new__(cls)
        pipe.workflow = load_workflow(path)
        return pipe

    @property
    def steps(self) -> list[Step]:
        return list(self.workflow.steps)

    def run(self, input_url: str, output_url: str, *, client: Any = None, scheduler: str | None = None,
            scheduler_file: str | None = None, workers: int | None = None, overwrite: bool = False,
            progress: bool = True, storage_options: dict | None = None,
            on_step: Callable[[str], None] | None = None) -> WorkflowSummary:
        from pipeline.engine.cluster import connect

        if not isinstance(input_url, str) or not isinstance(output_url, str):
            raise InputError("run(input, output): both are paths or URLs (strings).")
        with connect(client, scheduler=scheduler, scheduler_file=scheduler_file, n_workers=workers) as c:
            return run_workflow(self.workflow, input_url, output_url, c, overwrite=overwrite, progress=progress,
                                storage_options=storage_options, on_step=on_step)

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(f'{s.step}:{s.name}' for s in self.workflow.steps)})"
