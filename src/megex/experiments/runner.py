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


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (method, victim, seed) run up to the largest budget; evaluations on the way."""
    prepare_torch(job["threads"], job["device"])
    folder = RunFolder(job["run_dir"])
    victim = Victim.load(job["victim"])
    pool = None
    if job.get("pool") and job["attack"] in POOL_ATTACKS:
        # Each attack seed draws its own images: the intervals include the pool's draw, and
        # the methods compared at one seed hold the same images.
        pool = load_pool(
            job["pool"], victim_images(victim), seed=job["seed"], data_root=job["data_root"]
        )
    attack = build_attack(job["attack"], job["settings"], job["seed"], job["device"], pool)
    oracle = _oracle(job, victim, attack)
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


def _attack(
    job: dict[str, Any], folder: RunFolder, victim: Victim, attack: Any, oracle: LocalOracle
) -> Any:
    """Run the attack to the job's budget (resumed from its checkpoint if it has one),
    evaluated on the test split at the budgets and the job's marks."""
    ds = data_mod.load(job["dataset"], job["data_root"])
    x_test, y_test = ds.test_tensors()
    evaluator = Evaluator.from_victim(victim, x_test, y_test)
    oracle.explanation = getattr(attack.config, "explanation", None)
    resume = folder.has_checkpoint() and not job["fresh"]
    if resume:
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
        service_state=oracle.state_dict,
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
