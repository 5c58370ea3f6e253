"""Uncertainty: ADF layers against Monte Carlo, the Dirichlet output, fixed MC-dropout masks,
maps through the engine (tiled equals untiled, every mode, 2D and 3D), tables, and the
calibration and error-detection scores on inputs with known answers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import adf
from kernels.unet import Down, UNetConfig

SAMPLES = 100_000  # Monte Carlo draws per check: variance estimates within ~0.5 %


def _inputs(shape=(1, 3, 6, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=gen, dtype=torch.float64)
    var = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    return mean, var


def _monte_carlo(layer, mean, var, seed=1):
    gen = torch.Generator().manual_seed(seed)
    draws = []
    with torch.no_grad():
        for _ in range(SAMPLES // 5000):
            x = mean + var.sqrt() * torch.randn((5000,) + mean.shape[1:], generator=gen, dtype=torch.float64)
            draws.append(layer(x))
    y = torch.cat(draws)
    return y.mean(0, keepdim=True), y.var(0, keepdim=True)


def _agree(layer, propagate, *, mean_atol=0.01, var_rtol=0.03, seed=0):
    """ADF moments within Monte Carlo error of the sampled layer: mean to ``mean_atol`` (inputs
    have unit scale), variance to ``var_rtol`` relative plus 0.002 absolute."""
    mean, var = _inputs(seed=seed)
    mc_mean, mc_var = _monte_carlo(layer, mean, var)
    with torch.no_grad():
        got_mean, got_var = propagate(mean, var)
    assert got_mean.shape == mc_mean.shape and got_var.shape == mc_var.shape
    assert (got_mean - mc_mean).abs().max() < mean_atol
    assert ((got_var - mc_var).abs() <= var_rtol * mc_var + 0.002).all(), float(((got_var - mc_var) / mc_var).abs().max())


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "conv", "conv_transpose", "batch_norm", "max_pool_1d",
                                  "gaussian_max", "nearest", "bilinear", "blur", "max_stride_1"])
def test_each_adf_layer_agrees_with_monte_carlo(name):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    convt = nn.ConvTranspose2d(3, 2, 2, stride=2).double()
    bn = nn.BatchNorm2d(3).double()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    bn.eval()
    blur = Down(2, (2, 2), blur=True).double()
    cases = {
        "relu": (F.relu, adf.relu),
        "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), lambda m, v: adf.leaky_relu(m, v, slope=0.2)),
        "conv": (conv, lambda m, v: adf.conv(conv, m, v)),
        "conv_transpose": (convt, lambda m, v: adf.conv_transpose(convt, m, v)),
        "batch_norm": (bn, lambda m, v: adf.batch_norm(bn, m, v)),
        # a pair of independent Gaussians: Clark's moments are exact
        "max_pool_1d": (lambda x: F.max_pool2d(x, (1, 2), (1, 2)), lambda m, v: adf.max_pool(m, v, (1, 2))),
        "gaussian_max": (lambda x: torch.maximum(x[:, :1], x[:, 1:2]),
                         lambda m, v: adf.gaussian_max(m[:, :1], v[:, :1], m[:, 1:2], v[:, 1:2])),
        "nearest": (lambda x: F.interpolate(x, scale_factor=(2, 2)), lambda m, v: adf.upsample(m, v, (2, 2))),
        "bilinear": (lambda x: F.interpolate(x, scale_factor=(2, 2), mode="bilinear"),
                     lambda m, v: adf.upsample(m, v, (2, 2), "bilinear")),
        # max-blur-pool's two steps, each exact for independent inputs (see adf.down)
        "blur": (lambda x: adf.blur(blur, x, torch.zeros_like(x))[0], lambda m, v: adf.blur(blur, m, v)),
        "max_stride_1": (lambda x: F.max_pool2d(F.pad(x, (0, 1, 0, 0), mode="replicate"), (1, 2), 1),
                         lambda m, v: adf._max_pairs(m, v, 3, 1, 1e-6)),
    }
    layer, propagate = cases[name]
    _agree(layer, propagate)


def test_two_by_two_max_pool_is_the_pairwise_approximation():
    """Four inputs are maxed pairwise, treating each pair's maximum as Gaussian (the ADF step):
    the mean stays within 0.03, the variance within 15 % of Monte Carlo."""
    _agree(lambda x: F.max_pool2d(x, 2, 2), lambda m, v: adf.max_pool(m, v, (2, 2)), mean_atol=0.03, var_rtol=0.15)


def _adf_unet(ndim=2, seed=0):
    torch.manual_seed(seed)
    net = adf.ADFUNet(UNetConfig(ndim=ndim, in_channels=1, out_channels=3, depth=2, width=4, norm="batch")).double()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2)
    return net.eval()


def test_adf_unet_mean_tends_to_the_deterministic_output_as_input_variance_vanishes():
    net = _adf_unet()
    x = torch.rand(1, 1, 24, 20, dtype=torch.float64)
    with torch.no_grad():
        det = net.forward_padded(x)
        gaps, variances = [], []
        for v in (1e-2, 1e-4, 1e-6):
            net.input_variance, net.min_variance = v, 1e-14
            mean, var = net.moments_padded(x)
            gaps.append(float((mean - det).abs().max()))
            variances.append(float(var.mean()))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-4
    assert variances[0] > 10 * variances[1] > 100 * variances[2]


def test_adf_unet_loads_a_deterministic_unets_weights():
    from kernels.unet import UNet

    config = UNetConfig(ndim=2, in_channels=1, out_channels=3, depth=2, width=4)
    plain = UNet(config)
    twin = adf.ADFUNet(config)
    twin.load_state_dict(plain.state_dict())  # the same keys: no ADF-only weights
    assert set(twin.state_dict()) == set(plain.state_dict())


def test_dirichlet_output_and_loss():
    from kernels.uncertainty import dirichlet_from_moments, dirichlet_mean_variance, dirichlet_nll

    logits = torch.tensor([[[[4.0]], [[0.0]], [[-1.0]]]])
    sure = dirichlet_from_moments(logits, torch.full_like(logits, 1e-6))
    unsure = dirichlet_from_moments(logits, torch.full_like(logits, 10.0))
    mode = (sure - 1) / (sure - 1).sum(1, keepdim=True)  # the mode of 1 + s m is m = softmax
    assert torch.allclose(mode, torch.softmax(logits, 1), atol=1e-4)
    assert sure.sum() > 50 * unsure.sum() / 10  # variance lowers the precision
    target = torch.zeros(1, 1, 1, dtype=torch.int64)
    wrong = torch.full_like(target, 2)
    assert dirichlet_nll(sure, target) < dirichlet_nll(unsure, target) < dirichlet_nll(unsure, wrong) < \
        dirichlet_nll(sure, wrong)
    # the closed-form mean and total variance match sampling from the Dirichlet
    alpha = np.array([[[[3.0]], [[1.5]], [[1.2]]]])
    mean, var = dirichlet_mean_variance(alpha)
    draws = np.random.default_rng(0).dirichlet(alpha.ravel(), 200_000)
    assert np.allclose(mean.ravel(), draws.mean(0), atol=2e-3)
    assert abs(var.item() - draws.var(0).sum()) < 2e-3


def test_mc_dropout_draws_the_same_networks_for_every_block_and_thread():
    from kernels.uncertainty import FixedDropout
    from kernels.unet import UNet

    torch.manual_seed(0)
    net = UNet(UNetConfig(ndim=2, in_channels=1, out_channels=2, depth=1, width=8, norm="none", dropout=0.3)).eval()
    masks = FixedDropout(net, rate=0.3, seed=5)
    a, b = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        plain = net(a)
        with masks.sample(3):
            alone, batched = net(a), net(torch.cat([b, a]))[1:]
        with masks.sample(4):
            other = net(a)
        again = net(a)
    assert torch.allclose(alone, batched, atol=1e-6)  # the mask is per channel and sample, not per block
    assert not torch.allclose(alone, other)  # another sample is another network
    assert torch.equal(again, plain)  # outside sample(): dropout off
    results = {}

    def work(t):
        with torch.no_grad(), masks.sample(t):
            results[t] = [net(a) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(t,)) for t in (3, 4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(torch.equal(r, alone) for r in results[3]) and all(torch.equal(r, other) for r in results[4])


# --- through the engine ---------------------------------------------------------------------

def _model_folder(path, *, ndim, uncertainty, task="segment", seed=0):
    """A model folder with random weights (the maps' tiling does not depend on training)."""
    from kernels.modelfile import ModelCard, build_network, save_model
    from kernels.uncertainty import UncertaintyConfig

    u = UncertaintyConfig(method=uncertainty, members=2, samples=3, dropout=0.2).model_dump() if uncertainty else None
    if task == "segment":
        config = UNetConfig(ndim=ndim, in_channels=1, out_channels=3, depth=2, width=4, norm="batch",
                            pool=(1, 2, 2) if ndim == 3 else (), dropout=0.2 if uncertainty == "mc-dropout" else 0.0)
    else:
        config = UNetConfig(ndim=ndim, in_channels=1, out_channels=1, depth=1, width=4, norm="none",
                            dropout=0.2 if uncertainty == "mc-dropout" else 0.0)
    card = ModelCard(task=task, method="unet3class" if task == "segment" else "n2s", architecture=config.to_dict(),
                     normalisation={"percentiles": [1.0, 99.9]}, uncertainty=u)
    torch.manual_seed(seed)
    net = build_network(card)
    for m in net.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2)
    save_model(path, net.state_dict(), card)
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, client):
    from pipeline.engine.pyramid import finalize_image
    from pipeline.io import create_image, create_labels, default_axes
    from test_segment import blobs_with_labels

    out = {}
    for ndim, shape, chunks in ((2, (70, 83), (16, 16)), (3, (12, 32, 30), (6, 16, 16))):
        image, labels = blobs_with_labels(shape, 8 if ndim == 2 else 5, 6.0, seed=ndim)
        path = str(tmp_path_factory.mktemp(f"u{ndim}") / "img.ome.zarr")
        sink = create_image(path, shape=shape, dtype=np.uint16, axes=default_axes("yx" if ndim == 2 else "zyx"),
                            chunks=chunks, n_levels=1)
        sink.write((slice(None),) * ndim, image)
        lab = create_labels(sink, "truth", n_labels=int(labels.max()))
        lab.write((slice(None),) * ndim, labels)
        finalize_image(lab, client, labels=True, progress=False)
        out[ndim] = (path, shape, chunks)
    return out


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("method", ["adf", "mc-dropout", "ensemble"])
def test_uncertainty_maps_tiled_equal_untiled(stores, client, tmp_path, method, ndim):
    from pipeline.io import open_image
    from pipeline.io.tables import read_table
    from pipeline.steps.segment import model_spec, segment_labels

    path, shape, chunks = stores[ndim]
    model = _model_folder(tmp_path / "m", ndim=ndim, uncertainty=method)
    spec = model_spec(model, min_size=0, uncertainty=True).with_params(object_halo=8)  # a small read per tile
    tiled = segment_labels(path, str(tmp_path / "t.ome.zarr"), spec, client, tile_shape=chunks, progress=False)
    whole = segment_labels(path, str(tmp_path / "w.ome.zarr"), spec, client, tile_shape=shape, progress=False)
    assert tiled.tiles >= 8 and whole.tiles == 1
    region = (slice(None),) * ndim
    for name in ("foreground", "entropy", "variance"):
        a = open_image(str(tmp_path / "t.ome.zarr" / "uncertainty" / name)).read(region)
        b = open_image(str(tmp_path / "w.ome.zarr" / "uncertainty" / name)).read(region)
        assert a.shape == shape and a.dtype == np.float32
        assert np.allclose(a, b, atol=1e-5), (name, float(np.abs(a - b).max()))
        assert (a >= 0).all() and a.std() > 0
    labels = open_image(tiled.labels).read(region)
    table = read_table(str(tmp_path / "t.ome.zarr"), "nuclei")
    entropy = open_image(str(tmp_path / "t.ome.zarr" / "uncertainty" / "entropy")).read(region)
    assert len(table) == tiled.objects
    for row in table.itertuples():  # per-object mean and max of the map, across tile borders
        inside = entropy[labels == row.label]
        assert np.isclose(row.entropy_mean, inside.mean(), atol=1e-5) and np.isclose(row.entropy_max, inside.max())


def test_denoiser_uncertainty_maps_through_the_engine(stores, client, tmp_path):
    """An ensemble denoiser writes the mean image and its per-pixel variance (input units
    squared), tiled equal to untiled."""
    from pipeline.io import open_image
    from pipeline.steps.denoise import denoise

    path, shape, chunks = stores[2]
    model = _model_folder(tmp_path / "d", ndim=2, uncertainty="ensemble", task="denoise")
    outs = []
    for name, tile in (("t", chunks), ("w", shape)):
        out = str(tmp_path / f"{name}.ome.zarr")
        denoise(path, out, model, client, tile_shape=tile, progress=False)
        outs.append(open_image(f"{out}/uncertainty/variance").read((slice(None),) * 2))
    assert np.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-3) and outs[0].min() >= 0 and outs[0].max() > 0


# --- scores ---------------------------------------------------------------------------------

def test_ece_and_auroc_on_known_answers():
    from pipeline.analysis.calibration import Reliability, error_auroc, expected_calibration_error

    correct = np.arange(1000) % 10 < 8  # 80 % right
    assert expected_calibration_error(np.full(1000, 0.8), correct) == pytest.approx(0.0)
    assert expected_calibration_error(np.full(1000, 0.95), correct) == pytest.approx(0.15)
    # two bins: 0.55 confident and always right (gap 0.45), 0.95 confident and right 95 % (gap 0)
    conf = np.r_[np.full(500, 0.55), np.full(500, 0.95)]
    ok = np.r_[np.ones(500, bool), np.arange(500) % 20 != 0]
    assert expected_calibration_error(conf, ok) == pytest.approx(0.5 * 0.45)
    whole = Reliability.of(conf, ok)
    parts = Reliability.of(conf[:300], ok[:300]) + Reliability.of(conf[300:], ok[300:])
    assert parts.ece == pytest.approx(whole.ece) and parts.total == 1000
    error = np.r_[np.zeros(90, bool), np.ones(10, bool)]
    assert error_auroc(error.astype(float), error) == 1.0
    assert error_auroc(-error.astype(float), error) == 0.0
    assert error_auroc(np.ones(100), error) == 0.5
    assert error_auroc(np.ones(100), np.zeros(100, bool)) is None


def test_evaluate_scores_an_output_against_truth(stores, client, tmp_path):
    """``tilewise evaluate`` on a real output equals the scores computed here from whole arrays."""
    from pipeline.analysis.calibration import error_auroc, expected_calibration_error
    from pipeline.cli import main
    from pipeline.io import open_image
    from pipeline.steps.evaluate import evaluate
    from pipeline.steps.segment import model_spec, segment_labels

    path, shape, chunks = stores[2]
    model = _model_folder(tmp_path / "m", ndim=2, uncertainty="ensemble")
    out = str(tmp_path / "o.ome.zarr")
    segment_labels(path, out, model_spec(model, min_size=0), client, tile_shape=chunks, progress=False)
    scores = evaluate(out, f"{path}/labels/truth", report=str(tmp_path / "report"), max_samples=10**9)
    region = (slice(None),) * 2
    pred, truth = open_image(f"{out}/labels/nuclei").read(region) > 0, open_image(f"{path}/labels/truth").read(region) > 0
    fg = open_image(f"{out}/uncertainty/foreground").read(region)
    entropy = open_image(f"{out}/uncertainty/entropy").read(region)
    assert scores["dice"] == pytest.approx(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    assert scores["ece"] == pytest.approx(expected_calibration_error(np.maximum(fg, 1 - fg), (fg > 0.5) == truth))
    assert scores["auroc"] == pytest.approx(error_auroc(entropy, pred != truth))
    assert (tmp_path / "report" / "reliability.png").stat().st_size > 1000
    assert main(["-q", "evaluate", out, "--truth", f"{path}/labels/nope"]) == 2


def test_train_and_segment_with_uncertainty_from_the_cli(stores, tmp_path, capsys):
    from kernels.modelfile import read_card, verify_model
    from pipeline.cli import main

    path, _, _ = stores[2]
    model = str(tmp_path / "ens")
    assert main(["-q", "train", "segment", path, model, "--labels", "truth", "--patch", "32,32", "--steps", "3",
                 "--batch", "2", "--depth", "2", "--width", "4", "--uncertainty", "ensemble", "--members", "2"]) == 0
    card = read_card(model)
    assert card.uncertainty["method"] == "ensemble" and card.uncertainty["members"] == 2
    assert len({h["member"] for h in card.training["history"]}) == 2
    verify_model(model)  # both members' weights fit the architecture
    assert main(["-q", "segment", path, str(tmp_path / "o.ome.zarr"), "--model", model, "--samples", "4"]) == 2
    assert "samples applies to MC-dropout models only" in capsys.readouterr().err
    assert main(["-q", "segment", path, str(tmp_path / "o.ome.zarr"), "--model", model, "--input-variance", "0.01"]) == 2
    assert "input_variance applies to ADF models only" in capsys.readouterr().err
    assert main(["-q", "train", "segment", path, str(tmp_path / "x"), "--labels", "truth", "--uncertainty", "adf",
                 "--members", "3"]) == 2
    assert "--members applies to --uncertainty ensemble" in capsys.readouterr().err
    assert main(["-q", "train", "denoise", path, str(tmp_path / "y"), "--uncertainty", "adf"]) == 2


def test_mixed_precision_is_opt_in_close_to_fp32_and_recorded(stores, client, tmp_path, capsys):
    """bf16/fp16 autocast runs on CPU too, so the path is tested without a GPU: outputs close to
    fp32 but not identical, the choice in the run's manifest, and ADF models refuse it."""
    from kernels import build_kernel
    from pipeline.cli import main
    from pipeline.engine.manifest import RunManifest
    from pipeline.steps.denoise import denoise, model_spec

    path, shape, chunks = stores[2]
    model = _model_folder(tmp_path / "d", ndim=2, uncertainty=None, task="denoise")
    x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    outs = {}
    for precision in ("fp32", "bf16", "fp16"):
        kernel = build_kernel(model_spec(model, precision=precision))
        kernel.load("cpu")
        outs[precision] = kernel.predict(x)
    for precision in ("bf16", "fp16"):
        gap = np.abs(outs[precision] - outs["fp32"]).max()
        assert 0 < gap < 0.05 * np.abs(outs["fp32"]).max(), (precision, gap)
    out = str(tmp_path / "o.ome.zarr")
    denoise(path, out, model, client, precision="bf16", progress=False)
    assert RunManifest(out, {}).read_params()["kernel_params"]["precision"] == "bf16"
    adf_model = _model_folder(tmp_path / "a", ndim=2, uncertainty="adf")
    assert main(["-q", "segment", path, str(tmp_path / "s.ome.zarr"), "--model", adf_model, "--precision", "bf16"]) == 2
    assert "ADF models run in fp32" in capsys.readouterr().err
    from pipeline.steps.segment import model_spec as segment_spec

    low, high = (build_kernel(segment_spec(adf_model, input_variance=v)) for v in (1e-4, 1e-1))
    low.load("cpu"), high.load("cpu")
    assert low.predict_moments(x)[1].mean() < high.predict_moments(x)[1].mean()  # more input noise, more variance
