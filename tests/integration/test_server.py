"""The HTTP service: both protocols, explanations, ledger, limits and bad input, over a real
uvicorn server on a loopback port."""

from __future__ import annotations

import base64
import gzip
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from megex import Explanation, LocalOracle, explain

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_support import (  # noqa: E402
    ServerThread,
    images,
    save_tiny_victim,
    tiny_victim,
)

from megex.serving import create_app  # noqa: E402

torch.set_num_threads(1)

NAME = "model"
KEY = "secret-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


@pytest.fixture(scope="module")
def server(victim):
    """One shared server with one key and no budget, for tests that do not count."""
    app = create_app(victim, keys=[KEY], max_body_bytes=256 * 1024)
    with ServerThread(app) as s:
        yield s


def post(url: str, body=None, headers=None, **kwargs) -> httpx.Response:
    headers = {**AUTH, **(headers or {})}
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return httpx.post(url, content=body, headers=headers, timeout=30, **kwargs)


def used(s: ServerThread) -> int:
    return s.app.state.ledger.total_used()


# --- health and metadata -----------------------------------------------------------------


def test_health_and_metadata(server):
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    meta = httpx.get(server.url + "/v2").json()
    assert meta["name"] == "megex" and "binary_tensor_data" in meta["extensions"]
    r = httpx.get(f"{server.url}/v2/models/{NAME}", headers=dict(AUTH))
    assert r.status_code == 200
    model = r.json()
    assert model["name"] == NAME
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    outputs = {o["name"]: o for o in model["outputs"]}
    assert outputs["probabilities"] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [-1, 10],
    }
    assert outputs["explanation"]["shape"] == [-1, 1, 8, 8]
    assert r.headers["X-Queries-Used"] == "0" and r.headers["X-Query-Budget"] == "unlimited"
    ready = httpx.get(f"{server.url}/v2/models/{NAME}/ready", headers=dict(AUTH))
    assert ready.json()["ready"] is True
    assert httpx.get(f"{server.url}/v1/models", headers=dict(AUTH)).json() == {"models": [NAME]}


# --- KServe V1 / Vertex AI ---------------------------------------------------------------


def test_v1_predict_matches_local(server, victim):
    x = images(3)
    r = post(f"{server.url}/v1/models/{NAME}:predict", {"instances": x.tolist()})
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["predictions"])
    want = LocalOracle(victim).query(x).probabilities
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_v1_explain_has_vertex_shape_and_local_values(server, victim):
    x = images(2, seed=1)
    r = post(f"{server.url}/v1/models/{NAME}:explain", {"instances": x.tolist()})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert len(doc["predictions"]) == 2 and len(doc["explanations"]) == 2
    labels = victim(x).argmax(1).tolist()
    want = explain(victim, x, Explanation("gradient"))
    for i, item in enumerate(doc["explanations"]):
        (attr,) = item["attributions"]
        assert set(attr) == {
            "featureAttributions",
            "outputIndex",
            "instanceOutputValue",
            "baselineOutputValue",
            "approximationError",
        }
        assert attr["outputIndex"] == [labels[i]]
        assert attr["instanceOutputValue"] == pytest.approx(doc["predictions"][i][labels[i]])
        got = torch.tensor(attr["featureAttributions"]["images"])
        torch.testing.assert_close(got, want[i], rtol=1e-5, atol=1e-7)

    # Vertex names choose the method; target "all" gives one attribution per class.
    params = {"method": "smoothgrad", "noiseSigma": 0.2, "noisySampleCount": 2, "target": "all"}
    r = post(
        f"{server.url}/v1/models/{NAME}:explain", {"instances": x.tolist(), "parameters": params}
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [a["outputIndex"] for a in doc["explanations"][0]["attributions"]] == [
        [k] for k in range(10)
    ]
    # Vertex AI's ExplainResponse: explanations, deployedModelId, predictions; no more.
    assert set(doc) == {"explanations", "deployedModelId", "predictions"}
    assert doc["deployedModelId"] == NAME


def test_v1_accepts_b64_float32_instances(server, victim):
    x = images(2, seed=2)
    instances = [
        {"b64": base64.b64encode(img.numpy().astype("<f4").tobytes()).decode()} for img in x
    ]
    r = post(f"{server.url}/v1/models/{NAME}:predict", {"instances": instances})
    assert r.status_code == 200, r.text
    want = LocalOracle(victim).query(x).probabilities
    torch.testing.assert_close(torch.tensor(r.json()["predictions"]), want, rtol=0, atol=1e-6)


# --- Open Inference Protocol -------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        Explanation("gradient"),
        Explanation("gradient", target="all", output="log_probability"),
        Explanation("input_x_gradient", target=3, output="logit"),
        Explanation("integrated_gradients", steps=5, baseline=0.5),
        Explanation("smoothgrad", sigma=0.05, samples=2),
    ],
    ids=lambda s: s.method + "-" + str(s.target),
)
def test_v2_explanations_equal_local_explain(victim, spec):
    # A fresh server per case so that SmoothGrad's noise generator starts from its seed.
    with ServerThread(create_app(victim, seed=0)) as s:
        x = images(4, seed=3)
        body = {
            "inputs": [
                {
                    "name": "images",
                    "shape": [4, 1, 8, 8],
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ],
            "outputs": [{"name": "explanation"}, {"name": "probabilities"}],
            "parameters": spec.to_dict(),
        }
        r = post(f"{s.url}/v2/models/{NAME}/infer", body)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        expl = out["explanation"]
        got = torch.tensor(expl["data"]).reshape(expl["shape"])
        want = explain(victim, x, spec, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert Explanation.from_dict(expl["parameters"]) == spec


def test_v2_binary_tensor_extension(server, victim):
    x = images(5, seed=4)
    raw = x.numpy().astype("<f4").tobytes()
    header = json.dumps(
        {
            "id": "req-1",
            "inputs": [
                {
                    "name": "images",
                    "shape": [5, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "labels", "parameters": {"binary_data": False}},
                {"name": "explanation"},
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    r = post(
        f"{server.url}/v2/models/{NAME}/infer",
        header + raw,
        {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    length = int(r.headers["Inference-Header-Content-Length"])
    doc = json.loads(r.content[:length])
    assert doc["id"] == "req-1" and doc["model_name"] == NAME
    probs, labels, expl = doc["outputs"]
    assert probs["parameters"]["binary_data_size"] == 5 * 10 * 4 and "data" not in probs
    assert labels["datatype"] == "INT64" and len(labels["data"]) == 5
    assert expl["parameters"]["binary_data_size"] == 5 * 64 * 4  # request-level default
    rest = r.content[length:]
    assert len(rest) == 5 * 10 * 4 + 5 * 64 * 4
    got = torch.from_numpy(np.frombuffer(rest[:200], "<f4").reshape(5, 10).copy())
    local = LocalOracle(victim).query(x, explanation=True)
    torch.testing.assert_close(got, local.probabilities, rtol=0, atol=0)
    assert labels["data"] == local.labels.tolist()
    got_e = torch.from_numpy(np.frombuffer(rest[200:], "<f4").reshape(5, 1, 8, 8).copy())
    torch.testing.assert_close(got_e, local.explanation, rtol=1e-5, atol=1e-7)


def test_tritonclient_unchanged(server, victim):
    httpclient = pytest.importorskip("tritonclient.http")
    # tritonclient writes into the headers dict it is given, so each call gets its own.
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME, headers=dict(AUTH))
    meta = client.get_model_metadata(NAME, headers=dict(AUTH))
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    x = images(6, seed=5).numpy()
    local = LocalOracle(victim).query(torch.from_numpy(x), explanation=True)
    for binary in (False, True):
        inp = httpclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=binary)
            for n in ("probabilities", "labels", "explanation")
        ]
        result = client.infer(NAME, [inp], outputs=outputs, headers=dict(AUTH))
        np.testing.assert_allclose(result.as_numpy("probabilities"), local.probabilities, atol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("labels"), local.labels.numpy())
        np.testing.assert_allclose(
            result.as_numpy("explanation"), local.explanation, rtol=1e-5, atol=1e-7
        )
    # No outputs named: tritonclient asks for binary outputs; predictions come back.
    result = client.infer(
        NAME,
        [inp],
        headers=dict(AUTH),
        parameters={"method": "integrated_gradients", "stepCount": 4},
    )
    assert (
        result.as_numpy("probabilities").shape == (6, 10) and result.as_numpy("explanation") is None
    )
    with pytest.raises(Exception, match="unknown API key"):
        client.infer(NAME, [inp], headers={"x-api-key": "nope"})
    client.close()


# --- bad input ---------------------------------------------------------------------------

V1P = f"/v1/models/{NAME}:predict"
V1E = f"/v1/models/{NAME}:explain"
V2 = f"/v2/models/{NAME}/infer"
GOOD = images(1).tolist()


def _v2(data=None, **tensor):
    t = {
        "name": "images",
        "shape": [1, 1, 8, 8],
        "datatype": "FP32",
        "data": images(1).reshape(-1).tolist() if data is None else data,
        **tensor,
    }
    return {"inputs": [t]}


def _literal(doc, token: str) -> bytes:
    """`doc` as JSON with the string "X" replaced by a raw token (NaN is not valid JSON)."""
    return json.dumps(doc).replace('"X"', token).encode()


BAD_INPUTS = [
    # (id, method, path, body, headers, status)
    ("malformed-json", "POST", V1P, b'{"instances": [', {}, 400),
    ("malformed-json-v2", "POST", V2, b"{oops", {}, 400),
    ("not-utf8", "POST", V2, b"\xff\xfe", {}, 400),
    ("empty-body", "POST", V1P, b"", {}, 400),
    ("not-an-object", "POST", V1P, [1, 2], {}, 400),
    ("no-instances", "POST", V1P, {"inputs": GOOD}, {}, 400),
    ("empty-instances", "POST", V1P, {"instances": []}, {}, 400),
    ("wrong-shape-v1", "POST", V1P, {"instances": [[[0.5] * 7] * 8]}, {}, 400),
    ("ragged", "POST", V1P, {"instances": [[[0.5] * 8] * 7 + [[0.5] * 3]]}, {}, 400),
    ("strings", "POST", V1P, {"instances": [[["0.5"] * 8] * 8]}, {}, 400),
    ("booleans", "POST", V1P, {"instances": [[[True] * 8] * 8]}, {}, 400),
    ("nulls", "POST", V1P, {"instances": [[[None] * 8] * 8]}, {}, 400),
    ("above-one", "POST", V1P, {"instances": [[[1.5] * 8] * 8]}, {}, 400),
    ("below-zero", "POST", V1P, {"instances": [[[-0.1] * 8] * 8]}, {}, 400),
    ("nan-literal", "POST", V1P, _literal({"instances": [[["X"] + [0] * 7] * 8]}, "NaN"), {}, 400),
    ("infinity-literal", "POST", V2, _literal(_v2(data=["X"] + [0] * 63), "Infinity"), {}, 400),
    (
        "huge-number",
        "POST",
        V1P,
        _literal({"instances": [[["X"] + [0] * 7] * 8]}, "1e400"),
        {},
        400,
    ),
    (
        "deep-nesting",
        "POST",
        V1P,
        b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        {},
        400,
    ),
    ("bad-b64", "POST", V1P, {"instances": [{"b64": "not base64!"}]}, {}, 400),
    (
        "short-b64",
        "POST",
        V1P,
        {"instances": [{"b64": base64.b64encode(b"abcd").decode()}]},
        {},
        400,
    ),
    ("v2-dtype", "POST", V2, _v2(datatype="INT32"), {}, 400),
    ("v2-fp64", "POST", V2, _v2(datatype="FP64"), {}, 400),
    ("v2-shape-mismatch", "POST", V2, _v2(shape=[2, 1, 8, 8]), {}, 400),
    ("v2-wrong-dims", "POST", V2, _v2(shape=[1, 64], data=[0.5] * 64), {}, 400),
    ("v2-negative-shape", "POST", V2, _v2(shape=[-1, 1, 8, 8]), {}, 400),
    ("v2-unknown-input", "POST", V2, _v2(name="x"), {}, 400),
    ("v2-two-inputs", "POST", V2, {"inputs": _v2()["inputs"] * 2}, {}, 400),
    ("v2-unknown-output", "POST", V2, {**_v2(), "outputs": [{"name": "secrets"}]}, {}, 400),
    (
        "v2-classification",
        "POST",
        V2,
        {**_v2(), "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]},
        {},
        400,
    ),
    (
        "v2-header-length",
        "POST",
        V2,
        json.dumps(_v2()).encode(),
        {"Inference-Header-Content-Length": "999999"},
        400,
    ),
    (
        "v2-header-length-nan",
        "POST",
        V2,
        json.dumps(_v2()).encode(),
        {"Inference-Header-Content-Length": "abc"},
        400,
    ),
    ("unknown-method", "POST", V1E, {"instances": GOOD, "parameters": {"method": "lime"}}, {}, 400),
    (
        "unknown-parameter",
        "POST",
        V1E,
        {"instances": GOOD, "parameters": {"methd": "gradient"}},
        {},
        400,
    ),
    (
        "target-out-of-range",
        "POST",
        V1E,
        {"instances": GOOD, "parameters": {"target": 99}},
        {},
        400,
    ),
    (
        "bad-sigma",
        "POST",
        V1E,
        {"instances": GOOD, "parameters": {"method": "smoothgrad", "noiseSigma": -1}},
        {},
        400,
    ),
    (
        "non-ascii-digit-target",
        "POST",
        V1E,
        {"instances": GOOD, "parameters": {"target": "\u00b2"}},
        {},
        400,
    ),
    (
        "infinite-sigma",
        "POST",
        V1E,
        json.dumps({"instances": GOOD, "parameters": {"method": "smoothgrad", "noiseSigma": 7.25}})
        .replace("7.25", "Infinity")
        .encode(),
        {},
        400,
    ),
    (
        "huge-sample-count",
        "POST",
        V1E,
        {"instances": GOOD, "parameters": {"method": "smoothgrad", "noisySampleCount": 10**7}},
        {},
        400,
    ),
    (
        "overflowing-steps",
        "POST",
        V1E,
        {"instances": GOOD, "parameters": {"method": "integrated_gradients", "stepCount": 10**400}},
        {},
        400,
    ),
    (
        "param-for-other-method",
        "POST",
        V1E,
        {"instances": GOOD, "parameters": {"stepCount": 4}},
        {},
        400,
    ),
    ("unknown-model-v1", "POST", "/v1/models/nope:predict", {"instances": GOOD}, {}, 404),
    ("unknown-model-v2", "POST", "/v2/models/nope/infer", _v2(), {}, 404),
    ("unknown-model-meta", "GET", "/v2/models/nope", None, {}, 404),
    ("unknown-version", "POST", f"/v2/models/{NAME}/versions/7/infer", _v2(), {}, 404),
    ("unknown-endpoint", "GET", "/v3/anything", None, {}, 404),
    ("wrong-http-method", "GET", V2, None, {}, 405),
    ("no-key", "POST", V1P, {"instances": GOOD}, {"Authorization": ""}, 401),
    ("wrong-key", "POST", V1P, {"instances": GOOD}, {"Authorization": "Bearer wrong"}, 401),
    ("wrong-scheme", "POST", V1P, {"instances": GOOD}, {"Authorization": f"Basic {KEY}"}, 401),
    ("wrong-x-api-key", "POST", V2, _v2(), {"x-api-key": "wrong"}, 401),
    ("too-large", "POST", V1P, b"[" * (300 * 1024), {}, 413),
    ("gzip-bomb", "POST", V1P, gzip.compress(b" " * (2 << 20)), {"Content-Encoding": "gzip"}, 413),
    ("bad-gzip", "POST", V1P, b"not gzip", {"Content-Encoding": "gzip"}, 400),
    ("unknown-encoding", "POST", V1P, b"{}", {"Content-Encoding": "br"}, 415),
    ("long-idempotency-key", "POST", V1P, {"instances": GOOD}, {"Idempotency-Key": "k" * 300}, 400),
]


@pytest.mark.parametrize(
    "method,path,body,headers,status", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_a_clear_4xx_and_costs_nothing(server, method, path, body, headers, status):
    before = used(server)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    r = httpx.request(
        method, server.url + path, content=body, headers={**AUTH, **headers}, timeout=30
    )
    assert r.status_code == status, r.text
    doc = r.json()
    assert isinstance(doc["error"], str) and doc["error"]
    assert used(server) == before
    # The server keeps serving.
    ok = post(f"{server.url}{V1P}", {"instances": GOOD})
    assert ok.status_code == 200
    assert used(server) == before + 1


def test_gzip_request_body_is_accepted(server):
    body = gzip.compress(json.dumps({"instances": GOOD}).encode())
    r = post(f"{server.url}{V1P}", body, {"Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text


def test_fixed_or_absent_explanation_is_refused(victim):
    app = create_app(victim, explanation=Explanation("gradient"), allow_explanation_choice=False)
    with ServerThread(app) as s:
        ok = post(f"{s.url}{V1E}", {"instances": GOOD})
        assert ok.status_code == 200
        r = post(f"{s.url}{V1E}", {"instances": GOOD, "parameters": {"method": "smoothgrad"}})
        assert r.status_code == 403 and r.json()["code"] == "explanation_not_offered"
    with ServerThread(create_app(victim, explanation=None)) as s:
        r = post(f"{s.url}{V1E}", {"instances": GOOD})
        assert r.status_code == 403
        r = post(f"{s.url}{V2}", {**_v2(), "outputs": [{"name": "explanation"}]})
        assert r.status_code == 403
        assert s.app.state.ledger.total_used() == 0


# --- the ledger --------------------------------------------------------------------------


def test_budget_refuses_whole_request_and_reports_quota(victim):
    app = create_app(victim, keys={KEY: 10, "other": None}, budget=3)
    with ServerThread(app) as s:
        url = f"{s.url}{V1P}"
        assert post(url, {"instances": images(8).tolist()}).status_code == 200
        r = post(url, {"instances": images(5).tolist()})
        assert r.status_code == 429
        doc = r.json()
        assert doc["code"] == "budget_exceeded"
        assert (doc["requested"], doc["used"], doc["remaining"], doc["budget"]) == (5, 8, 2, 10)
        assert r.headers["X-Queries-Remaining"] == "2" and r.headers["X-Query-Budget"] == "10"
        ok = post(url, {"instances": images(2).tolist()})
        assert ok.status_code == 200 and ok.headers["X-Queries-Remaining"] == "0"
        # The other key has the default budget of 3.
        other = post(url, {"instances": images(4).tolist()}, {"Authorization": "Bearer other"})
        assert other.status_code == 429 and other.json()["budget"] == 3


def test_counts_survive_a_restart(victim, tmp_path):
    db = tmp_path / "ledger.sqlite"
    with ServerThread(create_app(victim, keys={KEY: 20}, db_path=db)) as s:
        assert post(f"{s.url}{V1P}", {"instances": images(7).tolist()}).status_code == 200
        assert post(f"{s.url}{V2}", _v2()).status_code == 200
    with ServerThread(create_app(victim, keys={KEY: 20}, db_path=db)) as s:
        r = httpx.get(f"{s.url}/v2/models/{NAME}", headers=dict(AUTH))
        assert r.headers["X-Queries-Used"] == "8" and r.headers["X-Queries-Remaining"] == "12"
        assert post(f"{s.url}{V1P}", {"instances": images(13).tolist()}).status_code == 429
        assert post(f"{s.url}{V1P}", {"instances": images(12).tolist()}).status_code == 200
        rows = s.app.state.ledger.audit_rows()
        assert [(e, c) for _, e, c, _ in rows] == [
            ("v1/predict", 7),
            ("v2/infer", 1),
            ("v1/predict", 12),
        ]
    # Keys are stored hashed, never in clear.
    assert KEY.encode() not in Path(db).read_bytes()


def test_rate_limit_answers_429_with_retry_after(victim):
    with ServerThread(create_app(victim, keys=[KEY], rate_limit=2.0)) as s:
        codes = [post(f"{s.url}{V1P}", {"instances": GOOD}) for _ in range(3)]
        assert [r.status_code for r in codes[:2]] == [200, 200]
        assert codes[2].status_code == 429 and codes[2].json()["code"] == "rate_limited"
        assert int(codes[2].headers["Retry-After"]) >= 1
        assert s.app.state.ledger.total_used() == 2


def test_idempotent_retry_is_not_charged_twice(server):
    before = used(server)
    body = {"instances": images(3, seed=9).tolist()}
    first = post(f"{server.url}{V1E}", body, {"Idempotency-Key": "abc-1"})
    again = post(f"{server.url}{V1E}", body, {"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 200
    assert first.content == again.content and again.headers["Idempotent-Replayed"] == "true"
    assert used(server) == before + 3
    other = post(f"{server.url}{V1E}", {"instances": GOOD}, {"Idempotency-Key": "abc-1"})
    assert other.status_code == 422
    assert used(server) == before + 3


def test_failed_computation_is_refunded(victim):
    app = create_app(victim, keys=[KEY])
    responder = app.state.service.responder
    calls = []

    def broken(x, explanation=None, party=0):
        calls.append(len(x))
        raise RuntimeError("simulated failure")

    with ServerThread(app) as s:
        responder.answer = broken
        r = post(f"{s.url}{V1P}", {"instances": images(4).tolist()}, {"Idempotency-Key": "x"})
        assert r.status_code == 500 and r.json() == {
            "error": "internal server error",
            "code": "internal",
        }
        assert calls == [4] and s.app.state.ledger.total_used() == 0
        del responder.answer
        r = post(f"{s.url}{V1P}", {"instances": images(4).tolist()}, {"Idempotency-Key": "x"})
        assert r.status_code == 200 and s.app.state.ledger.total_used() == 4
        assert [row[3] for row in s.app.state.ledger.audit_rows()] == [1, 0]


def test_failure_to_store_an_idempotent_response_is_refunded(victim):
    app = create_app(victim, keys=[KEY])
    ledger = app.state.ledger
    real_finish = ledger.finish

    def failing_finish(*args, **kwargs):
        raise sqlite3.OperationalError("simulated: disk full")

    with ServerThread(app) as s:
        ledger.finish = failing_finish
        body = {"instances": images(3).tolist()}
        r = post(f"{s.url}{V1P}", body, {"Idempotency-Key": "k-1"})
        assert r.status_code == 500 and ledger.total_used() == 0
        ledger.finish = real_finish
        # The retry is served afresh, not refused as a request still in progress.
        r = post(f"{s.url}{V1P}", body, {"Idempotency-Key": "k-1"})
        assert r.status_code == 200 and ledger.total_used() == 3
        again = post(f"{s.url}{V1P}", body, {"Idempotency-Key": "k-1"})
        assert again.headers["Idempotent-Replayed"] == "true" and ledger.total_used() == 3


def test_concurrent_clients_count_every_query_once(victim):
    keys = {"a": None, "b": None}
    with ServerThread(create_app(victim, keys=keys)) as s:
        sent = {"a": 0, "b": 0}
        lock = threading.Lock()
        errors = []

        def client(key: str, seed: int) -> None:
            with httpx.Client(headers={"x-api-key": key}, timeout=30) as http:
                for i in range(25):
                    body = {"instances": images(4, seed=seed * 100 + i).tolist()}
                    r = http.post(f"{s.url}{V1E if i % 2 else V1P}", content=json.dumps(body))
                    if r.status_code != 200:
                        errors.append(r.text)
                        continue
                    with lock:
                        sent[key] += 4

        threads = [threading.Thread(target=client, args=("ab"[i % 2], i)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        ledger = s.app.state.ledger
        assert ledger.total_used() == sum(sent.values()) == 400
        for key in keys:
            account = ledger.authenticate(key)
            assert ledger.usage(account.id).used == sent[key] == 200
            assert sum(row[2] for row in ledger.audit_rows(account.id)) == 200


def test_open_server_and_audit_images(victim, tmp_path):
    app = create_app(victim, db_path=tmp_path / "l.sqlite", budget=5, audit_images=True)
    with ServerThread(app) as s:
        x = images(2)
        r = httpx.post(f"{s.url}{V1P}", json={"instances": x.tolist()})
        assert r.status_code == 200 and r.headers["X-Queries-Remaining"] == "3"
    import sqlite3

    with sqlite3.connect(tmp_path / "l.sqlite") as db:
        (blob,) = db.execute("SELECT images FROM audit").fetchone()
    np.testing.assert_array_equal(np.frombuffer(blob, "<f4").reshape(2, 1, 8, 8), x.numpy())


# --- one server per ledger file ----------------------------------------------------------


def test_one_server_per_ledger(victim, tmp_path, capsys):
    from megex.cli import main
    from megex.sqlite_ledger import LedgerInUse, SQLiteLedger

    db = tmp_path / "l.sqlite"
    first = SQLiteLedger(db, keys={KEY: 10})
    with pytest.raises(LedgerInUse, match="already in use by another server"):
        SQLiteLedger(db, keys={KEY: 10})
    path = save_tiny_victim(tmp_path)
    assert main(["serve", "--victim", str(path), "--db", str(db)]) == 1  # refused
    err = capsys.readouterr().err.strip()
    assert str(db) in err and "--db" in err and "\n" not in err and "Traceback" not in err
    first.close()
    # Released on close; an app whose settings fail releases it too.
    with pytest.raises(ValueError):
        create_app(victim, db_path=db, rate_limit=-1.0)
    second = SQLiteLedger(db, keys={KEY: 10})
    second.close()
    # A ledger that fails to open (here: the path is a folder) does not keep the lock.
    folder = tmp_path / "folder.sqlite"
    folder.mkdir()
    for _ in range(2):
        with pytest.raises(sqlite3.OperationalError):
            SQLiteLedger(folder)


def test_import_megex_does_not_import_fastapi():
    extras = ("fastapi", "httpx", "uvicorn", "matplotlib", "sklearn", "scipy", "ray", "optuna")
    code = f"import sys, megex; assert not [m for m in {extras!r} if m in sys.modules]"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
    # Nor do the benchmark, the search and the local sweep runner: Ray only with --ray.
    code = (
        "import sys; from megex.experiments import query_efficiency, sweep, tuning; "
        "assert sweep.run_jobs([{}, {}], 1, id, len) == []; "
        "assert not [m for m in ('ray', 'optuna') if m in sys.modules]"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_ledger_refunds_requests_interrupted_by_a_restart(tmp_path):
    from megex.ledger import Charge
    from megex.sqlite_ledger import SQLiteLedger

    db = tmp_path / "l.sqlite"
    ledger = SQLiteLedger(db, keys={KEY: 10})
    account = ledger.authenticate(KEY)
    charge = ledger.charge(account.id, 4, "v2/infer", idem_key="k1", body_hash="h")
    assert isinstance(charge, Charge) and ledger.usage(account.id).used == 4
    ledger.close()  # the process died while computing: no response was stored
    ledger = SQLiteLedger(db, keys={KEY: 10})
    assert ledger.usage(account.id).used == 0
    assert isinstance(
        ledger.charge(account.id, 4, "v2/infer", idem_key="k1", body_hash="h"), Charge
    )
    assert ledger.usage(account.id).used == 4
    ledger.close()


def test_the_service_settings_are_declared_checked_and_taken_by_create_app(tmp_path, victim):
    from megex.serving import ServiceSettings
    from megex.settings import describe_settings

    described = {d["name"]: d for d in describe_settings(ServiceSettings)}
    assert {"budget", "rate_limit", "max_body_bytes", "explanation", "monitors"} <= set(described)
    assert all(d["help"] and d["group"] for d in described.values())
    db = tmp_path / "refused.sqlite"
    for changes, message in [
        ({"rate_limit": 0.0}, "rate_limit: expected a number > 0"),
        ({"budget": -1}, "budget: expected a whole number >= 0"),
        ({"max_passes_per_request": 0}, "max_passes_per_request: expected a whole number >= 1"),
        ({"chunk_passes": 2.5}, "chunk_passes: expected a whole number >= 1"),
        ({"prediction": "scores"}, "prediction: expected one of"),
        ({"name": "a/b"}, "cannot appear in a URL path segment"),
        ({"stored_response_bytes_per_key": 9, "stored_response_bytes": 8}, "per key <= bytes"),
    ]:
        with pytest.raises(ValueError, match=message):
            ServiceSettings(**changes)
        # Refused before the ledger is opened: its file is not even made.
        with pytest.raises(ValueError, match=message):
            create_app(victim, db_path=db, **changes)
        assert not db.exists()
    with pytest.raises(TypeError, match="unknown service setting 'budgte'"):
        create_app(victim, budgte=3)
    settings = ServiceSettings(budget=7, rate_limit=2.0, name="clone-me")
    app = create_app(victim, settings, keys=["k"])
    try:
        assert app.state.settings == settings.replace(keys=["k"])
        service, ledger = app.state.service, app.state.ledger
        assert service.name == "clone-me" and service.request_limiter.rate == 2.0
        assert ledger.usage(ledger.authenticate("k").id).budget == 7
    finally:
        app.state.ledger.close()
