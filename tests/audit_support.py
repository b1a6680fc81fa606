"""A realistic audit summary, written by hand after the report.json schema, for the report's
tests (markdown, HTML, files, and the browser check)."""

from __future__ import annotations

import copy
import math
from typing import Any

NAN = math.nan


def _i(estimate: float, low: float, high: float) -> dict[str, float]:
    return {"estimate": estimate, "low": low, "high": high}


_DATA_FREE = {
    "key": "data-free",
    "title": "Data-free attacker (no images of the domain)",
    "pool": None,
    "baseline": "dfme",
    "attacker": "megex-predicted",
    "budgets": [5000, 10000, 20000],
    "seeds": [0, 1, 2],
    "accuracy": [
        {
            "budget": 5000,
            "baseline": _i(0.412, 0.371, 0.453),
            "attacker": _i(0.633, 0.601, 0.665),
            "difference": _i(0.221, 0.180, 0.262),
        },
        {
            "budget": 10000,
            "baseline": _i(0.705, 0.690, 0.720),
            "attacker": _i(0.753, 0.740, 0.766),
            "difference": _i(0.048, 0.040, 0.057),
        },
        {
            # One seed only finished: no interval (NaN ends) and no paired difference.
            "budget": 20000,
            "baseline": _i(0.861, NAN, NAN),
            "attacker": _i(0.902, 0.880, 0.924),
            "difference": None,
        },
    ],
    "leakage": [
        {
            "target": 0.5,
            "baseline_reached": 3,
            "attacker_reached": 3,
            "runs": 3,
            "baseline_median_queries": 7500,
            "attacker_median_queries": 3750,
            "factor": _i(2.0, 1.5, 2.6),
            "bound": "exact",
        },
        {
            "target": 0.8,
            "baseline_reached": 2,
            "attacker_reached": 3,
            "runs": 3,
            "baseline_median_queries": 20000,
            "attacker_median_queries": 8000,
            "factor": _i(2.5, 1.9, 3.1),
            "bound": "at_least",
        },
        {
            "target": 0.95,
            "baseline_reached": 0,
            "attacker_reached": 0,
            "runs": 3,
            "baseline_median_queries": None,
            "attacker_median_queries": None,
            "factor": None,
            "bound": None,
        },
    ],
    "curves": {
        "dfme": [[500, 0.12, 0.10, 0.14], [5000, 0.412, 0.371, 0.453], [20000, 0.861, NAN, NAN]],
        "megex-predicted": [
            [500, 0.25, 0.21, 0.29],
            [5000, 0.633, 0.601, 0.665],
            [20000, 0.902, 0.880, 0.924],
        ],
    },
    "verdict": "With maps the clone reaches 0.8x of the victim with at least 2.5x fewer queries.",
    "settings": {"dfme": {"lr": 0.1, "batch": 250}, "megex-predicted": {"lr": 0.05}},
    "settings_source": "shipped settings searched on Fashion-MNIST LeNet-5 victims",
}

_WITH_IMAGES = {
    "key": "with-images",
    "title": "Attacker with 300 unlabelled images of the domain",
    "pool": {"spec": "digits:seen:300", "size": 300, "description": "training images"},
    "baseline": "knockoff",
    "attacker": "megex-pool",
    "budgets": [1000, 2000],
    "seeds": [0, 1, 2],
    "accuracy": [
        {
            "budget": 1000,
            "baseline": _i(0.801, 0.78, 0.82),
            "attacker": _i(0.852, 0.83, 0.87),
            "difference": _i(0.051, 0.03, 0.07),
        },
        {
            "budget": 2000,
            "baseline": _i(0.880, 0.87, 0.89),
            "attacker": _i(0.871, 0.86, 0.88),
            "difference": _i(-0.009, -0.02, 0.003),
        },
    ],
    "leakage": [
        {
            "target": 0.8,
            "baseline_reached": 3,
            "attacker_reached": 3,
            "runs": 3,
            "baseline_median_queries": 1000,
            "attacker_median_queries": 1000,
            "factor": _i(1.0, 0.8, 1.3),
            "bound": "exact",
        }
    ],
    "curves": {
        "knockoff": [[0, 0.1, 0.1, 0.1], [1000, 0.801, 0.78, 0.82], [2000, 0.88, 0.87, 0.89]],
        "megex-pool": [[1000, 0.852, 0.83, 0.87], [2000, 0.871, 0.86, 0.88]],
    },
    "verdict": "With images of the domain the maps give no lead the intervals can see.",
    "settings": {"knockoff": {}, "megex-pool": {"lr": 0.01}},
    "settings_source": "shipped settings",
}

_SUMMARY: dict[str, Any] = {
    "title": "megex audit",
    "created": "2026-12-07T01:23:45Z",
    "megex_version": "0.9.0",
    "out": "/tmp/audit",
    "wall_s": 312.0,
    "victim": {
        "source": "victims/digits.safetensors",
        "kind": "file",
        "dataset": "digits",
        "input_shape": [1, 8, 8],
        "classes": 10,
        "accuracy": 0.97,
        "accuracy_source": "the victim's sidecar",
    },
    "explanations": {
        "returned": True,
        "method": "gradient",
        "targets": ["all", "predicted"],
        "note": "signed gradients of the probability",
    },
    "plan": {
        "seeds": [0, 1, 2],
        "time_limit_s": 1800.0,
        "estimated_s": 240.0,
        "calibration": {
            "dfme": {"seconds_per_query": 0.0008, "queries": 2000},
            "megex-predicted": {"seconds_per_query": 0.0012, "queries": 2000},
        },
        "reductions": ["budget 40k dropped to fit the time limit"],
        "commands": ["megex audit --victim victims/digits.safetensors --out audit"],
    },
    "threat_models": [_DATA_FREE, _WITH_IMAGES],
    "defenses": [
        {
            "budget": 10000,
            "threat_model": "data-free",
            "title": "Data-free attacker (no images of the domain)",
            "rows": [
                {
                    "spec": "quantize:bits=2",
                    "kind": "explanation",
                    "served_accuracy": 0.97,
                    "accuracy_change": 0.0,
                    "map_cosine": 0.57,
                    "attackers": {
                        "dfme": {"accuracy": _i(0.70, 0.68, 0.72), "taken": _i(0.005, -0.01, 0.02)},
                        "megex-predicted": {
                            "accuracy": _i(0.712, 0.70, 0.724),
                            "taken": _i(0.041, 0.03, 0.052),
                        },
                    },
                    "lead": _i(0.012, -0.004, 0.028),
                    "verdict": "takes most of the maps' lead at no cost to honest users",
                },
                {
                    "spec": "top1",
                    "kind": "prediction",
                    "served_accuracy": 0.962,
                    "accuracy_change": -0.008,
                    "map_cosine": None,
                    "attackers": {
                        "dfme": {"accuracy": _i(0.55, 0.52, 0.58), "taken": _i(0.155, 0.13, 0.18)},
                        "megex-predicted": {"accuracy": _i(0.74, 0.72, 0.76), "taken": None},
                    },
                    "lead": _i(0.19, 0.16, 0.22),
                    "verdict": "hurts the predictions-only attacker more than the map attacker",
                },
            ],
        },
    ],
    "monitors": {
        "rows": [
            {
                "monitor": "prada",
                "threat_model": "data-free",
                "method": "megex-predicted",
                "flagged_runs": 2,
                "runs": 3,
                "median_first_flag_queries": 1200,
            },
            {
                "monitor": "ood",
                "threat_model": "data-free",
                "method": "dfme",
                "flagged_runs": 0,
                "runs": 3,
                "median_first_flag_queries": None,
            },
        ],
        "note": "monitors watched the stream; nothing was refused",
    },
    "skipped": [{"part": "smoothgrad maps", "why": "the service returns gradient maps only"}],
    "caveats": ["3 attack seeds on one victim: the intervals are over seeds, not victims"],
}


def example_summary() -> dict[str, Any]:
    """A fresh copy (tests may change it)."""
    return copy.deepcopy(_SUMMARY)
