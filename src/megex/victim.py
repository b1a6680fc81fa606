"""Victim = a classifier + its input normalisation + metadata; training; save and load.

A victim takes float32 images in [0, 1] of shape (N, C, H, W) and returns logits.
Normalisation happens inside, so nothing outside needs to know the victim's mean and std.
Weights are stored as safetensors with a JSON sidecar; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as data_mod
from .evaluate import accuracy
from .evaluate import predict as predict_labels
from .models import build_classifier
from .recipes import RECIPES, Recipe, cached_victim_path, recipe_arch
from .runs import read_weights_description, save_described_weights

__all__ = ["Victim", "RECIPES", "Recipe", "cached_victim", "train_victim", "sidecar_path"]


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix(".json")


class Victim(nn.Module):
    """A classifier over [0, 1] images with its normalisation and metadata."""

    def __init__(
        self,
        model: nn.Module,
        input_shape: tuple[int, int, int],
        num_classes: int,
        mean: tuple[float, ...] | float = 0.0,
        std: tuple[float, ...] | float = 1.0,
        arch: str | None = None,
        dataset: str | None = None,
        accuracy: float | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape: expected (C, H, W), got {tuple(input_shape)}")
        channels = int(input_shape[0])
        mean_t = _per_channel("mean", mean, channels)
        std_t = _per_channel("std", std, channels)
        if (std_t <= 0).any():
            raise ValueError(f"std: every value must be > 0, got {std_t.tolist()}")
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)
        self.arch = arch
        self.dataset = dataset
        self.accuracy = accuracy
        self.metadata = dict(metadata or {})

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        input_shape: tuple[int, int, int],
        num_classes: int,
        mean: tuple[float, ...] | float = 0.0,
        std: tuple[float, ...] | float = 1.0,
        **metadata: Any,
    ) -> Victim:
        """Wrap any user `nn.Module` that maps normalised images to logits."""
        victim = cls(module, input_shape, num_classes, mean, std, metadata=metadata)
        with torch.no_grad():
            was_training = module.training
            module.eval()
            out = victim(torch.zeros(1, *victim.input_shape))
            module.train(was_training)
        if out.shape != (1, num_classes):
            raise ValueError(
                f"module: on one image of shape {victim.input_shape} it returned "
                f"{tuple(out.shape)}, expected (1, {num_classes}) logits"
            )
        return victim.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Predicted labels for [0, 1] images, in eval mode, batched."""
        return predict_labels(self, x, batch_size)

    def info(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "dataset": self.dataset,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "accuracy": self.accuracy,
            **self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (.safetensors, described in its metadata) and a JSON sidecar."""
        if self.arch is None:
            raise ValueError(
                "save: this victim wraps a custom module (arch is None); save that module "
                "yourself and wrap it again with Victim.from_module"
            )
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_described_weights(path, self.model, self.info())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str = "cpu") -> Victim:
        """Load a victim written by :meth:`save` (safetensors + JSON sidecar)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file() and path.with_name(path.name + ".safetensors").is_file():
            path = path.with_name(path.name + ".safetensors")
        if not path.is_file():
            raise FileNotFoundError(f"victim: no file at {path}")
        try:
            info = read_weights_description(path)
        except ValueError as err:
            raise ValueError(f"victim: {err}") from None
        side = sidecar_path(path)
        if info is None:
            if not side.is_file():
                raise FileNotFoundError(f"victim: {path} has no JSON sidecar at {side}")
            info = json.loads(side.read_text())
        for key in ("arch", "input_shape", "num_classes"):
            if key not in info:
                raise ValueError(f"victim: the description of {path} lacks {key!r}")
        c, h, _ = info["input_shape"]
        model = build_classifier(info["arch"], info["num_classes"], c, h)
        try:
            model.load_state_dict(load_file(str(path), device=map_location))
        except RuntimeError as err:
            raise ValueError(
                f"victim: the weights in {path} do not fit {info['arch']} with input "
                f"{info['input_shape']} and {info['num_classes']} classes ({err})"
            ) from None
        extra = {
            k: v
            for k, v in info.items()
            if k not in {"arch", "dataset", "input_shape", "num_classes", "mean", "std", "accuracy"}
        }
        victim = cls(
            model,
            tuple(info["input_shape"]),
            info["num_classes"],
            tuple(info.get("mean", [0.0])),
            tuple(info.get("std", [1.0])),
            arch=info["arch"],
            dataset=info.get("dataset"),
            accuracy=info.get("accuracy"),
            metadata=extra,
        )
        return victim.eval()


def _per_channel(name: str, value, channels: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise ValueError(f"{name}: expected 1 or {channels} values, got {t.numel()}")
    return t


# --- training ---------------------------------------------------------------------------


def train_victim(
    dataset: str | data_mod.Dataset,
    arch: str | None = None,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = True,
    validation_images: int = 0,
    pool_images: int = 0,
) -> Victim:
    """Train a victim on a named dataset with its recipe (any setting can be overridden).

    SGD with momentum 0.9, Nesterov, a one-cycle learning rate, and for images larger than
    8x8 a random shift of up to 2 pixels per batch (circular: pixels leaving one edge come
    back at the other, harmless on these images' plain borders). `validation_images`: the
    last that many training images are held out (`Dataset.validation_tensors` gives them).
    `pool_images`: that many training images before those are held out too, for an
    attacker's pool of images the victim never saw (`megex.pools`, `DATASET:unseen:N`).
    Returns the victim in eval mode with its test accuracy set.
    """
    ds = dataset if isinstance(dataset, data_mod.Dataset) else data_mod.load(dataset, data_root)
    _check_held_out(validation_images, pool_images, len(ds.x_train))
    ds = ds.without_validation(validation_images + pool_images)
    recipe = _resolved_recipe(ds.name, arch, epochs, lr, batch_size)

    torch.manual_seed(seed)
    # The training images stay uint8 and each batch is converted on its own (the same values
    # as converting them all first): 3x56x56 images would take 2 GB as float32.
    x_train = torch.from_numpy(ds.x_train)
    y_train = torch.from_numpy(ds.y_train).long()
    x_test, y_test = ds.test_tensors()
    mean, std = _channel_statistics(ds.x_train)
    c, h, _ = ds.input_shape
    arch = recipe.arch
    model = build_classifier(arch, ds.num_classes, c, h)
    victim = Victim(model, ds.input_shape, ds.num_classes, mean, std, arch=arch, dataset=ds.name)
    victim.to(device)
    start = time.time()
    bar = _progress(recipe.epochs, progress, f"train {arch} on {ds.name}")
    _fit(victim, x_train, y_train, recipe, seed, h > 8, device, bar)
    victim.eval()
    victim.accuracy = accuracy(victim, x_test, y_test)
    victim.metadata.update(
        {
            "epochs": recipe.epochs,
            "lr": recipe.lr,
            "seed": seed,
            "validation_images": validation_images,
            "pool_images": pool_images,
            "train_seconds": round(time.time() - start, 1),
        }
    )
    return victim.cpu()


def _check_held_out(validation_images: int, pool_images: int, available: int) -> None:
    """Both counts are whole numbers >= 0 that leave at least one training image."""
    for name, value in (("validation_images", validation_images), ("pool_images", pool_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a whole number >= 0, got {value!r}")
    if validation_images + pool_images >= available:
        raise ValueError(
            f"validation_images ({validation_images}) + pool_images ({pool_images}) leave no "
            f"training images: the train split has {available}"
        )


def _resolved_recipe(
    name: str, arch: str | None, epochs: int | None, lr: float | None, batch_size: int | None
) -> Recipe:
    """The dataset's recipe with the settings given in place of its own; checked."""
    recipe = RECIPES.get(name, Recipe(arch or "lenet5", epochs=10, lr=0.05))
    arch = arch or recipe.arch
    epochs = recipe.epochs if epochs is None else epochs
    lr = recipe.lr if lr is None else lr
    batch_size = recipe.batch_size if batch_size is None else batch_size
    for setting, value in (("epochs", epochs), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"{setting}: expected >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr: expected > 0, got {lr}")
    return replace(recipe, arch=arch, epochs=epochs, lr=lr, batch_size=batch_size)


def _fit(
    victim: Victim,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    recipe: Recipe,
    seed: int,
    shift: bool,
    device: str,
    bar: Any,
) -> None:
    """The recipe's epochs of SGD (Nesterov momentum, one-cycle learning rate) over uint8
    images in a random order, each batch shifted at random if `shift`."""
    lr, batch_size = recipe.lr, recipe.batch_size
    opt = torch.optim.SGD(
        victim.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
    )
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(recipe.epochs):
        victim.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            xb, yb = x_train[idx].float().div_(255.0), y_train[idx]
            if shift:
                xb = _random_shift(xb, gen)
            loss = nn.functional.cross_entropy(victim(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()


def _channel_statistics(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (floored at 1e-3) of uint8 images in [0, 1].

    One channel at a time, so that the float copy is a third of a colour split's. For one
    channel this is the very computation on the very tensor of converting the whole split;
    for three, a mean may differ from the all-channel reduction's in its last float32 digit.
    """
    means, stds = [], []
    for c in range(images.shape[1]):
        channel = torch.from_numpy(images[:, c : c + 1]).float().div_(255.0)
        means.append(float(channel.mean(dim=(0, 2, 3))[0]))
        stds.append(float(channel.std(dim=(0, 2, 3)).clamp_min(1e-3)[0]))
    return means, stds


def cached_victim(
    folder: str | os.PathLike,
    dataset: str,
    arch: str | None = None,
    *,
    seed: int = 0,
    validation_images: int = 0,
    pool_images: int = 0,
    data_root: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = False,
    log: Any = print,
) -> tuple[Victim, Path]:
    """The victim of a recipe and seed, loaded from `folder`, or trained and saved there.

    The file is named by dataset, architecture, seed and held-out images (validation and
    pool, see :func:`train_victim`), so that two recipes never share a file. `log` gets one
    line saying which it was.
    """
    recipe = RECIPES.get(dataset)
    arch = recipe_arch(dataset, arch)
    path = cached_victim_path(folder, dataset, arch, seed, validation_images, pool_images)
    if path.is_file():
        victim = Victim.load(path)
        log(f"victim: {path} ({arch}, test accuracy {victim.accuracy:.4f})")
        return victim, path
    log(f"victim: training {arch} on {dataset}, seed {seed} (cached afterwards at {path})")
    victim = train_victim(
        dataset,
        arch,
        seed=seed,
        data_root=data_root,
        device=device,
        progress=progress,
        validation_images=validation_images,
        pool_images=pool_images,
    )
    victim.save(path)
    log(f"victim: test accuracy {victim.accuracy:.4f}, {victim.metadata['train_seconds']} s")
    if recipe is not None and victim.accuracy < recipe.expected_accuracy:
        log(
            f"victim: warning: below the recipe's documented {recipe.expected_accuracy:.2f}; "
            "clone ratios are relative to this victim"
        )
    return victim, path


def _random_shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translations of up to `pad` pixels (one offset per batch keeps it cheap)."""
    dx, dy = torch.randint(-pad, pad + 1, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", leave=False)
