"""Memory is bounded by the block, not the volume: a multi-GB sample with small peak RSS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.measure import run_measured


@pytest.mark.slow
def test_multi_gb_lightsheet_has_bounded_memory(tmp_path):
    out = tmp_path / "big.ome.zarr"
    shape = (128, 1536, 1536)  # raw uint16 + clean float32 + labels uint32 = 3.0 GB of voxels
    nbytes = 128 * 1536 * 1536 * (2 + 4 + 4)
    m = run_measured(
        [sys.executable, "-m", "pipeline.cli", "-q", "sample", "lightsheet", str(out),
         "--shape", ",".join(map(str, shape)), "--workers", "2"])
    peak_total, peak_one, seconds = m["peak_rss_total"], m["peak_rss_largest"], m["seconds"]
    written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print(f"\n{nbytes / 2**30:.2f} GiB of voxels ({written / 2**30:.2f} GiB on disk) in {seconds:.0f} s; "
          f"peak RSS {peak_total / 2**20:.0f} MiB total, {peak_one / 2**20:.0f} MiB largest process")
    # Three Python processes (client + 2 workers) start at ~0.5 GB together; each worker then
    # holds about one block's working set. Neither grows with the volume.
    assert peak_total < nbytes / 2, "memory grew with the volume"
    assert peak_one < 768 * 2**20, "one process held far more than a block"
