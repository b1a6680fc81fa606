"""The attacker's image pool: the spec grammar, which images a pool may hold (never a test or
validation image), repeatability, conversion to the victim's shape, and the refusals."""

from __future__ import annotations

import argparse
import gzip
import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from megex import data
from megex.pools import Pool, PoolSpec, VictimImages, load_pool, parse_pool, victim_images
from megex.recipes import cached_victim_path
from megex.variants import resize
from megex.victim import Victim, train_victim

V, P = 200, 100  # validation and pool images held out by the digits victims below


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture
def victim():
    return VictimImages((1, 8, 8), "digits", validation_images=V, pool_images=P)


def as_uint8(pool: Pool) -> np.ndarray:
    return (pool.images * 255).round().to(torch.uint8).numpy()


def rows(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def make_fashion_folder(folder, n_train: int, n_test: int) -> None:
    """Random 28x28 Fashion-MNIST IDX files: the source of the fashion-mnist variants."""
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True)
    for stem, array in arrays.items():
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(folder / f"{stem}.gz", "wb") as handle:
            handle.write(header + array.tobytes())


# --- grammar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("digits:unseen:100", PoolSpec("unseen", "digits", 100)),
        ("fashion-mnist:seen:1000", PoolSpec("seen", "fashion-mnist", 1000)),
        (" fashion-mnist-56:train:7 ", PoolSpec("train", "fashion-mnist-56", 7)),
        ("folder:images", PoolSpec("folder", path="images")),
        ("folder:/data/my images:30", PoolSpec("folder", path="/data/my images", size=30)),
        ("folder:C:/photos", PoolSpec("folder", path="C:/photos")),
        ("folder:C:/photos:5", PoolSpec("folder", path="C:/photos", size=5)),
    ],
)
def test_good_specs_parse_and_print_back(text, expected):
    spec = parse_pool(text)
    assert spec == expected
    assert parse_pool(str(spec)) == spec


@pytest.mark.parametrize(
    "text, message",
    [
        ("imagenet:train:10", "unknown dataset 'imagenet'; expected one of digits, fashion-mnist"),
        ("digits:unseen:0", "N must be a whole number >= 1, got '0'"),
        ("digits:seen:-5", "N must be a whole number >= 1"),
        ("digits:seen:1.5", "N must be a whole number >= 1"),
        ("digits:seen:many", "N must be a whole number >= 1"),
        ("folder:images:0", "N must be a whole number >= 1"),
        ("folder:images:-2", "N must be a whole number >= 1"),
        ("digits:test:10", "expected DATASET:unseen:N, DATASET:seen:N, DATASET:train:N, folder"),
        ("digits:seen", "expected DATASET:unseen:N"),
        ("digits", "expected DATASET:unseen:N"),
        ("", "expected DATASET:unseen:N"),
        ("folder:", "no folder named"),
    ],
)
def test_bad_specs_are_refused_naming_the_spec(text, message):
    with pytest.raises(ValueError) as info:
        parse_pool(text)
    assert f"pool {text.strip()!r}" in str(info.value) and message in str(info.value)


# --- which images -------------------------------------------------------------------------


def test_unseen_images_are_the_held_out_pool_region(digits, victim):
    n = len(digits.x_train)
    pool = load_pool("digits:unseen:60", victim)
    assert pool.images.dtype == torch.float32 and pool.images.shape == (60, 1, 8, 8)
    assert 0 <= pool.images.min() and pool.images.max() <= 1
    assert len(set(pool.positions.tolist())) == 60
    assert all(n - V - P <= i < n - V for i in pool.positions)
    drawn = as_uint8(pool)
    np.testing.assert_array_equal(drawn, digits.x_train[pool.positions])
    # Not one image of the test split, of the validation images or of the training images.
    for forbidden in (digits.x_test, digits.x_train[n - V :], digits.x_train[: n - V - P]):
        assert not rows(drawn) & rows(forbidden)
    assert pool.kind == "unseen" and "did not train on" in pool.description


def test_seen_images_are_training_images_only(digits, victim):
    n = len(digits.x_train)
    pool = load_pool("digits:seen:500", victim, seed=3)
    assert all(0 <= i < n - V - P for i in pool.positions)
    drawn = as_uint8(pool)
    np.testing.assert_array_equal(drawn, digits.x_train[pool.positions])
    for forbidden in (digits.x_test, digits.x_train[n - V - P :]):
        assert not rows(drawn) & rows(forbidden)
    assert pool.description == "500 digits training images the victim trained on"


def test_a_whole_region_can_be_drawn_and_one_more_is_refused(victim):
    assert len(load_pool(f"digits:unseen:{P}", victim).images) == P
    with pytest.raises(
        ValueError, match=f"asks for 101 images; the victim's held-out pool holds {P}"
    ):
        load_pool(f"digits:unseen:{P + 1}", victim)
    with pytest.raises(ValueError, match="the victim's training images holds 1,137"):
        load_pool("digits:seen:5000", victim)


def test_the_same_seed_gives_the_same_images_and_smaller_pools_nest(victim):
    a = load_pool("digits:seen:300", victim, seed=7)
    b = load_pool(parse_pool("digits:seen:300"), victim, seed=7)
    assert torch.equal(a.images, b.images) and a.sha256 == b.sha256 and a.spec == b.spec
    other = load_pool("digits:seen:300", victim, seed=8)
    assert not torch.equal(a.images, other.images) and other.sha256 != a.sha256
    small = load_pool("digits:seen:30", victim, seed=7)
    assert torch.equal(small.images, a.images[:30])


def test_describe_is_what_a_run_folder_records(victim):
    pool = load_pool("digits:unseen:20", victim)
    described = pool.describe()
    assert described == {
        "spec": "digits:unseen:20",
        "kind": "unseen",
        "size": 20,
        "description": "20 digits training images the victim did not train on "
        "(held out for attackers)",
        "sha256": pool.sha256,
    }
    json.dumps(described)
    assert len(pool.sha256) == 64


# --- another dataset: resized and converted -----------------------------------------------


def test_another_dataset_is_resized_to_the_victim(digits):
    victim = VictimImages((1, 14, 14), "fashion-mnist-14", 5000, 1000)
    pool = load_pool("digits:train:40", victim, seed=1)
    assert pool.images.shape == (40, 1, 14, 14)
    np.testing.assert_array_equal(as_uint8(pool), resize(digits.x_train[pool.positions], 14))
    assert "digits training images (another dataset" in pool.description
    assert "converted to 1x14x14" in pool.description


def test_grey_images_are_repeated_for_a_colour_victim(digits):
    victim = VictimImages((3, 8, 8), "cifar10")
    pool = load_pool("digits:train:10", victim)
    assert pool.images.shape == (10, 3, 8, 8)
    for c in range(3):
        np.testing.assert_array_equal(as_uint8(pool)[:, c], digits.x_train[pool.positions, 0])


def test_folder_images_are_read_as_grey_or_colour_to_match_the_victim(tmp_path):
    Image = pytest.importorskip("PIL.Image")  # Pillow: what reads a folder
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20  # (H, W, 3)
    folder = tmp_path / "colour"
    folder.mkdir()
    Image.fromarray(image, "RGB").save(folder / "a.png")
    # Pillow's L conversion is ITU-R 601 luma, not the plain mean: what a user's file gets.
    grey = load_pool(f"folder:{folder}", VictimImages((1, 2, 2), None))
    expected = np.asarray(Image.fromarray(image, "RGB").convert("L"))
    np.testing.assert_array_equal(as_uint8(grey)[0, 0], expected)
    colour = load_pool(f"folder:{folder}", VictimImages((3, 2, 2), None))
    np.testing.assert_array_equal(as_uint8(colour)[0], np.transpose(image, (2, 0, 1)))


def test_a_colour_dataset_becomes_its_channel_mean_for_a_grey_victim(tmp_path):
    root = tmp_path / "fashion"
    make_fashion_folder(root, n_train=12, n_test=3)
    victim = VictimImages((1, 8, 8), "digits")
    pool = load_pool("fashion-mnist-colour-56:train:4", victim, data_root=root)
    colour = data.load("fashion-mnist-colour-56", root).x_train[pool.positions]
    mean = np.rint(resize(colour, 8).mean(axis=1, keepdims=True)).astype(np.uint8)
    np.testing.assert_array_equal(as_uint8(pool), mean)


def test_a_variant_of_the_victims_dataset_stays_before_its_held_out_images(tmp_path):
    root = tmp_path / "fashion"
    make_fashion_folder(root, n_train=40, n_test=6)
    victim = VictimImages((1, 28, 28), "fashion-mnist", validation_images=5, pool_images=10)
    pool = load_pool("fashion-mnist-14:train:25", victim, data_root=root)
    assert pool.images.shape == (25, 1, 28, 28)
    assert sorted(pool.positions.tolist()) == list(range(25))
    small = data.load("fashion-mnist-14", root)
    expected = resize(small.x_train[pool.positions], 28)
    np.testing.assert_array_equal(as_uint8(pool), expected)
    held_out = resize(small.x_train[25:], 28)
    test = resize(small.x_test, 28)
    assert not rows(as_uint8(pool)) & (rows(held_out) | rows(test))
    assert "images the victim trained on, at another size" in pool.description
    with pytest.raises(
        ValueError, match="asks for 26 images; fashion-mnist-14's images the victim"
    ):
        load_pool("fashion-mnist-14:train:26", victim, data_root=root)


# --- refusals -----------------------------------------------------------------------------


def test_the_victims_own_dataset_is_not_another_dataset(victim):
    with pytest.raises(ValueError, match="digits is the victim's own dataset; use digits:unseen:N"):
        load_pool("digits:train:10", victim)


def test_seen_and_unseen_name_the_victims_own_dataset(victim):
    with pytest.raises(
        ValueError, match=r"victim's own dataset \(digits\); .* fashion-mnist:train"
    ):
        load_pool("fashion-mnist:seen:10", victim)
    with pytest.raises(ValueError, match=r"victim's own dataset \(unknown\)"):
        load_pool("digits:seen:10", VictimImages((1, 8, 8), None))


def test_unseen_needs_a_victim_that_held_out_a_pool():
    no_pool = VictimImages((1, 8, 8), "digits", validation_images=V)
    with pytest.raises(ValueError, match="train one with `megex train-victim --pool-images N`"):
        load_pool("digits:unseen:10", no_pool)


def test_missing_dataset_files_name_the_spec(tmp_path):
    victim = VictimImages((1, 8, 8), "digits")
    with pytest.raises(data.DatasetNotFound, match="pool 'mnist:train:5': dataset 'mnist'"):
        load_pool("mnist:train:5", victim, data_root=tmp_path / "nowhere")


def test_a_victim_of_odd_shape_is_refused():
    with pytest.raises(ValueError, match="square 1- or 3-channel victim, got 2x8x8"):
        load_pool("digits:seen:5", VictimImages((2, 8, 8), "digits"))


# --- folders ------------------------------------------------------------------------------


def write_pngs(folder, count, size=(8, 8), mode="L"):
    Image = pytest.importorskip("PIL.Image")

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    channels = 1 if mode == "L" else 3
    images = rng.integers(0, 256, (count, size[1], size[0], channels), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(folder / f"{i:03d}.png")
    return images


def test_a_folder_is_read_in_name_order(tmp_path):
    images = write_pngs(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    pool = load_pool(f"folder:{tmp_path / 'imgs'}", VictimImages((1, 8, 8), "digits"))
    assert pool.images.shape == (5, 1, 8, 8) and pool.positions is None
    np.testing.assert_array_equal(as_uint8(pool)[:, 0], images[..., 0])
    assert pool.description == f"5 image files from {tmp_path / 'imgs'}"


def test_a_folder_subset_is_seeded(tmp_path):
    write_pngs(tmp_path / "imgs", 6)
    spec = f"folder:{tmp_path / 'imgs'}:3"
    victim = VictimImages((1, 8, 8), None)
    a, b = load_pool(spec, victim, seed=1), load_pool(spec, victim, seed=1)
    assert a.images.shape == (3, 1, 8, 8) and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="asks for 7 images; .* holds 6"):
        load_pool(f"folder:{tmp_path / 'imgs'}:7", victim)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder at"):
        load_pool(f"folder:{tmp_path / 'absent'}", VictimImages((1, 8, 8), None))


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="no .png, .jpg or .jpeg files directly in"):
        load_pool(f"folder:{tmp_path / 'empty'}", VictimImages((1, 8, 8), None))


def test_a_wrong_image_size_names_the_file_and_both_sizes(tmp_path):
    write_pngs(tmp_path / "imgs", 2)
    write_pngs(tmp_path / "big", 1, size=(10, 9))
    (tmp_path / "big" / "000.png").rename(tmp_path / "imgs" / "zz.png")
    with pytest.raises(ValueError) as info:
        load_pool(f"folder:{tmp_path / 'imgs'}", VictimImages((1, 8, 8), None))
    message = str(info.value)
    assert "zz.png is 10x9" in message and "expected 8x8" in message


def test_an_unreadable_image_file_is_refused(tmp_path):
    write_pngs(tmp_path / "imgs", 1)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match="cannot read .*broken.jpg as an image"):
        load_pool(f"folder:{tmp_path / 'imgs'}", VictimImages((1, 8, 8), None))


# --- victims that hold out a pool ---------------------------------------------------------


def test_victim_images_reads_what_a_victim_held_out():
    victim = Victim(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
        (1, 8, 8),
        10,
        dataset="digits",
        metadata={"validation_images": 50, "pool_images": 100},
    )
    assert victim_images(victim) == VictimImages((1, 8, 8), "digits", 50, 100)
    assert victim_images(victim.info()) == VictimImages((1, 8, 8), "digits", 50, 100)
    old = {"input_shape": [1, 8, 8], "dataset": "digits", "validation_images": 50}
    assert victim_images(old) == VictimImages((1, 8, 8), "digits", 50, 0)
    with pytest.raises(ValueError, match="input_shape"):
        victim_images({"dataset": "digits"})


def test_train_victim_holds_out_pool_images_before_the_validation_images(monkeypatch):
    import megex.victim as victim_mod

    seen = []
    fit = victim_mod._fit
    monkeypatch.setattr(
        victim_mod, "_fit", lambda v, x, *a: seen.append(x.clone()) or fit(v, x, *a)
    )
    victim = train_victim("digits", validation_images=50, pool_images=100, epochs=1, progress=False)
    assert victim.metadata["validation_images"] == 50 and victim.metadata["pool_images"] == 100
    x_train = data.load("digits").x_train
    np.testing.assert_array_equal(seen[0].numpy(), x_train[: len(x_train) - 150])
    assert victim_images(victim) == VictimImages((1, 8, 8), "digits", 50, 100)
    with pytest.raises(ValueError, match="leave no training images"):
        train_victim("digits", validation_images=1000, pool_images=437, progress=False)
    with pytest.raises(ValueError, match="pool_images: expected a whole number >= 0"):
        train_victim("digits", pool_images=-1, progress=False)


def test_cached_victim_path_names_the_pool_only_when_there_is_one(tmp_path):
    plain = cached_victim_path(tmp_path, "digits", None, 0, 200)
    assert plain.name == "digits-small_cnn-seed0-val200.safetensors"
    assert cached_victim_path(tmp_path, "digits", None, 0, 200, pool_images=0) == plain
    pooled = cached_victim_path(tmp_path, "digits", None, 0, 200, pool_images=100)
    assert pooled.name == "digits-small_cnn-seed0-val200-pool100.safetensors"
    assert cached_victim_path(tmp_path, "digits", None, 1, 0, 100).name == (
        "digits-small_cnn-seed1-pool100.safetensors"
    )


def test_train_victim_command_takes_the_held_out_counts(tmp_path):
    from megex.cli import victim as victim_cli
    from megex.cli.errors import UsageError

    parser = argparse.ArgumentParser()
    victim_cli.add_parser(parser.add_subparsers())
    out = tmp_path / "v.safetensors"
    argv = ["train-victim", "--dataset", "digits", "--out", str(out), "--quiet", "--epochs", "1"]
    args = parser.parse_args([*argv, "--validation-images", "50", "--pool-images", "100"])
    assert args.func(args) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["validation_images"] == 50 and sidecar["pool_images"] == 100
    args = parser.parse_args([*argv, "--validation-images", "1000", "--pool-images", "437"])
    with pytest.raises(UsageError, match="leave no training images: digits has 1437"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--pool-images", "-1"])


# --- Fashion-MNIST, where installed -------------------------------------------------------


def test_fashion_mnist_pools(fashion_mnist):
    n = len(fashion_mnist.x_train)
    victim = VictimImages((1, 28, 28), "fashion-mnist", validation_images=5000, pool_images=1000)
    pool = load_pool("fashion-mnist:unseen:1000", victim)
    assert pool.images.shape == (1000, 1, 28, 28)
    assert all(n - 6000 <= i < n - 5000 for i in pool.positions)
    assert pool.description == (
        "1,000 Fashion-MNIST training images the victim did not train on (held out for attackers)"
    )
    ood = load_pool("digits:train:100", victim)
    assert ood.images.shape == (100, 1, 28, 28)
    small = load_pool("fashion-mnist-14:train:100", victim)
    assert small.images.shape == (100, 1, 28, 28) and small.positions.max() < n - 6000
