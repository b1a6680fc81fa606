"""RemoteOracle: the Oracle protocol over HTTP, against a megex server (or any Open
Inference Protocol server that names its tensors the same way).

The server counts; the client reads the counts from the ``X-Queries-*`` headers of every
response. One logical query keeps one ``Idempotency-Key`` across its retries, so a retry after
a lost response is never charged twice. This module needs httpx (the ``server`` extra).
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import torch

from .explain import Explanation
from .ledger import BudgetExceeded, Usage
from .oracle import Answer, ExplanationNotOffered, InvalidQuery, validate_images
from .serving.codec import HEADER_LENGTH, decode_response, encode_request

__all__ = ["RemoteOracle", "ServiceError"]

_MODEL_PATH = re.compile(r"^(?P<root>.*?)/v[12]/models/(?P<name>[^/:]+)")


class ServiceError(RuntimeError):
    """The service could not answer: unreachable, unauthorised, or an unexpected reply."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class RemoteOracle:
    """An Oracle whose answers come from a megex server over the Open Inference Protocol.

    url: the server root (``http://host:8080``; the server must serve exactly one model) or a
    model URL (``http://host:8080/v2/models/NAME``; a V1 model URL works too).
    protocol: "json", "binary" (binary tensor data extension) or "auto" (binary for batches
    of more than `binary_threshold` images, unless the server's metadata lists extensions
    without it, as MLServer's does). retries: extra attempts after a connection
    error or a 5xx, waiting backoff * 2**attempt seconds; a 429 rate limit (of requests or
    of compute) waits for its Retry-After and does not use up retries.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        protocol: str = "auto",
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        binary_threshold: int = 16,
        max_rate_limit_waits: int = 100,
    ):
        if protocol not in ("auto", "json", "binary"):
            raise ValueError(f"protocol: expected 'auto', 'json' or 'binary', got {protocol!r}")
        if int(retries) < 0 or not float(backoff) >= 0:
            raise ValueError("retries and backoff: expected >= 0")
        self.protocol = protocol
        self.retries, self.backoff = int(retries), float(backoff)
        self.binary_threshold = int(binary_threshold)
        self.max_rate_limit_waits = int(max_rate_limit_waits)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._lock = threading.Lock()
        self._used = 0
        self._budget: int | float = math.inf
        self.root, name = _split_url(url)
        try:
            self.name = name or self._only_model()
            self.metadata = self._json("GET", f"/v2/models/{self.name}")
            self._read_metadata(self.metadata)
            self._binary_offered = protocol != "auto" or self._server_offers_binary()
        except BaseException:
            self._http.close()
            raise

    # --- the Oracle protocol ----------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def queries_used(self) -> int:
        return self._used

    @property
    def offers_explanation(self) -> bool:
        """Whether the service lists an explanation among its outputs."""
        return self._offers_explanation

    @property
    def budget(self) -> int | float:
        return self._budget

    @property
    def remaining(self) -> int | float:
        return self._budget - self._used

    def query(self, x: Any, explanation: Explanation | bool | None = None) -> Answer:
        """Answer a batch of images; the server charges one query per image."""
        images = validate_images(x, self.input_shape)
        outputs = ["probabilities", "labels"] + (["logits"] if self._has_logits else [])
        parameters: dict[str, Any] = {}
        if explanation is not None and explanation is not False:
            if not self._offers_explanation:
                raise ExplanationNotOffered("explanation: this service returns no explanations")
            if isinstance(explanation, Explanation):
                parameters = explanation.to_dict()
            elif explanation is not True:
                raise ExplanationNotOffered(
                    "explanation: expected None, True or an Explanation, "
                    f"got {type(explanation).__name__}"
                )
            outputs.append("explanation")
        binary = self.protocol == "binary" or (
            self.protocol == "auto"
            and self._binary_offered
            and images.shape[0] > self.binary_threshold
        )
        body, headers = encode_request(images.numpy(), outputs, parameters, binary)
        response = self._call(
            "POST", f"/v2/models/{self.name}/infer", content=body, headers=headers, idempotent=True
        )
        try:
            tensors = decode_response(response.content, response.headers.get(HEADER_LENGTH))
        except (ValueError, KeyError, TypeError) as err:
            raise ServiceError(f"unexpected inference response: {err!r}") from None
        return self._answer(tensors)

    # --- helpers ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read the counts (and metadata) from the server."""
        self.metadata = self._json("GET", f"/v2/models/{self.name}")
        self._read_metadata(self.metadata)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteOracle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteOracle({self.root}/v2/models/{self.name}, used={self._used})"

    def _only_model(self) -> str:
        models = self._json("GET", "/v1/models").get("models") or []
        if len(models) != 1:
            raise ServiceError(
                f"{self.root} serves {len(models)} models ({', '.join(models)}); "
                "give the model URL, e.g. .../v2/models/NAME"
            )
        return str(models[0])

    def _server_offers_binary(self) -> bool:
        """Whether the server's metadata (GET /v2) lists the binary tensor data extension;
        a server that lists its extensions without it (MLServer) gets JSON. A server whose
        metadata cannot be read is assumed to offer it."""
        try:
            doc = self._json("GET", "/v2")
        except ServiceError:
            return True
        extensions = doc.get("extensions") if isinstance(doc, dict) else None
        return not isinstance(extensions, list) or "binary_tensor_data" in extensions

    def _read_metadata(self, meta: dict[str, Any]) -> None:
        try:
            (tensor,) = meta["inputs"]
            self._input_name = tensor["name"]
            self._input_shape = tuple(int(s) for s in tensor["shape"][1:])
            outputs = {o["name"]: o for o in meta["outputs"]}
            self._num_classes = int(outputs["probabilities"]["shape"][-1])
        except (KeyError, ValueError, TypeError, IndexError) as err:
            raise ServiceError(f"unexpected model metadata from {self.root}: {err!r}") from None
        self._has_logits = "logits" in outputs
        self._offers_explanation = "explanation" in outputs
        parameters = meta.get("parameters") or {}
        self._prediction = str(parameters.get("prediction", "probabilities"))
        # A server that counts in its metadata rather than in headers (the MLServer runtime):
        # the queries answered before this client's first, so that they are not its own.
        used = parameters.get("queries_used")
        if isinstance(used, int) and not isinstance(used, bool):
            self._used = max(self._used, used)

    def _answer(self, tensors: dict[str, tuple[Any, dict[str, Any]]]) -> Answer:
        def get(name: str) -> torch.Tensor | None:
            return torch.from_numpy(tensors[name][0]) if name in tensors else None

        spec = None
        if "explanation" in tensors:
            params = {k: v for k, v in tensors["explanation"][1].items() if k != "binary_data_size"}
            try:
                spec = Explanation.from_dict(params)
            except (TypeError, ValueError) as err:
                raise ServiceError(
                    f"the service described its explanation as {params!r}, which is not one "
                    f"megex knows ({err})"
                ) from None
        return Answer(
            probabilities=get("probabilities"),
            labels=get("labels"),
            logits=get("logits"),
            explanation=get("explanation"),
            explanation_spec=spec,
            prediction=self._prediction,
        )

    def _json(self, method: str, path: str) -> dict[str, Any]:
        response = self._call(method, path)
        try:
            return response.json()
        except ValueError:
            raise ServiceError(f"{method} {path}: the reply is not JSON") from None

    def _call(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        idempotent: bool = False,
    ) -> httpx.Response:
        """One logical request: retried on connection errors, 5xx and 409 (the same
        idempotent request still in progress), always with the same Idempotency-Key."""
        headers = dict(headers or {})
        if idempotent:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        url = self.root + path
        attempt = waits = 0
        while True:
            try:
                response = self._http.request(method, url, content=content, headers=headers)
            except httpx.TransportError as err:
                if attempt >= self.retries:
                    raise ServiceError(
                        f"{method} {url}: no answer after {attempt + 1} attempts ({err!r})"
                    ) from err
                time.sleep(self.backoff * 2**attempt)
                attempt += 1
                continue
            self._read_usage(response.headers)
            status = response.status_code
            if status == 409 and waits < self.max_rate_limit_waits:
                # The same request is still being computed (an earlier attempt timed out):
                # wait for it under the same idempotency key rather than lose a paid answer.
                waits += 1
                time.sleep(min(5.0, self.backoff * 2 ** min(waits, 5)))
                continue
            if status >= 500 and attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
                attempt += 1
                continue
            if status == 429 and _error(response)[1] in ("rate_limited", "compute_rate_limited"):
                if waits < self.max_rate_limit_waits:
                    waits += 1
                    time.sleep(_retry_after(response))
                    continue
            if status >= 400:
                _raise_for(response, method, url)
            return response

    def _read_usage(self, headers: httpx.Headers) -> None:
        usage = Usage.from_headers(headers)
        if usage is None:
            return
        with self._lock:
            # Answers to concurrent requests can arrive out of order; counts only grow
            # (refunds aside), so keep the largest seen.
            self._used = max(self._used, usage.used)
            self._budget = math.inf if usage.budget is None else usage.budget


def _split_url(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url: expected http(s)://host[:port][/v2/models/NAME], got {url!r}")
    path = parts.path.rstrip("/")
    match = _MODEL_PATH.match(path)
    name = None
    if match:
        path, name = match["root"], match["name"]
    root = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    return root, name


def _error(response: httpx.Response) -> tuple[str, str | None, dict[str, Any]]:
    try:
        doc = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase, None, {}
    if not isinstance(doc, dict):
        return str(doc)[:200], None, {}
    return str(doc.get("error", doc)), doc.get("code"), doc


def _retry_after(response: httpx.Response) -> float:
    _, _, doc = _error(response)
    wait = doc.get("retry_after_s")
    if wait is None:
        try:
            wait = float(response.headers.get("retry-after", "1"))
        except ValueError:
            wait = 1.0
    return max(0.0, min(float(wait), 60.0))


def _raise_for(response: httpx.Response, method: str, url: str) -> None:
    message, code, doc = _error(response)
    status = response.status_code
    if status == 429 and code == "budget_exceeded":
        raise BudgetExceeded(int(doc.get("requested", 0)), Usage.from_dict(doc))
    if code in ("explanation_not_offered", "unknown_target"):
        # As LocalOracle raises them: the service does not return this explanation.
        raise ExplanationNotOffered(message)
    if status in (400, 413, 422) and code != "idempotency_conflict":
        raise InvalidQuery(message)
    raise ServiceError(f"{method} {url}: HTTP {status}: {message}", status, code)
