"""The interpretability-versus-stealing trade-off: what each defence costs and buys.

For each defence and strength (a list of defence specs, applied in order by the service):

- what it costs: the utility of the explanations the defended service returns, against the
  undefended ones, on real test images (megex.utility: cosine, rank correlation, top-k
  overlap, deletion and insertion AUC), and how much it moves the probabilities;
- what it buys: the clone accuracy of each explanation attacker, naive and adaptive
  (megex.attacks.adaptive: the attacker that knows the defence), and of the
  predictions-only attacker (DFME), at fixed budgets, over several victims and attack seeds,
  under the benchmark's fair protocol (its shared settings, the tuned settings file, equal
  clone updates per query).

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
one's (nothing to adapt to) is the naive run, not run twice.

Runs are the benchmark's run folders (megex.bench.run_one; a defence list in the job), so an
interrupted grid resumes; they are spread by megex.sweep (processes or Ray). Writes
<out>/tradeoff[_quick].json, .md and .png.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "add_arguments", "load_config", "run_tradeoff"]

DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "victim_arch": None,
    "victim_seeds": [0, 1],
    "seeds": [0, 1],
    "validation_images": 5000,
    "budgets": [20_000, 50_000],
    "eval_at": [5_000, 10_000],
    # MEGEX with maps of every class, and the strongest explanation attacker of the full
    # benchmark (megex-predicted: the largest, if not significant, lead over DFME).
    "attackers": ["megex-all", "megex-predicted"],
    "baseline": "dfme",
    # Each entry: the defence specs a service applies, in order ([] : none).
    "defenses": [
        [],
        ["gaussian:0.5"],
        ["gaussian:2"],
        ["laplace:1"],
        ["quantize:bits=2"],
        ["quantize:bits=4"],
        ["sign"],
        ["topk:0.1"],
        ["topk:0.01"],
        ["coarsen:4"],
        ["smooth"],
        ["predicted-only"],
        ["withhold:0.5"],
        ["withhold:0.9"],
        ["round:1"],
        ["label-only"],
        ["reverse-sigmoid"],
    ],
    # Utility is measured on the predicted class's map, what a user of the service reads.
    "utility_images": 500,
    "utility_threshold": 0.5,
    "quick": {
        "victim_seeds": [0],
        "seeds": [0],
        "budgets": [10_000],
        "eval_at": [5_000],
        "attackers": ["megex-all"],
        "defenses": [[], ["gaussian:2"], ["sign"]],
        "utility_images": 100,
    },
    "settings": {
        "ngf": 8,
        "lr_schedule": "constant",
        "clone_ema": 0.999,
        "clone_updates_per_1k_queries": 25.0,
    },
    "tuned_settings": "benchmarks/results/tuning/tuned.json",
    "method_settings": {},
    "device": "cpu",
}

ADAPTIVE = "+adaptive"


def load_config(path: str | os.PathLike | None, quick: bool = False) -> dict[str, Any]:
    """DEFAULTS updated by a JSON file's keys, then by its "quick" keys under --quick."""
    from .bench import check_methods, merged_config

    config = merged_config(DEFAULTS, path, ("settings", "method_settings", "quick"))
    if quick:
        config.update(config["quick"])
    check_methods([*config["attackers"], config["baseline"]])
    if not config["budgets"] or not config["defenses"]:
        raise ValueError("budgets and defenses: expected at least one of each")
    for entry in config["defenses"]:
        if not isinstance(entry, list) or not all(isinstance(s, str) for s in entry):
            raise ValueError(
                f'defenses: each entry is a list of defence specs (e.g. ["noise:0.5"]), '
                f"got {entry!r}"
            )
    if not 0 <= float(config["utility_threshold"]) <= 1:
        raise ValueError(
            f"utility_threshold: expected a cosine in [0, 1], got {config['utility_threshold']}"
        )
    return config


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="JSON file of trade-off settings (keys of DEFAULTS)")
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the reduced grid: one victim, one seed, one budget, three defences",
    )
    parser.add_argument(
        "--defense",
        action="append",
        metavar="SPECS",
        help="a defence row, comma-free specs joined by '+' (e.g. 'noise:0.5' or "
        "'round:2+sign'); repeatable; replaces the config's rows (the undefended row is "
        "always kept)",
    )
    parser.add_argument(
        "--settings-file",
        metavar="PATH",
        help="tuned attack settings (megex tune's tuned.json; default: the config's "
        "tuned_settings); 'none': the package defaults, untuned, said so in the report",
    )
    parser.add_argument("--budgets", type=int, nargs="+", help="query budgets to report")
    parser.add_argument("--seeds", type=int, nargs="+", help="attack seeds")
    parser.add_argument("--victim-seeds", type=int, nargs="+", help="victims (recipe seeds)")
    parser.add_argument(
        "--out",
        default="benchmarks/results/tradeoff",
        help="output folder (default: benchmarks/results/tradeoff)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--device", help="cpu or cuda (default: the config's)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs; start over")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    from . import sweep

    sweep.add_arguments(parser, "runs")
    return parser


def row_name(specs: list[str]) -> str:
    return "+".join(specs) if specs else "none"


def _slug(specs: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", row_name(specs))


def _apply_arguments(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from .bench import apply_settings_file

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
    from .defenses import build_defense

    return [build_defense(s) for s in specs]


def _touches_predictions(defenses: list[Any]) -> bool:
    return any(d.side == "prediction" for d in defenses)


def runs_folder_name(args: argparse.Namespace) -> str:
    return "runs-quick" if getattr(args, "quick", False) else "runs"


def plan(config: dict[str, Any], args: argparse.Namespace, out: Path, victims: dict) -> list:
    """The runs of the grid (checked before any victim is trained)."""
    from .attacks import adapt_to
    from .bench import load_tuned, method_settings, require_tuned

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
                            out / runs_folder / f"{method}-{_slug(specs)}-v{victim_seed}-s{seed}"
                        ),
                        "victim": str(Path(victim).resolve()),
                        "dataset": config["dataset"],
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
            if settings.get("lr_schedule") != "constant":
                raise ValueError(
                    f"{method}: every budget is read off one run: needs a constant lr_schedule"
                )
            add(method, attack, settings, specs)
            adaptation = adapt_to(defenses)
            if adaptation and attack == "megex":
                add(method + ADAPTIVE, "megex-adaptive", {**settings, **adaptation}, specs)
    return jobs


def measure_utility(
    config: dict[str, Any], victims: dict[int, Path], data_root: str | None
) -> dict[str, dict[int, dict[str, float]]]:
    """Per defence row and victim, the mean of each utility measure (megex.utility) of the
    predicted class's map on the first `utility_images` test images: similarity to the
    undefended map, faithfulness, and how much the probabilities moved."""
    from . import data as data_mod
    from .explain import Explanation
    from .utility import explanation_utility
    from .victim import Victim

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


def run_tradeoff(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the grid; write JSON, markdown and PNG; return the summary."""
    from . import sweep
    from .bench import _log, get_victim, run_one

    config = _apply_arguments(load_config(args.config, args.quick), args)
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
    _log(
        f"tradeoff: {len(jobs)} runs {sweep.describe(args)}; "
        f"run folders under {out / runs_folder_name(args)}"
    )
    utility = measure_utility(config, victims, args.data_root)
    finished: list[dict[str, Any]] = []

    def done(res: dict[str, Any]) -> None:
        finished.append(res)
        last = res["metrics"][-1]["clone_accuracy"] if res["metrics"] else math.nan
        how = "already done" if res["skipped"] else f"{res['wall_s']} s"
        _log(f"[{len(finished)}/{len(jobs)}] {res['name']} ({how}): {last:.4f}")

    options = sweep.options(args, config["device"])
    failures = sweep.run_jobs(jobs, args.jobs, done, run_one, shared=out, **options)
    if failures:
        raise sweep.SweepFailed(failures, len(jobs))
    wall = time.time() - t0
    summary = summarise(finished, utility, config, wall)
    stem = "tradeoff_quick" if args.quick else "tradeoff"
    paths = write_outputs(summary, out, stem, plot=not args.no_plot)
    _log(f"tradeoff: {wall:.0f} s wall time; wrote {', '.join(str(p) for p in paths)}")
    return summary


# --- the summary ----------------------------------------------------------------------------


def summarise(
    finished: list[dict[str, Any]],
    utility: dict[str, dict[int, dict[str, float]]],
    config: dict[str, Any],
    wall: float,
) -> dict[str, Any]:
    from .bench import cells_of
    from .stats import bootstrap_interval, paired_difference

    budget = max(config["budgets"])
    baseline = config["baseline"]
    accuracy: dict[tuple[str, str], dict[int, dict[int, float]]] = {}
    victim_accuracy: dict[int, float] = {}
    for r in finished:
        cell = cells_of(r).get(budget)
        if cell is None:
            continue
        victim_accuracy[r["victim_seed"]] = r["victim_accuracy"]
        key = (r["defense_row"], r["method"])
        accuracy.setdefault(key, {}).setdefault(r["victim_seed"], {})[r["seed"]] = cell[
            "clone_accuracy"
        ]
    # Whether each explanation attacker (naive, or adaptive where it differs) is measurably
    # ahead of the baseline without a defence: only such a lead can be stopped.
    undefended_base = accuracy.get(("none", baseline), {})
    undefended_lead: dict[str, Any] = {}
    for attacker in config["attackers"]:
        diff = paired_difference(accuracy.get(("none", attacker), {}), undefended_base)
        undefended_lead[attacker] = (
            diff.get("verdict") if diff.get("pairs", 0) > 1 else "too few runs"
        )
    leading = [a for a, verdict in undefended_lead.items() if verdict == "a ahead"]
    rows_out = []
    for specs in config["defenses"]:
        name = row_name(specs)
        # Explanation defences leave DFME's answers as they were: its undefended runs.
        base = accuracy.get((name, baseline)) or undefended_base
        methods: dict[str, Any] = {}
        stopped_all = True
        for attacker in config["attackers"]:
            naive = accuracy.get((name, attacker), {})
            adaptive = accuracy.get((name, attacker + ADAPTIVE))
            undefended = accuracy.get(("none", attacker), {})
            for label, values in ((attacker, naive), (attacker + ADAPTIVE, adaptive)):
                if not values:
                    continue
                est, low, high = bootstrap_interval(values)
                methods[label] = {
                    "accuracy": {"estimate": est, "low": low, "high": high},
                    "minus_baseline": paired_difference(values, base),
                    # What the defence took from this attacker (paired with its own
                    # undefended runs: the naive attacker's, as nothing was there to adapt to).
                    "minus_undefended": paired_difference(values, undefended),
                }
            variants = [v for v in (attacker, attacker + ADAPTIVE) if v in methods]
            if not variants:
                continue
            # The table and plot show the stronger variant by mean (an adaptation may not
            # help); a defence stops the attacker only if neither variant stays ahead.
            counted = max(variants, key=lambda v: methods[v]["accuracy"]["estimate"])
            verdicts = [methods[v]["minus_baseline"] for v in variants]
            stopped = all(d.get("pairs", 0) > 1 and d.get("verdict") != "a ahead" for d in verdicts)
            methods[counted]["counted"] = True
            methods[counted]["stopped"] = stopped
            if attacker in leading:
                stopped_all = stopped_all and stopped
        if base:
            est, low, high = bootstrap_interval(base)
            methods[baseline] = {"accuracy": {"estimate": est, "low": low, "high": high}}
        by_victim = utility.get(name, {})
        metrics = sorted({m for v in by_victim.values() for m in v})
        util = {m: statistics.fmean(v[m] for v in by_victim.values() if m in v) for m in metrics}
        keeps = util.get("cosine", 0.0) >= float(config["utility_threshold"])
        rows_out.append(
            {
                "defense": name,
                "specs": specs,
                "utility": util,
                "methods": methods,
                # None: no attacker was ahead without a defence, so there is nothing to stop.
                "stops_explanation_attackers": (
                    (stopped_all if leading else None) if specs else False
                ),
                "keeps_utility": keeps,
            }
        )
    effective = [
        r["defense"] for r in rows_out if r["stops_explanation_attackers"] and r["keeps_utility"]
    ]
    return {
        "budget": budget,
        "budgets": sorted(config["budgets"]),
        "victims": {str(k): v for k, v in sorted(victim_accuracy.items())},
        "seeds": config["seeds"],
        "attackers": config["attackers"],
        "baseline": baseline,
        "utility_threshold": config["utility_threshold"],
        "tuned_settings": config["tuned_settings"],
        "undefended_lead": undefended_lead,
        "leading_attackers": leading,
        "rows": rows_out,
        "effective": effective,
        "wall_s": round(wall, 1),
        "runs": len(finished),
    }


def _pct(i: dict[str, float]) -> str:
    if not i or math.isnan(i.get("estimate", math.nan)):
        return "-"
    if math.isnan(i["low"]):
        return f"{100 * i['estimate']:.1f}"
    return f"{100 * i['estimate']:.1f} [{100 * i['low']:.1f}, {100 * i['high']:.1f}]"


def _points(d: dict[str, Any]) -> str:
    """A paired difference in points: mean [bootstrap] (t: [...]), or '-'."""
    if not d or d.get("pairs", 0) == 0:
        return "-"
    if d["pairs"] == 1:
        return f"{100 * d['mean']:+.1f}"
    text = f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    if math.isnan(d.get("t_low", math.nan)):
        return text
    return text + f" (t: [{100 * d['t_low']:+.1f}, {100 * d['t_high']:+.1f}])"


def markdown(summary: dict[str, Any]) -> str:
    from .bench import _fmt

    b = _fmt(summary["budget"])
    victims = ", ".join(f"{100 * a:.2f}%" for a in summary["victims"].values())
    lines = [
        f"# Defences: explanation utility against clone accuracy at {b} queries",
        "",
        f"Victims (test accuracy): {victims}; attack seeds {summary['seeds']}; "
        f"{summary['runs']} runs, {summary['wall_s']:.0f} s wall time. Clone accuracy in %, "
        "mean [95% hierarchical bootstrap interval]. Utility: the predicted class's map of "
        "the defended service against the undefended one on test images (cosine, Spearman; "
        "`l1`: L1 distance moved in the probabilities; `labels`: share of top-1 labels "
        "kept).",
        "",
    ]
    if summary.get("tuned_settings") is None:
        lines += [
            "Attack settings: untuned (the package defaults and the benchmark's shared "
            "settings), not the search's.",
            "",
        ]
    else:
        lines += [f"Attack settings: the search's, from {summary['tuned_settings']}.", ""]
    attackers = summary["attackers"]
    labels = [m for a in attackers for m in (a, a + ADAPTIVE)]
    head = ["defence", "cosine", "spearman", "l1", "labels", *labels, summary["baseline"]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary["rows"]:
        u = row["utility"]
        cells = [
            row["defense"],
            f"{u.get('cosine', math.nan):.3f}",
            f"{u.get('spearman', math.nan):.3f}",
            f"{u.get('probability_l1', math.nan):.3f}",
            f"{u.get('label_kept', math.nan):.3f}",
        ]
        for label in labels:
            m = row["methods"].get(label)
            if m is None or "accuracy" not in m:
                cells.append("= naive" if label.endswith(ADAPTIVE) else "-")
                continue
            mark = ""
            if m.get("counted"):
                leads = label.removesuffix(ADAPTIVE) in summary.get("leading_attackers", [])
                mark = " (counted, stopped)" if leads and m.get("stopped") else " (counted)"
            cells.append(_pct(m["accuracy"]) + mark)
        cells.append(_pct(row["methods"].get(summary["baseline"], {}).get("accuracy", {})))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "What each defence took from each attacker: the counted variant's clone accuracy "
        "minus the same attacker's undefended runs (same victim, same seed), points, "
        "mean [95% bootstrap interval] (t: Student t interval over the victims):",
        "",
        "| defence | " + " | ".join(attackers) + " |",
        "|" + "---|" * (len(attackers) + 1),
    ]
    for row in summary["rows"]:
        if not row["specs"]:
            continue
        cells = [row["defense"]]
        for attacker in attackers:
            counted = counted_variant(row, attacker) or {}
            cells.append(_points(counted.get("minus_undefended", {})))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## What the table says", ""]
    lead = summary["undefended_lead"]
    for attacker, verdict in lead.items():
        if verdict == "too few runs":
            lines.append(
                f"- One pair of runs per method: no interval, so no verdict on whether "
                f"{attacker} is ahead of {summary['baseline']}, or on what a defence stops."
            )
        elif verdict == "a ahead":
            lines.append(f"- Without a defence, {attacker} is ahead of {summary['baseline']}.")
        else:
            lines.append(
                f"- Without a defence, {attacker} is not measurably ahead of "
                f"{summary['baseline']} ({verdict or 'too few runs'}): there is no lead for "
                "a defence to remove, and 'stopped' says only that none appeared."
            )
    threshold = summary["utility_threshold"]
    if not summary.get("leading_attackers", []):
        lines.append(
            "- No explanation attacker was measurably ahead without a defence: no defence "
            "had a lead to stop, so none is named as effective; the tables give what each "
            "costs in utility and takes from the attackers."
        )
    elif summary["effective"]:
        lines.append(
            f"- Defences that leave no explanation attacker that led (neither naive nor adaptive) "
            f"measurably ahead of {summary['baseline']} while keeping the maps' cosine to "
            f"the undefended ones at {threshold:g} or more: "
            + ", ".join(_named_defence(summary, d) for d in summary["effective"])
            + "."
        )
    else:
        lines.append(
            f"- No defence both left the explanation attackers without a measured lead over "
            f"{summary['baseline']} and kept the maps' cosine at {threshold:g} or more."
        )
    return "\n".join(lines) + "\n"


def _named_defence(summary: dict[str, Any], name: str) -> str:
    """A defence the report names, with what it costs the answers' probabilities when it
    works on them: the utility bar reads the maps only, so that cost is said beside it."""
    row = next(r for r in summary["rows"] if r["defense"] == name)
    utility = row["utility"]
    moved = utility.get("probability_l1", 0.0)
    if not moved:
        return f"`{name}`"
    return (
        f"`{name}` (on the predictions: probabilities moved by L1 {moved:.3f} "
        f"on average, top-1 label kept on {utility.get('label_kept', math.nan):.1%} of images)"
    )


def write_outputs(summary: dict[str, Any], out: Path, stem: str, plot: bool = True) -> list[Path]:
    from .runs import write_json_atomic, write_text_atomic

    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    write_json_atomic(paths[0], summary)
    write_text_atomic(paths[1], markdown(summary))
    if plot:
        try:
            paths.append(plot_tradeoff(summary, out / f"{stem}.png"))
        except ImportError:
            _warn("matplotlib is not installed (the 'plots' extra): no plot")
    return paths


def counted_variant(row: dict[str, Any], attacker: str) -> dict[str, Any] | None:
    """A summary row's entry for the variant of `attacker` that it counts (the stronger of
    naive and adaptive), or None where the attacker did not run under that defence."""
    for label in (attacker, attacker + ADAPTIVE):
        if row["methods"].get(label, {}).get("counted"):
            return row["methods"][label]
    return None


def plotted_points(summary: dict[str, Any], attacker: str) -> dict[str, list[tuple]]:
    """Per defence family, the (cosine utility, clone accuracy %) points of one attacker in
    the variant the table counts for each row (the stronger of naive and adaptive)."""
    families: dict[str, list[tuple[float, float]]] = {}
    for row in summary["rows"]:
        m = counted_variant(row, attacker)
        cos = row["utility"].get("cosine")
        if m is None or cos is None:
            continue
        family = row["defense"].split(":")[0] if row["specs"] else "none"
        families.setdefault(family, []).append((cos, 100 * m["accuracy"]["estimate"]))
    return families


def plot_tradeoff(summary: dict[str, Any], path: Path) -> Path:
    """One panel per explanation attacker (the counted variant): one curve per defence
    family, utility (cosine) across, clone accuracy up; the baseline as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attackers = summary["attackers"]
    fig, axes = plt.subplots(1, len(attackers), figsize=(5.5 * len(attackers), 4.2), squeeze=False)
    base_row = next((r for r in summary["rows"] if r["defense"] == "none"), None)
    for ax, attacker in zip(axes[0], attackers):
        families = plotted_points(summary, attacker)
        for family, points in sorted(families.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o", label=family)
        if base_row is not None and summary["baseline"] in base_row["methods"]:
            acc = base_row["methods"][summary["baseline"]]["accuracy"]
            ax.axhline(100 * acc["estimate"], color="k", ls="--", lw=1, label=summary["baseline"])
            if not math.isnan(acc["low"]):
                ax.axhspan(100 * acc["low"], 100 * acc["high"], color="k", alpha=0.08)
        ax.axvline(summary["utility_threshold"], color="grey", ls=":", lw=1)
        ax.set_xlabel("explanation utility (cosine to the undefended map)")
        ax.set_ylabel(f"clone accuracy at {summary['budget']:,} queries (%)")
        ax.set_title(f"{attacker} (the variant counted: naive or adaptive)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    from .runs import save_figure_atomic

    return save_figure_atomic(fig, path, dpi=120)


def _warn(message: str) -> None:
    print(f"tradeoff: {message}", file=sys.stderr, flush=True)
