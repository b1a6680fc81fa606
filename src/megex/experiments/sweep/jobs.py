"""What a sweep runs and what it reports: a job (a plain dict), a failure, and calling a job
where a worker runs it (in this process, a spawned process or a Ray task)."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Failure", "Job", "SweepFailed", "call", "deliver", "job_name", "log"]

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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
