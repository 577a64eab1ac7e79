"""Rebuild enshuffle/data/fashion-mnist-subset.npz, the last-resort data bundled with the package.

Takes the first TRAIN_PER_CLASS training and TEST_PER_CLASS test images of each class from
Fashion-MNIST (Debian package dataset-fashion-mnist), keeping their original order, so every
class is equally represented. 3500 + 1000 images keep the compressed file under 2 MB
(the 6000 + 1000 first tried came to 2.9 MB).

    .venv/bin/python scripts/make_subset.py [FASHION_MNIST_DIR]
"""

import sys
from pathlib import Path

import numpy as np

from enshuffle.dataset import FASHION_MNIST_DIR, load_idx_dir

TRAIN_PER_CLASS = 350
TEST_PER_CLASS = 100
LIMIT_BYTES = 2_000_000
OUT = Path(__file__).resolve().parent.parent / "enshuffle" / "data" / "fashion-mnist-subset.npz"


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first per_class samples of each class, in their original order."""
    picks = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    return np.sort(picks)


def main() -> int:
    source = load_idx_dir(sys.argv[1] if len(sys.argv) > 1 else FASHION_MNIST_DIR, name="fashion-mnist")
    train = first_per_class(source.train_labels, TRAIN_PER_CLASS)
    test = first_per_class(source.test_labels, TEST_PER_CLASS)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        train_images=np.ascontiguousarray(source.train_images[train]),
        train_labels=np.ascontiguousarray(source.train_labels[train]),
        test_images=np.ascontiguousarray(source.test_images[test]),
        test_labels=np.ascontiguousarray(source.test_labels[test]),
    )
    size = OUT.stat().st_size
    print(f"wrote {OUT}: {len(train)} train, {len(test)} test, {size} bytes")
    if size > LIMIT_BYTES:
        print(f"error: {OUT} is larger than {LIMIT_BYTES} bytes; lower the per-class counts", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
