"""Write small MNIST-format IDX files for tests (plain or gzip), so tests never need the real data."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

LABEL_MAGIC = 0x00000801
IMAGE_MAGIC = 0x00000803


def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 labels (n,) or images (n, 28, 28) / (n, 784) -> the IDX file's bytes."""
    array = np.asarray(array, dtype=np.uint8)
    if array.ndim == 2:  # (n, 784) rows, the Dataset layout
        array = array.reshape(len(array), 28, 28)
    magic = 0x00000800 | array.ndim
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write one IDX file; with gz=True, gzip it (the caller chooses whether the name ends in .gz)."""
    path = Path(path)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    return path


def write_idx_dir(
    directory: str | Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    gz: bool = True,
) -> dict[str, Path]:
    """Write the four files under their MNIST names (+ .gz if gz); returns field -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    files = {
        "train_images": ("train-images-idx3-ubyte", train_images),
        "train_labels": ("train-labels-idx1-ubyte", train_labels),
        "test_images": ("t10k-images-idx3-ubyte", test_images),
        "test_labels": ("t10k-labels-idx1-ubyte", test_labels),
    }
    return {field: write_idx(directory / (stem + suffix), array, gz=gz) for field, (stem, array) in files.items()}


def random_arrays(n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images (n, 784) and labels in 0..9, keyed like write_idx_dir's arguments."""
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, size=(n_train, 784), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, 784), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
