"""The posterior step of blind-spot denoisers (``kernels.posterior``): its SURE weights help a
blind predictor without clean data, account for a predictor that leaks its centre pixel, read
signal-dependent noise (through the engine: ``tests/test_denoise.py``)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from kernels import posterior


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


def test_sure_weights_help_a_blind_predictor_and_account_for_a_leaking_one():
    clean = _scene()
    noisy = clean + np.random.default_rng(1).normal(0, 0.1, clean.shape)
    blind = _blind_mean(noisy)
    mu, a = posterior.divergence_probe(lambda x: np.stack([_blind_mean(p) for p in x]), noisy[None])
    assert np.allclose(mu[0], blind) and abs(a.mean()) < 0.01  # the probe sees no leak where there is none
    fit = posterior.fit_channel(*_patches(noisy, blind, a[0]))
    fused = posterior.apply(noisy[None], blind[None], {k: [v] for k, v in fit.items()})[0]
    assert _psnr(fused, clean) > _psnr(blind, clean) + 0.5
    assert fit["weights"][-1] > fit["weights"][0] + 0.2  # edges take more of the noisy pixel than flat ground
    assert abs(fit["noise"][0] - 0.01) < 0.002 and abs(fit["noise"][1]) < 0.005

    leak = 0.3  # a predictor that keeps 30 % of its centre pixel
    leaky = (1 - leak) * blind + leak * noisy
    _, probe = posterior.divergence_probe(lambda x: (1 - leak) * np.stack([_blind_mean(p) for p in x]) + leak * x,
                                          noisy[None])
    assert abs(probe.mean() - leak) < 0.01
    with_leak = posterior.fit_channel(*_patches(noisy, leaky, probe[0]))
    ignoring = posterior.fit_channel(*_patches(noisy, leaky, np.zeros_like(noisy)))
    # the leak shrinks the residual, so more of it is needed: on edges the blend lands where the
    # blind predictor's did (on flat ground it cannot take the leaked 30 % back out: w >= 0)
    assert abs(leak + (1 - leak) * with_leak["weights"][-1] - fit["weights"][-1]) < 0.03
    assert with_leak["weights"][-1] > ignoring["weights"][-1]
    out = {name: posterior.apply(noisy[None], leaky[None], {k: [v] for k, v in f.items()})[0]
           for name, f in (("with", with_leak), ("ignoring", ignoring))}
    assert _psnr(out["with"], clean) > _psnr(out["ignoring"], clean) > _psnr(leaky, clean) - 0.05


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
