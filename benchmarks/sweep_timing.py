"""Wall time of the quick benchmark: the local runner and a local Ray instance, side by side.

python benchmarks/sweep_timing.py                 # 1 and 2 workers each; a few minutes on 2 cores
python benchmarks/sweep_timing.py --workers 1 2 4 --out /tmp/timing

Every configuration runs the same command, `megex bench --config benchmarks/configs/digits.json
--quick` (8 runs: 4 methods x 2 seeds, 10k queries each), as a fresh process into a fresh
output folder, with one victim trained beforehand and copied in (its training is not timed).
The wall time is the whole command's: Python and torch start-up, the Ray instance's start and
stop, the runs, the tables. Per run: the overhead is the worker time that is not a run's own
attack loop, (wall x workers - sum of the runs' own seconds) / runs: process or Ray worker
start, imports, loading the data and victim, scheduling, and workers idle at the end.
The results of every configuration must be identical (same seeds, same code); checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from megex import bench  # noqa: E402

CONFIG = ROOT / "benchmarks" / "configs" / "digits.json"


def time_one(out: Path, victims: Path, runner: str, workers: int) -> dict:
    folder = out / f"{runner}-{workers}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(victims, folder / "victims")
    command = [
        sys.executable, "-m", "megex", "bench", "--config", str(CONFIG), "--quick",
        "--out", str(folder), "--jobs", str(workers), "--no-plot", "--no-progress",
    ] + (["--ray"] if runner == "ray" else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep)}  # fmt: skip
    t0 = time.time()
    with open(folder / "log.txt", "w") as log:
        subprocess.run(command, check=True, stderr=log, stdout=log, env=env)
    wall = time.time() - t0
    summary = json.loads((folder / "query_efficiency_quick.json").read_text())
    own = sum(summary["run_wall_s"].values())
    runs = len(summary["run_wall_s"])
    cells = {m: {b: s["mean"] for b, s in by.items()} for m, by in summary["stats"].items()}
    return {
        "runner": runner,
        "workers": workers,
        "runs": runs,
        "wall_s": round(wall, 1),
        "runs_own_s": round(own, 1),
        "overhead_per_run_s": round((wall * workers - own) / runs, 2),
        "accuracy": cells,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="working folder (default: a new temporary folder)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runners", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="megex-sweep-timing-")).resolve()
    config = bench.load_config(CONFIG)
    bench.get_victim(config, out / "victims", None, config["quick_victim_seeds"][0])
    rows = []
    for workers in args.workers:
        for runner in args.runners:
            rows.append(time_one(out, out / "victims", runner, workers))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "accuracy"}), flush=True)
    same = all(r["accuracy"] == rows[0]["accuracy"] for r in rows)
    (out / "sweep_timing.json").write_text(json.dumps({"rows": rows, "same_results": same}))
    base = {r["workers"]: r["wall_s"] for r in rows if r["runner"] == "local"}
    print("\n| runner | workers | runs | wall s | x local | runs' own s | overhead per run s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = r["wall_s"] / base[r["workers"]] if r["workers"] in base else float("nan")
        print(
            f"| {r['runner']} | {r['workers']} | {r['runs']} | {r['wall_s']:.1f} | "
            f"{ratio:.2f} | {r['runs_own_s']:.1f} | {r['overhead_per_run_s']:.2f} |"
        )
    print(f"\nSame results in every configuration: {'yes' if same else 'NO'} ({out})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
