import os

import pytest
import torch

from megex import data

# Tests run beside a server or a second process on small machines: one thread each avoids
# the oversubscription that makes torch many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Trained victims and demo output go to the test's own folder, never the user's cache.
    monkeypatch.setenv("MEGEX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def fashion_mnist() -> data.Dataset:
    """Fashion-MNIST from Debian's package; in CI (MEGEX_REQUIRE_DATA=1) missing is a failure."""
    try:
        return data.load("fashion-mnist")
    except data.DatasetNotFound:
        if os.environ.get("MEGEX_REQUIRE_DATA"):
            raise
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def digits_victim():
    """A small digits victim, trained once for the whole session (a few seconds)."""
    from megex import train_victim

    torch.manual_seed(0)
    return train_victim("digits", progress=False)


@pytest.fixture(scope="session")
def digits_test():
    return data.load("digits").test_tensors()
