"""RemoteOracle: the Oracle protocol over the Open Inference Protocol (V2), against a megex
server or any V2 server that names its tensors the same way (KServe, MLServer with megex's
runtime)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..explain import Explanation
from ..oracle import Answer, ExplanationNotOffered, validate_images
from ..serving.codec import HEADER_LENGTH, decode_response, encode_request
from .transport import ServiceClient, ServiceError, requested_parameters

__all__ = ["ENCODINGS", "RemoteOracle"]

ENCODINGS = ("auto", "json", "binary")


class RemoteOracle(ServiceClient):
    """An Oracle whose answers come from a server over the Open Inference Protocol (V2):
    ``GET /v2/models/NAME`` (the input's shape, the outputs, the prediction mode) and
    ``POST /v2/models/NAME/infer``.

    url: the server root (``http://host:8080``; the server must serve exactly one model) or a
    model URL (``http://host:8080/v2/models/NAME``; a V1 model URL names the model too).
    encoding: "json", "binary" (the binary tensor data extension) or "auto" (binary for
    batches of more than `binary_threshold` images, unless the server's metadata lists
    extensions without it, as MLServer's does; KServe accepts binary without listing it).
    protocol: "v2", the one this client speaks; "json", "binary" and "auto" are read as
    `encoding` (its earlier name). Retries, counts and refusals: :class:`ServiceClient`.
    To speak KServe V1, or to let the server say which, use :func:`megex.client.connect`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        encoding: str = "auto",
        protocol: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.25,
        binary_threshold: int = 16,
        max_rate_limit_waits: int = 100,
    ):
        encoding = _encoding(encoding, protocol)
        super().__init__(
            url,
            api_key,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_rate_limit_waits=max_rate_limit_waits,
        )
        self.protocol, self.encoding = "v2", encoding
        self.binary_threshold = int(binary_threshold)
        try:
            self.name = self.name or self.only_model()
            self.metadata = self.get_json(f"/v2/models/{self.name}")
            self._read_metadata(self.metadata)
            self._binary_offered = encoding != "auto" or self._server_offers_binary()
        except BaseException:
            self.close()
            raise

    # --- the Oracle protocol ----------------------------------------------------------------

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def offers_explanation(self) -> bool:
        """Whether the service lists an explanation among its outputs."""
        return self._offers_explanation

    def query(self, x: Any, explanation: Explanation | bool | None = None) -> Answer:
        """Answer a batch of images; the server charges one query per image."""
        images = validate_images(x, self.input_shape)
        outputs = ["probabilities", "labels"] + (["logits"] if self._has_logits else [])
        parameters: dict[str, Any] = {}
        if explanation is not None and explanation is not False:
            if not self._offers_explanation:
                raise ExplanationNotOffered("explanation: this service returns no explanations")
            parameters = requested_parameters(explanation)
            outputs.append("explanation")
        binary = self.encoding == "binary" or (
            self.encoding == "auto"
            and self._binary_offered
            and images.shape[0] > self.binary_threshold
        )
        body, headers = encode_request(images.numpy(), outputs, parameters, binary)
        response = self.call(
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
        self.metadata = self.get_json(f"/v2/models/{self.name}")
        self._read_metadata(self.metadata)

    def check_shape(self, input_shape: Sequence[int] | None, num_classes: int | None) -> None:
        """ValueError where a given input shape or number of classes is not the metadata's."""
        if input_shape is not None and tuple(int(s) for s in input_shape) != self.input_shape:
            raise ValueError(
                f"input_shape: {tuple(input_shape)} given, but the service's metadata says "
                f"{self.input_shape}"
            )
        if num_classes is not None and int(num_classes) != self.num_classes:
            raise ValueError(
                f"num_classes: {num_classes} given, but the service's metadata says "
                f"{self.num_classes}"
            )

    def __repr__(self) -> str:
        return f"RemoteOracle({self.root}/v2/models/{self.name}, used={self._used})"

    def _server_offers_binary(self) -> bool:
        """Whether the server's metadata (GET /v2) lists the binary tensor data extension;
        a server that lists its extensions without it (MLServer) gets JSON. A server whose
        metadata cannot be read is assumed to offer it."""
        try:
            doc = self.get_json("/v2")
        except ServiceError:
            return True
        extensions = doc.get("extensions")
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
        # A server that counts in its metadata rather than in headers (the MLServer runtime).
        self.count_from(parameters.get("queries_used"), parameters.get("query_budget"))

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


def _encoding(encoding: str, protocol: str | None) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding: expected 'auto', 'json' or 'binary', got {encoding!r}")
    if protocol is None or protocol == "v2":
        return encoding
    if protocol == "v1":
        raise ValueError(
            "protocol: RemoteOracle speaks the Open Inference Protocol (V2); for KServe V1 use "
            "megex.client.connect(url, protocol='v1', input_shape=...)"
        )
    if protocol not in ENCODINGS:
        raise ValueError(f"protocol: expected 'v2' (or an encoding), got {protocol!r}")
    if encoding != "auto" and encoding != protocol:
        raise ValueError(f"protocol {protocol!r} and encoding {encoding!r}: give one encoding")
    return protocol
