"""The tuning search: the same number of trials for every method, off the test set.

Each method's own knobs (DFME's included) are searched with Optuna's TPE sampler, every
method given the same number of trials at the same reduced budget. A trial attacks a tuning
victim (a recipe seed the benchmark never uses) with tuning seeds (never the reporting
ones), and is scored on validation images held out of the victim's training split: the
mean validation accuracy of the clone at a few query marks (which rewards getting there
early as well as far). The test split is never read.

Studies live in one Optuna storage (by default the SQLite file `<out>/studies.db`), so a
search that stops continues where it stopped: trials that finished are kept, a trial cut
short is run again (Optuna's heartbeat marks it failed, and the retry callback re-queues
it). The best settings per method are written to `<out>/tuned.json`, which the benchmark
reads.

Distributed (megex.experiments.sweep: local processes, or Ray tasks with --ray): each method's study
is worked on by `--parallel-trials` workers at once, each an ordinary Optuna worker that
asks the shared storage for its next trial (TPE with the constant liar, so that workers do
not propose the same point). This is Optuna with a shared storage rather than Ray Tune: the
study stays the one resumable record that the benchmark and a person read, whatever ran it;
the same code runs with or without Ray; Optuna's heartbeats re-queue the trial of a worker
that died; and Ray Tune would add a second experiment state (and its pandas and pyarrow
dependencies) for trials that each report once. The storage must be one that every worker
reaches: the SQLite file serves processes on one machine (a local Ray instance included);
on a cluster of several machines, pass a database URL with `--storage`
(postgresql://... or mysql://..., the driver installed). Optuna's journal file, which works
on a shared filesystem, is not offered: it has no heartbeats, so a trial on a worker that
died would stay running for ever. Every method is judged on the same number of trials: its
first `--trials` finished trials by number (parallel workers may finish a few more).

Each study also runs its method's published settings as one more trial (:mod:`.published`;
`--no-published-trial` queues none): queued before the first searched trial of a new study,
after the last one of a study that has its trials.

With `--confirm-trials N` (:mod:`.confirm`), each method's N best trials are then scored
on more tuning seeds and the best mean over all seeds is chosen: a setting that scored well
on the search's few seeds by luck does not reach the benchmark.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from ...runs import write_json_atomic
from .. import sweep
from ..common import log
from ..methods import METHODS
from ..query_efficiency import load_config
from ..runner import get_victim
from . import confirm, published, trials
from .trials import (
    SEARCH,
    judged_trials,
    method_setup,
    open_storage,
    portable_url,
    public_url,
    search_space,
    storage_url,
)

__all__ = ["SEARCH", "run_search", "search_space"]


def search_method(job: dict[str, Any]) -> dict[str, Any]:
    """Run the remaining trials of one method's study; return its best settings."""
    import optuna

    search, method = job["search"], job["method"]
    victim, evaluator, attack_name, fixed = method_setup(job)
    study = optuna.create_study(
        study_name=method,
        storage=open_storage(job["storage"]),
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(
            seed=job["sampler_seed"],
            n_startup_trials=search["startup_trials"],
            # Workers that share a study: running trials count as their worst, so that two
            # workers do not propose the same point.
            constant_liar=job["parallel"] > 1,
        ),
    )

    def objective(trial: Any) -> float:
        params = search_space(trial, attack_name, pinned=METHODS[method])
        t0 = time.time()
        value, curves = trials.score(
            method,
            {**fixed, **params},
            attack_name,
            victim,
            evaluator,
            search,
            job["device"],
            pool=job["config"].get("pool"),
            data_root=job["data_root"],
        )
        trial.set_user_attr("curves", curves)
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        log(f"tune {method}: trial {trial.number} -> {value:.4f} ({time.time() - t0:.0f} s)")
        return value

    complete = optuna.trial.TrialState.COMPLETE
    # The searched trials, and the published settings' one where the study holds it.
    extra = sum(published.is_published(t) for t in study.get_trials(deepcopy=False))
    target = search["trials"] + extra
    done = len(study.get_trials(deepcopy=False, states=(complete,)))
    if done < target:
        log(f"tune {method}: {done} of {target} trials done; running the rest")
        study.optimize(
            objective, callbacks=[optuna.study.MaxTrialsCallback(target, states=(complete,))]
        )
    judged = judged_trials(study, search["trials"])
    best = max(judged, key=lambda t: t.value)
    return {
        "method": method,
        "params": best.params,
        "value": best.value,
        "trial": best.number,
        "trials": len(judged),
        "published": published.published_row(judged),
    }


def run_search(args: Any) -> dict[str, Any]:
    """Search every method's settings (then confirm the best, if asked); write tuned.json
    and return what it holds."""
    config = load_config(args.config)
    config["tuned_settings"] = None  # the search starts from the untuned settings
    search = _search_settings(args)
    methods = args.methods or search["methods"]
    _check_methods(methods)
    device = args.device or config["device"]
    out, url = Path(args.out).resolve(), storage_url(args)
    if getattr(args, "victim_file", None):
        # A given victim (megex audit's search on the victim it audits): its own held-out
        # validation images score the trials.
        vpath = Path(args.victim_file).resolve()
    else:
        _, vpath = get_victim(config, out / "victims", args.data_root, search["victim_seed"])
    jobs = _worker_jobs(args, methods, config, search, str(vpath), url, device)
    _create_studies(url, methods, search["published_trial"])
    t0 = time.time()
    tuned_path = out / "tuned.json"
    doc: dict[str, Any] = {}

    confirming = search["confirm_trials"] > 0

    def finished(res: dict[str, Any]) -> None:
        # Written as each worker finishes (the last of a method's workers sees all its
        # trials), so a long search leaves what it has; with a confirmation step, only once
        # that step has chosen.
        nonlocal doc
        if confirming and "confirmation" not in res:
            log(f"tune {res['method']}: search's best {res['value']:.4f} (trial {res['trial']})")
            return
        doc = _record(tuned_path, config, search, url, res)
        log(f"tune {res['method']}: best {res['value']:.4f} (trial {res['trial']})")

    log(f"tune: {len(jobs)} trial workers {sweep.describe(args)}; studies in {public_url(url)}")
    options = sweep.options(args, device)
    failures = sweep.run_jobs(jobs, args.jobs, finished, search_method, shared=out, **options)
    if failures:
        raise sweep.SweepFailed(failures, len(jobs), "trial workers")
    if confirming:
        # One job per method, after every trial of every method has finished.
        checks = [{**job, "name": f"tune {job['method']} confirmation"} for job in jobs
                  if job["worker"] == 0]  # fmt: skip
        failures = sweep.run_jobs(
            checks, args.jobs, finished, confirm.confirm_method, shared=out, **options
        )
        if failures:
            raise sweep.SweepFailed(failures, len(checks), "confirmation jobs")
    log(f"tune: {time.time() - t0:.0f} s; best settings in {tuned_path}")
    return doc


def _search_settings(args: Any) -> dict[str, Any]:
    """SEARCH with the command line's trials, budget (and marks) and confirmation; checked."""
    search = dict(SEARCH)
    if args.trials:
        search["trials"] = args.trials
    if args.budget:
        search["budget"] = args.budget
        search["marks"] = [m for m in search["marks"] if m < args.budget] + [args.budget]
    if getattr(args, "marks", None):
        if max(args.marks) > search["budget"]:
            raise ValueError(
                f"--marks: {max(args.marks)} is past the trials' budget {search['budget']}"
            )
        search["marks"] = sorted(set(args.marks))
    if getattr(args, "search_seeds", None):
        search["seeds"] = list(args.search_seeds)
    if args.confirm_trials is not None:
        search["confirm_trials"] = args.confirm_trials
    if args.confirm_seeds:
        search["confirm_seeds"] = args.confirm_seeds
    if getattr(args, "no_published_trial", False):
        search["published_trial"] = False
    confirm.validate(search)
    return search


def _check_methods(methods: list[str]) -> None:
    """Refuse a method that is not searched (unknown, or tuned as another)."""
    for method in methods:
        if method not in METHODS or "tuned_as" in METHODS[method]:
            raise ValueError(
                f"--methods: {method!r} is not a searched method; expected one of "
                f"{', '.join(m for m in METHODS if 'tuned_as' not in METHODS[m])}"
            )


def _worker_jobs(
    args: Any,
    methods: list[str],
    config: dict[str, Any],
    search: dict[str, Any],
    victim: str,
    url: str,
    device: str,
) -> list[dict[str, Any]]:
    """One job per method and parallel trial worker, each with its own sampler seed."""
    return [
        {
            "name": f"tune {m} worker {k}",
            "method": m,
            "config": config,
            "search": search,
            "victim": victim,
            "data_root": args.data_root and str(Path(args.data_root).resolve()),
            "storage": url,
            "host": socket.gethostname(),
            "device": device,
            "threads": args.threads,
            "parallel": args.parallel_trials,
            # One worker per method keeps the seeds of a search run without parallel trials.
            "sampler_seed": i + 1000 * k,
            "worker": k,
        }
        for i, m in enumerate(methods)
        for k in range(args.parallel_trials)
    ]


def _create_studies(url: str, methods: list[str], published_trial: bool) -> None:
    """The database and one study per method, made here, once: two workers creating the
    same schema at once collide; each with its published settings' trial queued, if asked
    and not there yet."""
    try:
        import optuna
    except ModuleNotFoundError:
        message = "the search needs Optuna: pip install 'megex[tune]'"
        raise ModuleNotFoundError(message, name="optuna") from None

    storage = open_storage(url)
    for method in methods:
        study = optuna.create_study(
            study_name=method, storage=storage, direction="maximize", load_if_exists=True
        )
        if published_trial and published.enqueue_published(
            study, method, METHODS[method]["attack"], pinned=METHODS[method]
        ):
            log(f"tune {method}: its published settings queued as a trial")


def _record(
    path: Path, config: dict[str, Any], search: dict[str, Any], url: str, res: dict[str, Any]
) -> dict[str, Any]:
    """Add one method's best settings to the search's output file (atomically)."""
    doc = json.loads(path.read_text()) if path.is_file() else {}
    method = res["method"]
    doc.update(
        {
            "description": "Settings chosen by megex.tune: validation images, tuning victim "
            "and seeds only; the benchmark reads them.",
            "dataset": config["dataset"],
            "validation_images": config["validation_images"],
            "search": search,
            "study": portable_url(url),
        }
    )
    for key, value in (("methods", res["params"]), ("validation_score", res["value"]),
                       ("trials", res["trials"])):  # fmt: skip
        doc.setdefault(key, {})[method] = value
    if res.get("published"):
        doc.setdefault("published", {})[method] = res["published"]
    else:
        doc.get("published", {}).pop(method, None)
    # The methods this file holds settings for (searched by this call or an earlier one),
    # not the default list.
    doc["search"] = {**search, "methods": list(doc["methods"])}
    if "confirmation" in res:
        doc.setdefault("confirmation", {})[method] = res["confirmation"]
    else:
        doc.get("confirmation", {}).pop(method, None)
    write_json_atomic(path, doc)
    return doc
