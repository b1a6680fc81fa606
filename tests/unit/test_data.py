import gzip
import pickle
import struct

import numpy as np
import pytest

from megex import data


def write_idx(path, array, compress=True):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_folder(folder, n_train=12, n_test=5, compress=True, size=28):
    rng = np.random.RandomState(1)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, size, size)).astype(np.uint8),
        "train-labels-idx1-ubyte": rng.randint(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, size, size)).astype(np.uint8),
        "t10k-labels-idx1-ubyte": rng.randint(0, 10, n_test).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / (stem + (".gz" if compress else "")), array, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_reads_what_was_written(tmp_path, compress):
    arrays = make_idx_folder(tmp_path / "mnist", compress=compress)
    ds = data.load("mnist", root=tmp_path / "mnist")
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == np.uint8
    assert np.array_equal(ds.x_train[:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 10


def test_idx_reader_multibyte_and_bad_files(tmp_path):
    values = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    write_idx(tmp_path / "ints.gz", values)
    assert np.array_equal(data.read_idx(tmp_path / "ints.gz"), values)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="bad magic"):
        data.read_idx(tmp_path / "bad")
    truncated = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3
    (tmp_path / "short").write_bytes(truncated)
    with pytest.raises(ValueError, match="promises 10 values"):
        data.read_idx(tmp_path / "short")


def test_missing_files_error_names_files_folder_and_how_to_get_them(tmp_path):
    with pytest.raises(data.DatasetNotFound) as info:
        data.load("mnist", root=tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and str(tmp_path) in message
    assert "--data-root" in message
    with pytest.raises(data.DatasetNotFound, match="cifar-10-python.tar.gz"):
        data.load("cifar10", root=tmp_path)
    with pytest.raises(data.DatasetNotFound, match="train_32x32.mat"):
        data.load("svhn", root=tmp_path)
    with pytest.raises(ValueError, match="unknown name 'imagenet'"):
        data.load("imagenet")


def write_cifar_batch(path, n, seed):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
    labels = rng.randint(0, 10, n).tolist()
    batch = {b"batch_label": b"x", b"labels": labels, b"data": images, b"filenames": [b"a"] * n}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)
    return images, labels


def test_cifar10_reader_official_python_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    written = [write_cifar_batch(base / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test_images, test_labels = write_cifar_batch(base / "test_batch", 3, 9)
    ds = data.load("cifar10", root=tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    # Rows are stored channel-major (1024 red, then green, then blue).
    assert np.array_equal(ds.x_test[1, 0].reshape(-1), test_images[1, :1024])
    assert np.array_equal(ds.x_test[1, 2].reshape(-1), test_images[1, 2048:])
    assert ds.y_train.tolist() == sum((labels for _, labels in written), [])
    assert ds.y_test.tolist() == test_labels


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "data_batch_1"
    with open(path, "wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": []}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.read_cifar10_batch(path)


def test_svhn_reader_official_mat_files(tmp_path):
    from scipy.io import savemat

    rng = np.random.RandomState(0)
    for name, n in (("train_32x32.mat", 6), ("test_32x32.mat", 4)):
        x = rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = np.array([[10], [1], [2], [3], [4], [5]][:n], dtype=np.uint8)
        savemat(tmp_path / name, {"X": x, "y": y})
    ds = data.load("svhn", root=tmp_path)
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5]  # label 10 means the digit 0
    raw = rng.randint(0, 256, (32, 32, 3, 1)).astype(np.uint8)
    savemat(tmp_path / "one.mat", {"X": raw, "y": np.array([[7]])})
    images, labels = data.read_svhn_mat(tmp_path / "one.mat")
    assert np.array_equal(images[0, 1], raw[:, :, 1, 0]) and labels.tolist() == [7]


def test_digits_has_a_fixed_split():
    a, b = data.load("digits"), data.load("digits")
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert np.array_equal(a.y_test, b.y_test) and a.x_train.max() == 255
    x, y = a.test_tensors()
    assert x.dtype.is_floating_point and float(x.max()) == 1.0 and float(x.min()) == 0.0


def test_fashion_mnist_from_debian_package(fashion_mnist):
    ds = fashion_mnist
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert sorted(set(ds.y_test.tolist())) == list(range(10))
