"""`megex records`: keep finished runs as one records file per experiment folder
(megex.experiments.records), write them back as run folders, and rebuild every committed
table from them.

    megex records pack DIR [--out FILE]      every experiment folder under DIR
    megex records unpack FILE [--into DIR]   the run folders, byte for byte
    megex records check DIR                  records and run folders agree, or which differ
    megex records rebuild                    the tables, from the records, in a copy

A rebuild follows a manifest (default benchmarks/results/rebuild.json): the folders to copy,
then steps, each a megex command run from the copy's root and the outputs it writes, which
are compared with the committed ones. A step runs only if it would compute nothing: every
run it plans is finished in the records and every victim it reads is saved, or it is a
`--from-records` command (detection, gradient-alignment) reading its experiment's own
records file. A step may first gather run folders into the folder its command reads
("gather": [{"from", "to"}], in the copy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..experiments import gradient_alignment, query_efficiency, records, tradeoff
from ..experiments.detection import scores
from .bench import add_bench_arguments
from .errors import FAILURE, UsageError, user_input
from .studies import add_detection_arguments, add_tradeoff_arguments

__all__ = ["add_parsers", "planned", "read_manifest"]

MANIFEST = "benchmarks/results/rebuild.json"
# Verdicts of megex.experiments.records.compare_output that count as the same table.
SAME = ("identical", "wall time only", "same pixels")


def add_parsers(sub: Any, **kwargs: Any) -> None:
    """The `records` subcommand and its own subcommands."""
    p = sub.add_parser(
        "records",
        help="finished runs as one records file per experiment; tables rebuilt from them",
        description="Keep the finished runs of each experiment folder in one records file "
        f"(<experiment>/{records.RECORDS}: config, metrics and result of each run, no "
        "weights), write them back as run folders byte for byte, and rebuild every committed "
        "table from them.",
        **kwargs,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "pack",
        help=f"write each experiment folder's finished runs to its {records.RECORDS}",
        **kwargs,
    )
    a.add_argument("dir", metavar="DIR", help="an experiment folder, or a folder holding some")
    a.add_argument("--out", metavar="FILE", help="the file (DIR must hold one experiment folder)")
    a.set_defaults(func=cmd_pack)
    a = actions.add_parser("unpack", help="write a records file's run folders", **kwargs)
    a.add_argument("file", metavar="FILE", help=f"a records file ({records.RECORDS})")
    a.add_argument("--into", metavar="DIR", help="experiment folder (default: FILE's folder)")
    a.set_defaults(func=cmd_unpack)
    a = actions.add_parser(
        "check", help="whether the records files match the run folders", **kwargs
    )
    a.add_argument("dir", metavar="DIR", help="an experiment folder, or a folder holding some")
    a.set_defaults(func=cmd_check)
    a = actions.add_parser(
        "rebuild",
        help="rebuild the committed tables from the records, in a copy, and compare",
        description="Copy the manifest's folders (without run folders), unpack every records "
        "file there, run each step's megex command in the copy, and compare its outputs with "
        "the committed ones. A step that would run an attack or train a victim is refused.",
        **kwargs,
    )
    a.add_argument("--manifest", default=MANIFEST, help="the rebuild's steps (JSON)")
    a.add_argument("--root", default=".", help="the folder the manifest's paths start from")
    a.add_argument("--work", metavar="DIR", help="build the copy here and keep it (default: "
                   "a temporary folder, removed afterwards)")  # fmt: skip
    a.add_argument("--steps", nargs="+", metavar="NAME", help="only these steps")
    a.add_argument(
        "--write",
        action="store_true",
        help="copy the outputs of each step whose tables differ (beyond the wall time) over "
        "the committed ones",
    )
    a.set_defaults(func=cmd_rebuild)


def _experiments(folder: str, flag: str) -> list[Path]:
    with user_input(flag):
        found = records.experiment_folders(folder)
    return found


def cmd_pack(args: argparse.Namespace) -> int:
    found = [e for e in _experiments(args.dir, "DIR") if records.finished_runs(e)]
    if not found:
        raise UsageError(f"DIR: no finished run folder (<runs>/<run>/result.json) under {args.dir}")
    here = [e for e in found if e.resolve() == Path(args.dir).resolve()]
    if args.out and here:
        # DIR is an experiment folder itself: the ones nested in it keep their own files.
        found = here
    if args.out and len(found) > 1:
        raise UsageError(
            f"--out: {args.dir} holds {len(found)} experiment folders ({found[0]}, {found[1]}, "
            "...); --out names one file, so pass one of them as DIR"
        )
    for experiment in found:
        with user_input("DIR"):
            path, count = records.pack(experiment, args.out)
        print(f"{path}: {count} run(s)")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        raise FileNotFoundError(f"FILE: no file at {args.file}")
    with user_input("FILE"):
        written, present = records.unpack(args.file, args.into)
    print(f"{args.file}: {len(written)} run folder(s) written, {len(present)} already there")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    status = 0
    for experiment in _experiments(args.dir, "DIR"):
        with user_input("DIR"):
            problems = records.check(experiment)
        print(f"{experiment}: " + ("matches" if not problems else f"{len(problems)} difference(s)"))
        for line in problems:
            print(f"  {line}")
        status = FAILURE if problems else status
    return status


# --- rebuild ------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """A rebuild manifest: {"copy": [folders], "steps": [{"name", "command", "outputs",
    optionally "gather": [{"from", "to"}]}], "not_rebuilt": [{"outputs", "why"}],
    "retired": [{"outputs", "why"}]} (ValueError where it is not one)."""
    doc = json.loads(path.read_text())

    def strings(value: Any, where: str) -> list[str]:
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{path}: {where}: expected a list of strings, got {value!r}")
        return value

    strings(doc.get("copy"), "copy")
    if not isinstance(doc.get("steps"), list) or not doc["steps"]:
        raise ValueError(f"{path}: steps: expected a list of steps")
    names = [step.get("name") for step in doc["steps"] if isinstance(step, dict)]
    if len(names) != len(doc["steps"]) or len(set(names)) != len(names):
        raise ValueError(f"{path}: steps: each step is an object with a name of its own")
    for step in doc["steps"]:
        strings(step.get("command"), f"step {step['name']}: command")
        strings(step.get("outputs"), f"step {step['name']}: outputs")
        gather = step.get("gather", [])
        if not isinstance(gather, list) or not all(_folder_pair(g) for g in gather):
            raise ValueError(
                f"{path}: step {step['name']}: gather: expected a list of "
                '{"from": folder, "to": folder}'
            )
    return doc


def _folder_pair(pair: Any) -> bool:
    return (
        isinstance(pair, dict)
        and set(pair) == {"from", "to"}
        and all(isinstance(v, str) and v for v in pair.values())
    )


class _Refused(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # an error, not an exit of this process
        raise ValueError(f"{self.prog}: {message}")


def _parse(add_arguments: Any, name: str, options: list[str]) -> argparse.Namespace:
    args = add_arguments(_Refused(prog=f"megex {name}")).parse_args(options)
    if args.fresh:
        raise ValueError(f"megex {name}: --fresh would discard the records' runs")
    return args


def planned(command: list[str]) -> tuple[list[dict[str, Any]], list[Path]]:
    """The runs and victims that a step's megex command would use, planned as the
    experiment plans them (run in the folder the command runs in); ValueError for a command
    that is not known to compute nothing once those are there."""
    name, options = command[0], command[1:]
    if name == "bench":
        args = _parse(add_bench_arguments, name, options)
        config = query_efficiency.configured(args)
        seeds = query_efficiency.victim_seeds(config, args)
        experiment = query_efficiency
    elif name == "tradeoff":
        args = _parse(add_tradeoff_arguments, name, options)
        config = tradeoff.configured(args)
        seeds = config["victim_seeds"]
        experiment = tradeoff
    elif name == "input-size" and "--summary-only" in options:
        return [], []
    elif name in ("detection", "gradient-alignment") and "--from-records" in options:
        _check_from_records(name, options)
        return [], []
    else:
        raise ValueError(f"megex {' '.join(command)}: not known to compute nothing; not run")
    out = Path(args.out).resolve()
    victims = {s: records.victim_file(out / "victims", config, s) for s in seeds}
    return experiment.plan(config, args, out, victims), list(victims.values())


def _check_from_records(name: str, options: list[str]) -> None:
    """A --from-records step's records file is there (ValueError naming it where not)."""
    if name == "detection":
        args = add_detection_arguments(_Refused(prog=f"megex {name}")).parse_args(options)
        path = Path(args.out) / scores.SCORES
    else:
        # Its other options are refused by the command itself; only --out matters here.
        out = _Refused(prog=f"megex {name}", add_help=False)
        out.add_argument("--out", default="benchmarks/results/gradient_alignment")
        path = Path(out.parse_known_args(options)[0].out) / gradient_alignment.MEASUREMENTS
    if not path.is_file():
        raise ValueError(f"megex {name}: no records file {path}")


def _gather(step: dict[str, Any], work: Path) -> None:
    """Copy each "from" folder's contents into its "to" folder in `work`, a folder of the
    same name replacing the one there (so later pairs win)."""
    for pair in step.get("gather", []):
        source, target = work / pair["from"], work / pair["to"]
        if not source.is_dir():
            raise FileNotFoundError(f"step {step['name']}: gather: no folder {pair['from']}")
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(source.iterdir()):
            if (target / item.name).is_dir():
                shutil.rmtree(target / item.name)
            if item.is_dir():
                shutil.copytree(item, target / item.name)
            else:
                shutil.copy2(item, target / item.name)


def _run_step(step: dict[str, Any], work: Path) -> str | None:
    """Run one step in `work`; None, or why it was not run or failed."""
    try:
        _gather(step, work)
        with contextlib.chdir(work):
            jobs, victims = planned(step["command"])
    except (ValueError, OSError) as err:
        return f"not run: {err}"
    unready = records.unready_jobs(jobs, victims)
    if unready:
        return f"not run: it would compute {len(unready)} thing(s), e.g. {', '.join(unready[:3])}"
    env = dict(os.environ)
    # The package this command runs from, whether installed or not.
    source = str(Path(records.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "megex", *step["command"]]
    print(f"rebuild: {step['name']}: megex {' '.join(step['command'])}", file=sys.stderr)
    status = subprocess.run(command, cwd=work, env=env, check=False).returncode
    return f"failed: exit status {status}" if status else None


def _prepare(manifest: dict[str, Any], root: Path, work: Path) -> None:
    """The manifest's folders copied into `work` without their runs, then every records
    file among them unpacked there."""
    for folder in manifest["copy"]:
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"--root: no folder {folder} under {root}")
        records.copy_without_runs(root / folder, work / folder)
        for path in sorted((root / folder).rglob(records.RECORDS)):
            written, _ = records.unpack(path, work / path.parent.relative_to(root))
            print(f"rebuild: {path}: {len(written)} run(s) unpacked", file=sys.stderr)


def cmd_rebuild(args: argparse.Namespace) -> int:
    root = Path(args.root)
    with user_input("--manifest"):
        manifest = read_manifest(Path(args.manifest))
    steps = manifest["steps"]
    if args.steps:
        unknown = sorted(set(args.steps) - {s["name"] for s in steps})
        if unknown:
            raise UsageError(f"--steps: unknown {unknown}; expected {[s['name'] for s in steps]}")
        steps = [s for s in steps if s["name"] in args.steps]
    if args.work and Path(args.work).exists() and any(Path(args.work).iterdir()):
        raise UsageError(f"--work: {args.work} is not empty")
    work = Path(args.work or tempfile.mkdtemp(prefix="megex-rebuild-")).resolve()
    try:
        _prepare(manifest, root, work)
        verdicts = []
        for step in steps:
            for output in step["outputs"]:
                (work / output).unlink(missing_ok=True)
            why = _run_step(step, work)
            made = [
                (output, "not rebuilt", why)
                if why
                else (output, *records.compare_output(root / output, work / output))
                for output in step["outputs"]
            ]
            verdicts += made
            if args.write and any(v in ("differs", "not committed") for _, v, _ in made):
                _write_back(step["outputs"], work, root)
        _report(verdicts, manifest.get("not_rebuilt", []), manifest.get("retired", []))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(v in SAME for _, v, _ in verdicts) else FAILURE


def _write_back(outputs: list[str], work: Path, root: Path) -> None:
    # All of a step's outputs together, so that its JSON, markdown and plots stay one table.
    for output in outputs:
        if (work / output).is_file():
            tmp = root / (output + ".tmp")
            shutil.copyfile(work / output, tmp)
            os.replace(tmp, root / output)
            print(f"rebuild: wrote {root / output}", file=sys.stderr)


def _report(
    verdicts: list[tuple[str, str, str]],
    not_rebuilt: list[dict[str, Any]],
    retired: list[dict[str, Any]],
) -> None:
    for output, verdict, detail in verdicts:
        print(f"{output}: {verdict}" + (f" ({detail})" if detail else ""))
    for entry in not_rebuilt:
        print(f"not rebuilt ({entry.get('why', '')}): {', '.join(entry.get('outputs', []))}")
    for entry in retired:
        print(f"retired ({entry.get('why', '')}): {', '.join(entry.get('outputs', []))}")
