"""How each dataset's victim is trained (architecture, epochs, learning rate) and the test
accuracy its recipe is documented to reach; and where a trained victim is cached."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RECIPES", "Recipe", "cached_victim_path", "recipe_arch"]


@dataclass(frozen=True)
class Recipe:
    """How to train a victim: the settings, and the test accuracy it is documented to reach."""

    arch: str
    epochs: int
    lr: float
    batch_size: int = 128
    weight_decay: float = 5e-4
    expected_accuracy: float = 0.0


# expected_accuracy: measured on 2 CPU cores with seed 0 (megex train-victim).
RECIPES: dict[str, Recipe] = {
    "digits": Recipe("small_cnn", epochs=40, lr=0.05, batch_size=64, expected_accuracy=0.97),
    "fashion-mnist": Recipe("lenet5", epochs=12, lr=0.05, expected_accuracy=0.89),
    # Fashion-MNIST at other sizes and in colour (megex.variants): the same recipe, LeNet-5's
    # first fully connected layer as wide as the image makes its last feature map.
    # Seed 0 with 5,000 validation images held out, one thread: 85.7%, 92.2% and 95.9%.
    "fashion-mnist-14": Recipe("lenet5", epochs=12, lr=0.05, expected_accuracy=0.85),
    "fashion-mnist-56": Recipe("lenet5", epochs=12, lr=0.05, expected_accuracy=0.92),
    "fashion-mnist-colour-56": Recipe("lenet5", epochs=12, lr=0.05, expected_accuracy=0.95),
    "mnist": Recipe("lenet5", epochs=8, lr=0.05, expected_accuracy=0.98),
    "svhn": Recipe("resnet34_8x", epochs=30, lr=0.1, expected_accuracy=0.95),
    "cifar10": Recipe("resnet34_8x", epochs=200, lr=0.1, expected_accuracy=0.94),
}


def recipe_arch(dataset: str, arch: str | None = None) -> str:
    """`arch`, or the architecture of `dataset`'s recipe (lenet5 where it has none)."""
    recipe = RECIPES.get(dataset)
    return arch or (recipe.arch if recipe else "lenet5")


def cached_victim_path(
    folder: str | os.PathLike,
    dataset: str,
    arch: str | None,
    seed: int,
    validation_images: int,
    pool_images: int = 0,
) -> Path:
    """Where megex.victim.cached_victim keeps a recipe's victim: named by dataset,
    architecture, seed and held-out images (validation, then pool), so that two recipes
    never share a file. A count of 0 adds nothing to the name."""
    held = f"-val{validation_images}" if validation_images else ""
    held += f"-pool{pool_images}" if pool_images else ""
    return Path(folder) / f"{dataset}-{recipe_arch(dataset, arch)}-seed{seed}{held}.safetensors"
