"""What "object" means in an image's pixels: brighter than background, darker, or stained.

Fluorescence shows nuclei bright on dark; brightfield shows them dark on bright glass, and H&E
stains them with haematoxylin (blue-purple) beside eosin (pink). The classical kernel and the
global statistics that set its threshold and object scale see one *object signal* per pixel,
high on objects, computed the same way from a tile and from the global sample:

- ``bright``: the mean of the normalised channels;
- ``dark``: one minus it (objects darker than background);
- ``hematoxylin``: colour deconvolution (Ruifrok & Johnston 2001, scikit-image's ``rgb2hed``)
  of RGB transmitted light, divided by the glass's brightness (``white``, per channel, from the
  image's global statistics): the haematoxylin optical density.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.contract import Scaling

POLARITIES = ("bright", "dark")
STAINS = ("none", "hematoxylin")


@dataclass(frozen=True)
class ObjectSignal:
    """The per-pixel object signal of ``(C, *spatial)`` blocks in input units (see module)."""

    polarity: str = "bright"
    stain: str = "none"
    white: tuple[float, ...] | None = None  # hematoxylin: transmitted light through glass, per channel

    def __post_init__(self) -> None:
        if self.polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {POLARITIES}, got {self.polarity!r}")
        if self.stain not in STAINS:
            raise ValueError(f"stain must be one of {STAINS}, got {self.stain!r}")

    def __call__(self, raw: np.ndarray, scaling: Scaling | None) -> np.ndarray:
        """``(C, *spatial)`` input units -> ``(*spatial)`` float32, high on objects. ``scaling``
        is the input's global normalisation (None: ``raw`` is already normalised)."""
        if self.stain == "hematoxylin":
            return hematoxylin(raw, self.white)
        image = scaling.apply(raw) if scaling is not None else raw.astype(np.float32, copy=False)
        signal = image.mean(axis=0) if image.shape[0] > 1 else image[0]
        return (1.0 - signal if self.polarity == "dark" else signal).astype(np.float32, copy=False)


def hematoxylin(rgb: np.ndarray, white: tuple[float, ...] | None) -> np.ndarray:
    """Haematoxylin optical density of ``(3, *spatial)`` RGB transmitted light (input units),
    ``white`` the glass's brightness per channel (default: 255, 8-bit)."""
    from skimage.color import rgb2hed

    if rgb.shape[0] != 3:
        raise ValueError(f"haematoxylin needs 3 channels (RGB), got {rgb.shape[0]}")
    glass = np.asarray(white if white is not None else (255.0,) * 3, np.float32).reshape((3,) + (1,) * (rgb.ndim - 1))
    transmitted = np.clip(rgb.astype(np.float32) / glass, 1e-6, 1.0)
    return rgb2hed(np.moveaxis(transmitted, 0, -1))[..., 0].astype(np.float32)


FILL_FRACTION = 0.1  # one value at either end on at most this share of the voxels, apart from the rest: a fill


def fill_values(values: np.ndarray) -> tuple[float, ...]:
    """The fills among ``values`` (none, one or two): the lowest or the highest value when it
    holds at most ``FILL_FRACTION`` of them and lies well apart from the rest (further than a
    quarter of their interquartile range). A zero-padded margin of a stitched volume, a rescaled
    image's empty edge, a slide's white padding: not background, not objects. One zero row on
    3 % of the 3D nuclei sample at x0.5 made its grey levels skew dark (objects taken for dark
    ones) and put Otsu at 0.65, between the row and everything else: 97 % "foreground", no
    object scale. Background clipped at zero is no fill (its zeros sit next to the ones and
    twos), nor are saturated objects."""
    values = np.asarray(values).ravel()
    fills = []
    for end in ("low", "high"):
        if values.size < 2:
            break
        value = values.min() if end == "low" else values.max()
        at = values == value
        if not 0 < at.sum() <= FILL_FRACTION * values.size or at.all():
            continue
        rest = values[~at]
        if rest.min() == rest.max():  # two one-value classes: both are real
            continue
        q1, q3 = np.percentile(rest, [25, 75])
        gap = rest.min() - value if end == "low" else value - rest.max()
        if gap > (q3 - q1) / 4:
            values = rest
            fills.append(float(value))
    return tuple(fills)


def without_fill(values: np.ndarray) -> np.ndarray:
    """``values`` (flat) without their fills (:func:`fill_values`)."""
    values = np.asarray(values).ravel()
    fills = fill_values(values)
    return values[~np.isin(values, fills)] if fills else values


def otsu_gap(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` (a fill left out, :func:`without_fill`), moved to the
    middle of the empty gap it may fall in.

    Every threshold inside a gap between two classes gives the same split, and scikit-image's
    returns the gap's lowest value; a smoothed edge then crosses it far out on the background
    side, growing every object. The middle is where a blurred step edge is crossed at its true
    position. Without a gap this is Otsu's threshold.
    """
    from skimage.filters import threshold_otsu

    values = without_fill(np.asarray(values, np.float64))
    t = float(threshold_otsu(values))
    below, above = values[values <= t], values[values > t]
    return (float(below.max()) + float(above.min())) / 2 if below.size and above.size else t
