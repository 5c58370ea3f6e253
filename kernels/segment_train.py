"""Training the 3-class segmentation U-Net, and turning its probabilities into instances.

Annotations (instance labels) become three classes: background, interior and boundary (the
objects' inner rim). Touching nuclei are then separated by a boundary band the network learns
to see; interior blobs seed a watershed that grows them back over the boundary band. The loss
is class-weighted cross-entropy (boundaries are rare) plus soft Dice on interior and boundary,
robust to the imbalance either way. Patches come from a caller's sampler: this module knows
nothing of stores (``pipeline.steps.train`` feeds it). The classes and the watershed that undoes
them live in ``kernels.instances``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from kernels.masking import augment
from kernels.training import TrainResult, train_ensemble
from kernels.unet import UNetConfig

log = logging.getLogger(__name__)

PairSampler = Callable[[int, np.random.Generator], np.ndarray]  # (n, rng) -> (n, C + 1, *patch): image, classes


@dataclass(frozen=True)
class SegmentTrainConfig:
    patch: tuple[int, ...] = (128, 128)
    batch: int = 8
    steps: int = 2000
    lr: float = 1e-3
    val_patches: int = 16
    val_every: int = 100
    patience: int = 8
    seed: int = 0
    depth: int = 3
    width: int = 32
    pool: tuple[int, ...] = ()
    dice_weight: float = 1.0
    # share of training patches seen as if imaged coarser, up to this factor (``degrade_resolution``)
    low_resolution: float = 0.5
    low_resolution_max: float = 2.5
    # predictive uncertainty (``kernels.uncertainty.UncertaintyConfig`` as a dict); None: deterministic
    uncertainty: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch"], d["pool"] = list(self.patch), list(self.pool)
        return d


def architecture(ndim: int, channels: int, depth: int, width: int, pool: tuple[int, ...] = (),
                 dropout: float = 0.0) -> UNetConfig:
    """BatchNorm, not Group/InstanceNorm: statistics over a tile would make tiles disagree (and
    have no fixed moment map for ADF)."""
    return UNetConfig(ndim=ndim, in_channels=channels, out_channels=3, depth=depth, width=width, norm="batch", pool=pool,
                      dropout=dropout)


def class_weights(classes: np.ndarray) -> np.ndarray:
    """Inverse square-root frequencies, mean 1: rare boundaries count more, not overwhelmingly."""
    freq = np.bincount(classes.ravel().astype(np.int64), minlength=3).astype(np.float64) + 1.0
    w = 1.0 / np.sqrt(freq / freq.sum())
    return (w / w.mean()).astype(np.float32)


def soft_dice_loss(prob, target):
    """1 - mean soft Dice of interior and boundary (robust to their rarity)."""
    import torch.nn.functional as F

    onehot = F.one_hot(target, 3).movedim(-1, 1).to(prob.dtype)
    dims = tuple(range(2, prob.ndim)) + (0,)
    inter = (prob * onehot).sum(dim=dims)
    denom = prob.sum(dim=dims) + onehot.sum(dim=dims)
    dice = (2 * inter + 1) / (denom + 1)
    return 1 - dice[1:].mean()


def segmentation_loss(logits, target, weights, dice_weight: float = 1.0):
    """Weighted cross-entropy + soft Dice over interior and boundary."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, target, weight=weights)
    return ce + dice_weight * soft_dice_loss(torch.softmax(logits, dim=1), target)


# share of the training steps over which the ADF loss's Dirichlet term is ramped in
ADF_WARMUP = 0.3


def adf_segmentation_loss(net, x, target, weights, *, dice_weight: float = 1.0, smoothing: float = 0.05,
                          nll_weight: float = 1.0):
    """The ADF U-Net's loss: the deterministic loss (weighted cross-entropy + soft Dice) on the
    Dirichlet's mode ``m``, plus ``nll_weight`` x the class-weighted Dirichlet negative
    log-likelihood of the label-smoothed targets (Gast & Roth 2018) with ``m`` held fixed.

    Why not the Dirichlet NLL alone: a random network is confidently wrong, and the cheapest way
    to lower its NLL is to inflate every variance until the Dirichlet is flat, where the NLL
    has almost no gradient for the mean left. Measured on the test blobs (300 steps): the NLL
    alone stayed flat (accuracy 0), NLL + cross-entropy too (0.0-0.21); the cross-entropy
    teaching the mean, with the NLL ramped in (``nll_weight``, see ``ADF_WARMUP``) and
    calibrating only the precision, reached 0.73 (deterministic U-Net 0.77)."""
    import torch
    import torch.nn.functional as F

    from kernels.uncertainty import dirichlet_from_moments, dirichlet_nll, expected_softmax

    mean, var = net.moments(x)
    mode = expected_softmax(mean, var)
    ce = F.nll_loss(torch.log(mode.clamp_min(1e-8)), target, weight=weights)
    loss = ce + dice_weight * soft_dice_loss(mode, target)
    if nll_weight > 0:
        alpha = dirichlet_from_moments(mean.detach(), var)
        loss = loss + nll_weight * dirichlet_nll(alpha, target, weights, smoothing=smoothing)
    return loss


def augment_intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-patch contrast and offset jitter: the model must not rely on exact intensities."""
    n = x.shape[0]
    gain = rng.uniform(0.7, 1.3, size=(n,) + (1,) * (x.ndim - 1)).astype(np.float32)
    offset = rng.uniform(-0.1, 0.1, size=(n,) + (1,) * (x.ndim - 1)).astype(np.float32)
    return x * gain + offset


def degrade_resolution(x: np.ndarray, rng: np.random.Generator, *, share: float, max_factor: float) -> np.ndarray:
    """``(n, C, *spatial)`` patches, a ``share`` of them as if imaged ``f`` times coarser (``f``
    uniform in ``[1, max_factor]``; optical blur up to an anti-aliased detector's) and brought
    back to the model's scale by linear interpolation, as the engine's resampling does.

    Why: an image taken at a lower magnification is up-sampled to the model's training scale at
    inference (``kernels.resample``), which gives objects of the right size but soft edges a
    model trained on sharp patches has never seen (a DSB-2018 U-Net fell from 0.76 to 0.42
    accuracy@0.5 on the same nuclei at x0.5 brought back to x1). The class maps stay as they
    are: the model learns where the sharp boundary lies under the blur. cellpose trains with
    scale augmentation for the same reason."""
    from scipy import ndimage

    out = np.array(x, np.float32, copy=True)
    for i in range(len(out)):
        if share <= 0 or rng.random() >= share:
            continue
        factor = rng.uniform(1.0, max_factor)
        sigma = rng.uniform(0.0, (factor - 1.0) / 2.0)  # (f - 1) / 2: skimage's anti-aliasing for a 1/f rescale
        for c in range(out.shape[1]):
            image = ndimage.gaussian_filter(out[i, c], sigma, mode="reflect") if sigma > 0 else out[i, c]
            coarse = tuple(max(2, round(n / factor)) for n in image.shape)
            small = ndimage.zoom(image, [m / n for m, n in zip(coarse, image.shape)], order=1, mode="nearest",
                                 grid_mode=True)
            out[i, c] = ndimage.zoom(small, [n / m for n, m in zip(image.shape, small.shape)], order=1, mode="nearest",
                                     grid_mode=True)
    return out


def train_segmenter(sample: PairSampler, validation: np.ndarray, cfg: SegmentTrainConfig, *, channels: int = 1,
                    device: str | None = None, progress: bool = True, checkpoint: str | None = None) -> TrainResult:
    """Train on ``(n, C + 1, *patch)`` pairs (image channels, then the class map); returns the
    best weights by validation loss.

    ``cfg.uncertainty`` picks the model: none (one U-Net), ``adf`` (one U-Net trained through
    its moment propagation with the Dirichlet loss), ``mc-dropout`` (one U-Net with channel
    dropout in every block) or ``ensemble`` (``members`` U-Nets, seeds ``seed + k``, one after
    the other; their weights as one ``state_dict`` with keys ``<k>.<name>``). ``checkpoint``:
    a file training resumes from (member ``k`` of an ensemble: ``<file>.<k>``).
    """
    from kernels.uncertainty import UncertaintyConfig

    u = UncertaintyConfig.model_validate(cfg.uncertainty) if cfg.uncertainty else None
    if u is None or u.method != "ensemble":
        return _train_one(sample, validation, cfg, u, channels=channels, device=device, progress=progress,
                          checkpoint=checkpoint)
    return train_ensemble(lambda k: _train_one(sample, validation, replace(cfg, seed=cfg.seed + k), u, channels=channels,
                                               device=device, progress=progress,
                                               desc=f"train segment (member {k + 1}/{u.members})",
                                               checkpoint=f"{checkpoint}.{k}" if checkpoint else None), u.members)


def _train_one(sample: PairSampler, validation: np.ndarray, cfg: SegmentTrainConfig, u, *, channels: int,
               device: str | None, progress: bool, desc: str = "train segment",
               checkpoint: str | None = None) -> TrainResult:
    import torch

    from kernels.adf import ADFUNet
    from kernels.resident import default_device
    from kernels.training import fit
    from kernels.unet import UNet

    device = device or default_device()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dropout = u.dropout if u is not None and u.method == "mc-dropout" else 0.0
    net_cfg = architecture(len(cfg.patch), channels, cfg.depth, cfg.width, cfg.pool, dropout)
    adf = u is not None and u.method == "adf"
    net = (ADFUNet(net_cfg, input_variance=u.input_variance, min_variance=u.min_variance) if adf
           else UNet(net_cfg)).to(device)
    weights = torch.from_numpy(class_weights(validation[:, channels:])).to(device)
    to_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
    to_y = lambda a: torch.from_numpy(np.ascontiguousarray(a[:, 0], dtype=np.int64)).to(device)  # noqa: E731
    val_x, val_y = to_x(validation[:, :channels]), to_y(validation[:, channels:])

    def loss(x, y, step: int | None = None):
        if adf:  # validation (step None) scores the full loss
            ramp = 1.0 if step is None else min(1.0, step / max(1.0, ADF_WARMUP * cfg.steps))
            return adf_segmentation_loss(net, x, y, weights, dice_weight=cfg.dice_weight, smoothing=u.label_smoothing,
                                         nll_weight=ramp)
        return segmentation_loss(net(x), y, weights, cfg.dice_weight)

    def train_loss(step: int):
        pairs = augment(sample(cfg.batch, rng), rng)  # flips/rotations move image and classes together
        x = degrade_resolution(pairs[:, :channels], rng, share=cfg.low_resolution, max_factor=cfg.low_resolution_max)
        x = augment_intensity(x, rng)
        return loss(to_x(x), to_y(pairs[:, channels:]), step)

    result = fit(net, train_loss, lambda: loss(val_x, val_y), steps=cfg.steps, lr=cfg.lr, val_every=cfg.val_every,
                 patience=cfg.patience, desc=desc, progress=progress, checkpoint=checkpoint)
    return TrainResult(result.state_dict, net_cfg, result.best_val_loss, result.history, result.seconds, device)
