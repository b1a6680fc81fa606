"""The trade-off's config file: every key, its default, rule and help.

Defence rows are lists of defence specs (megex.defenses); each is built, and so checked, when
the grid is planned. Method names are checked against the registry when the config is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...data import DATASETS
from ...models import CLASSIFIERS
from ...settings import COUNT, Choice, Each, Mapping, Number, OrNone, Text, setting
from .. import config as config_files

__all__ = ["DEFAULTS", "TradeoffConfig"]

SEEDS = Each(Number(0, whole=True))
BUDGETS = Each(COUNT)
# The defences of the full grid, one row each; [] is the undefended row.
ROWS = [
    [], ["gaussian:0.5"], ["gaussian:2"], ["laplace:1"], ["quantize:bits=2"],
    ["quantize:bits=4"], ["sign"], ["topk:0.1"], ["topk:0.01"], ["coarsen:4"], ["smooth"],
    ["predicted-only"], ["withhold:0.5"], ["withhold:0.9"], ["round:1"], ["label-only"],
    ["reverse-sigmoid"],
]  # fmt: skip


@dataclass(frozen=True)
class TradeoffConfig:
    """The keys of a `megex tradeoff --config` file."""

    dataset: str = setting("fashion-mnist", "the victims' dataset", Choice(DATASETS))
    victim_arch: str | None = setting(
        None, "the victims' architecture; null: the recipe's", OrNone(Choice(tuple(CLASSIFIERS)))
    )
    victim_seeds: list = setting([0, 1], "victims: recipe seeds", SEEDS)
    seeds: list = setting([0, 1], "attack seeds", SEEDS)
    validation_images: int = setting(
        5000, "the last training images, held out of the victims' training", COUNT
    )
    pool: str | None = setting(
        None,
        "the attackers' images (megex.pools spec; each attack seed draws its own); null: data-free",
        OrNone(Text()),
    )
    pool_images: int = setting(
        0, "training images the victims hold out for attackers' pools", Number(0, whole=True)
    )
    budgets: list = setting([20_000, 50_000], "query budgets (the largest is tabled)", BUDGETS)
    eval_at: list = setting([5_000, 10_000], "evaluations besides the budgets", BUDGETS)
    # MEGEX with maps of every class, and the strongest explanation attacker of the full
    # benchmark (megex-predicted: the largest, if not significant, lead over DFME).
    attackers: list = setting(
        ["megex-all", "megex-predicted"], "explanation attackers", Each(Text())
    )
    baseline: str = setting("dfme", "the predictions-only attacker", Text())
    defenses: list = setting(
        ROWS, "defence rows: each a list of defence specs a service applies, in order", Each(
            Each(Text())
        )
    )  # fmt: skip
    # Utility is measured on the predicted class's map, what a user of the service reads.
    utility_images: int = setting(500, "test images the utility is measured on", COUNT)
    utility_threshold: float = setting(
        0.5, "the cosine a defence must keep to count as keeping the maps useful", Number(0, 1)
    )
    quick: dict = setting(
        {"victim_seeds": [0], "seeds": [0], "budgets": [10_000], "eval_at": [5_000],
         "attackers": ["megex-all"], "defenses": [[], ["gaussian:2"], ["sign"]],
         "utility_images": 100},
        "the keys --quick replaces (the reduced grid)",
        Mapping(),
    )  # fmt: skip
    settings: dict = config_files.shared_settings()
    tuned_settings: str | None = setting(
        "benchmarks/results/tuning/tuned.json",
        "the search's output (megex tune); null: the package defaults, untuned",
        OrNone(Text()),
    )
    method_settings: dict = setting({}, "per method, settings over the others", Mapping())
    device: str = setting("cpu", "cpu or cuda", Text())


DEFAULTS = config_files.defaults(TradeoffConfig)
