"""The query-efficiency benchmark's small digits config, shared by the benchmark's, the
sweep's and the search's tests."""

from __future__ import annotations

import json

SMALL = {"batch_size": 16, "nz": 16, "ngf": 8, "clone_steps": 2}


def bench_config(tmp_path, **extra) -> str:
    doc = {
        "dataset": "digits",
        "validation_images": 200,
        "settings": {**SMALL, "lr_schedule": "constant", "clone_updates_per_1k_queries": 80.0},
        "quick_budgets": [300, 600],
        "eval_at": [100, 200],
        "tuned_settings": None,
        **extra,
    }
    path = tmp_path / "digits.json"
    path.write_text(json.dumps(doc))
    return str(path)
