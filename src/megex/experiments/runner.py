"""One run of one method against one victim, to its largest budget, with evaluations on
the way: what every experiment's sweep runs (a job is a plain dict, so that it can go to
another process or a Ray task). A finished run folder is reused; an interrupted one resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import data as data_mod
from ..accel import exact_fp32
from ..attacks import POOL_ATTACKS
from ..defenses import build_defense
from ..engine import changed_settings, describe_run, run
from ..evaluate import Evaluator
from ..oracle import LocalOracle
from ..pools import load_pool, victim_images
from ..runs import RunFolder
from ..victim import Victim, cached_victim
from .common import log
from .methods import build_attack

__all__ = ["cells_of", "get_victim", "prepare_torch", "run_one"]


def get_victim(config: dict[str, Any], folder: Path, data_root: str | None, seed: int):
    """(victim, path): the victim of recipe seed `seed`, from `folder` or freshly trained."""
    return cached_victim(
        folder,
        config["dataset"],
        config["victim_arch"],
        seed=seed,
        validation_images=config["validation_images"],
        pool_images=config.get("pool_images", 0),
        data_root=data_root,
        device=config["device"],
        log=log,
    )


def prepare_torch(threads: int, device: str) -> None:
    torch.set_num_threads(threads)
    exact_fp32(device)


def is_remote(job: dict[str, Any]) -> bool:
    """Whether the job's victim is a service URL rather than a victim file."""
    return str(job["victim"]).startswith(("http://", "https://"))


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, victim, seed) run up to the largest budget; evaluations on the way.

    The victim is a file, or a service URL (job keys `api_key`, and `victim_answers`: a file
    of the service's labels on the test split, written by :func:`served_answers`, that the
    clone's fidelity and the victim's accuracy are read from)."""
    prepare_torch(job["threads"], job["device"])
    folder = RunFolder(job["run_dir"])
    if is_remote(job):
        victim: Any = RemoteVictim(job["victim_answers"])
        info: Any = victim.info
    else:
        victim = Victim.load(job["victim"])
        info = victim
    pool = None
    if job.get("pool") and job["attack"] in POOL_ATTACKS:
        # Each attack seed draws its own images: the intervals include the pool's draw, and
        # the methods compared at one seed hold the same images.
        pool = load_pool(
            job["pool"], victim_images(info), seed=job["seed"], data_root=job["data_root"]
        )
    attack = build_attack(job["attack"], job["settings"], job["seed"], job["device"], pool)
    oracle = _remote_oracle(job) if is_remote(job) else _oracle(job, victim, attack)
    try:
        return _run_or_reuse(job, folder, victim, attack, oracle)
    finally:
        if is_remote(job):
            oracle.close()


def _run_or_reuse(
    job: dict[str, Any], folder: RunFolder, victim: Any, attack: Any, oracle: Any
) -> dict[str, Any]:
    """The run's result: read from a finished folder with the same settings, or run."""
    if folder.config_path.is_file() and not job["fresh"]:
        # A finished or interrupted run is reused only if it had these very settings.
        changed = changed_settings(folder, describe_run(attack, oracle, job["budget"]))
        if changed:
            raise ValueError(
                f"{folder.path} holds a run with other settings ({'; '.join(changed)}); "
                "pass --fresh to run it again, or choose another --out"
            )
    base = {**job, "victim_accuracy": victim.accuracy}
    if folder.is_finished() and not job["fresh"]:
        result = folder.read_result()
        return {
            **base,
            "metrics": result["metrics"],
            "wall_s": result["elapsed_s"],
            "skipped": True,
        }
    result = _attack(job, folder, victim, attack, oracle)
    # A finished run needs no checkpoint (its replay buffer is most of the disk it takes).
    folder.checkpoint_path.unlink(missing_ok=True)
    return {
        **base,
        "metrics": result.metrics,
        # The run's own time, as its result.json records it: the same figure whether the
        # table is written now or rebuilt later from the records.
        "wall_s": result.elapsed_s,
        "queries_used": oracle.queries_used,
        "skipped": False,
    }


def _oracle(job: dict[str, Any], victim: Victim, attack: Any) -> LocalOracle:
    """The victim's in-process service for this run, behind the job's defences."""
    defenses = [build_defense(spec) for spec in job.get("defenses", [])]
    return LocalOracle(
        victim,
        budget=job["budget"],
        explanation=None,
        seed=job["seed"],
        device=job["device"],
        defenses=defenses,
        # An attack with on_device (megex.accel) sends its queries from the device.
        answer_on_device=getattr(attack.config, "on_device", False) and not defenses,
    )


class RemoteVictim:
    """A served victim as a run sees it: its accuracy and its labels on the test split (as
    the service answered them, once, before the runs), and what a pool needs to know."""

    def __init__(self, path: str | Path):
        saved = torch.load(path, weights_only=True)
        self.labels: torch.Tensor = saved["labels"]
        self.accuracy = float(saved["accuracy"])
        self.info = {
            "input_shape": [int(s) for s in saved["input_shape"]],
            "dataset": saved.get("dataset"),
        }


def served_answers(
    url: str,
    api_key: str | None,
    dataset: str,
    data_root: str | None,
    path: Path,
    client: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The service's labels on `dataset`'s test split, its accuracy, and how many queries
    that took (each test image is one query to the service), kept in `path` (read back, not
    asked again, when it is there). client: megex.client.connect's options."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return {"accuracy": float(saved["accuracy"]), "queries": int(saved["queries"])}
    from ..client import connect  # the 'server' extra: httpx

    x, y = data_mod.load(dataset, data_root).test_tensors()
    oracle = connect(url, api_key, **(client or {}))
    try:
        labels = torch.cat(
            [oracle.query(x[i : i + 256]).probabilities.argmax(1) for i in range(0, len(x), 256)]
        )
    finally:
        oracle.close()
    accuracy = float((labels == y).float().mean())
    state = {
        "labels": labels,
        "accuracy": torch.tensor(accuracy),
        "queries": torch.tensor(len(x)),
        "input_shape": torch.tensor(list(oracle.input_shape)),
        "dataset": dataset,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return {"accuracy": accuracy, "queries": len(x)}


def _remote_oracle(job: dict[str, Any]) -> Any:
    """The served victim's client (over the protocol in the job's `client` options): the
    run stops at the job's budget; the service's own ledger, where it keeps one, counts its
    queries too."""
    from ..client import connect  # the 'server' extra: httpx

    return connect(job["victim"], job.get("api_key"), **job.get("client", {}))


def _attack(job: dict[str, Any], folder: RunFolder, victim: Any, attack: Any, oracle: Any) -> Any:
    """Run the attack to the job's budget (resumed from its checkpoint if it has one),
    evaluated on the test split at the budgets and the job's marks."""
    ds = data_mod.load(job["dataset"], job["data_root"])
    x_test, y_test = ds.test_tensors()
    if isinstance(victim, RemoteVictim):
        evaluator = Evaluator(x_test, y_test, victim.labels, victim.accuracy)
    else:
        evaluator = Evaluator.from_victim(victim, x_test, y_test)
    oracle.explanation = getattr(attack.config, "explanation", None)
    resume = folder.has_checkpoint() and not job["fresh"]
    local = isinstance(oracle, LocalOracle)
    if resume and local:
        # The service's ledger and noise continue where the interrupted run left them.
        oracle.load_state_dict(folder.load_checkpoint()["service"])
    result = run(
        attack,
        oracle,
        job["budget"],
        evaluator=evaluator,
        eval_every=job["budget"],
        eval_at=sorted({*job["budgets"], *job["eval_at"]}),
        run_dir=job["run_dir"],
        resume=resume,
        progress=job["progress"],
        service_state=oracle.state_dict if local else None,
    )
    if not result.finished:
        raise KeyboardInterrupt
    return result


def cells_of(done: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The evaluation row for each budget of a run: the last one within that budget."""
    cells = {}
    for budget in done["budgets"]:
        rows = [r for r in done["metrics"] if r["queries"] <= budget]
        if rows:
            cells[budget] = rows[-1]
    return cells
