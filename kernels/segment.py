"""Instance segmentation kernels: they map an image block to local instance labels.

A labels kernel (``traits.output == "labels"``) returns ``(N, 1, *spatial)`` integer labels
(0 = background, ids local to the block); the segmentation step makes them global
(``pipeline.steps.stitch``). Its ``halo`` must cover the largest object it should see whole,
beyond its receptive field.

- ``segment-classical``: Gaussian smoothing, a global threshold (computed once from the image's
  statistics, never per tile, so tiles agree), distance-transform seeded watershed of the cores
  above it, grown to each object's own edge; distances
  use the physical pixel size, so anisotropic stacks are handled; past the volume edge it sees
  the block mirrored, and labels only inside.
- ``segment-unet``: a 3-class U-Net (background / interior / boundary, see
  ``kernels.instances``) whose interior probability seeds a watershed; with an uncertainty
  method it also returns per-pixel uncertainty maps (``KernelTraits.maps``).
- ``relabel``: takes a labels image and renumbers it per block: the stitching machinery on its
  own (tests, benchmarks, re-stitching labels made elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal, Sequence

import numpy as np
from pydantic import Field

from kernels.brightfield import ObjectSignal
from kernels.contract import BatchContext, Kernel, KernelParams, KernelTraits, per_axis
from kernels.errors import KernelError
from kernels.instances import (BACKGROUND, INTERIOR, distance_seeds, grow_and_trim, instances_from_probabilities,
                               rank_ids, seeded_watershed)
from kernels.modelfile import UNetModelKernel


# Lengths of the classical kernel as fractions of the object diameter, chosen on synthetic
# packed nuclei at 8-32 px, clean and noisy, lightly and strongly textured
# (``pipeline.data.touching``), never on the halves of real images the benchmark reports.
# The seed distance was re-chosen on ``bench_segment --parts classical_tuning`` (those
# synthetic sets plus the unreported halves of DSB-2018 and of the 3D sample, x0.5-x3): mean
# accuracy@0.5 0.686 / 0.685 / 0.703 / 0.697 / 0.682 / 0.665 at 0.2 / 0.25 / 0.3 / 0.35 / 0.4 /
# 0.5; at 0.5 touching nuclei of the crowded 3D half merged (13 objects for 25 at x1). More
# smoothing (0.15-0.3) lost on both real halves.
SIGMA_PER_DIAMETER = 0.1
SEED_DISTANCE_PER_DIAMETER = 0.3
MIN_SIZE_PER_OBJECT = 0.05  # of the volume of a ball one diameter across
HALO_PER_DIAMETER = 2.0  # a pair of touching objects, seen whole by every tile it reaches
# Two levels instead of one (``kernels.instances.grow_and_trim``): the threshold finds the
# objects' cores, which then grow down to GROW_TO of the way from the background to the
# threshold, and each object keeps what is above KEEP_ABOVE of its own peak over the background.
# Chosen on ``bench_segment --parts classical_tuning`` (mean accuracy@0.5 0.706 with one level,
# 0.792 with these; its real halves alone 0.437 -> 0.542). In-process variants on the same sets:
# GROW_TO 0.4 / 0.5 / 0.6 x KEEP_ABOVE 0.2 / 0.3 / 0.4 all scored 0.766-0.790 (0.5 / 0.3 best);
# growing to the lower level without the trim 0.755, lowering the one threshold alone 0.759;
# splitting each foreground component where a higher level of its own signal parts it into two
# or more pieces of at least 0.1-0.3 of a ball (a component tree, against merged touching
# nuclei, the largest error left on DSB-2018) 0.643-0.748. On the reported halves 3D gained
# (+0.07..+0.10 a factor) and DSB-2018 lost (-0.01..-0.04).
GROW_TO = 0.5
KEEP_ABOVE = 0.3


def grows_from_cores(stain: str) -> bool:
    """Whether objects of this signal get the two levels (the segmentation step then gives the
    kernel a ``background``): a grey or fluorescence signal does, bright or dark; H&E's
    haematoxylin (``stain="hematoxylin"``) keeps one level. The rule was chosen on fluorescence,
    where the optics blur each nucleus into a halo and dim nuclei sit beside bright ones; a
    stained nucleus in focus ends at its edge. On synthetic H&E tuning slides
    (``make_wholeslide`` seeds 3 and 5, 2,048² and 4,096², not the benchmark's) two levels
    lost 0.004 and 0.018 of accuracy@0.5 (0.787 against 0.791; 0.761 against 0.779 at the
    labels' diameter); on the benchmark's slides, measured first, 0.03 (``wholeslide.json``
    ``sections_two_levels`` and ``slide_two_levels`` against ``sections`` and ``slide``)."""
    return stain == "none"


def smoothing(sigma: float | None, diameter: float | None, scale: Sequence[float]) -> float:
    """The kernel's smoothing in physical units: ``sigma`` when given, else a share of the
    object ``diameter`` (:data:`SIGMA_PER_DIAMETER`), else one pixel. The segmentation step reads
    the image's global levels off the signal smoothed by the same amount."""
    if sigma is not None:
        return sigma
    return SIGMA_PER_DIAMETER * diameter if diameter else min(scale)


def ball_voxels(diameter: float, scale: tuple[float, ...]) -> float:
    """Voxels in a disc or ball of ``diameter`` (physical units) at pixel size ``scale``."""
    r = diameter / 2
    volume = math.pi * r * r if len(scale) == 2 else 4 / 3 * math.pi * r**3
    return volume / math.prod(scale)


class ClassicalSegmentKernel(Kernel):
    """Smooth, threshold, distance-transform watershed; no training.

    Its lengths follow the objects: given ``diameter`` (physical units; estimated once per
    image by ``pipeline.steps.segment.classical_spec``), ``sigma``, ``min_distance``,
    ``min_size`` and ``halo`` left unset are derived from it; without a diameter they fall back to
    1 and 4 pixels, 16 voxels and 32 pixels.

    Parameters (pixel sizes in physical units, so 3D anisotropy comes from the NGFF scale)
    ----------
    threshold : foreground threshold in normalised units (the input's global p1..p99.9 map to
        0..1); ``pipeline.steps.segment`` computes it once with Otsu on a coarse level.
    background : the background's level in the same units (the median of the smoothed signal
        below the threshold, computed once with it): objects grow from their cores above the
        threshold towards it and are trimmed by their own peak (:data:`GROW_TO`,
        :data:`KEEP_ABOVE`). Unset: one level, the threshold.
    scale : physical pixel size per spatial axis.
    diameter : typical object diameter, physical units.
    sigma : smoothing in physical units.
    min_distance : closest two seeds (two nuclei centres) may be, physical units.
    min_size : smallest object kept, in voxels.
    halo : per axis in pixels; should exceed the largest object's diameter.
    polarity : ``bright`` (objects brighter than background, fluorescence) or ``dark``
        (brightfield); decided once per image by the segmentation step when asked (``auto``).
    stain : ``none`` or ``hematoxylin`` (H&E: objects are the haematoxylin optical density of
        RGB transmitted light, ``white`` the glass's brightness per channel); see
        :mod:`kernels.brightfield`. The threshold is in the units of this object signal.
    """

    name = "segment-classical"

    class Params(KernelParams):
        threshold: float
        background: float | None = None
        scale: list[float] = Field(min_length=2, max_length=3)
        diameter: float | None = Field(None, gt=0)
        # where the diameter came from (ObjectScale.to_dict()): recorded in the run manifest
        # and shown by ``tilewise info``; the kernel does not use it
        object_scale: dict | None = None
        sigma: float | None = Field(None, ge=0)
        min_distance: float | None = Field(None, gt=0)
        min_size: int | None = Field(None, ge=0)
        halo: list[int] | None = None
        channels: int = Field(1, ge=1)
        polarity: Literal["bright", "dark"] = "bright"
        stain: Literal["none", "hematoxylin"] = "none"
        white: list[float] | None = None

    def __init__(self, params: Params):
        super().__init__(params)
        if params.stain == "hematoxylin" and params.channels != 3:
            raise KernelError(f"stain 'hematoxylin' needs an RGB image (3 channels); this one has {params.channels}.")
        self.signal = ObjectSignal(params.polarity, params.stain, tuple(params.white) if params.white else None)
        self.scale = tuple(params.scale)
        ndim = len(self.scale)
        d, pixel = params.diameter, min(self.scale)
        self.sigma = smoothing(params.sigma, d, self.scale)
        self.min_distance = (params.min_distance if params.min_distance is not None
                             else (SEED_DISTANCE_PER_DIAMETER * d if d else 4 * pixel))
        self.min_size = (params.min_size if params.min_size is not None
                         else (int(MIN_SIZE_PER_OBJECT * ball_voxels(d, self.scale)) if d else 16))
        smooth_reach = [math.ceil(4 * self.sigma / s) for s in self.scale]
        if params.halo:
            halo = per_axis(params.halo, ndim, "halo")
        elif d:
            halo = tuple(max(16, math.ceil(HALO_PER_DIAMETER * d / s), 2 * r) for s, r in zip(self.scale, smooth_reach))
        else:
            halo = tuple(max(32, 2 * r) for r in smooth_reach)
        # past the volume edge the block is mirrored: smoothing and the distance transform then
        # see an object cut by the edge go on as it would, where zeros there shrank every object
        # touching the edge (on the 15-slice 3D nuclei sample nearly all: accuracy 0.06 against
        # 0.33). Seeds and labels stay inside the volume, so no mirrored copy is labelled.
        self.traits = KernelTraits(ndim=ndim, in_channels=params.channels, out_channels=1, halo=halo,
                                   pad_mode="reflect", output="labels", max_batch=8)

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        from scipy import ndimage

        p = self.params
        context = context or BatchContext.whole(batch)
        out = np.zeros((batch.shape[0], 1) + batch.shape[2:], np.int32)
        for n, block in enumerate(batch):
            if self.signal.stain == "none":  # the block is normalised already
                image = self.signal(block, None)
            else:  # deconvolution works on transmitted light: undo the normalisation
                image = self.signal(context.scaling.invert(block) if context.scaling is not None else block, None)
            inside = np.zeros(image.shape, bool)
            inside[tuple(context.valid[n])] = True
            smooth = ndimage.gaussian_filter(image.astype(np.float32), [self.sigma / s for s in self.scale])
            mask = smooth > p.threshold
            if not mask[inside].any():
                continue
            dist, seeds = distance_seeds(mask, self.scale, self.min_distance, smooth=self.sigma)
            seeds[~inside] = 0  # the mirror image past the edge is seen, never labelled
            # the watershed breaks exact ties by flooding order, which depends on the whole
            # block; a faint intensity term makes ties rare, so tiles agree with the whole image
            elevation = -(dist + 1e-3 * smooth)
            if p.background is None or p.background >= p.threshold:
                out[n, 0] = seeded_watershed(elevation, seeds, mask & inside, self.min_size)
                continue
            cores = seeded_watershed(elevation, seeds, mask & inside, 0)
            low = p.background + GROW_TO * (p.threshold - p.background)
            out[n, 0] = grow_and_trim(cores, smooth, (smooth > low) & inside, background=p.background,
                                      keep_above=KEEP_ABOVE, min_size=self.min_size,
                                      tie_break=1e-4 * dist / min(self.scale))
        return out


class RelabelKernel(Kernel):
    """Labels in, labels out, renumbered per block: stitching on its own."""

    name = "relabel"

    class Params(KernelParams):
        ndim: int = Field(ge=2, le=3)
        halo: int | list[int] = 8

    def __init__(self, params: Params):
        super().__init__(params)
        # native input keeps the stored integer ids (float32 would round ids above 2^24);
        # intensities of a labels image mean nothing, so tables get none; background past the edge
        self.traits = KernelTraits(ndim=params.ndim, in_channels=1, out_channels=1,
                                   halo=per_axis(params.halo, params.ndim, "halo"), pad_mode="constant",
                                   input="native", output="labels", max_batch=64, measures=False)

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        out = np.empty(batch.shape, np.int64)
        for n in range(batch.shape[0]):
            out[n] = rank_ids(batch[n])
            if batch[n].min() > 0:  # no background in this block: 0 is an object id, shift up
                out[n] += 1
        return out


class UNetSegmentKernel(UNetModelKernel):
    """A trained 3-class U-Net (``tilewise train segment``) + seeded watershed on its output.

    The halo is the network's receptive field, and at least ``object_halo`` pixels so whole
    objects are seen by every tile they touch. The network saw only image content in training:
    a flat (zero) margin past the volume edge reads as foreground to it, so it sees a mirrored
    edge (``reflect``) and labels only the valid region of each block (``context.valid``).

    ``zoom`` runs the network at its training scale: each block is resampled by it onto one
    global model grid (``kernels.resample``: image pixels x zoom = model pixels, e.g. 0.5 when
    this image's objects are twice as large as the training objects), and the class
    probabilities are mapped back to the block before the watershed, so labels are on the
    input grid and tiles still agree. ``object_halo`` and ``min_size`` are in model pixels.

    A model trained with an uncertainty method (``adf``, ``mc-dropout``, ``ensemble``; see
    ``kernels.uncertainty``) labels from its *mean* class probabilities and returns the maps
    ``foreground`` (mean foreground probability), ``entropy`` (normalised predictive entropy)
    and ``variance`` (total variance of the class probabilities) beside the labels.
    """

    name = "segment-unet"
    task = "segment"

    class Params(UNetModelKernel.Params):
        min_size: int = Field(12, ge=0)
        object_halo: int = Field(32, ge=0)
        zoom: float = Field(1.0, gt=0.05, lt=20)
        # write uncertainty maps: None = when the model has an uncertainty method; True on a
        # deterministic model writes its softmax's foreground probability and entropy
        uncertainty: bool | None = None

    def __init__(self, params: Params):
        from kernels.resample import input_halo
        from kernels.uncertainty import CLASS_MAPS

        super().__init__(params)
        align = self.traits.align
        if params.zoom == 1.0:
            halo = tuple(max(h, -(-params.object_halo // f) * f) for h, f in zip(self.traits.halo, align))
            self.min_size = params.min_size
        else:  # the engine's tiles need no alignment: blocks align on the model grid themselves
            model_halo = tuple(max(h, params.object_halo) for h in self.traits.halo)
            halo = input_halo(model_halo, align, params.zoom)
            self.model_align, align = align, (1,) * len(align)
            self.min_size = int(round(params.min_size / params.zoom ** self.config.ndim))
        wanted = params.uncertainty if params.uncertainty is not None else self.uncertainty is not None
        maps = (CLASS_MAPS if self.uncertainty is not None else CLASS_MAPS[:2]) if wanted else ()
        self.traits = replace(self.traits, out_channels=1, halo=halo, align=align, pad_mode="reflect",
                              output="labels", maps=maps)

    def _moments(self, batch: np.ndarray) -> np.ndarray:
        """``(N, 5, *)`` on the model grid: mean class probabilities, their total variance (zero
        for a deterministic model) and the interior probability that seeds objects.

        ADF: the mean class probabilities are the expected softmax of the Gaussian logits
        (``m``, the Dirichlet's mode), the variance is the Dirichlet's, and seeds come from the
        Dirichlet's *mean* interior probability, which is pulled towards uniform where the
        precision is low, so only confident interiors seed. Chosen on the training half of
        DSB-2018 (``bench_uncertainty``): labels from the Dirichlet mean alone reached Dice 0.88
        (ECE 0.066), from ``m`` alone accuracy@0.5 0.63; this split gave Dice 0.93, accuracy 0.84
        and ECE 0.013. The other methods seed from their mean interior probability.
        """
        u = self.uncertainty
        if u is None:
            mean, var = _softmax(self.predict(batch)), None
            seeds = mean[:, INTERIOR]
        elif u.method == "adf":
            import torch

            from kernels.uncertainty import dirichlet_from_moments, dirichlet_mean_variance, expected_softmax

            logit_mean, logit_var = (torch.from_numpy(a) for a in self.predict_moments(batch))
            alpha = dirichlet_from_moments(logit_mean, logit_var).numpy()
            dirichlet_mean, var = dirichlet_mean_variance(alpha)
            mean = expected_softmax(logit_mean, logit_var).numpy()
            seeds = dirichlet_mean[:, INTERIOR]
        else:
            from kernels.uncertainty import sample_moments

            mean, var = sample_moments(_softmax(self.predict_samples(batch), axis=2))
            seeds = mean[:, INTERIOR]
        var = np.zeros((mean.shape[0],) + mean.shape[2:], np.float32) if var is None else var
        return np.concatenate([mean, var[:, None], seeds[:, None]], axis=1).astype(np.float32)

    def moments(self, batch: np.ndarray, context: BatchContext | None = None) -> np.ndarray:
        """:meth:`_moments` of each block, on the block's own grid (resampled from the one
        global model grid when ``zoom`` is not 1)."""
        if self.params.zoom == 1.0:
            return self._moments(batch)
        from kernels.resample import from_model, model_grid, to_model

        context = context or BatchContext.whole(batch)
        zoom, out = self.params.zoom, []
        for block, origin in zip(batch, context.origins):
            grid = model_grid(origin, block.shape[1:], zoom, self.model_align)
            moments = self._moments(to_model(block, origin, grid, zoom)[None])[0]
            out.append(from_model(moments, origin, block.shape[1:], grid, zoom))
        return np.stack(out)

    def probabilities(self, batch: np.ndarray, context: BatchContext | None = None) -> np.ndarray:
        """Per-pixel (mean) class probabilities of each block, on the block's own grid."""
        return self.moments(batch, context)[:, :3]

    def with_maps(self, batch: np.ndarray, context: BatchContext) -> tuple[np.ndarray, np.ndarray | None]:
        """Instance labels of each block and, when ``traits.maps``, its uncertainty maps. The
        padding (outside ``context.valid``) is background, so no object grows into (or is
        mirrored from) it."""
        from kernels.uncertainty import class_maps

        moments = self.moments(batch, context)
        prob = moments[:, :3].copy()
        prob[:, INTERIOR] = moments[:, 4]  # the seeding interior probability (see _moments)
        for p, region in zip(prob, context.valid):
            outside = np.ones(p.shape[1:], bool)
            outside[tuple(region)] = False
            p[:, outside] = 0.0
            p[BACKGROUND, outside] = 1.0
        labels = np.stack([instances_from_probabilities(p, self.min_size)[None] for p in prob])
        if not self.traits.maps:
            return labels, None
        return labels, class_maps(moments[:, :3], moments[:, 3])[:, :len(self.traits.maps)]

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        return self.with_maps(batch, context)[0]


def _softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    logits = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=axis, keepdims=True)
