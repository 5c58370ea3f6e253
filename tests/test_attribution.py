"""Attribution kernels and `tilewise explain`: completeness, locality, crop == whole image,
tiled == untiled, the cheating check, and the command line."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import KernelSpec, build_kernel
from kernels.modelfile import ModelCard, save_model
from kernels.unet import UNet, UNetConfig, receptive_field
from pipeline.steps.explain import explain


def _model(folder, task: str, *, depth: int = 2, width: int = 8, seed: int = 0) -> str:
    """A small U-Net with random weights saved as a model folder of ``task``."""
    import torch

    torch.manual_seed(seed)
    out = 3 if task == "segment" else 1
    config = UNetConfig(ndim=2, in_channels=1, out_channels=out, depth=depth, width=width, norm="none")
    net = UNet(config)
    card = ModelCard(task=task, method="unet3class" if task == "segment" else "n2s",
                     architecture=config.to_dict(), normalisation={"low": [0.0], "high": [1.0]})
    save_model(folder, net.state_dict(), card)
    return str(folder)


def _kernel(model: str, **params):
    kernel = build_kernel(KernelSpec.of("attribution", model=model, **params))
    kernel.load("cpu")
    return kernel


def _blob_image(shape=(128, 128), centre=(64, 60), radius=7, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    mask = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2
    image = (0.2 + 0.6 * mask + rng.normal(0, 0.05, shape)).astype(np.float32)
    return image, mask


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attr-models")
    return {task: _model(folder / task, task) for task in ("segment", "denoise")}


@pytest.mark.parametrize("task", ["segment", "denoise"])
def test_integrated_gradients_are_complete(models, task):
    """Attributions sum to target(input) - target(baseline), to the midpoint rule's error."""
    image, mask = _blob_image((64, 64), (32, 30))
    kernel = _kernel(models[task], method="ig", steps=64)
    out = kernel.explain(image[None, None], mask[None], np.zeros((1, 2), int))
    delta = float(out["value"][0] - out["baseline_value"][0])
    assert abs(delta) > 1e-3
    assert float(out["completeness_error"][0]) < 0.02 * abs(delta), (out["completeness_error"], delta)
    assert abs(float(out["attribution"][0].sum()) - delta) == pytest.approx(float(out["completeness_error"][0]),
                                                                            abs=1e-6)


def test_integrated_gradients_double_their_steps_until_complete(models):
    """Without ``steps`` a target whose 32-point path misses completeness (a steep softmax: the
    image at 50x contrast) gets more points until the error is within tolerance; given steps
    are kept as they are."""
    from kernels.attribution import IG_FIRST_STEPS, IG_FLOOR, IG_TOLERANCE

    image, mask = _blob_image((64, 64), (32, 30))
    args = (50.0 * image[None, None], mask[None], np.zeros((1, 2), int))
    fixed = _kernel(models["segment"], method="ig", steps=IG_FIRST_STEPS).explain(*args)
    auto = _kernel(models["segment"], method="ig").explain(*args)
    tolerance = IG_TOLERANCE * abs(float(auto["value"][0] - auto["baseline_value"][0])) + IG_FLOOR
    assert fixed["steps"][0] == IG_FIRST_STEPS and fixed["completeness_error"][0] > tolerance
    assert auto["steps"][0] > IG_FIRST_STEPS and auto["completeness_error"][0] <= tolerance


def test_occlusion_is_zero_where_the_output_cannot_see(models):
    """Windows beyond the receptive field of the target's pixels change nothing: exactly zero;
    windows on the object do change the target."""
    image, mask = _blob_image((128, 128), (40, 40), radius=5)
    kernel = _kernel(models["segment"], method="occlusion", window=[6, 6], stride=[6, 6])
    attr = kernel.explain(image[None, None], mask[None], np.zeros((1, 2), int))["attribution"][0]
    reach = max(receptive_field(kernel.config).low + receptive_field(kernel.config).high) + 6
    far = np.ones_like(mask)
    far[max(0, 40 - 5 - reach):40 + 5 + reach + 1, max(0, 40 - 5 - reach):40 + 5 + reach + 1] = False
    assert far.sum() > 1000 and np.abs(attr[far]).max() == 0.0
    assert np.abs(attr[mask]).max() > 0


@pytest.mark.parametrize("method, centre", [("ig", (40, 44)), ("ig", (9, 86)), ("occlusion", (9, 86))])
def test_evaluating_only_the_targets_reach_changes_nothing(models, method, centre):
    """The kernel evaluates occlusion and integrated gradients on the part of the crop the
    target depends on (its box grown by the receptive field); the brute force over the whole
    crop (every window, every pixel's gradient) gives the same map, at the crop's edge too:
    to 1e-9 in float64 (and through ``explain`` in float32), where the far field of this small
    random network (~1e-7) would show if the reach were cut short."""
    import torch

    from kernels.attribution import integrated_gradients, occlusion, reach_of

    image, mask = _blob_image((96, 96), centre, radius=6)
    kernel = _kernel(models["denoise"], method=method, window=[8, 8], stride=[4, 4], steps=16)
    fast = kernel.explain(image[None, None], mask[None], np.asarray([[4, 8]]))
    reach = reach_of(mask, kernel.reach.low, kernel.reach.high, kernel.config.factor)
    assert all(r.stop - r.start < 96 for r in reach)

    def maps(x, m, reach):
        def target(batch):
            return (kernel.output_map(batch) * m).flatten(1).sum(1) / m.sum()

        lead = (slice(None), slice(None))
        if method == "occlusion":
            attr, value = occlusion(target, x, torch.zeros_like(x), (8, 8), (4, 4), (4, 8), reach=reach)
            return attr[0].numpy(), value
        part, value, _ = integrated_gradients(target, x[lead + reach], torch.zeros_like(x[lead + reach]), 16)
        attr = np.zeros(x.shape[2:])
        attr[reach] = part[0].sum(0).numpy()
        return attr, value

    kernel.net.double()
    x = torch.from_numpy(image[None, None].astype(np.float64))
    m = torch.from_numpy(mask[None].astype(np.float64))
    slow, value = maps(x, m, tuple(slice(0, n) for n in mask.shape))
    quick, quick_value = maps(x, m[(slice(None),) + reach], reach)
    assert np.abs(slow).max() > 0 and quick_value == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(quick, slow, rtol=1e-9, atol=1e-15)
    # the kernel's own float32 path, against the float64 brute force
    np.testing.assert_allclose(fast["attribution"][0], slow, rtol=1e-4, atol=1e-6 * abs(value))


@pytest.mark.parametrize("method", ["ig", "occlusion", "gradcam"])
def test_an_aligned_crop_gives_the_whole_image_map(models, method):
    """The crop ``explain`` cuts (box + receptive field (+ window), on the pooling grid) gives
    the whole image's attribution inside it, and the whole image's is zero outside it."""
    from pipeline.steps.explain import crop_of

    image, mask = _blob_image((128, 128), (60, 66), radius=6)
    kernel = _kernel(models["segment"], method=method, window=[8, 8], stride=[8, 8], steps=16)
    whole = kernel.explain(image[None, None], mask[None], np.zeros((1, 2), int))["attribution"][0]
    box = (slice(48, 72), slice(54, 78))
    crop = crop_of(box, kernel.margin, kernel.config.factor)
    assert all(c.start > 0 and c.stop < 128 for c in crop)
    part = kernel.explain(image[crop][None, None], mask[crop][None],
                          np.asarray([[c.start for c in crop]]))["attribution"][0]
    if method == "gradcam":  # defined inside the crop less one receptive field
        inner = tuple(slice(h, n - h) for h, n in zip(kernel.margin, part.shape))
        assert np.abs(part[inner]).max() > 0
        np.testing.assert_allclose(part[inner], whole[crop][inner], rtol=1e-4, atol=1e-6)
    else:
        np.testing.assert_allclose(part, whole[crop], rtol=1e-4, atol=1e-6)
        outside = np.ones_like(mask)
        outside[crop] = False
        assert np.abs(whole[outside]).max() < 1e-6


@pytest.fixture(scope="module")
def segmented(tmp_path_factory, client):
    """A 2D and a 3D image with objects, labels/nuclei and their table, and a segment model each."""
    from test_segment import segmented_blobs

    out = {}
    for ndim, shape, chunks, scale, pool in (((2, (90, 77), (16, 16), (1.0, 1.0), ())),
                                             (3, (12, 40, 36), (6, 16, 16), (2.0, 1.0, 1.0), (1, 2, 2))):
        root = tmp_path_factory.mktemp(f"x{ndim}")
        seg = segmented_blobs(root, client, shape, chunks, scale, 8 if ndim == 2 else 4, 5.0, seed=ndim + 20)
        config = UNetConfig(ndim=ndim, in_channels=1, out_channels=3, depth=2, width=4, norm="none", pool=pool)
        import torch

        torch.manual_seed(ndim)
        save_model(root / "model", UNet(config).state_dict(),
                   ModelCard(task="segment", method="unet3class", architecture=config.to_dict(),
                             normalisation={"percentiles": [1.0, 99.9]}))
        out[ndim] = (seg, str(root / "model"), shape)
    return out


@pytest.mark.parametrize("ndim, method", [(2, "ig"), (2, "gradcam"), (2, "occlusion"), (3, "ig")])
def test_explain_tiled_equals_untiled_with_table_and_panels(segmented, client, tmp_path, ndim, method):
    from pipeline.io import open_image
    from pipeline.io.tables import read_table

    seg, model, shape = segmented[ndim]
    kw = dict(model=model, method=method, objects="all" if ndim == 2 else [1, 2], steps=8, window=8.0,
              stride=8.0, panels=2, progress=False)
    small = explain(seg, str(tmp_path / "small.ome.zarr"), client, tile_shape=(16,) * ndim if ndim == 2
                    else (6, 16, 16), **kw)
    whole = explain(seg, str(tmp_path / "whole.ome.zarr"), client, tile_shape=shape, **kw)
    assert small.tiles > 1 and whole.tiles == 1 and small.targets == whole.targets >= 2
    a = open_image(small.image).read((slice(None),) * ndim)
    b = open_image(whole.image).read((slice(None),) * ndim)
    assert a.shape == shape and np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert len(open_image(small.image).levels) >= 1
    ta, tb = read_table(str(tmp_path / "small.ome.zarr"), f"attribution_{method}"), \
        read_table(str(tmp_path / "whole.ome.zarr"), f"attribution_{method}")
    np.testing.assert_allclose(ta["attribution_inside"], tb["attribution_inside"], rtol=1e-5)
    assert ((ta["attribution_inside"] >= 0) & (ta["attribution_inside"] <= 1)).all()
    assert "centroid_x" in ta and len(small.panels) == 2
    with open(small.panels[0], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    if method == "ig":
        assert small.completeness_error_max is not None and np.isfinite(ta["completeness_error"]).all()
        assert (ta["ig_steps"] == 8).all()  # given steps are kept, and recorded


def test_inside_share_is_the_objects_part_of_the_mass():
    from pipeline.steps.explain import inside_share

    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    attr = np.zeros((8, 8))
    attr[mask] = 1.0
    assert inside_share(attr, mask) == 1.0
    attr[6, 6] = -4.0  # negative evidence off the object counts by its size
    assert inside_share(attr, mask) == pytest.approx(0.5)
    assert np.isnan(inside_share(np.zeros((8, 8)), mask))


def test_cli_explain_region_and_errors(segmented, tmp_path, capsys):
    from pipeline.cli import main

    seg, model, _ = segmented[2]
    out = str(tmp_path / "region.ome.zarr")
    assert main(["-q", "explain", seg, out, "--model", model, "--region", "20:40,30:50", "--steps", "4",
                 "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "1 targets" in text and "completeness error" in text
    assert main(["-q", "explain", seg, str(tmp_path / "e1"), "--model", model, "--region", "20:400,0:5",
                 "--workers", "1"]) == 2
    assert "--region '20:400,0:5'" in capsys.readouterr().err
    assert main(["-q", "explain", seg, str(tmp_path / "e2"), "--model", model, "--objects", "1,999",
                 "--workers", "1"]) == 2
    assert "[999]" in capsys.readouterr().err
    assert main(["-q", "explain", seg, out, "--model", model, "--region", "20:40,30:50", "--workers", "1"]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_attributions_on_a_gpu_run_without_tf32():
    """On CUDA the kernel turns cuDNN's TF32 off while it explains and puts the flag back after
    (occlusion's drops are differences of outputs: TF32 rounding stayed in them on an H200);
    on the CPU it touches nothing. The flag is a plain setting, so this runs without a GPU."""
    import torch

    from kernels.attribution import full_float32

    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        with full_float32("cuda:0"):
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is True
        with full_float32("cpu"):
            assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before
