"""The architecture holds: layers import downward only, no cycles, kernels know nothing of the
pipeline, and a kernel is added by writing one class, with no engine change."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from kernels import BatchContext, Kernel, KernelError, KernelParams, KernelSpec, KernelTraits, build_kernel, register
from pipeline.core.errors import OptionError
from pipeline.io import create_image, default_axes, open_image
from pipeline.steps.apply import run_kernel

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """import-linter's contracts in pyproject.toml: layers, kernels apart, no cycles."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a test dependency (pip install -e '.[test]')"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


class ScaleKernel(Kernel):
    """Multiplies by a factor: the smallest kernel there is, defined here, not in ``kernels``."""

    name = "test-scale"

    class Params(KernelParams):
        factor: float = 2.0
        ndim: int = 2

    def __init__(self, params: Params):
        super().__init__(params)
        self.traits = KernelTraits(ndim=params.ndim, in_channels=1, out_channels=1, halo=(0,) * params.ndim,
                                   input="raw", max_batch=4)

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        assert len(context.valid) == len(batch) == len(context.origins)
        return batch * self.params.factor


def test_a_kernel_class_runs_through_the_engine(tmp_path, client):
    """Defined in this file, named by its import path: workers import it, no engine change."""
    data = np.arange(30 * 20, dtype=np.uint16).reshape(30, 20)
    url = str(tmp_path / "in.ome.zarr")
    create_image(url, shape=data.shape, dtype=np.uint16, axes=default_axes("yx"), chunks=(8, 8), n_levels=1).write(
        (slice(None), slice(None)), data)
    summary = run_kernel(url, str(tmp_path / "out.ome.zarr"), KernelSpec.of_class(ScaleKernel, factor=3.0), client,
                         tile_shape=(8, 8), batch=3, progress=False)
    assert summary.tiles == 12
    out = open_image(str(tmp_path / "out.ome.zarr")).read((slice(None), slice(None)))
    np.testing.assert_array_equal(out, data * 3.0)


def test_register_makes_a_class_buildable_by_name_in_process():
    register(ScaleKernel)
    assert build_kernel(KernelSpec.of("test-scale", factor=5.0)).run(np.ones((1, 1, 2, 2), np.float32)).max() == 5.0


def test_unknown_kernels_and_parameters_are_one_line_errors():
    with pytest.raises(KernelError, match="Unknown kernel 'gausian'; available: .*gaussian"):
        build_kernel(KernelSpec.of("gausian"))
    with pytest.raises(KernelError, match="Kernel 'gaussian': sigmaa: Extra inputs"):
        build_kernel(KernelSpec.of("gaussian", sigma=[1, 1], sigmaa=2))
    with pytest.raises(KernelError, match="halo needs one non-negative size per spatial axis"):
        KernelTraits(ndim=2, in_channels=1, out_channels=1, halo=(1, 2, 3))


def test_engine_turns_kernel_errors_into_option_errors(tmp_path):
    from pipeline.engine.runner import build_checked

    with pytest.raises(OptionError, match="Unknown kernel"):
        build_checked(KernelSpec.of("no-such-kernel"))


def test_old_module_paths_still_import_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import importlib

        sys.modules.pop("pipeline.tables", None)
        old = importlib.import_module("pipeline.tables")
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    from pipeline.io.tables import read_table
    from pipeline.steps.measure import partial_stats

    assert old.read_table is read_table and old.partial_stats is partial_stats


def test_every_builtin_kernel_is_an_entry_point():
    from kernels import available_kernels

    assert {"gaussian", "convnet", "identity", "denoise", "segment-classical", "segment-unet",
            "relabel"} <= set(available_kernels())
