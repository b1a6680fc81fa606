"""The client a service needs: :func:`detect_protocol` asks the server which protocol it
speaks (without spending a query), :func:`connect` returns the client for it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .transport import ServiceClient, ServiceError
from .v1 import RemoteV1Oracle
from .v2 import ENCODINGS, RemoteOracle

__all__ = ["PROTOCOLS", "connect", "detect_protocol"]

PROTOCOLS = ("auto", "v2", "v1")
# Options that only one protocol's client takes.
_V1_ONLY = {
    "default_explanation",
    "prediction",
    "predictions_field",
    "probabilities_key",
    "explanations_field",
    "layout",
    "offers_explanation",
}
_V2_ONLY = {"binary_threshold"}
# Statuses that say "not this protocol's path here" (as opposed to a refusal of the caller).
_NOT_SERVED = (404, 405, 501)


def detect_protocol(url: str, api_key: str | None = None, **options: Any) -> str:
    """ "v1" or "v2": the protocol the service at `url` speaks. A model URL says it
    (``.../v1/models/NAME`` is V1, ``.../v2/models/NAME`` V2); at a server root, its model
    is named by ``GET /v1/models``, then ``GET /v2/models/NAME`` (the V2 metadata) decides,
    else ``GET /v1/models/NAME`` (V1 readiness). No query is spent. options: timeout,
    retries, backoff (:class:`ServiceClient`). ServiceError where neither answers."""
    with ServiceClient(url, api_key, **options) as probe:
        if probe.url_protocol is not None:
            return probe.url_protocol
        name = probe.only_model()
        failures = []
        for protocol in ("v2", "v1"):
            path = f"/{protocol}/models/{name}"
            try:
                probe.get_json(path)
                return protocol
            except ServiceError as err:
                if err.status not in _NOT_SERVED:
                    raise  # unauthorised, or the server failed: not a question of protocol
                failures.append(f"GET {path}: HTTP {err.status}")
    raise ServiceError(
        f"{url}: speaks neither the Open Inference Protocol (V2) nor KServe V1 for model "
        f"{name!r} ({'; '.join(failures)})"
    )


def connect(
    url: str,
    api_key: str | None = None,
    *,
    protocol: str = "auto",
    encoding: str = "auto",
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    **options: Any,
) -> RemoteOracle | RemoteV1Oracle:
    """The Oracle of the service at `url`: :class:`RemoteOracle` over the Open Inference
    Protocol (V2) or :class:`RemoteV1Oracle` over KServe V1.

    protocol: "v2", "v1" or "auto" (:func:`detect_protocol`; no query is spent). encoding:
    V2's tensors, "json", "binary" or "auto" (:class:`RemoteOracle`); V1 sends JSON, so
    "binary" is refused there. input_shape and num_classes: the images' (C, H, W) and the
    classes, which V1 needs (input_shape always; num_classes before the first answer) and V2
    reads from the metadata (where given, they must agree with it). options: the clients'
    own (timeout, retries, backoff, max_rate_limit_waits; V2's binary_threshold; V1's
    layout, predictions_field, ...); with protocol "auto", the other protocol's are unused.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected 'auto', 'v2' or 'v1', got {protocol!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding: expected 'auto', 'json' or 'binary', got {encoding!r}")
    common = {k: options[k] for k in ("timeout", "retries", "backoff") if k in options}
    chosen = protocol if protocol != "auto" else detect_protocol(url, api_key, **common)
    other = _V1_ONLY if chosen == "v2" else _V2_ONLY
    given = sorted(set(options) & other)
    if given and protocol != "auto":
        raise ValueError(f"{given[0]}: not an option of the {chosen.upper()} client")
    options = {k: v for k, v in options.items() if k not in other}
    if chosen == "v1":
        if encoding == "binary":
            raise ValueError(
                "encoding: 'binary' (binary tensor data) is the Open Inference Protocol's; "
                f"{url} is spoken to over KServe V1, which sends JSON"
            )
        return RemoteV1Oracle(
            url, api_key, input_shape=input_shape, num_classes=num_classes, **options
        )
    oracle = RemoteOracle(url, api_key, encoding=encoding, **options)
    try:
        oracle.check_shape(input_shape, num_classes)
    except ValueError:
        oracle.close()
        raise
    return oracle
