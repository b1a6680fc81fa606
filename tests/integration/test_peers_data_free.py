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
    assert f"wrote {out / 'data_free_peers'}.md" in printed

    rows = _rows(out)
    assert set(rows) == {
        ("megex", "dfme-paper"),
        ("megex", "dfme"),
        ("megex", "disguide-paper"),
        ("megex", "disguide"),
    }
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
    assert rows[("megex", "dfme")]["settings"]["directions"] == 2  # from the tuned file
    assert rows[("megex", "disguide")]["settings"]["class_balance"] == 0.5

    table = (out / "data_free_peers.md").read_text()
    assert "| attack | implementation | acc @ 1k | acc @ 2k | queries/s | seeds |" in table
    line = next(x for x in table.splitlines() if "megex dfme-paper" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[0] == "DFME" and cells[2] == "-"
    assert cells[3] == f"{100 * second['clone_accuracy']:.1f}"

    # A second run reuses every finished row and runs nothing, also after the search has
    # added another method's settings to the file.
    files = {p: p.read_text() for p in (out / "runs").iterdir()}
    assert len(files) == 4
    searched = json.loads(tuned_file.read_text())
    searched["methods"]["megex-all"] = {"clone_lr": 0.2}
    tuned_file.write_text(json.dumps(searched))
    assert harness.main(_argv(victim_file, tuned_file, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before") == 4
    assert not any(line.endswith("queries/s") for line in printed.splitlines())  # no runs
    assert {p: p.read_text() for p in (out / "runs").iterdir()} == files
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
    wrong = _argv(victim_file, tuned_file, out)
    wrong[wrong.index("digits")] = "fashion-mnist"
    assert harness.main(wrong) == 2
    assert "but the victim was trained on 'digits'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        harness.main(_argv(victim_file, tuned_file, out)[:-2] + ["--budgets", "0"])
    assert "expected a whole number >= 1" in capsys.readouterr().err
