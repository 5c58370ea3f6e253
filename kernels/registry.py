"""Kernel specs and the registry: a kernel is found by name, its parameters validated.

Built-in kernels are declared as entry points of the ``tilewise.kernels`` group in
``pyproject.toml``, and so are a plug-in package's: this module imports no concrete kernel,
and adding one needs no change here or in the engine. A class that is not installed as an
entry point (a notebook's, a script's) is named by its import path instead:
``KernelSpec.of_class(MyKernel, **params)``; worker processes import it from there.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from kernels.contract import Kernel
from kernels.errors import KernelError

ENTRY_POINT_GROUP = "tilewise.kernels"
_REGISTERED: dict[str, type[Kernel]] = {}


@dataclass(frozen=True)
class KernelSpec:
    """What to build: a registered kernel ``name`` and its JSON-able parameters.

    Frozen and hashable: it is the cache key of the resident model and goes into the run
    manifest, so a resumed run can prove it uses the same kernel.
    """

    name: str
    params_json: str = "{}"
    source: str = ""  # "module:Class" for a kernel that is not an installed entry point

    @classmethod
    def of(cls, name: str, **params: Any) -> "KernelSpec":
        return cls(name, json.dumps(params, sort_keys=True))

    @classmethod
    def of_class(cls, kernel: type[Kernel], **params: Any) -> "KernelSpec":
        """The spec of a kernel class found by its import path (it must be importable, e.g. a
        module beside the script, on every worker)."""
        if not (isinstance(kernel, type) and issubclass(kernel, Kernel)):
            raise KernelError(f"{kernel!r} is not a kernels.Kernel subclass")
        return cls(kernel.name, json.dumps(params, sort_keys=True), f"{kernel.__module__}:{kernel.__qualname__}")

    @property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    def with_params(self, **params: Any) -> "KernelSpec":
        """The same kernel with some parameters replaced."""
        return KernelSpec(self.name, json.dumps({**self.params, **params}, sort_keys=True), self.source)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.name}:{self.params_json}:{self.source}".encode()).hexdigest()[:16]


def register(cls: type[Kernel]) -> type[Kernel]:
    """Class decorator: make ``cls`` buildable by its ``name`` in this process only (threads,
    tests); for worker processes use an entry point or :meth:`KernelSpec.of_class`."""
    if not (isinstance(cls, type) and issubclass(cls, Kernel)):
        raise KernelError(f"{cls!r} is not a kernels.Kernel subclass")
    _REGISTERED[cls.name] = cls
    return cls


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_kernels() -> list[str]:
    return sorted(set(_REGISTERED) | set(_entry_points()))


def _import_class(name: str, source: str) -> type[Kernel]:
    module_name, _, qualname = source.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise KernelError(f"Kernel '{name}' from '{source}' cannot be imported here ({exc}); make its module "
                          "importable on every worker (install it, or put it on PYTHONPATH).") from None
    if not (isinstance(obj, type) and issubclass(obj, Kernel)) or obj.name != name:
        raise KernelError(f"'{source}' is not a kernels.Kernel named '{name}'.")
    return obj


def kernel_class(name: str, source: str = "") -> type[Kernel]:
    """The class registered as ``name`` (loading its entry point, or importing ``source``, on
    first use)."""
    if name not in _REGISTERED and source:
        _REGISTERED[name] = _import_class(name, source)
    if name not in _REGISTERED:
        ep = _entry_points().get(name)
        if ep is None:
            known = ", ".join(available_kernels()) or "none (is tilewise installed? pip install -e .)"
            raise KernelError(f"Unknown kernel '{name}'; available: {known}.")
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Kernel)) or cls.name != name:
            raise KernelError(f"Entry point '{name}' ({ep.value}) is not a kernels.Kernel named '{name}'.")
        _REGISTERED[name] = cls
    return _REGISTERED[name]


def build_kernel(spec: KernelSpec) -> Kernel:
    """Construct (not load) a kernel from its spec: cheap, so the client reads its traits."""
    cls = kernel_class(spec.name, spec.source)
    try:
        params = cls.Params.model_validate(spec.params)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']}"
                             for e in exc.errors())
        expected = ", ".join(cls.Params.model_fields)
        raise KernelError(f"Kernel '{spec.name}': {problems} (parameters: {expected}).") from None
    return cls(params)
