"""How each kind of workflow step runs: a thin call of the step function it names, with the
workflow's shared output, the step's own workspace (its resume manifest) and its references
resolved to URLs. Each returns a small JSON summary, kept in the workflow's record."""

from __future__ import annotations

import logging
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, Callable

from pipeline.core.errors import OptionError
from pipeline.engine.runner import EngineOptions
from pipeline.io import store
from pipeline.workflow.context import Context
from pipeline.workflow.spec import (
    Denoise,
    Embed,
    Evaluate,
    Report,
    RunKernel,
    Segment,
    TrainDenoiser,
    TrainSegmenter,
)

if TYPE_CHECKING:
    from pipeline.io.read import ImageSource

log = logging.getLogger(__name__)

# Training settings left unset (null): on a GPU the trainers' own defaults; on a CPU a smaller
# budget, so a laptop run takes minutes, not hours (logged, with how to ask for more). Measured on
# 2 busy cores (the demo sample, 3D): N2V2 16x64x64 x 4 patches ~0.8 s a step, 8x48x48 ~0.3 s;
# the ADF segmenter at width 32 ~13 s a step, at width 16 with 8x48x48 patches ~0.6 s.
GPU_TRAINING = {"train-denoiser": {"steps": 4000, "batch": 16, "width": 16, "patch": None},
                "train-segmenter": {"steps": 2000, "batch": 8, "width": 32, "patch": None}}
CPU_TRAINING = {"train-denoiser": {"steps": 300, "batch": 4, "width": 16, "patch": [8, 48, 48]},
                "train-segmenter": {"steps": 300, "batch": 4, "width": 16, "patch": [8, 48, 48]}}


def _summary(value: Any) -> dict[str, Any]:
    """A step function's summary as JSON-ready fields."""
    plain = (str, int, float, bool, dict, list, type(None))
    if is_dataclass(value):
        return {k: v for k, v in asdict(value).items() if isinstance(v, plain)}
    return dict(value)


def training_size(step: TrainDenoiser | TrainSegmenter, ndim: int) -> dict[str, Any]:
    """steps, batch, width and patch: the step's own, else sized to the machine (the CPU patch
    applies to 3D images; 2D keeps the trainers' own)."""
    import torch

    gpu = torch.cuda.is_available()
    sized = dict((GPU_TRAINING if gpu else CPU_TRAINING)[step.step])
    if ndim != 3:
        sized["patch"] = None
    chosen = {key: getattr(step, key) if getattr(step, key) is not None else default
              for key, default in sized.items()}
    unset = [key for key in sized if getattr(step, key) is None and key != "patch"]
    if unset and not gpu:
        log.warning("%s '%s': no GPU, so %s (a GPU gets %s); set them in the workflow for a better model",
                    step.step, step.name, ", ".join(f"{k} {chosen[k]}" for k in unset),
                    ", ".join(f"{k} {GPU_TRAINING[step.step][k]}" for k in unset))
    return chosen


def _ndim(ctx: Context, url: str) -> int:
    from pipeline.io.read import open_image

    return len(open_image(url, ctx.options.storage_options).spatial_dims)


def train_denoiser(step: TrainDenoiser, ctx: Context) -> dict:
    from pipeline.steps.train import train_denoise

    size = training_size(step, _ndim(ctx, ctx.input_url))
    card = train_denoise(ctx.input_url, ctx.model_dir(step.name), method=step.method, target=step.target,
                         loss=step.loss, patch=size["patch"], steps=size["steps"], batch=size["batch"],
                         level=ctx.options.level, depth=step.depth, width=size["width"], seed=step.seed,
                         uncertainty=step.uncertainty, samples=step.samples, members=step.members,
                         overwrite=True, resume=True,  # an unfinished training continues from its checkpoint
                         progress=ctx.options.progress, storage_options=ctx.options.storage_options)
    return {"model": ctx.model_dir(step.name), "weights_sha256": card.weights_sha256,
            "validation_loss": card.validation_loss}


def train_segmenter(step: TrainSegmenter, ctx: Context) -> dict:
    from pipeline.steps.train import train_segment

    image = ctx.image_url(step, step.image)
    size = training_size(step, _ndim(ctx, image))
    card = train_segment(image, ctx.model_dir(step.name), labels=step.labels, shared_output=True,
                         labels_from=ctx.input_url if image == ctx.output_url else None, patch=size["patch"],
                         steps=size["steps"], batch=size["batch"], level=ctx.options.level,
                         depth=step.depth, width=size["width"], seed=step.seed, uncertainty=step.uncertainty,
                         samples=step.samples, members=step.members, overwrite=True, resume=True,
                         progress=ctx.options.progress, storage_options=ctx.options.storage_options)
    return {"model": ctx.model_dir(step.name), "weights_sha256": card.weights_sha256,
            "validation_loss": card.validation_loss}


def denoise(step: Denoise, ctx: Context) -> dict:
    from pipeline.steps.denoise import denoise as run

    summary, report = run(ctx.input_url, ctx.output_url, ctx.model_dir(step.model), ctx.client,
                          ctx.options_for(step), out_dtype=step.dtype, precision=step.precision, tta=step.tta,
                          posterior=step.posterior)
    return {**_summary(summary), "residual_std_median": report.residual_std_median, "flagged": len(report.flagged)}


def segment_spec(step: Segment, image: "str | ImageSource", *, level: int, storage_options: dict | None):
    """The segment step's kernel for ``image`` (a URL, or a fused chain's computed image): its
    model (resampled to the model's training scale when ``rescale``), or the classical kernel
    with the image's global threshold and object scale."""
    from pipeline.steps.segment import classical_spec, model_spec, model_zoom

    if step.model:
        zoom = 1.0
        if step.rescale:
            zoom, note = model_zoom(image, step.model, level=level, diameter=step.diameter,
                                    storage_options=storage_options)
            if note:
                log.info("%s", note)
        return model_spec(step.model, min_size=step.min_size, zoom=zoom, samples=step.samples)
    if step.samples is not None:
        raise OptionError(f"segment '{step.name}': samples applies to a model trained with mc-dropout; "
                          "this step has no model")
    return classical_spec(image, level=level, diameter=step.diameter, min_size=step.min_size,
                          threshold=step.threshold, polarity=step.polarity, stain=step.stain,
                          storage_options=storage_options)


def _resolved(step: Segment, ctx: Context) -> Segment:
    """The step with its model reference made a folder URL."""
    return step.model_copy(update={"model": ctx.model_dir(step.model)}) if step.model else step


def segment(step: Segment, ctx: Context) -> dict:
    from pipeline.steps.segment import segment_labels

    image = ctx.image_url(step, step.image)
    options = ctx.options_for(step)
    if image == ctx.output_url:
        mode = "in-place"  # the denoised root image: written at the processed level, so its level 0
        options = EngineOptions.of(options, level=0)
    else:  # the input: copied to the root, unless a denoised image is the root (then linked)
        mode = "link" if ctx.root_written else "copy"
    spec = segment_spec(_resolved(step, ctx), image, level=options.level, storage_options=options.storage_options)
    summary = segment_labels(image, ctx.output_url, spec, ctx.client, options, name=step.name, iou=step.iou,
                             image=mode)
    return _summary(summary)


def fusable(first: Any, second: Any, ctx: Context) -> bool:
    """Whether two consecutive steps run as one task per tile (``engine.fuse``): a denoise step,
    then a segment step of its output."""
    return (ctx.workflow.engine.fuse and isinstance(first, Denoise) and isinstance(second, Segment)
            and ctx.image_url(second, second.image) == ctx.output_url)


def denoise_segment(first: Denoise, second: Segment, ctx: Context) -> tuple[dict, dict]:
    """A denoise step and the segment step after it, fused (:mod:`pipeline.steps.chain`)."""
    from pipeline.steps.chain import denoise_then_segment

    step = _resolved(second, ctx)
    so = ctx.options.storage_options
    chain = denoise_then_segment(ctx.input_url, ctx.output_url, ctx.model_dir(first.model),
                                 lambda image: segment_spec(step, image, level=0, storage_options=so), ctx.client,
                                 denoise_options=ctx.options_for(first), segment_options=ctx.options_for(second),
                                 out_dtype=first.dtype, precision=first.precision, tta=first.tta,
                                 posterior=first.posterior, name=second.name,
                                 iou=second.iou)
    fused = {"fused": chain.fused}
    return ({**_summary(chain.denoise), "residual_std_median": chain.residual.residual_std_median,
             "flagged": len(chain.residual.flagged), **fused, "seconds": chain.seconds["denoise"]},
            {**_summary(chain.segment), **fused, "seconds": chain.seconds["segment"]})


def embed(step: Embed, ctx: Context) -> dict:
    from pipeline.io.tables import count_rows
    from pipeline.steps.embed import embed_objects

    if count_rows(ctx.output_url, step.labels, ctx.options.storage_options) == 0:
        log.warning("embed '%s': labels '%s' hold no objects, so there is nothing to embed", step.name, step.labels)
        return {"objects": 0}
    summary = embed_objects(ctx.output_url, ctx.output_url, ctx.client, ctx.options_for(step), labels=step.labels,
                            model=ctx.model_dir(step.model) if step.model else None, seeds=step.seeds,
                            crop=step.crop)
    return _summary(summary)


def truth_url(step: Evaluate, ctx: Context) -> str:
    """``truth``: a labels name inside the input, or a labels image's URL."""
    if "/" in step.truth or ":" in step.truth:
        return step.truth
    return store.join(ctx.input_url, "labels", step.truth)


def evaluate(step: Evaluate, ctx: Context) -> dict:
    from pipeline.steps.evaluate import evaluate as score

    return score(ctx.output_url, truth_url(step, ctx), labels=step.labels,
                 report=store.join(ctx.output_url, "reports", step.name), storage_options=ctx.options.storage_options)


def run_kernel(step: RunKernel, ctx: Context) -> dict:
    from kernels import KernelSpec
    from pipeline.steps.apply import run_kernel as run

    image = ctx.image_url(step, step.image)
    summary = run(image, store.join(ctx.output_url, step.name), KernelSpec.of(step.kernel, **step.params), ctx.client,
                  ctx.options_for(step), name=step.name, out_dtype=step.dtype)
    return _summary(summary)


def report(step: Report, ctx: Context) -> dict:
    from pipeline.workflow.report import write_report

    return {"report": write_report(ctx, name=step.name)}


RUNNERS: dict[type, Callable[[Any, Context], dict]] = {
    TrainDenoiser: train_denoiser, TrainSegmenter: train_segmenter, Denoise: denoise, Segment: segment,
    Embed: embed, Evaluate: evaluate, RunKernel: run_kernel, Report: report,
}
