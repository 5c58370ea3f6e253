"""Predictive uncertainty of the U-Nets: how a model card names its method, the ADF output
distribution and loss, tile-invariant MC dropout, and the per-pixel maps every method writes.

Three methods give the same outputs (mean class probabilities, predictive entropy, variance):

- ``adf``: one forward pass of :class:`kernels.adf.ADFUNet`; the logits' mean and variance
  become a per-pixel Dirichlet over the class probabilities (:func:`dirichlet_from_moments`),
  trained with the Dirichlet negative log-likelihood of label-smoothed targets (:func:`dirichlet_nll`).
- ``mc-dropout``: ``samples`` forward passes with channel dropout on; the masks of pass ``t``
  depend only on ``(seed, t, layer)`` (:class:`FixedDropout`), so every tile draws the same
  ``T`` networks and tiled equals untiled.
- ``ensemble``: ``members`` independently seeded networks, resident together.

``kernels`` knows nothing of the engine: these map arrays to arrays.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Method = Literal["adf", "mc-dropout", "ensemble"]
METHODS: tuple[str, ...] = ("adf", "mc-dropout", "ensemble")
# segmentation maps, in this order, in OUT/uncertainty/<name>
CLASS_MAPS: tuple[str, ...] = ("foreground", "entropy", "variance")


class UncertaintyConfig(BaseModel):
    """The ``uncertainty`` entry of a model card: which method, and its settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method
    samples: int = Field(20, ge=2, le=1000)  # mc-dropout: forward passes
    members: int = Field(5, ge=2, le=64)  # ensemble: networks
    dropout: float = Field(0.1, gt=0, lt=1)  # mc-dropout: channel-dropout rate of every block
    seed: int = 0  # mc-dropout: the masks of pass t come from (seed, t, layer)
    input_variance: float = Field(1e-3, ge=0)  # adf: input noise variance, normalised units
    min_variance: float = Field(1e-6, gt=0)  # adf: floor of every variance
    label_smoothing: float = Field(0.05, ge=0, lt=1)  # adf: training targets


def expected_softmax(mean, var, *, dim: int = 1):
    """``E[softmax(z)]`` for Gaussian logits ``z ~ N(mean, var)``, by the probit rule
    ``softmax(mean / sqrt(1 + pi var / 8))`` (MacKay 1992)."""
    import torch

    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), dim=dim)


def dirichlet_from_moments(mean, var, *, max_precision: float = 100.0, dim: int = 1):
    """Dirichlet concentrations ``alpha`` (same shape) from the logits' Gaussian moments.

    The class probabilities are ``softmax`` of Gaussian logits; their mean is approximated by
    the probit rule ``m = softmax(mean / sqrt(1 + pi var / 8))`` (MacKay 1992), their total
    variance by the delta method ``sum_k (m_k (1 - m_k))^2 var_k``. The Dirichlet is
``alpha = 1 + s m``: its mode is ``m``, ``s = 0`` is the uniform distribution (know nothing),
    and ``s`` is moment-matched to the total variance, ``(1 - sum_k p_k^2) / (alpha_0 + 1)`` with
    ``alpha_0 = K + s``, and kept in ``(0, max_precision)`` by smooth bounds (softplus, tanh), so
    its gradient never dies at a bound.

    Why not ``alpha = s m`` (a plain moment match): concentrations below 1 put the density on
    the simplex's edges, so near-one-hot targets are fit best by a flat, sparse Dirichlet
    whatever the mean says; training an ADF U-Net that way learned huge variances and uniform
    means (measured: accuracy 0 after 300 steps on the test blobs, where ``1 + s m`` learns).
    """
    import torch

    k = mean.shape[dim]
    m = expected_softmax(mean, var, dim=dim)
    spread = (1 - (m * m).sum(dim, keepdim=True)).clamp_min(1e-12)
    total_var = ((m * (1 - m)) ** 2 * var).sum(dim, keepdim=True).clamp_min(1e-12)
    import torch.nn.functional as F

    precision = max_precision * torch.tanh(F.softplus(spread / total_var - 1 - k) / max_precision)
    return 1 + m * precision


def dirichlet_nll(alpha, target, weights=None, *, smoothing: float = 0.05):
    """Mean negative log-likelihood of class targets (int64, no class axis) under per-pixel
    Dirichlets ``alpha`` (class axis 1); targets are label-smoothed so every class has mass
    (a Dirichlet has no finite density on the simplex's corners). ``weights``: per class."""
    import torch
    import torch.nn.functional as F

    k = alpha.shape[1]
    onehot = F.one_hot(target, k).movedim(-1, 1).to(alpha.dtype)
    y = onehot * (1 - smoothing) + smoothing / k
    nll = (torch.lgamma(alpha).sum(1) - torch.lgamma(alpha.sum(1)) - ((alpha - 1) * torch.log(y)).sum(1))
    if weights is None:
        return nll.mean()
    w = weights[target]
    return (nll * w).sum() / w.sum()


def dirichlet_mean_variance(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean class probabilities, their total variance ``sum_k Var[p_k]``); class axis 1."""
    a0 = alpha.sum(axis=1, keepdims=True)
    mean = alpha / a0
    return mean, (1 - (mean * mean).sum(axis=1)) / (a0[:, 0] + 1)


def _mask_seed(seed: int, sample: int, layer: int) -> int:
    return (int(seed) * 1_000_003 + int(sample) * 10_007 + int(layer)) % (2**63 - 1)


class FixedDropout:
    """Channel dropout on every ``Dropout2d/3d`` of ``net`` (kept in eval mode) with masks that
    depend only on ``(seed, sample, layer)``: the same network for every block, batch and tile.

    Torch's own dropout draws from a global generator per call, so each tile would see other
    networks. Here each mask is one Bernoulli draw per channel, scaled by ``1 / (1 - rate)``.
    The hooks are installed once and read the sample from a thread-local: a worker's threads
    share one resident network, and a hook registered per call would leak into the others'
    forwards (measured: tiled and untiled maps differed by 0.1 with two threads).
    """

    def __init__(self, net, *, rate: float, seed: int = 0):
        from torch import nn

        self.rate, self.seed = float(rate), int(seed)
        self._local = threading.local()
        self._masks: dict[tuple, object] = {}
        layers = [m for m in net.modules() if isinstance(m, (nn.Dropout2d, nn.Dropout3d))]
        for index, layer in enumerate(layers):
            layer.register_forward_hook(lambda module, inputs, output, index=index: self._apply(index, output))

    def _mask(self, sample: int, index: int, channels: int, like):
        import torch

        key = (sample, index, channels, like.device, like.dtype)
        mask = self._masks.get(key)
        if mask is None:
            gen = torch.Generator().manual_seed(_mask_seed(self.seed, sample, index))
            keep = (torch.rand(channels, generator=gen) >= self.rate).to(like.dtype) / (1 - self.rate)
            mask = self._masks[key] = keep.to(like.device)
        return mask

    def _apply(self, index: int, output):
        sample = getattr(self._local, "sample", None)
        if sample is None:  # not sampling: dropout off, as in eval mode
            return output
        mask = self._mask(sample, index, output.shape[1], output)
        return output * mask.reshape((1, -1) + (1,) * (output.ndim - 2))

    @contextmanager
    def sample(self, index: int) -> Iterator[None]:
        """Forward passes in this block (this thread) use the masks of sample ``index``."""
        self._local.sample = int(index)
        try:
            yield
        finally:
            self._local.sample = None


def entropy(prob: np.ndarray) -> np.ndarray:
    """Predictive entropy over class axis 1, divided by ``log K`` (0 = certain, 1 = uniform)."""
    k = prob.shape[1]
    p = np.clip(prob, 1e-12, 1.0)
    return (-(p * np.log(p)).sum(axis=1) / math.log(k)).astype(np.float32)


def class_maps(mean: np.ndarray, variance: np.ndarray | None) -> np.ndarray:
    """``(N, K, *)`` mean class probabilities (class 0 background) and ``(N, *)`` total variance
    (None for a deterministic softmax: zero) -> ``(N, 3, *)``: foreground probability,
    normalised predictive entropy, variance (:data:`CLASS_MAPS`)."""
    fg = 1 - mean[:, 0]
    var = np.zeros_like(fg) if variance is None else variance
    return np.stack([fg, entropy(mean), var], axis=1).astype(np.float32)


def sample_moments(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(S, N, K, *)`` class probabilities of S networks -> (mean ``(N, K, *)``, total variance
    ``(N, *)`` summed over classes)."""
    mean = samples.mean(axis=0)
    return mean, samples.var(axis=0).sum(axis=1)
