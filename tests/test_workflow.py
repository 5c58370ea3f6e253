"""Workflows: the YAML format's validation, Python API == YAML, resume after an interruption,
the shipped workflows, and the lightsheet workflow end to end on a small sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.core.errors import InputError, TilewiseError
from pipeline.workflow import (
    Denoise,
    Embed,
    Evaluate,
    Pipeline,
    Report,
    Segment,
    TrainDenoiser,
    TrainSegmenter,
    load_workflow,
    parse_workflow,
    run_workflow,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "workflows").glob("*.yaml"))


def test_shipped_workflows_validate():
    assert {p.name for p in SHIPPED} >= {"lightsheet.yaml", "wholeslide.yaml", "denoise.yaml"}
    for path in SHIPPED:
        workflow = load_workflow(str(path))
        assert workflow.steps and workflow.name == path.stem


@pytest.mark.parametrize("steps, message", [
    ([{"step": "segment", "diamter": 5}], "steps[0] (segment).diamter: unknown key"),
    ([{"step": "segmnet"}], "unknown step"),
    ([{"name": "x"}], "needs 'step:'"),
    ([{"step": "segment", "iou": "high"}], "steps[0] (segment).iou"),
    ([{"step": "denoise"}], "steps[0] (denoise).model: missing"),
    ([{"step": "embed", "labels": "cells"}], "labels 'cells' must name an earlier segment step"),
    ([{"step": "segment", "model": "seg"}, {"step": "train-segmenter", "name": "seg"}],
     "model 'seg' must name an earlier train-segmenter step"),
    ([{"step": "train-denoiser"}, {"step": "denoise", "model": "denoiser"},
      {"step": "denoise", "model": "denoiser", "name": "again"}], "denoises at most once"),
    ([{"step": "segment"}, {"step": "segment"}], "name 'nuclei' is used by an earlier step"),
    ([{"step": "train-denoiser", "method": "care"}], "method care trains on pairs: give target"),
    ([{"step": "kernel", "kernel": "gaussian", "name": "labels"}], "is a folder of the output"),
    ([{"step": "segment", "name": "a/b"}], "one path component"),
])
def test_invalid_workflows_fail_in_one_line_naming_the_key(steps, message):
    with pytest.raises(InputError) as err:
        parse_workflow({"steps": steps}, source="w.yaml")
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith("w.yaml: ")


def test_invalid_workflow_files_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - step: segment\n    model: [unclosed\n")
    assert main(["run", str(bad), "--check"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("name: x\nstep: []\n")
    assert main(["run", str(bad), "--check"]) == 2
    assert "step: unknown key" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml"), "--check"]) == 2
    ok = tmp_path / "ok.yaml"
    ok.write_text("steps:\n  - step: segment\n    model: no/such/model\n")
    assert main(["-q", "run", str(ok), str(tmp_path / "in.zarr"), str(tmp_path / "out")]) == 2
    capsys.readouterr()
    # trained models are local folders: a workflow that trains into an object store is refused first
    ok.write_text("steps:\n  - step: train-denoiser\n  - step: denoise\n    model: denoiser\n")
    assert main(["-q", "run", str(ok), str(tmp_path / "in.zarr"), "s3://bucket/out.ome.zarr"]) == 2
    assert "must be a local path" in capsys.readouterr().err


def _steps():
    """The lightsheet chain, sized for a test: a few training steps (so the U-Net's labels
    'unet' may be empty; its uncertainty maps are written all the same), and the classical
    watershed's 'nuclei' for the objects that are embedded and scored."""
    return [TrainDenoiser(steps=6, batch=2, patch=[8, 32, 32]), Denoise(model="denoiser", tta="off"),
            TrainSegmenter(steps=6, batch=2, patch=[8, 32, 32], width=8, depth=2, uncertainty="adf"),
            Segment(name="unet", model="segmenter", rescale=False), Segment(name="nuclei"),
            Embed(model="segmenter", seeds=1), Evaluate(), Report()]


def _yaml(path: Path) -> str:
    path.write_text("""
name: small
steps:
  - {step: train-denoiser, steps: 6, batch: 2, patch: [8, 32, 32]}
  - {step: denoise, model: denoiser, tta: "off"}
  - {step: train-segmenter, steps: 6, batch: 2, patch: [8, 32, 32], width: 8, depth: 2, uncertainty: adf}
  - {step: segment, name: unet, model: segmenter, rescale: false}
  - {step: segment}
  - {step: embed, model: segmenter, seeds: 1}
  - {step: evaluate}
  - {step: report}
""")
    return str(path)


def _arrays(out: Path) -> dict[str, np.ndarray]:
    import zarr

    found = {}
    for path in ("0", "labels/nuclei/0", "labels/unet/0", "uncertainty/entropy/0"):
        if (out / path).exists():
            found[path] = zarr.open_array(str(out / path), mode="r")[:]
    return found


def _table(out: Path):
    from pipeline.io.tables import read_table

    return read_table(str(out), "nuclei")


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory, client):
    from pipeline.data.synthetic import make_lightsheet

    path = tmp_path_factory.mktemp("wf") / "in.ome.zarr"
    make_lightsheet(str(path), client, shape=(16, 64, 64), seed=3, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def api_run(small_sample, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "out.ome.zarr"
    pipe = Pipeline(_steps(), name="small")
    summary = run_workflow(pipe.workflow, small_sample, str(out), client, progress=False)
    return out, summary


def test_workflow_writes_the_documented_layout_and_provenance(api_run, small_sample):
    out, summary = api_run
    for path in ("zarr.json", "labels/nuclei", "tables/nuclei", "uncertainty/entropy", "models/denoiser/card.json",
                 "models/segmenter", "reports/evaluate/evaluation.json", "reports/report.html",
                 "_tilewise/provenance.json"):
        assert (out / path).exists(), path
    prov = json.loads((out / "_tilewise/provenance.json").read_text())
    assert prov["input"] == small_sample and prov["input_fingerprint"]
    assert set(prov["steps"]) == {"denoiser", "denoised", "segmenter", "unet", "nuclei", "embed", "evaluate",
                                  "report"}
    assert prov["models"]["segmenter"]["weights_sha256"] and prov["versions"]["torch"]
    assert prov["workflow"]["steps"][0]["steps"] == 6  # the workflow as run, every default written out
    table = _table(out)
    assert "embed_trained" in table and len(table) == summary.steps["nuclei"]["summary"]["objects"] > 0
    from pipeline.info import describe

    assert "workflow 'small'" in describe(str(out))
    # the output opens in the NGFF tools as one image with its labels
    import ome_zarr.io
    import ome_zarr.reader

    nodes = list(ome_zarr.reader.Reader(ome_zarr.io.parse_url(str(out)))())
    assert any("labels" in str(n.zarr) for n in nodes[1:])


def test_yaml_gives_the_same_store_as_the_python_api(api_run, small_sample, tmp_path):
    out_api, _ = api_run
    out = tmp_path / "yaml.ome.zarr"
    assert main(["-q", "run", _yaml(tmp_path / "small.yaml"), small_sample, str(out), "--workers", "1"]) == 0
    a, b = _arrays(out_api), _arrays(out)
    assert set(a) == set(b) == {"0", "labels/nuclei/0", "labels/unet/0", "uncertainty/entropy/0"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ta, tb = _table(out_api), _table(out)
    assert list(ta.columns) == list(tb.columns)
    np.testing.assert_allclose(np.stack(ta["embed_trained"]), np.stack(tb["embed_trained"]), rtol=1e-5, atol=1e-6)


def test_interrupted_workflow_resumes_to_the_same_store(api_run, small_sample, client, tmp_path, monkeypatch):
    from pipeline.workflow import execute

    out_api, _ = api_run
    out = tmp_path / "resumed.ome.zarr"
    workflow = Pipeline(_steps(), name="small").workflow

    def interrupted(step, ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(execute.RUNNERS, Embed, interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_workflow(workflow, small_sample, str(out), client, progress=False)
    assert not (out / "_tilewise/provenance.json").exists()  # nothing presented as finished
    monkeypatch.undo()
    summary = run_workflow(workflow, small_sample, str(out), client, progress=False)
    assert [name for name, s in summary.steps.items() if s["resumed"]] == ["denoiser", "denoised", "segmenter",
                                                                           "unet", "nuclei"]
    a, b = _arrays(out_api), _arrays(out)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # another workflow into the same output is refused, naming what differs
    other = Pipeline(_steps()[:3], name="small").workflow
    with pytest.raises(TilewiseError, match="another workflow"):
        run_workflow(other, small_sample, str(out), client, progress=False)


def test_report_opens_in_a_real_browser_with_every_image(api_run):
    playwright = pytest.importorskip("playwright.sync_api")
    out, _ = api_run
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=_chromium())
        except Exception as exc:  # no browser on this machine: said, not hidden
            pytest.skip(f"no headless chromium: {exc}")
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "reports/report.html").as_uri())
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        browser.close()
    assert len(images) >= 3 and all(done and width > 0 for done, width in images), images
    assert not errors, errors


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")
