"""The Open Inference Protocol codec: what one side encodes, the other decodes unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megex import Explanation
from megex.oracle import Answer
from megex.serving.codec import (
    HEADER_LENGTH,
    WireError,
    decode_response,
    encode_request,
    join_message,
    split_message,
    tensor_from_wire,
    tensor_to_wire,
)

SHAPE = (1, 8, 8)


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tensors_round_trip_in_order(binary):
    floats = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    labels = np.array([7, 0, 2**40], dtype=np.int64)
    wire = [tensor_to_wire("a", floats, binary, {"note": "x"}), tensor_to_wire("b", labels, binary)]
    body, content_type, headers = join_message(
        {"outputs": [t for t, _ in wire]}, [r for _, r in wire if r]
    )
    assert content_type == ("application/octet-stream" if binary else "application/json")
    decoded = decode_response(body, headers.get(HEADER_LENGTH))
    assert list(decoded) == ["a", "b"]
    np.testing.assert_array_equal(decoded["a"][0], floats)
    np.testing.assert_array_equal(decoded["b"][0], labels)
    assert decoded["a"][0].dtype == np.float32 and decoded["b"][0].dtype == np.int64
    assert decoded["a"][1]["note"] == "x"
    assert decoded["a"][0].flags.writeable  # torch.from_numpy needs a writable array


def test_binary_offsets_and_sizes_are_checked():
    tensor, raw = tensor_to_wire("a", np.zeros((2, 3), np.float32), True)
    assert tensor_from_wire(tensor, b"\0" * 4 + raw, 4, "a")[1] == 24
    with pytest.raises(WireError, match="0 bytes sent, the tensors declare 24"):
        tensor_from_wire(tensor, raw, 24, "a")
    with pytest.raises(WireError, match="does not match shape"):
        tensor_from_wire({**tensor, "shape": [2, 2]}, raw, 0, "a")
    with pytest.raises(WireError, match="datatype 'FP64'"):
        tensor_from_wire({**tensor, "datatype": "FP64"}, raw, 0, "a")
    with pytest.raises(WireError, match="outside the body"):
        split_message(b"{}", "3")


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_client_request_is_what_the_server_parses(binary):
    pytest.importorskip("fastapi")
    from megex.serving.v2 import parse_v2

    images = _images(3)
    spec = Explanation("smoothgrad", target=2, sigma=0.2, samples=4)
    body, headers = encode_request(images, ["labels", "explanation"], spec.to_dict(), binary)
    names = ["probabilities", "labels", "explanation"]
    parsed = parse_v2(body, headers.get(HEADER_LENGTH), SHAPE, names, Explanation())
    assert torch.equal(parsed.images, torch.from_numpy(images))
    assert parsed.outputs == [("labels", binary), ("explanation", binary)]
    assert parsed.explanation == spec


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_server_response_is_what_the_client_decodes(binary):
    pytest.importorskip("fastapi")
    from megex.serving.parsing import Parsed
    from megex.serving.v2 import render_v2

    spec = Explanation("gradient", target="all")
    answer = Answer(
        probabilities=torch.softmax(torch.randn(2, 10), 1),
        labels=torch.tensor([3, 9]),
        explanation=torch.randn(2, 10, *SHAPE),
        explanation_spec=spec,
    )
    outputs = [("probabilities", binary), ("labels", not binary), ("explanation", binary)]
    parsed = Parsed(torch.zeros(2, *SHAPE), spec, outputs, "req-7")
    body, _, headers = render_v2(answer, parsed, "m")
    decoded = decode_response(body, headers.get(HEADER_LENGTH))
    assert torch.equal(torch.from_numpy(decoded["probabilities"][0]), answer.probabilities)
    assert torch.equal(torch.from_numpy(decoded["labels"][0]), answer.labels)
    assert torch.equal(torch.from_numpy(decoded["explanation"][0]), answer.explanation)
    params = {k: v for k, v in decoded["explanation"][1].items() if k != "binary_data_size"}
    assert Explanation.from_dict(params) == spec
