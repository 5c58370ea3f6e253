"""tilewise orchestration: I/O, the tiled engine, the steps users run, sample data, the CLI.

Layers, each importing only those below it (``docs/architecture.md``)::

    cli, info  ->  workflow  ->  data  ->  steps  ->  analysis  ->  engine  ->  io  ->  core   (kernels: beside, below steps)

The names below are the Python API; they load on first use, so ``import pipeline`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline import _compat

__version__ = "0.1.0"

_compat.install()

_API = {
    "EngineOptions": "pipeline.engine.runner", "Blend": "pipeline.engine.runner",
    "connect": "pipeline.engine.cluster",
    "run_kernel": "pipeline.steps.apply", "denoise": "pipeline.steps.denoise",
    "segment_labels": "pipeline.steps.segment", "classical_spec": "pipeline.steps.segment",
    "train_denoise": "pipeline.steps.train", "train_segment": "pipeline.steps.train",
    "convert": "pipeline.steps.convert", "model_spec": "pipeline.steps.models",
    "evaluate": "pipeline.steps.evaluate", "embed_objects": "pipeline.steps.embed",
    "embed_patches": "pipeline.steps.embed", "analyze": "pipeline.steps.analyze",
    "export_geojson": "pipeline.steps.geojson", "detect_tissue": "pipeline.steps.tissue",
    "normalize_stain": "pipeline.steps.stain",
    "open_image": "pipeline.io.read", "read_table": "pipeline.io.tables", "to_anndata": "pipeline.io.tables",
    "to_spatialdata": "pipeline.io.spatial",
    "TilewiseError": "pipeline.core.errors",
    "Pipeline": "pipeline.workflow", "load_workflow": "pipeline.workflow",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
