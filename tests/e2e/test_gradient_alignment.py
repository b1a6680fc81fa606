"""The alignment of DFME's estimate with the exact gradient: the measure, and the command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megex.attacks import DFME, dfme
from megex.cli import main as megex_main
from megex.experiments import gradient_alignment
from megex.experiments.input_size import SIZES
from megex.models import build_classifier
from megex.oracle import LocalOracle
from megex.victim import Victim


def _victim(shape, seed=0) -> Victim:
    torch.manual_seed(seed)
    return Victim(build_classifier("lenet5", 10, shape[0], shape[1]), shape, 10).eval()


def test_the_estimate_aligns_as_exact_differences_allow_and_grows_with_m():
    torch.set_num_threads(1)
    victim = _victim((1, 14, 14))
    attack = DFME(seed=0, nz=16, ngf=8, clone="lenet5")
    attack.setup(LocalOracle(victim, budget=1), iterations=1)
    # An untrained victim's probabilities hardly move: at DFME's epsilon (1e-3) float32
    # rounding would blur its differences, so the step is larger here.
    found = gradient_alignment.measure_alignment(
        attack, victim, directions=(1, 4, 16), batches=4, batch_size=16, epsilon=1e-2
    )
    assert found["d"] == 196
    means = [found["m"][m]["mean"] for m in (1, 4, 16)]
    assert means == sorted(means) and 0 < means[0] and means[-1] < 1
    for m in (1, 4, 16):
        row = found["m"][m]
        assert len(row["batches"]) == 4 and row["low"] <= row["mean"] <= row["high"]
        assert row["sqrt_m_over_d"] == math.sqrt(m / 196)
        # Forward differences agree with autograd's gradient: the measured cosine is what
        # exact directional derivatives along the same directions give.
        assert abs(row["mean"] - row["ideal"]) < 0.02, row
        assert 0.6 < row["ideal"] / row["sqrt_m_over_d"] < 1.1
    # The very functions DFME's generator step uses.
    assert gradient_alignment.forward_difference_gradient is dfme.forward_difference_gradient
    assert gradient_alignment.probe_points is dfme.probe_points
    with pytest.raises(ValueError, match="directions: expected whole numbers >= 1"):
        gradient_alignment.measure_alignment(attack, victim, directions=(0,))


def _plant(root, size, seed=0) -> None:
    dataset, _ = SIZES[size]
    shape = {"14": (1, 14, 14), "colour-56": (3, 56, 56)}[size]
    victim = _victim(shape, seed)
    victim.arch, victim.dataset, victim.accuracy = "lenet5", dataset, 0.5
    victim.save(root / size / "victims" / f"{dataset}-lenet5-seed0-val5000.safetensors")


def test_the_command_measures_each_size_before_and_after_training(tmp_path, fashion_mnist):
    for size in ("14", "colour-56"):
        _plant(tmp_path / "dims", size)
    common = [
        "--victims-root", str(tmp_path / "dims"), "--batches", "2", "--batch-size", "8",
        "--directions", "10", "1",
    ]  # fmt: skip
    out = tmp_path / "out"
    argv = ["--sizes", "14", *common, "--train-queries", "1200", "--out", str(out)]
    assert megex_main(["gradient-alignment", *argv]) == 0
    summary = json.loads((out / "gradient_alignment.json").read_text())
    (row,) = summary["sizes"]
    assert row["d"] == 196 and set(row["phases"]) == {"initial", "trained"}
    trained = row["phases"]["trained"]
    assert 0 < trained["queries"] <= 1200 and 0 <= trained["clone_accuracy"] <= 1
    assert list(trained["m"]) == ["1", "10"]
    table = (out / "gradient_alignment.md").read_text()
    assert "| 14 | 196 | initial | 1 |" in table and "after " in table
    assert (out / "gradient_alignment.png").stat().st_size > 1000
    # Colour: 9,408 values per image, through a channels-last generator.
    argv = ["--sizes", "colour-56", *common, "--train-queries", "0", "--out", str(out)]
    assert megex_main(["gradient-alignment", *argv, "--no-plot"]) == 0
    (row,) = json.loads((out / "gradient_alignment.json").read_text())["sizes"]
    assert row["d"] == 9408 and set(row["phases"]) == {"initial"}
    assert 0 < row["phases"]["initial"]["m"]["10"]["mean"] < 0.2


def test_the_commands_arguments_are_checked(capsys):
    with pytest.raises(SystemExit) as info:
        megex_main(["gradient-alignment", "--directions", "0"])
    assert info.value.code == 2 and "expected a whole number >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        megex_main(["gradient-alignment", "--epsilon", "-1"])
    assert "expected a number > 0" in capsys.readouterr().err
