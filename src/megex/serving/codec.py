"""The Open Inference Protocol's wire format (KServe V2 / Triton), shared by the service
(:mod:`megex.serving.v2`) and its client (:mod:`megex.client`).

A message is a JSON document whose tensors carry ``name``, ``datatype``, ``shape`` and either
``data`` (the values, flattened in row-major order) or, with the binary tensor data
extension, ``parameters.binary_data_size``: the tensor's little-endian bytes then follow the
JSON, tensor after tensor, and the JSON's length goes in the
``Inference-Header-Content-Length`` header. Needs only numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "INPUT_NAME",
    "WireError",
    "decode_response",
    "declared_shape",
    "dump_json",
    "encode_request",
    "join_message",
    "load_json",
    "numeric_array",
    "split_message",
    "tensor_from_wire",
    "tensor_to_wire",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
# The one input of a megex model: float32 images in [0, 1], shape (N, C, H, W).
INPUT_NAME = "images"
DATATYPES = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}
# Bounds of a declared shape that numpy can hold (it allows 64 dimensions and sizes below
# 2**63); megex's tensors have at most 5 dimensions.
MAX_DIMS = 16
MAX_DIM_SIZE = 2**31 - 1


class WireError(ValueError):
    """A message that does not follow the format; code: the reason, for machines."""

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


# --- JSON -------------------------------------------------------------------------------


def load_json(data: bytes, what: str = "body", max_values: int | None = None) -> dict[str, Any]:
    """A JSON object, or WireError. max_values: refuse, before parsing, a document that may
    hold more values than this (counted as its commas, plus one), since each parsed number
    costs tens of bytes of memory."""
    if not data:
        raise WireError(f"{what}: empty; send a JSON object")
    if max_values is not None:
        values = data.count(b",") + 1
        if values > max_values:
            raise WireError(
                f"{what}: about {values} JSON values, more than the {max_values} allowed; "
                "send fewer images per request, or the images as binary tensor data",
                "too_many_values",
            )
    try:
        doc = json.loads(data)
    except RecursionError:
        raise WireError(f"{what}: JSON nested too deeply") from None
    except ValueError as err:  # invalid JSON or text, or an integer too long to convert
        raise WireError(f"{what}: not valid JSON ({_first_line(err)})") from None
    if not isinstance(doc, dict):
        raise WireError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def dump_json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def numeric_array(obj: Any, what: str, dtype: np.dtype | str = "<f4") -> np.ndarray:
    """A nested list of numbers as an array of `dtype`, or WireError (ragged lists,
    strings, null, booleans)."""
    dtype = np.dtype(dtype)
    try:
        arr = np.array(obj)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise WireError(f"{what}: not a regular nested list of numbers ({err})") from None
    if arr.dtype.kind not in "iuf":
        # Every float tensor megex receives holds images.
        expected = "float32 in [0, 1]" if dtype.kind == "f" else dtype.name
        raise WireError(
            f"{what}: expected numbers ({expected}), got {_kind_name(arr)}", "invalid_dtype"
        )
    with np.errstate(over="ignore"):
        return arr.astype(dtype)


def _kind_name(arr: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes", "O": "mixed or null values"}.get(
        arr.dtype.kind, str(arr.dtype)
    )


# --- messages and tensors ---------------------------------------------------------------


def split_message(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a message, given its header-length header."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise WireError(f"{HEADER_LENGTH}: not an integer") from None
    if not 0 < length <= len(body):
        raise WireError(f"{HEADER_LENGTH}: {length} is outside the body's {len(body)} bytes")
    return body[:length], body[length:]


def join_message(doc: Mapping[str, Any], chunks: Sequence[bytes]) -> tuple[bytes, str, dict]:
    """(body, content type, extra headers) of a message whose binary tensors are `chunks`."""
    header = dump_json(doc)
    if not chunks:
        return header, "application/json", {}
    return (
        b"".join([header, *chunks]),
        "application/octet-stream",
        {HEADER_LENGTH: str(len(header))},
    )


def tensor_to_wire(
    name: str, values: np.ndarray, binary: bool, parameters: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], bytes]:
    """A tensor's JSON description and its binary data (empty unless `binary`).
    Integers are sent as INT64, every other number as FP32."""
    arr = np.ascontiguousarray(values)
    integer = arr.dtype.kind in "iu"
    arr = arr.astype(DATATYPES["INT64" if integer else "FP32"], copy=False)
    tensor: dict[str, Any] = {
        "name": name,
        "datatype": "INT64" if integer else "FP32",
        "shape": list(arr.shape),
    }
    params = dict(parameters or {})
    raw = b""
    if binary:
        raw = arr.tobytes()
        params["binary_data_size"] = len(raw)
    else:
        tensor["data"] = arr.reshape(-1).tolist()
    if params:
        tensor["parameters"] = params
    return tensor, raw


def tensor_from_wire(
    tensor: Mapping[str, Any], binary: bytes, offset: int, what: str
) -> tuple[np.ndarray, int]:
    """A tensor's values (a writable array) and the number of bytes of `binary` it used,
    reading from `offset`; WireError when the description or the data do not agree."""
    datatype = tensor.get("datatype")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise WireError(
            f"{what}: datatype {_short(datatype)} not one of {', '.join(DATATYPES)}",
            "invalid_dtype",
        )
    shape = declared_shape(tensor, what)
    size = math.prod(shape)
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise WireError(f"{what}.parameters: expected a JSON object")
    if "shared_memory_region" in params:
        raise WireError("shared memory inputs are not supported; send the data in the request")
    if "binary_data_size" in params:
        nbytes = params["binary_data_size"]
        if "data" in tensor:
            raise WireError(f"{what}: give either 'data' or binary_data_size, not both")
        if not isinstance(nbytes, int) or nbytes != dtype.itemsize * size:
            raise WireError(
                f"{what}: binary_data_size {_short(nbytes)} does not match shape {shape} "
                f"of {tensor['datatype']} ({dtype.itemsize * size} bytes)"
            )
        if offset + nbytes > len(binary):
            raise WireError(
                f"binary data: {len(binary) - offset} bytes sent, the tensors declare {nbytes}"
            )
        # A copy: tensors over a read-only buffer are undefined behaviour in torch.
        arr = np.frombuffer(binary, dtype=dtype, count=size, offset=offset).reshape(shape).copy()
        return arr, nbytes
    if "data" not in tensor:
        raise WireError(f"{what}: no 'data' and no binary_data_size")
    arr = numeric_array(tensor["data"], f"{what}.data", dtype).reshape(-1)
    if arr.size != size:
        raise WireError(f"{what}.data: {arr.size} values, shape {shape} needs {size}")
    return arr.reshape(shape), 0


def declared_shape(tensor: Mapping[str, Any], what: str) -> list[int]:
    """A tensor's declared shape, or WireError: a list of 1 to MAX_DIMS integers in
    [0, MAX_DIM_SIZE]."""
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not 0 < len(shape) <= MAX_DIMS
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM_SIZE for s in shape
        )
    ):
        raise WireError(
            f"{what}.shape: expected a list of 1 to {MAX_DIMS} integers in "
            f"[0, {MAX_DIM_SIZE}], got {_short(shape)}"
        )
    return shape


def _short(value: Any) -> str:
    """`value` for an error message, cut short: it may be anything a client sent."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- the client's side ------------------------------------------------------------------


def encode_request(
    images: np.ndarray, outputs: Sequence[str], parameters: Mapping[str, Any], binary: bool
) -> tuple[bytes, dict[str, str]]:
    """An inference request for `images`, asking for `outputs` by name: (body, headers)."""
    tensor, raw = tensor_to_wire(INPUT_NAME, images, binary)
    doc: dict[str, Any] = {
        "inputs": [tensor],
        "outputs": [{"name": n, "parameters": {"binary_data": binary}} for n in outputs],
    }
    if parameters:
        doc["parameters"] = dict(parameters)
    body, content_type, headers = join_message(doc, [raw] if binary else [])
    return body, {"Content-Type": content_type, **headers}


def decode_response(
    content: bytes, header_length: str | None
) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """The output tensors of an inference response: name -> (values, parameters)."""
    header, binary = split_message(content, header_length)
    doc = load_json(header, "inference response")
    outputs = doc.get("outputs")
    if not isinstance(outputs, list):
        raise WireError("inference response: no list of outputs")
    tensors, offset = {}, 0
    for out in outputs:
        name = out.get("name") if isinstance(out, dict) else None
        if not isinstance(name, str):
            raise WireError("inference response: an output without a name")
        values, used = tensor_from_wire(out, binary, offset, f"outputs.{name}")
        offset += used
        tensors[name] = (values, out.get("parameters") or {})
    return tensors
