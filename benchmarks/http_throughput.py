"""Throughput and latency of the victim over HTTP against the same victim in-process.

For each victim (a digits-sized SmallCNN on 1x8x8 and a LeNet-5 on 1x28x28, random weights)
and batch size, measures predictions (queries/s) and gradient explanations (queries/s,
latency p50/p99) through:

- in-process: ``LocalOracle.query``;
- V2 binary / V2 JSON: ``RemoteOracle`` with the binary tensor extension or plain JSON;
- V1 JSON: raw ``:predict`` / ``:explain`` requests (Vertex AI payloads) with httpx.

The server runs in its own process (``python -m megex serve``) on a loopback port, as a
user would run it, and the table gives each rate as a ratio to in-process.

    python benchmarks/http_throughput.py [--duration 1.0] [--batches 1 64 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from megex import LocalOracle, Victim
from megex.client import RemoteOracle
from megex.models import build_classifier

VICTIMS = {
    "small_cnn 1x8x8": ("small_cnn", (1, 8, 8), "digits"),
    "lenet5 1x28x28": ("lenet5", (1, 28, 28), "fashion-mnist"),
}


def make_victim(arch: str, shape: tuple[int, int, int], dataset: str) -> Victim:
    torch.manual_seed(0)
    model = build_classifier(arch, 10, shape[0], shape[1])
    return Victim(model, shape, 10, arch=arch, dataset=dataset).eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(victim_path: Path, db: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "megex", "serve", "--victim", str(victim_path),
           "--port", str(port), "--db", str(db), "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/v2/health/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start within 60 s")


def measure(fn: Callable[[], object], batch: int, duration: float) -> dict[str, float]:
    """Queries/s and per-request latency of `fn` over at least `duration` s and 5 calls."""
    for _ in range(2):
        fn()
    latencies: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration or len(latencies) < 5:
        t0 = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    latencies.sort()
    return {
        "qps": batch * len(latencies) / total,
        "p50": statistics.median(latencies) * 1e3,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
    }


def oracle_callers(oracle, x: torch.Tensor) -> tuple[Callable[[], object], ...]:
    return (lambda: oracle.query(x)), (lambda: oracle.query(x, explanation=True))


def v1_caller(http: httpx.Client, url: str, x: torch.Tensor, verb: str) -> Callable[[], object]:
    def call() -> object:
        body = {"instances": x.tolist()}
        r = http.post(f"{url}:{verb}", json=body)
        r.raise_for_status()
        return r.json()

    return call


def bench_victim(label: str, victim: Victim, url: str, batches: list[int], duration: float):
    local = LocalOracle(victim)
    name = "model"  # the server's default name
    binary = RemoteOracle(f"{url}/v2/models/{name}", protocol="binary")
    plain = RemoteOracle(f"{url}/v2/models/{name}", protocol="json")
    http = httpx.Client(timeout=120)
    v1_url = f"{url}/v1/models/{name}"
    rows = []
    for batch in batches:
        x = torch.rand(batch, *victim.input_shape, generator=torch.Generator().manual_seed(batch))
        modes = {
            "in-process": oracle_callers(local, x),
            "V2 binary": oracle_callers(binary, x),
            "V2 JSON": oracle_callers(plain, x),
            "V1 JSON": (
                v1_caller(http, v1_url, x, "predict"),
                v1_caller(http, v1_url, x, "explain"),
            ),
        }
        base = None
        for mode, (predict, explain) in modes.items():
            p = measure(predict, batch, duration)
            e = measure(explain, batch, duration)
            base = base or (p, e)
            rows.append((label, batch, mode, p, e, base))
            print(f"  {label} batch {batch:4d} {mode:11s} predict {p['qps']:9.0f} q/s  "
                  f"explain {e['qps']:8.0f} q/s  p50 {e['p50']:7.2f} ms  p99 {e['p99']:7.2f} ms",
                  file=sys.stderr)  # fmt: skip
    binary.close()
    plain.close()
    http.close()
    return rows


def table(rows) -> str:
    lines = [
        "| victim | batch | path | predict q/s | x in-process | explain q/s | x in-process "
        "| explain p50 ms | explain p99 ms |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, batch, mode, p, e, (bp, be) in rows:
        lines.append(
            f"| {label} | {batch} | {mode} | {p['qps']:,.0f} | {p['qps'] / bp['qps']:.2f} "
            f"| {e['qps']:,.0f} | {e['qps'] / be['qps']:.2f} | {e['p50']:.2f} | {e['p99']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--victims", nargs="+", choices=list(VICTIMS), default=list(VICTIMS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the in-process oracle and of the server (default: 1, which is "
        "fastest for these small models and steadiest on a shared machine)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        file=sys.stderr,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.victims:
            arch, shape, dataset = VICTIMS[label]
            victim = make_victim(arch, shape, dataset)
            path = victim.save(Path(tmp) / f"{arch}.safetensors")
            proc, url = start_server(path, Path(tmp) / f"{arch}.sqlite", args.threads)
            try:
                rows += bench_victim(label, victim, url, args.batches, args.duration)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
