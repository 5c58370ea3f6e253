"""Denoising: self-supervised (N2V2, Noise2Self) and supervised (CARE, Noise2Noise) training,
and the denoising kernel.

Self-supervised training sees only noisy data: a blind-spot mask (``kernels.masking``) hides
pixels from the network and the loss is the squared error on those pixels only, which in
expectation is the error against the clean signal plus the noise variance (Batson & Royer 2019).
Supervised training sees pairs at identical positions: CARE (Weigert et al. 2018) maps a noisy
image to a clean (high-exposure) one; Noise2Noise (Lehtinen et al. 2018) maps one noisy
acquisition to a second, independent one: its squared-error minimiser is still the clean mean,
but its loss never falls below the target's noise variance. Patches come from a caller-supplied
sampler, so this module knows nothing of stores: ``pipeline.steps.train`` feeds it patches drawn
from random chunks of an OME-Zarr image (pairs: input channels, then target channels).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Literal

import numpy as np

from kernels import posterior
from kernels.contract import BatchContext, Scaling
from kernels.errors import ModelFileError
from kernels.masking import augment, grid_mask, n2v_mask
from kernels.modelfile import UNetModelKernel
from kernels.training import TrainResult, train_ensemble
from kernels.unet import ReceptiveField, UNetConfig, receptive_field

log = logging.getLogger(__name__)

Method = Literal["n2v2", "n2s", "care", "n2n"]
SELF_SUPERVISED = ("n2v2", "n2s")
SUPERVISED = ("care", "n2n")  # trained on (input, target) pairs
Loss = Literal["mse", "mae"]
PosteriorMode = Literal["auto"] | posterior.Choice  # ``auto``: what training chose (``kernels.posterior.choose``)
PatchSampler = Callable[[int, np.random.Generator], np.ndarray]  # (n, rng) -> (n, C, *patch) float32


def architecture(method: Method, ndim: int, channels: int = 1, depth: int = 2, width: int = 32,
                 pool: tuple[int, ...] = (), dropout: float = 0.0) -> UNetConfig:
    """N2V2: max-blur-pool, no top skip, no residual. Noise2Self, CARE and
    Noise2Noise: a plain U-Net. CSBDeep's CARE adds a residual connection (the network learns the
    correction); here, at sigma 0.2 on smooth blobs after 300 steps, that cost CARE 0.6 dB and
    N2N 1.0 dB (26.9 vs 27.5, 26.2 vs 27.2), so the plain U-Net is the default.

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
    if method in SUPERVISED:
        return UNetConfig(ndim=ndim, in_channels=channels, out_channels=channels, depth=depth, width=width,
                          norm="none", pool=pool, dropout=dropout)
    raise ValueError(f"unknown denoising method '{method}' (n2v2, n2s, care or n2n)")


@dataclass(frozen=True)
class TrainConfig:
    """Defaults chosen on scikit-image's astronaut (grey, Gaussian sigma 25), one 2D image trained
    on 2 CPU cores: 2000 steps at a constant rate (halved on plateaus), width 32: 28.4 dB; 4000
    steps annealed by a cosine to 1 %, width 16 (a third of the compute per step): 29.4 dB (29.8
    with test-time augmentation), as measured while choosing them; the benchmark
    (``benchmarks/results/restore.json``, through the engine, before the posterior step)
    measured 28.89 (29.14) with the same defaults, and the difference was not traced. coins
    and moon were not used to choose them."""

    method: Method = "n2v2"
    patch: tuple[int, ...] = (64, 64)
    batch: int = 16
    steps: int = 4000
    lr: float = 1e-3
    schedule: str = "cosine"  # ``kernels.training.fit``: cosine or plateau
    # N2V: share of pixels masked per patch. The papers' 0.2 % suits 10^5 GPU steps; 10 % gives
    # each step 50x the loss signal for the same compute. At 600 steps: light-sheet 3D 36.4 dB
    # at 2 %, 38.9 at 5 %, 39.2 at 10 % (measured with z still pooled, see ``pipeline.steps.train``); DSB 2D flat from 5 to 10 % (29.6, 29.5). The median
    # replacement draws on 24 (2D) or 124 (3D) neighbours, so another masked pixel among them
    # leaks next to nothing of its value.
    mask_fraction: float = 0.1
    n2s_grid: int = 4  # Noise2Self: lattice period
    # CARE / Noise2Noise: squared error (N2N needs it: the mean of noisy targets is the clean
    # image; an absolute error would give their median) or absolute error (CARE, sharper edges)
    loss: Loss = "mse"
    val_patches: int = 64
    val_every: int = 100
    patience: int = 6  # validations without improvement before stopping
    seed: int = 0
    depth: int = 2
    width: int = 16
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


def pair_loss(pred, target, loss: Loss):
    """CARE / Noise2Noise: the error of the whole output against the target."""
    return ((pred - target) ** 2).mean() if loss == "mse" else (pred - target).abs().mean()


def split_pairs(batch: np.ndarray, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """A supervised patch batch ``(N, 2C, ...)`` as (inputs, targets); they were cropped and
    augmented together, so a pair always shows the same place the same way up."""
    return batch[:, :channels], batch[:, channels:]


def train_denoiser(sample: PatchSampler, validation: np.ndarray, cfg: TrainConfig, *, channels: int = 1,
                   device: str | None = None, progress: bool = True, checkpoint: str | None = None) -> TrainResult:
    """Train a denoiser on patches from ``sample``; returns the best weights by the loss on
    ``validation`` patches (held-out data; blind-spot methods: masked once with a fixed seed).
    CARE and Noise2Noise patches hold ``2 * channels`` channels: the inputs, then the targets.

    ``cfg.uncertainty``: ``mc-dropout`` trains one network with channel dropout in every block,
    ``ensemble`` trains ``members`` networks with seeds ``seed + k``. ``checkpoint``: a file
    training resumes from (``kernels.training.fit``; member ``k`` of an ensemble: ``<file>.<k>``).
    """
    from kernels.uncertainty import UncertaintyConfig

    u = UncertaintyConfig.model_validate(cfg.uncertainty) if cfg.uncertainty else None
    if u is not None and u.method == "adf":
        raise ValueError("ADF is trained for segmentation; a denoiser's uncertainty is mc-dropout or ensemble")
    if u is not None and u.method == "ensemble":
        return train_ensemble(lambda k: _train_one(sample, validation, replace(cfg, seed=cfg.seed + k), 0.0,
                                                   channels=channels, device=device, progress=progress,
                                                   desc=f"train {cfg.method} (member {k + 1}/{u.members})",
                                                   checkpoint=f"{checkpoint}.{k}" if checkpoint else None),
                              u.members)
    dropout = u.dropout if u is not None else 0.0
    return _train_one(sample, validation, cfg, dropout, channels=channels, device=device, progress=progress,
                      checkpoint=checkpoint)


def _train_one(sample: PatchSampler, validation: np.ndarray, cfg: TrainConfig, dropout: float, *, channels: int,
               device: str | None, progress: bool, desc: str = "", checkpoint: str | None = None) -> TrainResult:
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
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
    if cfg.method in SUPERVISED:
        val_in_t, val_t = (to(a) for a in split_pairs(val, channels))

        def train_loss(step: int):
            inputs, targets = split_pairs(augment(sample(cfg.batch, rng), rng), channels)
            return pair_loss(net(to(inputs)), to(targets), cfg.loss)

        def val_loss():
            return pair_loss(net(val_in_t), val_t, cfg.loss)
    else:
        val_in, val_mask = mask_batch(val, cfg, np.random.default_rng(cfg.seed + 1))
        val_t, val_in_t, val_mask_t = to(val), to(val_in), to(val_mask)

        def train_loss(step: int):
            batch = augment(sample(cfg.batch, rng), rng)
            masked, mask = mask_batch(batch, cfg, rng)
            return masked_mse(net(to(masked)), to(batch), to(mask))

        def val_loss():
            return masked_mse(net(val_in_t), val_t, val_mask_t)

    result = fit(net, train_loss, val_loss, steps=cfg.steps, lr=cfg.lr,
                 val_every=cfg.val_every, patience=cfg.patience, desc=desc or f"train {cfg.method}", progress=progress,
                 schedule=cfg.schedule, checkpoint=checkpoint)
    return TrainResult(result.state_dict, net_cfg, result.best_val_loss, result.history, result.seconds, device)


def fit_posterior(result: TrainResult, patches: np.ndarray, regions: list[np.ndarray], *, method: Method,
                  batch: int = 8) -> dict[str, Any] | None:
    """The posterior step's parameters (``kernels.posterior``: the noise line and the centre
    pixel's leak) for a trained blind-spot denoiser, the leak fitted on noisy ``patches`` of its
    image (normalised, ``(N, C, *patch)``; the line too where there are no regions), the line
    and the choice of stages on larger ``regions`` (``(C, *spatial)`` each, wide enough for the
    stages' reach; more pixels, so a steadier line), once for plain inference and
    once for test-time augmentation (its prediction differs, and so does its leak), on the
    device it trained on. None for supervised methods (their network already sees the pixel).
    One network only: the caller leaves out uncertainty models, whose output is a mean over
    networks."""
    import torch

    from kernels.unet import UNet

    if method not in SELF_SUPERVISED or not len(patches):
        return None
    net = UNet(result.config)
    net.load_state_dict(result.state_dict)
    net = net.to(result.device).eval()
    val = np.asarray(patches, np.float32)
    out: dict[str, Any] = {"method": posterior.METHOD, "sigma_2d": posterior.SIGMA_2D}
    for mode, tta in (("plain", False), ("tta", True)):
        def predict(inputs: np.ndarray, tta: bool = tta) -> np.ndarray:
            with torch.inference_mode():
                return np.concatenate([net.forward_padded(torch.from_numpy(inputs[i:i + batch]).to(result.device),
                                                          tta=tta).float().cpu().numpy()
                                       for i in range(0, len(inputs), batch)])

        mu, divergence = posterior.divergence_probe(predict, val)
        fits = [posterior.fit_channel(val[:, c], mu[:, c], divergence[:, c]) for c in range(val.shape[1])]
        predicted = posterior.predict_regions(predict, regions)
        if predicted:  # the noise line read off the regions: more pixels than the patches
            for c, fit in enumerate(fits):
                fit["noise"] = posterior.fit_noise_line([p.y[c] for p in predicted], [p.mu[c] for p in predicted])
        out[mode] = {key: [f[key] for f in fits] for key in fits[0]}
        out[mode].update(posterior.choose(predicted, out[mode], sigma_2d=posterior.SIGMA_2D))
    return out


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

    class Params(UNetModelKernel.Params):
        # test-time augmentation: the mean over the 8 flips / rotations of the last two axes (8x the cost)
        tta: bool = False
        # blind-spot models: the posterior step (``kernels.posterior``) when the card has its parameters:
        # ``auto`` does what training chose for the image, ``off`` returns the network's output
        posterior: PosteriorMode = "auto"

    def __init__(self, params: Params):
        super().__init__(params)
        self.tta = params.tta
        tables = self.card.posterior if params.posterior != "off" and self.uncertainty is None else None
        if tables and tables.get("method") != posterior.METHOD:
            raise ModelFileError(f"The model card's posterior step '{tables.get('method')}' is not the one this "
                                 f"tilewise applies ('{posterior.METHOD}'): re-train the model, or denoise with "
                                 "--posterior off (posterior: off in a workflow).")
        self.posterior_table = tables["tta" if self.tta else "plain"] if tables else None
        self.posterior_sigma = float(tables["sigma_2d"]) if tables else posterior.SIGMA_2D
        self.posterior_choice = params.posterior
        if self.posterior_table is not None:  # the step reads a window of the residual around each pixel
            rf = receptive_field(self.config)
            extra = max(posterior.radius(self.config.ndim, self.posterior_sigma, choice=how)
                        for how in posterior.choices(self.posterior_table, self.posterior_choice))
            grown = ReceptiveField(tuple(n + extra for n in rf.low), tuple(n + extra for n in rf.high), rf.factor)
            self.traits = replace(self.traits, halo=grown.halo)
        if self.uncertainty is not None:
            c = self.config.out_channels
            maps = ("variance",) if c == 1 else tuple(f"variance_{k}" for k in range(c))
            self.traits = replace(self.traits, maps=maps)

    def with_maps(self, batch: np.ndarray, context: BatchContext) -> tuple[np.ndarray, np.ndarray | None]:
        if self.uncertainty is None:
            mean = (self.predict(batch) if self.posterior_table is None
                    else self.predict_with_posterior(batch, context.origins))
            var = None
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

    def posterior_on_device(self) -> bool:
        """Whether the posterior step runs in torch beside the network: on a GPU, where scipy's
        filters on one CPU core would set the pace; on the CPU scipy was the faster when the
        torch path was added (the first stage on a 3D tile of 136 x 328 x 328: 2.9 s against
        torch's 10 s; the block stages were not timed in torch on a CPU)."""
        return not str(self.device).startswith("cpu")

    def predict_with_posterior(self, batch: np.ndarray, origins) -> np.ndarray:
        """The prediction with the noisy pixel blended back in (``kernels.posterior``); ``origins``:
        each block's global first pixel (the step's block grid is anchored there)."""
        if not self.posterior_on_device():
            return np.stack([posterior.apply(block, pred, self.posterior_table, sigma_2d=self.posterior_sigma,
                                             choice=self.posterior_choice, origin=origin)
                             for block, pred, origin in zip(batch, self.predict(batch), origins)])
        import torch

        from kernels import posterior_device

        x = self._tensor(batch)
        mu = self.predict_on_device(x)
        with torch.inference_mode():
            return torch.stack([posterior_device.apply(block, pred, self.posterior_table, sigma_2d=self.posterior_sigma,
                                                       choice=self.posterior_choice, origin=origin)
                                for block, pred, origin in zip(x, mu, origins)]).cpu().numpy()

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
