"""Default (NCHW) against channels-last convolutions on the CPU, side by side.

The attacks put the victim, the clone and the generator in channels-last layout on a CPU
(`megex.models.fast_layout`). This measures what that buys on the benchmark's networks
(LeNet-5 on 1x28x28, DFME's generator with ngf 8), one torch thread, batch 128:

- explanation of all classes / of the predicted class (the victim's side of a MEGEX query);
- one clone training step (forward, backward, SGD);
- one generator forward and backward;
- a short attack (megex-all and dfme-m1, the benchmark's settings, `--queries` queries).

Each figure is the median of `--repeats` timings; the ratio is default / channels-last.

    python benchmarks/cpu_layout.py [--repeats 7] [--queries 10000]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

import megex
import megex.attacks.base as attack_base
import megex.oracle.responder as oracle_mod
from megex import Explanation, LocalOracle, Victim, explain
from megex.attacks import DFME, MEGEX
from megex.models import build_classifier, build_generator


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextmanager
def default_layout():
    """Run the attacks with fast_layout reduced to a plain .to(device)."""

    def plain(module, device, channels_last=None):
        return module.to(device)

    saved = attack_base.fast_layout, oracle_mod.fast_layout
    attack_base.fast_layout = oracle_mod.fast_layout = plain
    try:
        yield
    finally:
        attack_base.fast_layout, oracle_mod.fast_layout = saved


def kernels(repeats: int) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    x = torch.rand(128, 1, 28, 28)
    z = torch.randn(128, 256)
    clone = build_classifier("lenet5", 10, 1, 28)
    generator = build_generator("generator_a", 28, 1, 256, 8)
    rows = []
    for name, make in [
        ("explain all classes", lambda m, g: lambda: explain(m, x, Explanation(target="all"))),
        ("explain predicted class", lambda m, g: lambda: explain(m, x, Explanation())),
        ("clone training step", lambda m, g: _train_step(m, x)),
        ("generator forward+backward", lambda m, g: lambda: g(z).square().mean().backward()),
    ]:
        timings = []
        for channels_last in (False, True):
            m, g = copy.deepcopy(clone).eval(), copy.deepcopy(generator).train()
            if channels_last:
                m = m.to(memory_format=torch.channels_last)
                g = g.to(memory_format=torch.channels_last)
            timings.append(median_ms(make(m, g), repeats))
        rows.append((name, *timings))
    return rows


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        model.train()
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()

    return step


def attacks(queries: int) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    victim = Victim.from_module(build_classifier("lenet5", 10, 1, 28).eval(), (1, 28, 28), 10)
    settings = {"ngf": 8, "lr_schedule": "constant", "clone_ema": 0.999}
    runs = [
        ("megex-all", lambda: MEGEX(explanation=Explanation(target="all"), **settings)),
        ("dfme-m1", lambda: DFME(directions=1, **settings)),
    ]
    rows = []
    for name, make in runs:
        timings = []
        for channels_last in (False, True):
            with nullcontext() if channels_last else default_layout():
                oracle = LocalOracle(copy.deepcopy(victim), budget=queries)
                start = time.perf_counter()
                megex.run(make(), oracle, progress=False)
                timings.append(time.perf_counter() - start)
        rows.append((f"{name}, {queries} queries (s)", *timings))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timings per figure (median)")
    parser.add_argument("--queries", type=int, default=10_000, help="queries per short attack")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.queries < 1:
        parser.error("--repeats and --queries: expected >= 1")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {platform.machine()}, 1 thread, batch 128")
    print("| operation | default layout | channels-last | speed-up |")
    print("| --- | --- | --- | --- |")
    for name, slow, fast in kernels(args.repeats):
        print(f"| {name} (ms) | {slow:.1f} | {fast:.1f} | {slow / fast:.2f}x |")
    for name, slow, fast in attacks(args.queries):
        print(f"| {name} | {slow:.1f} | {fast:.1f} | {slow / fast:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
