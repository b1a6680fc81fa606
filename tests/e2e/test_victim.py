import json

import pytest
import torch

from megex import Victim, train_victim
from megex.evaluate import accuracy


def test_digits_recipe_reaches_97_percent(digits_victim, digits_test):
    x, y = digits_test
    assert digits_victim.accuracy >= 0.97
    assert accuracy(digits_victim, x, y) == pytest.approx(digits_victim.accuracy)


def test_save_and_load_round_trip(tmp_path, digits_victim, digits_test):
    path = digits_victim.save(tmp_path / "victims" / "digits")
    assert path.name == "digits.safetensors" and not list(tmp_path.rglob("*.tmp"))
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["arch"] == "small_cnn" and sidecar["dataset"] == "digits"
    assert sidecar["accuracy"] == pytest.approx(digits_victim.accuracy)
    loaded = Victim.load(path)
    x, _ = digits_test
    torch.testing.assert_close(loaded(x), digits_victim(x))
    assert loaded.input_shape == (1, 8, 8) and not loaded.training


def test_load_errors_are_clear(tmp_path, digits_victim):
    with pytest.raises(FileNotFoundError, match="no file"):
        Victim.load(tmp_path / "nothing.safetensors")
    path = digits_victim.save(tmp_path / "v.safetensors")
    path.with_suffix(".json").unlink()
    # The weights file describes itself: the sidecar is a convenience.
    assert Victim.load(path).arch == "small_cnn"
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(1)}, str(bare))
    with pytest.raises(FileNotFoundError, match="no JSON sidecar"):
        Victim.load(bare)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Victim.load(tmp_path / "junk.safetensors")
    bare.with_suffix(".json").write_text('{"arch": "lenet5", "input_shape": [1, 28, 28], '
                                         '"num_classes": 10}')  # fmt: skip
    with pytest.raises(ValueError, match="do not fit lenet5"):
        Victim.load(bare)
    custom = Victim.from_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
                                (1, 8, 8), 10)  # fmt: skip
    with pytest.raises(ValueError, match="custom module"):
        custom.save(tmp_path / "custom.safetensors")


def test_training_arguments_are_checked():
    with pytest.raises(ValueError, match="epochs"):
        train_victim("digits", epochs=0, progress=False)
    with pytest.raises(ValueError, match="unknown classifier 'vgg'"):
        train_victim("digits", "vgg", progress=False)


def test_fashion_mnist_lenet5_recipe_reaches_89_percent(fashion_mnist):
    ds = fashion_mnist
    torch.manual_seed(0)
    victim = train_victim(ds, progress=False)
    assert victim.arch == "lenet5"
    assert victim.accuracy >= 0.89, victim.accuracy
