"""Small training data shared by the compute-core tests (exactness, seed notebook, plans, CLI train).

`write_core_data_dir` writes four plain IDX files: the first few thousand real Fashion-MNIST
images when Debian's `dataset-fashion-mnist` is installed, otherwise random images of the same
format (the tests check formulas and invariants, which hold for any pixels). Plain, not gzip:
the CLI subprocesses then read them in milliseconds. Import the fixtures `core_data_dir` and
`core_dataset` into a test module to use them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from enshuffle import dataset as ds
from idx_util import random_arrays, write_idx_dir

TRAIN_COUNT = 3000
TEST_COUNT = 1000

FASHION_INSTALLED = all((ds.FASHION_MNIST_DIR / f"{stem}.gz").is_file() for stem in ds.IDX_STEMS.values())


def core_arrays() -> tuple[dict[str, np.ndarray], str]:
    """(arrays keyed like write_idx_dir's arguments, a word for where they came from)."""
    if FASHION_INSTALLED:
        full = ds.load_idx_dir(ds.FASHION_MNIST_DIR, name="fashion-mnist")
        return {
            "train_images": full.train_images[:TRAIN_COUNT],
            "train_labels": full.train_labels[:TRAIN_COUNT],
            "test_images": full.test_images[:TEST_COUNT],
            "test_labels": full.test_labels[:TEST_COUNT],
        }, "fashion-mnist"
    return random_arrays(n_train=TRAIN_COUNT, n_test=TEST_COUNT, seed=402), "random"


def write_core_data_dir(directory: Path) -> Path:
    arrays, _ = core_arrays()
    write_idx_dir(directory, **arrays, gz=False)
    return directory


@pytest.fixture(scope="session")
def core_cache(tmp_path_factory) -> Path:
    """A parse cache of our own for the whole session, so no test writes into the user's ~/.cache."""
    path = tmp_path_factory.mktemp("enshuffle-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENSHUFFLE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def core_data_dir(tmp_path_factory, core_cache) -> Path:
    return write_core_data_dir(tmp_path_factory.mktemp("core-data"))


@pytest.fixture(scope="session")
def core_dataset(core_data_dir) -> ds.Dataset:
    return ds.load_idx_dir(core_data_dir)
