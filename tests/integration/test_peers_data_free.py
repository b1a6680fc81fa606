"""benchmarks/peers/data_free.py at toy size: our methods alone (table, JSON, resume), and the
boundary to the public implementations through fake packages with their interfaces (mebench's
attack runner and state, the DisGUIDE authors' parser and training loop), so that counting,
budgets, evaluation and imports are checked without the real code."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "peers" / "data_free.py"
BUDGETS = [1000, 2000]


@pytest.fixture(scope="module")
def harness():
    """The documented entry script, loaded as a module: its `main` is the command line."""
    spec = importlib.util.spec_from_file_location("data_free_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)  # puts the harness's package on the import path
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def metering(harness):
    return importlib.import_module("data_free_harness.metering")


@pytest.fixture(scope="module")
def peer_imports(harness):
    return importlib.import_module("data_free_harness.peer_imports")


@pytest.fixture
def victim_file(tmp_path, digits_victim):
    return digits_victim.save(tmp_path / "digits.safetensors")


@pytest.fixture
def tuned_file(tmp_path):
    path = tmp_path / "tuned.json"
    searched = {"dfme": {"clone_steps": 1, "directions": 2}, "disguide": {"class_balance": 0.5}}
    path.write_text(json.dumps({"methods": searched}))
    return path


def _argv(victim_file, tuned_file, out, *extra):
    return [
        "--victim", str(victim_file), "--dataset", "digits",
        "--budgets", *map(str, BUDGETS), "--seeds", "0",
        "--tuned", str(tuned_file), "--out", str(out), "--test-images", "200", *extra,
    ]  # fmt: skip


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    doc = json.loads((out / "data_free_peers.json").read_text())
    return {(r["peer"], r["method"]): r for r in doc["rows"]}


def test_ours_alone_table_json_and_resume(harness, victim_file, tuned_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert harness.main(_argv(victim_file, tuned_file, out)) == 0
    printed = capsys.readouterr().out
    assert "peers not given: --mebench" in printed and "--disguide" in printed
    assert "--dual-students (the dual-students-authors rows)" in printed
    assert f"wrote {out / 'data_free_peers'}.md" in printed

    rows = _rows(out)
    assert set(rows) == {
        ("megex", "dfme-paper"),
        ("megex", "dfme-published"),
        ("megex", "dfme"),
        ("megex", "disguide-paper"),
        ("megex", "disguide-published"),
        ("megex", "disguide"),
        ("megex", "dual-students-paper"),
        ("megex", "dual-students-published"),
        ("megex", "dual-students"),
    }
    # The tuned file has no dual-students yet (its search still running): not run, not a
    # failure (exit status 0), said in the output and in the table.
    waiting = rows.pop(("megex", "dual-students"))
    assert waiting["status"] == "unavailable"
    assert "has no settings for 'dual-students' yet" in waiting["reason"]
    assert "megex dual-students (dual students in megex's loop, tuned), seed 0: not run" in printed
    for row in rows.values():
        assert row["status"] == "finished"
        assert [e["budget"] for e in row["evaluations"]] == BUDGETS
        assert 0 < row["queries_counted"] <= BUDGETS[-1]
        assert row["queries_per_s"] > 0 and row["evaluation_s"] >= 0
        for e in row["evaluations"]:
            assert e["queries"] <= e["budget"]
            if e["clone_accuracy"] is not None:
                assert 0.0 <= e["clone_accuracy"] <= 1.0
    # DFME as published spends 256 x 7 = 1,792 queries an iteration: none fits in 1,000.
    paper = rows[("megex", "dfme-paper")]
    first, second = paper["evaluations"]
    assert first["clone_accuracy"] is None and "1792" in first["reason"]
    assert second["queries"] == 1792 and second["clone_accuracy"] is not None
    assert paper["settings"]["batch_size"] == 256 and paper["settings"]["clone_steps"] == 5
    assert paper["settings"]["lr_schedule"] == "constant"
    disguide = rows[("megex", "disguide-paper")]["settings"]
    assert (disguide["clone_lr"], disguide["generator_lr"], disguide["class_balance"]) == (
        0.03,
        1e-4,
        0.2,
    )
    assert disguide["replay_size"] == BUDGETS[-1]  # the 1M ring, as large as the budget
    # Dual students with its authors' run script: lr_S 0.3, lr_G 1e-4, two students, 5
    # query batches of 256 per generator step, no replay, the first student's average.
    dual = rows[("megex", "dual-students-paper")]
    expected = {
        "attack": "dual-students", "clone_lr": 0.3, "generator_lr": 1e-4, "clones": 2,
        "class_balance": 0.0, "discrepancy": "logit_l1", "batch_size": 256,
        "generator_steps": 1, "clone_steps": 5, "replay_size": 0,
        "clone_updates_per_1k_queries": 0.0, "evaluated": "first", "ngf": 64,
        "lr_schedule": "constant",
    }  # fmt: skip
    assert {k: dual["settings"][k] for k in expected} == expected
    assert dual["queries_counted"] == 1280  # one iteration of 5 x 256 fits in 2,000
    assert rows[("megex", "dfme")]["settings"]["directions"] == 2  # from the tuned file
    # The search's published-settings trial: the paper's searched knobs (DFME's 5 clone
    # steps moved to the space's 3), the shared settings for the rest (not the paper's).
    published = rows[("megex", "dfme-published")]["settings"]
    assert (published["clone_lr"], published["generator_lr"], published["directions"]) == (
        0.1,
        1e-4,
        1,
    )
    assert published["clone_steps"] == 3 and published["ngf"] == 8  # not the paper's 64
    published = rows[("megex", "disguide-published")]["settings"]
    assert (published["clone_lr"], published["class_balance"], published["ngf"]) == (0.03, 0.2, 8)
    assert rows[("megex", "disguide")]["settings"]["class_balance"] == 0.5

    table = (out / "data_free_peers.md").read_text()
    assert "| attack | implementation | acc @ 1k | acc @ 2k | queries/s | seeds |" in table
    line = next(x for x in table.splitlines() if "megex dfme-paper" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "DFME" and cells[2] == "-"
    assert cells[3] == f"{100 * second['clone_accuracy']:.1f}"
    assert "dual students in megex's loop, tuned): not run: --tuned:" in table

    # A second run reuses every finished row, also after the search has added other
    # methods' settings to the file; it runs only the row whose settings are new there.
    files = {p: p.read_text() for p in (out / "runs").iterdir()}
    assert len(files) == 8
    searched = json.loads(tuned_file.read_text())
    searched["methods"]["megex-all"] = {"clone_lr": 0.2}
    searched["methods"]["dual-students"] = {"clone_lr": 0.05}
    tuned_file.write_text(json.dumps(searched))
    assert harness.main(_argv(victim_file, tuned_file, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before") == 8
    ran = [line for line in printed.splitlines() if line.endswith("queries/s")]
    assert len(ran) == 1 and ran[0].startswith("megex dual-students (dual students")
    tuned_dual = _rows(out)[("megex", "dual-students")]
    assert tuned_dual["status"] == "finished"
    assert tuned_dual["settings"]["clone_lr"] == 0.05
    assert tuned_dual["plan"]["tuned_settings"] == {"clone_lr": 0.05}
    assert {p: p.read_text() for p in (out / "runs").iterdir() if p in files} == files
    # Another plan in the same folder is refused rather than mixed in.
    assert harness.main(_argv(victim_file, tuned_file, out, "--schedule", "published")) == 2
    assert "was run with another plan (schedule differ)" in capsys.readouterr().err
    # So is a row whose own searched settings changed.
    searched["methods"]["disguide"] = {"class_balance": 0.1}
    tuned_file.write_text(json.dumps(searched))
    assert harness.main(_argv(victim_file, tuned_file, out)) == 2
    assert "another plan (tuned_settings differ)" in capsys.readouterr().err


# --- fake peers with the imported interfaces ------------------------------------------------

FAKE_MEBENCH = {
    "mebench/__init__.py": "",
    "mebench/core/__init__.py": "",
    "mebench/core/state.py": """
        from dataclasses import dataclass, field

        @dataclass
        class BenchmarkState:
            query_count: int = 0
            budget_remaining: int = 0
            attack_state: dict = field(default_factory=dict)
            metadata: dict = field(default_factory=dict)
    """,
    "mebench/core/types.py": """
        from dataclasses import dataclass
        import torch

        @dataclass
        class OracleOutput:
            kind: str
            y: torch.Tensor
    """,
    "mebench/core/context.py": """
        class BenchmarkContext:
            def __init__(self, state, oracle, logger=None, config=None):
                self.state, self.oracle, self.config = state, oracle, config or {}

            @property
            def budget_remaining(self):
                return int(self.state.budget_remaining)
    """,
    "mebench/core/seed.py": """
        import torch

        def set_seed(seed):
            torch.manual_seed(seed)
    """,
    # As at mebench's newest commit: the package imports every attacker, one of them broken.
    "mebench/attackers/__init__.py": "from mebench.attackers.broken import Missing\n",
    "mebench/attackers/broken.py": "from mebench.core.state import Missing\n",
    "mebench/attackers/dfme.py": """
        import torch
        import torch.nn.functional as F
        import torchvision.transforms  # imported, never used, as mebench's runner does

        def create_substitute(arch, num_classes, input_channels=3, **kwargs):
            raise RuntimeError("the harness must give the attack its own clone")

        class DFME:
            def __init__(self, config, state):
                self.state = state
                self.batch_size = int(config.get("batch_size", 64))
                self.shape = state.metadata["input_shape"]
                self.student = create_substitute(
                    arch="resnet18-8x", num_classes=state.metadata["num_classes"]
                )
                self.opt = torch.optim.SGD(self.student.parameters(), lr=0.05)

            def run(self, ctx):
                spins = 0
                print("[Query Progress] the peer's own output")
                while ctx.budget_remaining > 0:
                    if ctx.budget_remaining < self.batch_size:
                        spins += 1  # mebench's loop: nothing fits, so it goes round
                        assert spins < 10_000, "spinning: the oracle must report 0 left"
                        continue
                    x = torch.rand(self.batch_size, *self.shape) * 2 - 1  # tanh range
                    probs = ctx.oracle.query(x).y
                    loss = F.l1_loss(F.log_softmax(self.student(x), 1), probs.log())
                    self.opt.zero_grad()
                    loss.backward()
                    self.opt.step()
                self.state.attack_state["substitute"] = self.student
    """,
}

FAKE_AUTHORS = {
    "disguide/config.py": "log_file = None\n",
    "disguide/cli_parser.py": """
        import argparse
        import sys

        DEFAULTS = dict(
            epoch_itrs=50, nz=256, weight_decay=5e-4, steps=[0.1, 0.3, 0.5], scale=0.3,
            scheduler="multistep", replay="Off", d_iter=5, g_iter=1, lr_S=0.1, lr_G=1e-4,
            grad_m=1, rep_iter=1, grayscale=0, ensemble_size=4,
        )

        def _value(text):
            for kind in (int, float):
                try:
                    return kind(text)
                except ValueError:
                    pass
            return text

        def parse_args(set_total_query_budget=False):
            values, key = dict(DEFAULTS), None
            for token in sys.argv[1:]:
                if token.startswith("--"):
                    key = token[2:].replace("-", "_")
                    values[key] = []
                else:
                    values[key].append(_value(token))
            for k, v in values.items():
                if isinstance(v, list) and len(v) == 1 and k != "steps":
                    values[k] = v[0]
            values["steps"] = values.pop("step", values["steps"])
            args = argparse.Namespace(**values)
            args.query_budget = int(args.query_budget * 10**6)
            return args
    """,
    "disguide/my_utils.py": """
        def compute_cost_per_iteration(args):
            if args.experiment_type == "dfme":
                return args.batch_size * (args.g_iter * (args.grad_m + 1) + args.d_iter)
            return args.batch_size * args.d_iter
    """,
    "disguide/teacher.py": """
        import torch
        from torch import nn

        class TeacherModel(nn.Module):
            def __init__(self, model, transform=None):
                super().__init__()
                self.model, self.transform = model, transform

            def forward(self, x):
                assert not self.training
                with torch.no_grad():
                    return self.model(self.transform(x) if self.transform else x)
    """,
    "disguide/ensemble.py": """
        import torch
        from torch import nn

        class Ensemble(nn.Module):
            def __init__(self, ensemble_size=16, num_classes=10, student_model="x"):
                super().__init__()
                self.subnets = nn.ModuleList([nn.Linear(1, 1) for _ in range(ensemble_size)])

            def forward(self, x, idx=-1):
                if idx >= 0:
                    return self.subnets[idx](x)
                return torch.stack([net(x) for net in self.subnets], dim=1)

            def size(self):
                return len(self.subnets)
    """,
    "disguide/network/__init__.py": "from . import gan\n",
    "disguide/network/gan.py": """
        import ipdb  # imported at the top by the authors' gan.py, never used
        from torch import nn

        class GeneratorA(nn.Module):
            def __init__(self, nz=100, ngf=64, nc=1, img_size=32, activation=None, grayscale=0):
                super().__init__()
                self.shape = (nc, img_size, img_size)
                self.l1 = nn.Linear(nz, nc * img_size * img_size)
                self.activation = activation

            def forward(self, z):
                return self.activation(self.l1(z).view(len(z), *self.shape))
    """,
    "disguide/replay.py": """
        class _NoReplay:
            def update(self, x, y):
                pass

            def new_epoch(self):
                pass

        def init_replay_memory(args):
            return _NoReplay()
    """,
    # DisGUIDE here reports half its queries; the DFME experiment never looks at its budget.
    "disguide/train.py": """
        import torch
        import torch.nn.functional as F
        from torch.utils.tensorboard import SummaryWriter  # at the top, as the authors' is

        import config

        def train_epoch_ensemble(args, generator, student, teacher, device, opt_s, opt_g,
                                 epoch, replay_memory):
            for i in range(args.epoch_itrs):
                z = torch.randn(args.batch_size, args.nz)
                fake = generator(z).detach()
                t_logit = teacher(fake)
                if args.experiment_type == "disguide":
                    args.current_query_count += len(fake) // 2
                    args.query_budget -= args.cost_per_iteration
                else:
                    args.current_query_count += len(fake)
                for idx in range(student.size()):
                    loss = F.l1_loss(student(fake, idx=idx), t_logit)
                    opt_s.zero_grad()
                    loss.backward()
                    opt_s.step()
                config.log_file.write(f"epoch {epoch} iteration {i}\\n")
                spent = args.query_budget < args.cost_per_iteration
                if args.experiment_type == "disguide" and spent:
                    break
    """,
}


# The dual students authors' code: the parser in train.main(), train.train (an epoch, its own
# count), and the classes it is given. The students' averages step every 2nd iteration here.
FAKE_DUAL_STUDENTS = {
    "dual_students/train.py": """
        import argparse
        import dataclasses
        import json

        import torch
        import torchvision  # imported at the top, as the authors' is, never used
        from tqdm import tqdm

        import my_utils
        import network

        @dataclasses.dataclass(frozen=True)
        class TrainOpts:
            student: torch.nn.Module
            generator: torch.nn.Module
            student_loss: torch.nn.Module
            device: torch.device
            use_tqdm: tqdm
            use_tqdm_desc: str
            teacher: torch.nn.Module
            generator_loss: torch.nn.Module
            student_optimizer: list
            generator_optimizer: torch.optim.Optimizer
            args: argparse.Namespace

        def train(opts):
            args = opts.args
            for i in range(args.epoch_itrs):
                opts.generator.train()
                opts.student.eval()
                opts.generator_optimizer.zero_grad()
                fake = opts.generator(torch.randn(args.batch_size, args.nz), pre_x=True)
                s_logit = opts.student(fake, combine=False)
                loss_G = -opts.generator_loss(s_logit[0], s_logit[1])
                loss_G.backward()
                opts.generator_optimizer.step()
                opts.generator.eval()
                opts.student.train()
                for _ in range(args.d_iter):
                    fake = opts.generator(torch.randn(args.batch_size, args.nz)).detach()
                    for o in opts.student_optimizer:
                        o.zero_grad()
                    with torch.no_grad():
                        t_logit = opts.teacher(fake)
                    for m, o in zip(opts.student.models, opts.student_optimizer):
                        opts.student_loss(m(fake), t_logit).backward()
                        o.step()
                if i == 0:
                    with open(args.log_dir + "/loss.json.txt", "a") as f:
                        f.write(json.dumps(dict(epoch=args.epoch)) + "\\n")
                opts.use_tqdm.update()
                if i % 2 == 1:
                    [m(None, step=True) for m in opts.student.models]
                args.query_budget -= args.cost_per_iteration
                if args.query_budget < args.cost_per_iteration:
                    break

        def main():
            parser = argparse.ArgumentParser()
            for name, value in dict(
                batch_size=256, query_budget=20.0, epoch_itrs=50, g_iter=1, d_iter=1,
                lr_S=0.1, lr_G=1e-4, nz=16, loss="l1", generator_loss="l1",
                scheduler="multistep", scale=0.3, dataset="cifar10", data_dir="data",
                model="resnet34_8x", weight_decay=5e-4, cuda=0, seed=7, ckpt="x.pt",
                log_dir="results", grad_m=1, rec_grad_norm=1, student_model="resnet18_8x",
                num_students=1, combine_student_outputs="first", student_momentum=0.9,
                generator_momentum=0.9, MAZE=0,
            ).items():
                parser.add_argument("--" + name, type=type(value), default=value)
            parser.add_argument("--steps", nargs="+", type=float, default=[0.1, 0.3, 0.5])
            parser.add_argument("--resume", action="store_true")
            parser.add_argument("--disable_tqdm", action="store_true")
            args = parser.parse_args()
            my_utils.setup_args(args)
            raise RuntimeError("the rest of main() needs the teacher's checkpoint")
    """,
    "dual_students/my_utils.py": """
        import torch

        import network
        import train

        def setup_args(args):
            raise RuntimeError("makes log folders and a logger: main() is stopped here")

        class TargetModel(torch.nn.Module):
            def __init__(self, args, model):
                super().__init__()
                self.model = model

            def forward(self, x):
                o = torch.log_softmax(self.model(x), dim=1)
                return (o - o.mean(dim=1, keepdim=True)).detach()

        def build_criterion(args):
            return torch.nn.L1Loss(), torch.nn.L1Loss()

        def build_optimizers_and_schedulers(args, student, generator, s_state, g_state):
            opt_s = [torch.optim.SGD(s.parameters(), lr=args.lr_S) for s in student.models]
            opt_g = torch.optim.Adam(generator.parameters(), lr=args.lr_G)
            if args.scheduler == "multistep":
                sched_class = torch.optim.lr_scheduler.MultiStepLR
            steps = sorted(int(step * args.number_epochs) for step in args.steps)
            return opt_s, opt_g, [sched_class(o, steps, args.scale) for o in [*opt_s, opt_g]]

        def measure_true_grad_norm(opts: train.TrainOpts, x):  # needs train fully imported
            raise RuntimeError("--rec_grad_norm must be 0")
    """,
    "dual_students/network/__init__.py": """
        from . import gan, moving_averages, multi_student
    """,
    "dual_students/network/gan.py": """
        from torch import nn

        class GeneratorA(nn.Module):
            def __init__(self, nz=100, ngf=64, nc=1, img_size=32, activation=None):
                super().__init__()
                self.shape = (nc, img_size, img_size)
                self.l1 = nn.Linear(nz, nc * img_size * img_size)
                self.activation = activation

            def forward(self, z, pre_x=False):
                img = self.l1(z).view(len(z), *self.shape)
                return img if pre_x else self.activation(img)
    """,
    "dual_students/network/moving_averages.py": """
        import torch
        from torch import nn

        class MovingAverages(nn.Module):
            def __init__(self, model_class, args_kwargs=([], {}), momentum=0):
                super().__init__()
                self.model_train = model_class(*args_kwargs[0], **args_kwargs[1])
                self.model_test = model_class(*args_kwargs[0], **args_kwargs[1])
                self.momentum = momentum

            def forward(self, x, test=False, step=False, **kwargs):
                if step:
                    with torch.no_grad():
                        for tr, te in zip(self.model_train.state_dict().values(),
                                          self.model_test.state_dict().values()):
                            te.copy_(self.momentum * te + (1 - self.momentum) * tr)
                    return None
                return (self.model_test if test else self.model_train)(x, **kwargs)
    """,
    "dual_students/network/multi_student.py": """
        import torch

        class MultiStudentModel(torch.nn.Module):
            def __init__(self, args, models):
                super().__init__()
                self.models = torch.nn.ModuleList(models)

            def forward(self, x, *args, combine=True, **kwargs):
                models = self.models[:1] if combine else self.models
                out = [m(x, *args, **kwargs) for m in models]
                return out[0] if combine else out
    """,
}


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def test_fake_peers_are_counted_stopped_and_evaluated_at_the_boundary(
    harness, peer_imports, victim_file, tuned_file, tmp_path, capsys
):
    mebench = _write_tree(tmp_path / "mebench-checkout", FAKE_MEBENCH)
    authors = _write_tree(tmp_path / "disguide-checkout", FAKE_AUTHORS)
    out = tmp_path / "out"
    argv = _argv(
        victim_file, tuned_file, out, "--mebench", str(mebench), "--disguide", str(authors)
    )
    assert harness.main(argv) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    assert "[Query Progress]" not in printed  # the peer's own output goes to its log
    rows = _rows(out)

    dfme = rows[("mebench", "dfme")]
    assert dfme["status"] == "finished", dfme.get("reason")
    # Batches of 64 up to the last that fits; then the oracle reports nothing left.
    assert dfme["queries_counted"] == dfme["peer_reported_queries"] == 1984
    assert [e["queries"] for e in dfme["evaluations"]] == [960, 1984]
    assert all(0 <= e["clone_accuracy"] <= 1 for e in dfme["evaluations"])
    assert dfme["query_pixels"][0] < 0  # it sends its tanh images as they are
    assert any("create_substitute replaced" in a for a in dfme["adapted"])
    assert any("__init__.py not run" in a for a in dfme["adapted"])
    assert "[Query Progress]" in Path(dfme["log"]).read_text()
    assert "sent the victim pixels from -1" in (out / "data_free_peers.md").read_text()

    missing = rows[("mebench", "disguide")]
    assert missing["status"] == "unavailable"
    assert "has no mebench/attackers/disguide.py" in missing["reason"]

    disguide = rows[("disguide-authors", "disguide")]
    assert disguide["status"] == "finished", disguide.get("reason")
    # The script's batch of 256, one per iteration, while an iteration fits: 7 x 256.
    assert disguide["queries_counted"] == 1792
    assert disguide["peer_reported_queries"] == 896  # its own count is not the table's
    assert disguide["settings"]["argv"][:2] == ["--experiment-type", "disguide"]
    assert "--scheduler" in disguide["settings"]["argv"]
    # The teacher's transform maps their [-1, 1] images to the victim's [0, 1].
    low, high = disguide["query_pixels"]
    assert 0 <= low < high <= 1
    assert "epoch 1 iteration 6" in Path(disguide["log"]).read_text()

    overspender = rows[("disguide-authors", "dfme")]
    assert overspender["status"] == "finished"
    assert overspender["stopped"].startswith("stopped at the budget")
    assert overspender["queries_counted"] == 1792  # the 8th batch would pass 2,000: refused
    assert [e["queries"] for e in overspender["evaluations"]] == [768, 1792]

    # The peers' modules and the stand-ins are forgotten once they have run.
    for name in ("mebench", "mebench.attackers.dfme", "cli_parser", "train", "config"):
        assert name not in sys.modules
    for name in ("torchvision", "ipdb", "torch.utils.tensorboard"):
        module = sys.modules.get(name)
        assert module is None or not isinstance(module, peer_imports._AbsentPackage)


def test_fake_dual_students_is_counted_evaluated_and_adapted(
    harness, peer_imports, victim_file, tuned_file, tmp_path, capsys, monkeypatch
):
    checkout = _write_tree(tmp_path / "dual_students-checkout", FAKE_DUAL_STUDENTS)
    out = tmp_path / "out"
    # The peer's row alone (ours are the test above's).
    run_rows = importlib.import_module("data_free_harness.run_rows")
    monkeypatch.setattr(run_rows, "ROWS", [r for r in run_rows.ROWS if r[0] != "megex"])
    argv = _argv(victim_file, tuned_file, out, "--dual-students", str(checkout))
    assert harness.main(argv) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    not_given = next(x for x in printed.splitlines() if x.startswith("peers not given"))
    assert "--disguide" in not_given and "--dual-students" not in not_given
    row = _rows(out)[("dual-students-authors", "dual-students")]
    assert row["status"] == "finished", row.get("reason")
    # The parser's batch of 256 and --d_iter 1 here: 7 iterations fit in 2,000; their own
    # count (the budget they decrement) and the counted victim's agree.
    assert row["queries_counted"] == row["peer_reported_queries"] == 1792
    assert [e["budget"] for e in row["evaluations"]] == BUDGETS
    assert [e["queries"] for e in row["evaluations"]] == [768, 1792]
    assert all(0 <= e["clone_accuracy"] <= 1 for e in row["evaluations"])
    low, high = row["query_pixels"]  # [-1, 1] images shown to the victim as [0, 1]
    assert 0 <= low < high <= 1
    argv_given = row["settings"]["argv"]
    for flag, value in [
        ("--lr_S", "0.3"),
        ("--num_students", "2"),
        ("--query_budget", "0.002"),
        ("--epoch_itrs", "70"),
        ("--rec_grad_norm", "0"),
        ("--scheduler", "none"),
    ]:
        assert argv_given[argv_given.index(flag) + 1] == value
    assert row["settings"]["lr_S"] == 0.3 and row["settings"]["num_students"] == 2
    assert row["settings"]["cost_per_iteration"] == 256 and row["settings"]["epochs"] == 1
    adapted = " | ".join(row["adapted"])
    for part in (
        "--epoch_itrs 70 instead of -1",
        "--rec_grad_norm 0",
        "megex small_cnn",
        "their TargetModel",
        "student(x, test=True)",
        "--scheduler none",
        "stopped at my_utils.setup_args",
        "torchvision",
    ):
        assert part in adapted, part
    assert '"epoch": 1' in (Path(row["peer_log_dir"]) / "loss.json.txt").read_text()
    assert row["plan"]["peer_commit"] == "unknown"  # not a git checkout

    # The published schedule goes through their own optimiser and schedule builder.
    published = _argv(
        victim_file,
        tuned_file,
        tmp_path / "published",
        "--schedule",
        "published",
        "--dual-students",
        str(checkout / "dual_students"),
    )
    assert harness.main(published) == 0
    row = _rows(tmp_path / "published")[("dual-students-authors", "dual-students")]
    assert row["status"] == "finished" and row["settings"]["scheduler"] == "multistep"
    assert not any("--scheduler none" in a for a in row["adapted"])

    for name in ("train", "my_utils", "network", "network.gan"):
        assert name not in sys.modules
    assert not isinstance(sys.modules.get("torchvision"), peer_imports._AbsentPackage)


def test_the_meter_evaluates_before_a_mark_is_passed_and_refuses_whole(metering):
    meter = metering.QueryMeter(budget=100, marks=[50, 100])
    seen = []
    meter.evaluate = lambda: {"clone_accuracy": meter.count / 100}
    for n in (30, 30, 30):
        meter.before(n)
        meter.after(torch.zeros(n, 1, 2, 2))
        seen.append(meter.count)
    assert seen == [30, 60, 90]
    assert meter.rows[50]["queries"] == 30  # before the request that passed 50
    with pytest.raises(metering.BudgetReached):
        meter.before(30)
    assert meter.count == 90 and meter.rows[100]["queries"] == 90
    meter.finish()
    assert sorted(meter.rows) == [50, 100]


def test_bad_arguments_are_named(harness, victim_file, tuned_file, tmp_path, capsys):
    out = tmp_path / "out"
    missing = _argv(tmp_path / "nope.safetensors", tuned_file, out)
    assert harness.main(missing) == 2
    assert "--victim: no file at" in capsys.readouterr().err
    assert harness.main(_argv(victim_file, tuned_file, out, "--mebench", str(tmp_path))) == 2
    assert "expected a checkout of caumin/model-extraction-benchmark" in capsys.readouterr().err
    assert harness.main(_argv(victim_file, tuned_file, out, "--disguide", str(tmp_path))) == 2
    assert "expected a checkout of lin-tan/disguide" in capsys.readouterr().err
    for folder in (tmp_path, tmp_path / "nope"):
        bad = _argv(victim_file, tuned_file, out, "--dual-students", str(folder))
        assert harness.main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("data_free.py: error: --dual-students:")
        assert "expected a checkout of James-Beetham/dual_students" in err
    wrong = _argv(victim_file, tuned_file, out)
    wrong[wrong.index("digits")] = "fashion-mnist"
    assert harness.main(wrong) == 2
    assert "but the victim was trained on 'digits'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        harness.main(_argv(victim_file, tuned_file, out)[:-2] + ["--budgets", "0"])
    assert "expected a whole number >= 1" in capsys.readouterr().err
