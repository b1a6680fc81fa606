"""The detection benchmark's summary and markdown table, made from its record (the run's
settings, calibrations and each stream's scores: megex.experiments.detection.scores), so
that a run and a rebuild from its record write the same tables."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ...detection import MONITORS
from ...stats import wilson_interval
from ...tables import markdown_table
from .. import common
from .scores import DetectionRecord

__all__ = ["describe", "markdown", "summarise", "write_outputs"]


def describe(config: dict[str, Any], plan: dict[str, Any], victims: dict) -> dict[str, Any]:
    """The summary's settings and victims: everything in it that no stream decides."""
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
    }


def summarise(record: DetectionRecord) -> dict[str, Any]:
    """The summary of a run: its settings, thresholds, detection and false-positive rates,
    and every stream's scores."""
    head = record.benchmark
    names = _monitors(record.calibrations)
    return {
        **head,
        "thresholds": _thresholds(record.calibrations),
        "detection": _detection(names, head["methods"], record.attack_runs),
        "false_positives": _false_positives(names, head["benign"]["kinds"], record.benign_runs),
        "attack_runs": record.attack_runs,
        "benign_runs": record.benign_runs,
    }


def _detected_at(run: dict[str, Any], name: str) -> int | None:
    """Queries until monitor `name` ("any": the first of them) flagged the run, or None."""
    return run["any_detected_at"] if name == "any" else run["monitors"][name]["detected_at"]


def _detection(
    names: list[str], methods: list[str], attack_runs: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per monitor and method: the attack runs detected and the queries it took."""
    detection: dict[str, dict[str, Any]] = {}
    for name in names:
        for method in methods:
            runs = [r for r in attack_runs if r["method"] == method]
            hits = [_detected_at(r, name) for r in runs if _detected_at(r, name) is not None]
            detection.setdefault(name, {})[method] = {
                "runs": len(runs),
                "detected": len(hits),
                "rate": len(hits) / len(runs) if runs else None,
                "median_queries": statistics.median(hits) if hits else None,
                "min_queries": min(hits) if hits else None,
                "max_queries": max(hits) if hits else None,
            }
    return detection


def _false_positives(
    names: list[str], kinds: list[str], benign_runs: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per monitor and benign kind: the test streams flagged."""
    false_positives: dict[str, dict[str, Any]] = {}
    for name in names:
        for kind in kinds:
            runs = [r for r in benign_runs if r["kind"] == kind]
            flagged = sum(_detected_at(r, name) is not None for r in runs)
            false_positives.setdefault(name, {})[kind] = {
                "streams": len(runs),
                "flagged": flagged,
                "rate": flagged / len(runs) if runs else None,
            }
    return false_positives


def _thresholds(calibrations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each monitor's calibrated threshold per victim."""
    return [
        {
            "monitor": c["monitor"],
            "victim_seed": c["about"]["victim_seed"],
            "threshold": c["threshold"],
            "flags_when": MONITORS[c["monitor"]].flags_when,
            "calibration_fpr": c["calibration_fpr"],
            "streams": c["streams"],
        }
        for c in calibrations
    ]


def _monitors(calibrated: list[dict[str, Any]]) -> list[str]:
    """The monitors in the order they were calibrated (the config's), "any" last, from the
    calibrations or the summary's thresholds: the same order whether a summary was just made
    or read back from its JSON (whose keys are sorted)."""
    return [*dict.fromkeys(c["monitor"] for c in calibrated), "any"]


def markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown tables."""
    lines = [
        *_introduction(summary),
        *_detection_table(summary),
        *_false_positive_table(summary),
        *_threshold_table(summary),
    ]
    machine = summary.get("machine", {})
    lines += [
        "",
        f"Wall time {summary.get('wall_s', 0):.0f} s on {machine.get('cpus')} CPUs "
        f"(load average {machine.get('load_average_before')} before, "
        f"{machine.get('load_average_after')} after).",
        "",
    ]
    return "\n".join(lines)


def _introduction(summary: dict[str, Any]) -> list[str]:
    """The title and the protocol: victims, streams, thresholds, attack settings."""
    q = summary["queries"]
    victims = ", ".join(
        f"seed {seed} ({v['arch']}, test accuracy {v['accuracy']:.4f})"
        for seed, v in sorted(summary["victims"].items(), key=lambda item: int(item[0]))
    )
    benign = summary["benign"]
    return [
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
    ]


def _detection_table(summary: dict[str, Any]) -> list[str]:
    """The attacks detected per monitor and method, and the queries it took."""
    lines = [
        "",
        f"## Attacks detected within {summary['queries']} queries",
        "",
        '"any": flagged by any monitor, each at its own threshold (so its false-positive '
        "rate can reach the sum of theirs). Queries until detection: over the runs detected.",
        "",
    ]
    header = [
        "monitor", "method", "detected", "rate [95% interval]", "queries until detection: median",
        "range",
    ]  # fmt: skip
    rows = []
    for name in _monitors(summary["thresholds"]):
        for method in summary["methods"]:
            d = summary["detection"][name][method]
            median = "-" if d["median_queries"] is None else f"{d['median_queries']:g}"
            span = "-" if d["min_queries"] is None else f"{d['min_queries']}-{d['max_queries']}"
            detected = f"{d['detected']}/{d['runs']}"
            rows.append([name, method, detected, _rate(d["detected"], d["runs"]), median, span])
    return [*lines, *markdown_table(header, rows, align=["", "", "", "", "right"])]


def _false_positive_table(summary: dict[str, Any]) -> list[str]:
    """The benign test streams flagged per monitor and kind (and all kinds pooled)."""
    lines = [
        "",
        "## Benign test streams flagged (false positives)",
        "",
        '95% Wilson intervals; "all" pools the kinds.',
        "",
    ]
    rows = []
    for name in _monitors(summary["thresholds"]):
        kinds = {k: summary["false_positives"][name][k] for k in summary["benign"]["kinds"]}
        for kind, f in kinds.items():
            rows.append(
                [name, kind, f"{f['flagged']}/{f['streams']}", _rate(f["flagged"], f["streams"])]
            )
        flagged = sum(f["flagged"] for f in kinds.values())
        streams = sum(f["streams"] for f in kinds.values())
        if len(kinds) > 1 and streams:
            rows.append([name, "all", f"{flagged}/{streams}", _rate(flagged, streams)])
    return [*lines, *markdown_table(["monitor", "kind", "flagged", "rate [95% interval]"], rows)]


def _threshold_table(summary: dict[str, Any]) -> list[str]:
    """Each monitor's threshold per victim and the validation streams it flagged."""
    lines = [
        "",
        "## Thresholds",
        "",
    ]
    header = [
        "monitor", "victim", "flags when the statistic is", "threshold",
        "validation streams flagged",
    ]  # fmt: skip
    rows = [
        [
            t["monitor"],
            t["victim_seed"],
            t["flags_when"],
            f"{t['threshold']:.4f}",
            f"{t['calibration_fpr']:.2f} of {t['streams']}",
        ]
        for t in summary["thresholds"]
    ]
    return [*lines, *markdown_table(header, rows, align=["", "", "", "right", "right"])]


def _rate(count: int, total: int) -> str:
    """A proportion with its 95% Wilson interval, or '-' when there is nothing to count."""
    if not total:
        return "-"
    low, high = wilson_interval(count, total)
    return f"{count / total:.2f} [{low:.2f}, {high:.2f}]"


def write_outputs(summary: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """<stem>.json and .md (the calibration files are written as the monitors are calibrated)."""
    return [*common.write_outputs(summary, out, stem, markdown), out / "calibration"]
