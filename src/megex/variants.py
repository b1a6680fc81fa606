"""Fashion-MNIST at other input sizes, and in colour: datasets that differ in dimension only.

Each variant is computed from the standard Fashion-MNIST files when it is loaded (no file is
written, nothing is downloaded) and is deterministic: the same arrays on every call and
every machine. The images keep their order, so the train/validation/test splits are the
original's (the validation images are the last training images, as for every dataset).

- **Resizing**: bilinear (``torch.nn.functional.interpolate``, ``align_corners=False``),
  with antialiasing where the image shrinks, so that 14x14 is a low-pass version rather than
  a sampled one; values rounded back to uint8.
- **Colour** (``fashion-mnist-colour-56``): each image is tinted by one colour whose hue
  depends on its class. Class k has the hue centre 2 pi k / K on the colour circle, and an
  image's hue is drawn around it with a spread of one class spacing (normal, standard
  deviation 2 pi / K), so the distributions of neighbouring classes overlap: hue alone names
  the class about 38% of the time (chance 10%), which helps most between the garments that
  look alike (T-shirt, pullover, coat, shirt: two class spacings apart) without making shape
  unnecessary. The tint is ``LUMA + CHROMA * cos(hue - 2 pi c / 3)`` for channel c, whose
  mean over the three channels is LUMA for every hue: the brightness of a pixel
  (the channel mean) is the grey image times LUMA, the same for every class, so a model that
  averages the channels has only the shapes, and the extra information is in the ratios
  between channels, which a model sees only by using all three. Tints lie in
  [LUMA - CHROMA, LUMA + CHROMA] = [1/3, 1], so nothing clips. A fixed channel mixing with
  class-dependent weights would do the same; a tint keeps the garments recognisable.
  The hue noise is drawn from a fixed seed per split.

Memory: the arrays stay uint8 (N, C, H, W). At 3x56x56 the 70,000 images take 659 MB as
uint8 (2.6 GB as float32); they are made in chunks of 5,000 images, and the victim's
training converts one batch at a time (:func:`megex.victim.train_victim`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "VARIANTS",
    "Variant",
    "CHROMA",
    "LUMA",
    "hue_tints",
    "variant_images",
    "resize",
    "tint",
]

LUMA = 2.0 / 3.0
CHROMA = 1.0 / 3.0
# Images per chunk: bounds the float32 copies made while resizing and tinting.
_CHUNK = 5000
# Seeds of the hue noise, one per split, so that the test split does not depend on the
# number of training images.
_HUE_SEEDS = {"train": 20261201, "test": 20261202}


@dataclass(frozen=True)
class Variant:
    """A dataset derived from `source`: images resized to `size` x `size`, tinted if `colour`."""

    source: str
    size: int
    colour: bool = False


VARIANTS: dict[str, Variant] = {
    "fashion-mnist-14": Variant("fashion-mnist", 14),
    "fashion-mnist-56": Variant("fashion-mnist", 56),
    "fashion-mnist-colour-56": Variant("fashion-mnist", 56, colour=True),
}


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (N, C, H, W) resized to (N, C, size, size): bilinear, antialiased when
    shrinking, rounded back to uint8."""
    import torch
    import torch.nn.functional as F

    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected a whole number >= 1, got {size!r}")
    height, width = images.shape[2:]
    if (height, width) == (size, size):
        return images.copy()
    shrink = size < max(height, width)
    out = np.empty((images.shape[0], images.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(images), _CHUNK):
        chunk = torch.from_numpy(images[start : start + _CHUNK]).float()
        scaled = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
        )
        out[start : start + _CHUNK] = scaled.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def hue_tints(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """(N, 3) float32 tints: class-dependent hues with overlapping spreads (module docstring)."""
    rng = np.random.default_rng(seed)
    spacing = 2 * math.pi / num_classes
    hue = spacing * labels.astype(np.float64) + spacing * rng.standard_normal(len(labels))
    phases = 2 * math.pi * np.arange(3) / 3
    return (LUMA + CHROMA * np.cos(hue[:, None] - phases[None, :])).astype(np.float32)


def tint(images: np.ndarray, tints: np.ndarray) -> np.ndarray:
    """Grey uint8 images (N, 1, H, W) times per-image tints (N, 3): uint8 (N, 3, H, W)."""
    import torch

    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images: expected grey (N, 1, H, W), got {images.shape}")
    if tints.shape != (len(images), 3):
        raise ValueError(f"tints: expected ({len(images)}, 3), got {tints.shape}")
    out = np.empty((images.shape[0], 3, *images.shape[2:]), dtype=np.uint8)
    for start in range(0, len(images), _CHUNK):
        grey = torch.from_numpy(images[start : start + _CHUNK]).float()
        colour = torch.from_numpy(tints[start : start + _CHUNK]).view(-1, 3, 1, 1)
        out[start : start + _CHUNK] = (grey * colour).round_().clamp_(0, 255).to(torch.uint8)
    return out


def variant_images(name: str, source: Any) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) images of the variant `name`, computed from its source dataset (a
    megex.data.Dataset of VARIANTS[name].source; labels and classes stay the source's)."""
    if name not in VARIANTS:
        raise ValueError(f"dataset: {name!r} is not a variant; expected one of {list(VARIANTS)}")
    variant = VARIANTS[name]
    x_train = resize(source.x_train, variant.size)
    x_test = resize(source.x_test, variant.size)
    if variant.colour:
        k = source.num_classes
        x_train = tint(x_train, hue_tints(source.y_train, k, _HUE_SEEDS["train"]))
        x_test = tint(x_test, hue_tints(source.y_test, k, _HUE_SEEDS["test"]))
    return x_train, x_test
