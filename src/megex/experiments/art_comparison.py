"""Our knockoff beside ART's KnockoffNets, with matched settings (`megex art-peer`).

For each victim, attack seed and budget, the config's pool is drawn with the seed (the same
images for both) and two attacks steal the same victim with the same budget:

- ART's KnockoffNets (:func:`megex.experiments.art_peer.art_knockoff`): random sampling,
  `budget` pool images queried once for probabilities, then `epochs` epochs of Adam on them;
- our `knockoff` (:mod:`megex.attacks.knockoff`) as the benchmark runs it: a random order of
  the pool, `query_batch` images per request, each answer kept, and every clone update after
  the last query (`training='after-queries'`), each on the answers used least so far
  (`sampling='balanced'`: epochs over the answers, as ART's).

Matched: the clone (the default for the image size), Adam at the same learning rate, the same
batch, and the same number of clone updates (ART: epochs x ceil(budget / batch); ours:
`clone_updates_per_1k_queries` = updates x 1000 / budget), with our `loss='kl'` on the
victim's probabilities (the same gradients as ART's soft cross-entropy), no weight average.
The training length follows the benchmark's rule, a number of clone updates per 1,000
queries (1,000 by default): epochs = ceil(budget x rate / 1000 / ceil(budget / batch)).

Both are evaluated on the test split (accuracy and fidelity) after the attack, outside the
clock; each run's wall time (queries and training) is measured in this one process, the two
attacks one after the other. Every finished run is a line of `<out>/art_comparison_runs.jsonl`
and is not run again; the summary (`<out>/art_comparison.json` and `.md`) is rebuilt from
those lines.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import data as data_mod
from ..attacks.base import default_clone_arch
from ..attacks.knockoff import Knockoff
from ..engine import run
from ..evaluate import Evaluator
from ..oracle import LocalOracle
from ..pools import load_pool, parse_pool, victim_images
from ..runs import write_text_atomic
from ..stats import paired_difference, t_interval
from ..tables import markdown_table
from . import config as config_files
from .art_peer import art_knockoff
from .common import fmt_budget, log, write_outputs
from .query_efficiency.config import QueryEfficiencyConfig
from .runner import get_victim, prepare_torch

__all__ = [
    "BATCH_SIZE",
    "LEARNING_RATE",
    "METHODS",
    "RUNS_FILE",
    "UPDATES_PER_1K_QUERIES",
    "compare_with_art",
    "markdown",
    "query_batch_for",
    "require_art",
    "summarise",
    "training_length",
]

ART, OURS = "art-knockoffnets", "knockoff"
METHODS = (ART, OURS)
LEARNING_RATE = 1e-3
BATCH_SIZE = 64
UPDATES_PER_1K_QUERIES = 1000.0
MAX_QUERY_BATCH = 50
RUNS_FILE = "art_comparison_runs.jsonl"
STEM = "art_comparison"
_NAMES = {ART: "ART KnockoffNets", OURS: "our knockoff"}


def require_art() -> str:
    """ART's version; ModuleNotFoundError (naming the package, with the install line) if it
    is not installed."""
    try:
        import art
    except ImportError as err:
        raise ModuleNotFoundError(
            "the comparison with ART needs the Adversarial Robustness Toolbox: "
            "pip install 'megex[art]'",
            name="art",
        ) from err
    return str(art.__version__)


def training_length(
    budget: int, batch_size: int = BATCH_SIZE, updates_per_1k: float = UPDATES_PER_1K_QUERIES
) -> tuple[int, int]:
    """(epochs, clone updates) for `budget` answers: enough whole epochs of ceil(budget /
    batch) batches to make `updates_per_1k` updates per 1,000 queries."""
    if budget < 1 or batch_size < 1 or not updates_per_1k > 0:
        raise ValueError(
            f"training length: budget, batch and updates per 1k queries must be positive, got "
            f"{budget}, {batch_size}, {updates_per_1k}"
        )
    per_epoch = math.ceil(budget / batch_size)
    epochs = max(1, math.ceil(budget * updates_per_1k / 1000 / per_epoch))
    return epochs, epochs * per_epoch


def query_batch_for(budget: int, largest: int = MAX_QUERY_BATCH) -> int:
    """The largest divisor of `budget` up to `largest`: our knockoff spends exactly the budget
    in whole requests."""
    return max(d for d in range(1, min(budget, largest) + 1) if budget % d == 0)


def _rate_for(updates: int, budget: int) -> float:
    """clone_updates_per_1k_queries that makes the loop allot exactly `updates` updates over
    `budget` queries (it allots int(rate x spent / 1000)): nudged up past a rounding loss."""
    rate = updates * 1000 / budget
    while int(rate * budget / 1000) < updates:
        rate = math.nextafter(rate, math.inf)
    return rate


# --- the runs -------------------------------------------------------------------------------


def _key(record: dict[str, Any]) -> tuple[int, int, int, str]:
    return (
        int(record["victim_seed"]),
        int(record["seed"]),
        int(record["budget"]),
        str(record["method"]),
    )


def _read_runs(path: Path) -> dict[tuple[int, int, int, str], dict[str, Any]]:
    """The finished runs of `path` by key. A last line cut short by an interruption is
    dropped from the file (that run is simply run again)."""
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    runs = {}
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(
                    f"{path}: line {number} is not JSON; delete the file to start over"
                ) from None
            write_text_atomic(path, "".join(f"{kept}\n" for kept in lines[:-1]))
            break
        runs[_key(record)] = record
    return runs


def _append_run(path: Path, record: dict[str, Any]) -> None:
    """One finished run, appended as a line and flushed to disk before the next run starts."""
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _full_config(config: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's defaults updated by `config` (a loaded config file or a plain dict)."""
    full = {**config_files.defaults(QueryEfficiencyConfig), **config}
    if not full.get("pool"):
        raise ValueError(
            "config: no 'pool' (the attacker's images, e.g. 'fashion-mnist:unseen:1000'): "
            "the comparison with ART's KnockoffNets needs one"
        )
    return full


def _check_budget(budget: int, pool_size: int | None, spec: str) -> None:
    # ART's random sampling draws `budget` distinct pool images (without replacement).
    if pool_size is not None and budget > pool_size:
        raise ValueError(
            f"budgets: ART's KnockoffNets (random sampling) queries `budget` distinct pool "
            f"images, so a budget may not exceed the pool: {budget} for {pool_size} images "
            f"({spec})"
        )


def _run_settings(
    config: dict[str, Any], budget: int, method: str, epochs: int, updates: int, arch: str
) -> dict[str, Any]:
    """What a finished run must have been run with to be reused."""
    settings = {
        "dataset": config["dataset"],
        "victim_arch": config["victim_arch"],
        "validation_images": config["validation_images"],
        "pool_images": config.get("pool_images", 0),
        "pool": str(config["pool"]),
        "device": config["device"],
        "clone_arch": arch,
        "optimizer": "adam",
        "lr": LEARNING_RATE,
        "batch_size": BATCH_SIZE,
        "clone_updates": updates,
    }
    if method == ART:
        return {**settings, "epochs": epochs, "sampling": "random", "use_probability": True}
    return {
        **settings,
        "query_batch": query_batch_for(budget),
        "selection": "random",
        "loss": "kl",
        "clone_ema": 0.0,
        "training": "after-queries",
        "sampling": "balanced",
    }


def _ours(
    victim: Any,
    pool: Any,
    budget: int,
    *,
    seed: int,
    updates: int,
    arch: str,
    device: str,
    evaluator: Evaluator,
    progress: bool,
) -> dict[str, Any]:
    """Our knockoff with ART's settings: queries and training timed, evaluation after."""
    attack = Knockoff(
        pool,
        clone=arch,
        clone_optimizer="adam",
        clone_lr=LEARNING_RATE,
        batch_size=BATCH_SIZE,
        clone_ema=0.0,
        selection="random",
        loss="kl",
        query_batch=query_batch_for(budget),
        training="after-queries",
        sampling="balanced",
        clone_updates_per_1k_queries=_rate_for(updates, budget),
        seed=seed,
        device=device,
    )
    oracle = LocalOracle(victim, budget=budget, explanation=None, seed=seed, device=device)
    start = time.perf_counter()
    result = run(attack, oracle, budget, evaluator=None, progress=progress)
    wall_s = time.perf_counter() - start
    if attack.clone_updates != updates or oracle.queries_used != budget:
        raise RuntimeError(
            f"knockoff: made {attack.clone_updates} clone updates with {oracle.queries_used} "
            f"queries; the comparison planned {updates} with {budget}"
        )
    scores = evaluator(attack.eval_model())
    return {
        "attack": "megex knockoff",
        "clone_accuracy": scores["clone_accuracy"],
        "fidelity": scores["fidelity"],
        "victim_accuracy": evaluator.victim_accuracy,
        "queries": result.queries_used,
        "queries_used": oracle.queries_used,
        "wall_s": round(wall_s, 3),
        "s_per_1k_queries": round(wall_s / budget * 1000.0, 3),
        "clone_updates_per_1k_queries": attack.config.clone_updates_per_1k_queries,
        "pool_images_asked": result.details.get("pool_images_asked"),
    }


def _run_method(
    method: str,
    victim: Any,
    pool: Any,
    budget: int,
    *,
    seed: int,
    epochs: int,
    updates: int,
    arch: str,
    device: str,
    test: tuple[Any, Any],
    evaluator: Evaluator | None,
    progress: bool,
) -> dict[str, Any]:
    """One run of `method` (ART's KnockoffNets or ours) with the matched settings."""
    if method == ART:
        x_test, y_test = test
        return art_knockoff(
            victim,
            pool.images,
            budget,
            clone_arch=arch,
            seed=seed,
            epochs=epochs,
            batch_size=BATCH_SIZE,
            lr=LEARNING_RATE,
            x_test=x_test,
            y_test=y_test,
        )
    assert evaluator is not None
    return _ours(
        victim,
        pool,
        budget,
        seed=seed,
        updates=updates,
        arch=arch,
        device=device,
        evaluator=evaluator,
        progress=progress,
    )


def compare_with_art(
    config: dict[str, Any],
    budgets: Sequence[int],
    victim_seeds: Sequence[int] | None,
    seeds: Sequence[int] | None,
    out: str | os.PathLike,
    *,
    clone_updates_per_1k_queries: float | None = None,
    epochs: int | None = None,
    victims: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ART's KnockoffNets and our knockoff with matched settings on each victim x seed x
    budget; write `<out>/art_comparison.json` and `.md`; return the summary.

    config: a benchmark config (megex.experiments.query_efficiency.load_config, or a plain
    dict over its defaults) with a `pool`. victim_seeds, seeds: None for the config's.
    clone_updates_per_1k_queries: the training length rule (default 1,000 per 1,000 queries,
    the pool benchmark's); epochs: a fixed number of ART epochs instead (both methods then
    make epochs x ceil(budget / 64) updates). victims: the folder of cached victims (default
    `<out>/victims`; trained there if missing). threads: torch threads (None: as they are).
    Finished runs in `<out>/art_comparison_runs.jsonl` are reused, not run again; one run with
    other settings there is a ValueError.
    """
    config = _full_config(config)
    art_version = require_art()
    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 1:
        raise ValueError(f"budgets: expected whole numbers >= 1, got {budgets}")
    # Before any victim is trained: a pool of a known size that the budgets exceed.
    _check_budget(budgets[-1], parse_pool(str(config["pool"])).size, str(config["pool"]))
    rate = float(
        UPDATES_PER_1K_QUERIES
        if clone_updates_per_1k_queries is None
        else clone_updates_per_1k_queries
    )
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"clone updates per 1k queries: expected a number > 0, got {rate}")
    if epochs is not None and (isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1):
        raise ValueError(f"epochs: expected a whole number >= 1, got {epochs!r}")
    victim_seeds = list(config["victim_seeds"] if victim_seeds is None else victim_seeds)
    seeds = list(config["seeds"] if seeds is None else seeds)
    if not victim_seeds or not seeds:
        raise ValueError("victim seeds and attack seeds: expected at least one of each")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    victims_dir = Path(victims) if victims is not None else out / "victims"
    device = config["device"]
    if threads is not None:
        prepare_torch(threads, device)
    lengths = {}
    for budget in budgets:
        if epochs is None:
            lengths[budget] = training_length(budget, BATCH_SIZE, rate)
        else:
            lengths[budget] = (int(epochs), int(epochs) * math.ceil(budget / BATCH_SIZE))

    runs_path = out / RUNS_FILE
    done = _read_runs(runs_path)
    ds = data_mod.load(config["dataset"], data_root)
    x_test, y_test = ds.test_tensors()
    victim_accuracy: dict[int, float] = {}
    start = time.perf_counter()
    for victim_seed in victim_seeds:
        victim, _ = get_victim(config, victims_dir, data_root, victim_seed)
        victim_accuracy[victim_seed] = float(victim.accuracy)
        arch = default_clone_arch(tuple(victim.input_shape))
        evaluator = None
        for seed in seeds:
            pool = None
            for budget in budgets:
                epochs_b, updates = lengths[budget]
                for method in METHODS:
                    key = (victim_seed, seed, budget, method)
                    settings = _run_settings(config, budget, method, epochs_b, updates, arch)
                    label = f"victim {victim_seed} seed {seed} budget {budget} {_NAMES[method]}"
                    if key in done:
                        if done[key]["settings"] != settings:
                            raise ValueError(
                                f"{runs_path} holds a run ({label}) with other settings; "
                                "choose another --out, or delete that file to start over"
                            )
                        log(f"art-peer: {label}: finished before, skipped")
                        continue
                    if pool is None:
                        # The same images for both methods and every budget of this seed.
                        pool = load_pool(
                            config["pool"], victim_images(victim), seed=seed, data_root=data_root
                        )
                        _check_budget(budgets[-1], len(pool.images), str(config["pool"]))
                    log(f"art-peer: {label}: running ({epochs_b} epochs, {updates} updates)")
                    if method == OURS and evaluator is None:
                        evaluator = Evaluator.from_victim(victim, x_test, y_test)
                    result = _run_method(
                        method,
                        victim,
                        pool,
                        budget,
                        seed=seed,
                        epochs=epochs_b,
                        updates=updates,
                        arch=arch,
                        device=device,
                        test=(x_test, y_test),
                        evaluator=evaluator,
                        progress=progress,
                    )
                    record = {
                        "victim_seed": victim_seed,
                        "seed": seed,
                        "budget": budget,
                        "method": method,
                        "settings": settings,
                        "pool": pool.describe(),
                        **{k: v for k, v in result.items() if k != "settings"},
                    }
                    _append_run(runs_path, record)
                    done[key] = record
                    log(
                        f"art-peer: {label}: accuracy {record['clone_accuracy']:.4f}, "
                        f"fidelity {record['fidelity']:.4f}, {record['wall_s']:.1f} s"
                    )
    summary = summarise(
        [done[(v, s, b, m)] for v in victim_seeds for s in seeds for b in budgets for m in METHODS],
        config=config,
        budgets=budgets,
        lengths=lengths,
        rate=None if epochs is not None else rate,
        victim_accuracy=victim_accuracy,
        art_version=art_version,
    )
    summary["out"] = str(out)
    paths = write_outputs(summary, out, STEM, markdown)
    log(
        f"art-peer: {time.perf_counter() - start:.0f} s; wrote {', '.join(map(str, paths))} "
        f"(runs: {runs_path})"
    )
    return summary


# --- the summary ----------------------------------------------------------------------------


def _interval(values: list[float]) -> dict[str, Any]:
    mean, low, high = t_interval(values)
    return {"mean": mean, "low": None if math.isnan(low) else low,
            "high": None if math.isnan(high) else high, "runs": len(values)}  # fmt: skip


def _nested(records: list[dict[str, Any]], field: str) -> dict[int, dict[int, float]]:
    nested: dict[int, dict[int, float]] = {}
    for r in records:
        nested.setdefault(int(r["victim_seed"]), {})[int(r["seed"])] = float(r[field])
    return nested


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    """A paired difference with NaN intervals (one victim, one pair) as None, for JSON."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def summarise(
    records: list[dict[str, Any]],
    *,
    config: dict[str, Any],
    budgets: Sequence[int],
    lengths: dict[int, tuple[int, int]],
    rate: float | None,
    victim_accuracy: dict[int, float],
    art_version: str,
) -> dict[str, Any]:
    """Per budget and method: mean accuracy and fidelity with t intervals over every (victim,
    seed) run, mean time per 1,000 queries, and the paired difference ours - ART's."""
    rows = []
    for budget in budgets:
        epochs, updates = lengths[budget]
        row: dict[str, Any] = {
            "budget": budget,
            "epochs": epochs,
            "clone_updates": updates,
            "query_batch": query_batch_for(budget),
        }
        by_method = {m: [r for r in records if r["budget"] == budget and r["method"] == m]
                     for m in METHODS}  # fmt: skip
        for method, runs in by_method.items():
            row[method] = {
                "accuracy": _interval([r["clone_accuracy"] for r in runs]),
                "fidelity": _interval([r["fidelity"] for r in runs]),
                "s_per_1k_queries": sum(r["s_per_1k_queries"] for r in runs) / len(runs),
                "wall_s": sum(r["wall_s"] for r in runs) / len(runs),
            }
        for field, name in (("clone_accuracy", "difference"), ("fidelity", "fidelity_difference")):
            row[name] = _finite(
                paired_difference(_nested(by_method[OURS], field), _nested(by_method[ART], field))
            )
        art_seen = [r["victim_images_seen"] for r in by_method[ART]]
        row["art_victim_images_seen"] = sorted(set(art_seen))
        rows.append(row)
    return {
        "dataset": config["dataset"],
        "pool": str(config["pool"]),
        "victims": {str(k): v for k, v in sorted(victim_accuracy.items())},
        "seeds": sorted({int(r["seed"]) for r in records}),
        "budgets": list(budgets),
        "art_version": art_version,
        "settings": {
            "clone_arch": records[0]["settings"]["clone_arch"] if records else None,
            "optimizer": "adam",
            "lr": LEARNING_RATE,
            "batch_size": BATCH_SIZE,
            "clone_updates_per_1k_queries": rate,
            "device": config["device"],
        },
        "methods": {
            ART: f"ART {art_version} KnockoffNets, random sampling, probabilities, Adam lr "
            f"{_lr_text()} batch {BATCH_SIZE}, "
            + ", ".join(f"{lengths[b][0]} epochs at {b} queries" for b in budgets),
            OURS: "megex knockoff, random order, the same clone, optimiser, batch and number "
            "of updates, all after the queries, each batch the answers used least so far",
        },
        "rows": rows,
        "runs": records,
    }


def _lr_text() -> str:
    """The learning rate as written in papers: 1e-3, not 0.001."""
    mantissa, exponent = f"{LEARNING_RATE:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _pct(i: dict[str, Any]) -> str:
    if i.get("low") is None:
        return f"{100 * i['mean']:.1f}"
    return f"{100 * i['mean']:.1f} [{100 * i['low']:.1f}, {100 * i['high']:.1f}]"


def _points(d: dict[str, Any]) -> str:
    if not d or d.get("pairs", 0) == 0:
        return "-"
    if d["pairs"] == 1 or d.get("low") is None:
        return f"{100 * d['mean']:+.1f}"
    text = f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    if d.get("t_low") is None:
        return text
    return text + f" (t: [{100 * d['t_low']:+.1f}, {100 * d['t_high']:+.1f}])"


def markdown(summary: dict[str, Any]) -> str:
    """The comparison as markdown, from its summary alone."""
    settings = summary["settings"]
    victims = ", ".join(f"{100 * a:.2f}%" for a in summary["victims"].values())
    runs = len(summary["victims"]) * len(summary["seeds"])
    rule = settings["clone_updates_per_1k_queries"]
    length = (
        f"{rule:g} clone updates per 1,000 queries, rounded up to whole epochs"
        if rule is not None
        else "a fixed number of epochs"
    )
    lines = [
        f"# Our knockoff beside ART's KnockoffNets ({summary['dataset']}, pool {summary['pool']})",
        "",
        f"- ART KnockoffNets: {summary['methods'][ART]}.",
        f"- our knockoff: {summary['methods'][OURS]}.",
        "",
        f"Victims (test accuracy): {victims}; attack seeds {summary['seeds']}; {runs} runs "
        f"per budget and method, each pool drawn with its seed (the same images for both). "
        f"Clone {settings['clone_arch']}, training length {length}. Test accuracy in %, mean "
        "[95% t interval over the runs]; difference: ours - ART's in points, paired by "
        "victim and seed, mean [95% hierarchical bootstrap interval] (t: 95% t interval over "
        "the victims' mean differences, over the seeds with one victim). Seconds per 1,000 "
        f"queries: queries and training, on {settings['device']}, the runs one after another "
        "in one process.",
        "",
    ]
    header = [
        "budget",
        "epochs (updates)",
        "ART KnockoffNets accuracy",
        "our knockoff accuracy",
        "difference (ours - ART)",
        "ART s / 1k queries",
        "our s / 1k queries",
    ]
    body = [
        [
            fmt_budget(r["budget"]),
            f"{r['epochs']} ({r['clone_updates']})",
            _pct(r[ART]["accuracy"]),
            _pct(r[OURS]["accuracy"]),
            _points(r["difference"]),
            f"{r[ART]['s_per_1k_queries']:.1f}",
            f"{r[OURS]['s_per_1k_queries']:.1f}",
        ]
        for r in summary["rows"]
    ]
    lines += markdown_table(header, body, align=["right"] * len(header))
    lines += ["", "Fidelity (agreement with the victim's labels on the test split), in %:", ""]
    body = [
        [
            fmt_budget(r["budget"]),
            _pct(r[ART]["fidelity"]),
            _pct(r[OURS]["fidelity"]),
            _points(r["fidelity_difference"]),
        ]
        for r in summary["rows"]
    ]
    header = ["budget", "ART KnockoffNets", "our knockoff", "difference (ours - ART)"]
    lines += markdown_table(header, body, align=["right"] * len(header))
    return "\n".join(lines) + "\n"
