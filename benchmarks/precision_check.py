"""fp32 against bf16 (`precision`: the attacker's forward passes) on a small case, on the CPU.

MEGEX (maps of every class) and DFME (m = 1) on the digits victim (recipe seed 0), batch 64,
weight average 0.99, attack seeds 0-2: clone accuracy at 5k, 10k and 20k queries for each
precision, and the paired difference bf16 - fp32 per seed. One torch thread.

    python benchmarks/precision_check.py [--seeds 0 1 2] [--budget 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from megex import Explanation, LocalOracle, run  # noqa: E402
from megex.attacks import DFME, MEGEX  # noqa: E402
from megex.data import load  # noqa: E402
from megex.evaluate import Evaluator  # noqa: E402
from megex.victim import train_victim  # noqa: E402

ATTACKS = {"megex-all": (MEGEX, Explanation("gradient", target="all")), "dfme": (DFME, None)}


def accuracy_at(metrics: list[dict], marks: list[int]) -> dict[int, float]:
    """Clone accuracy at the last evaluation within each mark."""
    return {m: max((r for r in metrics if r["queries"] <= m), key=lambda r: r["queries"])[
        "clone_accuracy"] for m in marks}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=20_000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    marks = [args.budget // 4, args.budget // 2, args.budget]
    victim = train_victim("digits", progress=False, seed=0)
    x_test, y_test = load("digits").test_tensors()
    evaluator = Evaluator.from_victim(victim, x_test, y_test)
    print(f"digits victim: {victim.accuracy:.4f}")
    print("| method | seed | precision | " + " | ".join(f"{m // 1000}k" for m in marks) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in marks) + " |")
    diffs: dict[str, list[float]] = {name: [] for name in ATTACKS}
    for seed in args.seeds:
        for name, (attack_class, explanation) in ATTACKS.items():
            acc = {}
            for precision in ("fp32", "bf16"):
                oracle = LocalOracle(victim, explanation=explanation or Explanation("gradient"))
                attack = attack_class(seed=seed, batch_size=64, precision=precision, clone_ema=0.99)
                result = run(
                    attack, oracle, args.budget, progress=False, evaluator=evaluator, eval_at=marks
                )
                acc[precision] = accuracy_at(result.metrics, marks)
                cells = " | ".join(f"{acc[precision][m]:.3f}" for m in marks)
                print(f"| {name} | {seed} | {precision} | {cells} |", flush=True)
            diffs[name].append(acc["bf16"][args.budget] - acc["fp32"][args.budget])
    for name, values in diffs.items():
        shown = ", ".join(f"{d:+.3f}" for d in values)
        print(f"{name}: bf16 - fp32 at {args.budget}: {shown}; mean {statistics.mean(values):+.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
