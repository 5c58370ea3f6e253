"""Attribution: which input pixels drove a trained U-Net's output on one object or region.

A *target* is a scalar per crop: the mean, over a mask (an object's pixels, or a box), of the
segmenter's interior probability or of the denoiser's output (normalised units, channel mean).
Three standard methods explain it:

- **integrated gradients** (Sundararajan et al. 2017): the input minus a baseline times the
  gradient averaged along the straight path between them (midpoint rule, ``steps`` points). Its
  *completeness*, attributions summing to target(input) - target(baseline), is checked and
  reported for every crop: the error shrinks as 1/steps². Unless ``steps`` is given, each
  target starts at 32 points and doubles them while the error is over 1 % of the target's
  change (at most 1024): a denoiser's target is complete at 32 (error 6e-4 on DSB-2018), but a
  segmenter's interior probability, a steep softmax, was off by up to 0.15 at 32 there
  (``bench_gpu --parts attribution``); doubling took it to 0.005 with 32-256 points, 8x the
  time (README);
- **occlusion**: the drop of the target when a window of the input is replaced by the baseline,
  spread over the window's pixels and averaged over the windows that cover each pixel;
  windows sit on a grid anchored at the image origin (``origins``), so every crop of one image
  sees the same windows;
- **Grad-CAM** (Selvaraju et al. 2017) at an encoder level: that level's feature maps weighted
  by the target's gradient, rectified, up-sampled to the input. The gradient is *summed* over
  the map, not averaged: the mean divides by the map's size, so it would change with how much
  context a crop holds; the sum does not (the same map up to a constant factor).

Crops must reach one receptive field (plus one occlusion window) beyond the mask on every side
and start on the network's down-sampling grid; then each method gives inside the crop what it
gives on the whole image (Grad-CAM: inside the crop less one receptive field, where the feature
maps are the whole image's; outside that it is zero). ``pipeline.steps.explain`` cuts such crops.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import numpy as np
from pydantic import Field

from kernels.contract import BatchContext, KernelTraits
from kernels.instances import INTERIOR
from kernels.modelfile import UNetModelKernel

Method = Literal["ig", "occlusion", "gradcam"]
Baseline = Literal["zero", "blur"]
METHODS = ("ig", "occlusion", "gradcam")
IG_FIRST_STEPS = 32  # integrated gradients without ``steps``: the first try, doubled until complete
IG_MAX_STEPS = 1024
IG_TOLERANCE = 0.01  # of the target's change (plus IG_FLOOR): the completeness error that is enough
IG_FLOOR = 1e-4  # a target that hardly changes needs no more than rounding allows


_FULL_FLOAT32 = threading.Lock()


@contextmanager
def full_float32(device: Any) -> Iterator[None]:
    """cuDNN convolutions in full float32 (not TF32) while attributions are computed on a GPU.

    On Ampere and later GPUs torch runs float32 convolutions in TF32 by default (a 10-bit
    mantissa). Occlusion's drops are differences of two outputs, so that rounding (about 1e-3
    of the output) stays in every window's drop: on an H200 it left differences of 0.4 % of the
    largest attribution against the CPU, and moved the cheating check's share of mass on the
    object by up to 0.022 (``bench_gpu --parts attribution``). The flag is process-wide: the
    lock keeps concurrent attribution calls from restoring it under one another; other kernels
    of the worker run in full float32 meanwhile (slower, never less exact)."""
    import torch

    if not str(device).startswith("cuda"):
        yield
        return
    with _FULL_FLOAT32:
        saved = torch.backends.cudnn.allow_tf32  # the legacy flag sets conv and RNN alike
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = saved


def baseline_of(crop: np.ndarray, kind: Baseline, sigma: float) -> np.ndarray:
    """The reference input: ``zero`` (the image's 1st percentile after normalisation: dark) or
    ``blur`` (the crop smoothed with a Gaussian of ``sigma`` pixels: shapes without detail)."""
    if kind == "zero":
        return np.zeros_like(crop)
    from scipy import ndimage

    return np.stack([ndimage.gaussian_filter(c, sigma, mode="reflect") for c in crop]).astype(crop.dtype)


def integrated_gradients(target: Callable[[Any], Any], x, baseline, steps: int, chunk: int = 8):
    """``(attribution like x, target(x), target(baseline))`` for one crop ``x`` ``(1, C, *s)``."""
    import torch

    grads = torch.zeros_like(x)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    for part in alphas.split(chunk):
        path = (baseline + part.view(-1, *([1] * (x.ndim - 1))) * (x - baseline)).requires_grad_(True)
        value = target(path).sum()
        grads += torch.autograd.grad(value, path)[0].sum(0, keepdim=True)
    with torch.no_grad():
        return (x - baseline) * grads / steps, float(target(x)[0]), float(target(baseline)[0])


def window_starts(origin: int, length: int, window: int, stride: int) -> list[int]:
    """Local starts of the windows (global starts on multiples of ``stride``) that overlap a
    crop ``[origin, origin + length)``."""
    first = -(-(origin - window + 1) // stride) * stride  # the first multiple of stride > origin - window
    return [s - origin for s in range(first, origin + length, stride)]


def reach_of(mask: np.ndarray, low: tuple[int, ...], high: tuple[int, ...],
             factor: tuple[int, ...]) -> tuple[slice, ...]:
    """The part of a crop that a target over ``mask`` depends on: the mask's bounding box grown
    by the receptive field (an output pixel sees ``low`` before and ``high`` after it), on the
    crop's down-sampling grid so the network computes there what it computes on the whole crop.
    The whole crop when the mask is empty."""
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    part = []
    for axis, (lo, hi, f, n) in enumerate(zip(low, high, factor, mask.shape)):
        hits = np.flatnonzero(mask.any(tuple(a for a in range(mask.ndim) if a != axis)))
        start = max(0, int(hits[0]) - lo) // f * f
        part.append(slice(start, min(n, int(hits[-1]) + 1 + hi)))
    return tuple(part)


def occlusion(target: Callable[[Any], Any], x, baseline, window: tuple[int, ...], stride: tuple[int, ...],
              origin: tuple[int, ...], *, reach: tuple[slice, ...] | None = None, chunk: int = 32):
    """``(attribution (1, *s), target(x[reach]))``: per pixel, the mean target drop over the
    windows covering it when each is replaced by the baseline.

    ``target`` takes batches of ``x[reach]`` (default: the whole crop), the part of the crop the
    target depends on (:func:`reach_of`). A window that misses it changes nothing: its drop is
    zero, so it is counted but never evaluated, and one that overlaps it is occluded there only.
    On a small object this evaluates a few hundred small inputs instead of a thousand or more
    crops."""
    import torch

    spatial = tuple(x.shape[2:])
    reach = reach or tuple(slice(0, n) for n in spatial)
    starts = [window_starts(o, n, w, s) for o, n, w, s in zip(origin, spatial, window, stride)]
    boxes = [tuple(slice(max(0, a), min(n, a + w)) for a, n, w in zip(corner, spatial, window))
             for corner in itertools.product(*starts)]
    count = np.zeros(spatial, np.float32)
    for box in boxes:
        count[box] += 1
    live = []  # (the window in the crop, its part inside the reach, relative to the reach)
    for box in boxes:
        inside = tuple(slice(max(b.start, r.start) - r.start, min(b.stop, r.stop) - r.start)
                       for b, r in zip(box, reach))
        if all(s.start < s.stop for s in inside):
            live.append((box, inside))
    lead = (slice(None), slice(None))
    xs, bs = x[lead + reach], baseline[lead + reach]
    total = torch.zeros(spatial, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        full = target(xs)[0]
        for k in range(0, len(live), chunk):
            part = live[k:k + chunk]
            batch = xs.repeat(len(part), *([1] * (x.ndim - 1)))
            for i, (_, inside) in enumerate(part):
                batch[(i, slice(None)) + inside] = bs[(0, slice(None)) + inside]
            drops = full - target(batch)
            for (box, _), drop in zip(part, drops):
                total[box] += drop
    return (total / torch.from_numpy(count).to(total.device).clamp_min(1))[None], float(full)


class AttributionKernel(UNetModelKernel):
    """Attribution maps of a trained segmentation or denoising U-Net (a model folder).

    :meth:`explain` takes crops with their target masks and global origins; calling the
    kernel on blocks explains each block's mean target over its valid region. An ensemble is
    explained through its mean output (integrated gradients and occlusion are linear in the
    target, so this is the mean of the members' maps); MC-dropout and ADF models through their
    deterministic pass.
    """

    name = "attribution"

    class Params(UNetModelKernel.Params):
        method: Method = "ig"
        # integrated gradients: points on the path; None: IG_FIRST_STEPS, doubled until complete
        steps: int | None = Field(None, ge=2, le=4096)
        baseline: Baseline = "zero"
        blur_sigma: float = Field(4.0, gt=0)  # pixels, for baseline="blur"
        window: list[int] | None = None  # occlusion window, pixels per spatial axis
        stride: list[int] | None = None  # occlusion stride (default: half the window)
        level: int | None = Field(None, ge=0)  # Grad-CAM encoder level (default: the deepest encoder block)

    def __init__(self, params: Params):
        from kernels.unet import receptive_field

        super().__init__(params)
        c = self.config
        self.window = tuple(params.window or (8,) * c.ndim)
        self.stride = tuple(params.stride or tuple(max(1, w // 2) for w in self.window))
        if len(self.window) != c.ndim or len(self.stride) != c.ndim or min(self.window + self.stride) < 1:
            raise ValueError(f"window and stride need {c.ndim} positive sizes, got {self.window}, {self.stride}")
        self.level = c.depth - 1 if params.level is None else params.level
        if not 0 <= self.level <= c.depth:
            raise ValueError(f"Grad-CAM level must be 0..{c.depth} (encoder blocks, then the bottleneck), "
                             f"got {self.level}")
        self.reach = receptive_field(c)
        rf = self.reach.halo
        self.margin = tuple(h + (w if params.method == "occlusion" else 0) for h, w in zip(rf, self.window))
        self.traits = KernelTraits(ndim=c.ndim, in_channels=c.in_channels, out_channels=1, halo=self.margin,
                                   align=c.factor, percentiles=self.traits.percentiles, max_batch=1, device="gpu")

    def load(self, device: str) -> None:
        super().load(device)
        for p in self.net.parameters():
            p.requires_grad_(False)  # gradients are taken with respect to the input only

    def _networks(self) -> list:
        if self.uncertainty is not None and self.uncertainty.method == "ensemble":
            return list(self.net)
        return [self.net]

    def output_map(self, x):
        """``(N, *s)``: what targets average: the interior probability (segmentation) or the
        channel mean of the output (denoising), averaged over an ensemble's members."""
        import torch

        maps = []
        for net in self._networks():
            y = net.forward_padded(x)
            maps.append(torch.softmax(y, 1)[:, INTERIOR] if self.card.task == "segment" else y.mean(1))
        return torch.stack(maps).mean(0)

    def explain(self, crops: np.ndarray, masks: np.ndarray, origins: np.ndarray) -> dict[str, np.ndarray]:
        """For ``(N, C, *s)`` normalised crops, ``(N, *s)`` boolean target masks and ``(N, ndim)``
        global origins: ``attribution`` ``(N, *s)`` (IG: summed over channels), ``output`` (the
        map the target averages), ``value`` and ``baseline_value`` (the target at the input and
        the baseline), ``completeness_error`` (IG: |sum of attributions - their difference|;
        NaN for the others) and ``steps`` (IG: the points on the path it took; NaN for the others)."""
        if self.net is None:
            raise RuntimeError("attribution kernel used before load()")
        out: dict[str, list] = {k: [] for k in ("attribution", "output", "value", "baseline_value",
                                                "completeness_error", "steps")}
        with full_float32(self.device):
            for crop, mask, origin in zip(crops, masks, origins):
                self._explain_one(crop, mask, origin, out)
        return {k: np.asarray(np.stack(v) if k in ("attribution", "output") else v, np.float32)
                for k, v in out.items()}

    def _explain_one(self, crop: np.ndarray, mask: np.ndarray, origin: np.ndarray, out: dict[str, list]) -> None:
        """:meth:`explain` for one crop, its results appended to ``out``."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(crop[None], dtype=np.float32)).to(self.device)
        m = torch.from_numpy(np.ascontiguousarray(mask[None], dtype=np.float32)).to(self.device)
        base = torch.from_numpy(baseline_of(crop.astype(np.float32), self.params.baseline,
                                            self.params.blur_sigma)[None]).to(self.device)

        # the target depends on its reach alone (reach_of): every method evaluates it there
        reach = reach_of(mask, self.reach.low, self.reach.high, self.config.factor)
        inside = (slice(None), slice(None)) + reach
        xr, br, mr = x[inside], base[inside], m[inside[1:]]

        def target(batch, m=mr):
            return (self.output_map(batch) * m).flatten(1).sum(1) / m.sum().clamp_min(1.0)

        with torch.no_grad():
            output = self.output_map(x)[0]
        error, steps = float("nan"), float("nan")
        if self.params.method == "ig":  # gradients outside the reach are zero: not computed
            steps = self.params.steps or IG_FIRST_STEPS
            while True:
                part, value, base_value = integrated_gradients(target, xr, br, steps)
                error = abs(float(part.sum()) - (value - base_value))
                enough = error <= IG_TOLERANCE * abs(value - base_value) + IG_FLOOR
                if self.params.steps or enough or steps >= IG_MAX_STEPS:
                    break
                # doubled: jumping to where the 1/steps² rate puts the error within tolerance cost
                # as much on DSB-2018's segmenter (20.3 against 21.0 s a target), the error not
                # being monotone in the steps
                steps = min(IG_MAX_STEPS, 2 * steps)
            attr = torch.zeros_like(x[0, 0])
            attr[reach] = part[0].sum(0)
        else:
            with torch.no_grad():
                base_value = float(target(br)[0])
            if self.params.method == "occlusion":
                attr, value = occlusion(target, x, base, self.window, self.stride, tuple(int(o) for o in origin),
                                        reach=reach)
                attr = attr[0]
            else:
                attr = self._gradcam(x, m)
                with torch.no_grad():
                    value = float(target(xr)[0])
        out["attribution"].append(attr.float().cpu().numpy())
        out["output"].append(output.float().cpu().numpy())
        out["value"].append(value)
        out["baseline_value"].append(base_value)
        out["completeness_error"].append(error)
        out["steps"].append(steps)

    def _gradcam(self, x, m):
        """Grad-CAM at ``self.level``, up-sampled to the crop and zero within one receptive
        field of its edge (see the module docstring); an ensemble's maps are averaged."""
        import torch
        import torch.nn.functional as F

        from kernels.unet import pad_to_factor

        c = self.config
        cams = []
        for net in self._networks():
            block = net.bottleneck if self.level == c.depth else net.encoders[self.level]
            kept: dict[str, Any] = {}
            handle = block.register_forward_hook(lambda module, inputs, output: kept.__setitem__("a", output))
            try:
                with torch.enable_grad():
                    xp = pad_to_factor(x, c.factor).requires_grad_(True)  # weights are frozen: the graph starts here
                    y = net(xp)[(slice(None), slice(None)) + tuple(slice(0, n) for n in x.shape[2:])]
                    mapped = torch.softmax(y, 1)[:, INTERIOR] if self.card.task == "segment" else y.mean(1)
                    value = (mapped * m).flatten(1).sum(1) / m.sum().clamp_min(1.0)
                    grad = torch.autograd.grad(value.sum(), kept["a"])[0]
            finally:
                handle.remove()
            weights = grad.flatten(2).sum(2)  # summed, not averaged: see the module docstring
            cam = torch.relu((weights[(...,) + (None,) * c.ndim] * kept["a"]).sum(1, keepdim=True))
            scale = tuple(float(p**self.level) for p in c.pool)
            cam = F.interpolate(cam, scale_factor=scale, mode="nearest") if self.level else cam
            cams.append(cam[(0, 0) + tuple(slice(0, n) for n in x.shape[2:])].detach())
        cam = torch.stack(cams).mean(0)
        edge = tuple(slice(h, max(h, n - h)) for h, n in zip(self.margin, x.shape[2:]))
        inside = torch.zeros_like(cam)
        inside[edge] = cam[edge]
        return inside

    def __call__(self, batch: np.ndarray, context: BatchContext) -> np.ndarray:
        """Each block explained for its mean target over its valid region: ``(N, 1, *s)``."""
        masks = np.zeros((len(batch),) + batch.shape[2:], bool)
        for k, valid in enumerate(context.valid):
            masks[(k,) + tuple(valid)] = True
        return self.explain(batch, masks, np.asarray(context.origins))["attribution"][:, None]
