"""The rows of the table, and the plan each finished row was run with.

Every finished (implementation, method, seed) row is a JSON file under ``<out>/runs/`` and is
not run again; a file run with another plan (victim file, dataset, budgets, schedule, test
images, peer commit) is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import UserError

OURS, MEBENCH, AUTHORS = "megex", "mebench", "disguide-authors"
DUAL_STUDENTS = "dual-students-authors"
# (implementation, method) in table order, with the attack each is.
ROWS: list[tuple[str, str, str]] = [
    (MEBENCH, "dfme", "DFME"),
    (AUTHORS, "dfme", "DFME"),
    (OURS, "dfme-paper", "DFME"),
    (OURS, "dfme-published", "DFME"),
    (OURS, "dfme", "DFME"),
    (MEBENCH, "disguide", "DisGUIDE"),
    (AUTHORS, "disguide", "DisGUIDE"),
    (OURS, "disguide-paper", "DisGUIDE"),
    (OURS, "disguide-published", "DisGUIDE"),
    (OURS, "disguide", "DisGUIDE"),
    (DUAL_STUDENTS, "dual-students", "Dual students"),
    (OURS, "dual-students-paper", "Dual students"),
    (OURS, "dual-students-published", "Dual students"),
    (OURS, "dual-students", "Dual students"),
]
NAMES = {
    (MEBENCH, "dfme"): "mebench DFME (mebench.attackers.dfme.DFME)",
    (AUTHORS, "dfme"): "DisGUIDE authors' code, DFME experiment (DFME's defaults)",
    (OURS, "dfme-paper"): "megex dfme-paper (DFME as published)",
    (OURS, "dfme-published"): "megex dfme, the search's published-settings trial",
    (OURS, "dfme"): "megex dfme (DFME's estimator in megex's loop, tuned)",
    (MEBENCH, "disguide"): "mebench DisGUIDE (mebench.attackers.disguide.DisGUIDE)",
    (AUTHORS, "disguide"): "DisGUIDE authors' code (run script's settings)",
    (OURS, "disguide-paper"): "megex disguide (the authors' run script's settings)",
    (OURS, "disguide-published"): "megex disguide, the search's published-settings trial",
    (OURS, "disguide"): "megex disguide (DisGUIDE in megex's loop, tuned)",
    (DUAL_STUDENTS, "dual-students"): "dual students authors' code (run script's settings)",
    (OURS, "dual-students-paper"): "megex dual-students (the authors' run script's settings)",
    (OURS, "dual-students-published"): "megex dual-students, the search's published-settings trial",
    (OURS, "dual-students"): "megex dual-students (dual students in megex's loop, tuned)",
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def row_path(out: Path, peer: str, method: str, seed: int) -> Path:
    return out / "runs" / f"{peer}--{method}--seed{seed}.json"


def read_finished(path: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The finished row at `path` if it was run with this plan; None if there is none."""
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cut short while written: run it again
    if row.get("plan") != plan:
        changed = sorted(
            k for k in {*plan, *row.get("plan", {})} if plan.get(k) != row["plan"].get(k)
        )
        raise UserError(
            f"{path} was run with another plan ({', '.join(changed)} differ); choose another "
            "--out, or delete that file to run it again"
        )
    return row
