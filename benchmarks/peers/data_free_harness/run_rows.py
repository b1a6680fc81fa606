"""Running each (implementation, method, seed) row of the plan once: ours always, a peer's
where its checkout was given.

A finished row is written to ``<out>/runs/`` and skipped by a later run with the same plan;
a peer's own output goes to ``<out>/logs/``; a peer's own failure is reported in its row and
the others go on (the run's exit status is then 1). A row that cannot be run yet (a
method the peer's checkout lacks, a tuned method the tuned-settings file does not hold yet)
is "unavailable": said, not written, not a failure, and run by a later invocation that can.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megex.evaluate import Evaluator
from megex.experiments.common import fmt_budget
from megex.runs import write_text_atomic
from megex.victim import Victim

from .authors_peer import run_authors
from .dual_students_peer import run_dual_students
from .errors import PeerUnavailable, UserError
from .mebench_peer import run_mebench
from .ours import TUNED_METHODS, run_ours, searched_settings
from .rows import AUTHORS, DUAL_STUDENTS, MEBENCH, NAMES, OURS, ROWS, read_finished, row_path

# One run of each peer's implementation, all called alike.
PEER_RUNNERS = {MEBENCH: run_mebench, AUTHORS: run_authors, DUAL_STUDENTS: run_dual_students}


@dataclass(frozen=True)
class Setup:
    """What every row of one invocation shares."""

    victim: Victim
    budgets: list[int]
    evaluator: Evaluator
    clone_arch: str
    schedule: str
    tuned: Path
    out: Path
    peers: dict[str, Path]


def run_all(
    setup: Setup, seeds: list[int], plan_base: dict[str, Any], commits: dict[str, str]
) -> tuple[list[dict[str, Any]], int]:
    """Every row in table order, each seed: (the rows, how many failed)."""
    rows = []
    failed = 0
    for peer, method, _ in ROWS:
        if peer != OURS and peer not in setup.peers:
            continue
        for seed in seeds:
            plan = {**plan_base, "peer_commit": commits.get(peer)}
            if peer == OURS and method in TUNED_METHODS:
                plan["tuned_settings"] = searched_settings(method, setup.tuned)
            row = run_row(setup, peer, method, seed, plan)
            failed += row["status"] == "failed"
            rows.append(row)
    return rows, failed


def run_row(
    setup: Setup, peer: str, method: str, seed: int, plan: dict[str, Any]
) -> dict[str, Any]:
    """One row: read back where it finished before with this plan, else run (and written
    when it finishes)."""
    path = row_path(setup.out, peer, method, seed)
    label = f"{NAMES[(peer, method)]}, seed {seed}"
    done = read_finished(path, plan)
    if done is not None:
        print(f"{label}: finished before ({path}), skipped")
        return done
    log_path = setup.out / "logs" / f"{peer}--{method}--seed{seed}.log"
    row: dict[str, Any] = {"peer": peer, "method": method, "seed": seed, "plan": plan}
    try:
        result = _run_implementation(setup, peer, method, seed, log_path)
    except PeerUnavailable as err:
        row.update(status="unavailable", reason=str(err))
        print(f"{label}: not run: {err}")
        return row
    except UserError:
        raise
    except Exception as err:  # a peer's own failure: reported, the others go on
        reason = f"failed: {type(err).__name__}: {err}"
        row.update(status="failed", reason=reason)
        print(f"{label}: {reason} (log: {log_path})")
        return row
    row.update(status="finished", **result, victim_accuracy=setup.evaluator.victim_accuracy)
    write_text_atomic(path, json.dumps(row, indent=1, sort_keys=True) + "\n")
    accs = ", ".join(
        f"{fmt_budget(e['budget'])} "
        + ("-" if e.get("clone_accuracy") is None else f"{100 * e['clone_accuracy']:.1f}%")
        for e in row["evaluations"]
    )
    print(
        f"{label}: {row['queries_counted']:,} queries, {accs}, "
        f"{row['queries_per_s']:,.0f} queries/s"
    )
    return row


def _run_implementation(
    setup: Setup, peer: str, method: str, seed: int, log_path: Path
) -> dict[str, Any]:
    if peer == OURS:
        return run_ours(
            method, setup.victim, seed, setup.budgets, setup.evaluator, setup.schedule, setup.tuned
        )
    with log_path.open("w") as log:
        result = PEER_RUNNERS[peer](
            setup.peers[peer],
            method,
            setup.victim,
            seed,
            setup.budgets,
            setup.evaluator,
            setup.clone_arch,
            setup.schedule,
            log,
        )
    result["log"] = str(log_path)
    return result
