"""Fuzzing the service over a real uvicorn server on a loopback port: requests built from
valid ones with any part replaced by arbitrary JSON, bytes or headers never get a 5xx, and
every refusal is a JSON document with an error code.

The number of examples is fixed and the examples are derived from the test's name, so the
test takes the same few seconds on every run."""

from __future__ import annotations

import json
import math
import re
import string

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_support import ServerThread, images, tiny_victim  # noqa: E402

from megex.serving import create_app  # noqa: E402

torch.set_num_threads(1)

NAME = "model"
KEY = "fuzz-key"
PATHS = [
    f"/v1/models/{NAME}:predict",
    f"/v1/models/{NAME}:explain",
    f"/v2/models/{NAME}/infer",
    f"/v2/models/{NAME}/versions/1/infer",
]
EXAMPLES = 150

# Any JSON value, with the numbers that break parsers: huge integers, floats at the edges.
numbers = st.one_of(
    st.integers(-(10**6), 10**6),
    st.sampled_from([0, 1, -1, 2**31, 2**63, 10**30, 10**400, 1e308, 1e-308, 0.5, 1.5]),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
# Shapes that once broke the parser (65 dimensions: numpy allows 64; sizes past numpy's)
# and ones that are merely wrong.
SPECIAL_SHAPES = [[1] * 65, [1] * 64, [0, 10**30], [10**30, 0], [2**63], [0, 1, 8, 8], [1, 64]]
shapes = st.one_of(
    st.sampled_from(SPECIAL_SHAPES),
    st.sampled_from(SPECIAL_SHAPES),
    st.lists(st.integers(-2, 10), max_size=6),
    json_values,
)
explanation_parameters = st.dictionaries(
    st.sampled_from(
        ["method", "target", "output", "sigma", "samples", "steps", "baseline", "noiseSigma",
         "noisySampleCount", "stepCount", "binary_data_output", "priority", "other"]
    ),
    st.one_of(
        st.sampled_from(["gradient", "smoothgrad", "integrated_gradients", "input_x_gradient"]),
        st.sampled_from(["predicted", "all", "logit", "probability", "3", "-1"]),
        numbers,
        json_values,
    ),
    max_size=3,
)  # fmt: skip
OUTPUT_NAMES = ["probabilities", "labels", "explanation"]


def _size(shape) -> int | None:
    """The number of values `shape` declares, if it is a small valid shape."""
    if isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape):
        size = math.prod(shape)
        return size if size <= 4096 else None
    return None


@st.composite
def v2_message(draw) -> tuple[bytes, dict[str, str]]:
    """A valid inference request (JSON or binary) with one to three of its parts replaced;
    the data follow a replaced shape three times in four, to reach the checks behind it."""
    binary = draw(st.booleans())
    tensor: dict = {"name": "images", "datatype": "FP32", "shape": [2, 1, 8, 8]}
    doc: dict = {"inputs": [tensor], "outputs": [{"name": n} for n in OUTPUT_NAMES[:2]]}
    # Parts to replace; the shape most often, as the checks behind it are the deepest.
    sites = draw(
        st.sets(st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]), min_size=1, max_size=3)
    )
    if 0 in sites:
        tensor["shape"] = draw(shapes)
    size = _size(tensor["shape"])
    values = images(2).reshape(-1).tolist()
    if size is not None and size != 128 and draw(st.integers(0, 3)) < 3:
        values = [0.5] * size
    raw = np.asarray(values, dtype="<f4").tobytes() if binary else b""
    if binary:
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = values
    if 1 in sites:
        tensor["name"] = draw(st.just("x") | json_values)
    if 2 in sites:
        tensor["datatype"] = draw(st.sampled_from(["INT64", "FP64", "BYTES"]) | json_values)
    if 3 in sites:
        if binary:
            tensor["parameters"]["binary_data_size"] = draw(numbers | json_values)
        else:
            tensor["data"] = draw(st.lists(numbers, max_size=8) | json_values)
    if 4 in sites:
        raw = draw(st.binary(max_size=64))
    if 5 in sites:
        doc["inputs"] = draw(st.lists(json_values, max_size=2) | json_values)
    if 6 in sites:
        item = st.fixed_dictionaries(
            {"name": st.sampled_from([*OUTPUT_NAMES, "logits"]) | json_values},
            optional={"parameters": st.dictionaries(st.just("binary_data"), json_values)},
        )
        doc["outputs"] = draw(st.lists(item, max_size=3) | json_values)
    if 7 in sites:
        doc["parameters"] = draw(explanation_parameters | json_values)
    if 8 in sites:
        doc["id"] = draw(json_values)
    header = json.dumps(doc).encode()
    if not binary:
        return header, {}
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


@st.composite
def v1_message(draw) -> tuple[bytes, dict[str, str]]:
    """A valid Vertex AI request with one to three of its parts replaced."""
    doc: dict = {"instances": images(2).tolist()}
    sites = draw(st.sets(st.sampled_from(range(4)), min_size=1, max_size=3))
    if 0 in sites:  # one image replaced
        doc["instances"][draw(st.integers(0, 1))] = draw(json_values)
    if 1 in sites:  # all of them
        doc["instances"] = draw(st.lists(json_values, max_size=3) | json_values)
    if 2 in sites:
        doc["parameters"] = draw(explanation_parameters | json_values)
    if 3 in sites:
        doc[draw(st.text(max_size=5))] = draw(json_values)
    return json.dumps(doc).encode(), {}


@st.composite
def requests(draw) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from(PATHS))
    body, headers = draw(v1_message() if path.startswith("/v1") else v2_message())
    # Hypothesis favours small numbers: 0 leaves the request as it is.
    outside = draw(st.integers(0, 15))  # 11-15: one more thing wrong outside the document
    if outside == 11:  # arbitrary bytes
        body = draw(st.binary(max_size=200))
    elif outside == 12:  # a header length anywhere
        headers["Inference-Header-Content-Length"] = draw(
            st.sampled_from(["0", "-1", "abc", "99999999", str(len(body) // 2)])
        )
    elif outside == 13:
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "identity"]))
    elif outside == 14:
        headers["Idempotency-Key"] = draw(st.text(string.ascii_letters, min_size=1, max_size=300))
    elif outside == 15:  # an integer too long for Python to convert, where a number was
        body = re.sub(rb"\d+", b"9" * 5000, body, count=draw(st.integers(1, 3)))
    return path, body, headers


@pytest.fixture(scope="module")
def server():
    # Cheap explanations only, so that the fixed number of examples takes a few seconds.
    app = create_app(tiny_victim(), name=NAME, keys=[KEY], max_passes_per_request=2000)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        yield http


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(request=requests())
def test_no_request_gets_a_5xx(server, request):
    path, body, headers = request
    r = server.post(path, content=body, headers={"x-api-key": KEY, **headers})
    assert r.status_code < 500, (path, body[:300], headers, r.text)
    if r.status_code >= 400:
        doc = r.json()
        assert isinstance(doc["code"], str) and isinstance(doc["error"], str), doc
