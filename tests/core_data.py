"""Small training data shared by the compute-core tests (exactness, seed notebook, plans, CLI train).

`write_core_data_dir` writes four plain IDX files: the first few thousand real Fashion-MNIST
images when Debian's `dataset-fashion-mnist` is installed, otherwise random images of the same
format (the tests check formulas and invariants, which hold for any pixels). Plain, not gzip:
the CLI subprocesses then read them in milliseconds. The fixtures made from them (`core_cache`,
`core_data_dir`, `core_dataset`) live in conftest.py, so every test module can ask for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
