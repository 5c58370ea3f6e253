"""The posterior step of blind-spot denoisers (``kernels.posterior``): its local SURE weights
help a blind predictor without clean data, beat any one weight for the whole image, account for
a predictor that leaks its centre pixel, read signal-dependent noise (through the engine:
``tests/test_denoise.py``)."""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from kernels import blockwiener, posterior


def _scene(seed: int = 0, size: int = 192) -> np.ndarray:
    """Flat regions and sharp-edged discs and squares (normalised 0..1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 0.2)
    for _ in range(40):
        cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 14)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0.3, 0.9)
    return img


def _blind_mean(y: np.ndarray) -> np.ndarray:
    """A blind-spot predictor: the mean of the 5 x 5 neighbours, the pixel itself left out."""
    k = np.ones((5, 5))
    k[2, 2] = 0
    return ndimage.convolve(y, k / k.sum(), mode="reflect")


def _patches(*images: np.ndarray, size: int = 48) -> list[np.ndarray]:
    n = images[0].shape[0] // size
    return [np.stack([a[i * size:(i + 1) * size, j * size:(j + 1) * size] for i in range(n) for j in range(n)])
            for a in images]


def _psnr(x, ref):
    return 10 * np.log10(1.0 / np.mean((x - ref) ** 2))


def test_local_sure_helps_a_blind_predictor_and_accounts_for_a_leaking_one():
    clean = _scene()
    clean[:, :96] = 0.2  # the left half flat, the right half discs and squares
    noisy = clean + np.random.default_rng(1).normal(0, 0.1, clean.shape)
    blind = _blind_mean(noisy)
    mu, a = posterior.divergence_probe(lambda x: np.stack([_blind_mean(p) for p in x]), noisy[None])
    assert np.allclose(mu[0], blind) and abs(a.mean()) < 0.01  # the probe sees no leak where there is none
    fit = posterior.fit_channel(*_patches(noisy, blind, a[0]))
    assert abs(fit["noise"][0] - 0.01) < 0.002 and abs(fit["noise"][1]) < 0.005 and max(fit["leak"]) < 0.01
    fused = posterior.apply(noisy[None], blind[None], {k: [v] for k, v in fit.items()})[0]
    assert _psnr(fused, clean) > _psnr(blind, clean) + 0.5
    w = posterior.weights(noisy, blind, fit["noise"], fit["leak_centres"], fit["leak"])
    assert w[:, :40].mean() < 0.05 and w[:, 120:].mean() > 0.2  # edges take more of the noisy pixel than flat ground
    # no single weight does as well: the best one for the whole image, chosen against the clean image
    residual = noisy - blind
    best = np.clip(np.sum(residual * (clean - blind)) / np.sum(residual**2), 0, 1)
    assert _psnr(fused, clean) > _psnr(blind + best * residual, clean) + 0.2

    leak = 0.3  # a predictor that keeps 30 % of its centre pixel
    leaky = (1 - leak) * blind + leak * noisy
    _, probe = posterior.divergence_probe(lambda x: (1 - leak) * np.stack([_blind_mean(p) for p in x]) + leak * x,
                                          noisy[None])
    assert abs(probe.mean() - leak) < 0.01
    with_leak = posterior.fit_channel(*_patches(noisy, leaky, probe[0]))
    ignoring = posterior.fit_channel(*_patches(noisy, leaky, np.zeros_like(noisy)))
    # the leak shrinks the residual, so more of it is needed: where the blind predictor takes over
    # 40 % the blend lands where its did (below, it cannot take the leaked 30 % back out: w >= 0);
    # with the same noise line (the two fits read it off differently structured halves)
    assert all(abs(value - leak) < 0.03 for value in with_leak["leak"])  # read in every structure bin
    w_leak = posterior.weights(noisy, leaky, fit["noise"], with_leak["leak_centres"], with_leak["leak"])
    sel = (w > 0.4) & (w < 0.95)
    assert sel.sum() > 1000 and np.abs(leak + (1 - leak) * w_leak[sel] - w[sel]).max() < 0.03
    out = {name: posterior.apply(noisy[None], leaky[None], {k: [v] for k, v in f.items()})[0]
           for name, f in (("with", with_leak), ("ignoring", ignoring))}
    assert _psnr(out["with"], clean) > _psnr(out["ignoring"], clean) > _psnr(leaky, clean) - 0.05


def test_window_holds_as_many_pixels_in_3d():
    assert posterior.window_sigma(2) == posterior.SIGMA_2D
    assert abs((2 * np.sqrt(np.pi) * posterior.window_sigma(3)) ** 3 - (2 * np.sqrt(np.pi) * 10) ** 2) < 1e-6
    # the window, the structure's (pixel) or a block's (band), then the second stage's blocks
    assert posterior.radius(2) == 25 + 2 + 7 and posterior.radius(3) == 8 + 2 + blockwiener.reach(3)
    assert posterior.radius(2, choice="pixel") == 27 and posterior.radius(2, choice="band") == 25 + 7
    assert posterior.radius(2, choice="band+blocks") == 25 + 7 + 7 and posterior.radius(3, choice="off") == 0


def test_noise_line_reads_signal_dependent_noise():
    clean = _scene(2)
    rng = np.random.default_rng(3)
    photons = 200.0
    noisy = rng.poisson(clean * photons) / photons  # variance clean / photons
    from kernels.noise import second_difference_variance

    d2 = second_difference_variance(noisy)
    offset, slope, floor = posterior.noise_line(d2, clean, posterior.structure(clean))
    assert abs(slope - 1 / photons) < 0.3 / photons and abs(offset) < 0.3 * 0.2 / photons
    assert abs(floor - 0.2 / photons) < 0.3 * 0.2 / photons  # the darkest level's own variance (0.2 / photons)


def test_the_step_in_torch_matches_scipy():
    """``kernels.posterior_device`` (the step beside the network on a GPU) against the scipy
    reference, on the CPU: 2D and 3D, an axis shorter than the window's reach (mirrored more
    than once), leak centres with repeats and values beyond them."""
    import torch

    from kernels import posterior_device

    rng = np.random.default_rng(3)
    table = {"noise": [[0.002, 0.002, 1e-4]], "leak_centres": [[0.0, 0.0, 1e-3, 0.01, 0.01]],
             "leak": [[0.02, 0.03, 0.05, 0.12, 0.15]]}
    for shape in ((150, 130), (4, 40, 36)):
        clean = ndimage.gaussian_filter(rng.random(shape), 2) * 4
        y = (clean + rng.normal(0, 0.08, shape)).astype(np.float32)[None]
        mu = ndimage.gaussian_filter(y[0], 1.2).astype(np.float32)[None]
        w = posterior.weights(y[0], mu[0], table["noise"][0], table["leak_centres"][0], table["leak"][0])
        assert 0.05 < w.mean() < 0.95 and np.ptp(w) > 0.2  # weights in play, not all clipped
        for choice in posterior.CHOICES:
            reference = posterior.apply(y, mu, table, choice=choice)
            got = posterior_device.apply(torch.from_numpy(y), torch.from_numpy(mu), table, choice=choice).numpy()
            assert got.dtype == np.float32 and np.abs(got - reference).max() <= 1e-6, choice
    x = np.concatenate([rng.uniform(-0.01, 0.02, 500), [0.0, 1e-3, 0.01, -1.0, 1.0]])
    for xp in ([0.0, 0.0, 1e-3, 0.01, 0.01], [0.005], [0.0, 0.01]):
        fp = list(rng.random(len(xp)))
        assert np.abs(posterior_device.interp(torch.from_numpy(x), xp, fp).numpy() - np.interp(x, xp, fp)).max() < 1e-12


def _textured(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Discs / balls on a background with a fine stripe texture (what a per-pixel weight cannot
    tell from noise and a block transform can)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    img = 0.3 + 0.08 * np.sin(grids[-1] * 1.3)
    for _ in range(12 if len(shape) == 2 else 6):
        centre, r = [rng.uniform(0, n) for n in shape], rng.uniform(4, 10)
        img[sum((g - c) ** 2 for g, c in zip(grids, centre)) < r * r] = rng.uniform(0.5, 0.9)
    return img


def test_block_wiener_improves_a_pilot_and_reads_only_its_reach():
    """The second stage (``kernels.blockwiener``): with a pilot that smoothed texture away, the
    filtered noisy image is nearer the clean one than the pilot in 2D and 3D; the output of a
    pixel depends on nothing beyond ``reach`` (a crop with that margin gives the same values:
    tiled equals untiled); with no noise, a pilot that is the image gives it back; torch computes the same."""
    import torch

    from kernels.posterior_device import _reflect_pad

    for shape in ((96, 88), (30, 40, 36)):
        clean = _textured(len(shape), shape)
        rng = np.random.default_rng(5)
        noisy = clean + rng.normal(0, 0.08, shape)
        pilot = ndimage.gaussian_filter(noisy, 1.5)
        variance = np.full(shape, 0.08**2)
        out = blockwiener.apply(noisy, pilot, variance)
        assert _psnr(out, clean) > _psnr(pilot, clean) + 0.5, (shape, _psnr(out, clean), _psnr(pilot, clean))
        r = blockwiener.reach(len(shape))
        crop = tuple(slice(5, n - 3) for n in shape)
        inner = tuple(slice(r, (c.stop - c.start) - r) for c in crop)
        part = blockwiener.apply(noisy[crop], pilot[crop], variance[crop], origin=(5,) * len(shape))
        whole = out[crop][inner]
        assert np.array_equal(part[inner], whole)
        wider = tuple(slice(r - 1, (c.stop - c.start) - r + 1) for c in crop)
        assert not np.array_equal(part[wider], out[crop][wider])  # one pixel nearer the edge: it does differ
        assert np.allclose(blockwiener.apply(noisy, noisy, np.full(shape, 1e-12)), noisy, atol=1e-6)
        width, step = blockwiener.BLOCK[len(shape)], blockwiener.STEP[len(shape)]
        padded = (_reflect_pad(torch.from_numpy(a), width - 1) for a in (noisy, pilot, variance))
        starts = blockwiener.grid_starts((0,) * len(shape), width, step)
        assert np.abs(blockwiener.filter_padded(*padded, width, step=step, starts=starts).numpy() - out).max() < 1e-12


def _blocks_one_by_one(y, pilot, variance, width: int, step: int, origin) -> np.ndarray:
    """The block Wiener filter written out block by block (the definition the separable code
    must equal): every block whose global start is a multiple of ``step``."""
    dct = blockwiener.basis(width)

    def transform(block, matrix):
        for axis in range(block.ndim):
            block = np.moveaxis(np.tensordot(matrix, np.moveaxis(block, axis, 0), 1), 0, axis)
        return block

    pad = [np.pad(a, width - 1, mode="symmetric") for a in (y, pilot, variance)]
    total, weight = np.zeros(pad[0].shape), np.zeros(pad[0].shape)
    firsts = [(width - 1 - o) % step for o in origin]
    for start in itertools.product(*(range(f, n - width + 1, step) for f, n in zip(firsts, pad[0].shape))):
        where = tuple(slice(a, a + width) for a in start)
        c, p = transform(pad[0][where], dct), transform(pad[1][where], dct)
        gain = p * p / (p * p + pad[2][where].mean())
        block_weight = 1.0 / ((gain**2).sum() + 1e-12)
        total[where] += block_weight * transform(gain * c, dct.T)
        weight[where] += block_weight
    inside = tuple(slice(width - 1, n - width + 1) for n in pad[0].shape)
    return total[inside] / weight[inside]


def test_block_grid_with_a_step_is_its_blocks_one_by_one_and_shared_by_tiles():
    """With blocks every ``step`` pixels, the separable code (numpy and torch) equals the filter
    written block by block, and a crop that knows its global origin gets the whole image's
    values wherever its blocks are inside (the grid is global, so tiles agree); a crop that
    does not (origin 0) gets other values."""
    import torch

    from kernels.posterior_device import _reflect_pad

    rng = np.random.default_rng(2)
    for shape, width, step in (((23, 26), 5, 2), ((14, 15, 17), 4, 3)):
        y = rng.random(shape)
        pilot = 0.6 * y + 0.2 * rng.random(shape)
        variance = 0.01 + 0.01 * rng.random(shape)
        for origin in ((0,) * len(shape), (-3,) + (4,) * (len(shape) - 1)):
            out = blockwiener.apply(y, pilot, variance, block=width, step=step, origin=origin)
            assert np.abs(out - _blocks_one_by_one(y, pilot, variance, width, step, origin)).max() < 1e-12
            starts = blockwiener.grid_starts(origin, width, step)
            padded = (_reflect_pad(torch.from_numpy(a), width - 1) for a in (y, pilot, variance))
            on_torch = blockwiener.filter_padded(*padded, width, step=step, starts=starts).numpy()
            assert np.abs(on_torch - out).max() < 1e-12
        out = blockwiener.apply(y, pilot, variance, block=width, step=step)
        crop = tuple(slice(1, n - 1) for n in shape)
        inner = tuple(slice(width - 1, n - 2 - (width - 1)) for n in shape)
        shared = blockwiener.apply(y[crop], pilot[crop], variance[crop], block=width, step=step,
                                   origin=(1,) * len(shape))
        assert np.array_equal(shared[inner], out[crop][inner])
        alone = blockwiener.apply(y[crop], pilot[crop], variance[crop], block=width, step=step)
        assert not np.allclose(alone[inner], out[crop][inner])


def test_band_stage_reads_only_its_reach_and_matches_torch():
    """The per-band first stage (``kernels.blockwiener.shrink``): on a blurred prediction of a
    textured image it puts back more of the texture than of the noise (nearer the clean image
    than the prediction, in 2D and 3D); a pixel's output depends on nothing beyond the stage's
    reach (a crop with that margin gives the same values, one pixel less does not); torch
    computes the same."""
    import torch

    from kernels.posterior_device import _reflect_pad

    for shape in ((120, 112), (36, 40, 36)):
        clean = _textured(len(shape), shape)
        noisy = clean + np.random.default_rng(5).normal(0, 0.08, shape)
        mu = ndimage.gaussian_filter(noisy, 1.5)
        variance = np.full(shape, 0.08**2)
        taps = posterior.gaussian_taps(posterior.window_sigma(len(shape)))
        out = mu + blockwiener.shrink(noisy - mu, variance, taps)
        assert _psnr(out, clean) > _psnr(mu, clean) + 0.3, (shape, _psnr(out, clean), _psnr(mu, clean))
        r = posterior.radius(len(shape), choice="band")
        crop = tuple(slice(5, n - 3) for n in shape)
        part = mu[crop] + blockwiener.shrink((noisy - mu)[crop], variance[crop], taps)
        inner = tuple(slice(r, (c.stop - c.start) - r) for c in crop)
        assert np.array_equal(part[inner], out[crop][inner])
        wider = tuple(slice(r - 1, (c.stop - c.start) - r + 1) for c in crop)
        assert not np.array_equal(part[wider], out[crop][wider])  # one pixel nearer the edge: it does differ
        width = blockwiener.BAND_BLOCK[len(shape)]
        pad = width - 1 + len(taps) // 2
        padded = (_reflect_pad(torch.from_numpy(a), pad) for a in (noisy - mu, variance))
        assert np.abs(blockwiener.shrink_padded(*padded, width, taps).numpy() - (out - mu)).max() < 1e-12


def test_the_choice_follows_the_estimated_risk():
    """``kernels.posterior.choose`` picks the stages by Stein's unbiased risk estimate, with no
    clean image: a predictor that is already right everywhere keeps its output (``off``: every
    stage could only put noise back); a blurring one gets stages, and the one picked is within
    0.1 dB of the best against the clean image. Each estimate is near the true error."""
    clean = _textured(2, (160, 160))
    sigma = 0.08
    noisy = clean + np.random.default_rng(7).normal(0, sigma, clean.shape)
    table = {"noise": [[sigma**2, 0.0, sigma**2]], "leak_centres": [[0.0, 1.0]], "leak": [[0.0, 0.0]]}

    def exact(x):
        return np.broadcast_to(clean, x.shape).astype(np.float32)

    assert posterior.choose(posterior.predict_regions(exact, [noisy[None]]), table)["choice"] == ["off"]

    def blurred(x):  # a linear smoother: the probe's divergence is exact, the leak its centre tap
        return np.stack([[ndimage.gaussian_filter(c, 1.5, mode="reflect") for c in p] for p in x])

    picked = posterior.choose(posterior.predict_regions(blurred, [noisy[None]]), table)
    mu = blurred(noisy[None, None])[0]
    inner = (slice(39, -39),) * 2  # the pixels the estimate sums over (the stages' reach left out)
    truth = {how: np.mean(((posterior.apply(noisy[None], mu, table, choice=how)[0] - clean) ** 2)[inner])
             for how in posterior.CHOICES}
    choice = picked["choice"][0]
    assert choice != "off" and 10 * np.log10(truth[choice] / min(truth.values())) < 0.1, (picked, truth)
    assert all(abs(picked["risk"][0][how] - truth[how]) < 0.06 * truth[how] for how in posterior.CHOICES), \
        (picked, truth)
    volume = np.zeros((1, 6, 16, 16), np.float32)  # in 3D the estimate is not trusted: the old default, unestimated
    assert posterior.choose(posterior.predict_regions(exact, [volume]), table) == \
        {"choice": [posterior.LEGACY_CHOICE], "risk": [{}]}
