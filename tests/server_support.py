"""Shared helpers of the server and client tests: a tiny victim and a real uvicorn server."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import torch

from megex import Victim
from megex.models import SmallCNN

SHAPE = (1, 8, 8)


def tiny_victim(seed: int = 0) -> Victim:
    """A digits-sized SmallCNN with random weights: fast, and its gradients are not zero."""
    torch.manual_seed(seed)
    return Victim(SmallCNN(10, 1, 8), SHAPE, 10, arch="small_cnn", dataset="digits").eval()


def save_tiny_victim(folder: Path, seed: int = 0) -> Path:
    return tiny_victim(seed).save(Path(folder) / "v.safetensors")


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def wait_until_ready(url: str, process: subprocess.Popen, seconds: float = 30) -> None:
    """Wait for a server process (`megex serve`) at `url` to answer its readiness probe."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"the server at {url} did not start: {output}")
        time.sleep(0.05)


class ServerThread:
    """Runs an ASGI app with uvicorn on a free loopback port in a background thread."""

    def __init__(self, app, **config):
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, log_level="warning", access_log=False, **config)
        self.server = uvicorn.Server(cfg)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
