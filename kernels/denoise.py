"""Self-supervised denoising: N2V2 and Noise2Self training, and the denoising kernel.

Training sees only noisy data: a blind-spot mask (``kernels.masking``) hides pixels from the
network and the loss is the squared error on those pixels only, which in expectation is the
error against the clean signal plus the noise variance (Batson & Royer 2019). Patches come from
a caller-supplied sampler, so this module knows nothing of stores: ``pipeline.steps.train`` feeds it
patches drawn from random chunks of an OME-Zarr image.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Literal

import numpy as np

from kernels.contract import BatchContext, Scaling
from kernels.masking import augment, grid_mask, n2v_mask
from kernels.modelfile import UNetModelKernel
from kernels.training import TrainResult, train_ensemble
from kernels.unet import UNetConfig

log = logging.getLogger(__name__)

Method = Literal["n2v2", "n2s"]
PatchSampler = Callable[[int, np.random.Generator], np.ndarray]  # (n, rng) -> (n, C, *patch) float32


def architecture(method: Method, ndim: int, channels: int = 1, depth: int = 2, width: int = 32,
                 pool: tuple[int, ...] = (), dropout: float = 0.0) -> UNetConfig:
    """N2V2: max-blur-pool, no top skip, no residual. Noise2Self: a plain U-Net.

    No normalisation layers: BatchNorm's batch statistics of small batches of masked patches
    (training) against its running ones (inference) cost 1.6 dB on DSB-2018 at 5 photons after
    600 steps (27.1 vs 28.7 dB); without them the network is also tile-invariant in either mode.
    """
    if method == "n2v2":
        return UNetConfig(ndim=ndim, in_channels=channels, out_channels=channels, depth=depth, width=width,
                          norm="none", pool=pool, blurpool=True, skip_top=False, residual=False, dropout=dropout)
    if method == "n2s":
        return UNetConfig(ndim=ndim, in_channels=channels, out_channels=channels, depth=depth, width=width,
                          norm="none", pool=pool, dropout=dropout)
    raise ValueError(f"unknown denoising method '{method}' (n2v2 or n2s)")


@dataclass(frozen=True)
class TrainConfig:
    method: Method = "n2v2"
    patch: tuple[int, ...] = (64, 64)
    batch: int = 16
    steps: int = 2000
    lr: float = 1e-3
    # N2V: share of pixels masked per patch. The papers' 0.2 % suits 10^5 GPU steps; 10 % gives
    # each step 50x the loss signal for the same compute. At 600 steps: light-sheet 3D 36.4 dB
    # at 2 %, 38.9 at 5 %, 39.2 at 10 % (measured with z still pooled, see ``pipeline.steps.train``); DSB 2D flat from 5 to 10 % (29.6, 29.5). The median
    # replacement draws on 24 (2D) or 124 (3D) neighbours, so another masked pixel among them
    # leaks next to nothing of its value.
    mask_fraction: float = 0.1
    n2s_grid: int = 4  # Noise2Self: lattice period
    val_patches: int = 64
    val_every: int = 100
    patience: int = 6  # validations without improvement before stopping
    seed: int = 0
    depth: int = 2
    width: int = 32
    pool: tuple[int, ...] = ()
    # predictive uncertainty: ``mc-dropout`` or ``ensemble`` (``kernels.uncertainty.UncertaintyConfig``)
    uncertainty: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch"], d["pool"] = list(self.patch), list(self.pool)
        return d


def mask_batch(batch: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if cfg.method == "n2v2":
        return n2v_mask(batch, cfg.mask_fraction, rng, replacement="median")
    return grid_mask(batch, cfg.n2s_grid, rng)


def masked_mse(pred, target, mask):
    """Mean squared error over the masked pixels only."""
    diff = (pred - target) ** 2
    return (diff * mask).sum() / mask.sum().clamp_min(1)


def train_denoiser(sample: PatchSampler, validation: np.ndarray, cfg: TrainConfig, *, channels: int = 1,
                   device: str | None = None, progress: bool = True) -> TrainResult:
    """Train a blind-spot denoiser on patches from ``sample``; returns the best weights by the
    masked loss on ``validation`` patches (held-out data, masked once with a fixed seed).

    ``cfg.uncertainty``: ``mc-dropout`` trains one network with channel dropout in every block,
    ``ensemble`` trains ``members`` networks with seeds ``seed + k``.
    """
    from kernels.uncertainty import UncertaintyConfig

    u = UncertaintyConfig.model_validate(cfg.uncertainty) if cfg.uncertainty else None
    if u is not None and u.method == "adf":
        raise ValueError("ADF is trained for segmentation; a denoiser's uncertainty is mc-dropout or ensemble")
    if u is not None and u.method == "ensemble":
        return train_ensemble(lambda k: _train_one(sample, validation, replace(cfg, seed=cfg.seed + k), 0.0,
                                                   channels=channels, device=device, progress=progress,
                                                   desc=f"train {cfg.method} (member {k + 1}/{u.members})"),
                              u.members)
    dropout = u.dropout if u is not None else 0.0
    return _train_one(sample, validation, cfg, dropout, channels=channels, device=device, progress=progress)


def _train_one(sample: PatchSampler, validation: np.ndarray, cfg: TrainConfig, dropout: float, *, channels: int,
               device: str | None, progress: bool, desc: str = "") -> TrainResult:
    import torch

    from kernels.resident import default_device
    from kernels.training import fit
    from kernels.unet import UNet

    device = device or default_device()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net_cfg = architecture(cfg.method, len(cfg.patch), channels, cfg.depth, cfg.width, cfg.pool, dropout)
    net = UNet(net_cfg).to(device)
    val = np.asarray(validation, np.float32)
    val_in, val_mask = mask_batch(val, cfg, np.random.default_rng(cfg.seed + 1))
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
    val_t, val_in_t, val_mask_t = to(val), to(val_in), to(val_mask)

    def train_loss(step: int):
        batch = augment(sample(cfg.batch, rng), rng)
        masked, mask = mask_batch(batch, cfg, rng)
        return masked_mse(net(to(masked)), to(batch), to(mask))

    result = fit(net, train_loss, lambda: masked_mse(net(val_in_t), val_t, val_mask_t), steps=cfg.steps, lr=cfg.lr,
                 val_every=cfg.val_every, patience=cfg.patience, desc=desc or f"train {cfg.method}", progress=progress)
    return TrainResult(result.state_dict, net_cfg, result.best_val_loss, result.history, result.seconds, device)


class DenoiseKernel(UNetModelKernel):
    """A trained denoiser from a model folder (see ``kernels.modelfile``); keyed by its hash.

    It sees normalised input (the input's global percentiles at the card's levels) and maps its
    output back to input units itself, with the scaling in its context. A model trained with
    an uncertainty method (MC dropout, an ensemble) returns the mean of its networks and a
    ``variance`` map per channel: their per-pixel variance, in input units squared.
    """

    name = "denoise"
    task = "denoise"
    # a residual whose neighbours correlate this much is structure, not noise
    residual_correlation_limit = 0.2

    def __init__(self, params: UNetModelKernel.Params):
        super().__init__(params)
        if self.uncertainty is not None:
            c = self.config.out_channels
            maps = ("variance",) if c == 1 else tuple(f"variance_{k}" for k in range(c))
            self.traits = replace(self.traits, maps=maps)

    def with_maps(self, batch: np.ndarray, context: BatchContext) -> tuple[np.ndarray, np.ndarray | None]:
        if self.uncertainty is None:
            mean, var = self.predict(batch), None
        elif self.uncertainty.method == "adf":
            mean, var = self.predict_moments(batch)
        else:
            samples = self.predict_samples(batch)
            mean, var = samples.mean(axis=0), samples.var(axis=0)
        if context.scaling is not None:
            mean = np.stack([context.scaling.invert(block) for block in mean])
            if var is not None:
                var = np.stack([context.scaling.invert_variance(block) for block in var])
        return mean, (None if var is None else var.astype(np.float32))

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        return self.with_maps(batch, context)[0]

    def describe_tile(self, inputs: np.ndarray, outputs: np.ndarray, scaling: Scaling | None) -> dict[str, Any]:
        """Residual (input - output) statistics in normalised units: the hallucination guard.

        Removed noise is independent from pixel to pixel; a residual whose neighbouring pixels
        correlate holds image structure the model took away (or invented): ``flagged``.
        """
        if scaling is not None:
            outputs = scaling.apply(outputs)
        r = (inputs - outputs).astype(np.float64)
        mean = float(r.mean())
        r = r - mean
        var = float((r**2).mean())
        corr = []
        for axis in range(1, r.ndim):
            if r.shape[axis] > 1 and var > 0:
                a = np.take(r, range(r.shape[axis] - 1), axis=axis)
                b = np.take(r, range(1, r.shape[axis]), axis=axis)
                corr.append(float((a * b).mean() / var))
        lag1 = max(corr) if corr else 0.0
        return {"residual_mean": mean, "residual_std": var**0.5, "residual_lag1_correlation": lag1,
                "flagged": lag1 > self.residual_correlation_limit}
