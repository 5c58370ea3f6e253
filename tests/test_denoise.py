"""Denoising: masking statistics, training lowers the masked loss, model files, tiled equals
whole-image denoising (2D and 3D), the residual guard, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kernels.denoise import DenoiseKernel, TrainConfig, mask_batch, train_denoiser
from kernels.masking import grid_mask, n2v_mask, stratified_coords
from kernels.modelfile import ModelCard, ModelFileError, load_model, read_card, save_model
from pipeline.cli import main
from pipeline.io import create_image, default_axes, open_image


def test_stratified_masking_fraction_and_spread():
    rng = np.random.default_rng(0)
    coords = stratified_coords((256, 256), 0.002, rng)
    assert 0.0015 < len(coords) / 256**2 < 0.0025
    assert len({tuple(c) for c in coords}) == len(coords)  # one per stratum: no repeats
    cells = {(y // 22, x // 22) for y, x in coords}
    assert len(cells) == len(coords)  # and every stratum holds exactly one


@pytest.mark.parametrize("replacement", ["random", "median"])
def test_n2v_replacement_never_uses_the_centre(replacement):
    rng = np.random.default_rng(1)
    batch = (np.arange(2 * 64 * 64, dtype=np.float32).reshape(2, 1, 64, 64) * 7.0) % 1013  # all distinct
    masked, mask = n2v_mask(batch, 0.01, rng, replacement=replacement)
    assert mask.sum() > 0
    if replacement == "random":  # all values distinct: a neighbour's value is never the centre's
        assert np.all(masked[mask] != batch[mask])
    assert np.array_equal(masked[~mask], batch[~mask])
    # an outlier at every masked pixel never leaks into its own replacement
    spiky = batch.copy()
    spiky[mask] = 1e9
    masked2, _ = n2v_mask(spiky, 0.01, np.random.default_rng(1), replacement=replacement)
    assert masked2[mask].max() < 1e9


def test_noise2self_grid_masking_replaces_a_lattice_by_its_neighbours():
    batch = np.random.default_rng(2).random((1, 1, 32, 32)).astype(np.float32)
    spiky = batch.copy()
    masked, mask = grid_mask(batch, 4, np.random.default_rng(3))
    assert abs(mask.mean() - 1 / 16) < 1e-9
    spiky[mask] = 1e6
    masked2, _ = grid_mask(spiky, 4, np.random.default_rng(3))
    assert masked2[mask].max() < 1e6  # the centre is not in its own donut


def _noisy_blobs(shape, seed=0):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    clean = ndimage.gaussian_filter(rng.random(shape).astype(np.float32), 3)
    clean = (clean - clean.min()) / (clean.max() - clean.min())
    return clean, clean + rng.normal(0, 0.2, shape).astype(np.float32)


@pytest.mark.parametrize("method", ["n2v2", "n2s"])
def test_short_training_lowers_the_masked_loss(method):
    _, noisy = _noisy_blobs((128, 128))

    def sample(n, rng):
        out = []
        for _ in range(n):
            y, x = rng.integers(0, 128 - 32, size=2)
            out.append(noisy[None, y:y + 32, x:x + 32])
        return np.stack(out)

    cfg = TrainConfig(method=method, patch=(32, 32), batch=8, steps=60, val_every=20, width=8, lr=2e-3,
                      mask_fraction=0.02, patience=100)
    val = sample(16, np.random.default_rng(9))
    result = train_denoiser(sample, val, cfg, progress=False, device="cpu")
    first, best = result.history[0]["val_loss"], result.best_val_loss
    assert best < 0.7 * first, result.history
    masked, mask = mask_batch(val, cfg, np.random.default_rng(0))
    assert mask.any() and masked.shape == val.shape


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two briefly trained models, 2D N2V2 and 3D Noise2Self with anisotropic pooling."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for ndim, method, patch, pool in [(2, "n2v2", (16, 16), ()), (3, "n2s", (4, 16, 16), (1, 2, 2))]:
        rng = np.random.default_rng(0)

        def sample(n, r, ndim=ndim, patch=patch):
            return r.random((n, 1) + patch).astype(np.float32)

        cfg = TrainConfig(method=method, patch=patch, batch=2, steps=3, val_every=3, width=4, pool=pool)
        result = train_denoiser(sample, sample(4, rng), cfg, progress=False, device="cpu")
        card = ModelCard(task="denoise", method=method, architecture=result.config.to_dict(),
                         normalisation={"low": [0.0], "high": [1.0]}, validation_loss=result.best_val_loss)
        save_model(folder / f"m{ndim}", result.state_dict, card)
        out[ndim] = str(folder / f"m{ndim}")
    return out


@pytest.mark.parametrize("ndim", [2, 3])
def test_channels_last_gives_the_same_output(tiny_models, ndim):
    """The channels-last layout (GPU tensor cores) changes where activations sit, not the result."""
    import torch

    block = np.random.default_rng(0).random((2, 1) + ((6, 20, 24) if ndim == 3 else (40, 36)), dtype=np.float32)
    out = {}
    for last in (False, True):
        kernel = DenoiseKernel(DenoiseKernel.Params(model=tiny_models[ndim], channels_last=last))
        kernel.load("cpu")
        fmt = torch.channels_last_3d if ndim == 3 else torch.channels_last
        weight = next(p for p in kernel.net.parameters() if p.ndim == ndim + 2 and p.shape[1] > 1)
        assert weight.is_contiguous(memory_format=fmt) == last
        out[last] = kernel.predict(block)
    assert np.abs(out[True] - out[False]).max() <= 1e-5 * max(1.0, np.abs(out[False]).max())


def test_model_round_trip_and_tampered_weights_are_refused(tiny_models, tmp_path):
    import shutil

    import torch

    card, state = load_model(tiny_models[2])
    assert card.method == "n2v2" and card.architecture["blurpool"] and len(card.weights_sha256) == 64
    kernel = DenoiseKernel(DenoiseKernel.Params(model=str(tiny_models[2]), sha256=card.weights_sha256))
    kernel.load("cpu")
    for k, v in kernel.net.state_dict().items():
        if k in state:
            torch.testing.assert_close(v, state[k])
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_models[2], bad)
    raw = bytearray((bad / "weights.pt").read_bytes())
    raw[-100] ^= 0xFF
    (bad / "weights.pt").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="do not match their card"):
        load_model(bad)
    with pytest.raises(ModelFileError, match="not a tilewise model folder"):
        load_model(tmp_path)


@pytest.mark.parametrize("ndim, shape, chunks", [(2, (75, 61), (10, 12)), (3, (11, 45, 38), (4, 16, 16))])
def test_tiled_denoising_equals_whole_image_denoising(tmp_path, client, tiny_models, ndim, shape, chunks):
    """With test-time augmentation (on by default for images this small) and without."""
    from pipeline.steps.denoise import denoise

    data = np.random.default_rng(4).integers(0, 3000, size=shape).astype(np.uint16)
    url = str(tmp_path / "in.ome.zarr")
    sink = create_image(url, shape=shape, dtype=np.uint16, axes=default_axes("zyx"[-ndim:]), chunks=chunks, n_levels=1)
    sink.write((slice(None),) * ndim, data)
    tiled, report = denoise(url, str(tmp_path / "t.ome.zarr"), tiny_models[ndim], client, progress=False,
                            tile_shape=chunks, batch=3)
    whole, _ = denoise(url, str(tmp_path / "w.ome.zarr"), tiny_models[ndim], client, progress=False, tile_shape=shape)
    assert tiled.tiles > 4 and whole.tiles == 1 and report.tiles == tiled.tiles
    a = open_image(str(tmp_path / "t.ome.zarr")).read((slice(None),) * ndim)
    b = open_image(str(tmp_path / "w.ome.zarr")).read((slice(None),) * ndim)
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
    assert a.dtype == np.float32 and np.isfinite(a).all()
    params = json.load(open(tmp_path / "t.ome.zarr" / "_tilewise" / "run.json"))
    assert params["kernel_params"]["sha256"] and all(h % 4 == 0 for h in params["halo"][-2:])
    assert params["kernel_params"]["tta"] is True
    plain_t, _ = denoise(url, str(tmp_path / "pt.ome.zarr"), tiny_models[ndim], client, progress=False,
                         tile_shape=chunks, tta="off")
    plain_w, _ = denoise(url, str(tmp_path / "pw.ome.zarr"), tiny_models[ndim], client, progress=False,
                         tile_shape=shape, tta="off")
    c = open_image(str(tmp_path / "pt.ome.zarr")).read((slice(None),) * ndim)
    d = open_image(str(tmp_path / "pw.ome.zarr")).read((slice(None),) * ndim)
    assert np.abs(c - d).max() <= 1e-5 * max(1.0, np.abs(d).max())
    assert np.abs(c - a).max() > 1e-4 * np.abs(b).max()  # the augmentation changed the output (10x the tolerance)


@pytest.mark.parametrize("ndim, shape, chunks, pool", [(2, (75, 61), (10, 12), ()),
                                                       (3, (11, 45, 38), (4, 16, 16), (1, 2, 2))])
def test_tiled_posterior_equals_untiled_and_changes_the_output(tmp_path, client, ndim, shape, chunks, pool):
    """A noise variance made up here, half the median local residual energy of the model's
    prediction, so that the weights vary pixel by pixel (the tiny models' output is too flat
    for that: float rounding would decide them); the model trains briefly on smooth blobs so
    its output has structure."""
    from scipy import ndimage

    from kernels import posterior
    from pipeline.steps.denoise import denoise

    clean, noisy = _noisy_blobs(shape)
    patch = (4, 16, 16) if ndim == 3 else (16, 16)

    def sample(n, rng):
        corner = [rng.integers(0, s - p + 1, size=n) for s, p in zip(shape, patch)]
        return np.stack([noisy[None][(slice(None),) + tuple(slice(c[k], c[k] + p) for c, p in zip(corner, patch))]
                         for k in range(n)])

    cfg = TrainConfig(method="n2v2", patch=patch, batch=4, steps=30, val_every=30, width=8, pool=pool, lr=3e-3)
    result = train_denoiser(sample, sample(4, np.random.default_rng(1)), cfg, progress=False, device="cpu")
    card = ModelCard(task="denoise", method="n2v2", architecture=result.config.to_dict(),
                     normalisation={"low": [0.0], "high": [1.0]}, validation_loss=result.best_val_loss)
    save_model(tmp_path / "m", result.state_dict, card)
    data = (noisy * 1000 + 500).clip(0, 3000).astype(np.uint16)
    kernel = DenoiseKernel(DenoiseKernel.Params(model=str(tmp_path / "m")))
    kernel.load("cpu")
    lo, hi = np.percentile(data, (1, 99.9))
    y = (data - lo) / (hi - lo)
    halo = kernel.traits.halo  # the prediction as the engine makes it: a reflected margin, then cropped
    mu = kernel.predict(np.pad(y, [(h, h) for h in halo], mode="reflect")[None, None])[0, 0]
    mu = mu[tuple(slice(h, -h) for h in halo)]
    variance = 0.5 * float(np.median(ndimage.gaussian_filter((y - mu) ** 2, posterior.window_sigma(ndim))))
    table = {"noise": [[variance, 0.0, variance]], "leak_centres": [[0.0, 1.0]], "leak": [[0.0, 0.1]]}
    weights = posterior.weights(y, mu, table["noise"][0], table["leak_centres"][0], table["leak"][0])
    assert 0 < weights.min() and weights.max() < 1 and np.ptp(weights) > 0.05  # unclipped: each pixel's window counts
    model = tmp_path / "with-posterior"
    # what training would have written, auto applies it: in 2D the widest choice; 3D keeps pixel+blocks
    # (the band stage's reach in 3D is tested on arrays, ``tests/test_posterior.py``; through the
    # engine it took 15 minutes here)
    widest = "band+blocks" if ndim == 2 else posterior.LEGACY_CHOICE
    chosen = table | {"choice": [widest]}
    save_model(model, result.state_dict, card.model_copy(update={"posterior": {
        "method": posterior.METHOD, "sigma_2d": posterior.SIGMA_2D, "plain": chosen, "tta": chosen}}))
    url = str(tmp_path / "in.ome.zarr")
    sink = create_image(url, shape=shape, dtype=np.uint16, axes=default_axes("zyx"[-ndim:]), chunks=chunks, n_levels=1)
    sink.write((slice(None),) * ndim, data)
    results = {}
    for name, tile, post in (("t", chunks, "auto"), ("w", shape, "auto"), ("off", shape, "off"),
                             ("t1", chunks, "pixel"), ("w1", shape, "pixel")):  # pixel: one weight each, no blocks
        denoise(url, str(tmp_path / f"{name}.ome.zarr"), str(model), client, progress=False, tile_shape=tile,
                posterior=post, tta="off")
        results[name] = open_image(str(tmp_path / f"{name}.ome.zarr")).read((slice(None),) * ndim)
    a, b, off = results["t"], results["w"], results["off"]
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
    assert np.abs(results["t1"] - results["w1"]).max() <= 1e-5 * max(1.0, np.abs(b).max())
    assert np.abs(results["w1"] - b).max() > 100 * 1e-5 * np.abs(b).max()  # the choices differ
    on_gpu = DenoiseKernel(DenoiseKernel.Params(model=str(model)))  # a GPU worker's path: the step in torch
    on_gpu.load("cpu")
    on_gpu.posterior_on_device = lambda: True
    block = np.pad(y, [(h, h) for h in on_gpu.traits.halo], mode="reflect")[None, None].astype(np.float32)
    origins = [tuple(-h for h in on_gpu.traits.halo)]
    in_torch = on_gpu.predict_with_posterior(block, origins)
    in_scipy = DenoiseKernel.predict_with_posterior(on_gpu, block, origins)
    assert np.abs(in_torch - in_scipy).max() <= 1e-6 and np.abs(in_scipy - on_gpu.predict(block)).max() > 1e-3
    assert np.abs(b - off).max() > 100 * 1e-5 * np.abs(b).max()
    run = json.load(open(tmp_path / "t.ome.zarr" / "_tilewise" / "run.json"))
    from kernels.unet import receptive_field

    rf = receptive_field(kernel.config)
    assert all(h >= max(lo, hi) + posterior.radius(ndim, choice=widest)
               for h, lo, hi in zip(run["halo"][-ndim:], rf.low, rf.high))
    assert "posterior" not in run["kernel_params"]  # auto: the card's choice, pinned by the weights' hash
    assert json.load(open(tmp_path / "off.ome.zarr" / "_tilewise" / "run.json"))["kernel_params"]["posterior"] == "off"
    first = json.load(open(tmp_path / "t1.ome.zarr" / "_tilewise" / "run.json"))
    assert first["kernel_params"]["posterior"] == "pixel"
    assert all(h >= max(lo, hi) + posterior.radius(ndim, choice="pixel") for h, lo, hi in
               zip(first["halo"][-ndim:], rf.low, rf.high))
    legacy = tmp_path / "before-the-choice"  # a card fitted before choices were written: what it did then
    save_model(legacy, result.state_dict, card.model_copy(update={"posterior": {
        "method": posterior.METHOD, "sigma_2d": posterior.SIGMA_2D, "plain": table, "tta": table}}))
    assert DenoiseKernel(DenoiseKernel.Params(model=str(legacy))).traits.halo == \
        DenoiseKernel(DenoiseKernel.Params(model=str(model), posterior="pixel+blocks")).traits.halo != \
        DenoiseKernel(DenoiseKernel.Params(model=str(model), posterior="band+blocks")).traits.halo
    older = tmp_path / "older-step"  # a card whose step this tilewise does not apply: refused, naming the way out
    save_model(older, result.state_dict, card.model_copy(update={"posterior": {"method": "sure-linear"}}))
    with pytest.raises(ModelFileError, match="--posterior off"):
        DenoiseKernel(DenoiseKernel.Params(model=str(older)))
    assert DenoiseKernel(DenoiseKernel.Params(model=str(older), posterior="off")).posterior_table is None


def test_training_reads_the_noise_line_off_the_regions():
    """Where training has regions to choose the stages on (2D), the card's noise line is read
    off them (every pixel of up to four large crops) rather than off the small patches the
    leak is fitted on: on the tuning images the patches' line cost up to 0.13 dB."""
    import torch

    from kernels import posterior
    from kernels.denoise import fit_posterior
    from kernels.unet import UNet

    clean, noisy = _noisy_blobs((128, 112))
    patch = (16, 16)

    def sample(n, rng):
        corner = [rng.integers(0, s - p + 1, size=n) for s, p in zip(noisy.shape, patch)]
        return np.stack([noisy[None][(slice(None), slice(a, a + patch[0]), slice(b, b + patch[1]))]
                         for a, b in zip(*corner)])

    cfg = TrainConfig(method="n2v2", patch=patch, batch=4, steps=20, val_every=20, width=8, lr=3e-3)
    result = train_denoiser(sample, sample(4, np.random.default_rng(1)), cfg, progress=False, device="cpu")
    patches = sample(16, np.random.default_rng(2)).astype(np.float32)
    regions = [noisy[None, :96, :80].astype(np.float32), noisy[None, 32:, 32:].astype(np.float32)]
    with_regions = fit_posterior(result, patches, regions, method="n2v2")
    without = fit_posterior(result, patches, [], method="n2v2")
    net = UNet(result.config)
    net.load_state_dict(result.state_dict)
    net.eval()
    for mode, tta in (("plain", False), ("tta", True)):
        def predict(x, tta=tta):
            with torch.inference_mode():
                return net.forward_padded(torch.from_numpy(x), tta=tta).float().numpy()

        predicted = posterior.predict_regions(predict, regions)
        line = posterior.fit_noise_line([p.y[0] for p in predicted], [p.mu[0] for p in predicted])
        assert np.allclose(with_regions[mode]["noise"][0], line, rtol=1e-6)
        assert not np.allclose(without[mode]["noise"][0], line, rtol=1e-3)  # the patches' own line
        assert with_regions[mode]["leak"] == without[mode]["leak"]  # the leak stays the patches'
        assert without[mode]["choice"] == [posterior.LEGACY_CHOICE]  # no regions: nothing estimated


def test_residual_guard_flags_structure_but_not_noise(tiny_models):
    kernel = DenoiseKernel(DenoiseKernel.Params(model=str(tiny_models[2])))
    clean, noisy = _noisy_blobs((1, 96, 96))
    assert not kernel.describe_tile(noisy, clean, None)["flagged"]  # removed noise only
    yy, xx = np.mgrid[:96, :96]
    stripes = (np.sin(xx / 3.0) > 0).astype(np.float32)[None]
    meta = kernel.describe_tile(noisy + stripes, clean, None)  # the "denoiser" also removed stripes
    assert meta["residual_lag1_correlation"] > 0.2 and meta["flagged"]


def test_cli_train_and_denoise(tmp_path, client, capsys):
    data = np.random.default_rng(5).poisson(50, size=(64, 48)).astype(np.uint16)
    url = str(tmp_path / "in.ome.zarr")
    sink = create_image(url, shape=data.shape, dtype=np.uint16, axes=default_axes("yx"), chunks=(32, 32), n_levels=1)
    sink.write((slice(None),) * 2, data)
    model = str(tmp_path / "model")
    args = ["-q", "train", "denoise", url, model, "--patch", "16,16", "--steps", "4", "--batch", "2", "--width", "4"]
    out = capsys.readouterr().out if main(args) == 0 else ""
    assert "validation loss" in out and "posterior step by estimated risk: " in out
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    from kernels import posterior

    blend = read_card(model).posterior  # the posterior step's noise line and leak, fitted on its patches
    assert set(blend) == {"method", "sigma_2d", "plain", "tta"} and blend["method"] == "local-sure"
    assert all(blend[mode]["choice"][0] in posterior.CHOICES and set(blend[mode]["risk"][0]) == set(posterior.CHOICES)
               for mode in ("plain", "tta"))  # the stages chosen by estimated risk, each estimate kept
    assert all(0 <= min(blend[mode]["leak"][0]) <= max(blend[mode]["leak"][0]) < 1 and blend[mode]["noise"][0][2] > 0
               for mode in ("plain", "tta"))
    out = str(tmp_path / "out.ome.zarr")
    assert main(["-q", "denoise", url, out, "--model", model, "--workers", "1"]) == 0
    assert "tiles flagged" in capsys.readouterr().out
    assert open_image(out).levels[0].shape == (64, 48)
    assert main(["-q", "denoise", url, str(tmp_path / "o2"), "--model", str(tmp_path), "--workers", "1"]) == 2
    assert "not a tilewise model folder" in capsys.readouterr().err


@pytest.mark.parametrize("scale, pool", [((1.0, 0.5, 0.5), [1, 2, 2]), ((0.5, 0.5, 0.5), [2, 2, 2])])
def test_training_keeps_a_coarse_z_at_full_resolution(tmp_path, scale, pool):
    """The U-Net pools an axis only where the voxel size allows (read from the NGFF scale): on the
    light-sheet sample (z twice as coarse) pooling z held N2V2 at 38.2 dB; without, 42.8 dB."""
    from pipeline.steps.train import train_denoise

    data = np.random.default_rng(2).poisson(50, size=(16, 32, 32)).astype(np.uint16)
    url = str(tmp_path / "in.ome.zarr")
    sink = create_image(url, shape=data.shape, dtype=np.uint16, axes=default_axes("zyx"), scale=scale,
                        chunks=(8, 16, 16), n_levels=1)
    sink.write((slice(None),) * 3, data)
    card = train_denoise(url, str(tmp_path / "model"), patch=(8, 16, 16), steps=2, batch=2, width=4, progress=False,
                         device="cpu")
    assert card.architecture["pool"] == pool and card.training["pool"] == pool


def test_training_draws_patches_from_every_time_point(tmp_path):
    """A time-lapse trains as it is: blocks are drawn across time points (one at a time)."""
    from pipeline.engine.stats import Normalisation
    from pipeline.io import Axis
    from pipeline.steps.train import PatchPool

    data = np.stack([np.full((8, 32, 32), 100 * (t + 1), np.uint16) for t in range(4)])  # t, z, y, x
    url = str(tmp_path / "tl.ome.zarr")
    create_image(url, shape=data.shape, dtype=np.uint16, axes=[Axis("t", "time", "second")] + list(default_axes("zyx")),
                 chunks=(1, 8, 16, 16), n_levels=1).write((slice(None),) * 4, data)
    source = open_image(url)
    pool = PatchPool(source, (4, 16, 16), Normalisation((0.0,), (1.0,)), pool_blocks=64, seed=0)
    assert pool.batch_shape == (4,)
    seen = {float(np.unique(block)[0]) for block in pool.pool}
    assert seen == {100.0, 200.0, 300.0, 400.0}  # every time point, each block from one only
    assert pool.sample(3, np.random.default_rng(0)).shape == (3, 1, 4, 16, 16)


def _trained_psnr(method: str, clean: np.ndarray, noisy: np.ndarray, target: np.ndarray | None, steps: int) -> float:
    """PSNR against ``clean`` of a small U-Net trained by ``method`` for ``steps`` steps."""
    import torch

    from kernels.unet import UNet

    def sample(n, rng):
        out = []
        for _ in range(n):
            y, x = rng.integers(0, clean.shape[0] - 32, size=2)
            sl = np.s_[y:y + 32, x:x + 32]
            out.append(np.stack([noisy[sl]] + ([target[sl]] if target is not None else [])))
        return np.stack(out).astype(np.float32)

    # the plateau schedule these figures were measured with (the cosine default anneals 300 steps
    # too early for this small comparison)
    cfg = TrainConfig(method=method, patch=(32, 32), batch=8, steps=steps, val_every=50, width=8, lr=2e-3,
                      patience=100, schedule="plateau")
    result = train_denoiser(sample, sample(16, np.random.default_rng(9)), cfg, progress=False, device="cpu")
    net = UNet(result.config)
    net.load_state_dict(result.state_dict)
    with torch.inference_mode():
        out = net.eval().forward_padded(torch.from_numpy(noisy[None, None]))[0, 0].numpy()
    return float(10 * np.log10(1.0 / np.mean((out - clean) ** 2)))


def test_care_beats_n2v2_and_noise2noise_approaches_care():
    """Same data, same steps: pairs with the clean image (CARE) beat the blind spot (N2V2), and
    a second noisy realisation as the target (N2N) comes close to the clean target."""
    clean, noisy = _noisy_blobs((128, 128))
    second = clean + np.random.default_rng(11).normal(0, 0.2, clean.shape).astype(np.float32)
    scores = {m: _trained_psnr(m, clean, noisy, t, 300) for m, t in
              (("care", clean), ("n2n", second), ("n2v2", None))}
    assert scores["care"] > scores["n2v2"] + 0.4, scores  # measured: 27.5, 27.2, 26.8 dB
    assert scores["n2n"] > scores["n2v2"] and scores["care"] - scores["n2n"] < 1.0, scores


def test_cli_trains_care_and_n2n_on_pairs(tmp_path, client, capsys, caplog):
    rng = np.random.default_rng(5)
    clean = rng.poisson(50, size=(64, 48)).astype(np.float32)
    urls = {}
    for name, image in (("noisy", clean + rng.normal(0, 5, clean.shape)), ("clean", clean),
                        ("second", clean + rng.normal(0, 5, clean.shape)), ("small", clean[:32])):
        urls[name] = str(tmp_path / f"{name}.ome.zarr")
        sink = create_image(urls[name], shape=image.shape, dtype=np.float32, axes=default_axes("yx"),
                            chunks=(32, 32), n_levels=1)
        sink.write((slice(None),) * 2, image.astype(np.float32))
    common = ["--patch", "16,16", "--steps", "4", "--batch", "2", "--width", "4"]
    for method, target in (("care", "clean"), ("n2n", "second")):
        model = str(tmp_path / method)
        assert main(["-q", "train", "denoise", urls["noisy"], model, "--method", method, "--target", urls[target],
                     *common]) == 0
        card = read_card(model)
        assert card.method == method and card.training["target"] == urls[target]
        assert not card.architecture["blurpool"] and card.training["target_noise_variance"] >= 0
        assert card.posterior is None  # the network already sees the pixel: nothing to blend back
        out = str(tmp_path / f"out-{method}.ome.zarr")
        assert main(["-q", "denoise", urls["noisy"], out, "--model", model, "--workers", "1"]) == 0
        assert open_image(out).levels[0].shape == (64, 48)
    assert "cannot fall below the noise variance" in caplog.text
    capsys.readouterr()
    assert main(["-q", "train", "denoise", urls["noisy"], str(tmp_path / "m1"), "--method", "care", *common]) == 2
    assert "pass --target" in capsys.readouterr().err
    assert main(["-q", "train", "denoise", urls["noisy"], str(tmp_path / "m2"), "--method", "care", "--target",
                 urls["small"], *common]) == 2
    assert "same field of view" in capsys.readouterr().err
    assert main(["-q", "train", "denoise", urls["noisy"], str(tmp_path / "m3"), "--method", "n2n", "--target",
                 urls["second"], "--loss", "mae", *common]) == 2
    assert "n2n needs mse" in capsys.readouterr().err


def test_residual_report_reads_back_only_tiles_it_was_not_given(tmp_path, client, monkeypatch):
    """The residual guard covers every finished tile: those this run computed from what their
    tasks returned, the others (an earlier, interrupted run) from their markers."""
    from kernels import KernelSpec
    from pipeline.engine.manifest import RunManifest
    from pipeline.engine.runner import EngineOptions
    from pipeline.steps.apply import run_kernel
    from pipeline.steps.denoise import residual_report

    url = str(tmp_path / "in.ome.zarr")
    create_image(url, shape=(40, 40), dtype=np.uint16, axes=list(default_axes("yx")), chunks=(16, 16),
                 n_levels=1).write((slice(None),) * 2, np.arange(1600, dtype=np.uint16).reshape(40, 40))
    out = str(tmp_path / "out.ome.zarr")
    summary = run_kernel(url, out, KernelSpec.of("gaussian", sigma=[1.0, 1.0]), client, tile_shape=(16, 16),
                         progress=False)
    read = []
    original = RunManifest.tile_metadata
    monkeypatch.setattr(RunManifest, "tile_metadata",
                        lambda self, tiles=None, **kw: read.append(sorted(tiles)) or original(self, tiles, **kw))
    report = residual_report(out, EngineOptions(), known={0: {"tile": 0, "flagged": True, "residual_std": 1.0}})
    assert report.tiles == summary.tiles == 9 and report.flagged == [0]
    assert read == [list(range(1, 9))]
