"""What clients can cost the HTTP service, measured on `megex serve` in its own process.

- memory: the server's peak resident memory (VmHWM, reset before each request) while it
  refuses, or answers, the largest requests that its default limits let through;
- compute turns: the latency of one key's one-image prediction while another key's request
  of integrated gradients (256 steps, every class) over many images is being computed;
- stored responses: the ledger file after many idempotent all-class explanation requests
  (as RemoteOracle sends them), and after their time to live has passed.

    python benchmarks/service_costs.py [--slow-images 100] [--stored-requests 24]

Linux only (it reads /proc). Prints a markdown table per measurement.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from megex import Explanation, Victim
from megex.client import RemoteOracle
from megex.models import build_classifier

NAME = "model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m megex.serve_cli` on a loopback port, with the keys given."""

    def __init__(self, victim: Path, db: Path, keys: dict[str, int | None], *extra: str):
        keys_file = db.with_suffix(".keys")
        keys_file.write_text(
            "".join(f"{k},{b}\n" if b is not None else f"{k}\n" for k, b in keys.items())
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "megex.serve_cli", "--victim", str(victim), "--port",
               str(self.port), "--db", str(db), "--keys", str(keys_file), "--log-level",
               "warning", *extra]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read()!r}")
            time.sleep(0.1)

    def peak_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    def reset_peak(self) -> float:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self.peak_mb()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def victim_file(folder: Path, arch: str, shape: tuple[int, int, int], dataset: str) -> Path:
    torch.manual_seed(0)
    model = build_classifier(arch, 10, shape[0], shape[1])
    return (
        Victim(model, shape, 10, arch=arch, dataset=dataset)
        .eval()
        .save(folder / f"{arch}.safetensors")
    )


def memory(folder: Path) -> None:
    victim = victim_file(folder, "small_cnn", (1, 8, 8), "digits")
    server = Server(victim, folder / "m.sqlite", {"broke": 0, "paying": None})
    image = b"[[" + b",".join([b"[" + b",".join([b"0"] * 8) + b"]"] * 8) + b"]]"
    bomb = gzip.compress(b'{"instances": [' + b",".join([image] * 120_000) + b"]}")
    most = (1 << 20) // 64 - 1  # images whose values fill the default JSON limit
    largest_json = json.dumps({"instances": np.random.rand(most, 1, 8, 8).round(6).tolist()})
    binary = np.random.rand(100_000, 1, 8, 8).astype("<f4").tobytes()  # 25.6 MB, under 32 MB
    tensor = {"name": "images", "datatype": "FP32", "shape": [100_000, 1, 8, 8]}
    tensor["parameters"] = {"binary_data_size": len(binary)}
    header = json.dumps({"inputs": [tensor]}).encode()
    v1, v2 = "/v1/models/model:predict", f"/v2/models/{NAME}/infer"
    gz = {"Content-Encoding": "gzip"}
    paying = {"x-api-key": "paying"}
    cases = [
        ("no key, 50 KB gzip of 7.7M JSON values", v1, bomb, gz),
        ("key with no query left, same body", v1, bomb, {**gz, "x-api-key": "broke"}),
        ("key with queries, same body", v1, bomb, {**gz, **paying}),
        (f"key with queries, {most:,} images in JSON ({len(largest_json) / 1e6:.1f} MB)",
         v1, largest_json.encode(), paying),
        ("key with queries, 100,000 images as binary (25.6 MB)", v2, header + binary,
         {**paying, "Inference-Header-Content-Length": str(len(header))}),
    ]  # fmt: skip
    print("| request | status | peak memory added (MB) | seconds |\n| --- | ---: | ---: | ---: |")
    with httpx.Client(base_url=server.url, timeout=300) as http:
        for label, path, body, headers in cases:
            base = server.reset_peak()
            start = time.perf_counter()
            r = http.post(path, content=body, headers=headers)
            seconds = time.perf_counter() - start
            print(f"| {label} | {r.status_code} | {server.peak_mb() - base:.0f} | {seconds:.2f} |")
    server.close()


def turns(folder: Path, slow_images: int) -> None:
    victim = victim_file(folder, "small_cnn", (1, 8, 8), "digits")
    print("| chunk passes | slow request (s) | fast prediction p50 (s) | max (s) |")
    print("| --- | ---: | ---: | ---: |")
    for chunk in (4096, 32768, 10**9):
        keys = {"slow": None, "fast": None}
        limits = ["--chunk-passes", str(chunk), "--max-passes-per-request", str(10**9)]
        server = Server(victim, folder / f"t{chunk}.sqlite", keys, *limits)
        slow_seconds, waits = _slow_and_fast(server.url, slow_images)
        label = chunk if chunk < 10**9 else "whole request (as before)"
        p50 = statistics.median(waits)
        print(f"| {label} | {slow_seconds:.1f} | {p50:.2f} | {max(waits):.2f} |")
        server.close()


def _slow_and_fast(url: str, slow_images: int) -> tuple[float, list[float]]:
    """Seconds of a slow key's request of integrated gradients (256 steps, every class), and
    the latencies of a fast key's predictions sent meanwhile."""
    spec = Explanation("integrated_gradients", target="all", steps=256).to_dict()
    slow_body = {"instances": np.random.rand(slow_images, 1, 8, 8).tolist(), "parameters": spec}
    fast_body = {"instances": np.random.rand(1, 1, 8, 8).tolist()}
    seconds: list[float] = []

    def slow() -> None:
        start = time.perf_counter()
        headers = {"x-api-key": "slow"}
        httpx.post(url + "/v1/models/model:explain", json=slow_body, headers=headers, timeout=600)
        seconds.append(time.perf_counter() - start)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(1.0)
    waits = []
    with httpx.Client(base_url=url, headers={"x-api-key": "fast"}, timeout=600) as http:
        while thread.is_alive():
            start = time.perf_counter()
            http.post("/v1/models/model:predict", json=fast_body)
            waits.append(time.perf_counter() - start)
            time.sleep(0.5)
    thread.join()
    return seconds[0], waits


def stored(folder: Path, requests: int) -> None:
    victim = victim_file(folder, "lenet5", (1, 28, 28), "fashion-mnist")
    db = folder / "s.sqlite"
    server = Server(victim, db, {"k": None}, "--idempotency-ttl", "20")
    spec = Explanation("gradient", target="all")
    x = torch.rand(256, 1, 28, 28)

    def file_mb() -> float:
        return sum(p.stat().st_size for p in folder.glob("s.sqlite*")) / 2**20

    with RemoteOracle(server.url, "k", protocol="binary") as remote:
        for _ in range(requests):
            remote.query(x, spec)
    print("| moment | ledger file (MB) |\n| --- | ---: |")
    print(
        f"| after {requests} requests of 256 all-class explanations (8 MB each) | {file_mb():.0f} |"
    )
    time.sleep(21)
    with RemoteOracle(server.url, "k", protocol="binary") as remote:
        remote.query(x[:1])
    print(f"| after their time to live (20 s here), at the next request | {file_mb():.1f} |")
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow-images", type=int, default=100)
    parser.add_argument("--stored-requests", type=int, default=24)
    args = parser.parse_args(argv)
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread in the server\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        memory(folder)
        print()
        turns(folder, args.slow_images)
        print()
        stored(folder, args.stored_requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
