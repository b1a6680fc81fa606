"""Runs many run specifications: locally in processes (the default), or as Ray tasks.

A job is a plain dict that `function(job)` turns into a result, and it must be resumable:
called again for a job whose worker died, `function` continues from the job's last
checkpoint, and for a job that already finished it returns the stored result without
running it again (the benchmark's run folders and the search's studies behave so). On that
contract the runner builds its fault tolerance, the same for every backend:

- a run that raises (bad settings, a bug) is reported once, as it happens, with its error,
  and the others go on; `run_jobs` returns the failures and the caller decides;
- a worker that dies (killed, out of memory, its machine lost) costs at most its run's work
  since the last checkpoint: the run is started again, at most `retries` times, and resumes;
- a sweep interrupted (Ctrl-C) and started again redoes no finished run.

Locally, `workers` spawned processes at a time, one per run; `workers` 1 runs in this
process (which is then the only worker: the sweep started again resumes). With `ray`
("local" for a new Ray instance on this machine, or a cluster's address), one Ray task per
run declaring `cpus` CPUs and `gpus` GPUs; the Ray backend (:mod:`.ray_tasks`)
imports Ray only then, so that Ray stays an optional extra.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import ray_tasks
from .jobs import Failure, Job, SweepFailed, call, deliver, job_name, log
from .local import run_processes

__all__ = [
    "Failure",
    "SweepFailed",
    "call",
    "deliver",
    "describe",
    "job_name",
    "options",
    "run_jobs",
]


def run_jobs(
    jobs: list[Job],
    workers: int | None,
    done: Callable[[Any], None],
    function: Callable[[Job], Any],
    *,
    ray: str | None = None,
    cpus: float = 1,
    gpus: float = 0,
    retries: int = 2,
    shared: str | Path | None = None,
    failed: Callable[[Failure], None] | None = None,
) -> list[Failure]:
    """Call `function(job)` for every job and `done(result)` as each finishes (in the order
    they finish); return the runs that failed, each already passed to `failed` (default:
    one line on stderr) as it failed.

    workers: runs at once (None: 1 locally; with Ray, as many as the cluster's resources
    allow). ray: None for local processes, "local" for a new Ray instance on this machine,
    or the address of a running cluster ("auto", "HOST:6379", "ray://HOST:10001").
    cpus, gpus: what each run needs (declared to Ray). retries: times a run whose worker
    died is started again. shared: a folder every worker must see (checked on each of a
    cluster's machines before any run starts).
    """
    if workers is not None and workers < 1:
        raise ValueError(f"--jobs: {workers} runs at once; expected 1 or more")
    if retries < 0:
        raise ValueError(f"--retries: {retries}; expected 0 or more")
    report = failed or (lambda f: log(f"sweep: {f.line()}"))
    failures: list[Failure] = []

    def fail(failure: Failure) -> None:
        failures.append(failure)
        report(failure)

    if ray is not None:
        ray_tasks.run(
            jobs, workers, done, function, fail,
            address=ray, cpus=cpus, gpus=gpus, retries=retries, shared=shared,
        )  # fmt: skip
    elif (workers or 1) <= 1:
        for job in jobs:
            deliver(job, call(function, job), done, fail)
    else:
        run_processes(jobs, workers, done, function, fail, retries)
    return failures


def options(args: Any, device: str) -> dict[str, Any]:
    """run_jobs's keyword arguments from the options of add_arguments (and --threads): each
    run needs its torch threads in CPUs, and one GPU on cuda (Ray gives each its own)."""
    return {
        "ray": getattr(args, "ray", None),
        "cpus": getattr(args, "threads", 1),
        "gpus": 1 if str(device).startswith("cuda") else 0,
        "retries": getattr(args, "retries", 2),
    }


def describe(args: Any, unit: str = "runs") -> str:
    """How the `unit` are run, in words (for logs and tables)."""
    jobs, ray = getattr(args, "jobs", None), getattr(args, "ray", None)
    if not ray:
        return f"in local processes, {jobs or 1} at a time"
    where = "a local Ray instance" if ray == "local" else f"the Ray cluster at {ray}"
    return f"as Ray tasks on {where}, {f'at most {jobs}' if jobs else 'as many as fit'} at a time"
