"""Named settings of the attacks, in one place.

A preset is a plain dict of setting names to values, applied with ``MEGEX(**preset)`` or
``dataclasses.replace(config, **preset)``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DFME_PAPER", "DEMO", "PRESETS"]

# DFME's settings as published (Truong et al. 2021), with every option of this loop off:
# no replay and no free clone updates, the clone trained only on its own 5 query batches
# per iteration, a slow generator, a decaying schedule and no prior on the queries.
DFME_PAPER: dict[str, Any] = {
    "batch_size": 256,
    "clone_steps": 5,
    "generator_lr": 1e-4,
    "lr_schedule": "multistep",
    "replay_size": 0,
    "clone_updates_per_1k_queries": 0.0,
    "train_on_generator_queries": False,
    "victim_confidence": 0.0,
    "query_gamma": (1.0, 1.0),
}

# `megex demo`: a small generator, so the demo's attacks take about a minute on 2 cores.
DEMO: dict[str, Any] = {"ngf": 8}

PRESETS: dict[str, dict[str, Any]] = {"dfme-paper": DFME_PAPER, "demo": DEMO}
