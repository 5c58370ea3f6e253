"""Training from a store: patches drawn from random blocks, bounded memory, whole-volume coverage.

Kernels train on numpy patches and know nothing of stores; this module is the seam. A
``PatchPool`` holds a few blocks (twice the patch size) read from random places of the image and
swaps one for a fresh random block every few steps, so memory is a few blocks whatever the
volume size while training sees the whole volume over time. A fixed share of the blocks is held
out for validation. Inputs are normalised with the same global percentiles the engine uses at
inference, and the model card records them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from kernels.instances import three_class
from kernels.modelfile import INFERENCE_NORMALISATION, ModelCard, save_model
from kernels.training import TrainResult
from kernels.uncertainty import METHODS
from pipeline.core.errors import InputError, OptionError, OutputExistsError
from pipeline.core.regions import Region, grid_shape, region_of
from pipeline.io.read import ImageSource, open_image
from pipeline.io.store import check_output_location
from pipeline.engine.runner import image_layout
from pipeline.engine.stats import Normalisation

log = logging.getLogger(__name__)


class PatchPool:
    """Random training patches ``(n, C, *patch)`` from an image, a few blocks in memory at a time.

    With ``target`` (CARE, Noise2Noise) each block also holds the target's channels at the same
    place, normalised with the *input's* percentiles: the network learns the input-to-target
    map in one set of units, so its output mapped back with the input's scaling is in the
    target's units (a high-exposure target stays brighter), and an N2N pair shares one scale.
    """

    def __init__(self, source: ImageSource, patch: Sequence[int], norm: Normalisation, *, level: int = 0,
                 pool_blocks: int = 16, refresh_every: int = 4, validation_share: float = 0.1, seed: int = 0,
                 labels: ImageSource | None = None, target: ImageSource | None = None):
        batch, self.has_c, spatial = image_layout(source)  # time points are drawn from like blocks
        self.source, self.level, self.norm, self.labels, self.target = source, level, norm, labels, target
        if target is not None:
            check_same_grid(source, target, level)
        self.batch_shape = tuple(source.level(level).shape[i] for i in batch)
        expected = self.batch_shape + tuple(source.level(level).shape[i] for i in spatial)
        if labels is not None and labels.level(level).shape != expected:
            raise InputError(f"labels '{labels.url}' level {level} has shape {labels.level(level).shape}; the image's "
                             f"shape without channels is {expected}.")
        shape = [source.level(level).shape[i] for i in spatial]
        if len(patch) != len(shape):
            raise OptionError(f"--patch needs {len(shape)} sizes (one per spatial axis {source.spatial_dims}), got {tuple(patch)}.")
        if any(p > n for p, n in zip(patch, shape)):
            raise OptionError(f"Patch {tuple(patch)} is larger than the image {tuple(shape)}; choose a smaller --patch.")
        self.patch = tuple(int(p) for p in patch)
        self.shape = tuple(shape)
        self.block = tuple(min(n, 2 * p) for n, p in zip(shape, self.patch))
        # a block id names a spatial block at one index of the batch axes (a time point)
        n_blocks = int(np.prod(grid_shape(self.shape, self.block))) * int(np.prod(self.batch_shape, dtype=np.int64))
        order = np.random.default_rng(seed).permutation(n_blocks)
        n_val = int(round(validation_share * n_blocks)) if n_blocks >= 5 else 0
        self.validation_ids, self.training_ids = order[:n_val], order[n_val:]
        if n_val == 0:
            self.validation_ids = order[:1]  # too small to hold out a block: validate on a fixed draw
        self.rng = np.random.default_rng(seed + 7)
        self.pool = [self._read(int(i)) for i in self.rng.choice(self.training_ids, min(pool_blocks, len(self.training_ids)),
                                                                  replace=False)]
        self.refresh_every, self.calls = refresh_every, 0

    def _locate(self, block_id: int) -> tuple[tuple[slice, ...], Region]:
        """(batch-axis slices, spatial region) of a block id."""
        n_spatial = int(np.prod(grid_shape(self.shape, self.block)))
        b, spatial_id = divmod(int(block_id), n_spatial)
        at = np.unravel_index(b, self.batch_shape) if self.batch_shape else ()
        return tuple(slice(int(i), int(i) + 1) for i in at), self._region(spatial_id)

    def _region(self, block_id: int) -> Region:
        index = np.unravel_index(block_id, grid_shape(self.shape, self.block))
        region = region_of(tuple(int(i) for i in index), self.shape, self.block)
        # blocks at the far edge are shorter: move them back so a patch always fits
        return tuple(slice(max(0, min(sl.start, n - p)), max(sl.stop, min(n, sl.start + p)))
                     for sl, n, p in zip(region, self.shape, self.patch))

    def _read_image(self, at: tuple[slice, ...], region: Region, source: ImageSource | None = None) -> np.ndarray:
        """``(C, *region)`` of ``source`` (the input by default) at the batch-axis slices ``at``
        (one time point), normalised with the input's percentiles."""
        lead = (slice(None),) if self.has_c else ()
        data = (source or self.source).read(at + lead + region, self.level)
        data = data.reshape(data.shape[len(at):])
        return self.norm.apply(data if self.has_c else data[None])

    def _read(self, block_id: int) -> np.ndarray:
        """``(C, *block)`` normalised image; with labels, their 3-class map follows as one more
        channel; with a target image, its C channels follow (normalised like the input)."""
        at, region = self._locate(block_id)
        image = self._read_image(at, region)
        if self.target is not None:
            return np.concatenate([image, self._read_image(at, region, self.target)])
        if self.labels is None:
            return image
        truth = self.labels.read(at + region, self.level)
        classes = three_class(truth.reshape(truth.shape[len(at):]))
        return np.concatenate([image, classes[None].astype(np.float32)])

    @staticmethod
    def _crop(blocks: list[np.ndarray], patch: Sequence[int], n: int, rng: np.random.Generator) -> np.ndarray:
        out = []
        for _ in range(n):
            block = blocks[int(rng.integers(len(blocks)))]
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(block.shape[1:], patch)]
            out.append(block[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, patch))])
        return np.stack(out).astype(np.float32)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Training patches; every ``refresh_every`` calls one pooled block is swapped for a new one."""
        self.calls += 1
        if self.calls % self.refresh_every == 0 and len(self.training_ids) > len(self.pool):
            self.pool[int(rng.integers(len(self.pool)))] = self._read(int(rng.choice(self.training_ids)))
        return self._crop(self.pool, self.patch, n, rng)

    def regions(self, edge: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """``n`` normalised ``(C, *spatial)`` crops ``edge`` wide on every axis (the image's
        length on shorter ones), at random places and time points of the whole image."""
        out = []
        for _ in range(n):
            at = np.unravel_index(int(rng.integers(int(np.prod(self.batch_shape, dtype=np.int64)))), self.batch_shape) \
                if self.batch_shape else ()
            region = tuple(slice(a, a + min(edge, size)) for a, size in
                           ((int(rng.integers(0, size - min(edge, size) + 1)), size) for size in self.shape))
            out.append(self._read_image(tuple(slice(int(i), int(i) + 1) for i in at), region).astype(np.float32))
        return out

    def validation(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Patches from the held-out blocks only (read once, then dropped)."""
        blocks = [self._read(int(i)) for i in self.validation_ids[:8]]
        return self._crop(blocks, self.patch, n, rng)


def check_same_grid(source: ImageSource, target: ImageSource, level: int) -> None:
    """A training pair must be two images of the same place: same axes, shape and pixel size."""
    a, b = source.level(level), target.level(level) if level < len(target.levels) else None
    if b is None or tuple(source.dims) != tuple(target.dims) or a.shape != b.shape:
        raise InputError(f"--target '{target.url}' has axes {tuple(target.dims)} and shape "
                         f"{b.shape if b else 'no level ' + str(level)}; the input has {tuple(source.dims)} and "
                         f"{a.shape}: a training pair must be the same field of view on the same grid.")
    if not np.allclose(a.scale, b.scale, rtol=1e-3):
        raise InputError(f"--target '{target.url}' has pixel size {tuple(b.scale)}; the input has {tuple(a.scale)}: "
                         "resample one of them so the pair lies on the same grid.")


def _pool_axes(patch: Sequence[int], scale: Sequence[float], depth: int) -> tuple[int, ...]:
    """Pool an axis only when the patch is deep enough on it and its pixels are not much
    coarser than the finest axis (an anisotropic z is kept at full resolution)."""
    finest = min(scale)
    return tuple(2 if p >= 2 * 2**depth and s < 2 * finest else 1 for p, s in zip(patch, scale))


def _check_patch(patch: Sequence[int], pool: Sequence[int], depth: int) -> None:
    if any(p % (f**depth) for p, f in zip(patch, pool)):
        raise OptionError(f"--patch {tuple(patch)} must be a multiple of {2**depth} on each pooled axis for a "
                          f"depth-{depth} U-Net.")


def data_fingerprint(source: ImageSource, level: int, norm: Normalisation) -> dict:
    """What the model was trained on: enough to recognise the data again, never the data."""
    lv = source.level(level)
    desc = {"url": source.url, "level": level, "shape": list(lv.shape), "dtype": lv.dtype,
            "axes": list(source.dims), "scale": list(lv.scale), "normalisation": norm.to_dict()}
    desc["sha256"] = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()
    return desc


CHECKPOINT = "checkpoint.pt"  # beside the card while training; removed once the model is saved
# voxels the posterior step's noise line and leak are fitted on (64 patches of 64^2 in 2D); in 3D
# the 18 passes over them cost about a minute on 2 CPU cores
POSTERIOR_VOXELS = 2**18
POSTERIOR_REGION_VOXELS = 2**18


def checkpoint_of(model_dir: str, resume: bool) -> str | None:
    """The training checkpoint a run resumes from (``resume``), else None (a fresh start)."""
    if not resume:
        return None
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(model_dir) / CHECKPOINT)


def remove_checkpoints(model_dir: str) -> None:
    for path in Path(model_dir).glob(CHECKPOINT + "*"):
        path.unlink()


def prepare_model_folder(model_dir: str, overwrite: bool, resume: bool = False) -> None:
    path = Path(model_dir)
    if resume and path.is_dir() and all(p.name.startswith(CHECKPOINT) for p in path.iterdir()):
        return  # an interrupted training's folder: only its checkpoints
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"Model folder '{model_dir}' exists; pass --overwrite to replace it, or choose another path.")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"'{model_dir}' is a file; a model is a folder. Choose another path.")


@dataclass(frozen=True)
class TrainingData:
    """What both trainers set up the same way: the image, its global normalisation, the patch
    pool (and held-out validation patches), and which axes the U-Net pools."""

    source: ImageSource
    level: int
    norm: Normalisation
    pool: PatchPool
    pool_axes: tuple[int, ...]
    validation: np.ndarray

    @classmethod
    def prepare(cls, image_url: str, model_dir: str, *, task: str, patch: Sequence[int] | None, level: int,
                depth: int, seed: int, overwrite: bool, storage_options: dict | None, labels: str | None = None,
                labels_from: str | None = None, target: str | None = None, val_patches: int,
                shared_output: bool = False, resume: bool = False) -> "TrainingData":
        if not shared_output:  # a workflow's model folder lies inside its output, which holds the image
            check_output_location(model_dir, image_url, storage_options)
        prepare_model_folder(model_dir, overwrite, resume)
        source = open_image(image_url, storage_options)
        _, _, spatial = image_layout(source)
        if len(spatial) not in (2, 3):
            raise InputError(f"'{image_url}' has {len(spatial)} spatial axes; {task} needs 2D or 3D images.")
        scale = [source.level(level).scale[i] for i in spatial]
        if patch is None:
            patch = DEFAULT_PATCH[task](scale)
        norm = Normalisation.of(source)
        pool = PatchPool(source, patch, norm, level=level, seed=seed,
                         labels=labels_source(source, labels, labels_from, storage_options),
                         target=open_image(target, storage_options) if target is not None else None)
        pool_axes = _pool_axes(pool.patch, scale, depth)  # coarse (anisotropic z) or thin axes are not pooled
        _check_patch(pool.patch, pool_axes, depth)
        validation = pool.validation(val_patches, np.random.default_rng(seed + 1))
        return cls(source, level, norm, pool, pool_axes, validation)

    def save(self, model_dir: str, result: TrainResult, *, task: str, method: str, training: dict,
             uncertainty: dict | None = None, posterior: dict | None = None) -> ModelCard:
        """The model folder: weights and a card saying how inputs are normalised at inference."""
        card = ModelCard(task=task, method=method, architecture=result.config.to_dict(), uncertainty=uncertainty,
                         posterior=posterior,
                         normalisation={**self.norm.to_dict(), "at_inference": INFERENCE_NORMALISATION},
                         training={**training, "seconds": result.seconds, "device": result.device,
                                   "history": result.history},
                         data=data_fingerprint(self.source, self.level, self.norm),
                         validation_loss=result.best_val_loss)
        card = save_model(model_dir, result.state_dict, card)
        remove_checkpoints(model_dir)
        before = result.history[0]["val_loss"] if result.history else None
        if before is not None and not result.best_val_loss < before:
            log.warning("%s: the validation loss never improved on the untrained network's (%.5f); the model learned "
                        "nothing it can show on held-out patches: train longer (steps), check the data (labels, "
                        "noise), or lower the learning rate", method, before)
        log.info("trained %s in %.0f s (validation loss %.5f) -> %s [%s]", method, result.seconds,
                 result.best_val_loss, model_dir, card.weights_sha256[:12])
        return card


def labels_source(source: ImageSource, labels: str | None, labels_from: str | None,
                  storage_options: dict | None) -> ImageSource | None:
    """``labels/<labels>`` of the image, or of ``labels_from`` (another image on the same grid,
    e.g. the annotated raw volume of a denoised one)."""
    if labels is None:
        return None
    return (open_image(labels_from, storage_options) if labels_from else source).label(labels)


# Default patch per task, from the physical pixel size per spatial axis: 2D, isotropic 3D, or
# anisotropic 3D (z at least twice as coarse, so fewer z planes).
DEFAULT_PATCH = {
    "denoising": lambda scale: (64, 64) if len(scale) == 2 else (16, 64, 64),
    "segmentation": lambda scale: (128, 128) if len(scale) == 2 else
    ((16, 64, 64) if scale[0] >= 2 * min(scale) else (32, 64, 64)),
}


def uncertainty_config(method: str | None, *, samples: int | None = None, members: int | None = None,
                       dropout: float | None = None, seed: int = 0, allowed: Sequence[str] = METHODS) -> dict | None:
    """The card's ``uncertainty`` entry from the command line's options (None: deterministic)."""
    from kernels.uncertainty import UncertaintyConfig

    if method is None or method == "none":
        if samples is not None or members is not None or dropout is not None:
            raise OptionError("--samples, --members and --dropout need --uncertainty (adf, mc-dropout or ensemble).")
        return None
    if method not in allowed:
        raise OptionError(f"Unknown uncertainty method '{method}'; choose {', '.join(allowed)}.")
    settings = {"samples": samples, "members": members, "dropout": dropout}
    wrong = {"samples": "mc-dropout", "members": "ensemble", "dropout": "mc-dropout"}
    for key, value in settings.items():
        if value is not None and wrong[key] != method:
            raise OptionError(f"--{key} applies to --uncertainty {wrong[key]}, not {method}.")
    try:
        config = UncertaintyConfig(method=method, seed=seed, **{k: v for k, v in settings.items() if v is not None})
    except ValueError as exc:
        raise OptionError(f"Uncertainty options: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}.") from None
    return config.model_dump()


def train_denoise(image_url: str, model_dir: str, *, method: str = "n2v2", target: str | None = None,
                  loss: str = "mse", mask_fraction: float | None = None, patch: Sequence[int] | None = None,
                  steps: int = 4000, batch: int = 16, level: int = 0, depth: int = 2, width: int = 16, seed: int = 0,
                  uncertainty: str | None = None, samples: int | None = None, members: int | None = None,
                  overwrite: bool = False, progress: bool = True, device: str | None = None,
                  storage_options: dict | None = None, resume: bool = False) -> ModelCard:
    """Train a denoiser and write a model folder (``resume``: continue an interrupted training
    from the checkpoint it left in the folder, saved at every validation).

    ``method``: ``n2v2`` or ``n2s`` (self-supervised: the noisy image alone), ``care`` (``target``
    is a clean or high-exposure image of the same field) or ``n2n`` (``target`` is a second,
    independent noisy acquisition); pairs are cropped at identical positions. ``loss``: ``mse``
    or ``mae`` for ``care`` (``n2n`` needs ``mse``). ``mask_fraction``: N2V pixels masked per
    patch (default ``TrainConfig.mask_fraction``); ``uncertainty``: ``mc-dropout`` (``samples``
    passes at inference) or ``ensemble`` (``members`` networks): the denoised image is then the
    mean, and a per-pixel variance map is written beside it. Returns the model card as written.
    """
    from kernels.denoise import SELF_SUPERVISED, SUPERVISED, TrainConfig, fit_posterior, train_denoiser

    u = uncertainty_config(uncertainty, samples=samples, members=members, seed=seed,
                           allowed=("mc-dropout", "ensemble"))
    if method not in SELF_SUPERVISED + SUPERVISED:
        raise OptionError(f"Unknown denoising method '{method}'; choose n2v2, n2s, care or n2n.")
    if method in SUPERVISED and target is None:
        raise OptionError(f"--method {method} trains on pairs: pass --target, the "
                          f"{'clean (high-exposure)' if method == 'care' else 'second noisy'} image of the same field.")
    if method in SELF_SUPERVISED and target is not None:
        raise OptionError(f"--target applies to --method care or n2n; {method} trains on the noisy image alone.")
    if loss not in ("mse", "mae") or (method == "n2n" and loss != "mse"):
        raise OptionError(f"--loss {loss} is not available for {method}: n2n needs mse (the mean of noisy targets is "
                          "the clean image); care takes mse or mae.")
    if mask_fraction is not None and not 0 < mask_fraction <= 0.25:
        raise OptionError(f"--mask-fraction must be in (0, 0.25], got {mask_fraction} "
                          "(the N2V papers use 0.002; tilewise defaults to 0.1).")
    data = TrainingData.prepare(image_url, model_dir, task="denoising", patch=patch, level=level, depth=depth,
                                seed=seed, overwrite=overwrite, storage_options=storage_options, target=target,
                                val_patches=TrainConfig.val_patches, resume=resume)
    extra = {} if mask_fraction is None else {"mask_fraction": float(mask_fraction)}
    cfg = TrainConfig(method=method, patch=data.pool.patch, batch=batch, steps=steps, seed=seed, depth=depth,
                      width=width, pool=data.pool_axes, uncertainty=u, loss=loss, **extra)
    channels = data.source.n_channels
    result = train_denoiser(data.pool.sample, data.validation, cfg, channels=channels, device=device,
                            progress=progress, checkpoint=checkpoint_of(model_dir, resume))
    training = cfg.to_dict()
    if method in SUPERVISED:
        training.update(target=target, **pair_loss_floor(data.validation[:, channels:], method, loss,
                                                         result.best_val_loss))
    blend = fit_posterior(result, posterior_patches(data, seed), posterior_regions(data, seed), method=method) \
        if u is None and method in SELF_SUPERVISED else None
    if blend is not None:
        log.info("posterior step (the noisy pixel put back where the residual holds more than noise): "
                 "noise variance %s (normalised), centre-pixel leak %s; chosen by estimated risk: %s (plain), %s (TTA)",
                 [f"max({f:.3g}, {o:.3g} + {s:.3g} mu)" for o, s, f in blend["tta"]["noise"]],
                 [f"{min(leak):.3f}-{max(leak):.3f}" for leak in blend["tta"]["leak"]],
                 blend["plain"]["choice"], blend["tta"]["choice"])
    return data.save(model_dir, result, task="denoise", method=method, training=training, uncertainty=u,
                     posterior=blend)


def posterior_patches(data: TrainingData, seed: int, max_voxels: int = POSTERIOR_VOXELS) -> np.ndarray:
    """Patches the posterior step's leak is fitted on (and its noise line where there are no
    :func:`posterior_regions`: 3D): held-out and training patches mixed, because the held-out
    blocks alone can be all background (camera's were: the step's first version, one weight
    per structure bin, came out below 0.02 everywhere on them after 300 steps, up to 0.47 on
    patches from the whole image), and a noise line read off background alone misses the
    brighter levels; at most ``max_voxels`` in all, since the fit runs the network 18 times
    over them."""
    rng = np.random.default_rng(seed)
    patches = np.concatenate([data.validation, data.pool.sample(2 * len(data.validation), rng)])
    keep = max(1, min(len(patches), max_voxels // int(np.prod(patches.shape[2:]))))
    return patches[np.sort(rng.choice(len(patches), keep, replace=False))]


def posterior_regions(data: TrainingData, seed: int, edge_voxels: int = POSTERIOR_REGION_VOXELS,
                      max_voxels: int = POSTERIOR_VOXELS * 4) -> list[np.ndarray]:
    """Crops the posterior step's noise line is read off and its stages are chosen on
    (``kernels.posterior.choose``): wider than the training patches, since the stages read up
    to 39 pixels around each one in 2D (``edge_voxels`` each: 512 x 512 in 2D, the image's
    length on shorter axes), as many as ``max_voxels`` allows, at most 4, fewer when the image
    holds fewer; none where the choice is not estimated (3D)."""
    from kernels.posterior import CHOOSE_NDIM

    if len(data.pool.shape) not in CHOOSE_NDIM:
        return []
    edge = int(round(edge_voxels ** (1.0 / len(data.pool.shape))))
    one = int(np.prod([min(edge, n) for n in data.pool.shape]))
    image = int(np.prod(data.pool.shape)) * int(np.prod(data.pool.batch_shape, dtype=np.int64))
    n = max(1, min(4, max_voxels // one, image // one))
    return data.pool.regions(edge, n, np.random.default_rng(seed + 11))


def pair_loss_floor(targets: np.ndarray, method: str, loss: str, val_loss: float) -> dict:
    """What the validation loss of a supervised denoiser can fall to: the targets' own noise
    variance (normalised units, estimated from the held-out target patches). Noise2Noise
    learns from noisy targets, so its loss stays above this floor however well it denoises;
    a user reading its curve is told so."""
    from kernels.noise import noise_variance

    floor = float(np.median([noise_variance(p).mean() for p in targets])) if len(targets) else float("nan")
    if method == "n2n":
        log.warning("n2n: the loss cannot fall below the noise variance of the targets (about %.5f, normalised): it "
                    "learns from noisy targets. Its best validation loss %.5f is %.2fx that floor; judge it by the "
                    "gap, not by the value.", floor, val_loss, val_loss / floor if floor > 0 else float("inf"))
    return {"target_noise_variance": floor, "loss_floor": floor if loss == "mse" else None}


def train_segment(image_url: str, model_dir: str, *, labels: str = "nuclei", labels_from: str | None = None,
                  patch: Sequence[int] | None = None,
                  steps: int = 2000, batch: int = 8, level: int = 0, depth: int = 3, width: int = 32, seed: int = 0,
                  uncertainty: str | None = None, samples: int | None = None, members: int | None = None,
                  overwrite: bool = False, progress: bool = True, device: str | None = None,
                  storage_options: dict | None = None, shared_output: bool = False, resume: bool = False
                  ) -> ModelCard:
    """Train the 3-class segmentation U-Net on an image and its ``labels/<labels>`` (or those of
    ``labels_from``, an image on the same grid: a workflow trains on its denoised image with the
    raw input's annotations; ``shared_output``: the model folder lies in the image's store;
    ``resume``: continue from the folder's checkpoint, as :func:`train_denoise`).

    Patches (image + classes) come from random blocks, 10 % of them held out for validation and
    early stopping. ``uncertainty``: ``adf`` (one network, moment propagation, Dirichlet loss),
    ``mc-dropout`` (``samples`` passes at inference) or ``ensemble`` (``members`` networks);
    segmenting with such a model writes uncertainty maps. Returns the model card as written.
    """
    from kernels.segment_train import SegmentTrainConfig, train_segmenter

    u = uncertainty_config(uncertainty, samples=samples, members=members, seed=seed)

    data = TrainingData.prepare(image_url, model_dir, task="segmentation", patch=patch, level=level, depth=depth,
                                seed=seed, overwrite=overwrite, storage_options=storage_options, labels=labels,
                                labels_from=labels_from, val_patches=SegmentTrainConfig.val_patches,
                                shared_output=shared_output, resume=resume)
    cfg = SegmentTrainConfig(patch=data.pool.patch, batch=batch, steps=steps, seed=seed, depth=depth, width=width,
                             pool=data.pool_axes, uncertainty=u)
    result = train_segmenter(data.pool.sample, data.validation, cfg, channels=data.source.n_channels,
                             device=device, progress=progress, checkpoint=checkpoint_of(model_dir, resume))
    return data.save(model_dir, result, task="segment", method="unet3class",
                     training={**cfg.to_dict(), "labels": labels,
                               "object_scale": training_object_scale(data.source, data.pool.labels, level)}, uncertainty=u)


def training_object_scale(source: ImageSource, lab: ImageSource, level: int, max_voxels: int = 2**22) -> dict:
    """The objects a segmenter trained on: diameters measured on the training labels (the
    finest labels level within ``max_voxels``) and estimated from the training image the way
    inference estimates a new image, so the two can be compared like with like."""
    from kernels.objectscale import estimate_error, scale_of_labels
    from pipeline.engine.stats import estimate_object_scale

    k = next((i for i in range(level, len(lab.levels)) if np.prod(lab.levels[i].shape) <= max_voxels),
             len(lab.levels) - 1)
    measured = scale_of_labels(lab.read(tuple(slice(None) for _ in lab.dims), k), lab.spatial_scale(k))
    estimated = estimate_object_scale(source, level=level)
    pixel = min(source.spatial_scale(level))  # the network's pixel, physical
    off = estimate_error(measured and measured.diameter, estimated and estimated.diameter)
    if off is not None:
        # inference then compares an image's estimate with the labels' measure instead of this
        # estimate (``pipeline.steps.segment.model_zoom``): on a crowded, noisy 3D sample the
        # estimate was 39 % above the labels, and the zoom came out 2.6 where 2.0 was right
        log.warning("the objects of '%s' are estimated at %.3g across but its labels measure %.3g (%+.0f %%): the "
                    "estimate is unreliable on images like this, so other images' estimates will be compared with "
                    "the labels' measure; if they come out resampled wrongly, give segment --diameter there",
                    source.url, estimated.diameter, measured.diameter, 100 * off)
    return {"labels": measured.to_dict() if measured else None,
            "image": {**estimated.to_dict(), "pixel": pixel} if estimated else None}
