"""`megex serve`: run a saved victim as an HTTP service (KServe V1 and V2 / Triton); and
`megex flags`: the keys its query monitors flagged, from its ledger.

Once it listens `serve` prints one line of JSON on stdout, e.g.
``{"event": "ready", "address": "http://127.0.0.1:8765", "model": "model", ...}``;
everything else (its description, uvicorn's logs) goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import socket
import sys
import time
from typing import Any

from ..explain import METHODS
from .common import add_explanation_options, add_json_option, load_victim, port, print_json
from .defenses import DEFENSE_HELP
from .errors import FAILURE, UsageError, user_input

__all__ = [
    "DEFAULT_DB",
    "add_flags_parser",
    "add_parser",
    "build_app",
    "build_monitors",
    "ready_line",
    "run_flags",
    "run_serve",
]

DEFAULT_DB = "megex-ledger.sqlite"


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
    p.add_argument(
        "--name", help="model name in URLs (default: 'model', which says nothing about the victim)"
    )
    auth = p.add_argument_group("keys and quotas")
    auth.add_argument(
        "--keys",
        metavar="FILE",
        help="API keys, one per line: KEY or KEY,BUDGET ('#' comments). "
        "Without --keys or --key the server runs open, without auth",
    )
    auth.add_argument(
        "--key", action="append", default=[], metavar="KEY", help="an API key (repeatable)"
    )
    auth.add_argument(
        "--budget", type=int, help="queries per key (one image = one query; default: unlimited)"
    )
    auth.add_argument(
        "--db",
        default=DEFAULT_DB,
        metavar="PATH",
        help="SQLite ledger of keys, counts and the audit log",
    )
    auth.add_argument(
        "--rate-limit",
        type=float,
        metavar="R",
        help="requests per second per key (default: no limit)",
    )
    auth.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body, MB")
    auth.add_argument(
        "--audit-images", action="store_true", help="store every queried image in the audit log"
    )
    _add_limit_arguments(p)
    ex = p.add_argument_group("what the service returns")
    ex.add_argument(
        "--prediction",
        choices=("probabilities", "logits", "top-k", "label"),
        default="probabilities",
        help="what predictions show",
    )
    ex.add_argument("--top-k", type=int, help="classes shown with --prediction top-k")
    add_explanation_options(
        ex,
        (*METHODS, "none"),
        "predicted",
        "explanation returned on request; 'none' offers no explanations",
    )
    choice = ex.add_mutually_exclusive_group()
    choice.add_argument(
        "--allow-explanation-choice",
        dest="allow_explanation_choice",
        action="store_true",
        default=True,
        help="requests may choose method, target, output and settings (default)",
    )
    choice.add_argument(
        "--fixed-explanation",
        dest="allow_explanation_choice",
        action="store_false",
        help="requests get only the configured explanation",
    )
    ex.add_argument(
        "--defense",
        action="append",
        default=[],
        metavar="SPEC",
        help=f"{DEFENSE_HELP} (repeatable: applied in order; `megex defenses` lists them)",
    )
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
    p.add_argument("--seed", type=int, default=0, help="seed of SmoothGrad and defence noise")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level (its logs go to stderr)",
    )
    p.set_defaults(func=run_serve)


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    from ..oracle import DEFAULT_CHUNK_PASSES
    from ..serving.limits import (
        DEFAULT_BODY_TIMEOUT_S,
        DEFAULT_FAILED_KEY_BURST,
        DEFAULT_FAILED_KEY_RATE,
        DEFAULT_MAX_JSON_VALUES,
        DEFAULT_MAX_PASSES_PER_REQUEST,
    )
    from ..stored_responses import (
        DEFAULT_IDEMPOTENCY_TTL_S,
        DEFAULT_STORED_RESPONSE_BYTES,
        DEFAULT_STORED_RESPONSE_BYTES_PER_KEY,
    )

    mib = 1024 * 1024
    lim = p.add_argument_group("limits against costly or hostile clients")
    lim.add_argument(
        "--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S, metavar="S",
        help="seconds to receive a request body (default: %(default)s)",
    )  # fmt: skip
    lim.add_argument(
        "--max-json-values", type=int, default=DEFAULT_MAX_JSON_VALUES, metavar="N",
        help="values in a JSON body; binary tensor data has no such limit (default: %(default)s)",
    )  # fmt: skip
    lim.add_argument(
        "--max-passes-per-request", type=int, default=DEFAULT_MAX_PASSES_PER_REQUEST,
        metavar="N", help="model passes one request may cost (default: %(default)s)",
    )  # fmt: skip
    lim.add_argument(
        "--compute-rate", type=float, metavar="P",
        help="model passes per second per key (default: no limit)",
    )  # fmt: skip
    lim.add_argument(
        "--chunk-passes", type=int, default=DEFAULT_CHUNK_PASSES, metavar="N",
        help="model passes computed per turn before another key's request gets its turn "
        "(default: %(default)s)",
    )  # fmt: skip
    lim.add_argument(
        "--failed-key-rate", type=float, default=DEFAULT_FAILED_KEY_RATE, metavar="R",
        help="wrong or missing API keys per second per client address (default: %(default)s)",
    )  # fmt: skip
    lim.add_argument(
        "--failed-key-burst", type=float, default=DEFAULT_FAILED_KEY_BURST, metavar="B",
        help="wrong or missing API keys per client address before throttling "
        "(default: %(default)s)",
    )  # fmt: skip
    lim.add_argument(
        "--idempotency-ttl", type=float, default=DEFAULT_IDEMPOTENCY_TTL_S, metavar="S",
        help="seconds a response to an idempotent request is kept (default: %(default)s)",
    )  # fmt: skip
    lim.add_argument(
        "--stored-responses-mb-per-key", type=float, metavar="MB",
        default=DEFAULT_STORED_RESPONSE_BYTES_PER_KEY / mib,
        help="stored responses kept per key (default: %(default)g MB)",
    )  # fmt: skip
    lim.add_argument(
        "--stored-responses-mb", type=float, default=DEFAULT_STORED_RESPONSE_BYTES / mib,
        metavar="MB", help="stored responses kept over all keys (default: %(default)g MB)",
    )  # fmt: skip
    show = p.add_argument_group("what a caller with a key may read about the service")
    show.add_argument(
        "--openapi", action="store_true", help="serve the OpenAPI document at /openapi.json"
    )
    show.add_argument(
        "--expose-architecture", action="store_true",
        help="name the victim's architecture and dataset in the V2 model metadata",
    )  # fmt: skip


def build_monitors(specs: list[str], input_shape: tuple[int, ...]) -> list[Any]:
    """The monitors of --monitor SPEC options, each with a threshold."""
    from ..detection import build_monitor

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


def build_app(args: argparse.Namespace) -> tuple[Any, dict[str, int | None]]:
    """The FastAPI app and its API keys, from parsed arguments."""
    try:
        from ..serving import create_app, read_keys_file
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"the server needs the 'server' extra (pip install 'megex[server]'): {err}",
            name=err.name,
        ) from None
    from ..defenses import build_defense
    from ..explain import Explanation
    from ..sqlite_ledger import LedgerInUse

    victim = load_victim(args.victim)
    with user_input("--defense"):
        defenses = [build_defense(spec) for spec in args.defense]
    explanation = None
    if args.explanation_method != "none":
        with user_input("--explanation-*"):
            explanation = Explanation(
                args.explanation_method,
                target=args.explanation_target,
                output=args.explanation_output,
            )
    monitors = build_monitors(args.monitor, victim.input_shape)
    keys: dict[str, int | None] = {}
    if args.keys:
        with user_input("--keys"):
            keys.update(read_keys_file(args.keys))
        if not keys:
            raise UsageError(f"--keys: {args.keys} holds no keys")
    keys.update(dict.fromkeys(k for k in args.key if k not in keys))
    for flag, value, low in (
        ("--budget", args.budget, 0),
        ("--rate-limit", args.rate_limit, 1e-9),
        ("--max-body-mb", args.max_body_mb, 1e-6),
        ("--body-timeout", args.body_timeout, 1e-3),
        ("--max-json-values", args.max_json_values, 1),
        ("--max-passes-per-request", args.max_passes_per_request, 1),
        ("--compute-rate", args.compute_rate, 1e-9),
        ("--chunk-passes", args.chunk_passes, 1),
        ("--failed-key-rate", args.failed_key_rate, 1e-9),
        ("--failed-key-burst", args.failed_key_burst, 1),
        ("--idempotency-ttl", args.idempotency_ttl, 1e-3),
        ("--stored-responses-mb-per-key", args.stored_responses_mb_per_key, 0),
        ("--stored-responses-mb", args.stored_responses_mb, 0),
    ):
        if value is not None and value < low:
            raise UsageError(f"{flag}: expected >= {low:g}, got {value}")
    try:
        with user_input():
            app = create_app(
                victim,
                name=args.name,
                keys=keys or None,
                db_path=args.db,
                budget=args.budget,
                rate_limit=args.rate_limit,
                max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                prediction=args.prediction,
                top_k=args.top_k,
                explanation=explanation,
                allow_explanation_choice=args.allow_explanation_choice,
                defenses=defenses,
                audit_images=args.audit_images,
                seed=args.seed,
                body_timeout_s=args.body_timeout,
                max_json_values=args.max_json_values,
                max_passes_per_request=args.max_passes_per_request,
                compute_rate=args.compute_rate,
                chunk_passes=args.chunk_passes,
                failed_key_rate=args.failed_key_rate,
                failed_key_burst=args.failed_key_burst,
                idempotency_ttl_s=args.idempotency_ttl,
                stored_response_bytes_per_key=int(args.stored_responses_mb_per_key * 1024 * 1024),
                stored_response_bytes=int(args.stored_responses_mb * 1024 * 1024),
                openapi=args.openapi,
                expose_architecture=args.expose_architecture,
                monitors=monitors,
            )
    except LedgerInUse as err:
        raise LedgerInUse(f"--db: {err}") from None
    return app, keys


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


# --- megex flags --------------------------------------------------------------------------


def add_flags_parser(sub: Any, **kwargs: Any) -> None:
    p = sub.add_parser(
        "flags",
        help="the keys that a service's query monitors flagged (from its ledger)",
        description="List the keys that the query monitors of `megex serve --monitor ...` "
        "flagged, with each key's first flag (when, which monitor, its statistic and "
        "threshold, after how many of the key's queries) and its number of flags. Reads the "
        "ledger without locking it, so it works while the server runs. Keys are shown by "
        "their ledger label (key- and the start of the key's salted hash).",
        **kwargs,
    )
    p.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help="the service's SQLite ledger")
    add_json_option(p)
    p.set_defaults(func=run_flags)


def run_flags(args: argparse.Namespace) -> int:
    """Handler of ``flags``: the flagged keys, as a table or one JSON document."""
    from ..sqlite_ledger import flag_report

    with user_input("--db"):
        report = flag_report(args.db)
    if args.json:
        print_json(report)
        return 0
    flagged = report["flagged"]
    print(f"ledger {report['ledger']}: {len(flagged)} of {report['accounts']} key(s) flagged")
    if not flagged:
        return 0
    header = (
        "key", "flags", "first flag (UTC)", "monitor", "statistic", "threshold",
        "after queries", "queries used", "flags by monitor",
    )  # fmt: skip
    rows = [header]
    for entry in flagged:
        first = entry["first"]
        rows.append(
            (
                entry["label"] + ("" if entry["active"] else " (inactive)"),
                str(entry["flags"]),
                time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(first["time"])),
                first["monitor"],
                f"{first['statistic']:.4f}",
                f"{first['threshold']:.4f}",
                str(first["queries_seen"]),
                str(entry["queries_used"]),
                ", ".join(f"{k} {v}" for k, v in sorted(entry["by_monitor"].items())),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0
