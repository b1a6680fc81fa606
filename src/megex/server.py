"""The victim as an HTTP service: predictions and explanations with keys, quotas and limits.

Two protocols over one model:

- KServe V1 with Vertex AI payloads: ``POST /v1/models/{name}:predict`` and ``:explain``,
  body ``{"instances": [...], "parameters": {...}}``; an instance is one image as a nested
  list (C, H, W) of floats in [0, 1], or ``{"b64": ...}`` of its float32 little-endian bytes.
- Open Inference Protocol (KServe V2 / Triton): health, metadata and
  ``POST /v2/models/{name}/infer`` in JSON or with the binary tensor data extension. Input
  ``images`` (FP32, [-1, C, H, W]); outputs ``probabilities``, ``labels``, ``logits`` (in
  "logits" mode only) and ``explanation``, which is computed only when a request names it.

Explanation settings go in the request's ``parameters`` when the server allows a choice:
``method``, ``target``, ``output``, and per method ``sigma``/``noiseSigma``,
``samples``/``noisySampleCount`` (smoothgrad), ``steps``/``stepCount``, ``baseline``
(integrated_gradients).

Every query is charged to an API key (``Authorization: Bearer KEY`` or ``x-api-key``) in a
SQLite ledger before it is computed (see :mod:`megex.sqlite_ledger`); authenticated responses
carry ``X-Queries-Used``, ``X-Query-Budget`` and ``X-Queries-Remaining``. Mistakes get a 4xx
with ``{"error": "..."}``. This module needs the ``server`` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .defenses import Defense
from .explain import Explanation, parse_target
from .keystore import RateLimiter
from .ledger import BudgetExceeded
from .oracle import (
    Answer,
    ExplanationNotOffered,
    InvalidQuery,
    LocalOracle,
    Responder,
    validate_images,
)
from .sqlite_ledger import (
    Account,
    IdempotencyConflict,
    SQLiteLedger,
    StoredResponse,
    Unauthorized,
)
from .victim import Victim

__all__ = ["create_app", "explanation_from_parameters", "HTTPError", "default_model_name"]

log = logging.getLogger("megex.server")

INPUT_NAME = "images"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# Request parameters that the Open Inference Protocol or Triton's clients may send and that
# do not concern explanations; they are accepted and ignored.
_PROTOCOL_PARAMETERS = {
    "binary_data_output",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "headers",
}
# Vertex AI's names for explanation settings -> megex's.
_ALIASES = {
    "noiseSigma": "sigma",
    "noisySampleCount": "samples",
    "stepCount": "steps",
    "explanation_method": "method",
    "explanation_target": "target",
    "explanation_output": "output",
}
_EXPLANATION_KEYS = {"method", "target", "output", "sigma", "samples", "steps", "baseline"}


class HTTPError(Exception):
    """A request the server refuses: status, a one-line message, a machine-readable code."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str = "invalid_request",
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        self.extra = extra


def _bad(message: str, code: str = "invalid_request") -> HTTPError:
    return HTTPError(400, message, code)


# --- parsing ----------------------------------------------------------------------------


def _load_json(data: bytes, what: str = "body") -> dict[str, Any]:
    if not data:
        raise _bad(f"{what}: empty; send a JSON object")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(f"{what}: not valid JSON ({err})") from None
    except RecursionError:
        raise _bad(f"{what}: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise _bad(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _numeric_array(obj: Any, what: str) -> np.ndarray:
    """A nested list of numbers as float32, or a 400 (ragged lists, strings, null, bools)."""
    try:
        arr = np.array(obj)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise _bad(f"{what}: not a regular nested list of numbers ({err})") from None
    if arr.dtype.kind not in "iuf":
        raise _bad(
            f"{what}: expected numbers (float32 in [0, 1]), got {_kind_name(arr)}",
            "invalid_dtype",
        )
    with np.errstate(over="ignore"):
        return arr.astype(np.float32)


def _kind_name(arr: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes", "O": "mixed or null values"}.get(
        arr.dtype.kind, str(arr.dtype)
    )


def _validated(arr: np.ndarray, input_shape: Sequence[int], what: str) -> torch.Tensor:
    try:
        return validate_images(torch.from_numpy(arr), input_shape, name=what)
    except InvalidQuery as err:
        raise _bad(str(err), "invalid_images") from None


def explanation_from_parameters(
    parameters: Mapping[str, Any],
    default: Explanation | None,
    ignore: Iterable[str] = (),
) -> Explanation | bool:
    """The explanation that request `parameters` ask for: True (the server's own) when they
    set nothing, else an Explanation built over the server's defaults. Raises HTTPError 400
    for unknown keys or values."""
    settings: dict[str, Any] = {}
    ignored = set(ignore)
    for key, value in parameters.items():
        if key in ignored or key.startswith("triton_"):
            continue
        name = _ALIASES.get(key, key)
        if name not in _EXPLANATION_KEYS:
            known = sorted(_EXPLANATION_KEYS | set(_ALIASES))
            raise _bad(f"parameters: unknown {key!r}; known: {', '.join(known)}")
        settings[name] = value
    if not settings:
        return True
    base = default or Explanation()
    method = settings.pop("method", base.method)
    target = settings.pop("target", base.target)
    output = settings.pop("output", base.output)
    params = dict(base.params) if method == base.method else {}
    params.update(settings)
    try:
        return Explanation(method, target=parse_target(target), output=output, **params)
    except (ValueError, TypeError, OverflowError) as err:
        raise _bad(str(err), "invalid_explanation") from None


@dataclass
class Parsed:
    """A request reduced to what the service needs, plus what its renderer needs."""

    images: torch.Tensor
    explanation: Explanation | bool | None
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # V2: (name, binary)
    request_id: str | None = None


def parse_v1(
    body: bytes, input_shape: Sequence[int], explain: bool, default: Explanation | None
) -> Parsed:
    """{"instances": [...], "parameters": {...}} -> images and requested explanation."""
    doc = _load_json(body)
    unknown = set(doc) - {"instances", "parameters"}
    if unknown:
        raise _bad(f"body: unknown fields {sorted(unknown)}; expected 'instances', 'parameters'")
    instances = doc.get("instances")
    if not isinstance(instances, list) or not instances:
        raise _bad("instances: expected a non-empty list of images (C, H, W)")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("parameters: expected a JSON object")
    if any(isinstance(inst, dict) for inst in instances):
        arr = np.stack([_v1_instance(i, inst, input_shape) for i, inst in enumerate(instances)])
    else:
        arr = _numeric_array(instances, "instances")
    images = _validated(arr, input_shape, "instances")
    requested = explanation_from_parameters(parameters, default)
    return Parsed(images, requested if explain else None)


def _v1_instance(index: int, inst: Any, input_shape: Sequence[int]) -> np.ndarray:
    what = f"instances[{index}]"
    if not isinstance(inst, dict):
        arr = _numeric_array(inst, what)
    elif set(inst) != {"b64"} or not isinstance(inst["b64"], str):
        raise _bad(f"{what}: expected a nested list or {{'b64': base64 of float32 bytes}}")
    else:
        try:
            raw = base64.b64decode(inst["b64"], validate=True)
        except ValueError:
            raise _bad(f"{what}.b64: not valid base64") from None
        size = math.prod(input_shape)
        if len(raw) != 4 * size:
            raise _bad(f"{what}.b64: {len(raw)} bytes, expected {4 * size} (float32 {input_shape})")
        arr = np.frombuffer(raw, dtype="<f4").reshape(input_shape).copy()
    if arr.shape != tuple(input_shape):
        raise _bad(f"{what}: shape {arr.shape} does not match {tuple(input_shape)}")
    return arr


def parse_v2(
    body: bytes,
    header_length: str | None,
    input_shape: Sequence[int],
    output_names: Sequence[str],
    default: Explanation | None,
) -> Parsed:
    """An Open Inference Protocol request, JSON or with binary tensor data."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise _bad("Inference-Header-Content-Length: not an integer") from None
        if not 0 < length <= len(body):
            raise _bad(
                f"Inference-Header-Content-Length: {length} is outside the body's {len(body)} bytes"
            )
        body, binary = body[:length], body[length:]
    doc = _load_json(body, "inference header" if header_length is not None else "body")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"inputs: expected exactly one tensor named {INPUT_NAME!r}")
    arr, used = _v2_input(inputs[0], binary)
    if used != len(binary):
        raise _bad(f"binary data: {len(binary) - used} bytes after the tensors are not used")
    images = _validated(arr, input_shape, INPUT_NAME)

    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("parameters: expected a JSON object")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _bad("parameters.binary_data_output: expected true or false")
    outputs = _v2_outputs(doc.get("outputs"), output_names, binary_default)
    wants_explanation = any(name == "explanation" for name, _ in outputs)
    requested = explanation_from_parameters(parameters, default, ignore=_PROTOCOL_PARAMETERS)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("id: expected a string")
    return Parsed(images, requested if wants_explanation else None, outputs, request_id)


def _v2_input(tensor: dict[str, Any], binary: bytes) -> tuple[np.ndarray, int]:
    name = tensor.get("name")
    if name != INPUT_NAME:
        raise _bad(f"inputs: unknown tensor {name!r}; this model takes {INPUT_NAME!r}")
    if tensor.get("datatype") != "FP32":
        raise _bad(
            f"inputs.{INPUT_NAME}: datatype {tensor.get('datatype')!r}, expected 'FP32' "
            "(float32 images in [0, 1])",
            "invalid_dtype",
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    ):
        raise _bad(f"inputs.{INPUT_NAME}.shape: expected a list of non-negative integers")
    size = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"inputs.{INPUT_NAME}.parameters: expected a JSON object")
    if "shared_memory_region" in params:
        raise _bad("shared memory inputs are not supported; send the data in the request")
    if "binary_data_size" in params:
        nbytes = params["binary_data_size"]
        if "data" in tensor:
            raise _bad(f"inputs.{INPUT_NAME}: give either 'data' or binary_data_size, not both")
        if not isinstance(nbytes, int) or nbytes != 4 * size:
            raise _bad(
                f"inputs.{INPUT_NAME}: binary_data_size {nbytes} does not match shape {shape} "
                f"of FP32 ({4 * size} bytes)"
            )
        if nbytes > len(binary):
            raise _bad(f"binary data: {len(binary)} bytes sent, the inputs declare {nbytes}")
        # A copy: tensors over a read-only buffer are undefined behaviour in torch.
        arr = np.frombuffer(binary, dtype="<f4", count=size).reshape(shape).copy()
        return arr, nbytes
    if "data" not in tensor:
        raise _bad(f"inputs.{INPUT_NAME}: no 'data' and no binary_data_size")
    arr = _numeric_array(tensor["data"], f"inputs.{INPUT_NAME}.data").reshape(-1)
    if arr.size != size:
        raise _bad(f"inputs.{INPUT_NAME}.data: {arr.size} values, shape {shape} needs {size}")
    return arr.reshape(shape), 0


def _v2_outputs(
    requested: Any, output_names: Sequence[str], binary_default: bool
) -> list[tuple[str, bool]]:
    if requested is None:
        # Without "outputs" every output is returned except the explanation, which costs
        # far more than a prediction and must be asked for by name.
        return [(name, binary_default) for name in output_names if name != "explanation"]
    if not isinstance(requested, list) or not requested:
        raise _bad("outputs: expected a non-empty list of {'name': ...}")
    outputs: list[tuple[str, bool]] = []
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if name == "explanation" and name not in output_names:
            raise HTTPError(
                403, "explanation: this model returns no explanations", "explanation_not_offered"
            )
        if name not in output_names:
            raise _bad(f"outputs: unknown {name!r}; this model has {', '.join(output_names)}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"outputs.{name}.parameters: expected a JSON object")
        if params.get("classification"):
            raise _bad("the classification extension is not supported; read 'probabilities'")
        if "shared_memory_region" in params:
            raise _bad("shared memory outputs are not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise _bad(f"outputs.{name}.parameters.binary_data: expected true or false")
        outputs.append((name, binary))
    return outputs


# --- rendering --------------------------------------------------------------------------


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def _predictions(answer: Answer) -> list[list[float]]:
    values = answer.logits if answer.logits is not None else answer.probabilities
    return values.numpy().tolist()


def render_v1_predict(answer: Answer, parsed: Parsed) -> tuple[bytes, str, dict[str, str]]:
    return _json_bytes({"predictions": _predictions(answer)}), "application/json", {}


def render_v1_explain(answer: Answer, parsed: Parsed) -> tuple[bytes, str, dict[str, str]]:
    """Vertex AI's ExplainResponse. instanceOutputValue is the prediction the service shows
    for that class (so it reveals nothing more); baselines and approximation errors are
    not estimated and read 0."""
    spec = answer.explanation_spec
    predictions = _predictions(answer)
    expl = answer.explanation
    explanations = []
    if expl is not None and spec is not None:
        maps = expl.numpy()
        for i, label in enumerate(answer.labels.tolist()):
            if spec.target == "all":
                pairs = [(k, maps[i, k]) for k in range(maps.shape[1])]
            else:
                k = label if spec.target == "predicted" else int(spec.target)
                pairs = [(k, maps[i])]
            explanations.append(
                {
                    "attributions": [
                        {
                            "featureAttributions": {INPUT_NAME: m.tolist()},
                            "outputIndex": [k],
                            "instanceOutputValue": predictions[i][k],
                            "baselineOutputValue": 0.0,
                            "approximationError": 0.0,
                        }
                        for k, m in pairs
                    ]
                }
            )
    doc = {
        "explanations": explanations,
        "predictions": predictions,
        "explanation": None if spec is None else spec.to_dict(),
    }
    return _json_bytes(doc), "application/json", {}


def render_v2(answer: Answer, parsed: Parsed, model_name: str) -> tuple[bytes, str, dict[str, str]]:
    """An inference response; outputs asked as binary follow the JSON header."""
    tensors = {
        "probabilities": answer.probabilities,
        "labels": answer.labels,
        "logits": answer.logits,
        "explanation": answer.explanation,
    }
    outputs, chunks = [], []
    for name, binary in parsed.outputs:
        arr = np.ascontiguousarray(tensors[name].numpy())
        integer = arr.dtype.kind in "iu"
        arr = arr.astype("<i8" if integer else "<f4", copy=False)
        out: dict[str, Any] = {
            "name": name,
            "datatype": "INT64" if integer else "FP32",
            "shape": list(arr.shape),
        }
        params: dict[str, Any] = {}
        if name == "explanation" and answer.explanation_spec is not None:
            params.update(answer.explanation_spec.to_dict())
        if binary:
            raw = arr.tobytes()
            params["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            out["data"] = arr.reshape(-1).tolist()
        if params:
            out["parameters"] = params
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": outputs}
    if parsed.request_id is not None:
        doc["id"] = parsed.request_id
    header = _json_bytes(doc)
    if not chunks:
        return header, "application/json", {}
    extra = {"Inference-Header-Content-Length": str(len(header))}
    return b"".join([header, *chunks]), "application/octet-stream", extra


# --- the service ------------------------------------------------------------------------


def default_model_name(victim: Victim) -> str:
    """The name in URLs: "<dataset>-<arch>" when both are known, else "victim"."""
    if victim.dataset and victim.arch:
        return f"{victim.dataset}-{victim.arch}"
    return "victim"


class Service:
    """One model behind the ledger: authorises, charges, answers, renders."""

    def __init__(
        self,
        responder: Responder,
        name: str,
        ledger: SQLiteLedger,
        limiter: RateLimiter | None,
        max_body_bytes: int,
        audit_images: bool,
    ):
        self.responder, self.name, self.ledger, self.limiter = responder, name, ledger, limiter
        self.max_body_bytes = int(max_body_bytes)
        self.audit_images = audit_images
        names = ["probabilities", "labels"]
        if responder.prediction == "logits":
            names.append("logits")
        if responder.explanation is not None:
            names.append("explanation")
        self.output_names = names

    # metadata

    def model_metadata(self) -> dict[str, Any]:
        c, h, w = self.responder.input_shape
        k = self.responder.num_classes
        spec = self.responder.explanation
        outputs = [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "labels", "datatype": "INT64", "shape": [-1]},
        ]
        if "logits" in self.output_names:
            outputs.append({"name": "logits", "datatype": "FP32", "shape": [-1, k]})
        if spec is not None:
            shape = [-1, k, c, h, w] if spec.target == "all" else [-1, c, h, w]
            outputs.append({"name": "explanation", "datatype": "FP32", "shape": shape})
        victim = self.responder.victim
        parameters: dict[str, Any] = {
            "prediction": self.responder.prediction,
            "allow_explanation_choice": self.responder.allow_explanation_choice,
            "arch": victim.arch or "",
            "dataset": victim.dataset or "",
        }
        if self.responder.top_k is not None:
            parameters["top_k"] = self.responder.top_k
        if spec is not None:
            parameters.update({f"explanation_{key}": v for key, v in spec.to_dict().items()})
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "pytorch",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, c, h, w]}],
            "outputs": outputs,
            "parameters": parameters,
        }

    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.name or version not in (None, "1"):
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            raise HTTPError(
                404,
                f"{what} not found; this server serves {self.name!r} (version 1)",
                "model_not_found",
            )

    # the request path

    def authorize(self, headers: Mapping[str, str]) -> Account:
        key = headers.get("x-api-key")
        auth = headers.get("authorization")
        if key is None and auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise HTTPError(
                    401,
                    "Authorization: expected 'Bearer KEY'",
                    "unauthorized",
                    {"WWW-Authenticate": "Bearer"},
                )
            key = token.strip()
        try:
            account = self.ledger.authenticate(key)
        except Unauthorized as err:
            raise HTTPError(401, str(err), "unauthorized", {"WWW-Authenticate": "Bearer"}) from None
        if self.limiter is not None:
            wait = self.limiter.acquire(account.id)
            if wait > 0:
                headers_out = {
                    "Retry-After": str(max(1, math.ceil(wait))),
                    **self.ledger.usage(account.id).headers(),
                }
                raise HTTPError(
                    429,
                    f"rate limit: at most {self.limiter.rate:g} requests/s per key; "
                    f"retry in {wait:.2f} s",
                    "rate_limited",
                    headers_out,
                    retry_after_s=round(wait, 3),
                )
        return account

    def execute(
        self,
        account: Account,
        endpoint: str,
        headers: Mapping[str, str],
        body: bytes,
        parse: Callable[[bytes], Parsed],
        render: Callable[[Answer, Parsed], tuple[bytes, str, dict[str, str]]],
    ) -> Response:
        """Parse, charge (or replay), answer, render; refund if answering fails."""
        parsed = parse(body)
        try:
            spec = self.responder.resolve_explanation(parsed.explanation)
        except ExplanationNotOffered as err:
            raise HTTPError(403, str(err), "explanation_not_offered") from None
        n = int(parsed.images.shape[0])
        idem_key = headers.get("idempotency-key")
        if idem_key is not None and not 0 < len(idem_key) <= 255:
            raise _bad("Idempotency-Key: expected 1 to 255 characters")
        body_hash = ""
        if idem_key is not None:
            # A replay must answer the same request: bind the key to endpoint and body.
            digest = hashlib.sha256(endpoint.encode() + b"\0")
            digest.update(headers.get("inference-header-content-length", "").encode() + b"\0")
            digest.update(body)
            body_hash = digest.hexdigest()
        images = parsed.images.numpy().astype("<f4").tobytes() if self.audit_images else None
        try:
            charge = self.ledger.charge(
                account.id,
                n,
                endpoint,
                idem_key=idem_key,
                body_hash=body_hash,
                images=images,
            )
        except BudgetExceeded as err:
            raise HTTPError(
                429,
                str(err),
                "budget_exceeded",
                err.usage.headers(),
                requested=n,
                **err.usage.to_dict(),
            ) from None
        except IdempotencyConflict as err:
            raise HTTPError(err.status, str(err), "idempotency_conflict") from None
        if isinstance(charge, StoredResponse):
            return self._replay(account, charge)
        try:
            answer = self.responder.answer(parsed.images, spec)
            content, content_type, extra = render(answer, parsed)
            # Storing the response for replays is part of serving it: if that fails, the
            # client gets an error, so the charge is given back and a retry runs afresh
            # (instead of meeting a request "still being served" until the row expires).
            self.ledger.finish(charge, 200, content_type, content, extra)
        except BaseException:
            self.ledger.refund(charge)
            raise
        return Response(content, 200, {**extra, **charge.usage.headers()}, content_type)

    def _replay(self, account: Account, stored: StoredResponse) -> Response:
        headers = {
            **stored.headers,
            **self.ledger.usage(account.id).headers(),
            "Idempotent-Replayed": "true",
        }
        return Response(stored.body, stored.status, headers, stored.content_type)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed, refused with 413 past `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise _bad("Content-Length: not a number")
        if int(length) > limit:
            await _drain(request, limit)
            raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, limit)
            raise _too_large(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPError(
            415,
            f"Content-Encoding {encoding!r} not supported; use gzip or deflate",
            "unsupported_encoding",
        )
    # Bound the decompressed size too, so a small compressed body cannot expand without limit.
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise _bad(f"body: not valid {encoding} data ({err})") from None
    if len(out) > limit:
        raise _too_large(limit)
    if not inflater.eof:
        raise _bad(f"body: truncated {encoding} data")
    return out


def _too_large(limit: int) -> HTTPError:
    return HTTPError(
        413,
        f"request body larger than {limit} bytes; send fewer images per request",
        "body_too_large",
        max_body_bytes=limit,
    )


async def _drain(request: Request, limit: int) -> None:
    """Read and drop a little more of an oversized body, so the client can read the 413
    instead of finding its connection reset mid-upload."""
    dropped = 0
    try:
        async for chunk in request.stream():
            dropped += len(chunk)
            if dropped > max(limit, 8 << 20):
                break
    except Exception:  # the client went away or the body was already read: nothing to do
        pass


# --- the app ----------------------------------------------------------------------------


def create_app(
    source: Victim | Responder | LocalOracle | Callable[[], Responder | LocalOracle],
    *,
    name: str | None = None,
    keys: Mapping[str, int | None] | Iterable[str] | None = None,
    db_path: str | os.PathLike = ":memory:",
    budget: int | None = None,
    rate_limit: float | None = None,
    rate_burst: float | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    prediction: str = "probabilities",
    top_k: int | None = None,
    explanation: Explanation | None = Explanation("gradient"),
    allow_explanation_choice: bool = True,
    defenses: Sequence[Defense] = (),
    audit_images: bool = False,
    seed: int = 0,
    idempotency_ttl_s: float = 24 * 3600.0,
) -> FastAPI:
    """The ASGI app serving one model.

    source: a Victim (answered with prediction, top_k, explanation, allow_explanation_choice,
    defenses, seed), or a Responder (or a LocalOracle with budget None, whose Responder is
    used; or a callable returning either) that answers as it is. keys: API key -> budget
    (None: `budget`), or an iterable of keys; None serves without auth, one shared account.
    budget: per key, None = unlimited. db_path: the SQLite ledger (":memory:" forgets counts
    on exit). rate_limit: requests/s per key (bursts of `rate_burst`, default
    max(1, rate)). audit_images: keep every queried image in the audit table.
    """
    responder = _responder(
        source,
        prediction=prediction,
        top_k=top_k,
        explanation=explanation,
        allow_explanation_choice=allow_explanation_choice,
        defenses=defenses,
        seed=seed,
    )
    name = name or default_model_name(responder.victim)
    if not name or "/" in name or ":" in name:
        raise ValueError(f"name: {name!r} cannot appear in a URL path segment")
    if int(max_body_bytes) < 1:
        raise ValueError(f"max_body_bytes: expected >= 1, got {max_body_bytes}")
    # Checked before the ledger is opened (and locked): a refused setting leaves it untouched.
    limiter = RateLimiter(rate_limit, rate_burst) if rate_limit is not None else None
    ledger = SQLiteLedger(
        db_path, keys=keys, default_budget=budget, idempotency_ttl_s=idempotency_ttl_s
    )
    service = Service(responder, name, ledger, limiter, max_body_bytes, audit_images)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # Closing releases the ledger's lock, so that the next server can take it over.
        ledger.close()

    app = FastAPI(
        title=f"megex: {name}",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.ledger = ledger
    _install_error_handlers(app)
    _add_v2_routes(app, service)
    _add_v1_routes(app, service)
    return app


def _responder(source, **settings) -> Responder:
    if isinstance(source, Victim):
        return Responder(source, **settings)
    if not isinstance(source, (Responder, LocalOracle)):
        source = source()
    if isinstance(source, LocalOracle):
        if source.budget != math.inf:
            raise ValueError(
                "source: the LocalOracle only answers here and must have budget=None; "
                "give the per-key budget to create_app"
            )
        source = source.responder
    if not isinstance(source, Responder):
        raise TypeError(
            f"source: expected a Victim, Responder or LocalOracle, got {type(source).__name__}"
        )
    return source


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, err: HTTPError) -> JSONResponse:
        content = {"error": err.message, "code": err.code, **err.extra}
        return JSONResponse(content, err.status, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = {
            404: f"no such endpoint: {request.method} {request.url.path}",
            405: f"method {request.method} not allowed on {request.url.path}",
        }
        text = message.get(err.status_code, str(err.detail))
        return JSONResponse(
            {"error": text, "code": "http_error"}, err.status_code, getattr(err, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"invalid request: {err.errors()}", "code": "invalid"}, 400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error", "code": "internal"}, 500)


async def _serve(service: Service, request: Request, endpoint: str, parse, render) -> Response:
    account = await run_in_threadpool(service.authorize, request.headers)
    try:
        body = await read_body(request, service.max_body_bytes)
        return await run_in_threadpool(
            service.execute, account, endpoint, request.headers, body, parse, render
        )
    except HTTPError as err:
        usage = await run_in_threadpool(service.ledger.usage, account.id)
        err.headers = {**usage.headers(), **err.headers}
        raise


async def _authorized_json(service: Service, request: Request, doc: Any) -> JSONResponse:
    account = await run_in_threadpool(service.authorize, request.headers)
    usage = await run_in_threadpool(service.ledger.usage, account.id)
    return JSONResponse(doc, headers=usage.headers())


def _add_v2_routes(app: FastAPI, service: Service) -> None:
    shape = service.responder.input_shape

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "megex", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str, version: str | None = None):
        service.check_model(name, version)
        return await _authorized_json(service, request, service.model_metadata())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> dict[str, Any]:
        service.check_model(name, version)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        service.check_model(name, version)
        default = service.responder.explanation
        header_length = request.headers.get("inference-header-content-length")

        def parse(body: bytes) -> Parsed:
            return parse_v2(body, header_length, shape, service.output_names, default)

        def render(answer: Answer, parsed: Parsed):
            return render_v2(answer, parsed, service.name)

        return await _serve(service, request, "v2/infer", parse, render)


def _add_v1_routes(app: FastAPI, service: Service) -> None:
    shape = service.responder.input_shape

    @app.get("/v1/models")
    async def list_models() -> dict[str, list[str]]:
        return {"models": [service.name]}

    @app.get("/v1/models/{name}")
    async def model_status(name: str) -> dict[str, Any]:
        service.check_model(name)
        return {"name": name, "ready": True}

    @app.post("/v1/models/{name}:predict")
    async def predict(request: Request, name: str) -> Response:
        service.check_model(name)
        default = service.responder.explanation
        return await _serve(
            service,
            request,
            "v1/predict",
            lambda body: parse_v1(body, shape, False, default),
            render_v1_predict,
        )

    @app.post("/v1/models/{name}:explain")
    async def explain(request: Request, name: str) -> Response:
        service.check_model(name)
        default = service.responder.explanation
        return await _serve(
            service,
            request,
            "v1/explain",
            lambda body: parse_v1(body, shape, True, default),
            render_v1_explain,
        )
