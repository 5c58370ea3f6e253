"""The tilewise CLI: --help everywhere, info output, exit code 2 with one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import make_image
from pipeline.cli import main


@pytest.mark.parametrize("command", [[], ["info"], ["sample"], ["convert"], ["run-kernel"]])
def test_help(command):
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *command, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: tilewise" in done.stdout


def test_info_shows_levels_labels_and_chunks(tmp_path, client, capsys):
    url, _, _ = make_image(tmp_path / "i.ome.zarr", client)
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert "[z,y,x]" in out and "uint16" in out and "level 0: shape 21 x 70 x 83  chunks 8 x 32 x 32" in out
    assert "labels/cells: uint32" in out and "channels: dapi" in out
    assert "level 1: " in out and "translation 0 x 0.2 x 0.2" in out  # half-pixel offsets of coarser levels


def test_sample_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "x.ome.zarr").mkdir()
    assert main(["-q", "sample", "lightsheet", str(tmp_path / "x.ome.zarr")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err


def test_sample_shape_rejected_for_real_images(tmp_path, capsys):
    assert main(["-q", "sample", "he", str(tmp_path / "h.ome.zarr"), "--shape", "10,10", "--workers", "1"]) == 2
    assert "fixed size" in capsys.readouterr().err


def test_info_on_missing_store_is_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.ome.zarr")]) == 2
    assert capsys.readouterr().err.startswith("tilewise: error: No store at")


def test_run_kernel_end_to_end_and_resume(tmp_path, client, capsys):
    url, data, _ = make_image(tmp_path / "i.ome.zarr", client)
    out = str(tmp_path / "o.ome.zarr")
    args = ["-q", "run-kernel", "gaussian", url, out, "--sigma", "1", "--tile", "8,32,32", "--workers", "2"]
    assert main(args) == 0
    assert "computed" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 tiles computed" in capsys.readouterr().out  # resumed: nothing left to do
    assert main(args[:-2] + ["--sigma", "2", "--workers", "2"]) == 2
    assert "other parameters" in capsys.readouterr().err


def test_run_kernel_prints_dashboard_and_takes_engine_options(tmp_path, client, capsys):
    url, data, _ = make_image(tmp_path / "i.ome.zarr", client)
    out = str(tmp_path / "o.ome.zarr")
    args = ["run-kernel", "convnet", url, out, "--depth", "2", "--width", "4", "--tile", "8,32,32",
            "--batch", "3", "--blend", "8,24,24", "--workers", "1"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "dashboard http" in captured.err and "computed" in captured.out
    import json

    params = json.load(open(f"{out}/_tilewise/run.json"))
    assert params["blend"]["window"] == [8, 24, 24] and params["halo"] == [0, 0, 0]
    assert main(args[:-6] + ["--blend", "8,24", "--workers", "1", "--overwrite"]) == 2
    assert "--blend needs one size or 3 sizes" in capsys.readouterr().err


def test_quiet_means_quiet(tmp_path):
    """-q: no progress bars and none of Dask's start-up INFO lines (in a fresh process, as users run it)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "-q", "sample", "lightsheet",
                           str(tmp_path / "q.ome.zarr"), "--shape", "8,32,32", "--workers", "1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "INFO" not in done.stderr and "distributed" not in done.stderr, done.stderr[-2000:]
