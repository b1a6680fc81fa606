"""The service against hostile clients, over a real uvicorn server on a loopback port:
malformed requests get a 4xx with a code, a key pays (or is refused) before its payload is
parsed, a stranger learns nothing about the model, wrong keys are throttled per address and
a body must arrive in time."""

from __future__ import annotations

import gzip
import json
import socket
import time
import tracemalloc

import httpx
import pytest
import torch

pytest.importorskip("fastapi")

from server_support import ServerThread, images, tiny_victim  # noqa: E402

from megex.serving import create_app  # noqa: E402

torch.set_num_threads(1)

NAME = "model"
KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
V1P, V1E, V2 = (
    f"/v1/models/{NAME}:predict",
    f"/v1/models/{NAME}:explain",
    f"/v2/models/{NAME}/infer",
)
GOOD = images(1).tolist()


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


@pytest.fixture(scope="module")
def server(victim):
    with ServerThread(create_app(victim, name=NAME, keys=[KEY])) as s:
        yield s


def _binary(header: dict, data: bytes = b"") -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(header).encode()
    return raw + data, {"Inference-Header-Content-Length": str(len(raw))}


def _image_tensor(**fields) -> dict:
    tensor = {"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8]}
    return {"inputs": [{**tensor, **fields}]}


_DIMS_65 = [1] * 65
MALFORMED = [
    # (id, path, body, extra headers, code)
    (
        "v2-json-65-dims",
        V2,
        json.dumps(_image_tensor(shape=_DIMS_65, data=[0.5])).encode(),
        {},
        "invalid_request",
    ),
    (
        "v2-binary-65-dims",
        V2,
        *_binary(_image_tensor(shape=_DIMS_65, parameters={"binary_data_size": 4}), b"\0" * 4),
        "invalid_request",
    ),
    (
        "v2-binary-absurd-shape-no-data",
        V2,
        *_binary(_image_tensor(shape=[0, 10**30], parameters={"binary_data_size": 0})),
        "invalid_request",
    ),
    (
        "v1-huge-integer",
        V1P,
        b'{"instances": ' + b"7" * 5000 + b"}",
        {},
        "invalid_request",
    ),
    (
        "v1-huge-integer-parameter",
        V1E,
        json.dumps({"instances": GOOD, "parameters": {"stepCount": "X"}})
        .replace('"X"', "9" * 5000)
        .encode(),
        {},
        "invalid_request",
    ),
    (
        "target-1e308",
        V1E,
        json.dumps({"instances": GOOD, "parameters": {"target": 1e308}}).encode(),
        {},
        "unknown_target",
    ),
]


@pytest.mark.parametrize(
    "path,body,headers,code", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_requests_get_a_400_with_a_code(server, path, body, headers, code):
    ledger = server.app.state.ledger
    before = ledger.total_used()
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as http:
        r = http.post(path, content=body, headers=headers)
        assert r.status_code == 400, r.text
        doc = r.json()
        assert doc["code"] == code and doc["error"]
        assert len(r.text) < 2000  # the message quotes the request, cut short
        # The keep-alive connection is still good, and nothing was charged.
        assert http.post(V1P, json={"instances": GOOD}).status_code == 200
    assert ledger.total_used() == before + 1


def test_vertex_explain_response_has_vertex_fields_only(server):
    r = httpx.post(server.url + V1E, json={"instances": GOOD}, headers=AUTH)
    doc = r.json()
    assert set(doc) == {"explanations", "deployedModelId", "predictions"}
    assert doc["deployedModelId"] == NAME


# --- a key pays before its payload is parsed ------------------------------------------------


def _spy_on_parsing(monkeypatch) -> list[str]:
    """Record each JSON parse by the codec and each tensor decoded by the V2 parser."""
    import types

    from megex.serving import codec, v2

    calls: list[str] = []

    def loads(data, *args, **kwargs):
        calls.append("json.loads")
        return json.loads(data, *args, **kwargs)

    def tensor_from_wire(*args, **kwargs):
        calls.append("tensor_from_wire")
        return codec.tensor_from_wire(*args, **kwargs)

    shim = types.SimpleNamespace(loads=loads, dumps=json.dumps)
    monkeypatch.setattr(codec, "json", shim)
    monkeypatch.setattr(v2, "tensor_from_wire", tensor_from_wire)
    return calls


def test_a_key_pays_before_its_payload_is_parsed(victim, monkeypatch):
    app = create_app(victim, name=NAME, keys={"broke": 0, "five": 5})
    # A 50 KB gzip body that expands to 120,000 images (7.7 million values) in JSON.
    image = b"[[" + b",".join([b"[" + b",".join([b"0"] * 8) + b"]"] * 8) + b"]]"
    bomb = gzip.compress(b'{"instances": [' + b",".join([image] * 120_000) + b"]}")
    x = images(8).numpy().astype("<f4").tobytes()
    declared, binary_headers = _binary(
        _image_tensor(shape=[8, 1, 8, 8], parameters={"binary_data_size": len(x)}), x
    )
    calls = _spy_on_parsing(monkeypatch)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        gzip_headers = {"Content-Encoding": "gzip"}
        tracemalloc.start()
        try:
            broke = http.post(V1P, content=bomb, headers={"x-api-key": "broke", **gzip_headers})
            broke_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            # A key that can pay for some images: refused for too many values, unparsed.
            greedy = http.post(V1P, content=bomb, headers={"x-api-key": "five", **gzip_headers})
            greedy_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert broke.status_code == 429 and broke.json()["code"] == "budget_exceeded"
        assert broke_peak < 8 << 20
        assert greedy.status_code == 400 and greedy.json()["code"] == "too_many_values"
        assert greedy_peak < 64 << 20  # the decompressed body, not its 7.7M parsed values
        assert calls == []
        # More images declared than the key can pay for: refused before they are decoded.
        r = http.post(V2, content=declared, headers={"x-api-key": "five", **binary_headers})
        assert r.status_code == 429 and r.json()["requested"] == 8
        assert calls == ["json.loads"]  # the header only
        assert s.app.state.ledger.total_used() == 0


# --- what a stranger learns -----------------------------------------------------------------

STRANGERS = [{}, {"Authorization": "Bearer guess"}, {"x-api-key": "guess"}]
MODEL_PATHS = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{name}"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/versions/1"),
    ("GET", "/v2/models/{name}/ready"),
    ("POST", "/v1/models/{name}:predict"),
    ("POST", "/v1/models/{name}:explain"),
    ("POST", "/v2/models/{name}/infer"),
]


def test_a_stranger_learns_nothing_about_the_model(victim):
    # The default name is neutral, and the right name cannot be told from a guessed one.
    app = create_app(victim, keys=[KEY], failed_key_burst=1000)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        for method, path in MODEL_PATHS:
            for headers in STRANGERS:
                answers = set()
                for name in (NAME, "digits-small_cnn", "guess"):
                    r = http.request(method, path.format(name=name), headers=headers)
                    assert r.status_code == 401, (path, r.text)
                    assert r.json()["code"] == "unauthorized"
                    answers.add(r.content)
                    for secret in ("small_cnn", "digits", "SmallCNN"):
                        assert secret not in r.text
                assert len(answers) == 1, path
        assert http.get("/openapi.json").status_code == 404
        assert http.get("/docs").status_code == 404
        # Health says only that the server is up.
        assert http.get("/v2/health/ready").json() == {"ready": True}
        # With a key: the model's tensors and what it returns, not what it is.
        meta = http.get(f"/v2/models/{NAME}", headers=AUTH)
        assert meta.status_code == 200
        assert "small_cnn" not in meta.text and "digits" not in meta.text
        assert set(meta.json()["parameters"]) == {"prediction", "allow_explanation_choice"} | {
            f"explanation_{k}" for k in ("method", "target", "output")
        }
        # A wrong name, asked with a key, is told the right one.
        r = http.get("/v2/models/guess", headers=AUTH)
        assert r.status_code == 404 and repr(NAME) in r.json()["error"]


def test_the_operator_may_publish_the_architecture_and_the_openapi_document(victim):
    app = create_app(victim, keys=[KEY], openapi=True, expose_architecture=True)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        meta = http.get(f"/v2/models/{NAME}", headers=AUTH).json()
        assert meta["parameters"]["arch"] == "small_cnn"
        assert meta["parameters"]["dataset"] == "digits"
        assert http.get("/openapi.json").status_code == 200


# --- wrong keys and slow bodies -------------------------------------------------------------


def test_wrong_keys_are_throttled_per_client_address(victim):
    app = create_app(victim, name=NAME, keys=[KEY], failed_key_rate=5.0, failed_key_burst=3)
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        wrong = {"Authorization": "Bearer wrong"}
        codes = [http.post(V1P, json={"instances": GOOD}, headers=wrong) for _ in range(4)]
        assert [r.status_code for r in codes] == [401, 401, 401, 429]
        assert codes[-1].json()["code"] == "too_many_failed_keys"
        assert int(codes[-1].headers["Retry-After"]) >= 1
        # While throttled the address gets no answer about any key, right ones included.
        assert http.post(V1P, json={"instances": GOOD}, headers=AUTH).status_code == 429
        # Another address is not affected.
        other = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=s.url, transport=other, timeout=30) as elsewhere:
            assert elsewhere.post(V1P, json={"instances": GOOD}, headers=AUTH).status_code == 200
        time.sleep(1 / 5.0 + 0.05)
        assert http.post(V1P, json={"instances": GOOD}, headers=AUTH).status_code == 200
        assert s.app.state.ledger.total_used() == 2


def test_a_body_that_does_not_arrive_in_time_is_refused(victim):
    app = create_app(victim, name=NAME, keys=[KEY], body_timeout_s=0.5)
    with ServerThread(app) as s, socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.settimeout(5)
        head = (
            f"POST {V1P} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"instances": [')
        start = time.monotonic()
        reply = b""
        while chunk := sock.recv(4096):  # until the server closes the connection
            reply += chunk
        waited = time.monotonic() - start
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"code":"body_timeout"' in reply
        assert 0.4 < waited < 3
        assert s.app.state.ledger.total_used() == 0
