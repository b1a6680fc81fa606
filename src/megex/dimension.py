"""The input-size sweep: the query-efficiency benchmark at several input dimensions.

DFME must estimate the generator's gradient from m random directions, and such an estimate
aligns with the true gradient as roughly sqrt(m / d) (:mod:`megex.gradient_alignment`
measures it), so explanations, which give the gradient for one query, should pay more as
the input dimension d grows. The sweep runs the benchmark (`megex bench`) with
``<configs>/dim-<size>.json`` for each size in turn, into ``<out>/<size>/`` (each resumes
where it stopped), then writes one table across sizes: clone accuracy at the largest
budget, and the queries each method needs to reach each fraction of the victim, with how
many times more DFME (m = 1) needs. Settings do not carry over between sizes, so a size
whose config has a `search` block first runs that search (`megex tune`, the same trials and
budget at every size) into ``<out>/<size>/tuning/``, and its benchmark reads the output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["SIZES", "check_search", "combine", "main", "markdown"]

# size name -> (dataset, input dimension d = C * H * W)
SIZES: dict[str, tuple[str, int]] = {
    "14": ("fashion-mnist-14", 14 * 14),
    "28": ("fashion-mnist", 28 * 28),
    "56": ("fashion-mnist-56", 56 * 56),
    "colour-56": ("fashion-mnist-colour-56", 3 * 56 * 56),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/dimension.py",
        description="The query-efficiency benchmark at every input size, then one table "
        "across sizes. Options not listed here (--jobs, --threads, --budgets, --seeds, "
        "--victim-seeds, --methods, --no-plot, --no-progress, --fresh, --ray ...) are passed "
        "to megex bench for every size.",
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=list(SIZES),
        default=list(SIZES),
        help="sizes to run, in this order (default: all)",
    )
    parser.add_argument(
        "--configs",
        default="benchmarks/configs",
        help="folder holding dim-<size>.json (default: benchmarks/configs)",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/dims",
        help="output folder; size s goes to OUT/s (default: benchmarks/results/dims)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="megex bench --quick at every size (a size's search is not shortened)",
    )
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing; write the table across sizes from the finished benchmarks "
        "(the table always covers every size finished under --out)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; the exit status of the first size that fails, else 0."""
    from .bench import load_config
    from .cli import build_parser as megex_parser
    from .cli import main as megex_main

    args, forwarded = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    steps: list[tuple[str, list[str]]] = []
    for size in args.sizes:
        config = Path(args.configs) / f"dim-{size}.json"
        if not config.is_file():
            print(f"dimension: --configs: no {config.name} in {args.configs}", file=sys.stderr)
            return 2
        try:
            search = load_config(config).get("search")
            if search is not None:
                check_search(search, config.name)
        except ValueError as err:
            print(f"dimension: {err}", file=sys.stderr)
            return 2
        command = ["bench", "--config", str(config), "--out", str(out / size), *forwarded]
        if search:
            # This size's own search first (resumable); the benchmark reads its output.
            tuning = out / size / "tuning"
            steps.append((size, search_command(config, tuning, search, forwarded)))
            command += ["--settings-file", str(tuning / "tuned.json")]
        steps.append((size, [*command, "--quick"] if args.quick else command))
    # Every step's options are checked before the first one starts (hours later, a typo
    # would stop the sweep half way).
    for _, command in steps:
        megex_parser().parse_args(command)
    if not args.summary_only:
        for size, command in steps:
            print(f"dimension: size {size}: megex {' '.join(command)}", file=sys.stderr)
            status = megex_main(command)
            if status:
                return status
    stem = "query_efficiency_quick" if args.quick else "query_efficiency"
    # Every size with a finished benchmark under --out, not only those run now: running one
    # size alone must not drop the others from the table across sizes.
    summary = combine(out, list(SIZES), stem)
    if not summary["sizes"]:
        print(f"dimension: no finished benchmark under {out}", file=sys.stderr)
        return 1
    paths = write_outputs(summary, out, "dimension_quick" if args.quick else "dimension")
    print(f"dimension: wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


# What a config's `search` block may hold: the methods to search, then the search's own
# settings, as `megex tune` options.
SEARCH_KEYS = ("methods", "trials", "budget", "confirm_trials", "confirm_seeds")


def check_search(search: Any, name: str) -> None:
    """Refuse a `search` block that the sweep would misread, before anything runs."""
    if not isinstance(search, dict):
        raise ValueError(f"{name}: 'search' must be an object, got {search!r}")
    unknown = sorted(set(search) - set(SEARCH_KEYS))
    if unknown:
        raise ValueError(
            f"{name}: 'search' has unknown keys {unknown}; expected {', '.join(SEARCH_KEYS)}"
        )
    methods = search.get("methods")
    if not (isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods)):
        raise ValueError(
            f"{name}: 'search' needs 'methods', a list of the method names to search, "
            f"got {methods!r}"
        )


def search_command(
    config: Path, out: Path, search: dict[str, Any], forwarded: list[str]
) -> list[str]:
    """`megex tune` for one size's config: its search's methods, trials, budget and
    confirmation step, and the
    sweep's options that a search has too (workers, threads, device, data, Ray)."""
    shared = argparse.ArgumentParser(add_help=False)
    for option in ("--jobs", "--threads", "--device", "--data-root", "--retries"):
        shared.add_argument(option)
    shared.add_argument("--ray", nargs="?", const="")
    known, _ = shared.parse_known_args(forwarded)
    command = ["tune", "--config", str(config), "--out", str(out)]
    for option, value in vars(known).items():
        if value is not None:
            flag = "--" + option.replace("_", "-")
            command += [flag] if value == "" else [flag, value]
    command += ["--methods", *search["methods"]]
    for key in ("trials", "budget", "confirm_trials"):
        if key in search:
            command += [f"--{key.replace('_', '-')}", str(search[key])]
    if "confirm_seeds" in search:
        command += ["--confirm-seeds", *(str(seed) for seed in search["confirm_seeds"])]
    return command


def combine(out: Path, sizes: list[str], stem: str = "query_efficiency") -> dict[str, Any]:
    """The figures across sizes, from each size's benchmark summary (sizes not yet run are
    left out)."""
    rows = []
    for size in sizes:
        path = Path(out) / size / f"{stem}.json"
        if not path.is_file():
            continue
        bench = json.loads(path.read_text())
        largest = max(bench["budgets"])
        methods = {}
        for method, by_budget in bench["stats"].items():
            cell = by_budget.get(str(largest)) or by_budget.get(largest)
            methods[method] = {
                "accuracy": cell["interval"] if cell else None,
                "ratio": cell["ratio"] if cell else None,
                "reach": {
                    target: {
                        key: value for key, value in by_method[method].items() if key != "per_run"
                    }
                    for target, by_method in bench["queries_to_reach"].items()
                    if method in by_method
                },
            }
        dataset, d = SIZES[size]
        rows.append(
            {
                "size": size,
                "dataset": dataset,
                "d": d,
                "victim_accuracy": bench["victim_accuracy"],
                "budget": largest,
                "baseline": bench["baseline"],
                "methods": methods,
                "source": str(path),
            }
        )
    return {"stem": stem, "sizes": rows}


def _interval(i: dict[str, float], scale: float, digits: int) -> str:
    if i is None:
        return "-"
    if math.isnan(i["low"]):
        return f"{scale * i['estimate']:.{digits}f}"
    return (
        f"{scale * i['estimate']:.{digits}f} [{scale * i['low']:.{digits}f}, "
        f"{scale * i['high']:.{digits}f}]"
    )


def markdown(summary: dict[str, Any]) -> str:
    """One row per size and method: accuracy at the largest budget, queries to each target."""
    from .bench_report import saved_cell

    rows = summary["sizes"]
    targets = sorted({t for r in rows for m in r["methods"].values() for t in m["reach"]})
    lines = [
        "Clone test accuracy % at the largest budget (mean [95% interval], x the victim), and "
        "queries to reach each fraction of the victim's accuracy (median [95% interval]; "
        "baseline needs k x: the geometric mean over paired runs of the baseline's queries "
        "over the method's; '>= k x' or '<= k x' where runs that never reached the fraction "
        "count as the largest budget, which makes k a bound).",
        "",
        "| size | d | victim | method | accuracy at budget | "
        + " | ".join(f"queries to {t}x" for t in targets)
        + " |",
        "|" + " --- |" * (5 + len(targets)),
    ]
    for r in rows:
        for method, m in r["methods"].items():
            acc = _interval(m["accuracy"], 100, 1)
            if m["ratio"] is not None:
                acc += f" ({m['ratio']:.2f}x) at {r['budget']:,}"
            cells = []
            for t in targets:
                reach = m["reach"].get(t, {})
                if "median" in reach:
                    cell = _interval(reach["median"], 1, 0) + saved_cell(reach, r["baseline"])
                elif "runs" in reach:
                    cell = f"reached in {reach['reached']}/{reach['runs']} runs"
                    cell += saved_cell(reach, r["baseline"])
                else:
                    cell = "-"
                cells.append(cell)
            lines.append(
                f"| {r['size']} | {r['d']} | {100 * r['victim_accuracy']:.1f}% | {method} | "
                f"{acc} | " + " | ".join(cells) + " |"
            )
    sources = ", ".join(r["source"] for r in rows)
    lines += ["", f"From {sources}."]
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict[str, Any], out: Path, stem: str) -> list[Path]:
    from .runs import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    write_json_atomic(paths[0], summary)
    write_text_atomic(paths[1], markdown(summary))
    try:
        paths.append(plot(summary, out / f"{stem}.png"))
    except ImportError:
        print(
            "plot: matplotlib is not installed (pip install 'megex[plots]'); PNG skipped",
            file=sys.stderr,
        )
    return paths


# The paper's inputs (SVHN, CIFAR-10: 3 x 32 x 32), marked on the plot.
PAPER_D = 3 * 32 * 32
# Marker per kind of ratio (by its sign in bench_report.SAVED_KINDS): exact, or a bound
# where some runs never reached the target.
_MARKERS = {"": "o", ">= ": "^", "<= ": "v"}


def saved_points(summary: dict[str, Any], method: str, target: str) -> list[tuple]:
    """(d, kind, estimate, low, high) for each size where the queries saved by `method` to
    `target` are known, exactly or as a bound (kind: a key of bench_report.SAVED_KINDS)."""
    from .bench_report import SAVED_KINDS, interval_ends

    points = []
    for row in summary["sizes"]:
        reach = row["methods"].get(method, {}).get("reach", {}).get(target, {})
        for kind, _ in SAVED_KINDS:
            if kind in reach:
                ratio = reach[kind]
                points.append((row["d"], kind, ratio["estimate"], *interval_ends(ratio)))
    return points


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Queries saved by explanations against d (baseline's queries over the method's, to each
    target, log-log), one panel per target with a measured ratio, the paper's d marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from .bench_report import SAVED_KINDS

    rows = summary["sizes"]
    baseline = rows[0]["baseline"] if rows else "dfme"
    methods = sorted({m for r in rows for m in r["methods"]} - {baseline})
    targets = sorted({t for r in rows for m in r["methods"].values() for t in m["reach"]})
    by_target = {t: {m: saved_points(summary, m, t) for m in methods} for t in targets}
    panels = [t for t in targets if any(by_target[t].values())]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    measured_ds = sorted({r["d"] for r in rows})
    ds = measured_ds + [PAPER_D]
    for ax, target in zip(axes, panels):
        for i, method in enumerate(methods):
            points = by_target[target][method]
            if not points:
                continue
            color = f"C{i}"
            ax.plot([p[0] for p in points], [p[2] for p in points], color=color, lw=1)
            for kind, sign in SAVED_KINDS:
                chosen = [p for p in points if p[1] == kind]
                if not chosen:
                    continue
                est = [p[2] for p in chosen]
                err = [[e - p[3] for e, p in zip(est, chosen)],
                       [p[4] - e for e, p in zip(est, chosen)]]  # fmt: skip
                note = f" ({sign.strip()})" if sign else ""
                ax.errorbar([p[0] for p in chosen], est, yerr=err, marker=_MARKERS[sign],
                            ls="none", capsize=3, color=color, label=f"{method}{note}")  # fmt: skip
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axvline(PAPER_D, color="grey", ls="--", lw=1, label="paper's inputs, d = 3,072")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(min(ds) / 1.5, max(ds) * 1.5)
        # Ticks at the measured sizes (the paper's is the labelled line: at 3,072 its tick
        # would overprint 56x56's 3,136), and at powers of 2 of the ratio.
        ax.set_xticks(measured_ds)
        shown = [v for pts in by_target[target].values() for pt in pts for v in pt[3:]]
        bottom, top = min(shown + [1.0]) / 1.3, max(shown + [1.0]) * 1.3
        ax.set_yticks([2.0**k for k in range(-8, 9) if bottom <= 2.0**k <= top])
        ax.set_ylim(bottom, top)
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("input dimension d = C x H x W")
        ax.set_ylabel(f"{baseline}'s queries / method's, to {target}x the victim")
        ax.set_title(f"queries saved to {target}x (95% interval)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if not panels:
        axes[0].text(0.5, 0.5, "no target reached by both a method and the baseline",
                     ha="center", transform=axes[0].transAxes)  # fmt: skip
    fig.tight_layout()
    from .runs import save_figure_atomic

    return save_figure_atomic(fig, path, dpi=120)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
