"""The attacker's image pool: unlabelled images of the victim's domain (or a nearby one).

- ``DATASET:unseen:N``: N training images the victim was trained without, held out for
  attackers (``megex train-victim --pool-images P``); ``DATASET:seen:N``: N it trained on;
- ``DATASET:train:N``: N training images of another dataset, resized to the victim's size and
  converted to its channels (out of distribution, or the victim's own images at another size);
- ``folder:PATH`` or ``folder:PATH:N``: PNG/JPEG files of the victim's height and width.

Labels are never read; a pool never holds a test or validation image of the victim. The N
images are a seeded random subset in a fixed order (with one seed, pools nest).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as data_mod
from .variants import VARIANTS, resize
from .victim import Victim

__all__ = ["Pool", "PoolSpec", "VictimImages", "load_pool", "parse_pool", "victim_images"]

KINDS = ("unseen", "seen", "train", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAMMAR = "DATASET:unseen:N, DATASET:seen:N, DATASET:train:N, folder:PATH or folder:PATH:N"
_TITLES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10"}


@dataclass(frozen=True)
class PoolSpec:
    """A parsed pool spec: `kind` in KINDS; `dataset` for the first three kinds, `path` for a
    folder; `size` the number of images (None: every file of the folder)."""

    kind: str
    dataset: str | None = None
    size: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "folder":
            return f"folder:{self.path}" + (f":{self.size}" if self.size is not None else "")
        return f"{self.dataset}:{self.kind}:{self.size}"


@dataclass(frozen=True)
class VictimImages:
    """What a pool needs to know of a victim: input shape, dataset (None if unknown), and the
    training images it held out (the last `validation_images`, the `pool_images` before)."""

    input_shape: tuple[int, int, int]
    dataset: str | None
    validation_images: int = 0
    pool_images: int = 0


@dataclass
class Pool:
    """Unlabelled images, float32 in [0, 1], (N, C, H, W), with what they are; `positions`:
    theirs in the source dataset's train split (None for a folder)."""

    images: torch.Tensor
    spec: str
    description: str
    sha256: str
    kind: str = ""
    positions: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        """What a run folder records: spec, kind, size, description and the images' SHA-256."""
        keys = ("spec", "kind", "description", "sha256")
        return {"size": len(self.images), **{key: getattr(self, key) for key in keys}}


def parse_pool(text: str) -> PoolSpec:
    """Parse a pool spec (module docstring); ValueError naming the spec if it is not one."""
    text = text.strip()
    if text.startswith("folder:"):
        path, size = text[len("folder:") :], None
        head, sep, tail = path.rpartition(":")
        if sep and re.fullmatch(r"[+-]?[0-9]+", tail.strip()):
            path, size = head, _count(text, tail)
        if not path:
            raise ValueError(f"pool {text!r}: no folder named; expected {_GRAMMAR}")
        return PoolSpec("folder", path=path, size=size)
    parts = text.split(":")
    if len(parts) != 3 or parts[1] not in KINDS[:3]:
        raise ValueError(f"pool {text!r}: expected {_GRAMMAR}")
    if parts[0] not in data_mod.DATASETS:
        names = ", ".join(data_mod.DATASETS)
        raise ValueError(f"pool {text!r}: unknown dataset {parts[0]!r}; expected one of {names}")
    return PoolSpec(parts[1], dataset=parts[0], size=_count(text, parts[2]))


def _count(text: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value.strip()) or int(value) < 1:
        raise ValueError(f"pool {text!r}: N must be a whole number >= 1, got {value!r}")
    return int(value)


def victim_images(victim: Victim | VictimImages | Mapping[str, Any]) -> VictimImages:
    """The VictimImages of a Victim (its metadata says what it held out), of a victim's
    description (a dict such as Victim.info() or its JSON sidecar), or of a VictimImages."""
    if isinstance(victim, VictimImages):
        return victim
    info = victim.info() if isinstance(victim, Victim) else victim
    shape = tuple(int(s) for s in info.get("input_shape") or ())
    if len(shape) != 3:
        raise ValueError(f"victim: input_shape should be (C, H, W), got {shape}")
    held = (int(info.get(key) or 0) for key in ("validation_images", "pool_images"))
    return VictimImages(shape, info.get("dataset"), *held)  # type: ignore[arg-type]


def load_pool(
    spec: str | PoolSpec,
    victim_info: Victim | VictimImages | Mapping[str, Any],
    *,
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
) -> Pool:
    """The pool `spec` names, for the victim `victim_info` (a Victim, a VictimImages or a
    victim's description): images of the victim's shape, a `seed`ed random subset of the
    allowed images. `data_root`: where the pool's dataset lives (megex.data.load)."""
    parsed = parse_pool(str(spec))  # a PoolSpec made by hand is checked too
    text, victim = str(parsed), victim_images(victim_info)
    c, h, w = victim.input_shape
    if c not in (1, 3) or h != w:
        raise ValueError(f"pool {text!r}: needs a square 1- or 3-channel victim, got {c}x{h}x{w}")
    if parsed.kind == "folder":
        images, positions = _folder(text, parsed, victim, seed), None
        description = f"{len(images):,} image files from {parsed.path}"
    else:
        images, positions, description = _from_dataset(text, parsed, victim, seed, data_root)
    images = _convert(images, victim.input_shape)
    digest = hashlib.sha256(images.tobytes()).hexdigest()  # of the uint8 (N, C, H, W) bytes
    tensor = torch.from_numpy(images).float().div_(255.0)
    return Pool(tensor, text, description, digest, parsed.kind, positions)


def _from_dataset(
    text: str, spec: PoolSpec, victim: VictimImages, seed: int, data_root: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images, their positions in the train split, a description) of a dataset pool."""
    name, own, kind, size = spec.dataset or "", victim.dataset, spec.kind, spec.size or 0
    if kind != "train" and name != own:
        raise ValueError(
            f"pool {text!r}: {kind} images come from the victim's own dataset "
            f"({own or 'unknown'}); for another dataset use {name}:train:N"
        )
    if kind == "train" and name == own:
        raise ValueError(
            f"pool {text!r}: {name} is the victim's own dataset; use {name}:unseen:N (images "
            f"it did not train on) or {name}:seen:N (images it trained on)"
        )
    if kind == "unseen" and victim.pool_images == 0:
        raise ValueError(
            f"pool {text!r}: the victim held out no pool images; train one with "
            "`megex train-victim --pool-images N`"
        )
    try:
        ds = data_mod.load(name, data_root)
    except FileNotFoundError as err:
        raise data_mod.DatasetNotFound(f"pool {text!r}: {err}") from None
    n, v, p = len(ds.x_train), victim.validation_images, victim.pool_images
    trained = n - v - p  # positions [0, trained) are the images the victim trained on
    same_source = own is not None and _source(name) == _source(own)
    if same_source and trained < 1:
        raise ValueError(f"pool {text!r}: the victim holds out {v + p} of {n} training images")
    title = _TITLES.get(name, name)
    if kind == "unseen":
        start, stop, region = trained, n - v, "the victim's held-out pool"
        what = f"{title} training images the victim did not train on (held out for attackers)"
    elif kind == "seen":
        start, stop, region = 0, trained, "the victim's training images"
        what = f"{title} training images the victim trained on"
    elif same_source:  # the victim's images at another size: stay before its held-out ones
        start, stop, region = 0, trained, f"{name}'s images the victim trained on"
        shape = "x".join(map(str, ds.input_shape))
        what = f"images the victim trained on, at another size or colour ({name}, {shape})"
    else:
        start, stop, region = 0, n, f"{name}'s train split"
        what = f"{title} training images (another dataset than the victim's)"
    positions = start + _subset(text, stop - start, size, region, seed)
    if ds.input_shape != victim.input_shape:
        what += f", converted to {'x'.join(map(str, victim.input_shape))}"
    return ds.x_train[positions], positions, f"{size:,} {what}"


def _source(name: str) -> str:
    return VARIANTS[name].source if name in VARIANTS else name


def _subset(text: str, available: int, size: int, region: str, seed: int) -> np.ndarray:
    """`size` of range(available), seeded; a permutation's start, so pools nest."""
    if size > available:
        raise ValueError(f"pool {text!r}: asks for {size:,} images; {region} holds {available:,}")
    return np.random.default_rng(seed).permutation(available)[:size]


def _folder(text: str, spec: PoolSpec, victim: VictimImages, seed: int) -> np.ndarray:
    """uint8 (N, C, H, W) images read from the image files of a folder (not its subfolders)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"pool {text!r}: image files need Pillow: pip install pillow") from exc
    folder = Path(spec.path)  # type: ignore[arg-type]
    if not folder.is_dir():
        raise FileNotFoundError(f"pool {text!r}: no folder at {folder}")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"pool {text!r}: no .png, .jpg or .jpeg files directly in {folder}")
    if spec.size is not None:
        files = [files[i] for i in _subset(text, len(files), spec.size, str(folder), seed)]
    c, h, w = victim.input_shape
    images = np.empty((len(files), c, h, w), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as image:
                if image.size != (w, h):
                    raise ValueError(
                        f"pool {text!r}: {file} is {image.size[0]}x{image.size[1]} (width x "
                        f"height), expected {w}x{h} like the victim's input"
                    )
                pixels = np.asarray(image.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        except OSError as err:  # not an image, or a truncated one
            raise ValueError(f"pool {text!r}: cannot read {file} as an image ({err})") from None
        images[i] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    return images


def _convert(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 images resized to the victim's height and width, then to its channels."""
    c, h, w = shape
    if images.shape[2:] != (h, w):
        images = resize(images, h)  # square (load_pool checks)
    if images.shape[1] == 3 and c == 1:
        images = np.rint(images.mean(axis=1, keepdims=True)).astype(np.uint8)
    elif images.shape[1] == 1 and c == 3:
        images = np.repeat(images, 3, axis=1)
    return np.ascontiguousarray(images)
