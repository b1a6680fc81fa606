"""Paper scale on one GPU: the attack loop's throughput, its FLOPs, and 2M-query runs.

Sections (`--sections`; rate and throughput by default, about 5 minutes on an H200 without
--compile modes, whose compilation takes minutes more per batch size):

- rate: the chip's measured bf16 (and fp32) matrix rate, from square matrix products;
- throughput: queries/s of MEGEX (maps of every class) and DFME (m=1) in the paper's
  setting (ResNet-34-8x victim on 3x32x32, ResNet-18-8x clone, DFME's generator and loop:
  the `dfme-paper` preset), as the plain loop runs them ("plain": fp32, answers through the
  host) and with the speed settings ("fast": bf16, on_device, answers kept on the device,
  each --compile mode), at batch 256 and larger; the model FLOPs per query, counted from the
  architectures by torch's FLOP counter over one iteration (the victim's answers and
  explanations, the generator's and the clone's training); the achieved fraction of the
  measured rate (bf16 for the fast rows, fp32 for the plain ones); the projected wall time
  of a 20M-query run; on CUDA, the host synchronisations in one iteration (sync debug mode);
- paper-run: a ResNet-34-8x victim trained on Fashion-MNIST (1x28x28), then MEGEX, the
  Jacobian-matching attacker and DFME with the fair comparison's settings (the tuning
  search's file) and the fastest speed settings found, `--queries` queries each: clone
  accuracy and its ratio to the victim. It needs every such method in the settings file and
the dataset's files (`--data-root`), and takes minutes per million queries.

    PYTHONPATH=src python3 benchmarks/gpu.py                       # rate and throughput
    PYTHONPATH=src python3 benchmarks/gpu.py --compile default     # and compiled passes
    PYTHONPATH=src python3 benchmarks/gpu.py --sections paper-run --data-root data/fashion-mnist
    python benchmarks/gpu.py --smoke                               # tiny, on the CPU (tests)

Figures go to the terminal and to `--out`/gpu.json (written after each section; paths are
relative to the checkout, wherever the script is run from).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package lives in src/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

from megex import Explanation, LocalOracle  # noqa: E402
from megex.attacks import DFME, MEGEX  # noqa: E402
from megex.attacks.presets import DFME_PAPER  # noqa: E402
from megex.engine import run  # noqa: E402
from megex.experiments.methods import build_attack  # noqa: E402
from megex.experiments.runner import prepare_torch  # noqa: E402
from megex.models import build_classifier  # noqa: E402
from megex.runs import write_json_atomic  # noqa: E402
from megex.victim import Victim  # noqa: E402

SECTIONS = ("rate", "throughput", "paper-run")
ROOT = Path(__file__).resolve().parents[1]
PAPER_RUN_METHODS = ("megex-all", "megex-jacobian", "dfme")
TARGET_QUERIES = 20_000_000


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matrix_rate(device: str, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of n x n matrix products in `dtype`, timed for about `seconds`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        sync(device)
        count += 10
    return 2 * n**3 * count / (time.perf_counter() - start)


def paper_victim(shape: tuple[int, int, int], arch: str, device: str) -> Victim:
    """A victim of the paper's architecture with random weights (throughput only)."""
    torch.manual_seed(0)
    model = build_classifier(arch, 10, shape[0], shape[1])
    victim = Victim(model, shape, 10, [0.5] * shape[0], [0.25] * shape[0], arch=arch)
    return victim.to(device).eval()


def paper_attack(method: str, mode: str, batch: int, device: str, clone: str, ngf: int):
    """The paper's loop (DFME's published settings) for `method` in `mode`."""
    settings: dict[str, Any] = {**DFME_PAPER, "batch_size": batch, "clone": clone, "ngf": ngf}
    if mode != "plain":
        compile_mode = mode.split(":", 1)[1] if ":" in mode else "off"
        settings.update(precision="bf16", on_device=True, compile=compile_mode)
    if method == "megex":
        return MEGEX(device=device, explanation=Explanation("gradient", target="all"), **settings)
    return DFME(device=device, **settings)


class CountFlops(TorchDispatchMode):
    """The matrix FLOPs (convolutions, matrix products, forward and backward) of everything
    run inside it, by torch's FLOP formulas. FlopCounterMode itself cannot be used: its
    module hooks refuse autograd.grad with respect to an input, which explanations are."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops_per_query(attack: Any, oracle: Any) -> float:
    """Model FLOPs of one iteration (victim and attacker) per query, from torch's counter."""
    before = oracle.queries_used
    with CountFlops() as counter:
        attack.step(oracle)
    return counter.total / max(1, oracle.queries_used - before)


def count_host_syncs(attack: Any, oracle: Any, device: str) -> int | None:
    """Host synchronisations in one iteration, as CUDA's sync debug mode reports them (None
    off CUDA). The fast path expects one per request: the oracle's check of the images."""
    if torch.device(device).type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            attack.step(oracle)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def time_iterations(attack: Any, oracle: Any, device: str, seconds: float, warmup: int):
    """(queries/s, iterations timed) of attack.step on the oracle, after `warmup` steps."""
    for _ in range(warmup):
        attack.step(oracle)
    sync(device)
    start, queries0, steps = time.perf_counter(), oracle.queries_used, 0
    while True:
        attack.step(oracle)
        attack.end_iteration()
        steps += 1
        if steps % 4 == 0:
            sync(device)
            if time.perf_counter() - start >= seconds:
                break
    sync(device)
    return (oracle.queries_used - queries0) / (time.perf_counter() - start), steps


def throughput(args: argparse.Namespace, rates: dict[str, float]) -> list[dict[str, Any]]:
    shape = tuple(args.shape)
    victim = paper_victim(shape, args.victim_arch, args.device)
    rows = []
    modes = ["plain", "fast"] + [f"fast:{m}" for m in args.compile]
    for method in ("megex", "dfme"):
        for mode in modes:
            for batch in args.batches if mode != "plain" else args.batches[:1]:
                attack = paper_attack(method, mode, batch, args.device, args.clone_arch, args.ngf)
                oracle = LocalOracle(
                    victim,
                    explanation=Explanation("gradient", target="all"),
                    device=args.device,
                    # Chunks of 1,024: maps of every class in one batched backward hold K
                    # times a backward's memory.
                    batch_size=1024,
                    answer_on_device=mode != "plain",
                )
                try:
                    attack.setup(oracle, 10**6)
                    flops = None
                    if mode == "plain":
                        flops = count_flops_per_query(attack, oracle)
                    qps, steps = time_iterations(
                        attack, oracle, args.device, args.seconds, args.warmup
                    )
                    syncs = count_host_syncs(attack, oracle, args.device)
                except torch.OutOfMemoryError:
                    print(f"{method} {mode} batch {batch}: out of memory", flush=True)
                    qps = None
                if qps is None:
                    del attack, oracle
                    free_memory(args.device)
                    continue
                row = {
                    "method": method,
                    "mode": mode,
                    "batch": batch,
                    "queries_per_s": round(qps, 1),
                    "iterations_timed": steps,
                    "minutes_for_20M": round(TARGET_QUERIES / qps / 60, 2),
                }
                if flops is not None:
                    row["flops_per_query"] = flops
                if syncs is not None:
                    row["host_syncs_per_iteration"] = syncs
                    c = attack.config
                    row["requests_per_iteration"] = c.generator_steps + c.clone_steps
                rows.append(row)
                print(json.dumps(row), flush=True)
                del attack, oracle
                free_memory(args.device)
    # FLOPs per query depend on the method and batch, not on how fast they are computed.
    per_query = {
        (r["method"], r["batch"]): r["flops_per_query"] for r in rows if "flops_per_query" in r
    }
    for row in rows:
        flops = per_query.get((row["method"], args.batches[0]))
        kind = "fp32" if row["mode"] == "plain" else "bf16"
        if flops is not None and rates.get(kind):
            achieved = flops * row["queries_per_s"] / rates[kind]
            row[f"fraction_of_{kind}_rate"] = round(achieved, 4)
    return rows


def free_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def paper_run_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(benchmark config, tuned settings, dataset) for the paper run; raises if the settings
    file lacks a method or the dataset's files are missing."""
    from megex.data import load
    from megex.experiments.methods import check_methods, load_tuned, require_tuned
    from megex.experiments.query_efficiency import DEFAULTS

    check_methods(args.paper_methods)
    settings_file = None if args.settings_file == "none" else args.settings_file
    config = {**DEFAULTS, "tuned_settings": settings_file}
    tuned = load_tuned(config)
    for method in args.paper_methods:
        require_tuned(config, method, tuned)
    return config, tuned, load(args.dataset, args.data_root)


def paper_run(
    args: argparse.Namespace, rows: list[dict[str, Any]], config: Any, tuned: Any, ds: Any
) -> list[dict[str, Any]]:
    """A trained ResNet-34-8x victim on Fashion-MNIST; each method at `--queries`, with the
    fair comparison's settings (the benchmark's shared ones and the search's per method) at
    paper scale (ResNet-18-8x clone, the generator at DFME's width 64) and the speed
    settings of the fastest throughput row."""
    from megex.evaluate import Evaluator
    from megex.experiments.methods import method_settings
    from megex.victim import train_victim

    start = time.time()
    victim = train_victim(
        ds, args.victim_arch, epochs=args.victim_epochs, device=args.device, progress=False
    )
    print(f"victim {args.victim_arch}: {victim.accuracy:.4f} ({time.time() - start:.0f} s)")
    x_test, y_test = ds.test_tensors()
    evaluator = Evaluator.from_victim(victim, x_test, y_test)
    fast = _fastest_mode(rows)
    out = []
    for method in args.paper_methods:
        attack_name, settings = method_settings(config, method, tuned)
        settings.update(
            clone=args.clone_arch, ngf=args.ngf, precision="bf16", on_device=True, compile=fast
        )
        attack = build_attack(attack_name, settings, 0, args.device)
        oracle = LocalOracle(
            victim,
            explanation=getattr(attack.config, "explanation", None),
            device=args.device,
            batch_size=4096,
            answer_on_device=True,
        )
        t0 = time.time()
        result = run(attack, oracle, args.queries, evaluator=evaluator, progress=False)
        row = {
            "method": method,
            "queries": result.queries_used,
            "clone_accuracy": result.clone_accuracy,
            "victim_accuracy": victim.accuracy,
            "ratio": round(result.clone_accuracy / victim.accuracy, 4),
            "wall_s": round(time.time() - t0, 1),
            "compile": fast,
            "curve": [(m["queries"], m["clone_accuracy"]) for m in result.metrics],
        }
        out.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    return out


def _fastest_mode(rows: list[dict[str, Any]]) -> str:
    fast = [r for r in rows if r["mode"].startswith("fast")]
    if not fast:
        return "off"
    best = max(fast, key=lambda r: r["queries_per_s"])["mode"]
    return best.split(":", 1)[1] if ":" in best else "off"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=["rate", "throughput"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument(
        "--compile",
        nargs="*",
        default=[],
        help="torch.compile modes to measure besides eager (default, reduce-overhead, "
        "max-autotune; none given: eager only)",
    )
    p.add_argument("--seconds", type=float, default=8.0, help="timing per configuration")
    p.add_argument("--warmup", type=int, default=3, help="iterations before timing")
    p.add_argument("--queries", type=int, default=2_000_000, help="queries per paper-run attack")
    p.add_argument("--paper-methods", nargs="+", default=list(PAPER_RUN_METHODS))
    p.add_argument("--victim-epochs", type=int, default=8)
    p.add_argument(
        "--settings-file",
        default=str(ROOT / "benchmarks/results/tuning/tuned.json"),
        help="the tuning search's settings for the paper run ('none': untuned defaults)",
    )
    p.add_argument("--dataset", default="fashion-mnist", help="the paper run's dataset")
    p.add_argument("--data-root", help="folder with the dataset's files")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu"))
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU: checks that every section runs"
    )
    args = p.parse_args(argv)
    args.shape, args.victim_arch, args.clone_arch, args.ngf = (
        (3, 32, 32),
        "resnet34_8x",
        "resnet18_8x",
        64,
    )
    matrix_n = 8192
    if args.smoke:
        args.device, args.batches, args.compile = "cpu", [8, 16], []
        args.seconds, args.warmup, args.queries, args.victim_epochs = 0.2, 1, 600, 1
        args.shape, args.victim_arch, args.clone_arch, args.ngf = (
            (1, 8, 8),
            "small_cnn",
            "small_cnn",
            8,
        )
        args.dataset, args.settings_file = "digits", "none"
        args.sections = list(SECTIONS)
        matrix_n = 128
    prepare_torch(torch.get_num_threads(), args.device)
    # The paper run's inputs are checked before anything runs (settings, dataset files).
    try:
        inputs = paper_run_inputs(args) if "paper-run" in args.sections else None
    except (ValueError, FileNotFoundError) as err:
        p.error(f"paper-run: {err}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    rates: dict[str, float] = {}
    if "rate" in args.sections:
        seconds = 0.2 if args.smoke else 3.0
        for kind, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            rates[kind] = matrix_rate(args.device, dtype, matrix_n, seconds)
        report["matrix_rate_tflops"] = {k: v / 1e12 for k, v in rates.items()}
        print(
            f"matrix rate: bf16 {rates['bf16'] / 1e12:.1f} TFLOP/s, fp32 {rates['fp32'] / 1e12:.1f}"
        )
        write_json_atomic(out / "gpu.json", report)
    rows: list[dict[str, Any]] = []
    if "throughput" in args.sections:
        rows = throughput(args, rates)
        report["throughput"] = rows
        megex_rows = [r for r in rows if r["method"] == "megex"]
        if megex_rows:
            best = max(megex_rows, key=lambda r: r["queries_per_s"])
            print(
                f"fastest MEGEX: {best['mode']} batch {best['batch']}, "
                f"{best['queries_per_s']:.0f} queries/s, 20M in {best['minutes_for_20M']} min"
            )
        write_json_atomic(out / "gpu.json", report)
    if inputs is not None:
        report["paper_run"] = paper_run(args, rows, *inputs)
        write_json_atomic(out / "gpu.json", report)
    print(f"figures in {out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
