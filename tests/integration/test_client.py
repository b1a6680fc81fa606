"""RemoteOracle: the Oracle protocol over HTTP, against a real server on a loopback port."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

import megex
from megex import BudgetExceeded, Explanation, ExplanationNotOffered, InvalidQuery, LocalOracle
from megex.oracle import Oracle

pytest.importorskip("fastapi")

from server_support import ServerThread, images, tiny_victim  # noqa: E402

from megex.client import RemoteOracle, ServiceError  # noqa: E402
from megex.serving import create_app  # noqa: E402

torch.set_num_threads(1)

NAME = "model"
KEY = "client-key"


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


@pytest.fixture
def server(victim):
    with ServerThread(create_app(victim, keys={KEY: 500})) as s:
        yield s


def test_remote_oracle_equals_local_oracle(server, victim):
    local = LocalOracle(victim)
    specs = [
        None,
        True,
        Explanation("gradient", target="all", output="logit"),
        Explanation("integrated_gradients", target=2, steps=4),
    ]
    for encoding in ("json", "binary", "auto"):
        with RemoteOracle(server.url, KEY, encoding=encoding) as remote:
            assert isinstance(remote, Oracle)
            assert remote.input_shape == (1, 8, 8) and remote.num_classes == 10
            for n in (3, 20):
                x = images(n, seed=n)
                for spec in specs:
                    got, want = remote.query(x, spec), local.query(x, spec)
                    torch.testing.assert_close(
                        got.probabilities, want.probabilities, rtol=0, atol=1e-5
                    )
                    assert torch.equal(got.labels, want.labels)
                    assert got.prediction == want.prediction and got.logits is None
                    assert got.explanation_spec == want.explanation_spec
                    if want.explanation is None:
                        assert got.explanation is None
                    else:
                        assert got.explanation.shape == want.explanation.shape
                        torch.testing.assert_close(
                            got.explanation, want.explanation, rtol=1e-5, atol=1e-7
                        )
    assert server.app.state.ledger.total_used() == 3 * (3 + 20) * len(specs)


def test_logits_mode_and_target_all_shapes(victim):
    app = create_app(victim, prediction="logits", explanation=Explanation(target="all"))
    with ServerThread(app) as s, RemoteOracle(s.url) as remote:
        x = images(4)
        got = remote.query(x, explanation=True)
        want = LocalOracle(victim, prediction="logits", explanation=Explanation(target="all"))
        want = want.query(x, explanation=True)
        assert got.prediction == "logits" and got.explanation.shape == (4, 10, 1, 8, 8)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
        assert remote.budget == float("inf") and remote.queries_used == 4


@pytest.mark.parametrize(
    "suffix", ["", "/", f"/v2/models/{NAME}", f"/v2/models/{NAME}/", f"/v1/models/{NAME}"]
)
def test_url_may_be_root_or_model(server, suffix):
    with RemoteOracle(server.url + suffix, KEY) as remote:
        assert remote.name == NAME and remote.root == server.url


def test_counts_and_errors_map_to_oracle_exceptions(server):
    remote = RemoteOracle(server.url, KEY)
    assert (remote.queries_used, remote.remaining, remote.budget) == (0, 500, 500)
    remote.query(images(498))
    assert (remote.queries_used, remote.remaining) == (498, 2)
    with pytest.raises(BudgetExceeded) as exc:
        remote.query(images(3))
    assert (exc.value.requested, exc.value.remaining, exc.value.budget) == (3, 2, 500)
    with pytest.raises(InvalidQuery):
        remote.query(torch.rand(2, 1, 8, 9))  # refused locally, never sent
    with pytest.raises(InvalidQuery):
        remote.query(torch.full((2, 1, 8, 8), 2.0))
    remote._input_shape = (1, 4, 16)  # now the server refuses it: its 400 maps the same way
    with pytest.raises(InvalidQuery, match="does not match"):
        remote.query(torch.rand(1, 1, 4, 16))
    remote._input_shape = (1, 8, 8)
    assert server.app.state.ledger.total_used() == 498
    remote.query(images(2))
    assert remote.remaining == 0
    remote.close()
    with pytest.raises(ServiceError, match="401"):
        RemoteOracle(server.url, "wrong-key")


def test_explanation_refusals(victim):
    app = create_app(victim, allow_explanation_choice=False)
    with ServerThread(app) as s, RemoteOracle(s.url) as remote:
        assert remote.query(images(1), explanation=Explanation("gradient")).explanation is not None
        with pytest.raises(ExplanationNotOffered):
            remote.query(images(1), explanation=Explanation("smoothgrad"))
        with pytest.raises(ExplanationNotOffered):
            remote.query(images(1), explanation=Explanation(target=12))
    with ServerThread(create_app(victim, explanation=None)) as s, RemoteOracle(s.url) as remote:
        with pytest.raises(ExplanationNotOffered):
            remote.query(images(1), explanation=True)
        assert s.app.state.ledger.total_used() == 0


class LoseFirstResponse(httpx.BaseTransport):
    """Delivers the first POST to the server, then drops its response, as a network might."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.keys: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST":
            self.keys.append(request.headers["idempotency-key"])
            if len(self.keys) == 1:
                response.read()
                response.close()
                raise httpx.ReadError("simulated lost response", request=request)
        return response


def test_retry_after_lost_response_is_not_charged_twice(server, victim):
    remote = RemoteOracle(server.url, KEY, backoff=0.01)
    transport = LoseFirstResponse()
    remote._http = httpx.Client(transport=transport, headers=remote._http.headers)
    x = images(5)
    answer = remote.query(x, explanation=True)
    assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
    assert server.app.state.ledger.total_used() == 5 == remote.queries_used
    want = LocalOracle(victim).query(x, explanation=True)
    torch.testing.assert_close(answer.explanation, want.explanation, rtol=1e-5, atol=1e-7)
    remote.close()


def test_retry_after_server_error_is_refunded(server):
    responder = server.app.state.service.responder
    real, failures = responder.answer, []

    def flaky(x, explanation=None, party=0):
        if not failures:
            failures.append(len(x))
            raise RuntimeError("simulated failure")
        return real(x, explanation, party)

    responder.answer = flaky
    try:
        with RemoteOracle(server.url, KEY, backoff=0.01) as remote:
            remote.query(images(6))
            assert failures == [6] and remote.queries_used == 6
    finally:
        del responder.answer
    assert server.app.state.ledger.total_used() == 6


class TimeOutFirstAttempt(httpx.BaseTransport):
    """The first request reaches the server, but the client gives up waiting for it."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()
        self.statuses: list[int] = []
        self.background: threading.Thread | None = None

    def handle_request(self, request):
        if self.background is None:
            request.read()

            def deliver():
                self.inner.handle_request(request).read()

            self.background = threading.Thread(target=deliver)
            self.background.start()
            raise httpx.ReadTimeout("simulated timeout", request=request)
        response = self.inner.handle_request(request)
        self.statuses.append(response.status_code)
        return response


def test_retry_while_first_attempt_computes_waits_and_pays_once(server, victim):
    responder = server.app.state.service.responder
    real = responder.answer

    def slow(x, explanation=None, party=0):
        time.sleep(1.0)
        return real(x, explanation, party)

    responder.answer = slow
    before = server.app.state.ledger.total_used()
    try:
        remote = RemoteOracle(server.url, KEY, backoff=0.05)
        transport = TimeOutFirstAttempt()
        remote._http = httpx.Client(transport=transport, headers=remote._http.headers)
        x = images(3)
        answer = remote.query(x)
        transport.background.join()
    finally:
        del responder.answer
    assert 409 in transport.statuses and transport.statuses[-1] == 200
    assert server.app.state.ledger.total_used() == before + 3
    torch.testing.assert_close(answer.probabilities, LocalOracle(victim).query(x).probabilities)
    remote.close()


def test_unreachable_server_raises_service_error():
    with ServerThread(create_app(tiny_victim())) as s:
        url = s.url
    start = time.monotonic()
    with pytest.raises(ServiceError, match="no answer after 2 attempts"):
        RemoteOracle(url, retries=1, backoff=0.01, timeout=2)
    assert time.monotonic() - start < 5


def test_rate_limited_client_waits_and_counts_right(victim):
    with ServerThread(create_app(victim, keys=[KEY], rate_limit=20.0, rate_burst=1)) as s:
        with RemoteOracle(s.url, KEY) as remote:
            for _ in range(6):
                remote.query(images(2))
            assert remote.queries_used == 12 == s.app.state.ledger.total_used()


def test_concurrent_remote_oracles(victim):
    keys = [f"key-{i}" for i in range(4)]
    with ServerThread(create_app(victim, keys=keys)) as s:
        oracles = [RemoteOracle(s.url, k) for k in keys]
        sent = [0] * 4

        def work(i: int) -> None:
            for j in range(25):
                oracles[i].query(images(4, seed=100 * i + j), explanation=bool(j % 2))
                sent[i] += 4

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ledger = s.app.state.ledger
        assert ledger.total_used() == sum(sent) == 400
        for key, oracle, n in zip(keys, oracles, sent):
            assert oracle.queries_used == n == ledger.usage(ledger.authenticate(key).id).used
            oracle.close()


def test_megex_attack_over_http_is_counted_by_the_server(victim):
    attacks = pytest.importorskip("megex.attacks")
    with ServerThread(create_app(victim, keys={KEY: 2000})) as s:
        with RemoteOracle(s.url, KEY) as oracle:
            attack = attacks.MEGEX(seed=0, batch_size=64)
            result = megex.run(attack, oracle, budget=2000)
            assert 0 < result.queries_used <= 2000
            assert s.app.state.ledger.total_used() == result.queries_used == oracle.queries_used
