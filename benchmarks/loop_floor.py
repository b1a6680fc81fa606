"""Where an attack's time goes, against the floor its unavoidable passes set.

For each method, side by side in one process (one torch thread by default, the CPU):

- measured: the method as the benchmark runs it (``method_settings``/``build_attack`` with
  the config's shared and searched settings, a ``LocalOracle`` of the victim, the test-split
  evaluator, a run folder with its checkpoints, ``megex.engine.run``), with the evaluation
  schedule a benchmark run of budget --queries gets from the config (its ``eval_at`` marks
  below the budget, and the budget: what ``megex bench --quick`` plans for that budget);
  seconds per 1,000 queries, the median of --repeats runs;
- breakdown: the same run with wall timers (``time.perf_counter``; torch ops are
  synchronous on a CPU) around the parts, put on the attack's and the oracle's bound methods
  and a few engine functions from this script (the library is not changed). Each part
  counts its own time only: the time of a part inside another (the victim's answer inside a
  generator step) goes to the inner part, and "other" is what no part covers (the loop, the
  attack step's own lines). Means over repeats, which add up to the mean total;
- floor: per 1,000 queries, the passes the method cannot avoid, each timed alone on copies
  of the run's own models at the batch sizes the method uses: the engine's clone updates
  (``clone_updates_per_1k_queries`` forward+backward+SGD steps of the clone on a batch; for
  a MEGEX variant whose clone also matches the maps, ``explanation_loss`` > 0, the updates
  on answers that carry maps (fresh ones, and replayed ones where the buffer keeps maps) as
  that term needs them: the clone's input gradient with its graph, and the backward through
  it), the
  victim's answers (DFME: one forward per query, in its batches of (m + 1) x batch and
  batch; MEGEX: one forward per query plus the explanation's backward passes, one for the
  predicted class, K for all classes, by the minimal autograd equivalent of
  ``megex.explain``'s gradient maps, checked equal to ``megex.explain``), and the
  generator's passes (its forward+backward+Adam steps, and the forwards that make the
  clone-step queries' images).

The measured run's ledger count, the clone and generator updates it counted and the
floor's pass counts are printed next to the figures, so that a reader can check them. A run
spends whole steps (DFME's 512 queries, MEGEX's 384 with the searched settings): the ledger
counts the last step within --queries, and every figure per 1,000 queries is of that count.

    python benchmarks/loop_floor.py [--queries 20000] [--repeats 3] [--threads 1]
        [--methods dfme megex-predicted megex-all] [--config FILE] [--victim FILE]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package lives in src/.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import megex.oracle.responder as responder_module  # noqa: E402
from megex import data as data_module  # noqa: E402
from megex.attacks.maps import relative_map_error  # noqa: E402
from megex.attacks.training import disagreement  # noqa: E402
from megex.engine import run  # noqa: E402
from megex.engine.steps import RunSteps  # noqa: E402
from megex.evaluate import Evaluator  # noqa: E402
from megex.experiments.methods import (  # noqa: E402
    METHODS,
    build_attack,
    load_tuned,
    method_settings,
    require_tuned,
)
from megex.experiments.query_efficiency import load_config  # noqa: E402
from megex.experiments.runner import prepare_torch  # noqa: E402
from megex.explain import Explanation, explain, output_values  # noqa: E402
from megex.oracle import LocalOracle  # noqa: E402
from megex.runs import RunFolder, write_json_atomic  # noqa: E402
from megex.victim import Victim, cached_victim  # noqa: E402

DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "long-2m.json"
VICTIMS = ROOT / "benchmarks" / "results" / "victims"
DEFAULT_METHODS = ("dfme", "megex-predicted", "megex-all")
# The attacks whose passes the floor knows (their variants in METHODS included).
FLOOR_ATTACKS = ("dfme", "megex")
SEED = 0
# Timings per floor piece (median), after one warm-up call.
FLOOR_TIMINGS = 7

# The parts of the breakdown, in table order: key -> label.
PARTS = {
    "victim": "victim answers (forward, checks, ledger)",
    "maps": "victim maps (megex.explain)",
    "generator_forward": "generator forward",
    "generator_update": "generator backward + Adam step",
    "generator_rest": "generator step, rest (its objective from the answers)",
    "clone_fresh": "clone updates on fresh answers",
    "replay": "replay updates (sampling + update)",
    "evaluation": "evaluation",
    "checkpoints": "checkpoints and run folder",
    "bookkeeping": "bookkeeping (replay storage, schedules, restarts)",
    "other": "other (loop, attack step's own lines)",
}
TIMED_PARTS = tuple(k for k in PARTS if k != "other")
FLOOR_PIECES = {
    "clone": "floor: clone updates",
    "victim": "floor: victim answers (and maps)",
    "generator": "floor: generator passes",
}


# --- the breakdown's timers -----------------------------------------------------------------


class PartClock:
    """Wall seconds per part, each part's own: the time of a part timed inside another goes
    to the inner part alone, so the parts never count a second twice."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(TIMED_PARTS, 0.0)
        self.calls = dict.fromkeys(TIMED_PARTS, 0)
        # The open parts, innermost last: (part, [seconds spent in parts inside it]).
        self._open: list[tuple[str, list[float]]] = []

    def inside(self, part: str) -> bool:
        return any(name == part for name, _ in self._open)

    def timed(self, part: str | Callable[[], str], function: Callable) -> Callable:
        """`function`, its calls timed as `part` (or as what `part()` names at the call)."""

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            name = part() if callable(part) else part
            if not (self._open and self._open[-1][0] == name):
                self.calls[name] += 1  # a part's calls; not the same part's nested pieces
            nested = [0.0]
            self._open.append((name, nested))
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self._open.pop()
                self.seconds[name] += elapsed - nested[0]
                if self._open:
                    self._open[-1][1][0] += elapsed

        return timed_call


def time_attack_parts(attack: Any, oracle: LocalOracle, clock: PartClock) -> None:
    """Put the clock on the attack's and the oracle's bound methods (instance attributes,
    which the object's own calls find before its class's methods)."""
    attack.generate = clock.timed("generator_forward", attack.generate)
    attack.to_query = clock.timed("generator_forward", attack.to_query)
    attack.generator_step = clock.timed("generator_rest", attack.generator_step)
    attack.finish_generator_step = clock.timed("generator_update", attack.finish_generator_step)
    # A clone update inside a replay is the replay's.
    fresh_or_replayed = lambda: "replay" if clock.inside("replay") else "clone_fresh"  # noqa: E731
    attack.clone_update = clock.timed(fresh_or_replayed, attack.clone_update)
    attack.replay = clock.timed("replay", attack.replay)
    for name in ("observe", "end_iteration", "restart_generator_if_due"):
        setattr(attack, name, clock.timed("bookkeeping", getattr(attack, name)))
    oracle.query = clock.timed("victim", oracle.query)


@contextlib.contextmanager
def timed_engine(clock: PartClock) -> Iterator[None]:
    """The maps the oracle computes, the run's checkpoints and its folder's files, timed for
    the length of the block (module and class attributes, restored afterwards)."""
    patches = [(responder_module, "explain", "maps"), (RunSteps, "checkpoint", "checkpoints")]
    patches += [
        (RunFolder, name, "checkpoints")
        for name in ("create", "write_config", "save_clone", "write_result")
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, part in patches:
            setattr(owner, name, clock.timed(part, getattr(owner, name)))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# --- one run as the benchmark runs it -------------------------------------------------------


class Setting:
    """What every run of the comparison shares: victim, evaluator, schedule, config."""

    def __init__(self, config: dict[str, Any], victim: Victim, queries: int):
        self.config = config
        self.victim = victim
        self.queries = queries
        dataset = victim.dataset or config["dataset"]
        x_test, y_test = data_module.load(dataset).test_tensors()
        self.evaluator = Evaluator.from_victim(victim, x_test, y_test)
        # As the benchmark plans a run of this budget: the config's marks below it, and it.
        self.eval_at = sorted({queries, *(b for b in config["eval_at"] if b < queries)})
        self.tuned = load_tuned(config)

    def method(self, name: str) -> tuple[str, dict[str, Any]]:
        require_tuned(self.config, name, self.tuned)
        return method_settings(self.config, name, self.tuned)


def run_method(
    setting: Setting, method: str, budget: int, clock: PartClock | None = None
) -> tuple[dict[str, Any], Any]:
    """One run of `method` to `budget` queries as the benchmark makes it (with the clock on
    its parts if given); its figures, and the attack (for the floor's models)."""
    attack_name, settings = setting.method(method)
    attack = build_attack(attack_name, settings, SEED, "cpu")
    oracle = LocalOracle(setting.victim, budget=budget, explanation=None, seed=SEED)
    oracle.explanation = getattr(attack.config, "explanation", None)
    evaluation = {"seconds": 0.0, "count": 0}

    def evaluator(clone: torch.nn.Module) -> dict[str, Any]:
        # Timed here in every run: the evaluator is this script's own callable.
        start = time.perf_counter()
        try:
            return setting.evaluator(clone)
        finally:
            evaluation["seconds"] += time.perf_counter() - start
            evaluation["count"] += 1

    timed_evaluator = evaluator if clock is None else clock.timed("evaluation", evaluator)
    if clock is not None:
        time_attack_parts(attack, oracle, clock)
    eval_at = [b for b in setting.eval_at if b <= budget]
    with tempfile.TemporaryDirectory(prefix="loop-floor-") as folder:
        with timed_engine(clock) if clock is not None else contextlib.nullcontext():
            start = time.perf_counter()
            result = run(
                attack,
                oracle,
                budget,
                evaluator=timed_evaluator,
                eval_every=budget,
                eval_at=eval_at,
                run_dir=Path(folder) / "run",
                progress=False,
                service_state=oracle.state_dict,
            )
            seconds = time.perf_counter() - start
    cost = attack.iteration_cost()
    ledger = int(oracle.queries_used)
    if not (ledger == result.queries_used == result.iterations * cost and budget - ledger < cost):
        raise RuntimeError(
            f"{method}: the ledger counted {ledger} queries, the engine {result.queries_used} "
            f"in {result.iterations} steps of {cost}; expected the budget {budget} less under "
            "one step"
        )
    figures = {
        "seconds": seconds,
        "queries": ledger,
        "iterations": result.iterations,
        "iteration_cost": cost,
        "clone_updates": result.clone_updates,
        "generator_updates": result.generator_updates,
        "evaluations": evaluation["count"],
        "evaluation_seconds": evaluation["seconds"],
        "clone_accuracy": result.clone_accuracy,
    }
    return figures, attack


# --- the floor ------------------------------------------------------------------------------


def median_seconds(function: Callable[[], object], timings: int = FLOOR_TIMINGS) -> float:
    function()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(timings):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def victim_maps(victim: torch.nn.Module, x: torch.Tensor, spec: Explanation) -> torch.Tensor:
    """The answer and the gradient maps in one forward with autograd and the explanation's
    backward passes (one for the predicted class, one per class for all): the least a
    service computes for them. The maps are megex.explain's; returns them."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = victim(x)
        torch.softmax(logits.detach(), dim=1)  # the answer's probabilities
        values = output_values(logits, spec.output)
        if spec.target == "all":
            k = values.shape[1]
            grads = [
                torch.autograd.grad(values[:, c].sum(), x, retain_graph=c < k - 1)[0]
                for c in range(k)
            ]
            return torch.stack(grads, dim=1)
        classes = logits.argmax(dim=1) if spec.target == "predicted" else None
        if classes is None:
            classes = torch.full((x.shape[0],), int(spec.target), dtype=torch.long)
        return torch.autograd.grad(values.gather(1, classes.view(-1, 1)).sum(), x)[0]


def updates_with_map_term(attack: Any, replayed: float, steps_per_1k: float) -> float:
    """Of the clone updates per 1,000 queries, how many carry a map term: a MEGEX variant's
    with explanation_loss > 0, on fresh answers with maps (the generator's queries' where
    the clone trains on them, the clone's queries' where it asks for maps) and on the
    `replayed` ones where the buffer keeps maps."""
    c = attack.config
    if attack.name != "megex" or not c.explanation_loss:
        return 0.0
    fresh = c.generator_steps if c.train_on_generator_queries else 0
    fresh += c.clone_steps if attack.clone_query_explanation() is not None else 0
    return fresh * steps_per_1k + (replayed if attack.replays_maps() else 0.0)


def floor(attack: Any, oracle_victim: torch.nn.Module, num_classes: int) -> dict[str, Any]:
    """The passes per 1,000 queries that `attack`'s method cannot avoid, each timed alone on
    copies of its models at its batch sizes: ms per 1,000 queries, pass counts, and what the
    victim's maps were timed by."""
    c = attack.config
    n, cost = c.batch_size, attack.iteration_cost()
    steps_per_1k = 1000 / cost
    torch.manual_seed(SEED)
    clone = copy.deepcopy(attack.clone).train()
    generator = copy.deepcopy(attack.generator).train()
    clone_opt = torch.optim.SGD(
        clone.parameters(), lr=c.clone_lr, momentum=c.clone_momentum,
        weight_decay=c.clone_weight_decay,
    )  # fmt: skip
    generator_opt = torch.optim.Adam(generator.parameters(), lr=c.generator_lr)
    victim = oracle_victim.eval()
    with torch.no_grad():
        x = generator(torch.randn(n, c.nz))
        probs = torch.softmax(victim(x), dim=1)

    def clone_update() -> None:
        clone_opt.zero_grad(set_to_none=True)
        disagreement(clone(x), probs, c.loss).mean().backward()
        clone_opt.step()

    # What a map term adds to an update: the clone's d (sum_k v_k log p_k) / dx with its
    # graph, and the backward through it (megex.attacks.maps.map_matching_loss).
    target, weights = torch.randn_like(x), torch.randn(n, num_classes)

    def clone_update_with_maps() -> None:
        clone_opt.zero_grad(set_to_none=True)
        images = x.detach().requires_grad_(True)
        logits = clone(images)
        logp = torch.log_softmax(logits, dim=1)
        (grad,) = torch.autograd.grad((weights * logp).sum(), images, create_graph=True)
        error = relative_map_error(grad, target).mean()
        (disagreement(logits, probs, c.loss).mean() + error).backward()
        clone_opt.step()

    z = torch.randn(n, c.nz)
    direction = torch.randn_like(x)

    def generator_step() -> None:
        generator_opt.zero_grad(set_to_none=True)
        ((generator(z) * direction).sum() / n).backward()
        generator_opt.step()

    def generator_forward() -> None:
        with torch.no_grad():
            generator(z)

    def answers(images: torch.Tensor) -> Callable[[], None]:
        def answer() -> None:
            with torch.no_grad():
                torch.softmax(victim(images), dim=1)

        return answer

    # The engine's count: the allotment, or more when fresh answers alone pass it.
    fresh = c.clone_steps + (c.generator_steps if c.train_on_generator_queries else 0)
    clone_updates = max(float(c.clone_updates_per_1k_queries), fresh * steps_per_1k)
    replayed = clone_updates - fresh * steps_per_1k
    with_map_term = updates_with_map_term(attack, replayed, steps_per_1k)
    clone_seconds = (clone_updates - with_map_term) * median_seconds(clone_update)
    if with_map_term:
        clone_seconds += with_map_term * median_seconds(clone_update_with_maps)
    generator_steps = c.generator_steps * steps_per_1k
    generator_forwards = c.clone_steps * steps_per_1k
    pieces = {
        "clone": clone_seconds,
        "generator": generator_steps * median_seconds(generator_step)
        + generator_forwards * median_seconds(generator_forward),
    }
    passes = {
        "clone_updates": clone_updates,
        "clone_updates_with_map_term": with_map_term,
        "clone_batch": n,
        "generator_steps": generator_steps,
        "generator_forwards": generator_forwards,
        "generator_batch": n,
        "victim_forwards": 1000.0,
    }
    if attack.name == "dfme":
        m = c.directions
        with torch.no_grad():
            probes = generator(torch.randn((m + 1) * n, c.nz))
        per_step = c.generator_steps * median_seconds(answers(probes))
        per_step += c.clone_steps * median_seconds(answers(x))
        pieces["victim"] = per_step * steps_per_1k
        passes["victim_backwards"] = 0.0
        batches = f"{(m + 1) * n}" + (f" and {n}" if c.clone_steps else "")
        victim_text = f"1000 victim forwards (batches of {batches})"
        maps_by = None
    else:
        spec = attack.config.explanation or Explanation("gradient")
        clone_maps = attack.clone_query_explanation() is not None
        with_maps = c.generator_steps + (c.clone_steps if clone_maps else 0)
        without_maps = 0 if clone_maps else c.clone_steps
        if spec.method == "gradient":
            reference = explain(victim, x, spec)
            maps_match = bool(torch.allclose(victim_maps(victim, x, spec), reference, atol=1e-6))
            if not maps_match:
                raise RuntimeError(f"{attack.name}: the floor's maps differ from megex.explain's")
            maps_seconds = median_seconds(lambda: victim_maps(victim, x, spec))
            maps_by = "one forward with autograd + the maps' backward passes (= megex.explain)"
        else:

            def as_the_oracle_does() -> None:
                with torch.no_grad():
                    logits = victim(x)
                explain(victim, x, spec, logits=logits)

            maps_seconds = median_seconds(as_the_oracle_does)
            maps_by = "megex.explain as the oracle calls it (with the answer's forward)"
        per_step = with_maps * maps_seconds
        if without_maps:
            per_step += without_maps * median_seconds(answers(x))
        pieces["victim"] = per_step * steps_per_1k
        per_map = num_classes if spec.target == "all" else 1
        maps_per_1k = 1000.0 * with_maps / (with_maps + without_maps)
        passes["victim_backwards"] = maps_per_1k * per_map
        victim_text = (
            f"1000 victim forwards + {passes['victim_backwards']:g} backward "
            f"({per_map} per map, {maps_per_1k:g} maps), batches of {n}"
        )
    seconds = sum(pieces.values())
    map_term_text = f" ({with_map_term:.3g} with the maps' term)" if with_map_term else ""
    generator_text = f"{generator_steps:.3g} generator steps of {n}"
    if generator_forwards:
        generator_text += f" + {generator_forwards:.3g} forwards of {n}"
    return {
        "ms_per_1k": seconds * 1e3,
        "pieces_ms_per_1k": {k: v * 1e3 for k, v in pieces.items()},
        "passes": passes,
        "passes_text": f"{clone_updates:g} clone updates of {n}{map_term_text}; {victim_text}; "
        f"{generator_text}",
        "maps_timed_by": maps_by,
    }


# --- the comparison -------------------------------------------------------------------------


def compare(setting: Setting, methods: list[str], repeats: int) -> dict[str, Any]:
    """Every method measured, broken down and floored, interleaved repeat by repeat so that a
    change in the machine's load reaches every method alike."""
    budget = setting.queries
    # Warm-up: a short run of each (kernels chosen, caches filled), not counted.
    for method in methods:
        attack_name, settings = setting.method(method)
        cost = build_attack(attack_name, settings, SEED, "cpu").iteration_cost()
        run_method(setting, method, min(budget, 2 * cost))
    rows: dict[str, dict[str, list]] = {
        m: {"measured": [], "broken": [], "floor": []} for m in methods
    }
    for _ in range(repeats):
        for method in methods:
            measured, _ = run_method(setting, method, budget)
            clock = PartClock()
            broken, attack = run_method(setting, method, budget, clock)
            broken["parts"], broken["calls"] = dict(clock.seconds), dict(clock.calls)
            victim = setting.victim
            rows[method]["measured"].append(measured)
            rows[method]["broken"].append(broken)
            rows[method]["floor"].append(floor(attack, victim, victim.num_classes))
    return {m: summarise(m, r, setting) for m, r in rows.items()}


def summarise(method: str, runs: dict[str, list], setting: Setting) -> dict[str, Any]:
    measured, broken, floors = runs["measured"], runs["broken"], runs["floor"]
    queries = measured[0]["queries"]
    per_1k = [r["seconds"] / r["queries"] * 1e3 for r in measured]
    less_eval = [(r["seconds"] - r["evaluation_seconds"]) / r["queries"] * 1e3 for r in measured]
    # Means over repeats, which add up to the mean total.
    total_ms = statistics.fmean(r["seconds"] / r["queries"] * 1e6 for r in broken)
    parts = {
        k: statistics.fmean(r["parts"][k] / r["queries"] * 1e6 for r in broken) for k in TIMED_PARTS
    }
    parts["other"] = total_ms - sum(parts.values())
    floor_ms = statistics.median(f["ms_per_1k"] for f in floors)
    pieces = {k: statistics.median(f["pieces_ms_per_1k"][k] for f in floors) for k in FLOOR_PIECES}
    last = broken[-1]
    evaluations = statistics.fmean(r["evaluations"] for r in broken)
    eval_each_ms = statistics.fmean(
        r["parts"]["evaluation"] / r["evaluations"] * 1e3 for r in broken
    )
    config = setting.config
    schedule = sorted({*config["budgets"], *config["eval_at"]})
    longest = max(config["budgets"])
    attack_name, settings = setting.method(method)
    return {
        "attack": attack_name,
        "settings": settings,
        "queries": queries,
        "queries_each_run": [r["queries"] for r in measured + broken],
        "iteration_cost": last["iteration_cost"],
        "measured_s_per_1k": statistics.median(per_1k),
        "runs_s_per_1k": per_1k,
        "measured_less_evaluation_s_per_1k": statistics.median(less_eval),
        "evaluations": measured[0]["evaluations"],
        "breakdown": {
            "total_ms_per_1k": total_ms,
            "ms_per_1k": parts,
            "percent": {k: 100 * v / total_ms for k, v in parts.items()},
            "calls": last["calls"],
            "instrumented_over_measured": total_ms / 1e3 / statistics.median(per_1k),
            "evaluation_ms_each": eval_each_ms,
            "evaluations": evaluations,
        },
        "floor": {
            "ms_per_1k": floor_ms,
            "pieces_ms_per_1k": pieces,
            "passes": floors[-1]["passes"],
            "passes_text": floors[-1]["passes_text"],
            "maps_timed_by": floors[-1]["maps_timed_by"],
        },
        "measured_over_floor": statistics.median(per_1k) * 1e3 / floor_ms,
        "measured_less_evaluation_over_floor": statistics.median(less_eval) * 1e3 / floor_ms,
        "counted_per_1k": {
            "clone_updates": last["clone_updates"] / last["queries"] * 1e3,
            "generator_updates": last["generator_updates"] / last["queries"] * 1e3,
        },
        # The longest run of the config evaluates at each mark and budget: this per 1k.
        "evaluation_ms_per_1k_at_longest_budget": len(schedule) * eval_each_ms / longest * 1e3,
        "longest_budget": longest,
    }


def markdown(summary: dict[str, Any]) -> str:
    methods = summary["methods"]
    lines = [
        "| method | queries (ledger) | evaluations | measured s/1k | less evaluation s/1k "
        "| floor ms/1k | measured/floor | less evaluation/floor "
        "| floor's passes per 1k queries | counted in the run per 1k |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in methods.items():
        counted = m["counted_per_1k"]
        lines.append(
            f"| {name} | {m['queries']} | {m['evaluations']} | {m['measured_s_per_1k']:.3f} "
            f"| {m['measured_less_evaluation_s_per_1k']:.3f} | {m['floor']['ms_per_1k']:.1f} "
            f"| {m['measured_over_floor']:.2f}x | {m['measured_less_evaluation_over_floor']:.2f}x "
            f"| {m['floor']['passes_text']} "
            f"| {counted['clone_updates']:.3g} clone updates, "
            f"{counted['generator_updates']:.3g} generator steps |"
        )
    names = list(methods)
    lines += [
        "",
        "Breakdown (instrumented run, mean over repeats): ms per 1k queries (share of its "
        "total); below it, the floor's pieces (ms per 1k queries)",
        "",
        "| part | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for key, label in PARTS.items():
        cells = [
            f"{methods[n]['breakdown']['ms_per_1k'][key]:.1f} "
            f"({methods[n]['breakdown']['percent'][key]:.1f}%)"
            for n in names
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    totals = [f"{methods[n]['breakdown']['total_ms_per_1k']:.1f} (100%)" for n in names]
    lines.append("| **total (instrumented)** | " + " | ".join(totals) + " |")
    for key, label in FLOOR_PIECES.items():
        cells = [f"{methods[n]['floor']['pieces_ms_per_1k'][key]:.1f}" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    floors = [f"{methods[n]['floor']['ms_per_1k']:.1f}" for n in names]
    lines.append("| **floor** | " + " | ".join(floors) + " |")
    lines.append("")
    for name, m in methods.items():
        b = m["breakdown"]
        notes = [
            f"instrumented/measured {b['instrumented_over_measured']:.2f}",
            f"an evaluation {b['evaluation_ms_each']:.0f} ms "
            f"({m['evaluation_ms_per_1k_at_longest_budget']:.2f} ms per 1k on the "
            f"{m['longest_budget']}-query run's schedule)",
        ]
        if m["floor"]["maps_timed_by"]:
            notes.append(f"victim maps timed as {m['floor']['maps_timed_by']}")
        lines.append(f"- {name}: " + "; ".join(notes))
    return "\n".join(lines)


# --- the command ----------------------------------------------------------------------------


def load_victim(path: str | None, config: dict[str, Any]) -> tuple[Victim, Path]:
    """--victim, else the benchmark's cached victim of recipe seed 0 (trained and cached as
    the benchmark does when missing)."""
    if path is not None:
        return Victim.load(path), Path(path)
    victim, cached = cached_victim(
        VICTIMS,
        config["dataset"],
        config["victim_arch"],
        seed=0,
        validation_images=config["validation_images"],
        pool_images=config.get("pool_images", 0),
        log=lambda line: print(line, file=sys.stderr),
    )
    return victim, cached


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20_000, help="queries per run")
    parser.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), help="methods (benchmark names)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per method (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="the benchmark config (default: long-2m)"
    )
    parser.add_argument(
        "--victim", help="a victim file (default: the benchmark's cached victim of seed 0)"
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for name in ("queries", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected a whole number >= 1, got {getattr(args, name)}")
    for method in args.methods:
        attack = METHODS.get(method, {}).get("attack")
        if attack not in FLOOR_ATTACKS:
            known = [m for m, spec in METHODS.items() if spec["attack"] in FLOOR_ATTACKS]
            parser.error(f"--methods: {method!r} is not one of {', '.join(known)}")
    if not Path(args.config).is_file():
        parser.error(f"--config: no file at {args.config}")
    if args.victim is not None and not Path(args.victim).is_file():
        parser.error(f"--victim: no file at {args.victim}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    tuned = config.get("tuned_settings")
    if tuned and not Path(tuned).is_absolute() and not Path(tuned).is_file():
        # Relative to the checkout, as written in the config files.
        config["tuned_settings"] = str(ROOT / tuned)
    prepare_torch(args.threads, "cpu")
    try:
        victim, victim_path = load_victim(args.victim, config)
        setting = Setting(config, victim, args.queries)
        for method in args.methods:
            setting.method(method)
        methods = compare(setting, args.methods, args.repeats)
    except (ValueError, FileNotFoundError) as err:
        print(f"loop_floor: {err}", file=sys.stderr)
        return 2
    summary = {
        "queries": args.queries,
        "repeats": args.repeats,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "config": str(args.config),
        "tuned_settings": config.get("tuned_settings"),
        "victim": str(victim_path),
        "eval_at": setting.eval_at,
        "methods": methods,
    }
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s); victim "
        f"{victim_path.name}; {args.queries} queries, {args.repeats} repeat(s) (median); "
        f"evaluations at {setting.eval_at}"
    )
    print()
    print(markdown(summary))
    if args.json:
        write_json_atomic(args.json, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
