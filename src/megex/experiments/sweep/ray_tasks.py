"""The Ray backend of megex.experiments.sweep: one Ray task per run (imported only with --ray).

- Each run is a Ray task that declares what it needs (`num_cpus` = the run's torch threads,
  `num_gpus` 1 when it runs on cuda), so Ray places as many runs on each machine as fit.
  Results come back to the driver as tasks finish (`ray.wait`), and the driver writes the
  same tables and plots as a local sweep.
- A worker (or machine) that dies: Ray starts the task again, at most `retries` times
  (`max_retries`); the run resumes from the checkpoint in its run folder. A run's own
  exception is returned as a value, not raised, so Ray never retries bad settings: they are
  reported once.
- Storage: run folders (checkpoints, metrics, results) are written by the workers to the
  paths in the jobs, so the output folder must be on a filesystem every machine mounts at
  the same path (NFS, a cluster filesystem); a retried run may land on another machine and
  finds its checkpoint there. On a cluster (one the sweep did not start), one small task
  per machine checks that it sees the folder before any run starts.
- Code: workers import megex as installed on their machine. When this process runs megex
  from a source tree (PYTHONPATH, not installed), the workers are given that path too.
- A program that has already called `ray.init` keeps its connection: the sweep uses it and
  leaves it open. Otherwise the sweep connects (or starts a local instance) and disconnects
  at the end.
"""

from __future__ import annotations

import contextlib
import os
import site
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .jobs import Failure, Job, call, deliver, job_name, log

__all__ = ["ClusterError", "run", "runtime_env"]

# Ray's errors for a task whose worker process or machine was lost.
_DEATHS = ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ActorDiedError")


class ClusterError(Exception):
    """The cluster cannot run the sweep (unreachable, cannot import megex, cannot see the
    output folder): nothing was run."""


def run(
    jobs: list[Job],
    workers: int | None,
    done: Callable[[Any], None],
    function: Callable[[Job], Any],
    fail: Callable[[Failure], None],
    *,
    address: str,
    cpus: float,
    gpus: float,
    retries: int,
    shared: str | Path | None,
) -> None:
    """Run every job as a Ray task (see megex.experiments.sweep.run_jobs for the arguments)."""
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError("--ray needs Ray: pip install 'megex[ray]'", name="ray") from None
    started = _connect(ray, address, workers, cpus)
    pending: dict[Any, int] = {}
    try:
        _check_resources(ray, cpus, gpus)
        if shared is not None and not started:
            check_shared(Path(shared))
        task = ray.remote(call)
        options = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "max_retries": retries,
            "retry_exceptions": False,
            "runtime_env": runtime_env(),
        }
        _run_tasks(ray, task, options, jobs, workers, function, done, fail, pending)
    except BaseException:
        # Ctrl-C or a failing `done`: the runs not started are dropped, and the workers of
        # those going are ended (an interrupt inside a worker could leave it with half-
        # imported modules for its next task). Each run resumes from its last checkpoint
        # next time: the engine saves none on an interrupt either.
        _cancel(ray, pending)
        raise
    finally:
        if started:
            ray.shutdown()


def _run_tasks(
    ray: Any,
    task: Any,
    options: dict[str, Any],
    jobs: list[Job],
    workers: int | None,
    function: Callable[[Job], Any],
    done: Callable[[Any], None],
    fail: Callable[[Failure], None],
    pending: dict[Any, int],
) -> None:
    """Keep at most `workers` tasks going (in `pending`: Ray reference -> job index) until
    every job has finished or failed, handing each outcome on as it comes."""
    queue = list(range(len(jobs)))[::-1]
    limit = workers or len(jobs)
    while queue or pending:
        while queue and len(pending) < limit:
            i = queue.pop()
            ref = task.options(name=job_name(jobs[i]), **options).remote(function, jobs[i])
            pending[ref] = i
        [ref], _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as err:
            fail(_failure(jobs[i], err, options["max_retries"]))
            continue
        deliver(jobs[i], outcome, done, fail)


def _failure(job: Job, err: Exception, retries: int) -> Failure:
    """The failure a Ray error stands for: a worker that died (after its retries) or the
    error itself."""
    kind = type(err).__name__
    died = any(name in kind for name in _DEATHS)
    message = str(err).strip().splitlines()[0] if str(err).strip() else kind
    if died:
        message = f"its worker died {retries + 1} time(s); last: {message}"
    return Failure(job, "WorkerDied" if died else kind, message, str(err))


def _cancel(ray: Any, pending: dict[Any, int]) -> None:
    """End the tasks still going, and wait (a while) until they have stopped."""
    for ref in pending:
        ray.cancel(ref, force=True)
    if pending:
        # Until they have stopped: a sweep started again must not meet a run that is
        # still writing its folder. (A lost connection here must not hide the cause.)
        with contextlib.suppress(Exception):
            ray.wait(list(pending), num_returns=len(pending), timeout=60)


def _connect(ray: Any, address: str, workers: int | None, cpus: float) -> bool:
    """Connect to Ray (start a local instance for "local"); False if already connected."""
    if ray.is_initialized():
        return False
    if address == "local":
        # A new instance on this machine, sized by --jobs (default: all its CPUs).
        num_cpus = None if workers is None else max(1, round(workers * cpus))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        _reachable(address)
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ClusterError(f"--ray {address}: cannot connect ({err})") from None
    log(f"sweep: Ray at {address}: {_describe(ray.cluster_resources())}")
    return True


def _reachable(address: str, timeout: float = 10) -> None:
    """Fail at once on a HOST:PORT that does not answer (Ray itself retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray finds the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise ClusterError(f"--ray {address}: nothing answers there ({err})") from None


def _describe(resources: dict[str, float]) -> str:
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    return f"{cpus:g} CPU(s), {gpus:g} GPU(s)"


def _check_resources(ray: Any, cpus: float, gpus: float) -> None:
    have = ray.cluster_resources()
    if have.get("CPU", 0) < cpus or have.get("GPU", 0) < gpus:
        # An autoscaling cluster may still add machines: said, not refused.
        log(
            f"sweep: each run asks for {cpus:g} CPU(s) and {gpus:g} GPU(s), and the cluster "
            f"has {_describe(have)} now: runs wait until machines that fit join"
        )


def runtime_env() -> dict[str, Any]:
    """What Ray workers need to import this megex: nothing when it is installed; its source
    folder on PYTHONPATH when it runs from a source tree."""
    src = Path(__file__).resolve().parents[1]
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if src in installed:
        return {}
    paths = [str(src), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}


def _sees(path: str) -> tuple[str, bool]:
    return socket.gethostname(), os.path.exists(path)


def check_shared(folder: Path, timeout: float = 300) -> None:
    """Check that every machine of the cluster sees `folder` (it holds the run folders)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".megex-visible-{uuid.uuid4().hex}"
    marker.write_text("written by the sweep's driver; removed once every machine has seen it\n")
    try:
        probe = ray.remote(num_cpus=0)(_sees)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                runtime_env=runtime_env(),
            ).remote(str(marker))
            for n in nodes
        ]
        try:
            seen = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"the cluster's machines did not answer within {timeout:g} s"
            ) from None
        except ray.exceptions.RayError as err:
            first = str(err).strip().splitlines()[-1]
            raise ClusterError(
                f"the Ray workers cannot run megex ({first}); install megex (and torch) on "
                "every machine, or put its source on a path every machine sees"
            ) from None
        for node, (host, ok) in zip(nodes, seen):
            if not ok:
                raise ClusterError(
                    f"--out: {folder} is not visible from the Ray worker on {host} "
                    f"({node.get('NodeManagerAddress')}); the run folders must be on a "
                    "filesystem every machine mounts at the same path"
                )
    finally:
        marker.unlink(missing_ok=True)
