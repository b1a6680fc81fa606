"""The experiments' small digits setting, shared by the tests of the benchmark, the sweep,
the search, the trade-off and the detection benchmark: small attack settings, a config, and
untrained victims where the experiments cache theirs."""

from __future__ import annotations

import json
from pathlib import Path

from megex.models import build_classifier
from megex.victim import Victim

SMALL = {"batch_size": 16, "nz": 16, "ngf": 8, "clone_steps": 2}
# The digits experiments' shared attack settings.
SMALL_SETTINGS = {**SMALL, "lr_schedule": "constant", "clone_updates_per_1k_queries": 80.0}


def bench_config(tmp_path, **extra) -> str:
    doc = {
        "dataset": "digits",
        "validation_images": 200,
        "settings": SMALL_SETTINGS,
        "quick_budgets": [300, 600],
        "eval_at": [100, 200],
        "tuned_settings": None,
        **extra,
    }
    path = tmp_path / "digits.json"
    path.write_text(json.dumps(doc))
    return str(path)


def untrained_victims(out: Path, seeds: list[int], validation_images: int) -> None:
    """Untrained digits victims at an experiment's cache paths under `out` (training them is
    tested elsewhere)."""
    for seed in seeds:
        victim = Victim(
            build_classifier("small_cnn", 10, 1, 8), (1, 8, 8), 10, arch="small_cnn",
            dataset="digits",
        )  # fmt: skip
        victim.accuracy = 0.5
        name = f"digits-small_cnn-seed{seed}-val{validation_images}.safetensors"
        victim.save(out / "victims" / name)
