"""Old module paths (before the layered layout) keep working, with a DeprecationWarning.

``import pipeline.run`` gives ``pipeline.engine.runner``'s module object itself (so patches and
``isinstance`` checks see one module); an old module that was split in two (``pipeline.tables``)
gives a module that looks names up in both. The table is in ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, tuple[str, ...]] = {
    "pipeline.errors": ("pipeline.core.errors",),
    "pipeline.grid": ("pipeline.core.regions",),
    "pipeline.plan": ("pipeline.engine.plan",),
    "pipeline.blend": ("pipeline.engine.blend",),
    "pipeline.stats": ("pipeline.engine.stats",),
    "pipeline.manifest": ("pipeline.engine.manifest",),
    "pipeline.cluster": ("pipeline.engine.cluster",),
    "pipeline.pyramid": ("pipeline.engine.pyramid",),
    "pipeline.tasks": ("pipeline.engine.submit",),
    "pipeline.run": ("pipeline.engine.runner", "pipeline.steps.apply"),
    "pipeline.denoise": ("pipeline.steps.denoise",),
    "pipeline.segment": ("pipeline.steps.segment",),
    "pipeline.stitch": ("pipeline.steps.stitch",),
    "pipeline.train": ("pipeline.steps.train",),
    "pipeline.tables": ("pipeline.io.tables", "pipeline.steps.measure"),
    "pipeline.io.convert": ("pipeline.steps.convert",),
}


class _Merged(types.ModuleType):
    """An old module split over several new ones: attributes from the first that has them."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name)
        self.__targets = [importlib.import_module(t) for t in targets]

    def __getattr__(self, attr: str):
        for module in self.__targets:
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        targets = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {' and '.join(targets)}; import it from there",
                      DeprecationWarning, stacklevel=3)
        if len(targets) == 1:
            return importlib.import_module(targets[0])
        return _Merged(spec.name, targets)

    def exec_module(self, module) -> None:
        sys.modules[module.__spec__.name if module.__spec__ else module.__name__] = module


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.util.spec_from_loader(name, _AliasLoader())
        return None


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
