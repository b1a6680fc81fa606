"""Run records: the finished runs of an experiment folder, kept in one compressed file.

An experiment folder holds folders of run folders (``runs/``, ``runs-quick/``, ...) and the
tables made from them. Its records file, ``<experiment>/runs.jsonl.gz``, holds one JSON line
per finished run folder (:class:`megex.runs.RunFolder`), sorted by its path relative to the
experiment folder ("name"), with the contents of its config.json, metrics.jsonl (a list of
rows) and result.json; never weights, checkpoints or victims. The file is byte-stable (gzip
with no time and no file name), and unpacking writes the three files back byte for byte as
the run wrote them, so an experiment reuses the unpacked runs as it reuses any finished run
folder whose settings match. :func:`compare_output` tells how a table rebuilt from the
records differs from the committed one (``megex records rebuild``).

Experiments whose results are not run folders keep their own records file in the same form
(:func:`write_lines`, :func:`read_lines`: JSON lines, gzip with no time and no file name):
the detection benchmark its streams' scores, the gradient alignment its measurements.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from ..recipes import cached_victim_path
from ..runs import RunFolder, read_metrics, write_text_atomic
from .common import log

__all__ = [
    "KEPT",
    "RECORDS",
    "RecordsConflict",
    "check",
    "compare_output",
    "copy_without_runs",
    "experiment_folders",
    "finished_runs",
    "encode_lines",
    "pack",
    "read_lines",
    "read_records",
    "unpack",
    "unready_jobs",
    "victim_file",
    "write_lines",
]

RECORDS = "runs.jsonl.gz"
# A run folder's files that a record keeps, in the order they are written back (result.json
# last: it is what marks a run finished).
KEPT = ("config.json", "metrics.jsonl", "result.json")


class RecordsConflict(FileExistsError):
    """Packing or unpacking would overwrite or drop a run: nothing was written."""


# --- finding run folders ----------------------------------------------------------------


def _is_run_folder(path: Path) -> bool:
    """A run folder, finished or not: its config.json and one file that a run writes."""
    return (path / "config.json").is_file() and any(
        (path / name).is_file() for name in ("metrics.jsonl", "result.json", "checkpoint.pt")
    )


def finished_runs(experiment: Path) -> list[Path]:
    """The finished run folders of an experiment folder (``<experiment>/<runs>/<run>``)."""
    found = Path(experiment).glob("*/*")
    return sorted(p for p in found if _is_run_folder(p) and RunFolder(p).is_finished())


def experiment_folders(root: str | os.PathLike) -> list[Path]:
    """The experiment folders at or under `root`: each folder two levels above a run
    folder, and each that holds a records file."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    if _is_run_folder(root):
        raise ValueError(f"{root}: a run folder; pass its experiment folder, {root.parent.parent}")
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if RECORDS in filenames:
            found.add(here)
        if here != root and _is_run_folder(here):
            dirnames[:] = []  # a run folder holds no other runs
            if here.parent == root:
                raise ValueError(
                    f"{root}: a folder of run folders; pass its experiment folder, {root.parent}"
                )
            found.add(here.parent.parent)
    return sorted(found)


# --- one run as a record ----------------------------------------------------------------


def _json_text(obj: Any) -> str:
    # As megex.runs.write_json_atomic writes config.json and result.json.
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def _metrics_text(rows: list[dict[str, Any]]) -> str:
    # As megex.runs.RunFolder.write_metrics writes metrics.jsonl.
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def _files_of(record: dict[str, Any]) -> dict[str, str]:
    """The text of each file a record writes back, by file name."""
    files = {"config.json": _json_text(record["config"])}
    if record["metrics"] is not None:
        files["metrics.jsonl"] = _metrics_text(record["metrics"])
    files["result.json"] = _json_text(record["result"])
    return files


def _texts_on_disk(run: Path) -> dict[str, str]:
    return {name: (run / name).read_text() for name in KEPT if (run / name).is_file()}


def _record_of(run: Path, experiment: Path) -> dict[str, Any]:
    """The record of a finished run folder; refused (ValueError) if its files would not
    unpack to the same bytes (a file not written as a run writes it)."""
    folder = RunFolder(run)
    record = {
        "name": run.relative_to(experiment).as_posix(),
        "config": folder.read_config(),
        "metrics": read_metrics(folder.metrics_path) if folder.metrics_path.is_file() else None,
        "result": folder.read_result(),
    }
    on_disk = _texts_on_disk(run)
    for name, text in _files_of(record).items():
        if on_disk.get(name) != text:
            raise ValueError(
                f"{run / name}: not in the form a run writes it, so its record would not "
                "unpack to the same bytes"
            )
    return record


# --- the records file -------------------------------------------------------------------


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"))


def _gzip(lines: Iterable[str]) -> bytes:
    buffer = io.BytesIO()
    # mtime 0 and no file name: the same lines always give the same bytes.
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write("".join(line + "\n" for line in lines).encode())
    return buffer.getvalue()


def encode_lines(rows: Iterable[dict[str, Any]]) -> bytes:
    """The bytes of a records file holding `rows`, one JSON line each, in the order given
    (keys sorted, gzip with no time and no file name: the same rows give the same bytes)."""
    return _gzip(_json_line(row) for row in rows)


def _encode(records: Iterable[dict[str, Any]]) -> bytes:
    """The run records file's bytes: JSON lines sorted by their text, gzip with a fixed
    header."""
    return _gzip(sorted(_json_line(r) for r in records))


def write_lines(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Write `rows` as a records file (:func:`encode_lines`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes_atomic(path, encode_lines(rows))
    return path


def read_lines(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a records file, in order (ValueError, naming the file and line, where it
    is not a gzip file of JSON objects)."""
    data = Path(path).read_bytes()
    try:
        text = gzip.decompress(data).decode()
    except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a gzip file of JSON lines ({err})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}: line {number}: expected a JSON object, got {type(row).__name__}"
            )
        rows.append(row)
    return rows


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = {"name", "config", "metrics", "result"} - set(record)
    if missing:
        raise ValueError(f"{where}: lacks {sorted(missing)}")
    name = record["name"]
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if len(parts) != 2 or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise ValueError(
            f"{where}: name {name!r}; expected <runs folder>/<run folder>, e.g. runs/dfme-v0-s0"
        )
    if not isinstance(record["config"], dict) or not isinstance(record["result"], dict):
        raise ValueError(f"{where}: config and result must be JSON objects")
    if record["metrics"] is not None and not isinstance(record["metrics"], list):
        raise ValueError(f"{where}: metrics must be a list of rows or null")
    return record


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records in a records file (ValueError, naming the file, if it is not one)."""
    records, names = [], set()
    for number, row in enumerate(read_lines(path), 1):
        where = f"{path}: line {number}"
        record = _check_record(row, where)
        if record["name"] in names:
            raise ValueError(f"{where}: {record['name']} appears twice")
        names.add(record["name"])
        records.append(record)
    return records


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pack(
    experiment: str | os.PathLike,
    out: str | os.PathLike | None = None,
    note: Callable[[str], None] = log,
) -> tuple[Path, int]:
    """Write the records of an experiment folder's finished runs to `out` (default
    ``<experiment>/runs.jsonl.gz``); (path, number of runs). Refused (RecordsConflict) where
    the file already holds runs that are not there: packing would drop them."""
    experiment = Path(experiment)
    path = Path(out) if out is not None else experiment / RECORDS
    runs = finished_runs(experiment)
    unfinished = [p for p in experiment.glob("*/*") if _is_run_folder(p) and p not in runs]
    if not runs:
        raise ValueError(f"{experiment}: no finished run folder (<runs>/<run>/result.json)")
    records = [_record_of(run, experiment) for run in runs]
    if path.is_file():
        before = {r["name"]: r for r in read_records(path)}
        dropped = sorted(set(before) - {r["name"] for r in records})
        if dropped:
            raise RecordsConflict(
                f"{path}: holds {len(dropped)} run(s) that are not finished under {experiment} "
                f"(e.g. {dropped[0]}); packing would drop them. Unpack it first "
                f"(megex records unpack {path}), or write elsewhere (--out)"
            )
        changed = [r["name"] for r in records if r["name"] in before and r != before[r["name"]]]
        if changed:
            note(
                f"records: {len(changed)} run(s) changed since {path} was written: {changed[0]} ..."
            )
    for p in sorted(unfinished):
        note(f"records: {p} is not finished: left out")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes_atomic(path, _encode(records))
    return path, len(records)


def unpack(
    path: str | os.PathLike, into: str | os.PathLike | None = None
) -> tuple[list[Path], list[Path]]:
    """Write each record's run folder under `into` (default: the file's folder); (written,
    already there). Refused (RecordsConflict), before anything is written, where a folder
    holds another run (a kept file that differs, or an unfinished run)."""
    path = Path(path)
    into = Path(into) if into is not None else path.parent
    records = read_records(path)
    conflicts, todo, present = [], [], []
    for record in records:
        target = into / record["name"]
        files = _files_of(record)
        if target.exists() and not target.is_dir():
            conflicts.append(f"{target}: not a folder")
            continue
        on_disk = _texts_on_disk(target) if target.is_dir() else {}
        differ = [name for name, text in on_disk.items() if files.get(name) != text]
        if differ:
            conflicts.append(f"{target}: {', '.join(differ)} differ(s)")
        elif (target / "checkpoint.pt").is_file() and "result.json" not in on_disk:
            conflicts.append(f"{target}: holds an unfinished run")
        elif on_disk == files:
            present.append(target)
        else:
            todo.append((target, files))
    if conflicts:
        raise RecordsConflict(
            f"{path}: {len(conflicts)} run folder(s) under {into} hold other runs, nothing "
            f"was written (first: {conflicts[0]}); move them away or unpack elsewhere (--into)"
        )
    for target, files in todo:
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():  # result.json last: a folder is finished at the end
            write_text_atomic(target / name, text)
    return [t for t, _ in todo], present


def check(experiment: str | os.PathLike) -> list[str]:
    """How an experiment folder's records file and its finished run folders differ (one
    line each; none when they match)."""
    experiment = Path(experiment)
    path = experiment / RECORDS
    on_disk = {p.relative_to(experiment).as_posix(): p for p in finished_runs(experiment)}
    if not path.is_file():
        return [f"{path}: missing; {len(on_disk)} finished run(s) not packed"] if on_disk else []
    records = {r["name"]: r for r in read_records(path)}
    problems = [f"{name}: in {path}, not unpacked" for name in sorted(set(records) - set(on_disk))]
    problems += [
        f"{name}: finished, not in {path} (pack again)"
        for name in sorted(set(on_disk) - set(records))
    ]
    for name in sorted(set(records) & set(on_disk)):
        texts, files = _texts_on_disk(on_disk[name]), _files_of(records[name])
        differ = sorted(n for n in set(texts) | set(files) if texts.get(n) != files.get(n))
        if differ:
            problems.append(f"{name}: {', '.join(differ)} differ(s) from {path}")
    return problems


# --- rebuilding tables from the records -------------------------------------------------


def copy_without_runs(source: Path, target: Path) -> None:
    """Copy a folder, leaving out run folders and records files (the records give those)."""

    def ignored(folder: str, names: list[str]) -> list[str]:
        return [
            n
            for n in names
            if n == RECORDS or n.endswith(".tmp") or _is_run_folder(Path(folder) / n)
        ]

    shutil.copytree(source, target, ignore=ignored, dirs_exist_ok=True)


def victim_file(folder: Path, config: dict[str, Any], seed: int) -> Path:
    """Where :func:`megex.victim.cached_victim` keeps the victim of `config` and `seed`
    (the same name, held-out pool images included; it trains one there when the file is
    missing)."""
    return cached_victim_path(
        folder,
        config["dataset"],
        config.get("victim_arch"),
        seed,
        config.get("validation_images", 0),
        config.get("pool_images", 0),
    )


def unready_jobs(jobs: list[dict[str, Any]], victims: Iterable[Path]) -> list[str]:
    """What running `jobs` would compute: each run not finished, each victim not saved."""
    missing = [f"victim {v} (would be trained)" for v in victims if not Path(v).is_file()]
    return missing + [
        f"run {job['run_dir']} (would be run)"
        for job in jobs
        if not RunFolder(job["run_dir"]).is_finished()
    ]


def _same(a: Any, b: Any) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return a == b or both_nan


def _json_differences(a: Any, b: Any, at: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for key in sorted(set(a) | set(b), key=str)
            for d in (
                _json_differences(a[key], b[key], f"{at}.{key}" if at else str(key))
                if key in a and key in b
                else [f"{at}.{key}" if at else str(key)]
            )
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b)) for d in _json_differences(x, y, f"{at}[{i}]")
        ]
    return [] if _same(a, b) else [at or "(whole file)"]


def _compare_json(committed: Path, rebuilt: Path) -> tuple[str, str]:
    before, after = json.loads(committed.read_text()), json.loads(rebuilt.read_text())
    keys = _json_differences(before, after)
    if keys == ["wall_s"]:
        return "wall time only", f"wall_s {before['wall_s']} committed, {after['wall_s']} rebuilt"
    return "differs", f"{len(keys)} value(s), e.g. {', '.join(keys[:4])}"


def _compare_text(committed: Path, rebuilt: Path) -> tuple[str, str]:
    before, after = committed.read_text().splitlines(), rebuilt.read_text().splitlines()
    if len(before) != len(after):
        return "differs", f"{len(before)} lines committed, {len(after)} rebuilt"
    pairs = [(i, x, y) for i, (x, y) in enumerate(zip(before, after), 1) if x != y]
    if all("wall time" in x.lower() and "wall time" in y.lower() for _, x, y in pairs):
        return "wall time only", f"line {pairs[0][0]}"
    i, x, y = next((p for p in pairs if "wall time" not in p[1].lower()), pairs[0])
    return "differs", f"{len(pairs)} line(s), first at line {i}: {x[:80]!r} -> {y[:80]!r}"


def _compare_image(committed: Path, rebuilt: Path) -> tuple[str, str]:
    try:
        import matplotlib.image as mpimg
        import numpy as np
    except ImportError:
        return "differs", "bytes differ (matplotlib is not installed to compare pixels)"
    a, b = mpimg.imread(committed), mpimg.imread(rebuilt)
    if a.shape != b.shape:
        return "differs", f"image size {a.shape} committed, {b.shape} rebuilt"
    if np.array_equal(a, b):
        return "same pixels", "the files' bytes differ, not the image"
    return "differs", f"{int((a != b).any(axis=-1).sum())} pixel(s) differ"


def compare_output(committed: Path, rebuilt: Path) -> tuple[str, str]:
    """(verdict, detail) of a rebuilt output against the committed file. Verdicts:
    identical; wall time only (the invocation's wall time: a JSON's top-level wall_s, a
    markdown line naming the wall time); same pixels (a PNG); differs; missing (not
    rebuilt); not committed."""
    if not rebuilt.is_file():
        return "missing", "the step did not write it"
    if not committed.is_file():
        return "not committed", ""
    if committed.read_bytes() == rebuilt.read_bytes():
        return "identical", ""
    compare = {".json": _compare_json, ".png": _compare_image}.get(committed.suffix, _compare_text)
    return compare(committed, rebuilt)
