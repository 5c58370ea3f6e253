"""Cloud as a declared path: info, run-kernel, segment and resume against a real S3 API
(moto's server, on loopback), the way a user runs them: credentials and endpoint from the
environment, which every worker process inherits."""

from __future__ import annotations

import socket
import uuid

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
    bucket = f"tilewise-test-{uuid.uuid4().hex[:8]}"  # moto keeps its buckets across servers in one process
    fs.mkdir(bucket)
    yield f"s3://{bucket}", fs
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
    from pipeline.engine.manifest import marker_tiles

    markers = fs.ls(f"{bucket}/smooth.ome.zarr/_tilewise/done")
    first = next(m for m in markers if 0 in marker_tiles(m.rsplit("/", 1)[1]))
    fs.rm(first)  # as if interrupted before the task holding tile 0 finished
    assert main(run) == 0
    lost = len(marker_tiles(first.rsplit("/", 1)[1]))
    assert f"{lost} tiles computed" in capsys.readouterr().out  # resumed: only the tiles of that marker

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


def test_a_slide_file_on_s3_is_read_in_place_and_segments_as_the_local_file(tmp_path, client, s3):
    """An SVS slide in a bucket (tiffslide over s3fs): the same pixels at every level as the
    local file, and the same objects when segmented with its glass skipped."""
    from pipeline.data import make_wholeslide
    from pipeline.data.slidefile import write_slide
    from pipeline.io import open_image
    from tests.test_stitch import assert_same_objects

    bucket, fs = s3
    urls = make_wholeslide(str(tmp_path / "w.ome.zarr"), client, shape=(512, 768), seed=2, chunks=(256, 256),
                           progress=False)
    local = write_slide(open_image(urls["image"]), str(tmp_path / "w.svs"), flavour="svs", tile=128)
    fs.put(local, f"{bucket}/slides/w.svs")
    remote = open_image(f"{bucket}/slides/w.svs")
    here = open_image(local)
    assert remote.dims == ("c", "y", "x") and len(remote.levels) == len(here.levels) > 1
    assert remote.spatial_scale(0) == here.spatial_scale(0)
    for k in range(len(here.levels)):
        np.testing.assert_array_equal(remote.read((slice(None),) * 3, k), here.read((slice(None),) * 3, k))

    for source, out in ((f"{bucket}/slides/w.svs", f"{bucket}/seg.ome.zarr"), (local, str(tmp_path / "seg.ome.zarr"))):
        assert main(["-q", "segment", source, out, "--classical", "--tissue", "--tile", "256,256",
                     "--workers", "1"]) == 0
    a = open_image(f"{bucket}/seg.ome.zarr/labels/nuclei").read((slice(None),) * 2)
    b = open_image(str(tmp_path / "seg.ome.zarr/labels/nuclei")).read((slice(None),) * 2)
    assert a.max() > 10
    assert_same_objects(a, b)
