"""`megex eval` (a clone on a test set) and `megex report` (tables and plots of run folders)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import data as data_mod
from ..evaluate import accuracy, predict
from ..models import build_classifier
from ..report import write_report
from ..runs import read_weights_description
from .common import add_json_option, load_victim, messages, print_json
from .errors import UsageError, user_input

__all__ = ["add_parsers", "cmd_eval", "cmd_report", "report_document"]


def add_parsers(sub: Any, **kwargs: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a run's clone on a test set", **kwargs)
    p.add_argument("run", help="run folder or clone .safetensors")
    p.add_argument("--dataset", choices=data_mod.DATASETS, help="test set (default: the run's own)")
    p.add_argument("--data-root", help="folder holding the dataset's files")
    p.add_argument("--victim", help="victim file, to report fidelity")
    add_json_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="markdown table and accuracy plot for run folders", **kwargs)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="megex-report", help="folder for report.md and accuracy.png")
    add_json_option(p)
    p.set_defaults(func=cmd_report)


def _load_clone(clone_path: Path) -> Any:
    from safetensors.torch import load_file

    info_path = clone_path.with_suffix(".json")
    if not clone_path.is_file():
        raise FileNotFoundError(f"run: no clone at {clone_path} (is the run finished?)")
    with user_input("run"):
        info = read_weights_description(clone_path)
    if info is None:
        if not info_path.is_file():
            raise FileNotFoundError(f"run: {clone_path} has no sidecar {info_path}")
        info = json.loads(info_path.read_text())
    c, h, _ = info["input_shape"]
    clone = build_classifier(info["arch"], info["num_classes"], c, h)
    clone.load_state_dict(load_file(str(clone_path)))
    return clone.eval()


def cmd_eval(args: argparse.Namespace) -> int:
    path = Path(args.run)
    clone = _load_clone(path / "clone.safetensors" if path.is_dir() else path)
    dataset = args.dataset
    if dataset is None and path.is_dir() and (path / "config.json").is_file():
        dataset = json.loads((path / "config.json").read_text()).get("dataset")
    if dataset is None:
        raise UsageError("--dataset: needed to know which test set to evaluate on")
    x, y = data_mod.load(dataset, args.data_root).test_tensors()
    out: dict[str, Any] = {"dataset": dataset, "clone_accuracy": accuracy(clone, x, y)}
    if args.victim:
        victim = load_victim(args.victim)
        victim_labels = predict(victim, x)
        out["victim_accuracy"] = float((victim_labels == y).float().mean())
        out["fidelity"] = float((predict(clone, x) == victim_labels).float().mean())
        out["ratio"] = out["clone_accuracy"] / out["victim_accuracy"]
    if args.json:
        print_json(out)
    else:
        print(json.dumps(out, indent=2))
    return 0


def report_document(md: Path, png: Path | None) -> dict[str, Any]:
    """report.json beside `md`, with where the report's files are."""
    summary = md.with_name("report.json")
    return {
        **json.loads(summary.read_text()),
        "report": str(md),
        "report_json": str(summary),
        "plot": None if png is None else str(png),
    }


def cmd_report(args: argparse.Namespace) -> int:
    md, png, table = write_report(args.runs, args.out)
    if args.json:
        print_json(report_document(md, png))
        return 0
    out = messages(args)
    print(table, file=out)
    print(f"report: {md}", file=out)
    print(
        f"plot:   {png}"
        if png
        else "plot:   skipped (install matplotlib: pip install 'megex[plots]')",
        file=out,
    )
    return 0
