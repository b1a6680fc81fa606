"""The interpretability-versus-stealing trade-off: what each defence costs and buys.

For each defence and strength (a list of defence specs, applied in order by the service):

- what it costs: the utility of the explanations the defended service returns, against the
  undefended ones, on real test images (megex.experiments.utility: cosine, rank correlation, top-k
  overlap, deletion and insertion AUC), and how much it moves the probabilities;
- what it buys: the clone accuracy of each explanation attacker, naive and adaptive
  (megex.attacks.adaptive and, for the attacker with images, megex.attacks.adaptive_pool:
  the attacker that knows the defence), and of the predictions-only attacker (DFME), at
  fixed budgets, over several victims and attack seeds, under the benchmark's fair protocol
  (its shared settings, the tuned settings file, equal clone updates per query).

An explanation attacker "leads" when, without a defence, the paired difference attacker
minus DFME (same victim, same seed) at the largest budget is measurably above 0 (both its
bootstrap and its t interval exclude 0: stats.paired_difference). A defence "stops" a
leading attacker when neither its naive nor its adaptive variant is measurably ahead of DFME
under the defence; the table shows the stronger variant by mean ("counted": an adaptation
may not help), and what the defence took from each attacker (its accuracy minus its own
undefended runs, paired). A defence "keeps utility" when the mean cosine of its maps to the
undefended maps is at least `utility_threshold`. The report names the defences that do
both; where no attacker leads, there is nothing to stop and it names none, and says so.

Explanation defences do not change what DFME is answered (it asks for no maps): DFME runs
once without a defence and under each prediction defence, and its undefended runs stand for
it in the rows of explanation defences. An adaptive attacker whose settings equal the naive
one's (nothing to adapt to, or nothing that applies to it: the attacker with images has no
generator to steer when maps are withheld) is the naive run, not run twice.

Runs are the benchmark's run folders (megex.experiments.runner.run_one; a defence list in
the job), so an interrupted grid resumes; they are spread by megex.experiments.sweep
(processes or Ray). Writes
<out>/tradeoff[_quick].json, .md and .png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ... import data as data_mod
from ...attacks import ATTACKS, adapt_to, applicable_settings
from ...defenses import build_defense
from ...explain import Explanation
from ...runs import write_json_atomic
from ...victim import Victim
from .. import config as config_files
from .. import sweep
from ..common import log
from ..methods import (
    apply_settings_file,
    check_methods,
    load_tuned,
    method_settings,
    one_run_per_budget,
    require_tuned,
)
from ..runner import get_victim, run_one
from ..utility import explanation_utility
from .config import DEFAULTS, TradeoffConfig
from .report import write_outputs
from .rows import ADAPTIVE, row_name, slug
from .summary import summarise

__all__ = [
    "ADAPTIVE",
    "ADAPTIVE_ATTACKS",
    "DEFAULTS",
    "TradeoffConfig",
    "configured",
    "load_config",
    "plan",
    "run_tradeoff",
]


# The attack that knows the defence, for each explanation attack that has one (the
# adaptive row of a method whose attack is the key).
ADAPTIVE_ATTACKS = {"megex": "megex-adaptive", "knockoff-maps": "knockoff-maps-adaptive"}


def load_config(path: str | os.PathLike | None, quick: bool = False) -> dict[str, Any]:
    """DEFAULTS updated by a JSON file's keys, then by its "quick" keys under --quick."""
    merged = ("settings", "method_settings", "quick")
    config = config_files.load(TradeoffConfig, path, merged)
    if quick:
        config_files.check_values(TradeoffConfig, config["quick"], f"{path or 'defaults'}: quick")
        config.update(config["quick"])
    check_methods([*config["attackers"], config["baseline"]])
    if not config["budgets"] or not config["defenses"]:
        raise ValueError("budgets and defenses: expected at least one of each")
    return config


def configured(args: Any) -> dict[str, Any]:
    """The trade-off's config as `args` set it: the --config file (its quick keys under
    --quick), then the --defense rows, budgets, seeds, victims, --device and the
    --settings-file."""
    config = load_config(args.config, args.quick)
    if args.defense:
        rows = [[s for s in row.split("+") if s] for row in args.defense]
        # A row given twice is one row: two would be two jobs writing one run folder.
        unique = list(dict.fromkeys(tuple(r) for r in rows if r))
        config["defenses"] = [[], *[list(r) for r in unique]]
    for key in ("budgets", "seeds", "victim_seeds"):
        if getattr(args, key, None):
            config[key] = sorted(set(getattr(args, key)))
    if args.device:
        config["device"] = args.device
    apply_settings_file(config, args.settings_file)
    return config


def _defenses(specs: list[str]) -> list[Any]:
    return [build_defense(s) for s in specs]


def _touches_predictions(defenses: list[Any]) -> bool:
    return any(d.side == "prediction" for d in defenses)


def runs_folder_name(args: Any) -> str:
    return "runs-quick" if getattr(args, "quick", False) else "runs"


def plan(config: dict[str, Any], args: Any, out: Path, victims: dict) -> list:
    """The runs of the grid (checked before any victim is trained)."""

    tuned = load_tuned(config)
    budgets = sorted(set(config["budgets"]))
    for method in [*config["attackers"], config["baseline"]]:
        require_tuned(config, method, tuned)
    progress = not args.no_progress and (args.jobs or 1) == 1 and not getattr(args, "ray", None)
    out = out.resolve()
    data_root = args.data_root and str(Path(args.data_root).resolve())
    jobs: list[dict[str, Any]] = []
    # A quick grid's runs are shorter: kept apart, so that the full grid never finds them.
    runs_folder = runs_folder_name(args)

    def add(method: str, attack: str, settings: dict[str, Any], specs: list[str]) -> None:
        if one_run_per_budget(attack, settings) and (len(budgets) > 1 or config["eval_at"]):
            raise ValueError(
                f"{method}: its clone learns after all of a run's queries, so a run measures "
                "one budget: give the trade-off one budget and no eval_at"
            )
        for victim_seed, victim in victims.items():
            for seed in config["seeds"]:
                jobs.append(
                    {
                        "method": method,
                        "defense_row": row_name(specs),
                        "defenses": list(specs),
                        "attack": attack,
                        "settings": settings,
                        "victim_seed": victim_seed,
                        "seed": seed,
                        "budget": max(budgets),
                        "budgets": budgets,
                        "eval_at": [b for b in config["eval_at"] if b < max(budgets)],
                        "name": f"{method} [{row_name(specs)}] victim {victim_seed} seed {seed}",
                        "run_dir": str(
                            out / runs_folder / f"{method}-{slug(specs)}-v{victim_seed}-s{seed}"
                        ),
                        "victim": str(Path(victim).resolve()),
                        "dataset": config["dataset"],
                        "pool": config["pool"],
                        "data_root": data_root,
                        "device": config["device"],
                        "threads": args.threads,
                        "fresh": args.fresh,
                        "progress": progress,
                    }
                )

    for specs in config["defenses"]:
        defenses = _defenses(specs)  # a bad spec fails here, before any training
        if not specs or _touches_predictions(defenses):
            attack, settings = method_settings(config, config["baseline"], tuned)
            add(config["baseline"], attack, settings, specs)
        for method in config["attackers"]:
            attack, settings = method_settings(config, method, tuned)
            if settings.get("lr_schedule", "constant") != "constant":
                raise ValueError(
                    f"{method}: every budget is read off one run: needs a constant lr_schedule"
                )
            add(method, attack, settings, specs)
            adaptive = ADAPTIVE_ATTACKS.get(attack)
            if adaptive is None:
                continue
            config_class = ATTACKS[adaptive].config_class
            adaptation = applicable_settings(config_class, adapt_to(defenses))
            if adaptation:
                add(method + ADAPTIVE, adaptive, {**settings, **adaptation}, specs)
    return jobs


def measure_utility(
    config: dict[str, Any], victims: dict[int, Path], data_root: str | None
) -> dict[str, dict[int, dict[str, float]]]:
    """Per defence row and victim, the mean of each utility measure
    (megex.experiments.utility) of the predicted class's map on the first `utility_images`
    test images: similarity to the undefended map, faithfulness, and how much the
    probabilities moved."""

    ds = data_mod.load(config["dataset"], data_root)
    images = ds.test_tensors()[0][: int(config["utility_images"])]
    rows = [specs for specs in config["defenses"] if specs]
    out: dict[str, dict[int, dict[str, float]]] = {}
    for victim_seed, path in victims.items():
        # Each victim its own draw of the defences' randomness (noise, withheld maps).
        measured = explanation_utility(
            Victim.load(path),
            images,
            rows,
            Explanation("gradient", target="predicted"),
            seed=victim_seed,
        )
        # Row 0 is the undefended service; then one row per defended one, in order.
        for specs, row in zip([[], *rows], measured["rows"]):
            out.setdefault(row_name(specs), {})[victim_seed] = {
                key: value["mean"]
                for key, value in row.items()
                if isinstance(value, dict) and "mean" in value
            }
    return out


def kept_utility(
    config: dict[str, Any], victims: dict[int, Path], data_root: str | None, path: Path
) -> dict[str, dict[int, dict[str, float]]]:
    """measure_utility's result, kept in `path` beside the runs: read back when it was
    measured on the same victims, images and defence rows (so that a table rebuilt from the
    run records needs no new measurement), else measured and written."""
    measured_on = {
        "dataset": config["dataset"],
        "utility_images": int(config["utility_images"]),
        "defenses": [row_name(specs) for specs in config["defenses"] if specs],
        "victims": {str(seed): Path(file).name for seed, file in sorted(victims.items())},
    }
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("measured_on") == measured_on:
            return {
                row: {int(seed): values for seed, values in by_victim.items()}
                for row, by_victim in kept["utility"].items()
            }
    utility = measure_utility(config, victims, data_root)
    write_json_atomic(path, {"measured_on": measured_on, "utility": utility})
    return utility


def run_tradeoff(args: Any) -> dict[str, Any]:
    """Run (or resume) the grid; write JSON, markdown and PNG; return the summary."""

    config = configured(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    plan(config, args, out, {s: out / "victims" / f"seed{s}" for s in config["victim_seeds"]})
    victims = {
        s: get_victim(config, out / "victims", args.data_root, s)[1] for s in config["victim_seeds"]
    }
    jobs = plan(config, args, out, victims)
    if args.fresh:
        for job in jobs:
            shutil.rmtree(job["run_dir"], ignore_errors=True)
            job["fresh"] = False
    log(
        f"tradeoff: {len(jobs)} runs {sweep.describe(args)}; "
        f"run folders under {out / runs_folder_name(args)}"
    )
    stem = "tradeoff_quick" if args.quick else "tradeoff"
    kept = out / ("utility_quick.json" if args.quick else "utility.json")
    utility = kept_utility(config, victims, args.data_root, kept)
    finished: list[dict[str, Any]] = []

    def done(res: dict[str, Any]) -> None:
        finished.append(res)
        last = res["metrics"][-1]["clone_accuracy"] if res["metrics"] else math.nan
        how = "already done" if res["skipped"] else f"{res['wall_s']} s"
        log(f"[{len(finished)}/{len(jobs)}] {res['name']} ({how}): {last:.4f}")

    options = sweep.options(args, config["device"])
    failures = sweep.run_jobs(jobs, args.jobs, done, run_one, shared=out, **options)
    if failures:
        raise sweep.SweepFailed(failures, len(jobs))
    wall = time.time() - t0
    summary = summarise(finished, utility, config, wall)
    paths = write_outputs(summary, out, stem, plot=not args.no_plot)
    log(f"tradeoff: {wall:.0f} s wall time; wrote {', '.join(str(p) for p in paths)}")
    return summary
