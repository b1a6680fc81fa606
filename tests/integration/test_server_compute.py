"""Compute is priced apart from queries: model passes per request and per key, and keys take
turns on the compute chunk by chunk, over a real uvicorn server on a loopback port."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from megex import Explanation, LocalOracle
from megex.compute import TurnLock, passes_per_image

pytest.importorskip("fastapi")

from server_support import ServerThread, images, tiny_victim  # noqa: E402

from megex.serving import create_app  # noqa: E402

torch.set_num_threads(1)

NAME = "model"
V1P, V1E = f"/v1/models/{NAME}:predict", f"/v1/models/{NAME}:explain"


@pytest.fixture(scope="module")
def victim():
    return tiny_victim()


def test_passes_per_image_counts_forward_and_backward_passes():
    assert passes_per_image(None, 10) == 1
    assert passes_per_image(Explanation("gradient"), 10) == 1 + 2
    assert passes_per_image(Explanation("input_x_gradient", target="all"), 10) == 1 + 11
    assert passes_per_image(Explanation("smoothgrad", samples=5), 10) == 1 + 5 * 2
    ig = Explanation("integrated_gradients", target="all", steps=256)
    assert passes_per_image(ig, 10) == 2817


def test_turn_lock_serves_parties_in_rotation():
    lock, order = TurnLock(), []

    def party(name: str, turns: int) -> None:
        for _ in range(turns):
            with lock.turn(name):
                order.append(name)

    lock.acquire("holder")
    first = threading.Thread(target=party, args=("a", 3))
    second = threading.Thread(target=party, args=("b", 2))
    first.start()
    while "a" not in lock._waiting:
        time.sleep(0.001)
    second.start()
    while "b" not in lock._waiting:
        time.sleep(0.001)
    lock.release()
    first.join()
    second.join()
    assert order == ["a", "b", "a", "b", "a"]


def test_compute_is_limited_per_request_and_per_key(victim):
    ig = {"method": "integrated_gradients", "stepCount": 16, "target": "all"}  # 177 passes
    app = create_app(
        victim,
        keys={"a": None, "b": None},
        max_passes_per_request=400,
        compute_rate=100.0,
        compute_burst=400,
    )
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        a, b = {"x-api-key": "a"}, {"x-api-key": "b"}
        r = http.post(V1E, json={"instances": images(3).tolist(), "parameters": ig}, headers=a)
        assert r.status_code == 400 and r.json()["code"] == "compute_limit"
        assert r.json()["passes"] == 3 * 177 and "fewer images" in r.json()["error"]
        r = http.post(V1E, json={"instances": images(2).tolist(), "parameters": ig}, headers=a)
        assert r.status_code == 200 and r.headers["X-Model-Passes"] == "354"
        # 354 of the 400 passes in a's bucket are spent; b's bucket is its own.
        r = http.post(V1E, json={"instances": images(1).tolist(), "parameters": ig}, headers=a)
        assert r.status_code == 429 and r.json()["code"] == "compute_rate_limited"
        assert int(r.headers["Retry-After"]) >= 1 and r.json()["retry_after_s"] > 1.0
        r = http.post(V1E, json={"instances": images(2).tolist(), "parameters": ig}, headers=b)
        assert r.status_code == 200
        # The query ledger still counts images: 2 + 2, whatever they cost to compute.
        assert s.app.state.ledger.total_used() == 4


def test_a_slow_key_does_not_hold_a_fast_key_up(victim):
    # Integrated gradients over every class: 1 + 32 * 11 = 353 passes per image, computed
    # two images per chunk; a prediction costs one pass.
    spec = Explanation("integrated_gradients", target="all", steps=32)
    n_slow, per_chunk = 24, 2
    app = create_app(victim, keys=["slow", "fast"], chunk_passes=per_chunk * 353)
    slow_body = {"instances": images(n_slow, seed=1).tolist(), "parameters": spec.to_dict()}
    fast_body = {"instances": images(1, seed=2).tolist()}
    with ServerThread(app) as s:
        http = httpx.Client(base_url=s.url, timeout=60)
        slow: dict = {}

        def send_slow() -> None:
            start = time.perf_counter()
            slow["response"] = http.post(V1E, json=slow_body, headers={"x-api-key": "slow"})
            slow["seconds"] = time.perf_counter() - start

        thread = threading.Thread(target=send_slow)
        thread.start()
        while s.app.state.ledger.total_used() < n_slow:  # charged: computing now
            time.sleep(0.005)
        time.sleep(0.05)
        start = time.perf_counter()
        fast = http.post(V1P, json=fast_body, headers={"x-api-key": "fast"})
        fast_seconds = time.perf_counter() - start
        thread.join()
        http.close()
    assert fast.status_code == 200 and slow["response"].status_code == 200
    chunk_seconds = slow["seconds"] / (n_slow / per_chunk)
    # The fast request waits for at most the chunk being computed (plus the time to answer
    # it), not for the whole slow request.
    assert fast_seconds < 2 * chunk_seconds + 0.1, (fast_seconds, chunk_seconds)
    assert fast_seconds < slow["seconds"] / 3
    # Chunks answer as one batch would.
    want = LocalOracle(victim).query(images(n_slow, seed=1), spec).explanation
    got = [
        [a["featureAttributions"]["images"] for a in item["attributions"]]
        for item in slow["response"].json()["explanations"]
    ]
    torch.testing.assert_close(torch.tensor(got), want, rtol=1e-5, atol=1e-7)
