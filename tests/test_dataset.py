"""enshuffle.dataset: IDX reading, validation errors, the parse cache, download safety, source order."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from enshuffle import dataset as ds
from enshuffle.dataset import DataError, load_dataset, load_idx_dir, one_hot, read_idx
from idx_util import idx_bytes, random_arrays, write_idx, write_idx_dir

FASHION = ds.FASHION_MNIST_DIR
needs_fashion = pytest.mark.skipif(
    not all((FASHION / f"{stem}.gz").is_file() for stem in ds.IDX_STEMS.values()),
    reason=f"Fashion-MNIST not installed at {FASHION} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cache, so none reads another's (or the user's) files."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ENSHUFFLE_CACHE", str(path))
    return path


@pytest.fixture
def arrays() -> dict[str, np.ndarray]:
    return random_arrays(n_train=40, n_test=15, seed=7)


def assert_same(dataset: ds.Dataset, arrays: dict[str, np.ndarray]) -> None:
    for field, expected in arrays.items():
        got = getattr(dataset, field)
        assert got.dtype == np.uint8
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_directory_round_trip(tmp_path, arrays, gz):
    write_idx_dir(tmp_path / "d", **arrays, gz=gz)
    loaded = load_idx_dir(tmp_path / "d")
    assert_same(loaded, arrays)
    assert loaded.train_images.shape == (40, 784)
    assert loaded.name == "directory"
    assert str(tmp_path / "d") in loaded.source


def test_read_idx_shapes(tmp_path, arrays):
    labels = read_idx(write_idx(tmp_path / "l", arrays["train_labels"]))
    images = read_idx(write_idx(tmp_path / "i.gz", arrays["train_images"], gz=True))
    assert labels.shape == (40,) and images.shape == (40, 28, 28)
    np.testing.assert_array_equal(images.reshape(40, 784), arrays["train_images"])


def test_dataset_arrays_are_read_only(tmp_path, arrays):
    write_idx_dir(tmp_path / "d", **arrays)
    loaded = load_idx_dir(tmp_path / "d")
    with pytest.raises(ValueError):
        loaded.train_images[0, 0] = 1


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("cut", [1, 700, 10_000], ids=["last-byte", "mid-image", "into-header"])
def test_truncated_plain_file_names_it(tmp_path, arrays, cut):
    path = tmp_path / "train-images-idx3-ubyte"
    data = idx_bytes(arrays["train_images"])
    path.write_bytes(data[: max(len(data) - cut, 10)])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        read_idx(path)


def test_truncated_gzip_stream_names_it(tmp_path, arrays):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    packed = gzip.compress(idx_bytes(arrays["train_images"]))
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        read_idx(path)


def test_trailing_bytes_are_refused(tmp_path, arrays):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(arrays["train_labels"]) + b"\0")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*longer"):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"\x00\x00\x08\x02", b"\x00\x00\x0d\x03", b"PK\x03\x04"])
def test_wrong_magic_names_file(tmp_path, arrays, magic):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(magic + idx_bytes(arrays["test_images"])[4:])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*magic"):
        read_idx(path)


def test_wrong_image_dimension_names_file(tmp_path, arrays):
    write_idx_dir(tmp_path / "d", **arrays)
    small = np.zeros((15, 27, 27), np.uint8)
    write_idx(tmp_path / "d" / "t10k-images-idx3-ubyte.gz", small, gz=True)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*27x27"):
        load_idx_dir(tmp_path / "d")


def test_labels_in_images_slot_names_file(tmp_path, arrays):
    write_idx_dir(tmp_path / "d", **dict(arrays, train_images=arrays["train_labels"]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz holds labels"):
        load_idx_dir(tmp_path / "d")


def test_count_mismatch_names_both_files(tmp_path, arrays):
    write_idx_dir(tmp_path / "d", **dict(arrays, test_labels=arrays["test_labels"][:-1]))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz has 15 images.*t10k-labels-idx1-ubyte.gz has 14"):
        load_idx_dir(tmp_path / "d")


def test_label_out_of_range_names_file(tmp_path, arrays):
    labels = arrays["train_labels"].copy()
    labels[5] = 10
    write_idx_dir(tmp_path / "d", **dict(arrays, train_labels=labels))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz has label 10 at position 5"):
        load_idx_dir(tmp_path / "d")


def test_missing_file_lists_expected_names(tmp_path, arrays):
    paths = write_idx_dir(tmp_path / "d", **arrays)
    paths["test_labels"].unlink()
    with pytest.raises(DataError) as info:
        load_idx_dir(tmp_path / "d")
    message = str(info.value)
    assert "lacks t10k-labels-idx1-ubyte" in message
    assert all(stem in message for stem in ds.IDX_STEMS.values())


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nowhere does not exist"):
        load_idx_dir(tmp_path / "nowhere")


# --------------------------------------------------------------------------- parse cache


def test_cache_serves_repeat_loads_and_survives_corruption(tmp_path, arrays, cache):
    paths = write_idx_dir(tmp_path / "d", **arrays, gz=False)
    load_idx_dir(tmp_path / "d")
    entries = sorted((cache / "idx").glob("*.npz"))
    assert len(entries) == 4

    # Prove the cache is what answers: plant different (valid) labels under the labels' key.
    labels_entry, _ = ds._cache_entry(paths["train_labels"])
    planted = np.full(40, 3, np.uint8)
    np.savez(labels_entry, data=planted)
    np.testing.assert_array_equal(load_idx_dir(tmp_path / "d").train_labels, planted)

    # A damaged cache file is deleted and the source re-read, not an error.
    labels_entry.write_bytes(b"not a zip file")
    assert_same(load_idx_dir(tmp_path / "d"), arrays)
    with np.load(labels_entry, allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["data"], arrays["train_labels"])


def test_cache_misses_when_source_changes(tmp_path, arrays, cache):
    write_idx_dir(tmp_path / "d", **arrays, gz=False)
    load_idx_dir(tmp_path / "d")
    changed = dict(arrays, train_labels=(arrays["train_labels"] + 1) % 10, train_images=arrays["train_images"][:, ::-1])
    write_idx_dir(tmp_path / "d", **changed, gz=False)  # new size or mtime -> new key
    assert_same(load_idx_dir(tmp_path / "d"), changed)
    assert len(list((cache / "idx").glob("*.npz"))) == 4  # old versions dropped


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ENSHUFFLE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ds.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("ENSHUFFLE_CACHE")
    assert ds.cache_dir() == tmp_path / "xdg" / "enshuffle"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ds.cache_dir() == tmp_path / "home" / ".cache" / "enshuffle"


# --------------------------------------------------------------------------- real and bundled data


@needs_fashion
def test_real_fashion_mnist_loads():
    messages: list[str] = []
    data = load_dataset(log=messages.append)
    assert data.name == "fashion-mnist"
    assert data.train_images.shape == (60000, 784) and data.test_images.shape == (10000, 784)
    assert data.train_labels.shape == (60000,) and data.test_labels.shape == (10000,)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
    assert messages == [f"data: Fashion-MNIST from {FASHION} (60000 train, 10000 test)"]


def test_bundled_subset_is_small_and_loads():
    path = ds.bundled_subset_path()
    assert path.stat().st_size <= 2_000_000
    data = ds.load_bundled_subset()
    assert data.name == "bundled-subset"
    assert data.train_images.shape == (3500, 784) and data.test_images.shape == (1000, 784)
    assert data.train_images.dtype == np.uint8 and data.train_images.flags.c_contiguous
    assert np.bincount(data.train_labels).tolist() == [350] * 10
    assert np.bincount(data.test_labels).tolist() == [100] * 10


@needs_fashion
def test_bundled_subset_is_taken_from_fashion_mnist():
    """It is the first 350 train / 100 test images of each class, in their original order."""
    subset = ds.load_bundled_subset()
    full = load_idx_dir(FASHION)
    for split, per_class in (("train", 350), ("test", 100)):
        labels = getattr(full, f"{split}_labels")
        rank = np.zeros(len(labels), np.int64)  # position of each sample within its class
        order = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[order], np.arange(10))
        rank[order] = np.arange(len(labels)) - starts[labels[order]]
        picks = np.flatnonzero(rank < per_class)
        np.testing.assert_array_equal(getattr(subset, f"{split}_images"), getattr(full, f"{split}_images")[picks])
        np.testing.assert_array_equal(getattr(subset, f"{split}_labels"), labels[picks])


def test_damaged_bundled_subset_is_a_clear_error(tmp_path):
    bad = tmp_path / "subset.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="subset.npz is missing or damaged.*reinstall"):
        ds.load_bundled_subset(bad)


# --------------------------------------------------------------------------- download


class _Mirror:
    """A real HTTP server on 127.0.0.1 serving one directory, recording the paths asked for."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def mirror(tmp_path, arrays):
    """A local mirror of generated MNIST-named .gz files, and their true SHA-256 table."""
    root = tmp_path / "mirror"
    paths = write_idx_dir(root, **arrays, gz=True)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths.values()}
    server = _Mirror(root)
    yield server, sums
    server.close()


def test_download_accepts_matching_checksums(tmp_path, mirror, arrays):
    server, sums = mirror
    messages: list[str] = []
    dest = ds.download_mnist(tmp_path / "dl", mirrors=[server.url], checksums=sums, log=messages.append)
    assert sorted(p.name for p in dest.iterdir()) == sorted(sums)
    assert len(messages) == 4 and all("SHA-256 verified" in m for m in messages)
    assert_same(load_idx_dir(dest), arrays)
    # Already-verified files are not fetched again.
    before = len(server.requests)
    ds.download_mnist(dest, mirrors=[server.url], checksums=sums)
    assert len(server.requests) == before


def test_download_refuses_bad_checksum_and_removes_file(tmp_path, mirror):
    server, sums = mirror
    wrong = dict(sums, **{"train-labels-idx1-ubyte.gz": "0" * 64})
    dest = tmp_path / "dl"
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*SHA-256.*refused"):
        ds.download_mnist(dest, mirrors=[server.url], checksums=wrong)
    assert "/train-labels-idx1-ubyte.gz" in server.requests  # it was really downloaded, then refused
    assert not (dest / "train-labels-idx1-ubyte.gz").exists()
    assert not list(dest.glob("*.part"))


def test_download_tries_next_mirror(tmp_path, mirror):
    server, sums = mirror
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    broken = _Mirror(empty)  # answers 404 for everything
    try:
        dest = ds.download_mnist(tmp_path / "dl", mirrors=[broken.url, server.url], checksums=sums)
    finally:
        broken.close()
    assert len(broken.requests) == 4
    assert all(_sha256(dest / name) == digest for name, digest in sums.items())


def test_download_replaces_tampered_local_file(tmp_path, mirror):
    server, sums = mirror
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "t10k-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    ds.download_mnist(dest, mirrors=[server.url], checksums=sums)
    assert _sha256(dest / "t10k-labels-idx1-ubyte.gz") == sums["t10k-labels-idx1-ubyte.gz"]


def test_download_failure_names_file_and_mirror(tmp_path):
    dead = "http://127.0.0.1:9/"  # discard port: nothing listens, connection refused
    with pytest.raises(DataError, match=r"could not download train-images-idx3-ubyte.gz.*127\.0\.0\.1:9"):
        ds.download_mnist(tmp_path / "dl", mirrors=[dead])
    assert not list((tmp_path / "dl").iterdir())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_canonical_checksum_table_is_well_formed():
    assert set(ds.MNIST_SHA256) == {f"{stem}.gz" for stem in ds.IDX_STEMS.values()}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in ds.MNIST_SHA256.values())


# --------------------------------------------------------------------------- source order


def test_data_dir_wins_over_other_sources(tmp_path, arrays):
    write_idx_dir(tmp_path / "mine", **arrays)
    other = random_arrays(n_train=30, n_test=10, seed=1)
    write_idx_dir(tmp_path / "system", **other)
    messages: list[str] = []
    data = load_dataset(tmp_path / "mine", system_dir=tmp_path / "system", log=messages.append)
    assert data.name == "directory"
    assert_same(data, arrays)
    assert messages == [f"data: IDX files from {tmp_path / 'mine'} (40 train, 15 test)"]


@pytest.mark.parametrize("problem", ["missing-dir", "missing-file", "corrupt-file"])
def test_bad_data_dir_is_an_error_not_a_fallback(tmp_path, arrays, problem):
    write_idx_dir(tmp_path / "system", **arrays)
    mine = tmp_path / "mine"
    if problem != "missing-dir":
        paths = write_idx_dir(mine, **arrays)
        if problem == "missing-file":
            paths["train_images"].unlink()
        else:
            paths["train_images"].write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=str(mine)):
        load_dataset(mine, system_dir=tmp_path / "system", allow_download=False)


def test_system_dir_used_when_no_data_dir(tmp_path, arrays):
    write_idx_dir(tmp_path / "system", **arrays)
    data = load_dataset(system_dir=tmp_path / "system", allow_download=False)
    assert data.name == "fashion-mnist"
    assert data.source == f"Fashion-MNIST from {tmp_path / 'system'}"


def test_download_used_when_no_system_data(tmp_path, mirror, arrays, cache):
    server, sums = mirror
    messages: list[str] = []
    data = load_dataset(system_dir=tmp_path / "absent", mirrors=[server.url], checksums=sums, log=messages.append)
    assert data.name == "mnist"
    assert_same(data, arrays)
    assert messages[-1] == f"data: MNIST from {cache / 'mnist'} (40 train, 15 test)"
    # Once downloaded, MNIST is used even with downloads disabled.
    again = load_dataset(system_dir=tmp_path / "absent", allow_download=False, checksums=sums)
    assert again.name == "mnist"


def test_bad_download_falls_back_to_bundled_subset(tmp_path, mirror, cache):
    server, sums = mirror
    wrong = {name: "f" * 64 for name in sums}
    messages: list[str] = []
    data = load_dataset(system_dir=None, mirrors=[server.url], checksums=wrong, log=messages.append)
    assert data.name == "bundled-subset"
    assert any("MNIST unavailable" in m and "refused" in m for m in messages)
    assert not list((cache / "mnist").glob("*.gz")) and not list((cache / "mnist").glob("*.part"))


def test_no_download_when_disallowed(tmp_path, mirror):
    server, sums = mirror
    messages: list[str] = []
    data = load_dataset(
        system_dir=None, allow_download=False, mirrors=[server.url], checksums=sums, log=messages.append
    )
    assert data.name == "bundled-subset"
    assert server.requests == []
    assert messages == ["data: the Fashion-MNIST subset bundled with enshuffle (3500 train, 1000 test)"]


def test_broken_system_dir_falls_through_with_a_reason(tmp_path, arrays):
    paths = write_idx_dir(tmp_path / "system", **arrays)
    paths["test_images"].unlink()
    messages: list[str] = []
    data = load_dataset(system_dir=tmp_path / "system", allow_download=False, log=messages.append)
    assert data.name == "bundled-subset"
    assert "skipping Fashion-MNIST" in messages[0] and "t10k-images-idx3-ubyte" in messages[0]


# --------------------------------------------------------------------------- one_hot


def test_one_hot():
    out = one_hot(np.array([0, 3, 9], np.uint8))
    assert out.shape == (3, 10) and out.dtype == np.float64
    np.testing.assert_array_equal(out.argmax(axis=1), [0, 3, 9])
    assert out.sum() == 3
    assert one_hot(np.array([1]), classes=4, dtype=np.float32).tolist() == [[0, 1, 0, 0]]
    with pytest.raises(ValueError, match="0..9"):
        one_hot(np.array([10]))


def test_dimensions_whose_product_wraps_int64_are_refused(tmp_path):
    """(2^31, 2^31, 16) wraps to 0 in int64; the byte count must be computed exactly."""
    import struct

    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 0x00000803, 2**31, 2**31, 16))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        read_idx(path)


def test_an_empty_data_set_is_refused(tmp_path):
    empty = np.zeros((0, 28, 28), np.uint8)
    write_idx_dir(tmp_path, empty, np.zeros(0, np.uint8), empty, np.zeros(0, np.uint8))
    with pytest.raises(DataError, match="no images"):
        load_idx_dir(tmp_path)


# --- which images --limit keeps ----------------------------------------------------------


def test_a_balanced_subset_has_equal_class_counts_and_keeps_file_order(core_dataset):
    labels = np.asarray(core_dataset.train_labels)
    for limit in (1000, 1003, 2500):
        rows = ds.training_rows(labels, limit, "balanced")
        assert rows.shape == (limit,) and np.all(np.diff(rows) > 0)  # distinct, in file order
        counts = np.bincount(labels[rows], minlength=10)
        assert counts.max() - counts.min() <= (1 if limit % 10 else 0), counts
        for c in range(10):  # each class's first images, none skipped
            mine = rows[labels[rows] == c]
            np.testing.assert_array_equal(mine, np.flatnonzero(labels == c)[: mine.size])
    assert ds.training_rows(labels, None, "balanced") is None
    assert ds.training_rows(labels, labels.size, "balanced") is None  # all of them: the file as it is
    np.testing.assert_array_equal(ds.training_rows(labels, 100, "first"), np.arange(100))


def test_a_short_class_gives_all_it_has_and_the_others_make_up_the_rest():
    labels = np.array([0] * 3 + [1] * 50 + [2] * 50)
    rows = ds.training_rows(labels, 60, "balanced")
    counts = np.bincount(labels[rows], minlength=3)
    assert rows.size == 60 and counts[0] == 3 and abs(int(counts[1]) - int(counts[2])) <= 1
    with pytest.raises(ValueError, match="subset rule"):
        ds.training_rows(labels, 10, "random")


def test_limit_keeps_a_balanced_subset_except_in_the_notebook_preset(core_dataset):
    """The default preset's --limit N trains on N images of equal class counts (a node that
    groups its rows by class has no sizes to name the groups by); the seed preset keeps the
    notebook's first N, so it stays exact against the notebook."""
    from enshuffle.coordinator.training import prepare
    from enshuffle.model import get_preset

    default = prepare(core_dataset, get_preset("default"), limit=1000)
    assert np.unique(np.bincount(default.train_labels, minlength=10)).size == 1
    seed = prepare(core_dataset, get_preset("seed"), limit=1000)
    np.testing.assert_array_equal(seed.train_labels, core_dataset.train_labels[:1000])
    assert np.unique(np.bincount(core_dataset.train_labels[:1000], minlength=10)).size > 1  # (a real difference)
