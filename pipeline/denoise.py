"""Denoise an image with a trained model through the engine, and report the residual guard."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels import KernelSpec
from pipeline.manifest import RunManifest
from pipeline.run import RunSummary, run_kernel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidualReport:
    """Residual (input - output) statistics over all tiles, in normalised units."""

    tiles: int
    flagged: list[int]
    residual_std_median: float
    lag1_correlation_max: float


def model_spec(model_dir: str) -> KernelSpec:
    """The denoise kernel spec for a model folder, keyed by its weights hash (resume-safe)."""
    from kernels.modelfile import model_kernel_spec

    return model_kernel_spec(model_dir, "denoise", "denoise", "`tilewise denoise` needs a denoising model")


def denoise(input_url: str, output_url: str, model_dir: str, client: Any, **engine: Any) -> tuple[RunSummary, ResidualReport]:
    """Run a denoising model tile by tile into ``<output_url>/denoised`` (float32 by default;
    ``out_dtype="input"`` keeps the input dtype). Tiles whose residual holds structure are logged."""
    from kernels.modelfile import ModelFileError
    from pipeline.errors import OptionError

    try:
        spec = model_spec(model_dir)
    except ModelFileError as exc:
        raise OptionError(str(exc)) from None
    summary = run_kernel(input_url, output_url, spec, client, name="denoised", **engine)
    meta = RunManifest(output_url, engine.get("storage_options") or {}).tile_metadata()
    flagged = sorted(t for t, m in meta.items() if m.get("warning"))
    report = ResidualReport(
        tiles=len(meta), flagged=flagged,
        residual_std_median=float(np.median([m.get("residual_std", np.nan) for m in meta.values()])) if meta else float("nan"),
        lag1_correlation_max=max((m.get("residual_lag1_correlation", 0.0) for m in meta.values()), default=0.0))
    if flagged:
        log.warning("%d of %d tiles have a residual that is not noise-like (tiles %s); inspect them before "
                    "trusting the denoised image there", len(flagged), len(meta), flagged[:10])
    return summary, report
