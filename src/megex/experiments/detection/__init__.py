"""Detection benchmark: do the query monitors see the attacks coming, and how often do they
flag clients that are not attacking?

For each victim (the benchmark's recipe; the last `validation_images` training images held
out of its training split):

1. attack streams: every method (e.g. megex-all, dfme, megex-jacobian) and seed attacks an
   in-process oracle up to `queries`, its queries recorded in order
   (:class:`~megex.detection.RecordingOracle`); the attacks' settings are the query-
   efficiency benchmark's (:mod:`megex.experiments.query_efficiency`: shared settings,
   then the tuned ones when a settings file is given);
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
<out>/<stem>.json and <stem>.md, and keeps what they are made from (the calibrations and every
stream's scores) in <out>/scores.jsonl.gz (:mod:`.scores`), from which
:func:`tables_from_records` writes them again without running an attack. Everything runs in
one process and takes minutes, so there is nothing to resume.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ... import data as data_mod
from ...detection import MONITORS, Calibration, calibrate
from ...victim import cached_victim
from .. import config as config_files
from ..common import log
from ..methods import (
    METHODS,
    apply_settings_file,
    check_methods,
    load_tuned,
    method_settings,
    require_tuned,
)
from ..runner import prepare_torch
from . import scores
from .config import BENIGN_KINDS, DEFAULTS, DetectionConfig
from .report import describe, summarise, write_outputs
from .scores import DetectionRecord
from .streams import attack_stream, benign_stream, score_stream

__all__ = [
    "BENIGN_KINDS",
    "DEFAULTS",
    "DetectionConfig",
    "attack_stream",
    "benign_stream",
    "load_config",
    "run_detection",
    "tables_from_records",
]


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The benchmark's settings: DEFAULTS updated by a JSON file's keys (if given)."""
    merged = ("settings", "method_settings", "augment")
    config = config_files.load(DetectionConfig, path, merged)
    check_methods(config["methods"])
    for name in config["monitors"]:
        if name not in MONITORS:
            raise ValueError(f"monitor: unknown {name!r}; expected one of {', '.join(MONITORS)}")
    return config


# --- the benchmark ------------------------------------------------------------------------


def _plan(config: dict[str, Any], args: Any) -> dict[str, Any]:
    """What to run, with every setting checked before any victim is trained."""
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
        log(
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


def run_detection(args: Any) -> dict[str, Any]:
    """Run the benchmark described by `args`; write JSON and markdown; return the summary."""
    config = load_config(args.config)
    if args.device:
        config["device"] = args.device
    plan = _plan(config, args)
    out = Path(args.out)
    scores.check_writable(out)  # refused now, not after the run
    out.mkdir(parents=True, exist_ok=True)
    prepare_torch(args.threads, config["device"])
    t0, load_before = time.time(), _load()
    x_val, x_test = _image_pools(config, args.data_root, int(plan["queries"]))
    victims, calibrations, attack_runs, benign_runs = {}, {}, [], []
    for victim_seed in plan["victim_seeds"]:
        victim, path = cached_victim(
            args.victims,
            config["dataset"],
            config["victim_arch"],
            seed=victim_seed,
            validation_images=int(config["validation_images"]),
            pool_images=int(config["pool_images"]),
            data_root=args.data_root,
            device=config["device"],
            log=log,
        )
        victim = victim.eval()
        victims[victim_seed] = {"path": str(path), "arch": victim.arch, "accuracy": victim.accuracy}
        calibrations.update(_calibrate(config, plan, victim, path, victim_seed, x_val, out))
        benign_runs += _benign_runs(config, plan, victim, victim_seed, x_test, calibrations)
        attack_runs += _attack_runs(config, plan, victim, victim_seed, calibrations, args.data_root)
    benchmark = describe(config, plan, victims)
    benchmark["wall_s"] = round(time.time() - t0, 1)
    benchmark["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": _load(),
    }
    record = DetectionRecord(
        benchmark, [c.to_dict() for c in calibrations.values()], attack_runs, benign_runs
    )
    stem = _stem(args.quick)
    # The record first: tables are never left without what they were made from.
    kept = scores.write(out, stem, record)
    summary = summarise(record)
    paths = write_outputs(summary, out, stem)
    log(
        f"detection: {benchmark['wall_s']:.0f} s; wrote {', '.join(str(p) for p in paths)}; "
        f"kept its scores in {kept}"
    )
    return summary


def tables_from_records(out: str | os.PathLike, quick: bool = False) -> dict[str, Any]:
    """Write the tables and calibration files of the run kept in ``<out>/scores.jsonl.gz``
    (its quick run with `quick`) again, running nothing; return the summary."""
    out = Path(out)
    stem = _stem(quick)
    record = scores.read(out, stem)
    victims = record.benchmark["victims"]
    for c in record.calibrations:
        seed = c["about"]["victim_seed"]
        path = _calibration_path(
            out, c["monitor"], record.benchmark["dataset"], victims[str(seed)]["arch"], seed
        )
        Calibration(**c).save(path)
    summary = summarise(record)
    paths = write_outputs(summary, out, stem)
    log(f"detection: from {out / scores.SCORES}: wrote {', '.join(str(p) for p in paths)}")
    return summary


def _stem(quick: bool) -> str:
    return "detection_quick" if quick else "detection"


def _calibration_path(out: Path, monitor: str, dataset: str, arch: str, seed: int) -> Path:
    """Where a monitor's calibration for one victim is saved (megex serve --monitor reads it)."""
    return out / "calibration" / f"{monitor}-{dataset}-{arch}-seed{seed}.json"


def _image_pools(config: dict[str, Any], data_root: Any, queries: int) -> tuple[Any, Any]:
    """The validation and test images the benign streams draw from, each large enough."""
    ds = data_mod.load(config["dataset"], data_root)
    x_val, _ = ds.validation_tensors(int(config["validation_images"]))
    x_test, _ = ds.test_tensors()
    for name, pool in (("validation images", x_val), ("test images", x_test)):
        if queries > len(pool):
            raise ValueError(
                f"queries: {queries} is more than the {len(pool)} {name}; a benign stream draws "
                "distinct images: lower --queries (or raise validation_images)"
            )
    return x_val, x_test


def _calibrate(
    config: dict[str, Any],
    plan: dict[str, Any],
    victim: Any,
    path: Any,
    victim_seed: int,
    x_val: Any,
    out: Path,
) -> dict[tuple[str, int], Any]:
    """Each monitor's threshold for one victim, from validation streams; saved under
    <out>/calibration."""
    queries, kinds = int(plan["queries"]), config["benign_kinds"]
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
    calibrations = {}
    for name, monitor in plan["monitors"].items():
        calibration = calibrate(monitor, streams, float(plan["target_fpr"]), about=about)
        calibration.save(_calibration_path(out, name, config["dataset"], victim.arch, victim_seed))
        calibrations[(name, victim_seed)] = calibration
        log(
            f"detection: victim {victim_seed}: {name} threshold {calibration.threshold:.4f} "
            f"({calibration.calibration_fpr:.2f} of {calibration.streams} validation streams "
            "flagged)"
        )
    return calibrations


def _benign_runs(
    config: dict[str, Any],
    plan: dict[str, Any],
    victim: Any,
    victim_seed: int,
    x_test: Any,
    calibrations: dict[tuple[str, int], Any],
) -> list[dict[str, Any]]:
    """The test-split benign streams of one victim, scored by every monitor."""
    runs = []
    for kind in config["benign_kinds"]:
        for i in range(int(plan["test_streams"])):
            stream = benign_stream(
                x_test, victim, kind, int(plan["queries"]), 1000 * victim_seed + i, config
            )
            runs.append(
                {"victim_seed": victim_seed, "kind": kind, "stream": i,
                 **score_stream(stream, plan["monitors"], calibrations, victim_seed)}
            )  # fmt: skip
    return runs


def _attack_runs(
    config: dict[str, Any],
    plan: dict[str, Any],
    victim: Any,
    victim_seed: int,
    calibrations: dict[tuple[str, int], Any],
    data_root: str | None = None,
) -> list[dict[str, Any]]:
    """Every method's and seed's attack stream on one victim, scored by every monitor."""
    runs = []
    for method, (attack_name, settings) in plan["attacks"].items():
        for seed in plan["seeds"]:
            started = time.time()
            stream = attack_stream(
                method,
                attack_name,
                settings,
                seed,
                victim,
                int(plan["queries"]),
                config["device"],
                config["pool"],
                data_root,
            )
            scored = score_stream(stream, plan["monitors"], calibrations, victim_seed)
            runs.append(
                {"method": method, "victim_seed": victim_seed, "seed": seed,
                 "queries": len(stream), "wall_s": round(time.time() - started, 1), **scored}
            )  # fmt: skip
            shown = ", ".join(
                f"{name} at {r['detected_at']}" if r["detected_at"] else f"{name} no"
                for name, r in scored["monitors"].items()
            )
            log(f"detection: {method} victim {victim_seed} seed {seed}: {shown}")
    return runs


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without it
        return None
