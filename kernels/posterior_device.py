"""The posterior step (``kernels.posterior``) on the network's device, in torch.

On a GPU worker the network runs at tens of millions of voxels per second while the step's
filters in scipy run on one CPU core: 3.1 s for one 3D tile of 136 x 328 x 328 voxels (2 CPU
cores here), so the step, not the network, would set the pace. This module computes the same
weights with the same separable filters on the tensors the network just produced, in float64
so that it agrees with ``kernels.posterior.apply`` (the reference, and the CPU path) to rounding.
torch has no ``gaussian_filter``, ``uniform_filter`` or ``interp``, so they are written here:
scipy's half-sample-symmetric ``reflect`` border and its Gaussian weights (radius ``int(truncate
* sigma + 0.5)``), a ``searchsorted`` linear interpolation with ``numpy.interp``'s clamping.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kernels import blockwiener
from kernels.posterior import SIGMA_2D, WINDOW, channel_table, choices, gaussian_taps, noise_variance, window_sigma


def _reflect_index(n: int, reach: int) -> np.ndarray:
    """Indices of a length-``n`` axis extended by ``reach`` on both sides, mirrored about the
    edges with the edge sample repeated (scipy's ``reflect``; any reach, also beyond ``n``)."""
    i = np.mod(np.arange(-reach, n + reach), 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def _reflect_axis(x, axis: int, reach: int):
    """``x`` extended by ``reach`` on both sides of ``axis`` with scipy's ``reflect`` border."""
    import torch

    return torch.index_select(x, axis, torch.from_numpy(_reflect_index(x.shape[axis], reach)).to(x.device))


def _correlate1d(x, weights, axis: int):
    """``scipy.ndimage.correlate1d(x, weights, axis, mode="reflect")`` for an odd, centred kernel."""
    import torch
    import torch.nn.functional as F

    reach = len(weights) // 2
    padded = _reflect_axis(x, axis, reach).movedim(axis, -1)
    shape = padded.shape
    w = torch.as_tensor(np.asarray(weights, np.float64), dtype=x.dtype, device=x.device).view(1, 1, -1)
    out = F.conv1d(padded.reshape(-1, 1, shape[-1]), w)  # conv1d correlates (no flip)
    return out.reshape(*shape[:-1], shape[-1] - 2 * reach).movedim(-1, axis)


def _separable(x, weights):
    for axis in range(x.ndim):
        x = _correlate1d(x, weights, axis)
    return x


def structure(mu):
    """``kernels.posterior.structure`` of one channel (a float64 tensor)."""
    box = np.full(WINDOW, 1.0 / WINDOW)
    mean = _separable(mu, box)
    return (_separable(mu * mu, box) - mean * mean).clamp_min(0.0)


def interp(x, xp: list[float], fp: list[float]):
    """``numpy.interp(x, xp, fp)`` for a tensor ``x`` and increasing ``xp``."""
    import torch

    if len(xp) == 1:
        return torch.full_like(x, float(fp[0]))
    xp_t = torch.as_tensor(xp, dtype=x.dtype, device=x.device)
    fp_t = torch.as_tensor(fp, dtype=x.dtype, device=x.device)
    # strictly inside: the last xp[j] <= x has xp[j + 1] > x, so the step is never 0
    j = (torch.searchsorted(xp_t, x.contiguous(), right=True) - 1).clamp(0, len(xp) - 2)
    dx = (xp_t[j + 1] - xp_t[j]).clamp_min(1e-300)
    inside = fp_t[j] + (x - xp_t[j]) / dx * (fp_t[j + 1] - fp_t[j])
    return torch.where(x < xp_t[0], fp_t[0], torch.where(x >= xp_t[-1], fp_t[-1], inside))


def weights(y, mu, noise: list[float], leak_centres: list[float], leak: list[float], *, sigma_2d: float = SIGMA_2D):
    """``kernels.posterior.weights`` of one channel, for float64 tensors on any device."""
    gauss = gaussian_taps(window_sigma(mu.ndim, sigma_2d))
    kept = 1.0 - interp(structure(mu), leak_centres, leak)
    noise_sum = _separable(noise_variance(mu, noise) * kept, gauss)
    residual_sum = _separable((y - mu) ** 2, gauss)
    return (1.0 - noise_sum / residual_sum.clamp_min(1e-30)).clamp(0.0, 1.0)


def stages(y, mu, fit: dict[str, Any], choice: str, *, sigma_2d: float = SIGMA_2D,
           origin: tuple[int, ...] | None = None):
    """``kernels.posterior.stages`` of one channel, for float64 tensors on any device (the
    blocks padded with scipy's ``reflect``, as ``numpy.pad``'s ``symmetric`` there)."""
    if choice == "off":
        return mu
    variance = noise_variance(mu, fit["noise"])
    if choice.startswith("pixel"):
        first = mu + weights(y, mu, fit["noise"], fit["leak_centres"], fit["leak"], sigma_2d=sigma_2d) * (y - mu)
    else:
        taps = gaussian_taps(window_sigma(mu.ndim, sigma_2d))
        band = blockwiener.BAND_BLOCK[mu.ndim]
        pad = band - 1 + len(taps) // 2
        first = mu + blockwiener.shrink_padded(_reflect_pad(y - mu, pad), _reflect_pad(variance, pad), band, taps)
    if not choice.endswith("+blocks"):
        return first
    width, step = blockwiener.BLOCK[mu.ndim], blockwiener.STEP[mu.ndim]
    return blockwiener.filter_padded(*(_reflect_pad(a, width - 1) for a in (y, first, variance)), width, step=step,
                                     starts=blockwiener.grid_starts(origin or (0,) * mu.ndim, width, step))


def apply(y, mu, table: dict[str, Any], *, sigma_2d: float = SIGMA_2D, choice: str = "auto",
          origin: tuple[int, ...] | None = None):
    """``kernels.posterior.apply`` for ``(C, *spatial)`` tensors on the network's device; returns
    a float32 tensor there."""
    import torch

    return torch.stack([stages(y[c].double(), mu[c].double(), channel_table(table, c), how, sigma_2d=sigma_2d,
                               origin=origin).float()
                        for c, how in enumerate(choices(table, choice))])


def _reflect_pad(x, reach: int):
    """``numpy.pad(x, reach, mode="symmetric")`` (scipy's ``reflect``) of a tensor."""
    for axis in range(x.ndim):
        x = _reflect_axis(x, axis, reach)
    return x
