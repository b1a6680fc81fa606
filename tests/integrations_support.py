"""What the tests of the model servers of megex.integrations share: whether KServe and
MLServer are there (skipped when missing, failed when MEGEX_REQUIRE_SERVERS=1, as in CI), the
servers started as processes on loopback ports, and the counts they report."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
from server_support import save_tiny_victim

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
# What the servers run with: megex from the checkout, one thread each (small machines).
SERVER_ENV = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
# KServe's model's log line for each answered request: "...; N in all".
TOTAL = re.compile(r"answered (\d+) image\(s\).*; (\d+) in all")


def servers_required() -> bool:
    """CI sets MEGEX_REQUIRE_SERVERS=1: there a missing server is a failure, not a skip."""
    return os.environ.get("MEGEX_REQUIRE_SERVERS") == "1"


def require_kserve() -> None:
    """Skip (the module, at its top) without KServe, unless servers are required."""
    if not servers_required():
        pytest.importorskip("kserve", reason="needs the kserve extra: pip install 'megex[kserve]'")


def mlserver_executable() -> str | None:
    """`mlserver` beside this Python, else .venv-mlserver's (`make test` makes it: MLServer
    pins older FastAPI and Starlette than megex's server needs); None when neither exists."""
    found = shutil.which("mlserver", path=str(Path(sys.executable).parent))
    local = ROOT / ".venv-mlserver" / "bin" / "mlserver"
    return found or (str(local) if local.is_file() else None)


def require_mlserver() -> str:
    """The `mlserver` executable; skips without it, unless servers are required."""
    mlserver = mlserver_executable()
    if mlserver is None:
        if servers_required():
            pytest.fail("MLServer is not installed (make test installs it in .venv-mlserver)")
        pytest.skip("MLServer is not installed (pip install 'megex[mlserver]')")
    return mlserver


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(
    argv: Sequence[str], ready_url: str, log: Path, cwd: Path | None = None, seconds: float = 90
) -> Iterator[subprocess.Popen]:
    """A server started from `argv` (output to `log`), once `ready_url` answers 200; stopped
    on exit (terminated, killed after 15 s)."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=os.environ | SERVER_ENV
        )
    try:
        deadline = time.monotonic() + seconds
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(ready_url).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv)} did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def kserve_server(folder: Path, *options: str) -> Iterator[tuple[str, Path]]:
    """KServe's ModelServer serving a tiny victim: (model URL, the server's log file)."""
    victim = save_tiny_victim(folder)
    port = free_port()
    log = folder / "server.log"
    argv = [sys.executable, "-m", "megex.integrations.kserve", "--victim", str(victim)]
    argv += ["--http-port", str(port), *options]
    root = f"http://127.0.0.1:{port}"
    with server_process(argv, f"{root}/v2/health/ready", log):
        yield f"{root}/v2/models/model", log


def answered(log: Path) -> tuple[int, int]:
    """(images answered, summed over the KServe log's request lines; the server's running
    count)."""
    lines = TOTAL.findall(log.read_text())
    return sum(int(n) for n, _ in lines), int(lines[-1][1]) if lines else 0


def mlserver_count(model_url: str) -> int:
    """The MegexRuntime's count, from the model metadata's parameters."""
    return httpx.get(model_url).json()["parameters"]["queries_used"]


def mlserver_settings(http_port: int) -> dict:
    """MLServer's settings.json on loopback: free ports (gRPC and metrics too, so that two
    servers can run side by side) and one process, so that one ledger counts every query."""
    ports = {"http_port": http_port, "grpc_port": free_port(), "metrics_port": free_port()}
    return {"host": "127.0.0.1", **ports, "parallel_workers": 0}
