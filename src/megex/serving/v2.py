"""Open Inference Protocol routes (KServe V2 / Triton): health, metadata and
``POST /v2/models/{name}/infer`` in JSON or with the binary tensor data extension.

Input ``images`` (FP32, [-1, C, H, W]); outputs ``probabilities``, ``labels``, ``logits`` (in
"logits" mode only) and ``explanation``, which is computed only when a request names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from .. import __version__
from ..explain import Explanation
from ..oracle import Answer
from .codec import (
    HEADER_LENGTH,
    INPUT_NAME,
    WireError,
    declared_shape,
    join_message,
    load_json,
    split_message,
    tensor_from_wire,
    tensor_to_wire,
)
from .errors import HTTPError
from .parsing import Afford, Parsed, explanation_from_parameters, validated_images
from .service import Service

__all__ = ["add_routes", "metadata_document", "parse_v2", "render_v2"]

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


def parse_v2(
    body: bytes,
    header_length: str | None,
    input_shape: Sequence[int],
    output_names: Sequence[str],
    default: Explanation | None,
    afford: Afford | None = None,
    max_values: int | None = None,
    num_classes: int | None = None,
) -> Parsed:
    """An inference request, JSON or with binary tensor data. afford: called with the
    number of images the input declares, before its data are decoded. max_values: the most
    values the JSON part may hold. num_classes: the model's, to check a target class."""
    header, binary = split_message(body, header_length)
    what = "inference header" if header_length is not None else "body"
    doc = load_json(header, what, max_values)
    tensor, shape = _v2_input(doc.get("inputs"), input_shape)
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise WireError("parameters: expected a JSON object")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise WireError("parameters.binary_data_output: expected true or false")
    outputs = _v2_outputs(doc.get("outputs"), output_names, binary_default)
    wants_explanation = any(name == "explanation" for name, _ in outputs)
    requested = explanation_from_parameters(
        parameters, default, ignore=_PROTOCOL_PARAMETERS, num_classes=num_classes
    )
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise WireError("id: expected a string")

    if afford is not None:
        afford(shape[0])
    arr, used = tensor_from_wire(tensor, binary, 0, f"inputs.{INPUT_NAME}")
    if used != len(binary):
        raise WireError(f"binary data: {len(binary) - used} bytes after the tensors are not used")
    images = validated_images(arr, input_shape, INPUT_NAME)
    return Parsed(images, requested if wants_explanation else None, outputs, request_id)


def _v2_input(inputs: Any, input_shape: Sequence[int]) -> tuple[dict[str, Any], list[int]]:
    """The request's one input tensor (checked: name, datatype, shape) and its shape."""
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise WireError(f"inputs: expected exactly one tensor named {INPUT_NAME!r}")
    tensor = inputs[0]
    name = tensor.get("name")
    if name != INPUT_NAME:
        raise WireError(
            f"inputs: unknown tensor {str(name)[:80]!r}; this model takes {INPUT_NAME!r}"
        )
    if tensor.get("datatype") != "FP32":
        raise WireError(
            f"inputs.{INPUT_NAME}: datatype {str(tensor.get('datatype'))[:20]!r}, expected "
            "'FP32' (float32 images in [0, 1])",
            "invalid_dtype",
        )
    shape = declared_shape(tensor, f"inputs.{INPUT_NAME}")
    expected = [-1, *input_shape]
    if len(shape) != 4 or shape[1:] != list(input_shape) or shape[0] < 1:
        raise WireError(
            f"inputs.{INPUT_NAME}.shape: {shape} does not match {expected} (N >= 1 images)",
            "invalid_images",
        )
    return tensor, shape


def _v2_outputs(
    requested: Any, output_names: Sequence[str], binary_default: bool
) -> list[tuple[str, bool]]:
    if requested is None:
        # Without "outputs" every output is returned except the explanation, which costs
        # far more than a prediction and must be asked for by name.
        return [(name, binary_default) for name in output_names if name != "explanation"]
    if not isinstance(requested, list) or not requested:
        raise WireError("outputs: expected a non-empty list of {'name': ...}")
    outputs: list[tuple[str, bool]] = []
    for item in requested:
        name = item.get("name") if isinstance(item, dict) else None
        if name == "explanation" and name not in output_names:
            raise HTTPError(
                403, "explanation: this model returns no explanations", "explanation_not_offered"
            )
        if name not in output_names:
            raise WireError(
                f"outputs: unknown {str(name)[:80]!r}; this model has {', '.join(output_names)}"
            )
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise WireError(f"outputs.{name}.parameters: expected a JSON object")
        if params.get("classification"):
            raise WireError("the classification extension is not supported; read 'probabilities'")
        if "shared_memory_region" in params:
            raise WireError("shared memory outputs are not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise WireError(f"outputs.{name}.parameters.binary_data: expected true or false")
        outputs.append((name, binary))
    return outputs


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
        spec = answer.explanation_spec
        params = spec.to_dict() if name == "explanation" and spec is not None else None
        out, raw = tensor_to_wire(name, tensors[name].numpy(), binary, params)
        outputs.append(out)
        if binary:
            chunks.append(raw)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": outputs}
    if parsed.request_id is not None:
        doc["id"] = parsed.request_id
    return join_message(doc, chunks)


def metadata_document(service: Service) -> dict[str, Any]:
    """The model's metadata: its tensors, and in `parameters` what it returns (and its
    architecture and dataset only where the operator chose to expose them)."""
    responder = service.responder
    c, h, w = responder.input_shape
    k = responder.num_classes
    spec = responder.explanation
    outputs = [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
        {"name": "labels", "datatype": "INT64", "shape": [-1]},
    ]
    if "logits" in service.output_names:
        outputs.append({"name": "logits", "datatype": "FP32", "shape": [-1, k]})
    if spec is not None:
        shape = [-1, k, c, h, w] if spec.target == "all" else [-1, c, h, w]
        outputs.append({"name": "explanation", "datatype": "FP32", "shape": shape})
    parameters: dict[str, Any] = {
        "prediction": responder.prediction,
        "allow_explanation_choice": responder.allow_explanation_choice,
    }
    if service.expose_architecture:
        # A Victim states both; another module given to a Responder may state neither.
        parameters["arch"] = getattr(responder.victim, "arch", None) or ""
        parameters["dataset"] = getattr(responder.victim, "dataset", None) or ""
    if responder.top_k is not None:
        parameters["top_k"] = responder.top_k
    if spec is not None:
        parameters.update({f"explanation_{key}": v for key, v in spec.to_dict().items()})
    return {
        "name": service.name,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, c, h, w]}],
        "outputs": outputs,
        "parameters": parameters,
    }


def add_routes(app: FastAPI, service: Service) -> None:
    responder = service.responder
    max_values = service.limits.max_json_values

    # Health and the server's own metadata say nothing about the model; everything under
    # /v2/models needs a key, so that a stranger cannot even confirm a model's name.
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
        return await service.authorized_json(
            request, (name, version), lambda: metadata_document(service)
        )

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str | None = None):
        return await service.authorized_json(
            request, (name, version), lambda: {"name": name, "ready": True}
        )

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        header_length = request.headers.get(HEADER_LENGTH)

        def parse(body: bytes, afford: Afford) -> Parsed:
            return parse_v2(
                body,
                header_length,
                responder.input_shape,
                service.output_names,
                responder.explanation,
                afford,
                max_values,
                responder.num_classes,
            )

        def render(answer: Answer, parsed: Parsed) -> tuple[bytes, str, dict[str, str]]:
            return render_v2(answer, parsed, service.name)

        return await service.serve(request, "v2/infer", (name, version), parse, render)
