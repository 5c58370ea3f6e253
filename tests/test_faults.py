"""Bad input and faults, as a user meets them: each ends in a one-line error with exit code 2,
in bounded time, with the input byte-identical afterwards and no output claimed as finished.
Wherever it can, the problem is found before a cluster starts (``--workers 1`` would start one)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image, tree_digest
from pipeline.cli import main

RUN = ["-q", "run-kernel", "gaussian"]
OPTS = ["--workers", "1"]


def _image(path: Path, data: np.ndarray, chunks=None) -> str:
    from pipeline.io import create_image, default_axes

    sink = create_image(str(path), shape=data.shape, dtype=data.dtype, axes=default_axes("zyx"[-data.ndim:]),
                        chunks=chunks or data.shape, n_levels=1)
    sink.write((slice(None),) * data.ndim, data)
    return str(path)


def _attrs_file(image: Path) -> Path:
    return image / "zarr.json"


def _edit_multiscales(image: Path, edit) -> None:
    meta = json.loads(_attrs_file(image).read_text())
    edit(meta["attributes"]["ome"]["multiscales"][0])
    _attrs_file(image).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny trained 3D denoiser (seconds), copied per case before it is damaged."""
    from kernels.denoise import TrainConfig, train_denoiser
    from kernels.modelfile import ModelCard, save_model

    folder = tmp_path_factory.mktemp("model") / "m"
    cfg = TrainConfig(method="n2s", patch=(4, 16, 16), batch=2, steps=2, val_every=2, width=4, pool=(1, 2, 2))
    sample = lambda n, r: r.random((n, 1, 4, 16, 16)).astype(np.float32)  # noqa: E731
    result = train_denoiser(sample, sample(2, np.random.default_rng(0)), cfg, progress=False, device="cpu")
    save_model(folder, result.state_dict, ModelCard(task="denoise", method="n2s", architecture=result.config.to_dict(),
                                                    normalisation={"percentiles": [1.0, 99.9]}))
    return folder


def _copy_model(model: Path, tmp: Path) -> Path:
    dst = tmp / "model"
    shutil.copytree(model, dst)
    return dst


def _rehash(folder: Path) -> None:
    from kernels.modelfile import sha256_file

    card = json.loads((folder / "card.json").read_text())
    card["weights_sha256"] = sha256_file(folder / "weights.pt")
    (folder / "card.json").write_text(json.dumps(card))


class Payload:
    """What a malicious weights file would unpickle: a call. weights_only refuses it."""

    def __reduce__(self):
        return (os.getcwd, ())


# Each case: (name, setup(tmp, client, model) -> (argv, input path to keep intact or None), message part)
def _img(tmp, client):
    return make_image(tmp / "img.ome.zarr", client)[0]


def case_missing_input(tmp, client, model):
    return ["info", str(tmp / "nope.ome.zarr")], None


def case_not_a_store(tmp, client, model):
    (tmp / "notes.txt").write_text("hello")
    return RUN + [str(tmp / "notes.txt"), str(tmp / "o.ome.zarr")] + OPTS, tmp / "notes.txt"


def case_garbage_metadata(tmp, client, model):
    url = _img(tmp, client)
    _attrs_file(Path(url)).write_text("{ this is not json")
    return RUN + [url, str(tmp / "o.ome.zarr")] + OPTS, Path(url)


def case_multiscales_without_datasets(tmp, client, model):
    url = _img(tmp, client)
    _edit_multiscales(Path(url), lambda m: m.update(datasets=[]))
    return RUN + [url, str(tmp / "o.ome.zarr")] + OPTS, Path(url)


def case_dataset_path_not_a_string(tmp, client, model):
    url = _img(tmp, client)
    _edit_multiscales(Path(url), lambda m: m["datasets"][0].update(path=["0"]))
    return RUN + [url, str(tmp / "o.ome.zarr")] + OPTS, Path(url)


def case_axes_missing(tmp, client, model):
    url = _img(tmp, client)
    _edit_multiscales(Path(url), lambda m: m.pop("axes"))
    return RUN + [url, str(tmp / "o.ome.zarr")] + OPTS, Path(url)


def case_duplicate_axes(tmp, client, model):
    url = _img(tmp, client)
    _edit_multiscales(Path(url), lambda m: m["axes"][1].update(name="x"))
    return RUN + [url, str(tmp / "o.ome.zarr")] + OPTS, Path(url)


def case_truncated_chunk(tmp, client, model):
    url = _image(tmp / "img.ome.zarr", np.arange(8 * 32 * 32, dtype=np.uint16).reshape(8, 32, 32), (8, 16, 16))
    chunk = next(p for p in (Path(url) / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:7])
    return RUN + [url, str(tmp / "o.ome.zarr"), "--tile", "8,16,16"] + OPTS, Path(url)


def case_missing_chunk_refused(tmp, client, model):
    url = _image(tmp / "img.ome.zarr", np.arange(8 * 32 * 32, dtype=np.uint16).reshape(8, 32, 32) + 1, (8, 16, 16))
    next(p for p in (Path(url) / "0").rglob("*") if p.is_file() and p.name != "zarr.json").unlink()
    return RUN + [url, str(tmp / "o.ome.zarr"), "--tile", "8,16,16", "--missing-chunks", "error"] + OPTS, Path(url)


def case_input_edited_before_resume(tmp, client, model):
    url = _image(tmp / "img.ome.zarr", np.arange(8 * 32 * 32, dtype=np.uint16).reshape(8, 32, 32), (8, 16, 16))
    assert main(RUN + [url, str(tmp / "o.ome.zarr"), "--tile", "8,16,16"] + OPTS) == 0
    chunk = next(p for p in (Path(url) / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes())  # rewritten (same histogram, new version stamp)
    return RUN + [url, str(tmp / "o.ome.zarr"), "--tile", "8,16,16"] + OPTS, Path(url)


def case_nan_voxels(tmp, client, model):
    data = np.ones((8, 32, 32), np.float32)
    data[3, 4, 5] = np.nan
    url = _image(tmp / "img.ome.zarr", data)
    return ["-q", "run-kernel", "convnet", url, str(tmp / "o.ome.zarr")] + OPTS, Path(url)


def case_complex_dtype(tmp, client, model):
    url = _image(tmp / "img.ome.zarr", (np.ones((8, 16, 16)) * (1 + 2j)).astype(np.complex64))
    return RUN + [url, str(tmp / "o.ome.zarr")] + OPTS, Path(url)


def case_zero_tile(tmp, client, model):
    url = _img(tmp, client)
    return RUN + [url, str(tmp / "o.ome.zarr"), "--tile", "0,0,0"] + OPTS, Path(url)


def case_sigma_nan(tmp, client, model):
    url = _img(tmp, client)
    return RUN + [url, str(tmp / "o.ome.zarr"), "--sigma", "nan"] + OPTS, Path(url)


def case_sigma_huge(tmp, client, model):
    url = _img(tmp, client)
    return RUN + [url, str(tmp / "o.ome.zarr"), "--sigma", "1e6"] + OPTS, Path(url)


def case_output_is_input(tmp, client, model):
    url = _img(tmp, client)
    return RUN + [url, url, "--overwrite"] + OPTS, Path(url)


def case_output_inside_input(tmp, client, model):
    url = _img(tmp, client)
    return ["-q", "segment", url, f"{url}/seg", "--classical", "--overwrite"] + OPTS, Path(url)


def case_output_contains_input(tmp, client, model):
    (tmp / "project").mkdir()
    url = make_image(tmp / "project" / "img.ome.zarr", client)[0]
    return ["-q", "denoise", url, str(tmp / "project"), "--model", str(model), "--overwrite"] + OPTS, tmp / "project"


def case_model_missing(tmp, client, model):
    url = _img(tmp, client)
    return ["-q", "denoise", url, str(tmp / "o.ome.zarr"), "--model", str(tmp / "no-model")] + OPTS, Path(url)


def case_model_tampered(tmp, client, model):
    url, folder = _img(tmp, client), _copy_model(model, tmp)
    raw = bytearray((folder / "weights.pt").read_bytes())
    raw[-100] ^= 0xFF
    (folder / "weights.pt").write_bytes(bytes(raw))
    return ["-q", "denoise", url, str(tmp / "o.ome.zarr"), "--model", str(folder)] + OPTS, Path(url)


def case_model_card_edited(tmp, client, model):
    url, folder = _img(tmp, client), _copy_model(model, tmp)
    card = json.loads((folder / "card.json").read_text())
    card["architecture"]["width"] = 8  # the weights were trained with width 4
    (folder / "card.json").write_text(json.dumps(card))
    return ["-q", "denoise", url, str(tmp / "o.ome.zarr"), "--model", str(folder)] + OPTS, Path(url)


def case_model_pickle_payload(tmp, client, model):
    url, folder = _img(tmp, client), _copy_model(model, tmp)
    (folder / "weights.pt").write_bytes(pickle.dumps({"conv": Payload()}))
    _rehash(folder)  # even with a matching hash, nothing but tensors is loaded
    return ["-q", "denoise", url, str(tmp / "o.ome.zarr"), "--model", str(folder)] + OPTS, Path(url)


def case_model_wrong_task(tmp, client, model):
    url = _img(tmp, client)
    return ["-q", "segment", url, str(tmp / "o.ome.zarr"), "--model", str(model)] + OPTS, Path(url)


def case_scheduler_unreachable(tmp, client, model):
    url = _img(tmp, client)
    return RUN + [url, str(tmp / "o.ome.zarr"), "--scheduler", "tcp://127.0.0.1:9"], Path(url)


def case_scheduler_not_an_address(tmp, client, model):
    url = _img(tmp, client)
    return RUN + [url, str(tmp / "o.ome.zarr"), "--scheduler", "notanaddress"], Path(url)


def case_output_locked_by_a_running_job(tmp, client, model):
    import socket

    url = _img(tmp, client)
    out = tmp / "o.ome.zarr"
    assert main(RUN + [url, str(out), "--tile", "8,32,32"] + OPTS) == 0
    (out / "_tilewise" / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                             "token": "another-run", "started": "now"}))
    return RUN + [url, str(out), "--tile", "8,32,32", "--overwrite"] + OPTS, Path(url)


def case_labels_name_escapes_the_store(tmp, client, model):
    url = _img(tmp, client)
    return ["-q", "segment", url, str(tmp / "o.ome.zarr"), "--classical", "--name", "../../x"] + OPTS, Path(url)


def case_listed_labels_escape_the_store(tmp, client, model):
    url = _img(tmp, client)
    meta_file = Path(url) / "labels" / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["ome"]["labels"] = ["../../../x"]
    meta_file.write_text(json.dumps(meta))
    return ["info", url], Path(url)


def case_missing_cloud_backend(tmp, client, model):
    return RUN + ["gs://bucket/img.ome.zarr", str(tmp / "o.ome.zarr")] + OPTS, None


CASES = {
    "missing input": (case_missing_input, "does not exist"),
    "not a store": (case_not_a_store, "not a zarr store"),
    "garbage metadata": (case_garbage_metadata, "not a zarr store"),
    "multiscales without datasets": (case_multiscales_without_datasets, "no datasets"),
    "dataset path not a string": (case_dataset_path_not_a_string, "invalid NGFF metadata"),
    "axes missing": (case_axes_missing, "axes"),
    "duplicate axes": (case_duplicate_axes, "axis names must be unique"),
    "truncated chunk": (case_truncated_chunk, "cannot be decoded"),
    "missing chunk, --missing-chunks error": (case_missing_chunk_refused, "is missing"),
    "input edited before a resume": (case_input_edited_before_resume, "changed since this output was started"),
    "NaN voxels": (case_nan_voxels, "NaN or infinite"),
    "complex dtype": (case_complex_dtype, "complex"),
    "zero tile": (case_zero_tile, "positive sizes"),
    "sigma nan": (case_sigma_nan, "finite number"),
    "sigma huge": (case_sigma_huge, "less than or equal to 1000"),
    "output is the input": (case_output_is_input, "never writes into or deletes an input"),
    "output inside the input": (case_output_inside_input, "lies inside the input store"),
    "output contains the input": (case_output_contains_input, "contains the input"),
    "model missing": (case_model_missing, "not a tilewise model folder"),
    "model weights tampered": (case_model_tampered, "do not match their card"),
    "model card edited": (case_model_card_edited, "do not fit the architecture"),
    "model pickle payload": (case_model_pickle_payload, "not a plain state_dict"),
    "model of the wrong task": (case_model_wrong_task, "is a denoise model"),
    "scheduler unreachable": (case_scheduler_unreachable, "Cannot reach"),
    "scheduler not an address": (case_scheduler_not_an_address, "Cannot reach"),
    "output locked by a running job": (case_output_locked_by_a_running_job, "being written by another run"),
    "labels name escapes the store": (case_labels_name_escapes_the_store, "not a plain name"),
    "listed labels escape the store": (case_listed_labels_escape_the_store, "not a plain name"),
    "missing cloud backend": (case_missing_cloud_backend, "tilewise[gcs]"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fault_is_one_line_exit_2_and_the_input_is_untouched(name, tmp_path, client, model, capsys):
    setup, message = CASES[name]
    argv, keep = setup(tmp_path, client, model)
    before = tree_digest(keep) if keep is not None else None
    capsys.readouterr()
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("tilewise: error:")]
    assert code == 2, err[-5:]
    assert len(errors) == 1 and message in errors[0], err[-5:]
    assert seconds < 30, f"{name} took {seconds:.0f} s"
    if keep is not None:
        assert tree_digest(keep) == before
    for summary in tmp_path.rglob("_tilewise/summary.json"):  # nothing partial is claimed as finished
        pytest.fail(f"{summary} claims a finished run")


def test_a_one_pixel_image_is_processed(tmp_path, client):
    url = _image(tmp_path / "px.ome.zarr", np.array([[[7]]], np.uint16))
    assert main(RUN + [url, str(tmp_path / "o.ome.zarr")] + OPTS) == 0
    from pipeline.io import open_image

    assert open_image(str(tmp_path / "o.ome.zarr")).read((slice(None),) * 3).item() == pytest.approx(7)


def test_a_missing_chunk_is_read_as_fill_value_and_reported(tmp_path, client, caplog):
    """The default policy: zarr leaves out chunks that hold only the fill value, so an absent chunk
    is read as it, and every tile that read one is counted and reported, never silent."""
    data = np.arange(8 * 32 * 32, dtype=np.uint16).reshape(8, 32, 32) + 1
    url = _image(tmp_path / "img.ome.zarr", data, (8, 16, 16))
    next(p for p in (Path(url) / "0").rglob("*") if p.is_file() and p.name != "zarr.json").unlink()
    out = tmp_path / "o.ome.zarr"
    assert main(["-q", "run-kernel", "identity", url, str(out), "--tile", "8,16,16"] + OPTS) == 0
    assert "read input chunks that are not in the store" in caplog.text
    from pipeline.engine.manifest import RunManifest

    markers = RunManifest(str(out)).tile_metadata().values()
    assert len(markers) == 4 and sum(1 for m in markers if m["missing_input_chunks"]) == 1


def test_info_says_when_metadata_is_not_valid_ngff(tmp_path, client, capsys):
    """Readable but invalid metadata is reported (ome-zarr-models' verdict), not silently accepted."""
    url = _img(tmp_path, client)
    assert main(["info", url]) == 0
    assert "valid" in capsys.readouterr().out
    _edit_multiscales(Path(url), lambda m: m["datasets"][0]["coordinateTransformations"].extend(
        [{"type": "translation", "translation": [0, 0, 0]}] * 2))
    assert main(["info", url]) == 0
    assert "NOT VALID: multiscales.0.datasets.0.coordinateTransformations" in capsys.readouterr().out
