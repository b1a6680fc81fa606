"""`megex serve`: run a saved victim as an HTTP service (KServe V1 and V2 / Triton).

Once it listens it prints one line of JSON on stdout, e.g.
``{"event": "ready", "address": "http://127.0.0.1:8765", "model": "model", ...}``;
everything else (its description, uvicorn's logs) goes to stderr. The options that set the
service's settings are made from their declarations (:mod:`.service_options`); `megex flags`
(:mod:`.flags`) reads the flags its query monitors raised.
"""

from __future__ import annotations

import argparse
import copy
import socket
import sys
from typing import Any

from ..defenses import build_defense
from ..detection import build_monitor
from ..explain import METHODS, Explanation
from ..integrations.explainers import build_explainer
from ..ledger_file import LedgerInUse
from ..serving.settings import ServiceSettings, read_keys_file
from . import service_options
from .common import add_explanation_options, load_victim, port, print_json
from .defenses import DEFENSE_HELP
from .errors import FAILURE, UsageError, user_input
from .flags import DEFAULT_DB, add_flags_parser, run_flags

__all__ = [
    "DEFAULT_DB",
    "add_flags_parser",
    "add_parser",
    "build_app",
    "build_monitors",
    "ready_line",
    "run_flags",
    "run_serve",
    "service_settings",
]


def add_parser(sub: Any, **kwargs: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a victim over HTTP (KServe V1 / Vertex AI and V2 / Triton)",
        description="Serve a victim saved by Victim.save over HTTP, with API keys, per-key "
        "query budgets in a SQLite ledger, rate limits and explanations. Prints one JSON "
        'line {"event": "ready", "address": ..., "model": ...} on stdout once it listens.',
        **kwargs,
    )
    p.add_argument("--victim", required=True, metavar="PATH", help="victim .safetensors file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=port, default=8080, help="port (0: any free port)")
    groups = {
        key: p.add_argument_group(title) for key, title in service_options.GROUP_TITLES.items()
    }
    _add_key_options(groups["keys"])
    service_options.add_setting_options(p, groups)
    _add_answer_options(groups["answers"])
    watch = p.add_argument_group("watching for extraction traffic")
    watch.add_argument(
        "--monitor",
        action="append",
        default=[],
        metavar="SPEC",
        help="a query-stream monitor per key, fed every answered request, its flags kept in "
        "the ledger (megex flags lists them): prada[:threshold=W,...] (Shapiro-Wilk W below "
        "the threshold, default 0.9) or ood:threshold=T[,score=msp|entropy,window=N] (mean "
        "out-of-distribution score of the last N queries above T); NAME:calibration=FILE "
        "takes a threshold and settings from a file written by megex detection (repeatable, "
        "one per kind)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level (its logs go to stderr)",
    )
    p.set_defaults(func=run_serve)


def _add_key_options(keys: Any) -> None:
    keys.add_argument(
        "--keys",
        metavar="FILE",
        help="API keys, one per line: KEY or KEY,BUDGET ('#' comments). "
        "Without --keys or --key the server runs open, without auth",
    )
    keys.add_argument(
        "--key", action="append", default=[], metavar="KEY", help="an API key (repeatable)"
    )
    # A server started from the command line keeps its counts in a file (the setting's
    # default, ':memory:', forgets them on exit).
    keys.add_argument(
        "--db",
        default=DEFAULT_DB,
        metavar="PATH",
        help="SQLite ledger of keys, counts and the audit log",
    )


def _add_answer_options(answers: Any) -> None:
    add_explanation_options(
        answers,
        (*METHODS, "none"),
        "predicted",
        "explanation returned on request; 'none' offers no explanations",
    )
    choice = answers.add_mutually_exclusive_group()
    choice.add_argument(
        "--allow-explanation-choice",
        dest="allow_explanation_choice",
        action="store_true",
        default=service_options.setting_default("allow_explanation_choice"),
        help="requests may choose method, target, output and settings (default)",
    )
    choice.add_argument(
        "--fixed-explanation",
        dest="allow_explanation_choice",
        action="store_false",
        help="requests get only the configured explanation",
    )
    answers.add_argument(
        "--explainer",
        metavar="SPEC",
        help="compute the maps with the explainer a provider ships instead of megex's own: "
        "captum:NAME[:key=value,...] (a captum.attr method, e.g. captum:IntegratedGradients, "
        "captum:Saliency, captum:InputXGradient, captum:NoiseTunnel(Saliency); needs captum) "
        "or module:function, a function (model, images, targets) -> maps; its maps are "
        "labelled with captum's megex equivalent, else with --explanation-method",
    )
    answers.add_argument(
        "--defense",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"{DEFENSE_HELP} (repeatable: applied in order; `megex defenses` lists them)",
    )


def build_monitors(specs: list[str], input_shape: tuple[int, ...]) -> list[Any]:
    """The monitors of --monitor SPEC options, each with a threshold."""
    monitors = []
    for spec in specs:
        with user_input(f"--monitor {spec}"):
            monitor = build_monitor(spec)
        if monitor.threshold is None:
            raise UsageError(
                f"--monitor {spec}: {monitor.name} has no default threshold; give "
                "threshold=VALUE, or calibration=FILE (written by megex detection)"
            )
        shape = monitor.calibrated_on.get("input_shape")
        if shape is not None and tuple(shape) != tuple(input_shape):
            raise UsageError(
                f"--monitor {spec}: calibrated on images of shape {tuple(shape)}; this victim "
                f"takes {tuple(input_shape)}"
            )
        monitors.append(monitor)
    kinds = [m.name for m in monitors]
    if len(set(kinds)) != len(kinds):
        raise UsageError(f"--monitor: each kind at most once, got {', '.join(kinds)}")
    return monitors


def service_settings(args: argparse.Namespace, input_shape: tuple[int, ...]) -> ServiceSettings:
    """The service's settings from parsed arguments (a victim taking `input_shape`)."""
    with user_input("--defense"):
        defenses = tuple(build_defense(spec) for spec in args.defense)
    explainer = None
    method = args.explanation_method
    if getattr(args, "explainer", None):
        if method == "none":
            raise UsageError(
                "--explainer: the service offers no explanations (--explanation-method none)"
            )
        with user_input("--explainer"):
            explainer = build_explainer(args.explainer)
        method = explainer.method or method
    explanation = None
    if method != "none":
        with user_input("--explanation-*"):
            explanation = Explanation(
                method,
                target=args.explanation_target,
                output=args.explanation_output,
            )
    monitors = tuple(build_monitors(args.monitor, input_shape))
    keys: dict[str, int | None] = {}
    if args.keys:
        with user_input("--keys"):
            keys.update(read_keys_file(args.keys))
        if not keys:
            raise UsageError(f"--keys: {args.keys} holds no keys")
    keys.update(dict.fromkeys(k for k in args.key if k not in keys))
    values = service_options.read(args)
    with user_input():
        return ServiceSettings(
            **values,
            keys=keys or None,
            db_path=args.db,
            explanation=explanation,
            allow_explanation_choice=args.allow_explanation_choice,
            defenses=defenses,
            explainer=explainer,
            monitors=monitors,
        )


def build_app(args: argparse.Namespace) -> tuple[Any, dict[str, int | None]]:
    """The FastAPI app and its API keys, from parsed arguments."""
    try:
        from ..serving.app import create_app  # the 'server' extra: fastapi
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the server needs the 'server' extra (pip install 'megex[server]'): {err}",
            name=err.name,
        ) from None
    victim = load_victim(args.victim)
    settings = service_settings(args, victim.input_shape)
    try:
        with user_input():
            app = create_app(victim, settings)
    except LedgerInUse as err:
        raise LedgerInUse(f"--db: {err}") from None
    return app, dict(settings.keys or {})


def _check_address(host: str, port: int) -> None:
    """Fail early, in one line, when the address cannot be listened on."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as err:
        raise OSError(f"--host/--port: cannot listen on {host}:{port} ({err})") from None


def ready_line(host: str, port: int, model: str) -> dict[str, Any]:
    """The document `serve` prints on stdout once it listens."""
    address = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return {
        "event": "ready",
        "address": address,
        "model": model,
        "url": f"{address}/v2/models/{model}",
    }


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with its access log on stderr too: stdout carries the ready line."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for handler in config.get("handlers", {}).values():
        if handler.get("stream") == "ext://sys.stdout":
            handler["stream"] = "ext://sys.stderr"
    return config


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``serve``: build the app, describe it, run uvicorn until stopped."""
    app, keys = build_app(args)
    _check_address(args.host, args.port)
    import uvicorn

    service = app.state.service
    budget = "unlimited" if args.budget is None else f"{args.budget} queries"
    err = sys.stderr
    print(
        f"megex serve: model {service.name!r} ({service.responder.victim.arch}), ledger {args.db}",
        file=err,
    )
    defenses = ", ".join(d.spec() for d in service.responder.defenses)
    print(f"  defences: {defenses or 'none'}", file=err)
    if keys:
        print(f"  auth: {len(keys)} API key(s); default budget per key: {budget}", file=err)
    else:
        print(f"  auth: NONE - open server, every caller shares one budget ({budget})", file=err)
    for monitor in service.monitors.monitors if service.monitors is not None else ():
        settings = ", ".join(f"{k}={v}" for k, v in monitor.params().items())
        print(
            f"  monitor: {monitor.name}, threshold {monitor.threshold:g} ({settings}); "
            "state per key in memory (a restart starts it over)",
            file=err,
        )

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[1]
                ready = ready_line(args.host, bound, service.name)
                print(f"  V2 / Triton: {ready['url']}  (POST .../infer)", file=err)
                print(
                    f"  V1 / Vertex: {ready['address']}/v1/models/{service.name}:predict "
                    "and :explain",
                    file=err,
                )
                print_json(ready)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, log_config=_log_config()
    )
    server = Server(config)
    server.run()
    return 0 if server.started else FAILURE
