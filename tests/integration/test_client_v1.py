"""RemoteV1Oracle and connect(): the Oracle protocol over KServe V1 (``:predict`` and
``:explain``), and the choice of protocol, against real servers on loopback ports."""

from __future__ import annotations

import json

import pytest
import torch

from megex import (
    BudgetExceeded,
    Explanation,
    ExplanationNotOffered,
    InvalidQuery,
    LocalOracle,
    evaluate,
)
from megex import data as data_mod
from megex.cli import main

pytest.importorskip("fastapi")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from server_support import SHAPE, ServerThread, images, tiny_victim  # noqa: E402

from megex.client import (  # noqa: E402
    RemoteOracle,
    RemoteV1Oracle,
    ServiceError,
    connect,
    detect_protocol,
)
from megex.experiments.audit.victims import resolve_target  # noqa: E402
from megex.serving import create_app  # noqa: E402
from megex.serving.parsing import Parsed  # noqa: E402
from megex.serving.v1 import render_v1_explain  # noqa: E402

torch.set_num_threads(1)

V1_KEY, V2_KEY = "v1-key", "v2-key"
SPECS = [
    None,
    True,
    Explanation("gradient", target="all", output="logit"),
    Explanation("integrated_gradients", target=2, steps=4),
    Explanation("smoothgrad", samples=3, sigma=0.2),
]


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


class V1Only:
    """A megex app whose V2 routes answer 404, as a server that speaks only KServe V1."""

    def __init__(self, app):
        self.app, self.state = app, app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v2"):
            await JSONResponse({"error": "not found"}, 404)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def assert_same_answer(got, want):
    torch.testing.assert_close(got.probabilities, want.probabilities, rtol=0, atol=1e-6)
    assert torch.equal(got.labels, want.labels)
    assert got.explanation_spec == want.explanation_spec
    if want.explanation is None:
        assert got.explanation is None
    else:
        assert got.explanation.shape == want.explanation.shape
        torch.testing.assert_close(got.explanation, want.explanation, rtol=1e-5, atol=1e-7)


def test_v1_client_equals_the_v2_client_and_local_oracle(victim):
    app = create_app(victim, keys={V1_KEY: 1000, V2_KEY: 1000}, seed=3)
    local = LocalOracle(victim, seed=3)
    with ServerThread(app) as s:
        v1 = connect(f"{s.url}/v1/models/model", V1_KEY, input_shape=SHAPE)
        v2 = connect(s.url, V2_KEY)
        assert isinstance(v1, RemoteV1Oracle) and isinstance(v2, RemoteOracle)
        sent = 0
        for n in (3, 20):
            x = images(n, seed=n)
            for spec in SPECS:
                # SmoothGrad's noise comes from the server's one generator: the local oracle
                # answers the same requests in the same order.
                got_v1, got_v2 = v1.query(x, spec), v2.query(x, spec)
                want_v1, want_v2 = local.query(x, spec), local.query(x, spec)
                assert_same_answer(got_v1, want_v1)
                assert_same_answer(got_v2, want_v2)
                sent += n
        ledger = s.app.state.ledger
        assert v1.num_classes == 10 and v1.input_shape == SHAPE
        for key, client in ((V1_KEY, v1), (V2_KEY, v2)):
            used = ledger.usage(ledger.authenticate(key).id).used
            assert client.queries_used == used == sent and client.remaining == 1000 - sent
            client.close()


def test_logits_are_read_only_when_told(victim):
    app = create_app(victim, prediction="logits", explanation=Explanation(target="all"))
    want = LocalOracle(victim, prediction="logits", explanation=Explanation(target="all"))
    x = images(4)
    with ServerThread(app) as s:
        url = f"{s.url}/v1/models/model"
        with connect(url, input_shape=SHAPE, prediction="logits") as v1:
            got, expected = v1.query(x, Explanation(target="all")), want.query(x, True)
            assert got.prediction == "logits" and got.explanation.shape == (4, 10, *SHAPE)
            torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.probabilities, expected.probabilities)
            torch.testing.assert_close(got.explanation, expected.explanation)
        with connect(url, input_shape=SHAPE) as v1:
            with pytest.raises(ServiceError, match="not probabilities.*prediction='logits'"):
                v1.query(x)
    # This server explains every class by default: a client told otherwise says so.
    with ServerThread(create_app(victim, explanation=Explanation(target="all"))) as s:
        url = f"{s.url}/v1/models/model"
        with connect(url, input_shape=SHAPE) as v1:
            with pytest.raises(ServiceError, match="maps of classes .*default_explanation="):
                v1.query(x, True)
        told = Explanation(target="all")
        with connect(url, input_shape=SHAPE, default_explanation=told) as v1:
            got = v1.query(x, True)
            assert got.explanation_spec == told and got.explanation.shape == (4, 10, *SHAPE)


def test_detection_reads_the_url_or_asks_without_spending_a_query(victim):
    assert detect_protocol("http://127.0.0.1:9/v1/models/m") == "v1"  # no request at all
    assert detect_protocol("http://127.0.0.1:9/v2/models/m/") == "v2"
    with ServerThread(create_app(victim, keys={V2_KEY: 100})) as s:
        assert detect_protocol(s.url, V2_KEY) == "v2"
        with connect(s.url, V2_KEY) as remote:
            assert isinstance(remote, RemoteOracle)
            assert remote.queries_used == 0 and remote.remaining == 100
        # A model URL under /v1/ is spoken to over V1, unless told.
        with connect(f"{s.url}/v1/models/model", V2_KEY, protocol="v2") as remote:
            assert isinstance(remote, RemoteOracle)
        with pytest.raises(ServiceError, match="401"):
            detect_protocol(s.url, "wrong-key")  # a refusal is not a question of protocol
        assert s.app.state.ledger.total_used() == 0
    with ServerThread(V1Only(create_app(victim, keys={V1_KEY: 100}))) as s:
        assert detect_protocol(s.url, V1_KEY) == "v1"
        with connect(s.url, V1_KEY, input_shape=SHAPE, num_classes=10) as remote:
            assert isinstance(remote, RemoteV1Oracle) and remote.name == "model"
            assert remote.queries_used == 0 and remote.remaining == 100
            # The service's refusals map as over V2, and cost nothing.
            with pytest.raises(BudgetExceeded):
                remote.query(images(101))
        with connect(s.url, V1_KEY, input_shape=(1, 4, 16)) as remote:
            with pytest.raises(InvalidQuery, match="does not match"):
                remote.query(torch.rand(1, 1, 4, 16))
        assert s.app.state.ledger.total_used() == 0
    listing_only = FastAPI()
    listing_only.get("/v1/models")(lambda: {"models": ["m"]})
    with ServerThread(listing_only) as s:
        with pytest.raises(ServiceError, match="neither .* HTTP 404; GET /v1/models/m: HTTP 404"):
            detect_protocol(s.url)


def test_bad_options_name_themselves(victim):
    with ServerThread(V1Only(create_app(victim))) as s:
        url = f"{s.url}/v1/models/model"
        with pytest.raises(ValueError, match="input_shape: .*give it as"):
            connect(url)
        with pytest.raises(ValueError, match="encoding: 'binary'"):
            connect(url, input_shape=SHAPE, encoding="binary")
        with pytest.raises(ValueError, match="protocol: expected"):
            connect(url, protocol="v3")
        with pytest.raises(ValueError, match="binary_threshold: not an option of the V1"):
            connect(url, protocol="v1", input_shape=SHAPE, binary_threshold=4)
        with pytest.raises(ValueError, match="protocol: RemoteOracle speaks"):
            RemoteOracle(url, protocol="v1")
        with connect(url, input_shape=SHAPE) as v1:
            with pytest.raises(ValueError, match="num_classes: .*give num_classes="):
                v1.num_classes  # noqa: B018 (not known before the first answer)
            v1.query(images(2))
            assert v1.num_classes == 10
        with connect(url, input_shape=SHAPE, offers_explanation=False) as v1:
            with pytest.raises(ExplanationNotOffered):
                v1.query(images(1), True)
        assert s.app.state.ledger.total_used() == 2


def stub_app(victim, reply):
    """A V1 server of `victim` that takes images channels last (H, W, C) and whose
    ``:predict`` and ``:explain`` answer `reply(answer, parsed)` (megex's own answer)."""
    oracle = LocalOracle(victim)
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"models": ["m"]}

    @app.get("/v1/models/m")
    def ready():
        return {"name": "m", "ready": True}

    @app.post("/v1/models/m:{verb}")
    async def answer(verb: str, request: Request):
        doc = await request.json()
        x = torch.tensor(doc["instances"]).permute(0, 3, 1, 2)
        spec = Explanation(**doc["parameters"]) if "parameters" in doc else True
        answer = oracle.query(x, spec if verb == "explain" else None)
        return JSONResponse(reply(answer, Parsed(x, spec)))

    return app


def channels_last_vertex(answer, parsed):
    """megex's ExplainResponse with its maps channels last, predictions as objects."""
    doc = json.loads(render_v1_explain(answer, parsed, "m")[0])
    for item in doc["explanations"]:
        for attribution in item["attributions"]:
            chw = torch.tensor(attribution["featureAttributions"]["images"])
            attribution["featureAttributions"] = {"pixels": chw.permute(1, 2, 0).tolist()}
    doc["predictions"] = [{"probabilities": p, "classes": 0} for p in doc["predictions"]]
    return doc


def test_channels_last_and_named_outputs(victim):
    local = LocalOracle(victim)
    x = images(3)
    with ServerThread(stub_app(victim, channels_last_vertex)) as s:
        with connect(s.url, input_shape=SHAPE, layout="hwc") as v1:
            assert isinstance(v1, RemoteV1Oracle) and v1.name == "m"
            for spec in (None, Explanation(target="all"), Explanation(target=4)):
                assert_same_answer(v1.query(x, spec), local.query(x, spec))
            assert v1.queries_used == 0 and v1.budget == float("inf")  # no ledger, no headers
        with connect(s.url, input_shape=SHAPE, layout="hwc", probabilities_key="p") as v1:
            with pytest.raises(ServiceError, match="has no 'p'.*'probabilities', 'classes'"):
                v1.query(x)


def test_a_reply_without_the_predictions_field_names_it(victim):
    def no_predictions(answer, parsed):
        return {"outputs": answer.probabilities.tolist()}

    with ServerThread(stub_app(victim, no_predictions)) as s:
        with connect(s.url, input_shape=SHAPE, layout="hwc") as v1:
            with pytest.raises(ServiceError, match="no 'predictions' field .*'outputs'"):
                v1.query(images(2))
        with connect(s.url, input_shape=SHAPE, layout="hwc", predictions_field="outputs") as v1:
            got = v1.query(images(2))
            torch.testing.assert_close(
                got.probabilities, LocalOracle(victim).query(images(2)).probabilities
            )
            with pytest.raises(ServiceError, match="no 'explanations' field"):
                v1.query(images(2), True)


def test_megex_attack_finds_a_v1_only_server(victim, tmp_path, capsys):
    with ServerThread(V1Only(create_app(victim, keys={V1_KEY: 400}))) as s:
        argv = ["attack", "--victim", s.url, "--api-key", V1_KEY, "--budget", "400"]
        argv += ["--batch-size", "32", "--quiet"]
        out = tmp_path / "run"
        assert main(argv + ["--dataset", "digits", "--out", str(out)]) == 0
        used = s.app.state.ledger.total_used()
        # Bad options are refused before any query, naming the option.
        assert main(argv + ["--out", str(tmp_path / "r2")]) == 2
        assert "--dataset: " in capsys.readouterr().err
        binary = ["--dataset", "digits", "--encoding", "binary", "--out", str(tmp_path / "r3")]
        assert main(argv + binary) == 2
        assert "--encoding: binary tensors" in capsys.readouterr().err
        assert s.app.state.ledger.total_used() == used
    result = json.loads((out / "result.json").read_text())
    assert result["finished"] and 0 < result["queries_used"] == used <= 400


def test_protocol_options_are_for_a_url(tmp_path, capsys):
    from megex import client
    from megex.cli import attack

    assert attack.PROTOCOLS == client.PROTOCOLS and attack.ENCODINGS == client.ENCODINGS
    path = tiny_victim().save(tmp_path / "v.safetensors")
    argv = ["attack", "--victim", str(path), "--budget", "100", "--out", str(tmp_path / "r")]
    assert main(argv + ["--protocol", "v1"]) == 2
    assert "--protocol: a victim file" in capsys.readouterr().err


def test_an_audit_target_speaks_v1_where_the_server_does(victim, tmp_path):
    x, y = data_mod.load("digits").test_tensors()
    with ServerThread(V1Only(create_app(victim, keys=[V1_KEY]))) as s:
        target = resolve_target(s.url, tmp_path, "digits", V1_KEY)
        assert target.protocol == "v1" and target.classes == 10
        options = target.client_options()
        assert options == {
            "protocol": "v1",
            "encoding": "auto",
            "input_shape": list(SHAPE),
            "num_classes": 10,
        }
        with connect(target.location, V1_KEY, **options) as remote:
            assert isinstance(remote, RemoteV1Oracle) and remote.queries_used == len(x)
    assert target.accuracy == pytest.approx(evaluate.accuracy(victim, x, y))
