"""The query-efficiency benchmark's config file: every key, its default, rule and help.

The CPU-scale Fashion-MNIST setting by default (LeNet-5 victims and clone); the files under
benchmarks/configs/ change some keys (another dataset, budgets, methods). Method names are
checked against the registry (megex.experiments.methods) when the config is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...data import DATASETS
from ...models import CLASSIFIERS
from ...settings import COUNT, Choice, Each, Fractions, Mapping, Number, OrNone, Text, setting
from .. import config as config_files

__all__ = ["DEFAULTS", "QueryEfficiencyConfig"]

BUDGETS = Each(COUNT)
SEEDS = Each(Number(0, whole=True))
NAMES = Each(Text())


@dataclass(frozen=True)
class QueryEfficiencyConfig:
    """The keys of a `megex bench --config` file."""

    dataset: str = setting("fashion-mnist", "the victims' dataset", Choice(DATASETS))
    victim_arch: str | None = setting(
        None,
        "the victims' architecture; null: the dataset's recipe (lenet5 for Fashion-MNIST)",
        OrNone(Choice(tuple(CLASSIFIERS))),
    )
    victim_seeds: list = setting([0, 1, 2], "victims: recipe seeds", SEEDS)
    seeds: list = setting([0, 1, 2], "attack seeds (the same for every method)", SEEDS)
    # Held out of every victim's training; what the tuning search measures on. The test
    # split is read by this table alone.
    validation_images: int = setting(
        5000, "the last training images, held out of the victims' training", COUNT
    )
    # Up to 250k: 9 methods x 9 runs fit about a working day on 2 cores (500k would double it).
    pool: str | None = setting(
        None,
        "the attacker's images (megex.pools spec, e.g. 'fashion-mnist:unseen:1000'; each "
        "attack seed draws its own); null: data-free",
        OrNone(Text()),
    )
    pool_images: int = setting(
        0,
        "training images the victims hold out for attackers' pools (before the validation "
        "images): what an 'unseen' pool draws from",
        Number(0, whole=True),
    )
    budgets: list = setting([50_000, 100_000, 250_000], "query budgets reported", BUDGETS)
    # From 1k: the leakage curve (benchmarks/configs/leakage.json) can read these runs too.
    eval_at: list = setting(
        [1_000, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 75_000, 150_000,
         200_000],
        "evaluations besides the budgets, for the queries needed to reach a target",
        BUDGETS,
    )  # fmt: skip
    methods: list = setting(
        ["megex-all", "megex-predicted", "megex-smoothgrad", "megex-jacobian",
         "megex-jacobian-predicted", "dfme", "dfme-paper"],
        "methods compared (data-free, no prior)",
        NAMES,
    )  # fmt: skip
    assumption_methods: list = setting(
        ["megex-all+prior", "dfme+prior"],
        "methods with an assumption about the domain, in a table of their own",
        NAMES,
    )
    baseline: str = setting("dfme", "the predictions-only method differences are against", Text())
    targets: list = setting([0.8, 0.9], "fractions of the victim's accuracy to reach", Fractions())
    # 6 methods x 1 run to 75k: 6 minutes on 2 idle cores with the searched settings.
    quick_budgets: list = setting([25_000, 75_000], "budgets under --quick", BUDGETS)
    quick_seeds: list = setting([0], "attack seeds under --quick", SEEDS)
    quick_victim_seeds: list = setting([0], "victims under --quick", SEEDS)
    settings: dict = config_files.shared_settings()
    tuned_settings: str | None = setting(
        "benchmarks/results/tuning/tuned.json",
        "the search's output (megex tune); null: the package defaults, untuned",
        OrNone(Text()),
    )
    search: dict | None = setting(
        None,
        'a search of this config\'s own ({"methods": [...], "trials": N, "budget": B}), which '
        "megex input-size runs before the benchmark (which checks it); null: none",
    )
    method_settings: dict = setting(
        {}, "per method, settings over the shared and searched ones", Mapping()
    )
    device: str = setting("cpu", "cpu or cuda", Text())


DEFAULTS = config_files.defaults(QueryEfficiencyConfig)
