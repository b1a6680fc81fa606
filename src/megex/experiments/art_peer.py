"""A public peer for the knockoff attack: the Adversarial Robustness Toolbox's KnockoffNets.

ART's `KnockoffNets` (`art.attacks.extraction.KnockoffNets`, Orekondy et al., CVPR 2019) is
run here on a megex victim with an attacker's pool of unlabelled images and a query budget,
so that our own knockoff attack can be set beside a public implementation on the same
victim, pool and budget. What ART does:

- random sampling (`sampling="random"`, the default): `nb_stolen` (= `budget`) images are
  drawn from the pool without replacement (numpy's global random state), the victim is asked
  about each of them once, in batches of `batch_size_query`, and the thief is then trained
  for `nb_epochs` epochs on those `budget` (image, answer) pairs with the thief's own
  optimiser (`PyTorchClassifier.fit`: shuffled batches of `batch_size_fit`, no learning-rate
  schedule, no augmentation). Every query is paid for before the first training step: it is
  "query a random subset of the pool, then train on the answers", nothing adaptive.
- adaptive sampling (`sampling="adaptive"`): a gradient bandit over the pool's classes (which
  needs the attacker's own labels for the pool, `pool_labels`: a labelled pool, a stronger
  attacker) picks a class, one image of that class is drawn at random (with replacement), the
  victim answers it, and the thief takes one epoch on that single image; `budget` rounds,
  then `nb_epochs` epochs on everything collected. This mode always trains on the victim's
  top-1 labels: ART ignores `use_probability` there.

With `use_probability=True` ART trains the thief on whatever the victim classifier's
`predict` returns. ART's `PyTorchClassifier.predict` returns the wrapped module's output as
it is, so a victim that returns logits would be "answered" with logits and the thief would
stay at chance without any error. The victim is therefore wrapped here in a module that
returns softmax probabilities and counts every image it is shown (`victim_images_seen`:
ART's own count of queries is not taken on trust).

The thief is a `PyTorchClassifier` with `torch.nn.CrossEntropyLoss` and Adam. For that loss
ART passes non-one-hot targets through unchanged (`reduce_labels`), and torch's
cross-entropy with probability targets is the soft cross-entropy
``-sum_k p_k log softmax(z)_k``, averaged over the batch; one-hot targets (labels only, or
saturated answers) are reduced to class indices, which is the same loss.

ART is an optional dependency (``pip install 'megex[art]'``); it is imported only when the
peer runs.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..evaluate import agreement
from ..evaluate import predict as predict_labels
from ..models import build_classifier

__all__ = ["SAMPLING", "art_knockoff"]

SAMPLING = ("random", "adaptive")


class _CountingProbabilities(nn.Module):
    """The victim as ART sees it: softmax probabilities, every image counted.

    Also keeps the smallest and largest row sum it has returned, so that a caller can check
    that ART was given probabilities and not logits.
    """

    def __init__(self, victim: nn.Module):
        super().__init__()
        self.victim = victim
        self.images_seen = 0
        self.seconds = 0.0
        self.row_sum_min = math.inf
        self.row_sum_max = -math.inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        self.images_seen += int(x.shape[0])
        probabilities = torch.softmax(self.victim(x).float(), dim=1)
        sums = probabilities.sum(dim=1)
        if sums.numel():
            self.row_sum_min = min(self.row_sum_min, float(sums.min()))
            self.row_sum_max = max(self.row_sum_max, float(sums.max()))
        self.seconds += time.perf_counter() - start
        return probabilities


def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def _images(name: str, x: Any, input_shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name}: expected a float torch.Tensor of images, got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"{name}: expected images of shape (N, {', '.join(map(str, input_shape))}) as the "
            f"victim takes, got {tuple(x.shape)}"
        )
    if len(x) == 0:
        raise ValueError(f"{name}: no images")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError(f"{name}: images must be finite values in [0, 1]")
    return x.detach().float().cpu()


def _labels(name: str, y: Any, count: int, num_classes: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D integer torch.Tensor of class indices")
    if len(y) != count:
        raise ValueError(f"{name}: {len(y)} labels for {count} images")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name}: class indices must lie in [0, {num_classes})")
    return y.detach().long().cpu()


def art_knockoff(
    victim: nn.Module,
    pool_images: torch.Tensor,
    budget: int,
    *,
    clone_arch: str,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    sampling: str = "random",
    use_probability: bool = True,
    pool_labels: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Run ART's KnockoffNets on `victim` with `pool_images` and `budget` queries.

    victim: a :class:`megex.victim.Victim` (or any module with `input_shape` and
    `num_classes` that maps [0, 1] images to logits); ART is shown its softmax probabilities.
    pool_images: the attacker's unlabelled images, float32 in [0, 1], (N, C, H, W).
    budget: ART's `nb_stolen`, the number of images the victim is asked about; with random
    sampling ART draws that many distinct pool images, so it may not exceed the pool.
    clone_arch: the thief, built by :func:`megex.models.build_classifier` for the victim's
    input shape and classes, trained by ART with Adam at `lr` and cross-entropy (soft targets
    when `use_probability`), `epochs` epochs in batches of `batch_size` (also the query
    batch). pool_labels: the attacker's labels for the pool, needed (only) by
    `sampling="adaptive"`. x_test, y_test: labelled images for clone accuracy and fidelity
    (agreement with the victim's labels); read after the attack, never by it.

    Returns a JSON-able dict: clone_accuracy, fidelity, victim_accuracy, queries (the budget),
    victim_images_seen (counted by the wrapper around the victim), answer_row_sums (the
    smallest and largest sum of an answer given to ART: 1 for probabilities), wall_s (ART's
    extraction: queries and training), victim_s, s_per_1k_queries, settings, art_version.
    Torch and numpy's global random state are seeded with `seed` (ART draws from numpy's).
    """
    if not isinstance(victim, nn.Module):
        raise ValueError(f"victim: expected a torch.nn.Module, got {type(victim).__name__}")
    input_shape = tuple(getattr(victim, "input_shape", ()) or ())
    num_classes = getattr(victim, "num_classes", None)
    if len(input_shape) != 3 or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            "victim: expected a megex Victim (with input_shape (C, H, W) and num_classes >= 2)"
        )
    pool = _images("pool_images", pool_images, input_shape)
    budget = _whole("budget", budget, 1)
    seed = _whole("seed", seed, 0)
    epochs = _whole("epochs", epochs, 1)
    batch_size = _whole("batch_size", batch_size, 1)
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    if sampling not in SAMPLING:
        raise ValueError(f"sampling: expected one of {', '.join(SAMPLING)}, got {sampling!r}")
    if not isinstance(use_probability, bool):
        raise ValueError(f"use_probability: expected True or False, got {use_probability!r}")
    if not isinstance(clone_arch, str):
        raise ValueError(f"clone_arch: expected a classifier name, got {clone_arch!r}")
    x_eval = _images("x_test", x_test, input_shape)
    y_eval = _labels("y_test", y_test, len(x_eval), num_classes)
    if sampling == "random":
        if pool_labels is not None:
            raise ValueError("pool_labels: random sampling does not use labels; leave it None")
        if budget > len(pool):
            raise ValueError(
                f"budget: ART's KnockoffNets with random sampling queries `budget` distinct "
                f"pool images (nb_stolen, drawn without replacement), so the budget may not "
                f"exceed the pool: got {budget} for {len(pool)} images"
            )
        labels_np = None
    else:
        if pool_labels is None:
            raise ValueError(
                "pool_labels: adaptive sampling picks images by the attacker's own class "
                "labels for the pool; give one label per pool image"
            )
        labels = _labels("pool_labels", pool_labels, len(pool), num_classes)
        # ART numbers its bandit's actions 0..k-1 and draws action a from the images labelled
        # a: a class missing below the largest present would leave an action with no image.
        present = sorted(set(labels.tolist()))
        if present != list(range(len(present))):
            raise ValueError(
                f"pool_labels: adaptive sampling needs the classes 0..k-1 all present, got "
                f"{present}"
            )
        labels_np = labels.numpy()
    # Seeded, and built (its name checked) before ART is imported: a bad name is a ValueError.
    torch.manual_seed(seed)
    np.random.seed(seed)
    c, h, _ = input_shape
    thief = build_classifier(clone_arch, num_classes, c, h)

    try:
        import art
        from art.attacks.extraction import KnockoffNets
        from art.estimators.classification import PyTorchClassifier
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "art_knockoff needs the Adversarial Robustness Toolbox: pip install 'megex[art]'"
        ) from err

    try:
        device = next(victim.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    device_type = "gpu" if device.type == "cuda" else "cpu"
    answers = _CountingProbabilities(victim)
    # The victim's loss is never used (ART only calls its predict); the constructor needs one.
    victim_art = PyTorchClassifier(
        model=answers,
        loss=nn.CrossEntropyLoss(),
        input_shape=input_shape,
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type=device_type,
    )
    thief_art = PyTorchClassifier(
        model=thief,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(thief.parameters(), lr=float(lr)),
        input_shape=input_shape,
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type=device_type,
    )
    attack = KnockoffNets(
        classifier=victim_art,
        batch_size_fit=batch_size,
        batch_size_query=batch_size,
        nb_epochs=epochs,
        nb_stolen=budget,
        sampling_strategy=sampling,
        use_probability=use_probability,
        verbose=False,
    )
    was_training = victim.training
    start = time.perf_counter()
    try:
        attack.extract(x=pool.numpy(), y=labels_np, thieved_classifier=thief_art)
    finally:
        wall_s = time.perf_counter() - start
        victim.train(was_training)

    clone = thief.to(device).eval()
    victim_labels = predict_labels(victim, x_eval)
    clone_labels = predict_labels(clone, x_eval)
    steps_per_epoch = math.ceil(budget / batch_size)
    soft = use_probability and sampling == "random"
    return {
        "attack": "ART KnockoffNets",
        "clone_accuracy": agreement(clone_labels, y_eval),
        "fidelity": agreement(clone_labels, victim_labels),
        "victim_accuracy": agreement(victim_labels, y_eval),
        "queries": budget,
        "victim_images_seen": answers.images_seen,
        "answer_row_sums": [answers.row_sum_min, answers.row_sum_max],
        "wall_s": round(wall_s, 3),
        "victim_s": round(answers.seconds, 3),
        "s_per_1k_queries": round(wall_s / budget * 1000.0, 3),
        "settings": {
            "clone_arch": clone_arch,
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": float(lr),
            "optimizer": "adam",
            # Adaptive sampling always trains on top-1 labels (ART ignores use_probability).
            "loss": "cross-entropy (soft targets)" if soft else "cross-entropy (labels)",
            "sampling": sampling,
            "use_probability": use_probability,
            "pool_size": len(pool),
            "test_images": len(x_eval),
            # Random sampling: `epochs` passes over the `budget` answers. Adaptive: one step
            # per query, then the final epochs.
            "fit_steps": epochs * steps_per_epoch + (budget if sampling == "adaptive" else 0),
            "device": str(device),
        },
        "art_version": art.__version__,
    }
