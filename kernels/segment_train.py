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
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from kernels.masking import augment
from kernels.training import TrainResult
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch"], d["pool"] = list(self.patch), list(self.pool)
        return d


def architecture(ndim: int, channels: int, depth: int, width: int, pool: tuple[int, ...] = ()) -> UNetConfig:
    """BatchNorm, not Group/InstanceNorm: statistics over a tile would make tiles disagree."""
    return UNetConfig(ndim=ndim, in_channels=channels, out_channels=3, depth=depth, width=width, norm="batch", pool=pool)


def class_weights(classes: np.ndarray) -> np.ndarray:
    """Inverse square-root frequencies, mean 1: rare boundaries count more, not overwhelmingly."""
    freq = np.bincount(classes.ravel().astype(np.int64), minlength=3).astype(np.float64) + 1.0
    w = 1.0 / np.sqrt(freq / freq.sum())
    return (w / w.mean()).astype(np.float32)


def segmentation_loss(logits, target, weights, dice_weight: float = 1.0):
    """Weighted cross-entropy + soft Dice over interior and boundary."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, target, weight=weights)
    prob = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, 3).movedim(-1, 1).to(prob.dtype)
    dims = tuple(range(2, prob.ndim)) + (0,)
    inter = (prob * onehot).sum(dim=dims)
    denom = prob.sum(dim=dims) + onehot.sum(dim=dims)
    dice = (2 * inter + 1) / (denom + 1)
    return ce + dice_weight * (1 - dice[1:].mean())


def augment_intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-patch contrast and offset jitter: the model must not rely on exact intensities."""
    n = x.shape[0]
    gain = rng.uniform(0.7, 1.3, size=(n,) + (1,) * (x.ndim - 1)).astype(np.float32)
    offset = rng.uniform(-0.1, 0.1, size=(n,) + (1,) * (x.ndim - 1)).astype(np.float32)
    return x * gain + offset


def train_segmenter(sample: PairSampler, validation: np.ndarray, cfg: SegmentTrainConfig, *, channels: int = 1,
                    device: str | None = None, progress: bool = True) -> TrainResult:
    """Train on ``(n, C + 1, *patch)`` pairs (image channels, then the class map); returns the
    best weights by validation loss."""
    import torch

    from kernels.resident import default_device
    from kernels.training import fit
    from kernels.unet import UNet

    device = device or default_device()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net_cfg = architecture(len(cfg.patch), channels, cfg.depth, cfg.width, cfg.pool)
    net = UNet(net_cfg).to(device)
    weights = torch.from_numpy(class_weights(validation[:, channels:])).to(device)
    to_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
    to_y = lambda a: torch.from_numpy(np.ascontiguousarray(a[:, 0], dtype=np.int64)).to(device)  # noqa: E731
    val_x, val_y = to_x(validation[:, :channels]), to_y(validation[:, channels:])

    def train_loss(step: int):
        pairs = augment(sample(cfg.batch, rng), rng)  # flips/rotations move image and classes together
        x = augment_intensity(pairs[:, :channels], rng)
        return segmentation_loss(net(to_x(x)), to_y(pairs[:, channels:]), weights, cfg.dice_weight)

    result = fit(net, train_loss, lambda: segmentation_loss(net(val_x), val_y, weights, cfg.dice_weight),
                 steps=cfg.steps, lr=cfg.lr, val_every=cfg.val_every, patience=cfg.patience, desc="train segment",
                 progress=progress)
    return TrainResult(result.state_dict, net_cfg, result.best_val_loss, result.history, result.seconds, device)
