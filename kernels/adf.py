"""Assumed density filtering (ADF): a network whose every activation is a Gaussian, carried as
a mean and a variance, propagated in closed form in one forward pass.

After "Lightweight Probabilistic Deep Networks" (Gast & Roth, CVPR 2018). Each layer maps the
moments of its input to the moments of its output, assuming independent Gaussian inputs:

- linear maps (convolution, transposed convolution, the blur of max-blur-pool, BatchNorm in
  eval mode, up-sampling) are exact: the mean goes through the layer, the variance through the
  same layer with squared weights and no bias;
- ReLU / LeakyReLU take the moments of a rectified Gaussian (exact for a Gaussian input);
- max-pooling takes the moments of the maximum of two Gaussians (Clark 1961), applied pairwise
  along each axis of the window; the result is again treated as Gaussian (the ADF step).

:class:`ADFUNet` is :class:`kernels.unet.UNet` with a second forward, :meth:`ADFUNet.moments`:
the same modules and weights, so a trained deterministic U-Net runs in ADF mode with its own
``state_dict``, and its receptive field (the engine's halo) is unchanged. Torch has no moment
propagation, hence these by hand.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels.unet import Down, UNet, UNetConfig, pad_to_factor

Moments = tuple[torch.Tensor, torch.Tensor]  # (mean, variance), same shape

INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _pdf(z: torch.Tensor) -> torch.Tensor:
    # z^2 capped at 80: exp(-40) ~ 4e-18 is 0 for every use here, and far-tail z would otherwise
    # underflow to denormals, which made exp alone take 18 % of an ADF pass on CPU
    return INV_SQRT_2PI * torch.exp(-0.5 * (z * z).clamp_max(80.0))


def _cdf(z: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(z)


def conv(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> Moments:
    """``nn.Conv{1,2,3}d``: the variance through the squared weights."""
    functional = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[mean.ndim - 2]
    if layer.padding_mode != "zeros":
        raise NotImplementedError("ADF convolution supports zero padding only")
    out_var = functional(var, layer.weight**2, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return layer(mean), out_var


def conv_transpose(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> Moments:
    """``nn.ConvTranspose{1,2,3}d``: the variance through the squared weights."""
    functional = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[mean.ndim - 2]
    out_var = functional(var, layer.weight**2, None, layer.stride, layer.padding, layer.output_padding,
                         layer.groups, layer.dilation)
    return layer(mean), out_var


def batch_norm(layer: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> Moments:
    """BatchNorm with its running statistics (eval mode) is a per-channel affine map. In
    training mode it normalises by the batch statistics of the *means* (and updates its running
    statistics from them, as the deterministic network would), the same affine map for the variance."""
    if layer.training:
        dims = (0,) + tuple(range(2, mean.ndim))
        scale = torch.rsqrt(mean.var(dim=dims, unbiased=False) + layer.eps)
    elif layer.running_var is None:
        raise RuntimeError("ADF needs BatchNorm with running statistics at inference")
    else:
        scale = torch.rsqrt(layer.running_var + layer.eps)
    gain = scale
    if layer.weight is not None:
        gain = gain * layer.weight
    shape = (1, -1) + (1,) * (mean.ndim - 2)
    return layer(mean), var * (gain**2).reshape(shape)


def relu(mean: torch.Tensor, var: torch.Tensor, *, min_variance: float = 1e-6) -> Moments:
    """Moments of ``max(0, x)`` for ``x ~ N(mean, var)``: with ``z = mean / std``,
    ``E = mean Phi(z) + std phi(z)`` and ``E[y^2] = (mean^2 + var) Phi(z) + mean std phi(z)``,
    so ``Var = E (mean - E) + var Phi(z)`` (the form with the fewest tensor operations)."""
    var = var.clamp_min(min_variance)
    std = var.sqrt()
    z = mean / std
    cdf = _cdf(z)
    out_mean = mean * cdf + std * _pdf(z)
    return out_mean, (out_mean * (mean - out_mean) + var * cdf).clamp_min(min_variance)


def leaky_relu(mean: torch.Tensor, var: torch.Tensor, *, slope: float = 0.01, min_variance: float = 1e-6) -> Moments:
    """``y = slope x + (1 - slope) relu(x)``; ``Cov(x, relu(x)) = var Phi(mean / std)``."""
    var = var.clamp_min(min_variance)
    r_mean, r_var = relu(mean, var, min_variance=min_variance)
    cov = var * _cdf(mean / var.sqrt())
    out_mean = slope * mean + (1 - slope) * r_mean
    out_var = slope**2 * var + (1 - slope) ** 2 * r_var + 2 * slope * (1 - slope) * cov
    return out_mean, out_var.clamp_min(min_variance)


def gaussian_max(m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor, *,
                 min_variance: float = 1e-6) -> Moments:
    """Moments of ``max(a, b)`` for independent Gaussians (Clark 1961)."""
    theta = (v1 + v2).clamp_min(min_variance).sqrt()
    alpha = (m1 - m2) / theta
    cdf, cdf_neg, pdf = _cdf(alpha), _cdf(-alpha), _pdf(alpha)
    mean = m1 * cdf + m2 * cdf_neg + theta * pdf
    second = (m1 * m1 + v1) * cdf + (m2 * m2 + v2) * cdf_neg + (m1 + m2) * theta * pdf
    return mean, (second - mean * mean).clamp_min(min_variance)


def _max_pairs(mean: torch.Tensor, var: torch.Tensor, axis: int, stride: int, min_variance: float) -> Moments:
    """2-wide maximum along ``axis`` with ``stride`` 2 (max-pool) or 1 (max-blur-pool, whose
    last position sees the replicated last voxel: the maximum of a variable with itself is
    that variable, so it is copied, not treated as a second independent one)."""
    n = mean.shape[axis]
    if stride == 2:
        a, b = slice(0, n - n % 2, 2), slice(1, n, 2)
        idx = lambda s: (slice(None),) * axis + (s,)  # noqa: E731
        return gaussian_max(mean[idx(a)], var[idx(a)], mean[idx(b)], var[idx(b)], min_variance=min_variance)
    lo, hi = mean.narrow(axis, 0, n - 1), mean.narrow(axis, 1, n - 1)
    m, v = gaussian_max(lo, var.narrow(axis, 0, n - 1), hi, var.narrow(axis, 1, n - 1), min_variance=min_variance)
    return torch.cat([m, mean.narrow(axis, n - 1, 1)], axis), torch.cat([v, var.narrow(axis, n - 1, 1)], axis)


def max_pool(mean: torch.Tensor, var: torch.Tensor, pool: Sequence[int], *, min_variance: float = 1e-6) -> Moments:
    """Max-pooling by 1 or 2 per spatial axis (window = stride), pairwise along each axis."""
    for axis, p in enumerate(pool, start=2):
        if p == 2:
            mean, var = _max_pairs(mean, var, axis, 2, min_variance)
        elif p != 1:
            raise NotImplementedError("ADF max-pooling supports factors 1 and 2")
    return mean, var


def blur(layer: Down, mean: torch.Tensor, var: torch.Tensor) -> Moments:
    """The [1, 2, 1] low-pass of max-blur-pool, applied with the stride: a depthwise
    convolution, so the variance goes through the squared taps."""
    c = mean.shape[1]
    weight = layer.kernel.expand(c, 1, *layer.kernel.shape[2:]).to(mean.dtype)
    sl = [slice(None), slice(None)] + [slice(None) if p > 1 else slice(1, 2) for p in layer.pool]
    weight = weight[tuple(sl)] * (2.0 ** sum(p == 1 for p in layer.pool))
    functional = F.conv3d if layer.ndim == 3 else F.conv2d
    padding = [1 if p > 1 else 0 for p in layer.pool]
    return (functional(mean, weight, stride=layer.pool, padding=padding, groups=c),
            functional(var, weight**2, stride=layer.pool, padding=padding, groups=c))


def down(layer: Down, mean: torch.Tensor, var: torch.Tensor, *, min_variance: float = 1e-6) -> Moments:
    """``kernels.unet.Down``: max-pool, or N2V2's max-blur-pool (a 2-wide max with stride 1 per
    pooled axis, then :func:`blur`). Neighbouring outputs of the stride-1 max share inputs, so
    the blur sums correlated values that ADF treats as independent: the variance of the whole
    step is an approximation (the segmenter uses plain max-pooling)."""
    if not layer.blur:
        return max_pool(mean, var, layer.pool, min_variance=min_variance)
    for axis, p in enumerate(layer.pool, start=2):
        if p > 1:
            mean, var = _max_pairs(mean, var, axis, 1, min_variance)
    return blur(layer, mean, var)


def upsample(mean: torch.Tensor, var: torch.Tensor, scale: Sequence[int], mode: str = "nearest") -> Moments:
    """Nearest (each output copies one input: variance copied) or (bi/tri)linear up-sampling
    (each output a weighted sum of inputs: variance through the squared weights). The linear
    weights are torch's own, read off by interpolating the identity along each axis, so edge
    clamping, where one input carries the weights of two taps, is exact."""
    if mode == "nearest":
        return (F.interpolate(mean, scale_factor=tuple(scale), mode="nearest"),
                F.interpolate(var, scale_factor=tuple(scale), mode="nearest"))
    if mode not in ("linear", "bilinear", "trilinear"):
        raise NotImplementedError(f"ADF up-sampling supports nearest and linear modes, not {mode!r}")
    for axis, f in enumerate(scale, start=2):
        n = mean.shape[axis]
        eye = torch.eye(n, dtype=mean.dtype, device=mean.device)[None]  # (1, n, n): row i = input i
        weights = F.interpolate(eye, scale_factor=float(f), mode="linear", align_corners=False)[0]  # (n_in, n_out)
        mean = torch.movedim(torch.movedim(mean, axis, -1) @ weights, -1, axis)
        var = torch.movedim(torch.movedim(var, axis, -1) @ (weights * weights), -1, axis)
    return mean, var


def sequential(layers: nn.Sequential, mean: torch.Tensor, var: torch.Tensor, *, min_variance: float) -> Moments:
    """A ``ConvBlock`` (or any chain of the supported layers)."""
    for layer in layers:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            mean, var = conv(layer, mean, var)
        elif isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            mean, var = conv_transpose(layer, mean, var)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            mean, var = batch_norm(layer, mean, var)
        elif isinstance(layer, nn.ReLU):
            mean, var = relu(mean, var, min_variance=min_variance)
        elif isinstance(layer, nn.LeakyReLU):
            mean, var = leaky_relu(mean, var, slope=layer.negative_slope, min_variance=min_variance)
        elif isinstance(layer, (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d)):
            pass  # dropout is off at inference; ADF carries the input noise, not the dropout noise
        else:
            # GroupNorm / InstanceNorm normalise by statistics of the block itself: not a fixed
            # map, and not tile-invariant either; the segmenter uses BatchNorm
            raise NotImplementedError(f"ADF has no moment propagation for {type(layer).__name__}")
    return mean, var


class ADFUNet(UNet):
    """A :class:`kernels.unet.UNet` that also propagates moments (:meth:`moments`).

    ``input_variance``: the variance of the input noise (normalised units, where the image's
    p1..p99.9 span 0..1), the only source of variance; ``min_variance``: the floor every
    variance is kept above (it keeps the rectified-Gaussian moments finite). Neither is a
    weight: the ``state_dict`` is the plain U-Net's.
    """

    def __init__(self, config: UNetConfig, *, input_variance: float = 1e-3, min_variance: float = 1e-6):
        super().__init__(config)
        if input_variance < 0 or min_variance <= 0:
            raise ValueError("input_variance must be >= 0 and min_variance > 0")
        self.input_variance, self.min_variance = float(input_variance), float(min_variance)

    def moments(self, x: torch.Tensor, var: torch.Tensor | None = None) -> Moments:
        """Mean and variance of the output for input mean ``x`` and variance ``var`` (default:
        ``input_variance`` everywhere)."""
        c, floor = self.config, self.min_variance
        if var is None:
            var = torch.full_like(x, self.input_variance)
        inp, inp_var = x, var
        skips = []
        for enc, pool in zip(self.encoders, self.downs):
            x, var = sequential(enc, x, var, min_variance=floor)
            skips.append((x, var))
            x, var = down(pool, x, var, min_variance=floor)
        x, var = sequential(self.bottleneck, x, var, min_variance=floor)
        for level, dec in zip(reversed(range(c.depth)), self.decoders):
            x, var = upsample(x, var, c.pool, "nearest")
            if level > 0 or c.skip_top:
                x, var = torch.cat([x, skips[level][0]], 1), torch.cat([var, skips[level][1]], 1)
            x, var = sequential(dec, x, var, min_variance=floor)
        x, var = conv(self.head, x, var)
        if c.residual:  # the input and the network's output are correlated: the sum is an approximation
            x, var = x + inp, var + inp_var
        return x, var

    def moments_padded(self, x: torch.Tensor) -> Moments:
        """:meth:`moments` for any spatial size: pad the far end to the down-sampling grid, crop."""
        shape = x.shape[2:]
        mean, var = self.moments(pad_to_factor(x, self.config.factor))
        crop = (slice(None), slice(None)) + tuple(slice(0, n) for n in shape)
        return mean[crop], var[crop]


__all__ = ["ADFUNet", "Moments", "batch_norm", "blur", "conv", "conv_transpose", "down", "gaussian_max",
           "leaky_relu", "max_pool", "relu", "sequential", "upsample"]
