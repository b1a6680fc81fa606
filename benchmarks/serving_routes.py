"""The cost of each serving route per 1,000 queries, side by side in one run.

Routes (each server in its own process on a loopback port, one worker, OMP_NUM_THREADS=1,
with its default logging, written to a file):

- in-process: ``LocalOracle.query`` on one torch thread, the floor;
- megex serve: ``megex serve`` (open, a temporary SQLite ledger), V2 JSON and V2 binary; as
  by default, it counts every request in its ledger and keeps each response there for a
  retry under the same idempotency key (KServe and MLServer count in memory and keep none);
- KServe: KServe's ModelServer running ``megex.integrations.kserve``, JSON and binary (it
  accepts the binary tensor extension although its metadata does not list it);
- MLServer: ``mlserver start`` running ``megex.integrations.mlserver``, JSON only (MLServer
  has no binary REST). MLServer runs from the environment it was installed in (``mlserver``
  next to this Python, else .venv-mlserver/bin/mlserver) with PYTHONPATH=src.

Every route answers the same fixed images (a digits-sized SmallCNN victim with random
weights, or --victim FILE), in batches of --batch, --queries images per measurement, with
gradient maps of every class and without maps, through ``RemoteOracle``. Measurements are
interleaved (each repeat times every route once) so that a change in the machine's load
reaches every route alike; the table gives the median of --repeats with min and max, and
the ratio of medians to in-process. Each route's answers to the first batch (maps and no
maps) are checked against LocalOracle's with the same seed; a mismatch is printed and makes
the exit status 1. A route whose server is not installed is skipped with its reason.

    python benchmarks/serving_routes.py [--queries 5000] [--batch 128] [--repeats 3]
        [--routes local megex kserve mlserver] [--victim FILE] [--out DIR]

Figures go to the terminal and to --out (serving-routes.json and serving-routes.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package lives in src/.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402
import torch  # noqa: E402

from megex import Explanation, LocalOracle, Victim  # noqa: E402
from megex.client import RemoteOracle  # noqa: E402
from megex.models import SmallCNN  # noqa: E402
from megex.oracle import Answer  # noqa: E402
from megex.runs import write_json_atomic  # noqa: E402

SERVERS = ("megex", "kserve", "mlserver")
ROUTES = ("local", *SERVERS)
MODEL = "model"
SEED = 0
MAPS = Explanation("gradient", target="all")
# Answers agree to float32 rounding: JSON carries each value's shortest repr.
TOLERANCE = 1e-6
START_SECONDS = 120.0


@dataclass
class Row:
    """One route and protocol, with or without maps: its timings and its first-batch check."""

    route: str
    protocol: str
    maps: bool
    seconds: list[float]
    mismatch: str | None = None


def tiny_victim() -> Victim:
    """A digits-sized SmallCNN with random weights (as the tests' tiny victim)."""
    torch.manual_seed(SEED)
    return Victim(SmallCNN(10, 1, 8), (1, 8, 8), 10, arch="small_cnn", dataset="digits").eval()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlserver_command() -> str | None:
    found = shutil.which("mlserver", path=str(Path(sys.executable).parent))
    local = ROOT / ".venv-mlserver" / "bin" / "mlserver"
    return found or (str(local) if local.is_file() else None)


def missing(route: str) -> str | None:
    """Why `route`'s server cannot run here, or None when it can."""
    needed = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if route == "megex" and needed:
        return f"megex serve needs {', '.join(needed)} (pip install 'megex[server]')"
    if route == "kserve" and importlib.util.find_spec("kserve") is None:
        return "KServe is not installed (pip install 'megex[kserve]')"
    if route == "mlserver" and mlserver_command() is None:
        return "MLServer is not installed (pip install 'megex[mlserver]' or .venv-mlserver)"
    return None


def versions(routes: list[str]) -> dict[str, str]:
    found = {"torch": torch.__version__}
    if "kserve" in routes:
        found["kserve"] = importlib.metadata.version("kserve")
    if "mlserver" in routes:
        python = Path(mlserver_command() or "").parent / "python"
        code = "import importlib.metadata as m; print(m.version('mlserver'))"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
            found["mlserver"] = done.stdout.strip() or "?"
    return found


class Server:
    """A route's server process: started at once, ready by `wait`, stopped by `close`."""

    def __init__(self, route: str, victim: Path, folder: Path):
        self.route, self.folder = route, folder / route
        self.folder.mkdir()
        self.log_path = self.folder / "server.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        paths = [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        self.url = ""
        stdout: Any
        with open(self.log_path, "w") as log:
            if route == "megex":
                # The ready line on stdout gives the port (--port 0: no race for a port).
                argv = [sys.executable, "-m", "megex", "serve", "--victim", str(victim)]
                argv += ["--port", "0", "--db", str(self.folder / "ledger.sqlite")]
                argv += ["--name", MODEL, "--seed", str(SEED)]
                stdout, cwd = subprocess.PIPE, None
            elif route == "kserve":
                port = free_port()
                argv = [sys.executable, "-m", "megex.integrations.kserve", "--victim", str(victim)]
                argv += ["--http-port", str(port), "--model-name", MODEL, "--seed", str(SEED)]
                self.url = f"http://127.0.0.1:{port}/v2/models/{MODEL}"
                stdout, cwd = log, None
            else:
                argv, cwd = self._mlserver_folder(victim), self.folder
                stdout = log
            self.process = subprocess.Popen(
                argv, stdout=stdout, stderr=log, env=env, cwd=cwd, text=True
            )

    def _mlserver_folder(self, victim: Path) -> list[str]:
        port = free_port()
        settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port()}
        settings |= {"metrics_port": free_port(), "parallel_workers": 0}
        (self.folder / "settings.json").write_text(json.dumps(settings))
        model = self.folder / MODEL
        model.mkdir()
        shutil.copy(victim, model / "v.safetensors")
        if victim.with_suffix(".json").is_file():  # the sidecar, where there is one
            shutil.copy(victim.with_suffix(".json"), model / "v.json")
        doc = {
            "name": MODEL,
            "implementation": "megex.integrations.mlserver.MegexRuntime",
            "parameters": {"uri": "./v.safetensors", "extra": {"seed": SEED}},
        }
        (model / "model-settings.json").write_text(json.dumps(doc))
        self.url = f"http://127.0.0.1:{port}/v2/models/{MODEL}"
        return [str(mlserver_command()), "start", str(self.folder)]

    def wait(self) -> str:
        """The model's URL once the server answers its readiness probe."""
        deadline = time.monotonic() + START_SECONDS
        if self.route == "megex":
            ready, _, _ = select.select([self.process.stdout], [], [], START_SECONDS)
            line = self.process.stdout.readline() if ready else ""
            if not line:
                raise RuntimeError(f"megex serve printed no ready line:\n{self.log_tail()}")
            self.url = json.loads(line)["url"]
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready").status_code == 200:
                    return self.url
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.route} did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def compare(got: Answer, expected: Answer) -> str | None:
    """What differs between a route's answer and LocalOracle's, or None when they agree."""
    problems = []
    pairs = [("probabilities", got.probabilities, expected.probabilities)]
    pairs.append(("maps", got.explanation, expected.explanation))
    if not torch.equal(got.labels.long(), expected.labels.long()):
        problems.append("labels differ")
    for name, a, b in pairs:
        if (a is None) != (b is None):
            problems.append(f"{name}: {'missing' if a is None else 'unexpected'}")
        elif a is not None and a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        elif a is not None:
            diff = (a.float() - b.float()).abs().max().item()
            if not diff <= TOLERANCE:
                problems.append(f"{name} differ by up to {diff:.3g} (tolerance {TOLERANCE:g})")
    return "; ".join(problems) or None


def time_route(oracle: Any, batches: list[torch.Tensor], maps: bool) -> float:
    explanation = MAPS if maps else None
    start = time.perf_counter()
    for batch in batches:
        oracle.query(batch, explanation)
    return time.perf_counter() - start


def summary(row: Row, floor: Row, queries: int) -> dict[str, Any]:
    per_1k = [s / queries * 1e6 for s in row.seconds]  # ms per 1,000 queries
    median = statistics.median(per_1k)
    base = statistics.median(floor.seconds) / queries * 1e6
    return {
        "route": row.route,
        "protocol": row.protocol,
        "maps": row.maps,
        "ms_per_1k_queries": round(median, 2),
        "min": round(min(per_1k), 2),
        "max": round(max(per_1k), 2),
        "runs_ms_per_1k": [round(v, 2) for v in per_1k],
        "x_in_process": round(median / base, 2),
        "matches_local_oracle": row.mismatch is None,
        "mismatch": row.mismatch,
    }


LABELS = {
    "local": "in-process (LocalOracle)",
    "megex": "megex serve",
    "kserve": "KServe",
    "mlserver": "MLServer",
}


def markdown(rows: list[dict[str, Any]], skipped: dict[str, str], header: str) -> str:
    lines = [
        header,
        "",
        "| route | protocol | maps | ms per 1,000 queries (median [min, max]) | x in-process "
        "| first batch = LocalOracle |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        check = "yes" if r["matches_local_oracle"] else f"**NO**: {r['mismatch']}"
        lines.append(
            f"| {LABELS[r['route']]} | {r['protocol']} | {'yes' if r['maps'] else 'no'} "
            f"| {r['ms_per_1k_queries']:,.1f} [{r['min']:,.1f}, {r['max']:,.1f}] "
            f"| {r['x_in_process']:.2f} | {check} |"
        )
    lines += [f"\nSkipped: {LABELS[route]}: {why}" for route, why in skipped.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=5000, help="images per measurement")
    parser.add_argument("--batch", type=int, default=128, help="images per request")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per route")
    parser.add_argument("--warmup", type=int, default=3, help="batches per route before timing")
    parser.add_argument(
        "--routes",
        nargs="+",
        choices=ROUTES,
        default=list(ROUTES),
        help="routes to measure (the in-process floor always runs)",
    )
    parser.add_argument("--victim", help="victim .safetensors file (default: a digits SmallCNN)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/serving-routes"))
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python", "benchmarks/serving_routes.py", *given])
    if min(args.queries, args.batch, args.repeats) < 1 or args.warmup < 0:
        parser.error("--queries, --batch and --repeats must be >= 1, --warmup >= 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the servers compute (OMP_NUM_THREADS=1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    skipped = {r: why for r in SERVERS if r in args.routes and (why := missing(r))}
    for route, why in skipped.items():
        print(f"skipping {LABELS[route]}: {why}", file=sys.stderr)
    servers_wanted = [r for r in SERVERS if r in args.routes and r not in skipped]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        victim_path = Path(args.victim) if args.victim else folder / "v.safetensors"
        if not args.victim:
            tiny_victim().save(victim_path)
        victim = Victim.load(victim_path).eval()
        images = torch.rand(
            args.queries, *victim.input_shape, generator=torch.Generator().manual_seed(SEED)
        )
        batches = list(images.split(args.batch))
        local = LocalOracle(victim, seed=SEED)
        expected = {maps: local.query(batches[0], MAPS if maps else None) for maps in (False, True)}
        servers: list[Server] = []
        clients: dict[tuple[str, str], Any] = {("local", "-"): local}
        try:
            # Started together: KServe and MLServer each take seconds to import.
            for route in servers_wanted:
                servers.append(Server(route, victim_path, folder))
            for server in servers:
                url = server.wait()
                protocols = ["json"] if server.route == "mlserver" else ["json", "binary"]
                for protocol in protocols:
                    oracle = RemoteOracle(url, protocol=protocol, timeout=300)
                    clients[(server.route, protocol)] = oracle
            rows = measure(clients, batches, expected, args.repeats, args.warmup)
        finally:
            for client in clients.values():
                if isinstance(client, RemoteOracle):
                    client.close()
            for server in servers:
                server.close()
    return report(args, rows, skipped)


def measure(
    clients: dict[tuple[str, str], Any],
    batches: list[torch.Tensor],
    expected: dict[bool, Answer],
    repeats: int,
    warmup: int,
) -> list[Row]:
    """Check, warm up, then time every route `repeats` times, interleaved."""
    rows = {}
    for (route, protocol), oracle in clients.items():
        for maps in (False, True):
            answer = oracle.query(batches[0], MAPS if maps else None)
            row = Row(route, protocol, maps, [], compare(answer, expected[maps]))
            if row.mismatch:
                print(f"MISMATCH {LABELS[route]} {protocol} maps={maps}: {row.mismatch}")
            rows[(route, protocol, maps)] = row
            for batch in batches[1 : 1 + warmup]:
                oracle.query(batch, MAPS if maps else None)
    queries = sum(len(b) for b in batches)
    for repeat in range(repeats):
        for (route, protocol, maps), row in rows.items():
            row.seconds.append(time_route(clients[(route, protocol)], batches, maps))
            ms = row.seconds[-1] / queries * 1e6
            print(
                f"  repeat {repeat + 1}/{repeats} {LABELS[route]:25s} {protocol:10s} "
                f"maps {'yes' if maps else 'no ':3s} {ms:9.1f} ms per 1,000 queries",
                file=sys.stderr,
            )
    return list(rows.values())


def report(args: argparse.Namespace, rows: list[Row], skipped: dict[str, str]) -> int:
    floors = {row.maps: row for row in rows if row.route == "local"}
    table = [summary(row, floors[row.maps], args.queries) for row in rows]
    routes = [r for r in ROUTES if r in args.routes and r not in skipped]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    found = versions(routes)
    header = (
        f"{args.queries:,} queries per measurement in batches of {args.batch}, median of "
        f"{args.repeats} [min, max]; maps: gradient of every class; servers on loopback, one "
        f"worker, 1 thread; {machine}; "
        + ", ".join(f"{name} {version}" for name, version in found.items())
    )
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "command": args.command,
        "machine": machine,
        "versions": found,
        "queries": args.queries,
        "batch": args.batch,
        "repeats": args.repeats,
        "victim": args.victim or "digits SmallCNN 1x8x8, random weights (seed 0)",
        "explanation": MAPS.to_dict(),
        "tolerance": TOLERANCE,
        "rows": table,
        "skipped": skipped,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "serving-routes.json", doc)
    text = markdown(table, skipped, header)
    (out / "serving-routes.md").write_text(text)
    print(text)
    mismatched = [r for r in table if not r["matches_local_oracle"]]
    for r in mismatched:
        print(f"MISMATCH {LABELS[r['route']]} {r['protocol']} maps={r['maps']}: {r['mismatch']}")
    print(f"figures in {out / 'serving-routes.json'} and serving-routes.md")
    return 1 if mismatched else 0


if __name__ == "__main__":
    raise SystemExit(main())
