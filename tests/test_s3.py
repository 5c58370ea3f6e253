"""Cloud as a declared path: info, run-kernel, segment and resume against a real S3 API
(moto's server, on loopback), the way a user runs them: credentials and endpoint from the
environment, which every worker process inherits."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from conftest import make_image
from pipeline.cli import main


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server for this test, with one bucket; yields (bucket URL, storage options)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("tilewise-test")
    yield "s3://tilewise-test", fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_info_run_kernel_segment_and_resume_on_s3(tmp_path, client, s3, capsys):
    bucket, fs = s3
    url, data, _ = make_image(tmp_path / "img.ome.zarr", client)
    fs.put(url, f"{bucket}/img.ome.zarr", recursive=True)
    remote = f"{bucket}/img.ome.zarr"

    assert main(["info", remote]) == 0
    assert "levels" in capsys.readouterr().out

    run = ["-q", "run-kernel", "gaussian", remote, f"{bucket}/smooth.ome.zarr", "--tile", "8,32,32", "--workers", "1"]
    assert main(run) == 0
    assert "computed" in capsys.readouterr().out
    fs.rm(f"{bucket}/smooth.ome.zarr/_tilewise/done/0")  # as if interrupted before tile 0 finished
    assert main(run) == 0
    assert "1 tiles computed" in capsys.readouterr().out  # resumed: only the missing tile

    local = ["-q", "run-kernel", "gaussian", url, str(tmp_path / "smooth.ome.zarr"), "--tile", "8,32,32",
             "--workers", "1"]
    assert main(local) == 0
    from pipeline.io import open_image

    a = open_image(f"{bucket}/smooth.ome.zarr").read((slice(None),) * 3)
    b = open_image(str(tmp_path / "smooth.ome.zarr")).read((slice(None),) * 3)
    np.testing.assert_array_equal(a, b)

    seg = ["-q", "segment", remote, f"{bucket}/seg.ome.zarr", "--classical", "--tile", "8,32,32", "--workers", "1"]
    assert main(seg) == 0
    assert "objects" in capsys.readouterr().out
    assert main(seg) == 0  # a finished run is recognised, not recomputed
    assert fs.exists(f"{bucket}/seg.ome.zarr/tables/nuclei/_attributes.json")


def test_a_missing_cloud_backend_is_a_one_line_error(capsys):
    assert main(["info", "gs://no-such-bucket/x.ome.zarr"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gcsfs" in err and "tilewise[gcs]" in err
