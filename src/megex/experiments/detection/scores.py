"""The detection benchmark's records: what its tables are made from, kept beside them.

A detection run scores query streams; its tables and calibration files are made from those
scores alone: each monitor's calibration per victim (threshold, the validation streams'
most suspicious values), and per attack and benign test stream each monitor's most
suspicious statistic and the query it was flagged at. ``<out>/scores.jsonl.gz`` keeps them,
one JSON line each, in the order the run made them, under the run's stem (``detection`` or
``detection_quick``: one file holds both). Its first line per stem holds the run's settings,
victims, wall time and machine. The file is byte-stable (gzip with no time and no file name,
:func:`megex.experiments.records.write_lines`), so the same run gives the same bytes, and
``megex detection --from-records`` writes the tables and calibration files again from it
without running an attack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import records

__all__ = ["SCORES", "DetectionRecord", "check_writable", "read", "write"]

SCORES = "scores.jsonl.gz"
KINDS = ("benchmark", "calibration", "attack", "benign")


@dataclass
class DetectionRecord:
    """What one detection run's tables are made from."""

    # The summary's settings, victims, wall time and machine (megex.experiments.detection
    # .report.describe).
    benchmark: dict[str, Any]
    # Each monitor's calibration per victim (a Calibration's dict), in the run's order.
    calibrations: list[dict[str, Any]]
    # Each stream's scores, as in the summary, in the run's order.
    attack_runs: list[dict[str, Any]]
    benign_runs: list[dict[str, Any]]


def _rows(stem: str, record: DetectionRecord) -> list[dict[str, Any]]:
    rows = [{"stem": stem, "record": "benchmark", "name": stem, "benchmark": record.benchmark}]
    for c in record.calibrations:
        name = f"{stem}/calibration/v{c['about']['victim_seed']}/{c['monitor']}"
        rows.append({"stem": stem, "record": "calibration", "name": name, "calibration": c})
    for run in record.attack_runs:
        name = f"{stem}/attack/v{run['victim_seed']}/{run['method']}/s{run['seed']}"
        rows.append({"stem": stem, "record": "attack", "name": name, "run": run})
    for run in record.benign_runs:
        name = f"{stem}/benign/v{run['victim_seed']}/{run['kind']}/{run['stream']}"
        rows.append({"stem": stem, "record": "benign", "name": name, "run": run})
    return rows


def _blocks(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The file's rows by stem, each stem's in the file's order (ValueError, naming the file
    and line, where a row is not a detection record)."""
    blocks: dict[str, list[dict[str, Any]]] = {}
    names: set[str] = set()
    for number, row in enumerate(records.read_lines(path), 1):
        where = f"{path}: line {number}"
        kind, stem, name = row.get("record"), row.get("stem"), row.get("name")
        if kind not in KINDS or not isinstance(stem, str) or not isinstance(name, str):
            raise ValueError(
                f"{where}: not a detection record (expected 'stem', 'name' and 'record', one "
                f"of {', '.join(KINDS)})"
            )
        payload = {"benchmark": "benchmark", "calibration": "calibration"}.get(kind, "run")
        if not isinstance(row.get(payload), dict):
            raise ValueError(f"{where}: a {kind} record without its {payload!r} object")
        if name in names:
            raise ValueError(f"{where}: {name} appears twice")
        names.add(name)
        blocks.setdefault(stem, []).append(row)
    return blocks


def check_writable(out: str | os.PathLike) -> None:
    """Refuse (ValueError), before a run, a ``<out>/scores.jsonl.gz`` that :func:`write`
    could not add the run's scores to."""
    path = Path(out) / SCORES
    if path.is_file():
        _blocks(path)


def write(out: str | os.PathLike, stem: str, record: DetectionRecord) -> Path:
    """Keep `record` as `stem`'s block of ``<out>/scores.jsonl.gz`` (replacing an earlier
    one of that stem; other stems' blocks are kept); the file's path."""
    path = Path(out) / SCORES
    blocks = _blocks(path) if path.is_file() else {}
    blocks[stem] = _rows(stem, record)
    return records.write_lines(path, [row for key in sorted(blocks) for row in blocks[key]])


def read(out: str | os.PathLike, stem: str) -> DetectionRecord:
    """`stem`'s record in ``<out>/scores.jsonl.gz`` (FileNotFoundError or ValueError, naming
    the file, where there is none)."""
    path = Path(out) / SCORES
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no detection records (a detection run writes them)")
    blocks = _blocks(path)
    if stem not in blocks:
        held = ", ".join(sorted(blocks)) or "none"
        raise ValueError(f"{path}: no records of the {stem} run (it holds: {held})")
    rows = blocks[stem]
    heads = [r for r in rows if r["record"] == "benchmark"]
    if len(heads) != 1:
        raise ValueError(f"{path}: {stem}: expected one benchmark line, found {len(heads)}")
    return DetectionRecord(
        benchmark=heads[0]["benchmark"],
        calibrations=[r["calibration"] for r in rows if r["record"] == "calibration"],
        attack_runs=[r["run"] for r in rows if r["record"] == "attack"],
        benign_runs=[r["run"] for r in rows if r["record"] == "benign"],
    )
