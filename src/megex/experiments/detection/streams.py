"""The query streams the detection benchmark scores: an attack's (recorded as it runs
against the victim) and benign clients' (clean, noisy or augmented held-out images), and
each monitor's verdict on a stream."""

from __future__ import annotations

from typing import Any

from ...attacks import POOL_ATTACKS
from ...detection import QueryStream, RecordingOracle, extreme, first_crossing, replay
from ...engine import run
from ...oracle import LocalOracle
from ...pools import load_pool, victim_images
from ..methods import build_attack

__all__ = ["attack_stream", "benign_stream", "score_stream"]


def benign_stream(
    pool: Any, victim: Any, kind: str, length: int, seed: int, config: dict[str, Any]
) -> Any:
    """`length` distinct images of `pool` in random order, as `kind` makes them, with the
    victim's probabilities."""
    import torch

    if length > len(pool):
        raise ValueError(f"benign stream: {length} queries from a pool of {len(pool)} images")
    gen = torch.Generator().manual_seed(seed)
    x = pool[torch.randperm(len(pool), generator=gen)[:length]].clone()
    if kind == "noise":
        x = (x + float(config["noise_std"]) * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    elif kind == "augment":
        x = _augment(x, config["augment"], gen)
    elif kind != "clean":
        raise ValueError(f"benign kind: unknown {kind!r}")
    return QueryStream.from_victim(victim, x, name=f"{kind}-{seed}")


def _augment(x: Any, settings: dict[str, Any], gen: Any) -> Any:
    """Random shifts (up to `shift` pixels, circular), horizontal flips and brightness."""
    import torch

    n = len(x)
    shift = int(settings.get("shift", 0))
    if shift > 0:
        offsets = torch.randint(-shift, shift + 1, (n, 2), generator=gen)
        for dy, dx in {tuple(o) for o in offsets.tolist()}:
            rows = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().flatten()
            x[rows] = torch.roll(x[rows], shifts=(dy, dx), dims=(2, 3))
    if settings.get("flip"):
        flip = torch.rand(n, generator=gen) < 0.5
        x[flip] = x[flip].flip(3)
    low, high = settings.get("brightness", (1.0, 1.0))
    if (low, high) != (1.0, 1.0):
        factor = low + (high - low) * torch.rand(n, 1, 1, 1, generator=gen)
        x = (x * factor).clamp(0, 1)
    return x


def attack_stream(
    method: str,
    attack_name: str,
    settings: dict[str, Any],
    seed: int,
    victim: Any,
    queries: int,
    device: str,
    pool: str | None = None,
    data_root: str | None = None,
) -> Any:
    """The queries of one attack run against an in-process oracle, in order (an attack with
    images draws its `pool` with its seed)."""
    images = None
    if attack_name in POOL_ATTACKS:
        if not pool:
            raise ValueError(f"{method}: an attack with images needs the config's 'pool'")
        images = load_pool(pool, victim_images(victim), seed=seed, data_root=data_root)
    attack = build_attack(attack_name, settings, seed, device, images)
    explanation = getattr(attack.config, "explanation", None)
    oracle = LocalOracle(victim, budget=queries, explanation=explanation, seed=seed, device=device)
    recorder = RecordingOracle(oracle)
    if not run(attack, recorder, queries, progress=False).finished:
        raise KeyboardInterrupt  # a cut-off stream must not be scored
    return recorder.stream(name=f"{method}-{seed}")


def score_stream(
    stream: Any, monitors: dict, calibrations: dict, victim_seed: int
) -> dict[str, Any]:
    """Each monitor's most suspicious statistic on `stream` and the query it is flagged at
    (None: never) with the victim's calibrated threshold; and any monitor's first flag."""
    scored = {}
    for name, monitor in monitors.items():
        measured = replay(monitor.fresh(threshold=None), stream)
        threshold = calibrations[(name, victim_seed)].threshold
        hit = first_crossing(measured, threshold, monitor.flags_when)
        scored[name] = {
            "extreme": extreme(measured, monitor.flags_when),
            "detected_at": None if hit is None else hit.queries_seen,
        }
    hits = [r["detected_at"] for r in scored.values() if r["detected_at"] is not None]
    return {"monitors": scored, "any_detected_at": min(hits) if hits else None}
