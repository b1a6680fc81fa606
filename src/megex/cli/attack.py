"""`megex attack`: an attack (data-free, or with the attacker's images) against a victim
file or a service URL, into a run folder."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

import torch

from .. import data as data_mod
from ..accel import exact_fp32
from ..attacks import ATTACKS, POOL_ATTACKS
from ..defenses import build_defense
from ..engine import changed_settings, describe_run, step_cost
from ..explain import METHODS, Explanation
from ..oracle import PREDICTION_MODES, LocalOracle
from ..pools import VictimImages, load_pool, parse_pool, victim_images
from ..runs import RunFolder
from .common import (
    add_explanation_options,
    add_json_option,
    clear_run_folder,
    evaluator_for,
    is_url,
    load_victim,
    messages,
    positive_float,
    positive_int,
    print_json,
    run_attack,
)
from .defenses import DEFENSE_HELP
from .errors import INTERRUPTED, UsageError, user_input
from .settings import parse_set_options, setting_help

__all__ = ["add_parser", "add_service_options", "cmd_attack", "check_service_options"]

# The protocols a served victim may speak, and V2's tensor encodings (megex.client's
# PROTOCOLS and ENCODINGS; repeated here so that the CLI parses without the 'server' extra).
PROTOCOLS = ("auto", "v2", "v1")
ENCODINGS = ("auto", "json", "binary")


def add_parser(sub: Any, **kwargs: Any) -> None:
    p = sub.add_parser(
        "attack",
        help="run an attack (MEGEX, DFME, knockoff, JBDA, ...) against a victim file or URL",
        **kwargs,
    )
    p.add_argument("--method", choices=sorted(ATTACKS), default="megex", help="attack")
    p.add_argument("--victim", required=True, help="victim .safetensors file, or a server URL")
    p.add_argument("--api-key", help="API key for a victim served over HTTP")
    add_service_options(p.add_argument_group("a victim served over HTTP"))
    p.add_argument("--budget", type=positive_int, required=True, help="query budget")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a run in --out")
    p.add_argument("--label", help="name of the run in reports (default: --method)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attack and local service")
    p.add_argument(
        "--dataset",
        choices=data_mod.DATASETS,
        help="test set for evaluation (default: a local victim's own)",
    )
    p.add_argument("--data-root", help="folder holding the dataset's files")
    p.add_argument("--reference-victim", help="local copy of a remote victim, for fidelity")
    p.add_argument(
        "--pool",
        metavar="SPEC",
        help="the attacker's own images, for the attacks with images (knockoff, jbda and "
        "their -maps variants): DATASET:unseen:N (held out of the victim's training for "
        "attackers), DATASET:seen:N (images it trained on), DATASET:train:N (another "
        "dataset, resized), or folder:PATH[:N] (PNG/JPEG files of the victim's size)",
    )
    p.add_argument(
        "--pool-seed", type=int, help="seed of the pool's draw of N images (default: --seed)"
    )
    p.add_argument(
        "--eval-every",
        type=positive_int,
        help="queries between evaluations (default: a tenth of the budget)",
    )
    _add_explanation_options(p.add_argument_group("the explanation MEGEX asks for"))
    _add_attack_settings(p.add_argument_group("attack settings"))
    _add_local_victim_options(p.add_argument_group("what a local victim returns"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_option(p)
    p.set_defaults(func=cmd_attack)


def add_service_options(group: Any) -> None:
    """--protocol and --encoding: how a victim URL is spoken to (attack and audit)."""
    group.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="auto",
        help="the service's protocol: v2 (Open Inference Protocol: GET /v2/models/NAME, "
        "POST .../infer), v1 (KServe V1: POST /v1/models/NAME:predict and :explain; the "
        "images' shape and classes come from --dataset), or auto: a .../v1/models/NAME URL "
        "is V1, a .../v2/models/NAME URL V2, and a server root is asked (V2 metadata, else "
        "V1 readiness; no query is spent)",
    )
    group.add_argument(
        "--encoding",
        choices=ENCODINGS,
        default="auto",
        help="V2's tensors: json, binary (the binary tensor data extension; KServe accepts "
        "it without listing it), or auto: binary for batches over 16 images where the server "
        "lists the extension; V1 sends JSON",
    )


def check_service_options(args: argparse.Namespace) -> None:
    """--protocol and --encoding concern a URL; with a victim file, refuse them."""
    if is_url(args.victim):
        return
    for flag, value in (("--protocol", args.protocol), ("--encoding", args.encoding)):
        if value != "auto":
            raise UsageError(
                f"{flag}: a victim file is answered in this process; {flag} is for a victim URL"
            )


def _add_explanation_options(ex: Any) -> None:
    add_explanation_options(ex, METHODS, "all", "explanation method")
    ex.add_argument("--smoothgrad-sigma", type=float, default=0.1, help="SmoothGrad: noise level")
    ex.add_argument(
        "--smoothgrad-samples",
        type=positive_int,
        default=3,
        help="SmoothGrad: noisy samples per image",
    )
    ex.add_argument("--ig-steps", type=positive_int, default=16, help="integrated gradients: steps")


def _add_attack_settings(st: Any) -> None:
    st.add_argument(
        "--directions",
        type=positive_int,
        help=f"DFME: random directions m (default: {_default('directions')})",
    )
    for flag, kind in (
        ("--batch-size", positive_int),
        ("--clone", None),
        ("--clone-lr", positive_float),
        ("--generator-lr", positive_float),
        ("--clone-steps", positive_int),
        ("--generator-steps", int),
    ):
        name = flag[2:].replace("-", "_")
        text = setting_help("megex", name)
        st.add_argument(flag, type=kind, help=f"{text} (default: {_default(name)})")
    st.add_argument(
        "--loss",
        choices=("l1", "kl"),
        help=f"{setting_help('megex', 'loss')} (default: {_default('loss')})",
    )
    st.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other attack setting, e.g. replay_policy=ring or disagreement_until=150000 "
        "(repeatable; `megex settings` lists them with their defaults, rules and help)",
    )


def _add_local_victim_options(lv: Any) -> None:
    lv.add_argument(
        "--prediction", choices=PREDICTION_MODES, default="probabilities", help="predictions shown"
    )
    lv.add_argument("--top-k", type=positive_int, help="classes shown with --prediction top-k")
    lv.add_argument(
        "--defense",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"{DEFENSE_HELP} (repeatable: applied in order; `megex defenses` lists them)",
    )


def _default(name: str) -> str:
    """The default of an attack setting, per attack where they differ."""
    configs = {method: cls.config_class() for method, cls in sorted(ATTACKS.items())}
    values = {m: getattr(c, name) for m, c in configs.items() if hasattr(c, name)}
    if len(set(map(str, values.values()))) > 1:
        return ", ".join(f"{m} {v}" for m, v in values.items())
    value = next(iter(values.values()))
    return "by image size" if value is None else str(value)


def explanation_from_args(args: argparse.Namespace) -> Explanation:
    params: dict[str, Any] = {}
    if args.explanation_method == "smoothgrad":
        params = {"sigma": args.smoothgrad_sigma, "samples": args.smoothgrad_samples}
    elif args.explanation_method == "integrated_gradients":
        params = {"steps": args.ig_steps}
    with user_input("--explanation-*"):
        return Explanation(
            args.explanation_method,
            target=args.explanation_target,
            output=args.explanation_output,
            **params,
        )


def attack_settings(args: argparse.Namespace) -> dict[str, Any]:
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
            if name not in _setting_names(args.method):
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag}: {args.method} has no setting {name!r}")
            settings[name] = value
    if args.directions is not None:
        if "directions" not in _setting_names(args.method):
            with_it = sorted(m for m in ATTACKS if "directions" in _setting_names(m))
            raise UsageError(
                f"--directions: {args.method} takes no random directions; "
                f"only {', '.join(with_it)} do"
            )
        settings["directions"] = args.directions
    settings.update(parse_set_options(args.method, getattr(args, "set", None) or []))
    return settings


def _prepare_out_folder(args: argparse.Namespace, folder: RunFolder) -> bool:
    """Check --out against --resume and --force, and clear it for --force.

    Returns True when --out holds a finished run to keep (--resume of a finished run).
    """
    if folder.is_finished() and args.resume and not args.force:
        return True
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
    if args.force:
        clear_run_folder(folder)
    return False


def _oracle(
    args: argparse.Namespace,
    explanation: Explanation | None,
    checkpoint: Any,
    settings: dict[str, Any] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """(oracle, local victim or None, evaluator or None, service state or None). A local
    victim runs on the attack's device, and answers there for an attack with on_device."""
    if is_url(args.victim):
        reference = load_victim(args.reference_victim) if args.reference_victim else None
        oracle = _remote_oracle(args, reference)
        return oracle, None, evaluator_for(args.dataset, args.data_root, reference), None
    settings = settings or {}
    victim = load_victim(args.victim)
    exact_fp32(settings.get("device", "cpu"))
    with user_input("--defense"):
        defenses = [build_defense(spec) for spec in args.defense]
    with user_input():
        oracle = LocalOracle(
            victim,
            budget=args.budget,
            prediction=args.prediction,
            top_k=args.top_k,
            explanation=explanation or Explanation("gradient"),
            defenses=defenses,
            seed=args.seed,
            device=settings.get("device", "cpu"),
            answer_on_device=bool(settings.get("on_device")) and not defenses,
        )
    if checkpoint is not None and "service" in checkpoint:
        oracle.load_state_dict(checkpoint["service"])
    evaluator = evaluator_for(args.dataset or victim.dataset, args.data_root, victim)
    return oracle, victim, evaluator, oracle.state_dict


def _remote_oracle(args: argparse.Namespace, reference: Any) -> Any:
    """The client of the victim URL, over --protocol (asked of the server with auto)."""
    try:
        from ..client import connect, detect_protocol  # the 'server' extra: httpx
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"a victim URL needs the 'server' extra (pip install 'megex[server]'): {err}",
            name=err.name,
        ) from None
    with user_input("--victim"):
        protocol = args.protocol
        if protocol == "auto":
            protocol = detect_protocol(args.victim, args.api_key)
    shape = classes = None
    if protocol == "v1":
        if args.encoding == "binary":
            raise UsageError(
                "--encoding: binary tensors are the Open Inference Protocol's (V2); "
                f"{args.victim} is spoken to over KServe V1, which sends JSON"
            )
        shape, classes = _v1_images(args, reference)
    with user_input("--victim"):
        return connect(
            args.victim,
            args.api_key,
            protocol=protocol,
            encoding=args.encoding,
            input_shape=shape,
            num_classes=classes,
        )


def _v1_images(args: argparse.Namespace, reference: Any) -> tuple[tuple[int, ...], int]:
    """The images' shape and the classes of a KServe V1 victim, which does not state them:
    the reference victim's, else --dataset's."""
    if reference is not None:
        return tuple(reference.input_shape), int(reference.num_classes)
    if args.dataset is None:
        raise UsageError(
            f"--dataset: {args.victim} speaks KServe V1, which does not state the images' "
            "shape or the classes; give the dataset whose images it takes (or "
            "--reference-victim)"
        )
    dataset = data_mod.load(args.dataset, args.data_root)
    return dataset.input_shape, dataset.num_classes


def cmd_attack(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    check_service_options(args)
    folder = RunFolder(args.out)
    if _prepare_out_folder(args, folder):
        return _report_finished(args, folder)
    checkpoint = folder.load_checkpoint() if (args.resume and folder.has_checkpoint()) else None
    explanation = explanation_from_args(args) if _uses_explanations(args.method) else None
    settings = attack_settings(args)
    oracle, victim, evaluator, service_state = _oracle(args, explanation, checkpoint, settings)
    if explanation is not None:
        settings["explanation"] = explanation
    pool = _pool(args, oracle, victim)
    with user_input():
        attack = (
            ATTACKS[args.method](**settings)
            if pool is None
            else ATTACKS[args.method](pool, **settings)
        )
    _check_budget(args, attack)
    if checkpoint is not None:
        _check_same_settings(folder, describe_run(attack, oracle, args.budget))
    if victim is None and not math.isfinite(oracle.budget):
        # A service without a ledger (KServe, MLServer, an open megex serve): say who stops
        # it, once the options are known good (a refused command prints its error alone).
        print(
            f"{args.victim} reports no query budget: --budget {args.budget} is enforced by "
            "this client",
            file=messages(args),
        )
    folder.create()
    folder.write_config(
        {
            "label": args.label or args.method,
            "victim": args.victim,
            "dataset": args.dataset or (victim.dataset if victim is not None else None),
            "victim_accuracy": evaluator.victim_accuracy if evaluator is not None else None,
            # What a local victim's answers went through; a service's own are unknown here.
            "defenses": None if victim is None else [d.spec() for d in oracle.defenses],
            **({"pool": pool.describe()} if pool is not None else {}),
        }
    )
    result = run_attack(
        attack,
        oracle,
        args.budget,
        evaluator=evaluator,
        eval_every=args.eval_every,
        run_dir=folder.path,
        resume=args.resume,
        progress=not args.quiet,
        service_state=service_state,
    )
    return _report(args, result, folder)


def _pool(args: argparse.Namespace, oracle: Any, victim: Any) -> Any:
    """The attacker's images (--pool), for an attack with images; None for a data-free one."""
    if args.method not in POOL_ATTACKS:
        if args.pool:
            raise UsageError(
                f"--pool: {args.method} is data-free and takes no images; the attacks with "
                f"images are {', '.join(sorted(POOL_ATTACKS))}"
            )
        return None
    if not args.pool:
        raise UsageError(
            f"--pool: {args.method} attacks with the attacker's own images; give them, e.g. "
            "--pool fashion-mnist:unseen:1000 or --pool folder:my_images"
        )
    with user_input("--pool"):
        spec = parse_pool(args.pool)
    if victim is None and args.reference_victim:
        victim = load_victim(args.reference_victim)
    if victim is not None:
        info = victim_images(victim)
    elif spec.kind in ("seen", "unseen"):
        raise UsageError(
            f"--pool: {spec.kind} images are named by what the victim was trained on, which "
            "a URL does not say; pass --reference-victim FILE (the victim's file), or use "
            "another dataset or a folder"
        )
    else:
        info = VictimImages(tuple(oracle.input_shape), args.dataset or "")
    seed = args.seed if args.pool_seed is None else args.pool_seed
    with user_input("--pool"):
        return load_pool(spec, info, seed=seed, data_root=args.data_root)


def _report_finished(args: argparse.Namespace, folder: RunFolder) -> int:
    """--resume of a finished run: say so (or print its result with --json)."""
    result = folder.read_result()
    if args.json:
        print_json({"run": str(folder.path), **result})
    else:
        print(
            f"{folder.path} is already finished ({result.get('queries_used')} queries); "
            "nothing to resume",
            file=messages(args),
        )
    return 0


def _check_budget(args: argparse.Namespace, attack: Any) -> None:
    cost = attack.iteration_cost()
    if args.budget < cost:
        made_of, setting = step_cost(attack)
        # batch_size is an option here; query_batch only a --set key.
        lower = "--batch-size" if setting == "batch_size" else setting
        raise UsageError(
            f"--budget: {args.budget} queries is less than one iteration of {args.method} "
            f"({cost} = {made_of}); raise --budget or lower {lower}"
        )


def _check_same_settings(folder: RunFolder, described: dict[str, Any]) -> None:
    changed = changed_settings(folder, described)
    if changed:
        raise UsageError(
            f"--resume: the run in {folder.path} was started with other settings "
            f"({'; '.join(changed)}); resume it with the same options, or pass --force "
            "to start it over"
        )


def _report(args: argparse.Namespace, result: Any, folder: RunFolder) -> int:
    """The run's outcome: interrupted (stderr), its result as JSON, or one line."""
    if not result.finished:
        print(
            f"megex attack: interrupted after {result.queries_used} queries; the last "
            f"checkpoint is in {folder.path}. Continue with the same command plus --resume.",
            file=sys.stderr,
        )
        return INTERRUPTED
    if args.json:
        print_json({"run": str(folder.path), **folder.read_result()})
        return 0
    acc = "-" if result.clone_accuracy is None else f"{100 * result.clone_accuracy:.2f}%"
    print(
        f"{args.method}: {result.queries_used} queries, clone accuracy {acc}, "
        f"{result.elapsed_s:.1f} s; run folder {folder.path}",
        file=messages(args),
    )
    return 0


def _setting_names(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(ATTACKS[method].config_class)}


def _uses_explanations(method: str) -> bool:
    return "explanation" in _setting_names(method)
