"""Fashion-MNIST at other sizes and in colour: shapes, splits, determinism, and that colour
carries class information that the brightness does not."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from megex import data, variants
from megex.variants import CHROMA, LUMA


def _write_idx(path, array) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture()
def small_fashion_mnist(tmp_path):
    """A folder of Fashion-MNIST-format files: 30 training and 12 test images."""
    rng = np.random.RandomState(5)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (30, 28, 28)),
        "train-labels-idx1-ubyte": rng.randint(0, 10, 30),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (12, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.randint(0, 10, 12),
    }
    for stem, array in arrays.items():
        _write_idx(folder / f"{stem}.gz", array)
    return folder


def test_every_variant_is_loadable_by_name_with_the_originals_splits(small_fashion_mnist):
    source = data.load("fashion-mnist", root=small_fashion_mnist)
    shapes = {
        "fashion-mnist-14": (1, 14, 14),
        "fashion-mnist-56": (1, 56, 56),
        "fashion-mnist-colour-56": (3, 56, 56),
    }
    assert set(shapes) <= set(data.DATASETS)
    for name, shape in shapes.items():
        ds = data.load(name, root=small_fashion_mnist)
        again = data.load(name, root=small_fashion_mnist)
        assert ds.name == name and ds.input_shape == shape
        assert ds.x_train.dtype == np.uint8 and len(ds.x_train) == 30 and len(ds.x_test) == 12
        # The same labels in the same order: the validation images (the last training
        # images) and the test split are the original's.
        assert np.array_equal(ds.y_train, source.y_train)
        assert np.array_equal(ds.y_test, source.y_test)
        assert np.array_equal(ds.x_train, again.x_train)
        assert np.array_equal(ds.x_test, again.x_test)
        x_val, y_val = ds.validation_tensors(5)
        assert x_val.shape == (5, *shape) and torch.equal(y_val, torch.from_numpy(ds.y_train[-5:]))


def test_resizing_is_bilinear_antialiased_when_shrinking_and_per_image():
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (7, 1, 28, 28)).astype(np.uint8)
    small = variants.resize(images, 14)
    big = variants.resize(images, 56)
    x = torch.from_numpy(images).float()
    for out, size, antialias in ((small, 14, True), (big, 56, False)):
        expected = torch.nn.functional.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
        )
        assert out.shape == (7, 1, size, size) and out.dtype == np.uint8
        assert np.abs(out.astype(np.float32) - expected.numpy()).max() <= 0.5 + 1e-4
    # Antialiased: a checkerboard shrinks to flat grey (away from the border, where the
    # filter is cut short), not to one of its colours.
    board = np.indices((28, 28)).sum(axis=0) % 2 * 255
    flat = variants.resize(board.astype(np.uint8)[None, None], 14)[..., 1:-1, 1:-1]
    assert np.abs(flat.astype(int) - 128).max() <= 1
    # Each image is resized on its own: chunking changes nothing.
    assert np.array_equal(variants.resize(images[3:4], 56), big[3:4])
    assert np.array_equal(variants.resize(images, 28), images)
    with pytest.raises(ValueError, match="size: expected a whole number >= 1"):
        variants.resize(images, 0)


def test_tints_keep_the_brightness_and_put_the_class_in_the_hue():
    labels = np.repeat(np.arange(10), 400)
    tints = variants.hue_tints(labels, 10, seed=1)
    assert tints.shape == (4000, 3) and tints.dtype == np.float32
    # The channel mean is the same for every tint, so brightness says nothing of the class.
    assert np.allclose(tints.mean(axis=1), LUMA, atol=1e-6)
    assert tints.min() >= LUMA - CHROMA - 1e-6 and tints.max() <= LUMA + CHROMA + 1e-6
    # Hue names the class better than chance, but far from always (the classes overlap).
    phases = 2 * np.pi * np.arange(3) / 3
    hue = np.arctan2((tints * np.sin(phases)).sum(1), (tints * np.cos(phases)).sum(1))
    nearest = np.rint((hue % (2 * np.pi)) / (2 * np.pi / 10)).astype(int) % 10
    hit = (nearest == labels).mean()
    assert 0.25 < hit < 0.55
    assert np.array_equal(tints, variants.hue_tints(labels, 10, seed=1))
    grey = np.full((2, 1, 3, 3), 200, dtype=np.uint8)
    coloured = variants.tint(grey, tints[:2])
    assert coloured.shape == (2, 3, 3, 3)
    assert np.array_equal(coloured[:, :, 0, 0], np.rint(200 * tints[:2]).astype(np.uint8))


def test_colour_carries_class_information_that_grey_versions_lack(fashion_mnist):
    """A classifier trained on the colour images beats the same classifier trained on their
    grey versions (channel means), and those grey versions are the resized original images
    scaled by LUMA: the extra information is in the channels' ratios alone."""
    torch.manual_seed(0)
    colour = data.load("fashion-mnist-colour-56")
    assert colour.input_shape == (3, 56, 56)
    grey56 = variants.resize(fashion_mnist.x_test, 56).astype(np.float32)
    mean = colour.x_test.astype(np.float32).mean(axis=1, keepdims=True)
    assert np.abs(mean - LUMA * grey56).max() <= 0.5

    def features(images: np.ndarray) -> torch.Tensor:
        # 14x14 averages keep the probe cheap; both versions get the same treatment.
        x = torch.from_numpy(images).float().div_(255.0)
        return torch.nn.functional.avg_pool2d(x, 4)

    n_train, n_test = 5000, 2000
    c_train, c_test = features(colour.x_train[:n_train]), features(colour.x_test[:n_test])
    y_train = torch.from_numpy(colour.y_train[:n_train])
    y_test = torch.from_numpy(colour.y_test[:n_test])

    def probe(train: torch.Tensor, test: torch.Tensor) -> float:
        torch.manual_seed(0)
        model = torch.nn.Linear(train[0].numel(), 10)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(model(train.flatten(1)), y_train)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float((model(test.flatten(1)).argmax(1) == y_test).float().mean())

    with_colour = probe(c_train, c_test)
    without = probe(c_train.mean(1, keepdim=True), c_test.mean(1, keepdim=True))
    assert with_colour > without + 0.03, (with_colour, without)


def test_a_victim_trains_on_uint8_colour_images_with_per_channel_normalisation():
    from megex.victim import train_victim

    rng = np.random.RandomState(2)
    scale = np.array([40, 120, 250]).reshape(1, 3, 1, 1)
    images = (rng.rand(96, 3, 12, 12) * scale).astype(np.uint8)
    labels = rng.randint(0, 10, 96).astype(np.int64)
    ds = data.Dataset("tiny-colour", images[:64], labels[:64], images[64:], labels[64:], 10)
    victim = train_victim(ds, "lenet5", epochs=1, progress=False)
    expected = images[:64].astype(np.float64).mean(axis=(0, 2, 3)) / 255
    assert victim.input_shape == (3, 12, 12)
    assert np.allclose(victim.mean.flatten().numpy(), expected, atol=1e-5)
    spread = (images[:64].astype(np.float64) / 255).std(axis=(0, 2, 3), ddof=1)
    assert np.allclose(victim.std.flatten().numpy(), spread, atol=1e-5)
    # The accuracy recorded is the victim's on the 32 test images (labels random: any value).
    with torch.no_grad():
        predicted = victim(torch.from_numpy(images[64:]).float() / 255).argmax(1)
    correct = predicted == torch.from_numpy(labels[64:])
    assert victim.accuracy == pytest.approx(float(correct.float().mean()), abs=1e-6)
