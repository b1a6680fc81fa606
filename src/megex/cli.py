"""The `megex` command: train-victim, attack, eval, report, demo (and serve, bench)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from .attacks import ATTACKS
from .defenses import build_defense
from .engine import run
from .evaluate import Evaluator, accuracy, predict
from .explain import METHODS, OUTPUTS, Explanation, parse_target
from .oracle import PREDICTION_MODES, BudgetExceeded, ExplanationNotOffered, InvalidQuery
from .runs import RunFolder, read_weights_description

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1 or value != float(text):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _target(text: str) -> str | int:
    try:
        return parse_target(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cache_dir() -> Path:
    base = os.environ.get("MEGEX_CACHE") or os.path.join(Path.home(), ".cache", "megex")
    return Path(base)


# --- train-victim -------------------------------------------------------------------------


def cmd_train_victim(args: argparse.Namespace) -> int:
    from .victim import train_victim

    victim = train_victim(
        args.dataset,
        args.arch,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        data_root=args.data_root,
        progress=not args.quiet,
    )
    path = victim.save(args.out)
    print(f"victim {victim.arch} on {args.dataset}: test accuracy {100 * victim.accuracy:.2f}%")
    print(f"saved to {path} (+ {path.with_suffix('.json').name})")
    return 0


# --- attack -------------------------------------------------------------------------------


def _explanation_from_args(args: argparse.Namespace) -> Explanation:
    params: dict[str, Any] = {}
    if args.explanation_method == "smoothgrad":
        params = {"sigma": args.smoothgrad_sigma, "samples": args.smoothgrad_samples}
    elif args.explanation_method == "integrated_gradients":
        params = {"steps": args.ig_steps}
    return Explanation(
        args.explanation_method,
        target=args.explanation_target,
        output=args.explanation_output,
        **params,
    )


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _load_victim(path: str):
    from .victim import Victim

    return Victim.load(path)


def _evaluator_for(dataset: str | None, data_root: str | None, victim=None) -> Evaluator | None:
    if dataset is None:
        return None
    ds = data_mod.load(dataset, data_root)
    x, y = ds.test_tensors()
    if victim is not None:
        return Evaluator.from_victim(victim, x, y)
    return Evaluator(x, y)


def _attack_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"seed": args.seed}
    for name in (
        "batch_size",
        "clone",
        "clone_lr",
        "generator_lr",
        "clone_steps",
        "generator_steps",
        "loss",
    ):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if args.method == "dfme" and args.directions is not None:
        settings["directions"] = args.directions
    settings.update(_parse_set_options(args.method, getattr(args, "set", None) or []))
    return settings


# Set through their own flags (or not settable at all from the command line).
_NOT_SETTABLE = {"seed", "device", "explanation"}


def _parse_set_options(method: str, items: list[str]) -> dict[str, Any]:
    """--set NAME=VALUE pairs: any field of the attack's config; values are JSON or text."""
    import dataclasses

    defaults = {
        f.name: f.default
        for f in dataclasses.fields(ATTACKS[method].config_class)
        if f.name not in _NOT_SETTABLE
    }
    fields = set(defaults)
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise UsageError(f"--set: expected NAME=VALUE, got {item!r}")
        if name not in fields:
            raise UsageError(
                f"--set: {method} has no setting {name!r}; settable: {', '.join(sorted(fields))}"
            )
        out[name] = _setting_value(name, text, defaults[name])
    return out


def _setting_value(name: str, text: str, default: Any) -> Any:
    """`text` as the type of the setting's default (JSON syntax for numbers and lists)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, kind = number, "a number"
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
        kind = "a JSON list of numbers, e.g. [0.5, 4.5]"
        value = tuple(value) if ok else value
    elif isinstance(default, str):
        ok, kind, value = True, "text", text
    else:  # None by default: a number or text
        ok, kind = True, "a value"
    if not ok:
        raise UsageError(f"--set {name}: expected {kind}, got {text!r}")
    return value


RUN_FILES = (
    "checkpoint.pt",
    "metrics.jsonl",
    "result.json",
    "config.json",
    "clone.safetensors",
    "clone.json",
)


def cmd_attack(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    folder = RunFolder(args.out)
    if folder.is_finished() and args.resume and not args.force:
        result = folder.read_result()
        print(
            f"{folder.path} is already finished ({result.get('queries_used')} queries); "
            "nothing to resume"
        )
        return 0
    if folder.is_finished() and not args.force:
        raise UsageError(
            f"--out: {folder.path} already holds a finished run; choose another folder or "
            "pass --force to overwrite it"
        )
    if folder.has_checkpoint() and not args.resume and not args.force:
        raise UsageError(
            f"--out: {folder.path} holds an unfinished run; pass --resume to continue it "
            "or --force to start over"
        )
    if args.force and folder.path.exists():
        for name in RUN_FILES:
            (folder.path / name).unlink(missing_ok=True)
    checkpoint = folder.load_checkpoint() if (args.resume and folder.has_checkpoint()) else None
    explanation = _explanation_from_args(args) if args.method == "megex" else None
    service_state = None
    victim = None
    if _is_url(args.victim):
        from .client import RemoteOracle

        oracle = RemoteOracle(args.victim, api_key=args.api_key)
        reference = _load_victim(args.reference_victim) if args.reference_victim else None
        evaluator = _evaluator_for(args.dataset, args.data_root, reference)
        budget = args.budget
    else:
        from .oracle import LocalOracle

        victim = _load_victim(args.victim)
        defenses = [build_defense(spec) for spec in args.defense]
        oracle = LocalOracle(
            victim,
            budget=args.budget,
            prediction=args.prediction,
            top_k=args.top_k,
            explanation=explanation or Explanation("gradient"),
            defenses=defenses,
            seed=args.seed,
        )
        if checkpoint is not None and "service" in checkpoint:
            oracle.load_state_dict(checkpoint["service"])
        service_state = oracle.state_dict
        dataset = args.dataset or victim.dataset
        evaluator = _evaluator_for(dataset, args.data_root, victim)
        budget = args.budget
    settings = _attack_settings(args)
    if explanation is not None:
        settings["explanation"] = explanation
    attack = ATTACKS[args.method](**settings)
    folder.create()
    folder.write_config(
        {
            "label": args.label or args.method,
            "victim": args.victim,
            "dataset": args.dataset or (victim.dataset if victim is not None else None),
            "victim_accuracy": evaluator.victim_accuracy if evaluator is not None else None,
        }
    )
    result = run(
        attack,
        oracle,
        budget,
        evaluator=evaluator,
        eval_every=args.eval_every,
        run_dir=folder.path,
        resume=args.resume,
        progress=not args.quiet,
        service_state=service_state,
    )
    if not result.finished:
        print(
            f"interrupted after {result.queries_used} queries; the last checkpoint is in "
            f"{folder.path}. Continue with the same command plus --resume."
        )
        return 130
    acc = "-" if result.clone_accuracy is None else f"{100 * result.clone_accuracy:.2f}%"
    print(
        f"{args.method}: {result.queries_used} queries, clone accuracy {acc}, "
        f"{result.elapsed_s:.1f} s; run folder {folder.path}"
    )
    return 0


# --- eval ---------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from .models import build_classifier

    path = Path(args.run)
    clone_path = path / "clone.safetensors" if path.is_dir() else path
    info_path = clone_path.with_suffix(".json")
    if not clone_path.is_file():
        raise UsageError(f"run: no clone at {clone_path} (is the run finished?)")
    info = read_weights_description(clone_path)
    if info is None:
        if not info_path.is_file():
            raise UsageError(f"run: {clone_path} has no sidecar {info_path}")
        info = json.loads(info_path.read_text())
    c, h, _ = info["input_shape"]
    clone = build_classifier(info["arch"], info["num_classes"], c, h)
    clone.load_state_dict(load_file(str(clone_path)))
    clone.eval()
    dataset = args.dataset
    if dataset is None and path.is_dir() and (path / "config.json").is_file():
        dataset = json.loads((path / "config.json").read_text()).get("dataset")
    if dataset is None:
        raise UsageError("--dataset: needed to know which test set to evaluate on")
    ds = data_mod.load(dataset, args.data_root)
    x, y = ds.test_tensors()
    out: dict[str, Any] = {"dataset": dataset, "clone_accuracy": accuracy(clone, x, y)}
    if args.victim:
        victim = _load_victim(args.victim)
        victim_labels = predict(victim, x)
        out["victim_accuracy"] = float((victim_labels == y).float().mean())
        out["fidelity"] = float((predict(clone, x) == victim_labels).float().mean())
        out["ratio"] = out["clone_accuracy"] / out["victim_accuracy"]
    print(json.dumps(out, indent=2))
    return 0


# --- report -------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    md, png, table = write_report(args.runs, args.out)
    print(table)
    print(f"report: {md}")
    print(
        f"plot:   {png}"
        if png
        else "plot:   skipped (install matplotlib: pip install 'megex[plots]')"
    )
    return 0


# --- demo ---------------------------------------------------------------------------------

# Budget per attack, and attack settings sized for 2 CPU cores: a narrow generator (ngf 8)
# costs 20x less than DFME's ngf 64 at 28x28 and measured no worse (benchmarks/RESULTS.md).
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"budget": 100_000, "attack": {"batch_size": 128}},
    "fashion-mnist": {"budget": 60_000, "attack": {"batch_size": 128, "ngf": 8}},
}


def cached_victim(dataset: str, data_root: str | None, seed: int, quiet: bool):
    """The demo's victim for `dataset`: loaded from the cache, or trained and cached."""
    from .victim import RECIPES, Victim, train_victim

    arch = RECIPES[dataset].arch
    path = cache_dir() / "victims" / f"{dataset}-{arch}-seed{seed}.safetensors"
    if path.is_file():
        print(f"victim: reusing {path}")
        return Victim.load(path)
    print(f"victim: training {arch} on {dataset} (cached afterwards in {path})")
    victim = train_victim(dataset, arch, seed=seed, data_root=data_root, progress=not quiet)
    victim.save(path)
    return victim


def cmd_demo(args: argparse.Namespace) -> int:
    from .oracle import LocalOracle
    from .report import write_report

    start = time.time()
    settings = DEMO_SETTINGS[args.dataset]
    budget = args.budget or settings["budget"]
    victim = cached_victim(args.dataset, args.data_root, 0, args.quiet)
    ds = data_mod.load(args.dataset, args.data_root)
    x, y = ds.test_tensors()
    evaluator = Evaluator.from_victim(victim, x, y)
    out = Path(args.out) / args.dataset
    methods = [
        ("megex", "megex", {"explanation": Explanation("gradient", target="all")}),
        ("megex-predicted", "megex", {"explanation": Explanation("gradient")}),
        ("dfme", "dfme", {}),
    ]
    print(
        f"victim {victim.arch}: test accuracy {100 * evaluator.victim_accuracy:.1f}%; "
        f"attacking with {budget:,} queries each, seed {args.seed}"
    )
    run_paths = []
    for label, method, extra in methods:
        folder = RunFolder(out / label).create()
        for name in RUN_FILES:
            (folder.path / name).unlink(missing_ok=True)
        folder.write_config(
            {"label": label, "dataset": args.dataset, "victim_accuracy": evaluator.victim_accuracy}
        )
        oracle = LocalOracle(victim, budget=budget, seed=args.seed)
        attack = ATTACKS[method](seed=args.seed, **settings["attack"], **extra)
        run(
            attack,
            oracle,
            evaluator=evaluator,
            run_dir=folder.path,
            progress=not args.quiet,
            service_state=oracle.state_dict,
        )
        run_paths.append(folder.path)
    md, png, table = write_report(run_paths, out, evaluator.victim_accuracy)
    print()
    print(table)
    print(f"report: {md}")
    print(f"plot:   {png}" if png else "plot:   skipped (matplotlib not installed)")
    print(f"runs:   {out}/<method>/ ({time.time() - start:.0f} s in all)")
    return 0


# --- the parser ---------------------------------------------------------------------------


def _add_attack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=sorted(ATTACKS), default="megex", help="attack")
    p.add_argument("--victim", required=True, help="victim .safetensors file, or a server URL")
    p.add_argument("--api-key", help="API key for a victim served over HTTP")
    p.add_argument("--budget", type=_positive_int, required=True, help="query budget")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a run in --out")
    p.add_argument("--label", help="name of the run in reports")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", choices=data_mod.DATASETS, help="test set for evaluation")
    p.add_argument("--data-root", help="folder holding the dataset's files")
    p.add_argument("--reference-victim", help="local copy of a remote victim, for fidelity")
    p.add_argument("--eval-every", type=_positive_int, help="queries between evaluations")
    p.add_argument("--explanation-method", choices=METHODS, default="gradient")
    p.add_argument("--explanation-target", type=_target, default="all")
    p.add_argument("--explanation-output", choices=OUTPUTS, default="probability")
    p.add_argument("--smoothgrad-sigma", type=float, default=0.1)
    p.add_argument("--smoothgrad-samples", type=_positive_int, default=3)
    p.add_argument("--ig-steps", type=_positive_int, default=16)
    p.add_argument("--directions", type=_positive_int, help="DFME: random directions m")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--clone", help="clone architecture (default: by image size)")
    p.add_argument("--clone-lr", type=_positive_float)
    p.add_argument("--generator-lr", type=_positive_float)
    p.add_argument("--clone-steps", type=_positive_int)
    p.add_argument("--generator-steps", type=int)
    p.add_argument("--loss", choices=("l1", "kl"))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other attack setting, e.g. replay_policy=ring or disagreement_until=150000 "
        "(repeatable; see megex.AttackConfig)",
    )
    p.add_argument("--prediction", choices=PREDICTION_MODES, default="probabilities",
                   help="what a local victim returns")  # fmt: skip
    p.add_argument("--top-k", type=_positive_int)
    p.add_argument("--defense", action="append", default=[],
                   help="local victim defence: round:2, noise:0.5, topk:0.1, sign")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megex",
        description="Measure how much a model gives away when it returns explanations: "
        "data-free model extraction with MEGEX and DFME.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-victim", help="train a victim and save it (safetensors + JSON)")
    p.add_argument("--dataset", choices=data_mod.DATASETS, required=True)
    p.add_argument("--arch", help="architecture (default: the dataset's recipe)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", help="folder holding the dataset's files")
    p.add_argument("--out", required=True, help="where to save (.safetensors)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_victim)

    p = sub.add_parser("attack", help="run MEGEX or DFME against a victim file or URL")
    _add_attack_options(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("eval", help="evaluate a run's clone on a test set")
    p.add_argument("run", help="run folder or clone .safetensors")
    p.add_argument("--dataset", choices=data_mod.DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--victim", help="victim file, to report fidelity")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="markdown table and accuracy plot for run folders")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="megex-report", help="folder for report.md and accuracy.png")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="train a small victim, run MEGEX and DFME, print a table")
    p.add_argument("--dataset", choices=sorted(DEMO_SETTINGS), default="digits")
    p.add_argument("--budget", type=_positive_int, help="queries per attack")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root")
    p.add_argument("--out", default="megex-demo", help="folder for runs, report and plot")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    try:
        from .serve_cli import add_serve_parser
    except ImportError:
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    try:
        from . import bench
    except ImportError:
        bench = None
    if bench is not None and hasattr(bench, "add_arguments"):
        p = sub.add_parser("bench", help="query-efficiency benchmark: MEGEX vs DFME")
        bench.add_arguments(p)
        p.set_defaults(func=lambda a: bench.run_benchmark(a) and 0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"megex {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _is_user_error(exc: Exception) -> bool:
    """Mistakes and refusals a user can act on: one line, no traceback."""
    known: tuple[type[BaseException], ...] = (
        UsageError,
        ValueError,
        FileNotFoundError,
        BudgetExceeded,
        InvalidQuery,
        ExplanationNotOffered,
        ImportError,
    )
    try:
        from .client import ServiceError

        known += (ServiceError,)
    except ImportError:  # the server extra is not installed
        pass
    return isinstance(exc, known)


if __name__ == "__main__":
    sys.exit(main())
