"""Training data: MNIST-format IDX files, where they come from, and a parse cache.

This module owns everything between "some bytes on disk or on a mirror" and a validated
`Dataset` of uint8 arrays: the IDX reader (`read_idx`), the directory loader (`load_idx_dir`),
the source order (`load_dataset`), the checksum-verified MNIST download, the `.npz` parse
cache and the small Fashion-MNIST subset bundled with the package. It never pickles: caches
and the bundled subset are plain uint8 arrays read with `allow_pickle=False`.

Source order of `load_dataset`:
  1. the directory the user named (an error there is reported, never skipped);
  2. Fashion-MNIST from Debian's `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist);
  3. MNIST in the user cache, downloaded from a public mirror if needed, every file SHA-256 checked;
  4. the bundled subset (stratified, 3500 train / 1000 test Fashion-MNIST images).
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import struct
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

LABEL_MAGIC = 0x00000801  # uint8 data, 1 dimension
IMAGE_MAGIC = 0x00000803  # uint8 data, 3 dimensions
IMAGE_SIDE = 28
PIXELS = IMAGE_SIDE * IMAGE_SIDE
CLASSES = 10

# Field of Dataset -> file stem, in the names the MNIST and Fashion-MNIST distributions use.
IDX_STEMS: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Mirrors serving the canonical MNIST .gz files (yann.lecun.com now refuses anonymous downloads).
# The first is the one TensorFlow Datasets uses, the second torchvision's.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)

# SHA-256 of the canonical MNIST files, from tensorflow/datasets
# tensorflow_datasets/url_checksums/mnist.txt (commit 31f1255e57e519a6c004f0b097a2f5cfcf0dde7d),
# which also gives their sizes: 9912422, 28881, 1648877 and 4542 bytes. The same values appear
# in torchvision's MNIST resources list.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# A mirror that streams more than this is not serving MNIST; stop before filling the disk.
MAX_DOWNLOAD_BYTES = 32 * 2**20
DOWNLOAD_TIMEOUT_S = 30.0

BUNDLED_SUBSET = "fashion-mnist-subset.npz"

_SOURCE_WORDS = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "directory": "IDX files"}

Log = Callable[[str], None]


class DataError(Exception):
    """Training data that cannot be used; the message names the file at fault and what to do."""


# eq=False: arrays have no single truth value, so field-wise == and hash() would only raise.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Images as (n, 784) uint8 rows, labels as (n,) uint8 in 0..9; arrays are read-only."""

    train_images: np.ndarray  # (n, 784) uint8, C-contiguous
    train_labels: np.ndarray  # (n,) uint8 in 0..9
    test_images: np.ndarray  # (t, 784) uint8
    test_labels: np.ndarray  # (t,) uint8
    name: str  # 'fashion-mnist' | 'mnist' | 'bundled-subset' | 'directory'
    source: str  # a sentence for people, e.g. "Fashion-MNIST from /usr/share/datasets/fashion-mnist"

    def describe(self) -> str:
        """One line for logs: where the data came from and how much of it there is."""
        return f"{self.source} ({len(self.train_labels)} train, {len(self.test_labels)} test)"


def one_hot(labels: np.ndarray, classes: int = CLASSES, dtype=np.float64) -> np.ndarray:
    """(n,) integer labels -> (n, classes) rows with a single 1 at each label."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"one_hot expects a 1-D integer label array, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"one_hot: labels must lie in 0..{classes - 1}, found {labels.min()}..{labels.max()}")
    out = np.zeros((labels.size, classes), dtype=dtype)
    out[np.arange(labels.size), labels] = 1
    return out


# --------------------------------------------------------------------------- IDX reading


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is gzip data (by its magic bytes, not its name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check it exists and is readable") from exc
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return _gunzip_bounded(raw, path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is a damaged or truncated gzip file ({exc}); download it again") from exc


MAX_IDX_BYTES = 2 << 30  # no MNIST-format file we read comes near this (Fashion-MNIST's largest: 47 MB)


def _gunzip_bounded(raw: bytes, path: Path) -> bytes:
    """Decompress at most the size the IDX header inside declares (plus one byte, so a longer
    file is still reported as such): a small .gz that inflates without end (a gzip bomb) costs
    no more memory than the data it claims to hold, and a header claiming absurd sizes is refused
    before anything beyond it is inflated."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = inflater.decompress(raw, 4)
    if len(data) < 4:
        return data  # _parse_idx says it is too short
    (magic,) = struct.unpack(">I", data[:4])
    if magic not in (LABEL_MAGIC, IMAGE_MAGIC):
        return data  # _parse_idx names the wrong magic number
    header = 4 + 4 * (magic & 0xFF)
    data += inflater.decompress(inflater.unconsumed_tail, header - 4)
    if len(data) < header:
        return data
    dims = struct.unpack(f">{magic & 0xFF}I", data[4:header])
    expected = header + math.prod(dims)
    if expected > MAX_IDX_BYTES:
        raise DataError(
            f"{path} declares {'x'.join(map(str, dims))} = {expected} bytes, more than the "
            f"{MAX_IDX_BYTES} an MNIST-format file may hold here; it is not a usable data file"
        )
    data += inflater.decompress(inflater.unconsumed_tail, expected + 1 - len(data))
    return data


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    """IDX bytes -> uint8 array of the shape in the header; labels (n,), images (n, rows, cols)."""
    if len(data) < 4:
        raise DataError(f"{path} is too short to be an IDX file ({len(data)} bytes); download it again")
    (magic,) = struct.unpack(">I", data[:4])
    if magic not in (LABEL_MAGIC, IMAGE_MAGIC):
        raise DataError(
            f"{path} is not an MNIST-format IDX file: magic number 0x{magic:08x}, "
            f"expected 0x{LABEL_MAGIC:08x} (labels) or 0x{IMAGE_MAGIC:08x} (images); "
            f"check the file name matches its content or download it again"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes); download it again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)  # Python ints: a numpy int64 product can wrap to 0
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: header {'x'.join(map(str, dims))} needs {expected} bytes, "
            f"file has {len(data)}; download it again"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    array.flags.writeable = False
    return array


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (.gz or plain): labels -> (n,) uint8, images -> (n, rows, cols) uint8.

    Checks the magic number (only uint8 labels 0x801 and images 0x803), the dimensions and the
    exact byte count; a truncated or corrupt file is a DataError naming it.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


# --------------------------------------------------------------------------- parse cache


def cache_dir() -> Path:
    """Where enshuffle keeps downloads and parsed data: $ENSHUFFLE_CACHE, else XDG, else ~/.cache."""
    explicit = os.environ.get("ENSHUFFLE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "enshuffle"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _cache_entry(path: Path) -> tuple[Path, str]:
    """(cache file, prefix shared by every version of this source file).

    The key is the resolved path plus size and mtime, so an edited or replaced source file
    misses the cache instead of returning stale arrays.
    """
    resolved = path.resolve()
    st = resolved.stat()
    prefix = _digest(str(resolved))
    name = f"{prefix}-{_digest(f'{st.st_size}:{st.st_mtime_ns}')}.npz"
    return cache_dir() / "idx" / name, prefix


def _load_cached(entry: Path) -> np.ndarray | None:
    """The cached array, or None when absent; a damaged cache file is deleted (it is only a cache)."""
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as npz:
            array = npz["data"]
        if array.dtype != np.uint8 or array.ndim not in (1, 3):
            raise ValueError(f"unexpected {array.dtype} {array.shape}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        entry.unlink(missing_ok=True)
        return None
    array.flags.writeable = False
    return array


def _store_cached(entry: Path, prefix: str, array: np.ndarray) -> None:
    """Write atomically (temp + rename) and drop older versions; a read-only cache is not an error."""
    tmp = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, data=array)  # uncompressed: loading is then a plain copy
        os.replace(tmp, entry)
        for old in entry.parent.glob(f"{prefix}-*.npz"):
            if old != entry:
                old.unlink(missing_ok=True)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def read_idx_cached(path: str | os.PathLike) -> np.ndarray:
    """`read_idx`, served from the .npz parse cache when the source file is unchanged."""
    path = Path(path)
    try:
        entry, prefix = _cache_entry(path)
    except OSError:
        return read_idx(path)  # let read_idx produce the error that names the file
    cached = _load_cached(entry)
    if cached is not None:
        return cached
    array = read_idx(path)
    _store_cached(entry, prefix, array)
    return array


# --------------------------------------------------------------------------- directories


def _expected_names() -> str:
    return ", ".join(f"{stem}[.gz]" for stem in IDX_STEMS.values())


def _find_idx_files(directory: Path) -> dict[str, Path]:
    """Field -> file path; the plain file wins over the .gz if both are present."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for field, stem in IDX_STEMS.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[field] = candidate
                break
        else:
            missing.append(stem)
    if missing:
        raise DataError(
            f"{directory} lacks {', '.join(missing)} (plain or .gz); a data directory "
            f"needs the four MNIST-format files {_expected_names()}"
        )
    return found


def _check_images(array: np.ndarray, path: Path) -> np.ndarray:
    """(n, 28, 28) images -> (n, 784) rows."""
    if array.ndim != 3:
        raise DataError(
            f"{path} holds labels (1 dimension), not images; check the file is the images file it is named as"
        )
    if array.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{path} holds {array.shape[1]}x{array.shape[2]} images, enshuffle's network "
            f"needs {IMAGE_SIDE}x{IMAGE_SIDE}; use an MNIST-format data set"
        )
    return array.reshape(len(array), PIXELS)


def _check_labels(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim != 1:
        raise DataError(
            f"{path} holds images ({array.ndim} dimensions), not labels; "
            f"check the file is the labels file it is named as"
        )
    bad = np.flatnonzero(array >= CLASSES)
    if bad.size:
        raise DataError(
            f"{path} has label {array[bad[0]]} at position {bad[0]} "
            f"({bad.size} labels out of range); labels must be 0..{CLASSES - 1}"
        )
    return array


def _check_counts(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path) -> None:
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            f"labels; the two files must come from the same release"
        )
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images; a data set needs at least one training and one test image")


def load_idx_dir(directory: str | os.PathLike, name: str = "directory") -> Dataset:
    """Load the four MNIST-format IDX files (plain or .gz) of a directory into a Dataset."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise DataError(f"data directory {directory} {what}; pass a directory holding {_expected_names()}")
    paths = _find_idx_files(directory)
    arrays = {field: read_idx_cached(path) for field, path in paths.items()}
    images = {f: _check_images(arrays[f], paths[f]) for f in ("train_images", "test_images")}
    labels = {f: _check_labels(arrays[f], paths[f]) for f in ("train_labels", "test_labels")}
    for split in ("train", "test"):
        _check_counts(
            images[f"{split}_images"], labels[f"{split}_labels"], paths[f"{split}_images"], paths[f"{split}_labels"]
        )
    word = _SOURCE_WORDS.get(name, "IDX files")
    return Dataset(**images, **labels, name=name, source=f"{word} from {directory}")


# --------------------------------------------------------------------------- MNIST download


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, sha256: str, timeout: float) -> None:
    """Stream url into dest.part, hashing as it goes; rename to dest only if the SHA-256 matches.

    Whatever goes wrong, the partial file is removed, so dest only ever holds verified bytes.
    """
    part = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise DataError(
                        f"{url} sent more than {MAX_DOWNLOAD_BYTES} bytes; that is not an MNIST file, refusing it"
                    )
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != sha256:
            raise DataError(
                f"{url} has SHA-256 {h.hexdigest()}, expected {sha256}; refused it (a damaged or tampered mirror)"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def download_mnist(
    dest: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    checksums: Mapping[str, str] = MNIST_SHA256,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    log: Log | None = None,
) -> Path:
    """Make sure dest (default: <cache>/mnist) holds the MNIST files with the expected SHA-256.

    Files already there are re-hashed and kept if they match; the others are fetched from the
    first mirror that serves them correctly. Raises DataError naming each file and mirror that
    failed; never leaves a partial or unverified file under its final name.
    """
    dest = Path(dest) if dest is not None else cache_dir() / "mnist"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the download directory {dest}: {exc.strerror or exc}; "
            f"set ENSHUFFLE_CACHE to a writable directory"
        ) from exc
    for filename, sha256 in checksums.items():
        target = dest / filename
        if target.is_file():
            if _sha256_file(target) == sha256:
                continue
            target.unlink()  # stale or tampered: fetch it again
        failures = [] if mirrors else ["downloads are disabled"]
        for base in mirrors:
            url = base.rstrip("/") + "/" + filename
            try:
                _fetch(url, target, sha256, timeout)
                break
            except DataError as exc:
                failures.append(str(exc))
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                failures.append(f"{url}: {reason}")
        else:
            raise DataError(
                f"could not download {filename} into {dest}: "
                + "; ".join(failures)
                + "; check the network, or pass --data DIR with MNIST-format files"
            )
        if log:
            log(f"data: downloaded {filename} ({target.stat().st_size} bytes, SHA-256 verified)")
    return dest


# --------------------------------------------------------------------------- bundled subset


def bundled_subset_path() -> Path:
    return Path(str(resources.files("enshuffle") / "data" / BUNDLED_SUBSET))


def load_bundled_subset(path: str | os.PathLike | None = None) -> Dataset:
    """The small Fashion-MNIST subset shipped inside the package (or an .npz in the same layout)."""
    where = "" if path is None else f" ({path})"
    path = Path(path) if path is not None else bundled_subset_path()
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {field: npz[field] for field in IDX_STEMS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"the bundled data subset {path} is missing or damaged ({exc}); "
            f"reinstall enshuffle or pass --data DIR with MNIST-format files"
        ) from exc
    for field, array in arrays.items():
        want_ndim = 2 if field.endswith("images") else 1
        if array.dtype != np.uint8 or array.ndim != want_ndim or (want_ndim == 2 and array.shape[1] != PIXELS):
            raise DataError(
                f"{path}: {field} is {array.dtype} {array.shape}, expected uint8 "
                f"{'(n, 784)' if want_ndim == 2 else '(n,)'}; reinstall enshuffle"
            )
        array.flags.writeable = False
    for field in ("train_labels", "test_labels"):
        _check_labels(arrays[field], path)
    for split in ("train", "test"):
        _check_counts(arrays[f"{split}_images"], arrays[f"{split}_labels"], path, path)
    return Dataset(**arrays, name="bundled-subset", source=f"the Fashion-MNIST subset bundled with enshuffle{where}")


# --------------------------------------------------------------------------- source order


def load_dataset(
    data_dir: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
    log: Log | None = None,
    system_dir: str | os.PathLike | None = FASHION_MNIST_DIR,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    checksums: Mapping[str, str] = MNIST_SHA256,
) -> Dataset:
    """The training data, from the first source that works (see the module docstring).

    A `data_dir` the user named is authoritative: any problem with it raises DataError.
    The automatic sources fall through to the next one, telling `log` why.
    `system_dir`, `mirrors` and `checksums` exist so tests can point the sources elsewhere.
    """
    say = log or (lambda message: None)

    def chosen(dataset: Dataset) -> Dataset:
        say(f"data: {dataset.describe()}")
        return dataset

    if data_dir is not None:
        return chosen(load_idx_dir(data_dir, name="directory"))

    if system_dir is not None and Path(system_dir).is_dir():
        try:
            return chosen(load_idx_dir(system_dir, name="fashion-mnist"))
        except DataError as exc:
            say(f"data: skipping Fashion-MNIST: {exc}")

    mnist_dir = cache_dir() / "mnist"
    have_mnist = all((mnist_dir / filename).is_file() for filename in checksums)
    if have_mnist or allow_download:
        try:
            download_mnist(mnist_dir, mirrors=mirrors if allow_download else (), checksums=checksums, log=say)
            return chosen(load_idx_dir(mnist_dir, name="mnist"))
        except DataError as exc:
            say(f"data: MNIST unavailable: {exc}")

    return chosen(load_bundled_subset())


def training_rows(labels: np.ndarray, limit: int | None, subset: str = "first") -> np.ndarray | None:
    """The indices (ascending, into the file's training images) a run with `--limit limit` trains
    on; None: all of them. "first": the first `limit`. "balanced": the same number of each class
    (`limit` // classes, the remainder one each to the lowest classes), each class's first images in
    file order; a class with too few gives all it has and the others make up the rest in turn. The
    rule is public, like the data: anyone can compute the subset, and its class counts are equal."""
    n = len(labels)
    if limit is None or limit >= n:
        return None
    if subset == "first":
        return np.arange(limit)
    if subset != "balanced":
        raise ValueError(f"unknown subset rule {subset!r}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    quota = np.full(len(classes), limit // len(classes))
    quota[: limit % len(classes)] += 1
    sizes = np.array([m.size for m in members])
    take = np.minimum(quota, sizes)
    short = limit - int(take.sum())
    while short > 0:  # classes with images left make up what the short ones lack, one each in turn
        room = np.flatnonzero(take < sizes)
        step = room[:short]
        take[step] += 1
        short -= step.size
    return np.sort(np.concatenate([m[:k] for m, k in zip(members, take)]))
