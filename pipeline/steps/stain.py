"""Stain normalisation of a brightfield (H&E) image: Macenko, estimated once per slide.

The slide's stain vectors and concentration range come from its global sample (a coarse
level, :func:`pipeline.engine.stats.sample_values`), the reference's from a reference image or
Macenko's published values; then the per-pixel ``stain-normalize`` kernel
(:mod:`kernels.stain`) re-colours every tile by the same matrices. Output: an RGB uint8 image
laid out like the input, with a pyramid, that every other step reads like any image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels import KernelSpec
from pipeline.core.errors import InputError
from pipeline.engine.runner import EngineOptions, RunSummary
from pipeline.engine.stats import sample_values
from pipeline.io.read import ImageSource, open_image
from pipeline.steps.apply import run_kernel


def _stains_of(source: ImageSource, white: float) -> tuple[list[list[float]], list[float]]:
    from kernels.stain import macenko_stains

    if source.n_channels != 3 or "c" not in source.dims:
        raise InputError(f"'{source.url}' has {source.n_channels} channel(s); stain normalisation is for RGB "
                         "brightfield (H&E) images.")
    sample = sample_values(source)[0]
    try:
        stains, maxc = macenko_stains(sample, white)
    except ValueError as exc:
        raise InputError(f"'{source.url}': {exc}; stain normalisation needs stained tissue in the image.") from None
    return np.round(stains, 6).tolist(), np.round(maxc, 6).tolist()


def stain_spec(input_url: str, *, reference: str | None = None, white: float = 240.0,
               storage_options: dict | None = None) -> KernelSpec:
    """The ``stain-normalize`` kernel for an image: its stains estimated once from its global
    sample; the target is ``reference`` (an image's own stains) or Macenko's reference."""
    stains, maxc = _stains_of(open_image(input_url, storage_options), white)
    target: dict[str, Any] = {}
    if reference is not None:
        ref_stains, ref_max = _stains_of(open_image(reference, storage_options), white)
        target = {"reference_stains": ref_stains, "reference_max": ref_max}
    return KernelSpec.of("stain-normalize", stains=stains, max_concentrations=maxc, white=white, **target)


def normalize_stain(input_url: str, output_url: str, client: Any, options: EngineOptions | None = None, *,
                    reference: str | None = None, white: float = 240.0, **settings: Any) -> RunSummary:
    """Macenko-normalise an RGB image into ``output_url`` (uint8 RGB, same layout, a pyramid)."""
    options = EngineOptions.of(options, **settings)
    spec = stain_spec(input_url, reference=reference, white=white, storage_options=options.storage_options)
    return run_kernel(input_url, output_url, spec, client, options, name="normalized", out_dtype="uint8")
