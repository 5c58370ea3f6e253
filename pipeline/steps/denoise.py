"""Denoise an image with a trained model through the engine, and report the residual guard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels import KernelSpec
from kernels.denoise import DenoiseKernel
from pipeline.core.errors import OptionError
from pipeline.engine.manifest import RunManifest
from pipeline.engine.runner import EngineOptions, RunSummary
from pipeline.steps.apply import DenseRun, begin_dense
from pipeline.steps.models import model_spec as _model_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidualReport:
    """Residual (input - output) statistics over all tiles, in normalised units; ``flagged``
    tiles have a residual whose neighbouring pixels correlate (structure, not noise)."""

    tiles: int
    flagged: list[int]
    residual_std_median: float
    lag1_correlation_max: float

    @classmethod
    def of(cls, tile_metadata: dict[int, dict[str, Any]]) -> "ResidualReport":
        meta = tile_metadata
        stds = [m.get("residual_std", np.nan) for m in meta.values()]
        return cls(tiles=len(meta), flagged=sorted(t for t, m in meta.items() if m.get("flagged")),
                   residual_std_median=float(np.median(stds)) if meta else float("nan"),
                   lag1_correlation_max=max((m.get("residual_lag1_correlation", 0.0) for m in meta.values()),
                                            default=0.0))


# ``tta="auto"`` averages the 8 flips / rotations for inputs up to this many pixels per time
# point: on a single image it costs seconds; on a light-sheet volume it would multiply hours by
# 8. With the posterior step's first stage alone it gained 0.07-0.19 dB (sigma 25,
# benchmarks/results/restore.json: astronaut 29.64 -> 29.83, coins 28.16 -> 28.27, moon 36.32 ->
# 36.39 dB); with its second stage (the block filter) it gains next to nothing (tuning images,
# in-process: camera 29.66 -> 29.70, chelsea 30.58 -> 30.55; restore.json, with the stages chosen
# per image: astronaut 30.49 -> 30.52, coins 28.51 -> 28.49, moon 36.32 -> 36.39). It stays on for small inputs, where it
# costs seconds: the engine's tests prove it keeps tiled == untiled, and users may turn it off.
TTA_AUTO_PIXELS = 2**26


def model_spec(model_dir: str, *, precision: str = "fp32", tta: bool = False, posterior: str = "auto") -> KernelSpec:
    """The denoise kernel spec for a model folder, keyed by its weights hash (resume-safe);
    ``precision``: ``fp32`` (default), or ``bf16`` / ``fp16`` autocast (opt-in, recorded);
    ``tta``: average the 8 flips / rotations of each tile (recorded); ``posterior``: the
    posterior step where the card has its parameters (``kernels.posterior``): ``auto`` does
    what training chose for the image, ``off`` or one of its choices is recorded."""
    extra = (({} if precision == "fp32" else {"precision": precision}) | ({"tta": True} if tta else {})
             | ({} if posterior == "auto" else {"posterior": posterior}))
    return _model_spec(model_dir, "denoise", **extra)


def resolve_tta(tta: str | bool, input_url: str, level: int, storage_options: dict | None) -> bool:
    """``auto``: on for inputs of at most ``TTA_AUTO_PIXELS`` spatial pixels, off above."""
    if isinstance(tta, bool):
        return tta
    if tta not in ("auto", "on", "off"):
        raise OptionError(f"--tta must be auto, on or off, got '{tta}'.")
    if tta != "auto":
        return tta == "on"
    from pipeline.io.read import open_image

    source = open_image(input_url, storage_options)
    lv = source.level(level)
    return int(np.prod([lv.shape[source.dims.index(d)] for d in source.spatial_dims])) <= TTA_AUTO_PIXELS


def denoise(input_url: str, output_url: str, model_dir: str, client: Any, options: EngineOptions | None = None,
            *, out_dtype: str = "float32", precision: str = "fp32", tta: str | bool = "auto", posterior: str = "auto",
            **settings: Any) -> tuple[RunSummary, ResidualReport]:
    """Run a denoising model tile by tile into the image ``output_url`` (float32 by default;
    ``out_dtype="input"`` keeps the input dtype; ``precision`` and ``posterior`` as in
    :func:`model_spec`; ``tta``: ``auto`` (on up to ``TTA_AUTO_PIXELS``), ``on``, ``off``).
    Tiles whose residual holds structure are logged."""
    options = EngineOptions.of(options, **settings)
    run = begin_denoise(input_url, output_url, model_dir, client, options, out_dtype=out_dtype, precision=precision,
                        tta=tta, posterior=posterior)
    summary = run.finish(client)
    return summary, residual_report(output_url, options, known=run.computed)


def begin_denoise(input_url: str, output_url: str, model_dir: str, client: Any, options: EngineOptions, *,
                  out_dtype: str = "float32", precision: str = "fp32", tta: str | bool = "auto",
                  posterior: str = "auto") -> DenseRun:
    """:func:`denoise`'s output created (or resumed) and its tile job ready (``DenseRun``): a
    fused chain lets the segment step compute its tiles before ``finish``."""
    tta = resolve_tta(tta, input_url, options.level, options.storage_options)
    log.info("test-time augmentation %s", "on (8 orientations)" if tta else "off")
    spec = model_spec(model_dir, precision=precision, tta=tta, posterior=posterior)
    return begin_dense(input_url, output_url, spec, client, options, name="denoised", out_dtype=out_dtype)


def residual_report(output_url: str, options: EngineOptions,
                    known: dict[int, dict[str, Any]] | None = None) -> ResidualReport:
    """The residual guard over a finished denoise run's tiles; flagged tiles are logged. Tiles in
    ``known`` (the metadata this run's tasks returned) are not read back; the others (done by an
    earlier, interrupted run, or by a fused step) come from their markers."""
    manifest = RunManifest(output_url, options.storage_options or {}, workspace=options.workspace)
    metas = dict(known or {})
    files = manifest.marker_files()
    metas.update(manifest.tile_metadata(sorted(set(files) - set(metas)), files=files))
    report = ResidualReport.of(metas)
    if report.flagged:
        log.warning("%d of %d tiles have a residual that is not noise-like (neighbour correlation > %.1f; tiles "
                    "%s): the denoiser removed structure there; inspect them before trusting the output",
                    len(report.flagged), report.tiles, DenoiseKernel.residual_correlation_limit, report.flagged[:10])
    return report
