"""Runs many run specifications (plain dicts, each a resumable unit of work).

Locally, one spawned process per job, `workers` at a time: a job that is interrupted
resumes from its own checkpoint when the sweep is started again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["run_jobs"]


def run_jobs(
    jobs: list[dict[str, Any]],
    workers: int,
    done: Callable[[Any], None],
    function: Callable[[dict[str, Any]], Any],
) -> None:
    """Call `function(job)` for every job, `workers` processes at a time, and `done` with
    each result as it comes (in the order they finish)."""
    if workers <= 1:
        for job in jobs:
            done(function(job))
        return
    import multiprocessing

    # One process per run (spawned: no forked torch state); on Ctrl-C the workers are ended
    # at once. Checkpoints are written atomically, so each run resumes from its last
    # evaluation next time.
    pool = multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=1)
    try:
        for res in pool.imap_unordered(function, jobs, chunksize=1):
            done(res)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.close()
        pool.join()
