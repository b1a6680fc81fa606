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
run declaring `cpus` CPUs and `gpus` GPUs; the Ray backend is in `megex.sweep_ray`,
imported only then, so that Ray stays an optional extra.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stop_signals import handled_stop_signals

__all__ = [
    "Failure",
    "SweepFailed",
    "add_arguments",
    "call",
    "deliver",
    "describe",
    "job_name",
    "options",
    "positive",
    "run_jobs",
]

Job = dict[str, Any]


@dataclass(frozen=True)
class Failure:
    """A run that did not finish: its job, the error's kind and message, the traceback (from
    the worker), and whether it failed on its own settings (a ValueError: the user's to fix)."""

    job: Job
    kind: str  # the exception's class name, or "WorkerDied"
    message: str
    details: str = ""
    settings: bool = False

    def line(self) -> str:
        return f"{job_name(self.job)} failed: {self.kind}: {self.message}"


class SweepFailed(Exception):
    """Some runs of a sweep failed (each was reported as it failed); the others finished."""

    def __init__(self, failures: list[Failure], total: int, what: str = "runs"):
        self.failures = failures
        kept = total - len(failures)
        super().__init__(
            f"{len(failures)} of {total} {what} failed (reported above); the {kept} that "
            "finished are kept, and the same command run again reuses them"
        )

    @property
    def settings_only(self) -> bool:
        """Every failure was a mistake in the settings (exit status 2, not 1)."""
        return all(f.settings for f in self.failures)


def job_name(job: Job) -> str:
    """How a job is named in messages: its "name", else its run folder."""
    return str(job.get("name") or job.get("run_dir") or "a job")


def call(function: Callable[[Job], Any], job: Job) -> tuple[str, Any]:
    """Run one job where the worker runs it: ("ok", result), or ("error", the fields of a
    Failure after its job) for an exception of the run's own. A dying worker returns
    nothing: that is for the runner to notice. KeyboardInterrupt passes through."""
    try:
        return "ok", function(job)
    except Exception as exc:
        return "error", (
            type(exc).__name__,
            str(exc),
            traceback.format_exc(),
            isinstance(exc, ValueError),
        )


def deliver(
    job: Job,
    outcome: tuple[str, Any],
    done: Callable[[Any], None],
    fail: Callable[[Failure], None],
) -> None:
    """Pass what `call` returned for `job` on: its result to `done`, or its failure to `fail`."""
    status, value = outcome
    if status == "ok":
        done(value)
    else:
        fail(Failure(job, *value))


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
    report = failed or (lambda f: _log(f"sweep: {f.line()}"))
    failures: list[Failure] = []

    def fail(failure: Failure) -> None:
        failures.append(failure)
        report(failure)

    if ray is not None:
        from . import sweep_ray

        sweep_ray.run(
            jobs, workers, done, function, fail,
            address=ray, cpus=cpus, gpus=gpus, retries=retries, shared=shared,
        )  # fmt: skip
    elif (workers or 1) <= 1:
        for job in jobs:
            deliver(job, call(function, job), done, fail)
    else:
        _run_processes(jobs, workers, done, function, fail, retries)
    return failures


def _run_processes(
    jobs: list[Job],
    workers: int,
    done: Callable[[Any], None],
    function: Callable[[Job], Any],
    fail: Callable[[Failure], None],
    retries: int,
) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    todo = list(range(len(jobs)))
    restarts = 0
    with _stop_signals_interrupt():
        while todo:
            # One spawned process per run (no forked torch state). A process that dies breaks
            # the pool and every run still in it; those start again from their checkpoints.
            pool = ProcessPoolExecutor(
                min(workers, len(todo)),
                mp_context=multiprocessing.get_context("spawn"),
                max_tasks_per_child=1,
            )
            lost = []
            try:
                futures = {pool.submit(call, function, jobs[i]): i for i in todo}
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        lost.append(i)
                        continue
                    deliver(jobs[i], outcome, done, fail)
            except BaseException:
                # Ctrl-C, SIGTERM or a failing `done`: end the workers at once. Checkpoints are
                # written atomically, so each run resumes from its last evaluation next time.
                _terminate(pool)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            todo = sorted(lost)
            if todo and restarts >= retries:
                for i in todo:
                    message = f"a worker process died; given up after {retries} restart(s)"
                    fail(Failure(jobs[i], "WorkerDied", message))
                return
            if todo:
                restarts += 1
                _log(
                    f"sweep: a worker process died; {len(todo)} unfinished run(s) start again "
                    f"from their checkpoints (restart {restarts} of at most {retries})"
                )


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the sweep's driver: handled as Ctrl-C is."""


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """While local workers run, SIGTERM and SIGHUP raise in the driver like Ctrl-C, so that
    it ends its workers before it exits. By default those signals end the driver alone and
    leave its spawned workers running, unseen, on the machine's cores."""

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped(signal.Signals(signum).name)

    with handled_stop_signals(stop):
        yield


def _terminate(pool: Any) -> None:
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()


def add_arguments(parser: argparse.ArgumentParser, unit: str = "runs") -> None:
    """--jobs, --ray and --retries: how a command's `unit` are run (bench, tune, ...)."""
    parser.add_argument(
        "--jobs",
        type=positive,
        help=f"{unit} at once: local processes (default 1); with --ray, at most this many "
        "Ray tasks (default: as many as the cluster's CPUs and GPUs allow)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help=f"run the {unit} as Ray tasks (pip install 'megex[ray]'): alone, on a new Ray "
        "instance on this machine; with an ADDRESS (auto, HOST:6379, ray://HOST:10001), on "
        "that cluster. --out must then be a folder every machine sees",
    )
    parser.add_argument(
        "--retries",
        type=lambda text: positive(text, minimum=0),
        default=2,
        help=f"times one of the {unit} is started again (from its checkpoint) when its worker dies",
    )


def positive(text: str, minimum: int = 1) -> int:
    """An option's whole number, at least `minimum` (argparse reports the message)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= {minimum}")
    return value


def options(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """run_jobs's keyword arguments from the options of add_arguments (and --threads): each
    run needs its torch threads in CPUs, and one GPU on cuda (Ray gives each its own)."""
    return {
        "ray": getattr(args, "ray", None),
        "cpus": getattr(args, "threads", 1),
        "gpus": 1 if str(device).startswith("cuda") else 0,
        "retries": getattr(args, "retries", 2),
    }


def describe(args: argparse.Namespace, unit: str = "runs") -> str:
    """How the `unit` are run, in words (for logs and tables)."""
    jobs, ray = getattr(args, "jobs", None), getattr(args, "ray", None)
    if not ray:
        return f"in local processes, {jobs or 1} at a time"
    where = "a local Ray instance" if ray == "local" else f"the Ray cluster at {ray}"
    return f"as Ray tasks on {where}, {f'at most {jobs}' if jobs else 'as many as fit'} at a time"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
