"""Denoise, then segment the denoised image: fused (one task per tile, the halos summed, the
denoised image never read back; :mod:`pipeline.engine.fused`) or one step after the other.

Both write the same store: the denoised image at the output's root (its pyramid, residual
report and resume markers, tile for tile as :func:`pipeline.steps.denoise.denoise` writes
them), then ``labels/<name>``, ``tables/<name>`` and the segmenter's maps beside it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from kernels import KernelSpec
from pipeline.engine.fused import FusedSource
from pipeline.engine.runner import EngineOptions, RunSummary, build_checked, plan_for
from pipeline.io.read import ImageSource
from pipeline.steps.denoise import ResidualReport, begin_denoise, residual_report
from pipeline.steps.segment import SegmentSummary, segment_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainSummary:
    denoise: RunSummary
    residual: ResidualReport
    segment: SegmentSummary
    fused: bool
    seconds: dict[str, float]  # denoise, segment (fused: segment includes computing the denoised tiles)


def denoise_then_segment(input_url: str, output_url: str, model_dir: str,
                         segment_spec: Callable[[str | ImageSource], KernelSpec], client: Any, *,
                         denoise_options: EngineOptions, segment_options: EngineOptions, fuse: bool = True,
                         out_dtype: str = "float32", precision: str = "fp32", tta: str | bool = "auto",
                         posterior: str = "auto", name: str = "nuclei",
                         iou: float = 0.5) -> ChainSummary:
    """Denoise ``input_url`` into the image ``output_url`` with the model in ``model_dir``, then
    segment it with the kernel ``segment_spec(image)`` builds for the denoised image (its global
    statistics measured on it). ``fuse`` runs both in one task per tile where they can share
    one tile grid (crop-stitched, level 0 of the denoised image); otherwise, or with
    ``fuse=False``, one after the other. The two options carry each step's workspace."""
    started = time.perf_counter()
    dense = begin_denoise(input_url, output_url, model_dir, client, denoise_options, out_dtype=out_dtype,
                          precision=precision, tta=tta, posterior=posterior)
    seconds: dict[str, float] = {}
    why = _unfusable(dense.job.blend, segment_options) if fuse else "fuse is off"
    if why is None:
        source = FusedSource.of(dense.job)
        seg_spec = segment_spec(source)
        grid = dense.job.plan.tile_shape
        segment_options = replace(segment_options, tile_shape=grid, level=0)
        own = plan_for(source, build_checked(seg_spec).traits, segment_options).tile_shape
        if own != grid:
            why = f"the segmenter tiles {own} where the denoiser tiles {grid}"
    if why is None:
        log.info("denoise + segment fused: one task per tile (tile %s)", grid)
        with dense.lock:  # the denoised tiles are written by the segment tasks
            seg = segment_labels(source, output_url, seg_spec, client, segment_options, name=name, iou=iou,
                                 image="in-place")
        seconds["segment"] = time.perf_counter() - started
        denoised = dense.finish(client, kept_elsewhere=True)  # the pyramid (+ any tile the segment pass did not keep)
        seconds["denoise"] = time.perf_counter() - started - seconds["segment"]
    else:
        log.info("denoise, then segment (not fused: %s)", why)
        denoised = dense.finish(client)
        seconds["denoise"] = time.perf_counter() - started
        seg = segment_labels(output_url, output_url, segment_spec(output_url), client,
                             replace(segment_options, level=0), name=name, iou=iou, image="in-place")
        seconds["segment"] = time.perf_counter() - started - seconds["denoise"]
    return ChainSummary(denoised, residual_report(output_url, denoise_options, known=dense.computed), seg, why is None,
                        seconds)


def _unfusable(blend: Any, options: EngineOptions) -> str | None:
    """Why the two steps cannot run as one task per tile, or None."""
    if blend is not None:
        return "the denoiser blends overlapping windows"
    if options.blend is not None:
        return "the segmenter blends overlapping windows"
    return None
