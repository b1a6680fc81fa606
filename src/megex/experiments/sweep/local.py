"""Local workers: one spawned process per run, `workers` at a time; a run whose process dies
starts again from its checkpoint, at most `retries` times."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ...stop_signals import handled_stop_signals
from .jobs import Failure, Job, call, deliver, log

__all__ = ["run_processes"]


def run_processes(
    jobs: list[Job],
    workers: int,
    done: Callable[[Any], None],
    function: Callable[[Job], Any],
    fail: Callable[[Failure], None],
    retries: int,
) -> None:
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
                log(
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
