"""Named datasets as uint8 arrays, and readers for the standard on-disk formats.

Every loader returns a :class:`Dataset` whose images are uint8 with shape (N, C, H, W)
and whose labels are int64 with shape (N,). Turning them into float32 in [0, 1] is one
call (:meth:`Dataset.test_tensors`), so every public boundary sees the same convention.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .variants import VARIANTS, variant_images

__all__ = [
    "Dataset",
    "DatasetNotFound",
    "DATASETS",
    "load",
    "default_root",
    "read_idx",
    "read_cifar10_batch",
    "read_svhn_mat",
]

# The variants (other sizes, colour) are computed from another dataset's files when loaded.
DATASETS = ("digits", "fashion-mnist", *VARIANTS, "mnist", "cifar10", "svhn")

FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = "test_batch"
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")

_HOW_TO_GET = {
    "fashion-mnist": "install the Debian package 'dataset-fashion-mnist' "
    "(apt-get install dataset-fashion-mnist) or copy the four IDX .gz files from "
    "https://github.com/zalandoresearch/fashion-mnist into that folder",
    "mnist": "copy the four MNIST IDX files (.gz or uncompressed) into that folder",
    "cifar10": "download 'CIFAR-10 python version' (cifar-10-python.tar.gz) from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and extract it there",
    "svhn": "download train_32x32.mat and test_32x32.mat (format 2) from "
    "http://ufldl.stanford.edu/housenumbers/ into that folder",
}


class DatasetNotFound(FileNotFoundError):
    """The files of a named dataset are not where we looked."""


@dataclass
class Dataset:
    """Images as uint8 (N, C, H, W) and labels as int64 (N,), split into train and test."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:])  # type: ignore[return-value]

    def train_tensors(self):
        """Train split as (float32 images in [0, 1], int64 labels) torch tensors."""
        return _to_tensors(self.x_train, self.y_train)

    def test_tensors(self):
        """Test split as (float32 images in [0, 1], int64 labels) torch tensors."""
        return _to_tensors(self.x_test, self.y_test)

    def without_validation(self, images: int) -> Dataset:
        """This dataset with the last `images` training images held out of its train split."""
        _check_holdout(images, len(self.x_train))
        if images == 0:
            return self
        return Dataset(
            self.name,
            self.x_train[:-images],
            self.y_train[:-images],
            self.x_test,
            self.y_test,
            self.num_classes,
        )

    def validation_tensors(self, images: int):
        """The last `images` training images (held out of training by `without_validation`),
        as tensors: what settings are chosen on, so that the test split is read only once."""
        _check_holdout(images, len(self.x_train))
        if images == 0:
            raise ValueError("validation images: expected >= 1, got 0")
        return _to_tensors(self.x_train[-images:], self.y_train[-images:])


def _check_holdout(images: int, available: int) -> None:
    if isinstance(images, bool) or not isinstance(images, int) or not 0 <= images < available:
        raise ValueError(
            f"validation images: expected a whole number in [0, {available}), got {images!r}"
        )


def _to_tensors(x: np.ndarray, y: np.ndarray):
    import torch

    return torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y).long()


def default_root(name: str) -> Path:
    """Where `load(name)` looks when no root is given.

    Fashion-MNIST: the Debian package's folder. Others: $MEGEX_DATA/<name>, else
    ~/.cache/megex/data/<name>. A dataset computed from another (e.g. fashion-mnist-56) reads
    its source's files, so its folder is its source's.
    """
    if name in VARIANTS:
        name = VARIANTS[name].source
    if name == "fashion-mnist" and "MEGEX_DATA" not in os.environ:
        return Path(FASHION_MNIST_DEBIAN_ROOT)
    base = os.environ.get("MEGEX_DATA") or os.path.join(Path.home(), ".cache", "megex", "data")
    return Path(base) / name


def load(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load a named dataset: 'digits', 'fashion-mnist', 'mnist', 'cifar10', 'svhn', or
    Fashion-MNIST at another size or in colour ('fashion-mnist-14', 'fashion-mnist-56',
    'fashion-mnist-colour-56': computed from the Fashion-MNIST files in `root`, see
    :mod:`megex.variants`)."""
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; expected one of {', '.join(DATASETS)}")
    if name in VARIANTS:
        source = load(VARIANTS[name].source, root)
        x_train, x_test = variant_images(name, source)
        y_train, y_test = source.y_train.copy(), source.y_test.copy()
        return Dataset(name, x_train, y_train, x_test, y_test, source.num_classes)
    if name == "digits":
        return _load_digits()
    folder = Path(root) if root is not None else default_root(name)
    if name in ("fashion-mnist", "mnist"):
        return _load_idx_dataset(name, folder)
    if name == "cifar10":
        return _load_cifar10(folder)
    return _load_svhn(folder)


# --- digits ---------------------------------------------------------------------------


def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("dataset 'digits' needs scikit-learn: pip install 'megex[data]'") from exc
    bunch = load_digits()
    # sklearn's digits are integers 0..16; scale to the full uint8 range.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    # A fixed, seeded 80/20 split so that every user sees the same test set.
    order = np.random.RandomState(0).permutation(len(labels))
    n_test = 360
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", images[train], labels[train], images[test], labels[test], 10)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header promises {count} values of {dtype} but the file holds "
            f"{len(data) - header} bytes"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(name: str, folder: Path) -> Dataset:
    paths = {key: _find(folder, stem) for key, stem in _IDX_FILES.items()}
    missing = [f"{_IDX_FILES[k]}.gz" for k, p in paths.items() if p is None]
    if missing:
        raise DatasetNotFound(_missing_message(name, folder, missing))
    arrays = {key: read_idx(path) for key, path in paths.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{name} in {folder}: {split} images {images.shape} and labels {labels.shape} "
                "do not match (expected (N, H, W) and (N,))"
            )
    return Dataset(
        name,
        arrays["train_images"].astype(np.uint8)[:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"].astype(np.uint8)[:, None],
        arrays["test_labels"].astype(np.int64),
        10,
    )


# --- CIFAR-10 ("python" batches) ------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: dicts, lists, bytes and numpy arrays, nothing callable."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def read_cifar10_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 'python' batch: (uint8 images (N, 3, 32, 32), int64 labels)."""
    with open(path, "rb") as handle:
        batch = _BatchUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch (no 'data' and 'labels' entries)")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: CIFAR-10 data has shape {data.shape}, expected (N, 3072)")
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(folder: Path) -> Dataset:
    base = folder / "cifar-10-batches-py" if (folder / "cifar-10-batches-py").is_dir() else folder
    needed = [*_CIFAR_TRAIN, _CIFAR_TEST]
    missing = [name for name in needed if not (base / name).is_file()]
    if missing:
        raise DatasetNotFound(_missing_message("cifar10", base, missing))
    train = [read_cifar10_batch(base / name) for name in _CIFAR_TRAIN]
    x_test, y_test = read_cifar10_batch(base / _CIFAR_TEST)
    return Dataset(
        "cifar10",
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        x_test,
        y_test,
        10,
    )


# --- SVHN (.mat, format 2) ------------------------------------------------------------


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN format-2 .mat file: (uint8 images (N, 3, 32, 32), labels 0..9)."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading SVHN .mat files needs scipy: pip install 'megex[data]'") from exc
    mat = loadmat(str(path))
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: not an SVHN .mat file (no 'X' and 'y' variables)")
    x, y = mat["X"], mat["y"].reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path}: SVHN X has shape {x.shape}, expected (32, 32, 3, N)")
    if x.shape[3] != len(y):
        raise ValueError(f"{path}: {x.shape[3]} images but {len(y)} labels")
    images = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))).astype(np.uint8)
    labels = y.astype(np.int64) % 10  # SVHN stores the digit 0 as label 10
    return images, labels


def _load_svhn(folder: Path) -> Dataset:
    missing = [name for name in _SVHN_FILES if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFound(_missing_message("svhn", folder, missing))
    x_train, y_train = read_svhn_mat(folder / _SVHN_FILES[0])
    x_test, y_test = read_svhn_mat(folder / _SVHN_FILES[1])
    return Dataset("svhn", x_train, y_train, x_test, y_test, 10)


def _missing_message(name: str, folder: Path, missing: list[str]) -> str:
    return (
        f"dataset {name!r}: missing {', '.join(missing)} in {folder}. "
        f"To get it, {_HOW_TO_GET[name]}; or pass root=... (--data-root) to point at the "
        "folder that holds the files, or set MEGEX_DATA."
    )
