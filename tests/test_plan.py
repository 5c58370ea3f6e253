"""pipeline.engine.plan: tiles cover the volume exactly once, aligned to chunks, with correct halos."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.core.errors import OptionError
from pipeline.core.regions import is_aligned
from pipeline.engine.plan import make_plan


@pytest.mark.parametrize("shape, unit, halo", [
    ((37, 101, 99), (8, 32, 32), {"z": 3, "y": 5, "x": 5}),
    ((3, 130, 70), (1, 64, 64), {"y": 40, "x": 70}),  # halo larger than a tile and than x itself
    ((101, 57), (32, 16), {"y": 0, "x": 2}),
])
def test_cores_tile_the_volume_once_and_align_to_chunks(shape, unit, halo):
    dims = "zyx" if len(shape) == 3 and "z" in halo else ("cyx" if len(shape) == 3 else "yx")
    plan = make_plan(shape, dims, unit, halo, tile_shape=[2 * u for u in unit])
    cover = np.zeros(shape, np.int32)
    for tile in plan:
        assert is_aligned(tile.core, shape, unit)
        cover[tile.core] += 1
        expected = tuple(c + 2 * h for c, h in zip(tile.core_shape, plan.halo))
        padded = plan.padded(np.zeros([r.stop - r.start for r in tile.read]), tile)
        assert padded.shape == expected
    assert (cover == 1).all()
    assert [t.id for t in plan] == list(range(len(plan)))


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
def test_padded_tile_equals_padded_volume(mode):
    rng = np.random.default_rng(0)
    data = rng.random((19, 45, 33))
    halo = {"z": 4, "y": 7, "x": 40}
    plan = make_plan(data.shape, "zyx", (8, 16, 16), halo, pad_mode=mode, tile_shape=(8, 16, 16))
    whole = np.pad(data, [(h, h) for h in plan.halo], mode=mode)
    for tile in plan:
        block = plan.padded(data[tile.read], tile)
        window = tuple(slice(sl.start, sl.stop + 2 * h) for sl, h in zip(tile.core, plan.halo))
        np.testing.assert_array_equal(block, whole[window])


def test_crop_stitching_equals_untiled_filter():
    data = np.random.default_rng(1).random((23, 61, 47)).astype(np.float32)
    sigma = (1.0, 2.0, 2.0)
    halo = {d: int(4 * s + 0.5) for d, s in zip("zyx", sigma)}
    plan = make_plan(data.shape, "zyx", (8, 16, 16), halo)
    whole = ndimage.gaussian_filter(np.pad(data, [(h, h) for h in plan.halo], mode="reflect"), sigma, truncate=4.0)
    untiled = whole[tuple(slice(h, h + n) for h, n in zip(plan.halo, data.shape))]
    tiled = np.zeros_like(data)
    for tile in plan:
        out = ndimage.gaussian_filter(plan.padded(data[tile.read], tile), sigma, truncate=4.0)
        tiled[tile.core] = out[tile.crop]
    assert np.abs(tiled - untiled).max() <= 1e-5


def test_foreground_mask_skips_empty_tiles():
    plan = make_plan((64, 64), "yx", (16, 16), {"y": 2, "x": 2}, tile_shape=(16, 16))
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = True  # top-left corner only
    keep = plan.foreground_ids(mask)
    assert 0 in keep and len(keep) < len(plan) // 2


def test_bad_options():
    with pytest.raises(OptionError, match="padding mode"):
        make_plan((10, 10), "yx", (5, 5), {}, pad_mode="wrap-ish")
    with pytest.raises(OptionError, match="does not have"):
        make_plan((10, 10), "yx", (5, 5), {"z": 3})


def test_plan_of_a_terabyte_volume_is_instant():
    plan = make_plan((2048, 16384, 16384), "zyx", (64, 256, 256), {"z": 8, "y": 16, "x": 16}, itemsize=2)
    assert len(plan) > 10_000
    last = plan.tile(len(plan) - 1)
    assert last.core[2].stop == 16384 and last.pad[2] == (0, 16)
