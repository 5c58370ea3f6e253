"""Fused chains (denoise + segment in one task per tile): the same store as the two steps run one
after the other, and an interrupted fused run resumes to it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.workflow import Denoise, Pipeline, Segment, TrainDenoiser, run_workflow

ARRAYS = ("0", "1", "labels/nuclei/0", "labels/nuclei/1")


@pytest.fixture(scope="module")
def chain_input(tmp_path_factory, client):
    """A sample whose shape is not a multiple of the tile (6 tiles of 16 x 32 x 32), and a
    denoiser trained on it."""
    from pipeline.data.synthetic import make_lightsheet

    root = tmp_path_factory.mktemp("fused")
    sample = str(root / "in.ome.zarr")
    make_lightsheet(sample, client, shape=(16, 64, 72), chunks=(8, 32, 32), seed=3, progress=False)
    models = root / "models.ome.zarr"
    run_workflow(Pipeline([TrainDenoiser(steps=30, batch=2, patch=[8, 32, 32])]).workflow, sample, str(models), client,
                 progress=False)
    return sample, str(models / "models" / "denoiser")


def _chain(model: str, *, fuse: bool):
    steps = [Denoise(model=model, tta="off"), Segment(name="nuclei")]
    return Pipeline(steps, engine={"fuse": fuse, "tile": [16, 32, 32]}).workflow


@pytest.fixture(scope="module")
def unfused(chain_input, client, tmp_path_factory):
    sample, model = chain_input
    out = tmp_path_factory.mktemp("unfused") / "out.ome.zarr"
    summary = run_workflow(_chain(model, fuse=False), sample, str(out), client, progress=False)
    assert not summary.steps["nuclei"]["summary"].get("fused")
    return out, summary


def _arrays(out: Path) -> dict[str, np.ndarray]:
    import zarr

    return {key: zarr.open_array(str(out / key), mode="r")[:] for key in ARRAYS}


def _same_store(fused: Path, unfused: Path) -> None:
    from pipeline.io.tables import read_table

    a, b = _arrays(fused), _arrays(unfused)
    # the denoiser ran over other block shapes: float tolerance (tiled == untiled), not bits
    scale = float(np.abs(b["0"]).max())
    for key in ("0", "1"):
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5 * scale, err_msg=key)
    for key in ("labels/nuclei/0", "labels/nuclei/1"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len(np.unique(a["labels/nuclei/0"])) > 2  # objects were found, and found alike
    ta, tb = read_table(str(fused), "nuclei"), read_table(str(unfused), "nuclei")
    np.testing.assert_array_equal(ta["label"], tb["label"])
    np.testing.assert_allclose(ta["voxels"], tb["voxels"])
    np.testing.assert_allclose(ta["intensity_mean"], tb["intensity_mean"], rtol=1e-4)


def test_fused_chain_writes_the_unfused_store(chain_input, unfused, client, tmp_path):
    sample, model = chain_input
    unfused, alone = unfused
    out = tmp_path / "fused.ome.zarr"
    summary = run_workflow(_chain(model, fuse=True), sample, str(out), client, progress=False)
    assert summary.steps["denoised"]["summary"]["fused"] and summary.steps["nuclei"]["summary"]["fused"]
    _same_store(out, unfused)
    # the denoise step's markers are the unfused step's: its residual report is read from them
    assert summary.steps["denoised"]["summary"]["residual_std_median"] == pytest.approx(
        alone.steps["denoised"]["summary"]["residual_std_median"], rel=1e-3)


def test_interrupted_fused_chain_resumes_to_the_same_store(chain_input, unfused, client, tmp_path, monkeypatch):
    from pipeline.steps import segment

    sample, model = chain_input
    unfused, _ = unfused
    out = tmp_path / "resumed.ome.zarr"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(segment, "match_tiles", interrupted)  # after every fused tile finished
    with pytest.raises(KeyboardInterrupt):
        run_workflow(_chain(model, fuse=True), sample, str(out), client, progress=False)
    assert not (out / "_tilewise/workflow/denoised.json").exists()
    monkeypatch.undo()
    run_workflow(_chain(model, fuse=True), sample, str(out), client, progress=False)
    _same_store(out, unfused)


def test_fused_source_reads_what_the_denoise_step_stored(chain_input, unfused, client):
    """The computed image, read at any region, is the stored denoised image (float tolerance)."""
    import zarr

    from pipeline.engine.fused import FusedSource
    from pipeline.engine.runner import EngineOptions
    from pipeline.steps.apply import begin_dense
    from pipeline.steps.denoise import model_spec

    sample, model = chain_input
    unfused, _ = unfused
    dense = begin_dense(sample, str(unfused), model_spec(model), client,
                        EngineOptions(workspace="_tilewise/steps/denoised", tile_shape=(16, 32, 32), progress=False),
                        name="denoised")
    source = FusedSource.of(dense.job)
    stored = zarr.open_array(str(unfused / "0"), mode="r")
    region = (slice(3, 15), slice(20, 61), slice(5, 72))
    np.testing.assert_allclose(source.read(region), stored[region], rtol=0, atol=1e-5 * float(np.abs(stored[:]).max()))
    assert source.level_url() == dense.setup.source.level_url(0)  # a resume fingerprints the input
