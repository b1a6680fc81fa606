"""How well DFME's zeroth-order gradient points along the true one, at each input size.

DFME trains its generator with an estimate of the gradient of its loss L (the per-image
disagreement between the clone and the victim, which the generator maximises) with respect
to the generator's output before tanh, where it takes its forward differences. With m
random unit directions in d = C x H x W dimensions the estimate aligns with the true
gradient only as roughly sqrt(m / d): the hypothesis that explanations, which give the
gradient for one query, pay more as d grows. This module measures the alignment, in
process, for a victim, DFME's clone and DFME's generator:

- the exact gradient, by autograd through the victim and the clone (L with the victim's
  probabilities as a function of the image, which is what the differences estimate);
- DFME's estimate with m directions, made by the estimator the attack uses
  (:func:`megex.attacks.dfme.random_directions`, `probe_points`,
  `forward_difference_gradient`) from the losses at the probe points;
- the same estimator fed exact directional derivatives along the same directions ("ideal":
  what the directions alone allow, without finite-difference or rounding error).

Per image the cosine between estimate and exact gradient; per batch their mean; reported as
the mean over batches with a 95% bootstrap interval, beside sqrt(m / d). For m = 1 the ideal
expected cosine is E|cos(u, g)| = sqrt(2 / (pi d)), about 0.8 sqrt(1 / d); it approaches
sqrt(m / d) as m grows (while m << d). Two phases: DFME's generator and clone as the attack
sets them up (random weights), and after DFME has trained them for some queries.

The measurements (per size, phase and m: each batch's mean cosine, and the ideal cosine's
mean over the batches) are kept in ``<out>/measurements.jsonl.gz`` (byte-stable, as the run
records); the table and plot are made from them alone, so :func:`tables_from_records` writes
them again without measuring.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import plots
from ..attacks import DFME
from ..attacks.base import disagreement
from ..attacks.dfme import forward_difference_gradient, probe_points, random_directions
from ..data import load
from ..engine import run
from ..evaluate import Evaluator
from ..oracle import LocalOracle
from ..stats import bootstrap_interval
from ..tables import markdown_table
from ..victim import cached_victim
from . import common, records
from .input_size import SIZES
from .query_efficiency import DEFAULTS

__all__ = [
    "DIRECTIONS",
    "MEASUREMENTS",
    "AlignmentRecord",
    "markdown",
    "measure_alignment",
    "measure_sizes",
    "read_record",
    "summarise",
    "tables_from_records",
    "write_outputs",
]

DIRECTIONS = (1, 2, 5, 10, 20)
MEASUREMENTS = "measurements.jsonl.gz"


@dataclass
class AlignmentRecord:
    """What the table and plot are made from: the settings (with the wall time and threads
    once the run is over) and, per size, its victim and each phase's measurements (per m,
    each batch's mean cosine, and the ideal cosine's mean over the batches)."""

    settings: dict[str, Any]
    sizes: list[dict[str, Any]]


def _loss(attack: Any, victim: torch.nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """DFME's per-image generator loss at pre-activations `pre` (the victim answering
    probabilities, as the oracle does)."""
    images = attack.generator.to_image(pre)
    probs = torch.softmax(victim(images), dim=1)
    return disagreement(attack.clone(images), probs, attack.config.loss)


def measure_alignment(
    attack: Any,
    victim: torch.nn.Module,
    *,
    directions: tuple[int, ...] = DIRECTIONS,
    batches: int = 20,
    batch_size: int = 64,
    epsilon: float = 1e-3,
    seed: int = 0,
) -> dict[str, Any]:
    """Cosines between DFME's estimate and the exact gradient for each m in `directions`.

    `attack`: a DFME attack after `setup` (its generator, clone and loss are used). Returns
    {"d", "m": {m: {"mean", "low", "high", "ideal", "sqrt_m_over_d", "batches"}}}.
    """
    found = _measure(
        attack,
        victim,
        directions=directions,
        batches=batches,
        batch_size=batch_size,
        epsilon=epsilon,
        seed=seed,
    )
    return _statistics(found["d"], found["directions"])


def _measure(
    attack: Any,
    victim: torch.nn.Module,
    *,
    directions: tuple[int, ...],
    batches: int,
    batch_size: int,
    epsilon: float,
    seed: int,
) -> dict[str, Any]:
    """The measurements: {"d", "directions": [{"m", "cosines", "ideal"}]}: per m each batch's
    mean cosine, and the ideal cosine's mean over the batches."""
    for name, value in (("batches", batches), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a whole number >= 1, got {value!r}")
    if not directions or any(int(m) != m or m < 1 for m in directions):
        raise ValueError(f"directions: expected whole numbers >= 1, got {list(directions)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon: expected > 0, got {epsilon!r}")
    rng = torch.Generator().manual_seed(seed)
    victim.eval()
    measured: dict[int, list[float]] = {m: [] for m in directions}
    ideal: dict[int, list[float]] = {m: [] for m in directions}
    dims = 0
    for _ in range(batches):
        z = torch.randn(batch_size, attack.config.nz, generator=rng)
        with torch.no_grad():
            base = attack.generator.pre_activation(z)
        base = base.contiguous()
        n, dims = base.shape[0], base[0].numel()
        point = base.clone().requires_grad_(True)
        (exact,) = torch.autograd.grad(_loss(attack, victim, point).sum(), point)
        exact = exact.reshape(n, dims)
        for m in directions:
            u = random_directions(n, m, dims, rng)
            with torch.no_grad():
                losses = _loss(attack, victim, probe_points(base, u, epsilon))
            estimate = forward_difference_gradient(losses, u, epsilon)
            measured[m].append(float(F.cosine_similarity(estimate, exact, dim=1).mean()))
            # Exact directional derivatives along the same directions, as probe-point losses.
            slopes = torch.einsum("nmd,nd->nm", u, exact) * epsilon
            linear = torch.cat([torch.zeros(n, 1), slopes], dim=1)
            best = forward_difference_gradient(linear, u, epsilon)
            ideal[m].append(float(F.cosine_similarity(best, exact, dim=1).mean()))
    return {
        "d": dims,
        "directions": [
            {"m": m, "cosines": measured[m], "ideal": statistics.fmean(ideal[m])}
            for m in directions
        ],
    }


def _statistics(d: int, directions: list[dict[str, Any]]) -> dict[str, Any]:
    """Per m: the mean cosine over batches with its 95% bootstrap interval, the ideal one,
    sqrt(m / d), and the batches' cosines."""
    out: dict[str, Any] = {"d": d, "m": {}}
    for row in directions:
        m, cosines = row["m"], row["cosines"]
        mean, low, high = bootstrap_interval({0: dict(enumerate(cosines))})
        out["m"][m] = {
            "mean": mean,
            "low": low,
            "high": high,
            "ideal": row["ideal"],
            "sqrt_m_over_d": math.sqrt(m / d),
            "batches": cosines,
        }
    return out


def measure_sizes(
    sizes: list[str],
    *,
    victims_root: str | Path,
    train_queries: int,
    directions: tuple[int, ...] = DIRECTIONS,
    batches: int = 20,
    batch_size: int = 64,
    epsilon: float = 1e-3,
    seed: int = 0,
    data_root: str | None = None,
    log: Any = print,
) -> AlignmentRecord:
    """Measure every size: its recipe's victim (seed 0, 5,000 validation images held out,
    from `victims_root`/<size>/victims, trained there if absent), DFME's models as set up,
    and after `train_queries` queries of DFME (0: that phase is skipped)."""

    # The benchmark's shared settings (small generator, constant schedule, weight average,
    # compute per query) with the sweep's LeNet-5 clone; DFME's own settings at defaults.
    settings = {**DEFAULTS["settings"], "clone": "lenet5"}
    measure = {
        "directions": directions,
        "batches": batches,
        "batch_size": batch_size,
        "epsilon": epsilon,
        "seed": seed,
    }
    measured = [
        _measure_size(size, settings, measure, victims_root, train_queries, data_root, log)
        for size in sizes
    ]
    about = {
        "directions": list(directions),
        "batches": batches,
        "batch_size": batch_size,
        "epsilon": epsilon,
        "seed": seed,
        "train_queries": train_queries,
        "attack_settings": settings,
    }
    return AlignmentRecord(about, measured)


def _measure_size(
    size: str,
    settings: dict[str, Any],
    measure: dict[str, Any],
    victims_root: str | Path,
    train_queries: int,
    data_root: str | None,
    log: Any,
) -> dict[str, Any]:
    """One size: its victim, and the alignment as DFME sets up and after it trained."""
    dataset, d = SIZES[size]
    victim, path = cached_victim(
        Path(victims_root) / size / "victims",
        dataset,
        "lenet5",
        seed=0,
        validation_images=5000,
        data_root=data_root,
        log=log,
    )
    seed = measure["seed"]
    oracle = LocalOracle(victim, budget=max(train_queries, 1), seed=seed)
    attack = DFME(seed=seed, **settings)
    attack.setup(oracle, iterations=1)
    attack.generator.train()
    t0 = time.time()
    phases = [{"phase": "initial", **_measure(attack, victim, **measure)}]
    phases[0]["seconds"] = round(time.time() - t0, 1)
    if train_queries > 0:
        phases.append(
            {
                "phase": "trained",
                **_trained_phase(
                    oracle, victim, dataset, settings, measure, train_queries, data_root
                ),
            }
        )
    for found in phases:
        log(
            f"alignment: {size} (d = {d}) {found['phase']}: "
            + ", ".join(
                f"m={row['m']} {statistics.fmean(row['cosines']):.4f}"
                for row in found["directions"]
            )
        )
    return {
        "size": size,
        "dataset": dataset,
        "d": d,
        "victim": str(path),
        "victim_accuracy": victim.accuracy,
        "phases": phases,
    }


def _trained_phase(
    oracle: LocalOracle,
    victim: torch.nn.Module,
    dataset: str,
    settings: dict[str, Any],
    measure: dict[str, Any],
    train_queries: int,
    data_root: str | None,
) -> dict[str, Any]:
    """The measurements after a fresh DFME has spent `train_queries` queries on `oracle`."""
    x_test, y_test = load(dataset, data_root).test_tensors()
    attack = DFME(seed=measure["seed"], **settings)
    t0 = time.time()
    result = run(
        attack,
        oracle,
        train_queries,
        evaluator=Evaluator.from_victim(victim, x_test, y_test),
        eval_every=train_queries,
        progress=False,
    )
    if not result.finished:
        raise KeyboardInterrupt  # not the trained state the phase claims
    del x_test, y_test
    attack.generator.train()
    found = _measure(attack, victim, **measure)
    found.update(
        {
            "queries": result.queries_used,
            "clone_accuracy": result.clone_accuracy,
            "seconds": round(time.time() - t0, 1),
        }
    )
    return found


def summarise(record: AlignmentRecord) -> dict[str, Any]:
    """The summary the table and plot are made from: the settings, and per size and phase
    the statistics of each m (:func:`measure_alignment`'s)."""
    sizes = []
    for row in record.sizes:
        phases = {}
        for found in row["phases"]:
            stats = _statistics(found["d"], found["directions"])
            extra = {k: v for k, v in found.items() if k not in ("phase", "d", "directions")}
            phases[found["phase"]] = {**stats, **extra}
        sizes.append({**{k: v for k, v in row.items() if k != "phases"}, "phases": phases})
    return {**record.settings, "sizes": sizes}


def read_record(out: str | os.PathLike) -> AlignmentRecord:
    """The record kept in ``<out>/measurements.jsonl.gz`` (FileNotFoundError or ValueError,
    naming the file, where there is none)."""
    path = Path(out) / MEASUREMENTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no measurements (megex gradient-alignment writes them)")
    rows = records.read_lines(path)
    heads = [r for r in rows if r.get("record") == "settings"]
    sizes = [r for r in rows if r.get("record") == "size"]
    if len(heads) != 1 or len(heads) + len(sizes) != len(rows):
        raise ValueError(
            f"{path}: expected one settings line, then one line per size "
            "(each with 'record' 'settings' or 'size')"
        )
    for row in sizes:
        phases = row.get("size", {}).get("phases")
        if not isinstance(phases, list) or not all("directions" in p for p in phases):
            raise ValueError(f"{path}: {row.get('name')}: no measurements per phase")
    return AlignmentRecord(heads[0]["settings"], [r["size"] for r in sizes])


def _write_record(record: AlignmentRecord, out: Path) -> Path:
    head = {"record": "settings", "name": "settings", "settings": record.settings}
    rows = [{"record": "size", "name": f"size/{r['size']}", "size": r} for r in record.sizes]
    return records.write_lines(out / MEASUREMENTS, [head, *rows])


def markdown(summary: dict[str, Any]) -> str:
    """One row per size, phase and m: measured cosine [interval], ideal, sqrt(m/d), ratio."""
    lines = [
        f"Mean cosine between DFME's estimate (m directions, epsilon {summary['epsilon']:g}) "
        "and the exact gradient of its generator loss (pre-tanh), over "
        f"{summary['batches']} batches of {summary['batch_size']} images [95% bootstrap "
        "interval over batches]; ideal: the same directions with exact directional "
        "derivatives.",
        "",
    ]
    header = ["size", "d", "phase", "m", "cosine", "ideal", "sqrt(m/d)", "cosine / sqrt(m/d)"]
    rows = []
    for row in summary["sizes"]:
        for phase, found in row["phases"].items():
            label = phase
            if phase == "trained":
                label = (
                    f"after {found['queries']:,} queries (clone "
                    f"{100 * found['clone_accuracy']:.1f}%)"
                )
            for m, v in found["m"].items():
                cosine = f"{v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
                rows.append(
                    [
                        row["size"],
                        row["d"],
                        label,
                        m,
                        cosine,
                        f"{v['ideal']:.4f}",
                        f"{v['sqrt_m_over_d']:.4f}",
                        f"{v['mean'] / v['sqrt_m_over_d']:.2f}",
                    ]
                )
    lines += markdown_table(header, rows)
    victims = ", ".join(f"{r['size']} {100 * r['victim_accuracy']:.1f}%" for r in summary["sizes"])
    lines += ["", f"Victims (LeNet-5, recipe seed 0, test accuracy): {victims}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Cosine against m (log-log), one colour per size; dashed: sqrt(m/d)."""
    phases = list(dict.fromkeys(p for r in summary["sizes"] for p in r["phases"]))
    fig, axes = plots.subplots(1, len(phases), figsize=(5.5 * len(phases), 4.2), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        title = "as set up"
        for i, row in enumerate(summary["sizes"]):
            found = row["phases"].get(phase)
            if found is None:
                continue
            if "queries" in found:
                title = f"after {found['queries']:,} queries of DFME"
            colour = f"C{i}"
            ms = [int(m) for m in found["m"]]
            values = list(found["m"].values())
            mean = [v["mean"] for v in values]
            err = [
                [v["mean"] - v["low"] for v in values],
                [v["high"] - v["mean"] for v in values],
            ]
            ax.errorbar(
                ms, mean, yerr=err, marker="o", capsize=3, color=colour,
                label=f"{row['size']} (d = {row['d']})",
            )  # fmt: skip
            ax.plot(ms, [v["sqrt_m_over_d"] for v in values], ls="--", color=colour, lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("directions m")
        ax.set_ylabel("mean cosine with the exact gradient")
        ax.set_title(f"DFME's estimate, {title} (dashed: sqrt(m/d))", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return plots.save(fig, path, dpi=120)


def write_outputs(record: AlignmentRecord, out: Path, plot_too: bool = True) -> list[Path]:
    """measurements.jsonl.gz (the record), then gradient_alignment.json, .md and (with
    `plot_too`) .png made from it, under `out`."""
    kept = _write_record(record, Path(out))
    figures = [("", plot)] if plot_too else []
    made = common.write_outputs(
        summarise(record), Path(out), "gradient_alignment", markdown, figures
    )
    return [kept, *made]


def tables_from_records(out: str | os.PathLike, plot_too: bool = True) -> list[Path]:
    """Write the table (and plot) of the measurements kept in ``<out>/measurements.jsonl.gz``
    again, measuring nothing."""
    figures = [("", plot)] if plot_too else []
    summary = summarise(read_record(out))
    return common.write_outputs(summary, Path(out), "gradient_alignment", markdown, figures)
