"""Detection benchmark: do the query monitors see the attacks coming, and how often do they
flag clients that are not attacking?

For each victim (the benchmark's recipe; the last `validation_images` training images held
out of its training split):

1. attack streams: every method (e.g. megex-all, dfme, megex-jacobian) and seed attacks an
   in-process oracle up to `queries`, its queries recorded in order
   (:class:`~megex.detection.RecordingOracle`); the attacks' settings are the query-
   efficiency benchmark's (:mod:`megex.bench`: shared settings, then the tuned ones when a
   settings file is given);
2. benign streams of the same length, each drawing distinct images in random order:
   "clean" (as they are), "noise" (Gaussian noise added), "augment" (random shifts, flips
   and brightness). Calibration streams come from the validation images, test streams from
   the test split, which nothing is chosen on;
3. each monitor's threshold is chosen on the calibration streams for the target
   false-positive rate (:func:`~megex.detection.calibrate`; a calibration file per monitor
   and victim, which ``megex serve --monitor NAME:calibration=FILE`` takes), and every
   stream is replayed through every monitor.

Reported: per monitor and method, the detection rate over victims and seeds and the queries
until detection (median and range, over the runs detected); per monitor and benign kind, the
false-positive rate on the test streams; and the same for "any monitor". Writes
<out>/<stem>.json and <stem>.md. Everything runs in one process and takes minutes, so there
is nothing to resume.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

__all__ = [
    "BENIGN_KINDS",
    "DEFAULTS",
    "add_arguments",
    "attack_stream",
    "benign_stream",
    "load_config",
    "main",
    "run_detection",
]

BENIGN_KINDS = ("clean", "noise", "augment")

DEFAULTS: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "victim_arch": None,  # None: the dataset's recipe
    "victim_seeds": [0, 1, 2],
    # Held out of every victim's training split (as in the query-efficiency benchmark):
    # the calibration streams draw from these, never from the test split.
    "validation_images": 5000,
    "methods": ["megex-all", "megex-predicted", "megex-jacobian", "dfme"],
    "seeds": [0, 1, 2, 3, 4],
    # Queries per stream, attack and benign alike: the horizon of detection and of the
    # false-positive rate. A benign stream draws distinct images, so at most the pool.
    "queries": 5000,
    "benign_kinds": list(BENIGN_KINDS),
    "calibration_streams": 20,  # per kind and victim
    "test_streams": 20,  # per kind and victim
    "target_fpr": 0.05,
    "noise_std": 0.1,
    "augment": {"shift": 2, "flip": True, "brightness": [0.7, 1.3]},
    # Monitor name -> settings (the threshold is calibrated).
    "monitors": {"prada": {}, "ood": {"score": "msp", "window": 100}},
    # The attacks: the query-efficiency benchmark's shared settings; tuned ones only from a
    # settings file (null: the package defaults, with a warning).
    "settings": {
        "ngf": 8,
        "lr_schedule": "constant",
        "clone_ema": 0.999,
        "clone_updates_per_1k_queries": 25.0,
    },
    "method_settings": {},
    "tuned_settings": None,
    "device": "cpu",
    "quick_queries": 2000,
    "quick_seeds": [0, 1],
    "quick_victim_seeds": [0],
    "quick_streams": 6,  # calibration and test streams per kind and victim
}


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The benchmark's settings: DEFAULTS updated by a JSON file's keys (if given)."""
    from .bench import check_methods, merged_config
    from .detection import MONITORS

    config = merged_config(DEFAULTS, path, ("settings", "method_settings", "augment"))
    check_methods(config["methods"])
    for name in config["monitors"]:
        if name not in MONITORS:
            raise ValueError(f"monitor: unknown {name!r}; expected one of {', '.join(MONITORS)}")
    for kind in config["benign_kinds"]:
        if kind not in BENIGN_KINDS:
            raise ValueError(
                f"benign kind: unknown {kind!r}; expected one of {', '.join(BENIGN_KINDS)}"
            )
    if not 0 <= float(config["target_fpr"]) < 1:
        raise ValueError(f"target_fpr: expected in [0, 1), got {config['target_fpr']}")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (the `megex detection` subcommand)."""
    parser.add_argument(
        "--config",
        help="JSON file of benchmark settings (the keys of megex.detection_bench.DEFAULTS)",
    )
    parser.add_argument("--data-root", help="folder holding the dataset's files")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one victim, two seeds, shorter streams, fewer benign streams (minutes)",
    )
    parser.add_argument("--queries", type=int, help="queries per stream (attack and benign)")
    parser.add_argument("--seeds", type=int, nargs="+", help="attack seeds")
    parser.add_argument("--victim-seeds", type=int, nargs="+", help="victims (recipe seeds)")
    parser.add_argument("--methods", nargs="+", help="attack methods (megex bench's names)")
    parser.add_argument("--streams", type=int, help="calibration and test streams per kind")
    parser.add_argument("--target-fpr", type=float, help="target false-positive rate per key")
    parser.add_argument(
        "--settings-file",
        metavar="PATH",
        help="tuned attack settings (megex tune's tuned.json); it must hold every method "
        "(default: the config's tuned_settings; none: the package defaults)",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/detection",
        help="output folder: tables and calibration files",
    )
    parser.add_argument(
        "--victims",
        default="benchmarks/results/victims",
        help="folder of cached victims (shared with megex bench)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", help="cpu or cuda for the attacks (default: the config's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`megex detection` (benchmarks/detection.py calls this), with megex.cli's exit
    statuses."""
    from .cli import main as cli_main

    return cli_main(["detection", *(sys.argv[1:] if argv is None else argv)])


# --- streams ------------------------------------------------------------------------------


def benign_stream(
    pool: Any, victim: Any, kind: str, length: int, seed: int, config: dict[str, Any]
) -> Any:
    """`length` distinct images of `pool` in random order, as `kind` makes them, with the
    victim's probabilities."""
    import torch

    from .detection import QueryStream

    if length > len(pool):
        raise ValueError(f"benign stream: {length} queries from a pool of {len(pool)} images")
    gen = torch.Generator().manual_seed(seed)
    x = pool[torch.randperm(len(pool), generator=gen)[:length]].clone()
    if kind == "noise":
        x = (x + float(config["noise_std"]) * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    elif kind == "augment":
        x = _augment(x, config["augment"], gen)
    elif kind != "clean":
        raise ValueError(f"benign kind: unknown {kind!r}")
    return QueryStream.from_victim(victim, x, name=f"{kind}-{seed}")


def _augment(x: Any, settings: dict[str, Any], gen: Any) -> Any:
    """Random shifts (up to `shift` pixels, circular), horizontal flips and brightness."""
    import torch

    n = len(x)
    shift = int(settings.get("shift", 0))
    if shift > 0:
        offsets = torch.randint(-shift, shift + 1, (n, 2), generator=gen)
        for dy, dx in {tuple(o) for o in offsets.tolist()}:
            rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().flatten()
            x[rows] = torch.roll(x[rows], shifts=(dy, dx), dims=(2, 3))
    if settings.get("flip"):
        flip = torch.rand(n, generator=gen) < 0.5
        x[flip] = x[flip].flip(3)
    low, high = settings.get("brightness", (1.0, 1.0))
    if (low, high) != (1.0, 1.0):
        factor = low + (high - low) * torch.rand(n, 1, 1, 1, generator=gen)
        x = (x * factor).clamp(0, 1)
    return x


def attack_stream(
    method: str,
    attack_name: str,
    settings: dict[str, Any],
    seed: int,
    victim: Any,
    queries: int,
    device: str,
) -> Any:
    """The queries of one attack run against an in-process oracle, in order."""
    from .bench import build_attack
    from .detection import RecordingOracle
    from .engine import run
    from .oracle import LocalOracle

    attack = build_attack(attack_name, settings, seed, device)
    explanation = getattr(attack.config, "explanation", None)
    oracle = LocalOracle(victim, budget=queries, explanation=explanation, seed=seed, device=device)
    recorder = RecordingOracle(oracle)
    if not run(attack, recorder, queries, progress=False).finished:
        raise KeyboardInterrupt  # a cut-off stream must not be scored
    return recorder.stream(name=f"{method}-{seed}")


# --- the benchmark ------------------------------------------------------------------------


def _plan(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What to run, with every setting checked before any victim is trained."""
    from .bench import METHODS, apply_settings_file, load_tuned, method_settings, require_tuned
    from .detection import MONITORS

    apply_settings_file(config, args.settings_file)

    def pick(given: Any, key: str, quick_key: str) -> Any:
        return given if given is not None else config[quick_key if args.quick else key]

    plan = {
        "queries": pick(args.queries, "queries", "quick_queries"),
        "seeds": pick(args.seeds, "seeds", "quick_seeds"),
        "victim_seeds": pick(args.victim_seeds, "victim_seeds", "quick_victim_seeds"),
        "methods": args.methods or config["methods"],
        "target_fpr": config["target_fpr"] if args.target_fpr is None else args.target_fpr,
        "calibration_streams": pick(args.streams, "calibration_streams", "quick_streams"),
        "test_streams": pick(args.streams, "test_streams", "quick_streams"),
    }
    for name in plan["methods"]:
        if name not in METHODS:
            raise ValueError(f"--methods: unknown {name!r}; expected one of {', '.join(METHODS)}")
    if not 0 <= float(plan["target_fpr"]) < 1:
        raise ValueError(f"--target-fpr: expected in [0, 1), got {plan['target_fpr']}")
    for key, value in [
        *((k, plan[k]) for k in ("queries", "calibration_streams", "test_streams")),
        ("threads", args.threads),
    ]:
        if int(value) < 1:
            raise ValueError(f"{key}: expected >= 1, got {value}")
    tuned = load_tuned(config)
    if not tuned:
        _log(
            "detection: warning: the attacks run untuned (the package defaults and the "
            "shared settings): pass --settings-file with megex tune's tuned.json for tuned "
            "attackers"
        )
    attacks = {}
    for method in plan["methods"]:
        require_tuned(config, method, tuned)
        attacks[method] = method_settings(config, method, tuned)
    plan["attacks"] = attacks
    plan["monitors"] = {}
    for name, params in config["monitors"].items():
        cls = MONITORS[name]
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            raise ValueError(
                f"monitors: {name} has no setting {unknown[0]!r}; expected {', '.join(cls.PARAMS)}"
            )
        plan["monitors"][name] = cls(threshold=None, **params)
    return plan


def run_detection(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by `args`; write JSON and markdown; return the summary."""
    from . import data as data_mod
    from .bench import prepare_torch
    from .detection import calibrate
    from .victim import cached_victim

    config = load_config(args.config)
    if args.device:
        config["device"] = args.device
    plan = _plan(config, args)
    queries = int(plan["queries"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_torch(args.threads, config["device"])
    t0, load_before = time.time(), _load()
    ds = data_mod.load(config["dataset"], args.data_root)
    x_val, _ = ds.validation_tensors(int(config["validation_images"]))
    x_test, _ = ds.test_tensors()
    for name, pool in (("validation images", x_val), ("test images", x_test)):
        if queries > len(pool):
            raise ValueError(
                f"queries: {queries} is more than the {len(pool)} {name}; a benign stream draws "
                "distinct images: lower --queries (or raise validation_images)"
            )
    monitors = plan["monitors"]
    kinds = config["benign_kinds"]
    victims, calibrations, attack_runs, benign_runs = {}, {}, [], []
    for victim_seed in plan["victim_seeds"]:
        victim, path = cached_victim(
            args.victims,
            config["dataset"],
            config["victim_arch"],
            seed=victim_seed,
            validation_images=int(config["validation_images"]),
            data_root=args.data_root,
            device=config["device"],
            log=_log,
        )
        victim = victim.eval()
        victims[victim_seed] = {"path": str(path), "arch": victim.arch, "accuracy": victim.accuracy}
        about = {
            "dataset": config["dataset"],
            "victim": Path(path).name,
            "victim_arch": victim.arch,
            "victim_seed": victim_seed,
            "input_shape": list(victim.input_shape),
            "validation_images": int(config["validation_images"]),
            "kinds": kinds,
        }
        # Calibration: validation streams only. Seeds apart from the test streams'.
        streams = [
            benign_stream(x_val, victim, kind, queries, 1_000_000 + 1000 * victim_seed + i, config)
            for kind in kinds
            for i in range(int(plan["calibration_streams"]))
        ]  # fmt: skip
        for name, monitor in monitors.items():
            calibration = calibrate(monitor, streams, float(plan["target_fpr"]), about=about)
            stem = f"{name}-{config['dataset']}-{victim.arch}-seed{victim_seed}"
            calibration.save(out / "calibration" / f"{stem}.json")
            calibrations[(name, victim_seed)] = calibration
            _log(
                f"detection: victim {victim_seed}: {name} threshold {calibration.threshold:.4f} "
                f"({calibration.calibration_fpr:.2f} of {calibration.streams} validation streams "
                "flagged)"
            )
        del streams
        for kind in kinds:
            for i in range(int(plan["test_streams"])):
                stream = benign_stream(
                    x_test, victim, kind, queries, 1000 * victim_seed + i, config
                )
                benign_runs.append(
                    {"victim_seed": victim_seed, "kind": kind, "stream": i,
                     **_score(stream, monitors, calibrations, victim_seed)}
                )  # fmt: skip
        for method, (attack_name, settings) in plan["attacks"].items():
            for seed in plan["seeds"]:
                started = time.time()
                stream = attack_stream(
                    method, attack_name, settings, seed, victim, queries, config["device"]
                )
                scored = _score(stream, monitors, calibrations, victim_seed)
                attack_runs.append(
                    {"method": method, "victim_seed": victim_seed, "seed": seed,
                     "queries": len(stream), "wall_s": round(time.time() - started, 1), **scored}
                )  # fmt: skip
                shown = ", ".join(
                    f"{name} at {r['detected_at']}" if r["detected_at"] else f"{name} no"
                    for name, r in scored["monitors"].items()
                )
                _log(f"detection: {method} victim {victim_seed} seed {seed}: {shown}")
    summary = _summarise(config, plan, victims, calibrations, attack_runs, benign_runs)
    summary["wall_s"] = round(time.time() - t0, 1)
    summary["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": _load(),
    }
    stem = "detection_quick" if args.quick else "detection"
    paths = _write(summary, out, stem)
    _log(f"detection: {summary['wall_s']:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return summary


def _score(stream: Any, monitors: dict, calibrations: dict, victim_seed: int) -> dict[str, Any]:
    """Each monitor's most suspicious statistic on `stream` and the query it is flagged at
    (None: never) with the victim's calibrated threshold; and any monitor's first flag."""
    from .detection import extreme, first_crossing, replay

    scored = {}
    for name, monitor in monitors.items():
        measured = replay(monitor.fresh(threshold=None), stream)
        threshold = calibrations[(name, victim_seed)].threshold
        hit = first_crossing(measured, threshold, monitor.flags_when)
        scored[name] = {
            "extreme": extreme(measured, monitor.flags_when),
            "detected_at": None if hit is None else hit.queries_seen,
        }
    hits = [r["detected_at"] for r in scored.values() if r["detected_at"] is not None]
    return {"monitors": scored, "any_detected_at": min(hits) if hits else None}


def _summarise(config, plan, victims, calibrations, attack_runs, benign_runs) -> dict[str, Any]:
    names = [*config["monitors"], "any"]

    def detected_at(run: dict[str, Any], name: str) -> int | None:
        return run["any_detected_at"] if name == "any" else run["monitors"][name]["detected_at"]

    detection = {}
    for name in names:
        for method in plan["methods"]:
            runs = [r for r in attack_runs if r["method"] == method]
            hits = [detected_at(r, name) for r in runs if detected_at(r, name) is not None]
            detection.setdefault(name, {})[method] = {
                "runs": len(runs),
                "detected": len(hits),
                "rate": len(hits) / len(runs) if runs else None,
                "median_queries": statistics.median(hits) if hits else None,
                "min_queries": min(hits) if hits else None,
                "max_queries": max(hits) if hits else None,
            }
    false_positives = {}
    for name in names:
        for kind in config["benign_kinds"]:
            runs = [r for r in benign_runs if r["kind"] == kind]
            flagged = sum(detected_at(r, name) is not None for r in runs)
            false_positives.setdefault(name, {})[kind] = {
                "streams": len(runs),
                "flagged": flagged,
                "rate": flagged / len(runs) if runs else None,
            }
    return {
        "benchmark": "detection",
        "dataset": config["dataset"],
        "queries": int(plan["queries"]),
        "target_fpr": float(plan["target_fpr"]),
        "seeds": plan["seeds"],
        "victims": {str(k): v for k, v in victims.items()},
        "methods": plan["methods"],
        "attack_settings": {m: {"attack": a, **s} for m, (a, s) in plan["attacks"].items()},
        "tuned_settings": config["tuned_settings"],
        "monitors": config["monitors"],
        "benign": {
            "kinds": config["benign_kinds"],
            "calibration_streams_per_kind": int(plan["calibration_streams"]),
            "test_streams_per_kind": int(plan["test_streams"]),
            "noise_std": config["noise_std"],
            "augment": config["augment"],
        },
        "thresholds": [
            {
                "monitor": name,
                "victim_seed": seed,
                "threshold": c.threshold,
                "flags_when": "below" if name == "prada" else "above",
                "calibration_fpr": c.calibration_fpr,
                "streams": c.streams,
            }
            for (name, seed), c in calibrations.items()
        ],
        "detection": detection,
        "false_positives": false_positives,
        "attack_runs": attack_runs,
        "benign_runs": benign_runs,
    }


def markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown tables."""
    q = summary["queries"]
    victims = ", ".join(
        f"seed {seed} ({v['arch']}, test accuracy {v['accuracy']:.4f})"
        for seed, v in summary["victims"].items()
    )
    benign = summary["benign"]
    lines = [
        f"# Detection of extraction traffic ({summary['dataset']})",
        "",
        f"Victims: {victims}. Streams of {q} queries per key. Thresholds for a target "
        f"false-positive rate of {summary['target_fpr']:.0%} per benign key within {q} "
        f"queries, chosen per victim on {benign['calibration_streams_per_kind']} validation "
        f"streams per kind ({', '.join(benign['kinds'])}; images held out of the victim's "
        "training split); false positives counted on "
        f"{benign['test_streams_per_kind']} test-split streams per kind and victim. Attack "
        "settings: "
        + (
            f"tuned ({summary['tuned_settings']})."
            if summary["tuned_settings"]
            else "untuned (package defaults and the benchmark's shared settings)."
        ),
        "",
        f"## Attacks detected within {q} queries",
        "",
        '"any": flagged by any monitor, each at its own threshold (so its false-positive '
        "rate can reach the sum of theirs). Queries until detection: over the runs detected.",
        "",
        "| monitor | method | detected | rate [95% interval] | queries until detection: "
        "median | range |",
        "| --- | --- | --- | --- | ---: | --- |",
    ]
    for name, methods in summary["detection"].items():
        for method, d in methods.items():
            median = "-" if d["median_queries"] is None else f"{d['median_queries']:g}"
            span = "-" if d["min_queries"] is None else f"{d['min_queries']}-{d['max_queries']}"
            lines.append(
                f"| {name} | {method} | {d['detected']}/{d['runs']} | "
                f"{_rate(d['detected'], d['runs'])} | {median} | {span} |"
            )
    lines += [
        "",
        "## Benign test streams flagged (false positives)",
        "",
        '95% Wilson intervals; "all" pools the kinds.',
        "",
        "| monitor | kind | flagged | rate [95% interval] |",
        "| --- | --- | --- | --- |",
    ]
    for name, kinds in summary["false_positives"].items():
        for kind, f in kinds.items():
            lines.append(
                f"| {name} | {kind} | {f['flagged']}/{f['streams']} | "
                f"{_rate(f['flagged'], f['streams'])} |"
            )
        flagged = sum(f["flagged"] for f in kinds.values())
        streams = sum(f["streams"] for f in kinds.values())
        if len(kinds) > 1 and streams:
            lines.append(f"| {name} | all | {flagged}/{streams} | {_rate(flagged, streams)} |")
    lines += [
        "",
        "## Thresholds",
        "",
        "| monitor | victim | flags when the statistic is | threshold | validation streams "
        "flagged |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for t in summary["thresholds"]:
        lines.append(
            f"| {t['monitor']} | {t['victim_seed']} | {t['flags_when']} | {t['threshold']:.4f} "
            f"| {t['calibration_fpr']:.2f} of {t['streams']} |"
        )
    machine = summary.get("machine", {})
    lines += [
        "",
        f"Wall time {summary.get('wall_s', 0):.0f} s on {machine.get('cpus')} CPUs "
        f"(load average {machine.get('load_average_before')} before, "
        f"{machine.get('load_average_after')} after).",
        "",
    ]
    return "\n".join(lines)


def _rate(count: int, total: int) -> str:
    """A proportion with its 95% Wilson interval, or '-' when there is nothing to count."""
    from .stats import wilson_interval

    if not total:
        return "-"
    low, high = wilson_interval(count, total)
    return f"{count / total:.2f} [{low:.2f}, {high:.2f}]"


def _write(summary: dict[str, Any], out: Path, stem: str) -> list[Path]:
    from .runs import write_json_atomic, write_text_atomic

    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_json_atomic(json_path, summary)
    write_text_atomic(md_path, markdown(summary))
    return [json_path, md_path, out / "calibration"]


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without it
        return None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
