"""`megex serve`: run a saved victim as an HTTP service (KServe V1 and V2 / Triton).

Usable on its own as ``python -m megex.serve_cli --victim v.safetensors``; the main ``megex``
command registers the same subcommand with :func:`add_serve_parser`.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from typing import Any

from .explain import METHODS, OUTPUTS

__all__ = ["add_serve_parser", "build_app", "main", "run_serve"]

DEFAULT_DB = "megex-ledger.sqlite"


class CLIError(Exception):
    """A user mistake on the command line: reported in one line, exit status 2."""


def add_serve_parser(subparsers: Any) -> None:
    """Register the ``serve`` subcommand; its handler is in ``set_defaults(func=run_serve)``."""
    p = subparsers.add_parser(
        "serve",
        help="serve a victim over HTTP (KServe V1 / Vertex AI and V2 / Triton)",
        description="Serve a victim saved by Victim.save over HTTP, with API keys, per-key "
        "query budgets in a SQLite ledger, rate limits and explanations.",
    )
    _add_arguments(p)
    p.set_defaults(func=run_serve)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--victim", required=True, metavar="PATH", help="victim .safetensors file")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
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
        help="SQLite ledger of keys, counts and the audit log (default: %(default)s)",
    )
    auth.add_argument("--rate-limit", type=float, metavar="R", help="requests per second per key")
    auth.add_argument(
        "--max-body-mb", type=float, default=32.0, help="largest request body (default: 32 MB)"
    )
    auth.add_argument(
        "--audit-images", action="store_true", help="store every queried image in the audit log"
    )
    _add_limit_arguments(p)
    ex = p.add_argument_group("what the service returns")
    ex.add_argument(
        "--prediction",
        choices=("probabilities", "logits", "top-k", "label"),
        default="probabilities",
        help="what predictions show (default: %(default)s)",
    )
    ex.add_argument("--top-k", type=int, help="classes shown with --prediction top-k")
    ex.add_argument(
        "--explanation-method",
        choices=(*METHODS, "none"),
        default="gradient",
        help="explanation returned on request; 'none' offers no explanations "
        "(default: %(default)s)",
    )
    ex.add_argument(
        "--explanation-target",
        default="predicted",
        help="'predicted', 'all' or a class index (default: %(default)s)",
    )
    ex.add_argument(
        "--explanation-output",
        choices=OUTPUTS,
        default="probability",
        help="quantity differentiated (default: %(default)s)",
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
        help="defence applied to answers, e.g. round:2, noise:0.5, topk:0.1, sign (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of SmoothGrad and defence noise")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level (default: %(default)s)",
    )


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    from .oracle import DEFAULT_CHUNK_PASSES
    from .serving.limits import (
        DEFAULT_BODY_TIMEOUT_S,
        DEFAULT_FAILED_KEY_BURST,
        DEFAULT_FAILED_KEY_RATE,
        DEFAULT_MAX_JSON_VALUES,
        DEFAULT_MAX_PASSES_PER_REQUEST,
    )
    from .stored_responses import (
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


def build_app(args: argparse.Namespace) -> tuple[Any, dict[str, int | None]]:
    """The FastAPI app and a description of it, from parsed arguments (raises CLIError)."""
    try:
        from .serving import create_app, read_keys_file
    except ImportError as err:
        raise CLIError(
            f"the server needs the 'server' extra (pip install 'megex[server]'): {err}"
        ) from None
    from .defenses import build_defense
    from .explain import Explanation, parse_target
    from .sqlite_ledger import LedgerInUse
    from .victim import Victim

    try:
        victim = Victim.load(args.victim)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CLIError(f"--victim: {err}") from None
    try:
        defenses = [build_defense(spec) for spec in args.defense]
    except ValueError as err:
        raise CLIError(f"--defense: {err}") from None
    explanation = None
    if args.explanation_method != "none":
        try:
            explanation = Explanation(
                args.explanation_method,
                target=parse_target(args.explanation_target),
                output=args.explanation_output,
            )
        except ValueError as err:
            raise CLIError(f"--explanation-*: {err}") from None
    keys: dict[str, int | None] = {}
    if args.keys:
        try:
            keys.update(read_keys_file(args.keys))
        except (OSError, ValueError) as err:
            raise CLIError(f"--keys: {err}") from None
        if not keys:
            raise CLIError(f"--keys: {args.keys} holds no keys")
    keys.update(dict.fromkeys(k for k in args.key if k not in keys))
    for flag, value, low in (
        ("--budget", args.budget, 0),
        ("--rate-limit", args.rate_limit, 1e-9),
        ("--max-body-mb", args.max_body_mb, 1e-6),
        ("--port", args.port, 0),
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
            raise CLIError(f"{flag}: expected >= {low:g}, got {value}")
    try:
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
        )
    except (ValueError, OSError, LedgerInUse) as err:
        raise CLIError(str(err)) from None
    return app, keys


def _check_address(host: str, port: int) -> None:
    """Fail early, in one line, when the address cannot be listened on."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as err:
        raise CLIError(f"--host/--port: cannot listen on {host}:{port} ({err})") from None


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``serve``: build the app, print its URLs, run uvicorn until stopped."""
    try:
        app, keys = build_app(args)
        _check_address(args.host, args.port)
        import uvicorn
    except CLIError as err:
        print(f"megex serve: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    service = app.state.service
    base = f"http://{args.host}:{args.port}"
    budget = "unlimited" if args.budget is None else f"{args.budget} queries"
    print(
        f"megex serve: model {service.name!r} ({service.responder.victim.arch}), ledger {args.db}"
    )
    print(f"  V2 / Triton: {base}/v2/models/{service.name}  (POST .../infer)")
    print(f"  V1 / Vertex: {base}/v1/models/{service.name}:predict  and :explain")
    if keys:
        print(f"  auth: {len(keys)} API key(s); default budget per key: {budget}")
    else:
        print(f"  auth: NONE - open server, every caller shares one budget ({budget})")
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m megex.serve_cli``."""
    parser = argparse.ArgumentParser(prog="megex serve", description="Serve a victim over HTTP.")
    _add_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
