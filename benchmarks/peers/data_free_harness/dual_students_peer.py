"""One run of the dual students authors' code (James-Beetham/dual_students, a checkout given
by ``--dual-students``): its ``train.train`` (an epoch of generator and student steps, its
own query accounting, its students' weight averages) with the arguments of the parser in its
``train.main()`` for the flags of its run script ``run_cifar_ds.sh``.

What is adapted, only at the boundary, and recorded in the row's ``adapted`` list:

- the flags: ``--query_budget`` is the harness's largest budget in millions (their
  ``main()`` multiplies it by 10^6; the budget is then set exactly, in images).
  ``--epoch_itrs 70`` stands for the script's ``-1``, which gives
  ``budget // (223 x 1280)`` iterations an epoch: 70 at the script's 20M (89,600 queries,
  DFME's epoch, which ``-1`` is there to match), but none below 285,440 queries (nothing is
  trained) and under 10 below 2.85M, where the students' averages, stepped at every 10th
  iteration of an epoch, never start (the average is what their test evaluates).
  ``--rec_grad_norm 0`` (their default 1) turns off a logged diagnostic that training does not
  use: the true gradient's norm through the victim on 256 images at each epoch's first
  iteration, queries their own count leaves out, and only for 3x32x32 images;
- the victim: their ``my_utils.TargetModel`` (log-probabilities, mean-corrected) around our
  counted victim, shown their generator's [-1, 1] images as our [0, 1];
- the students: their ``MultiStudentModel`` of ``MovingAverages`` (momentum 0.9, stepped every
  10 iterations) around our clone for the victim's image size in place of their ResNet-18-8x
  (hours per 10k queries on a CPU). The generator is theirs (``GeneratorA`` in their
  ``MovingAverages``) for the victim's channels and size (``main()`` fixes 3 and 32);
- evaluation: on our test split mapped to [-1, 1] (the range their generator gives), of the
  model their ``test()`` evaluates, ``student(x, test=True)``: the first student's weight
  average (``--combine_student_outputs first``), which is its untrained initial copy until the
  10th iteration (12,800 queries);
- the rest of ``main()`` is done here: it runs only to its parser (it is stopped where it
  calls ``my_utils.setup_args``, which makes its log folders and logger); the cost of an
  iteration, the epochs, the models, losses (``my_utils.build_criterion``) and optimisers are
  made as ``main()`` makes them (``my_utils.build_optimizers_and_schedulers``, which cannot
  build ``--scheduler none``: then the same optimisers and no schedule), and its epoch loop is
  driven here, with no epoch begun once an iteration no longer fits (``train`` checks only
  after an iteration). Their checkpoints and per-epoch tests are not run. Their code counts
  the budget itself; the count in the table is the counted victim's.
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
from torch import nn

from megex.evaluate import Evaluator
from megex.models import build_classifier
from megex.victim import Victim

from .errors import PeerUnavailable
from .metering import BudgetReached, CountedVictim, QueryMeter, clone_scores, finished_peer_row
from .peer_imports import UNUSED_PACKAGES, import_from, peer_imports

# James-Beetham/dual_students run_cifar_ds.sh's flags (cifar10). The teacher checkpoint and
# data folder are replaced by our victim and test split; --resume finds no checkpoint in a
# fresh log folder; --cuda 0: the harness runs on the CPU.
DUAL_STUDENTS_SCRIPT_FLAGS = [
    "--dataset", "cifar10", "--data_dir", "~/data",
    "--ckpt", "checkpoint/teacher/cifar10-resnet34_8x.pt", "--cuda", "0", "--grad_m", "1",
    "--query_budget", "20", "--log_dir", "save_results/cifar10", "--num_students", "2",
    "--lr_G", "1e-4", "--lr_S", "0.3", "--student_model", "resnet18_8x", "--loss", "l1",
    "--epoch_itrs", "-1", "--resume",
]  # fmt: skip
# Iterations an epoch: what --epoch_itrs -1 gives at the script's 20M queries (see above).
SCRIPT_EPOCH_ITERATIONS = 70
# The authors' modules the run uses; my_utils first (it and train import each other, and
# my_utils needs train's classes when its own body runs).
DUAL_STUDENTS_MODULES = (
    "my_utils", "train", "network.gan", "network.moving_averages", "network.multi_student",
)  # fmt: skip
# Imported at the top of their approximate_gradients.py, used by no function called here.
DUAL_STUDENTS_UNUSED = (*UNUSED_PACKAGES, "scipy", "matplotlib")


class _ParsedArgs(Exception):
    """Stops their main() once its parser has run, carrying what it parsed."""

    def __init__(self, parsed: Any):
        super().__init__("parsed")
        self.parsed = parsed


class _VictimFromTanh(nn.Module):
    """Our counted victim shown their generator's [-1, 1] images as our [0, 1]."""

    def __init__(self, counted: CountedVictim):
        super().__init__()
        self.counted = counted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.counted((x + 1) / 2)


class _TheirTest(nn.Module):
    """What their test() evaluates, on our [0, 1] test images mapped to [-1, 1]:
    ``student(x, test=True)``, the first student's weight average."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x * 2 - 1, test=True)


def dual_students_flags(budget: int, seed: int, schedule: str) -> list[str]:
    """The argv given to their parser: the run script's, adapted as the module says."""
    flags = list(DUAL_STUDENTS_SCRIPT_FLAGS)
    flags[flags.index("--query_budget") + 1] = repr(budget / 1e6)
    flags[flags.index("--epoch_itrs") + 1] = str(SCRIPT_EPOCH_ITERATIONS)
    flags += ["--rec_grad_norm", "0", "--seed", str(seed)]
    if schedule == "constant":
        flags += ["--scheduler", "none"]
    return flags


def _parsed_args(peer: dict[str, types.ModuleType], flags: list[str]) -> Any:
    """What the parser in their main() makes of `flags` (main() stopped right after it)."""

    def stop(args: Any, *_: Any, **__: Any) -> None:
        raise _ParsedArgs(args)

    with (
        mock.patch.object(sys, "argv", ["train.py", *flags]),
        mock.patch.object(peer["my_utils"], "setup_args", stop),
    ):
        try:
            peer["train"].main()
        except _ParsedArgs as stopped:
            return stopped.parsed
        except SystemExit as err:  # argparse's refusal (its message is in the log)
            raise RuntimeError(f"their parser refused the flags (exit {err.code})") from None
    raise RuntimeError("their main() returned without calling my_utils.setup_args")


def _cost_per_iteration(args: Any) -> int:
    """Queries an iteration spends, as their main() computes it."""
    if args.num_students == 1:
        return args.batch_size * (args.g_iter * (args.grad_m + 1) + args.d_iter)
    return args.batch_size * args.d_iter


def _models(
    peer: dict[str, types.ModuleType], args: Any, counted: CountedVictim, clone_arch: str
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(teacher, students, generator) in their classes, as their main() builds them (students
    first), our victim and clones inside."""
    c, h, _ = counted.victim.input_shape
    k = args.num_classes
    averages = peer["network.moving_averages"].MovingAverages
    students = [
        averages(build_classifier, ([clone_arch, k, c, h], {}), args.student_momentum)
        for _ in range(args.num_students)
    ]
    student = peer["network.multi_student"].MultiStudentModel(args, students)
    teacher = peer["my_utils"].TargetModel(args, _VictimFromTanh(counted))
    generator = averages(
        peer["network.gan"].GeneratorA,
        ([], dict(nz=args.nz, nc=c, img_size=h, activation=args.G_activation)),
        args.generator_momentum,
    )
    return teacher, student, generator


def _optimisers(
    peer: dict[str, types.ModuleType], args: Any, student: nn.Module, generator: nn.Module
) -> tuple[list[torch.optim.Optimizer], torch.optim.Optimizer, list[Any]]:
    """(students', generator's, schedulers) from their builder; under --scheduler none, which
    it cannot build (its scheduler class is left unset), the same optimisers, no schedule."""
    if args.scheduler != "none":
        return peer["my_utils"].build_optimizers_and_schedulers(
            args, student, generator, None, None
        )
    opt_s = [
        torch.optim.SGD(s.parameters(), lr=args.lr_S, weight_decay=args.weight_decay, momentum=0.9)
        for s in student.models
    ]
    return opt_s, torch.optim.Adam(generator.parameters(), lr=args.lr_G), []


def _train_epochs(
    peer: dict[str, types.ModuleType], args: Any, opts: Any, schedulers: list[Any]
) -> tuple[float, str | None]:
    """Their main()'s epoch loop: (wall seconds, why it stopped short or None)."""
    stopped = None
    start = time.perf_counter()
    try:
        for epoch in range(1, args.number_epochs + 1):
            if args.query_budget < args.cost_per_iteration:
                break
            args.epoch = epoch
            peer["train"].train(opts)
            if args.scheduler != "none":
                for scheduler in schedulers:
                    scheduler.step()
    except BudgetReached as err:
        stopped = f"stopped at the budget: {err}"
    return time.perf_counter() - start, stopped


def _adapted(
    budget: int, args: Any, clone_arch: str, schedule: str, stand_ins: list[str]
) -> list[str]:
    adapted = [
        f"--query_budget {budget / 1e6!r} (millions; the budget then set exactly, {budget} images)",
        f"--epoch_itrs {SCRIPT_EPOCH_ITERATIONS} instead of -1 (what -1 gives at the "
        "script's 20M: -1 gives none below 285,440 queries and under 10 below 2.85M, where "
        "their students' averages never start)",
        "--rec_grad_norm 0 (a logged diagnostic: true-gradient norms through the victim, "
        "outside their query count, for 3x32x32 images only)",
        f"students: their MultiStudentModel of MovingAverages around {args.num_students} x "
        f"megex {clone_arch} (the script's resnet18_8x)",
        "generator: their GeneratorA in their MovingAverages, for the victim's channels and "
        "size (main() fixes 3 and 32)",
        "teacher: our victim in their TargetModel, [-1, 1] -> [0, 1], answering "
        "log-probabilities, counting every image",
        "evaluation: our test split mapped to [-1, 1], student(x, test=True) as their test() "
        "(the first student's weight average)",
        "their main() run to its parser only (stopped at my_utils.setup_args); iteration "
        "cost, epochs, models, losses and optimisers made as main() makes them; its epoch "
        "loop driven here (train per epoch), no epoch begun once an iteration no longer "
        "fits; no checkpoints, no per-epoch test",
    ]
    if schedule == "constant":
        adapted.append(
            "--scheduler none: their build_optimizers_and_schedulers cannot build it; the "
            "same optimisers, no schedulers"
        )
    if stand_ins:
        adapted.append(f"not installed, empty stand-ins at import: {', '.join(stand_ins)}")
    return adapted


def run_dual_students(
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
    """The dual students authors' training loop to the largest budget, our victim its
    teacher (`method` is always 'dual-students')."""
    budget = budgets[-1]
    h = victim.input_shape[1]
    if h % 4:
        raise PeerUnavailable(
            f"their GeneratorA makes images of a multiple of 4 pixels; the victim takes {h}x{h}"
        )
    log_dir = Path(log.name).with_suffix("")  # their train() appends its losses there
    log_dir.mkdir(parents=True, exist_ok=True)
    flags = dual_students_flags(budget, seed, schedule)
    with (
        peer_imports(folder, DUAL_STUDENTS_UNUSED) as stand_ins,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        peer = {name: import_from(folder, name) for name in DUAL_STUDENTS_MODULES}
        args = _parsed_args(peer, flags)
        # What their main() sets after parsing, with the budget exactly in images.
        args.query_budget = budget
        args.log_dir = str(log_dir)
        args.device = torch.device("cpu")
        args.normalization_coefs = None
        args.G_activation = torch.tanh
        args.num_classes = victim.num_classes
        args.cost_per_iteration = _cost_per_iteration(args)
        args.number_epochs = budget // (args.cost_per_iteration * args.epoch_itrs) + 1
        args.start_epoch = 0
        args.logger = types.SimpleNamespace(info=lambda message: print(message, file=log))
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)

        meter = QueryMeter(budget, budgets)
        counted = CountedVictim(victim, meter)
        teacher, student, generator = _models(peer, args, counted, clone_arch)
        student_loss, generator_loss = peer["my_utils"].build_criterion(args)
        opt_s, opt_g, schedulers = _optimisers(peer, args, student, generator)
        progress = peer["train"].tqdm(total=args.epoch_itrs, disable=args.disable_tqdm, position=1)
        opts = peer["train"].TrainOpts(
            student=student,
            teacher=teacher,
            generator=generator,
            student_loss=student_loss,
            generator_loss=generator_loss,
            student_optimizer=opt_s,
            generator_optimizer=opt_g,
            device=args.device,
            args=args,
            use_tqdm=progress,
            use_tqdm_desc="{}",
        )
        evaluated_model = _TheirTest(student)
        meter.evaluate = lambda: clone_scores(evaluated_model, evaluator)
        try:
            wall_s, stopped = _train_epochs(peer, args, opts, schedulers)
        finally:
            progress.close()
        row = finished_peer_row(meter, counted, wall_s, stopped)
    return {
        **row,
        "peer_reported_queries": budget - int(args.query_budget),
        "peer_log_dir": str(log_dir),
        "settings": {
            "functions": "train.train (an epoch), train.main (its parser), train.TrainOpts, "
            "my_utils.TargetModel, my_utils.build_criterion, "
            "my_utils.build_optimizers_and_schedulers, network.gan.GeneratorA, "
            "network.moving_averages.MovingAverages, network.multi_student.MultiStudentModel",
            "argv": flags,
            "epochs": args.number_epochs,
            "epoch_itrs": args.epoch_itrs,
            "cost_per_iteration": args.cost_per_iteration,
            "num_students": args.num_students,
            "batch_size": args.batch_size,
            "d_iter": args.d_iter,
            "g_iter": args.g_iter,
            "lr_S": args.lr_S,
            "lr_G": args.lr_G,
            "student_momentum": args.student_momentum,
            "combine_student_outputs": args.combine_student_outputs,
            "scheduler": args.scheduler,
            "steps": list(args.steps),
            "scale": args.scale,
        },
        "adapted": _adapted(budget, args, clone_arch, schedule, stand_ins),
    }
