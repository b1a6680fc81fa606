"""The detection benchmark's config file: every key, its default, rule and help.

Method names are checked against the registry (megex.experiments.methods) and monitor names
against megex.detection when the config is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...data import DATASETS
from ...models import CLASSIFIERS
from ...settings import COUNT, Choice, Each, Mapping, Number, OrNone, Text, setting
from .. import config as config_files

__all__ = ["BENIGN_KINDS", "DEFAULTS", "DetectionConfig"]

BENIGN_KINDS = ("clean", "noise", "augment")
SEEDS = Each(Number(0, whole=True))


@dataclass(frozen=True)
class DetectionConfig:
    """The keys of a `megex detection --config` file."""

    dataset: str = setting("fashion-mnist", "the victims' dataset", Choice(DATASETS))
    victim_arch: str | None = setting(
        None, "the victims' architecture; null: the recipe's", OrNone(Choice(tuple(CLASSIFIERS)))
    )
    victim_seeds: list = setting([0, 1, 2], "victims: recipe seeds", SEEDS)
    # Held out of every victim's training split (as in the query-efficiency benchmark):
    # the calibration streams draw from these, never from the test split.
    validation_images: int = setting(
        5000, "the last training images, held out of the victims' training", COUNT
    )
    methods: list = setting(
        ["megex-all", "megex-predicted", "megex-jacobian", "dfme"],
        "attack methods (megex bench's names)",
        Each(Text()),
    )
    seeds: list = setting([0, 1, 2, 3, 4], "attack seeds", SEEDS)
    pool: str | None = setting(
        None,
        "the images of the attacks with images (megex.pools spec; each attack seed draws its "
        "own); null: none",
        OrNone(Text()),
    )
    pool_images: int = setting(
        0, "training images the victims hold out for attackers' pools", Number(0, whole=True)
    )
    # The horizon of detection and of the false-positive rate. A benign stream draws
    # distinct images, so at most the pool.
    queries: int = setting(5000, "queries per stream, attack and benign alike", COUNT)
    benign_kinds: list = setting(
        list(BENIGN_KINDS), "benign clients' streams", Each(Choice(BENIGN_KINDS))
    )
    calibration_streams: int = setting(20, "calibration streams per kind and victim", COUNT)
    test_streams: int = setting(20, "test streams per kind and victim", COUNT)
    target_fpr: float = setting(
        0.05, "false-positive rate per key the thresholds are calibrated for", Number(
            0, 1, high_open=True
        )
    )  # fmt: skip
    noise_std: float = setting(0.1, "noise of the 'noise' benign streams", Number(0))
    augment: dict = setting(
        {"shift": 2, "flip": True, "brightness": [0.7, 1.3]},
        "the 'augment' benign streams' shifts, flips and brightness range",
        Mapping(),
    )
    monitors: dict = setting(
        {"prada": {}, "ood": {"score": "msp", "window": 100}},
        "monitor name -> its settings (the threshold is calibrated)",
        Mapping(),
    )
    # The attacks: the query-efficiency benchmark's shared settings; tuned ones only from a
    # settings file (null: the package defaults, with a warning).
    settings: dict = config_files.shared_settings()
    method_settings: dict = setting({}, "per method, settings over the others", Mapping())
    tuned_settings: str | None = setting(
        None, "megex tune's output; null: the package defaults", OrNone(Text())
    )
    device: str = setting("cpu", "cpu or cuda", Text())
    quick_queries: int = setting(2000, "queries per stream under --quick", COUNT)
    quick_seeds: list = setting([0, 1], "attack seeds under --quick", SEEDS)
    quick_victim_seeds: list = setting([0], "victims under --quick", SEEDS)
    quick_streams: int = setting(
        6, "calibration and test streams per kind and victim under --quick", COUNT
    )


DEFAULTS = config_files.defaults(DetectionConfig)
