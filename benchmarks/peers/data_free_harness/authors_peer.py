"""One run of the DisGUIDE authors' code (lin-tan/disguide, a checkout given by
``--disguide``): its ``train.train_epoch_ensemble`` (generator and student steps, replay, its
own query accounting) with the arguments of its ``cli_parser.parse_args`` for the run
script's flags (``disguide``), or for its DFME experiment with the parser's defaults, which
are DFME's (``dfme``).

What is adapted, only at the boundary, and recorded in the row's ``adapted`` list:

- the victim: the authors' code gets the victim's log-probabilities (its mean-corrected
  logits are the same) through its own ``TeacherModel`` with the transform from its
  generator's [-1, 1] to our victim's [0, 1] images;
- the students: its ``Ensemble`` gets our clones for the victim's image size as its members
  (the run script's ResNet-18-8x would take hours per 10k queries on a CPU). The generator
  is the authors' own;
- evaluation: on our test split in its input convention, [-1, 1], as its data loaders give,
  of the model it reports: the soft vote of its ensemble;
- its ``main()``'s outer loop is driven here: epochs of ``--epoch-itrs`` iterations, the
  optimisers and the schedule as ``main()`` builds them. The code counts the budget itself
  and stops when an iteration no longer fits.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import types
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megex.evaluate import Evaluator
from megex.models import build_classifier
from megex.victim import Victim

from .errors import UserError
from .metering import BudgetReached, CountedVictim, QueryMeter, clone_scores, finished_peer_row
from .peer_imports import import_from, peer_imports

# lin-tan/disguide run_cifar-10.sh's flags (the loss is asked at the prompt: l1, soft labels).
AUTHORS_SCRIPT_FLAGS = [
    "--experiment-type", "disguide", "--epoch-itrs", "150", "--log-interval", "30",
    "--d-iter", "1", "--grayscale", "8", "--rep-iter", "3", "--replay-size", "1000000",
    "--input-space", "pre-transform", "--lambda-div", "0.2", "--model", "resnet34_8x",
    "--step", "0.4", "0.8", "--dataset", "cifar10", "--lr-S", "0.03", "--replay", "Classic",
    "--device", "0", "--log-dir", "save_results/cifar10", "--lr-G", "1e-4",
    "--ensemble-size", "2", "--batch-size", "256", "--loss", "l1",
    "--student-model", "ensemble_resnet18_8x",
]  # fmt: skip
# Their DFME experiment: the parser's defaults are DFME's (student lr 0.1, generator 1e-4,
# 5 student steps, m = 1, epsilon 1e-3, no replay); batch 256 as DFME (the default is 16),
# one student, no replayed batches (there is no replay memory to draw them from).
AUTHORS_DFME_FLAGS = [
    "--experiment-type", "dfme", "--ensemble-size", "1", "--batch-size", "256",
    "--rep-iter", "0", "--grayscale", "0", "--loss", "l1",
    "--student-model", "ensemble_resnet18_8x",
]  # fmt: skip
# The authors' modules the run uses, in the order they are imported.
AUTHORS_MODULES = (
    "cli_parser", "my_utils", "teacher", "ensemble", "network.gan", "replay", "train", "config",
)  # fmt: skip


class _TanhInputs(nn.Module):
    """A clone that learnt on [-1, 1] images, shown our [0, 1] test images."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * 2 - 1)


class _EnsembleSoftVote(nn.Module):
    """The soft vote the authors' code reports: the mean of its members' softmax."""

    def __init__(self, ensemble: nn.Module):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.ensemble(x)  # (images, members, classes)
        return F.softmax(logits, dim=-1).mean(dim=1).clamp_min(1e-12).log()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def authors_flags(method: str, budget: int, seed: int, channels: int, schedule: str) -> list[str]:
    """The argv given to the authors' parse_args for `method`."""
    flags = list(AUTHORS_SCRIPT_FLAGS if method == "disguide" else AUTHORS_DFME_FLAGS)
    if method == "disguide":
        # Their replay ring as large as the budget (the same draws while it never fills).
        flags[flags.index("--replay-size") + 1] = str(min(1_000_000, budget))
        if channels != 3:
            # Their greyscale prior copies one of three colour channels into the others.
            flags[flags.index("--grayscale") + 1] = "0"
    flags += ["--query-budget", repr(budget / 1e6), "--seed", str(seed)]
    if schedule == "constant":
        flags += ["--scheduler", "none"]
    return flags


def _parsed_args(parser: types.ModuleType, flags: list[str], budget: int, num_classes: int) -> Any:
    """Their parse_args for `flags`, with what their main() sets after parsing."""
    with mock.patch.object(sys, "argv", ["train.py", *flags]):
        args = parser.parse_args(set_total_query_budget=True)
    # What their main() sets after parsing (device, activation, classes), and the budget
    # in images (the parser's is in millions).
    args.device = torch.device("cpu")
    args.G_activation = torch.tanh
    args.normalization_coefs = None
    args.num_classes = num_classes
    args.query_budget = args.total_query_budget = budget
    args.current_query_count = 0
    return args


def _models(
    peer: dict[str, types.ModuleType], args: Any, counted: CountedVictim, clone_arch: str
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(teacher, student ensemble, generator): their classes, our victim and clones inside."""
    c, h, _ = counted.victim.input_shape
    k = args.num_classes
    teacher = peer["teacher"].TeacherModel(counted, transform=lambda x: (x + 1) / 2).eval()
    student = peer["ensemble"].Ensemble(
        ensemble_size=0, num_classes=k, student_model="ensemble_lenet5_half"
    )
    student.subnets = nn.ModuleList(
        [build_classifier(clone_arch, k, c, h) for _ in range(args.ensemble_size)]
    )
    generator = peer["network.gan"].GeneratorA(
        nz=args.nz, nc=c, img_size=h, activation=args.G_activation, grayscale=args.grayscale
    )
    return teacher, student, generator


def _optimisers(
    args: Any, student: nn.Module, generator: nn.Module, epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer, list[Any]]:
    """(student's, generator's, schedulers), as their main() builds them."""
    opt_s = torch.optim.SGD(
        student.parameters(), lr=args.lr_S, weight_decay=args.weight_decay, momentum=0.9
    )
    opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_G)
    schedulers = []
    if args.scheduler == "multistep":
        milestones = sorted(int(step * epochs) for step in args.steps)
        schedulers = [
            torch.optim.lr_scheduler.MultiStepLR(opt, milestones, args.scale)
            for opt in (opt_s, opt_g)
        ]
    elif args.scheduler != "none":
        raise UserError(f"the authors' scheduler {args.scheduler!r} is not driven here")
    return opt_s, opt_g, schedulers


def _train_epochs(
    peer: dict[str, types.ModuleType],
    args: Any,
    epochs: int,
    models: tuple[nn.Module, nn.Module, nn.Module],
    optimisers: tuple[torch.optim.Optimizer, torch.optim.Optimizer, list[Any]],
    memory: Any,
    log: Any,
) -> tuple[float, str | None]:
    """Their main()'s outer loop: (wall seconds, why it stopped short or None)."""
    teacher, student, generator = models
    opt_s, opt_g, schedulers = optimisers
    stopped = None
    start = time.perf_counter()
    peer["config"].log_file = log
    try:
        for epoch in range(1, epochs + 1):
            if args.query_budget < args.cost_per_iteration:
                break
            peer["train"].train_epoch_ensemble(
                args, generator, student, teacher, "cpu", opt_s, opt_g, epoch, memory
            )
            for scheduler in schedulers:
                scheduler.step()
            memory.new_epoch()
    except BudgetReached as err:
        stopped = f"stopped at the budget: {err}"
    finally:
        peer["config"].log_file = None
    return time.perf_counter() - start, stopped


def _adapted(
    method: str,
    budget: int,
    channels: int,
    ensemble_size: int,
    clone_arch: str,
    stand_ins: list[str],
) -> list[str]:
    adapted = [
        f"students: {ensemble_size} x megex {clone_arch} as the members of their "
        "Ensemble (the script's ensemble_resnet18_8x)",
        "teacher: our victim in their TeacherModel, transform [-1, 1] -> [0, 1], answering "
        "log-probabilities, counting every image",
        "evaluation: our test split mapped to [-1, 1] (their loaders' convention), soft vote",
        "their main()'s outer loop driven here: epochs of --epoch-itrs iterations "
        "(train_epoch_ensemble), optimisers and schedule as main() builds them",
    ]
    if method == "disguide":
        adapted.append(
            f"replay ring of {min(1_000_000, budget)} answers instead of 1M (never full "
            "within the budget: the same draws)"
        )
        if channels != 3:
            adapted.append("greyscale prior off (it needs 3 colour channels)")
    if stand_ins:
        adapted.append(f"not installed, empty stand-ins at import: {', '.join(stand_ins)}")
    return adapted


def run_authors(
    folder: Path,
    method: str,
    victim: Victim,
    seed: int,
    budgets: list[int],
    evaluator: Evaluator,
    clone_arch: str,
    schedule: str,
    log: Any,
) -> dict[str, Any]:
    """The DisGUIDE authors' training loop (DisGUIDE, or their DFME experiment) to the
    largest budget, our victim its teacher."""
    budget = budgets[-1]
    c = victim.input_shape[0]
    with peer_imports(folder) as stand_ins:
        peer = {name: import_from(folder, name) for name in AUTHORS_MODULES}
        flags = authors_flags(method, budget, seed, c, schedule)
        args = _parsed_args(peer["cli_parser"], flags, budget, victim.num_classes)
        _seed_everything(seed)

        # Their constructors print; their loop prints and writes its log: all to the log.
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            meter = QueryMeter(budget, budgets)
            counted = CountedVictim(victim, meter)
            models = _models(peer, args, counted, clone_arch)
            _, student, generator = models
            args.cost_per_iteration = peer["my_utils"].compute_cost_per_iteration(args)
            epochs = budget // (args.cost_per_iteration * args.epoch_itrs) + 1
            optimisers = _optimisers(args, student, generator, epochs)
            memory = peer["replay"].init_replay_memory(args)
            evaluated_model = _TanhInputs(_EnsembleSoftVote(student))
            meter.evaluate = lambda: clone_scores(evaluated_model, evaluator)
            wall_s, stopped = _train_epochs(peer, args, epochs, models, optimisers, memory, log)
        row = finished_peer_row(meter, counted, wall_s, stopped)
    return {
        **row,
        "peer_reported_queries": int(args.current_query_count),
        "settings": {
            "functions": "train.train_epoch_ensemble (train_generator, "
            "train_student_ensemble), cli_parser.parse_args, network.gan.GeneratorA, "
            "teacher.TeacherModel, ensemble.Ensemble, replay.init_replay_memory",
            "argv": flags,
            "epochs": epochs,
            "cost_per_iteration": args.cost_per_iteration,
            "lr_S": args.lr_S,
            "lr_G": args.lr_G,
            "scheduler": args.scheduler,
        },
        "adapted": _adapted(method, budget, c, args.ensemble_size, clone_arch, stand_ins),
    }
