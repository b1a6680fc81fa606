"""A short search of the attackers' settings on the audited victim (`--search N`): the
benchmark's tuning search (megex.experiments.tuning) with N trials per method, each scored
on the validation images the victim held out of its training (never its test split), at the
threat model's budgets, with one tuning seed that the audit's attack seeds never use. Both
methods of a threat model get the same trials, as in the benchmark. The studies resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..tuning import run_search
from .plan import ThreatModel
from .threats import for_threat_model
from .victims import AuditTarget

__all__ = ["SEARCH_SEED", "check_searchable", "search_settings", "searched_source"]

# Tuning seed: apart from the audit's attack seeds (0, 1, ...).
SEARCH_SEED = 100


def check_searchable(target: AuditTarget, explanation: str) -> None:
    """Refuse a search the audit cannot run fairly; ValueError names --search."""
    if target.kind != "file":
        raise ValueError(
            "--search: the search scores trials on the victim's held-out validation images, "
            "which a URL does not say; audit the victim file"
        )
    if not target.validation_images:
        raise ValueError(
            "--search: the victim holds out no validation images to score trials on (train "
            "it with megex train-victim --validation-images N), and the test split is never "
            "searched on"
        )
    if explanation != "gradient":
        raise ValueError(f"--search: searched for gradient maps only, not {explanation}")


def search_settings(
    tm: ThreatModel,
    target: AuditTarget,
    trials: int,
    out: Path,
    data_root: str | None,
    jobs: int,
) -> Path:
    """Run (or resume) the search of one threat model's two methods; its tuned.json."""
    folder = out / "search" / tm.key
    folder.mkdir(parents=True, exist_ok=True)
    config = for_threat_model(tm, target.dataset, [SEARCH_SEED], target.held_out_for_pools)
    config.update(validation_images=target.validation_images, tuned_settings=None)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(config, indent=1))
    args = argparse.Namespace(
        config=str(config_path),
        methods=list(tm.methods),
        trials=trials,
        budget=tm.top,
        marks=list(tm.budgets),
        confirm_trials=0,
        confirm_seeds=None,
        device=None,
        out=str(folder),
        data_root=data_root,
        jobs=jobs,
        threads=1,
        parallel_trials=1,
        storage=None,
        ray=None,
        retries=2,
        victim_file=target.location,
        search_seeds=[SEARCH_SEED],
    )
    run_search(args)
    return folder / "tuned.json"


def searched_source(tuned: Path, target: AuditTarget) -> str:
    """Where searched settings come from, in words."""
    doc: dict[str, Any] = json.loads(Path(tuned).read_text())
    search = doc.get("search", {})
    published = " and its published settings" if search.get("published_trial") else ""
    return (
        f"a search on this victim (megex audit --search): {search.get('trials')} trials per "
        f"method{published} to {search.get('budget')} queries, scored on its "
        f"{target.validation_images} held-out validation images with tuning seed "
        f"{SEARCH_SEED} (not an attack seed)"
    )
