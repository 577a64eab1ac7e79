"""The hash chain of model versions: real files in tmp_path, real Ed25519 keys, the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enshuffle.chain import (
    Chain,
    ChainError,
    ChainIntegrityError,
    VerifyReport,
    short,
    signing_message,
)

REPO = Path(__file__).resolve().parents[1]


class Signer:
    """A coordinator key as the chain sees it: .sign(bytes) and .public_bytes (raw 32 bytes)."""

    def __init__(self):
        self.private = Ed25519PrivateKey.generate()
        self.public_bytes = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def model_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights of the 784-128-10 network plus optimizer state a resumed run needs."""
    w1 = rng.standard_normal((784, 128)) * 0.01
    return {
        "w1": w1,
        "b1": rng.standard_normal(128),
        "w2": rng.standard_normal((128, 10)).astype(np.float32),
        "b2": rng.standard_normal(10).astype(np.float32),
        "opt.m_w1": rng.standard_normal((784, 128)),
        "opt.step": np.array(7, dtype=np.int64),
        "mask": rng.random(5) > 0.5,
    }


def metadata_for(epoch: int) -> dict:
    return {
        "epoch": epoch,
        "step": epoch * 100,
        "preset": "default",
        "created": 1_700_000_000.0 + epoch,
        "metrics": {"test_accuracy": 0.80 + epoch / 100, "cost": 0.5 / epoch},
        "exposure": {"node-a": {"w1": 0.5}},
    }


@pytest.fixture
def run(tmp_path):
    """A run dir with three versions: (run_dir, signer, ids oldest first, arrays per version)."""
    run_dir = tmp_path / "run"
    signer = Signer()
    chain = Chain(run_dir, signer)
    rng = np.random.default_rng(402)
    ids, arrays = [], []
    for epoch in (1, 2, 3):
        a = model_arrays(rng)
        ids.append(chain.append(a, metadata_for(epoch)))
        arrays.append(a)
    return run_dir, signer, ids, arrays


def record_path(run_dir: Path, version_id: str) -> Path:
    return run_dir / "chain" / version_id / "version.json"


def rewrite_record(run_dir: Path, version_id: str, change) -> None:
    path = record_path(run_dir, version_id)
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m enshuffle ARGS` with its own ENSHUFFLE_HOME (no coordinator key unless a test puts one)."""
    home = home or Path(tempfile.mkdtemp(prefix="enshuffle-home-"))
    return subprocess.run(
        [sys.executable, "-m", "enshuffle", *args],
        cwd=REPO,
        env=dict(os.environ, ENSHUFFLE_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=60,
    )


# ----- appending, reading, ids


def test_three_versions_link_oldest_first(run):
    run_dir, _, ids, _ = run
    chain = Chain(run_dir)  # reading needs no key
    assert chain.head() == ids[-1]
    versions = chain.versions()
    assert [v.version_id for v in versions] == ids
    assert [v.parent_id for v in versions] == [None, ids[0], ids[1]]
    assert [v.metadata["epoch"] for v in versions] == [1, 2, 3]
    assert len(set(ids)) == 3


def test_load_round_trips_every_array_exactly(run):
    run_dir, _, ids, arrays = run
    loaded, metadata = Chain(run_dir).load(ids[1])
    assert sorted(loaded) == sorted(arrays[1])
    for name, original in arrays[1].items():
        assert loaded[name].dtype == original.dtype and loaded[name].shape == original.shape
        assert loaded[name].tobytes() == original.tobytes(), name
    assert metadata == metadata_for(2)
    loaded["w1"][0, 0] += 1.0  # a resumed run updates in place: arrays must be writable copies


def test_id_is_sha256_of_the_canonical_encoding(run):
    run_dir, signer, ids, arrays = run
    manifest = [
        {
            "name": n,
            "dtype": arrays[2][n].dtype.str,
            "shape": list(arrays[2][n].shape),
            "sha256": hashlib.sha256(np.ascontiguousarray(arrays[2][n]).tobytes()).hexdigest(),
        }
        for n in sorted(arrays[2])
    ]
    document = {
        "format": "enshuffle-chain/1",
        "parent_id": ids[1],
        "coordinator_key": signer.public_bytes.hex(),
        "metadata": metadata_for(3),
        "arrays": manifest,
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(encoded).hexdigest() == ids[2]
    record = json.loads(record_path(run_dir, ids[2]).read_text())
    signer.private.public_key().verify(bytes.fromhex(record["signature"]), signing_message(ids[2]))


def test_metadata_is_stored_as_plain_json(tmp_path):
    chain = Chain(tmp_path, Signer())
    version = chain.append({"w": np.ones(3)}, {"step": np.int64(4), "acc": np.float32(0.5), "pair": (1, 2)})
    assert chain.load(version)[1] == {"step": 4, "acc": 0.5, "pair": [1, 2]}


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ({"cost": float("nan")}, "finite"),
        ({"weights": np.ones(2)}, "arrays dict"),
        ({"when": object()}, "object"),
    ],
)
def test_metadata_that_is_not_json_is_refused(tmp_path, metadata, fragment):
    with pytest.raises(ChainError, match=fragment):
        Chain(tmp_path, Signer()).append({"w": np.ones(3)}, metadata)
    assert Chain(tmp_path).head() is None


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(ChainError, match="'names'.*dtype object"):
        Chain(tmp_path, Signer()).append({"names": np.array(["a", None], dtype=object)}, {})


def test_append_needs_the_runs_own_key(run):
    run_dir, _, ids, arrays = run
    with pytest.raises(ChainError, match="signing key"):
        Chain(run_dir).append(arrays[0], {})
    with pytest.raises(ChainError, match="KEY holds coordinator key"):
        Chain(run_dir, Signer()).append(arrays[0], {})
    assert Chain(run_dir).head() == ids[-1]


def test_empty_run_dir_is_an_empty_chain(tmp_path):
    chain = Chain(tmp_path)
    assert chain.head() is None and chain.versions() == []
    assert chain.verify() == VerifyReport(True, 0, None, None)


def test_missing_run_dir_is_named(tmp_path):
    with pytest.raises(ChainError, match="does not exist"):
        Chain(tmp_path / "nope").versions()


# ----- resolve


def test_resolve_full_id_and_unique_prefixes(run):
    run_dir, _, ids, _ = run
    chain = Chain(run_dir)
    for version in ids:
        assert chain.resolve(version) == version
        assert chain.resolve(version[:12].upper()) == version
    unused = next(c for c in "0123456789abcdef" if not any(v.startswith(c) for v in ids))
    with pytest.raises(ChainError, match="no version"):
        chain.resolve(unused)
    with pytest.raises(ChainError, match="not a version id"):
        chain.resolve("zz12")
    with pytest.raises(ChainError, match="not a version id"):
        chain.resolve("")


def test_resolve_ambiguous_prefix(tmp_path):
    chain = Chain(tmp_path, Signer())
    ids: list[str] = []
    # 17 ids must share a first hex digit (pigeonhole); stop as soon as two do
    while len({v[0] for v in ids}) == len(ids):
        ids.append(chain.append({"w": np.arange(3.0)}, {"n": len(ids)}))
    shared = next(c for c in {v[0] for v in ids} if sum(v.startswith(c) for v in ids) > 1)
    with pytest.raises(ChainError, match="matches 2 versions.*more digits"):
        chain.resolve(shared)


# ----- verify and tampering


def test_verify_ok(run):
    run_dir, _, ids, _ = run
    assert Chain(run_dir).verify() == VerifyReport(True, 3, None, None)


def test_modified_array_file_is_caught(run):
    run_dir, _, ids, _ = run
    path = run_dir / "chain" / ids[1] / "0.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    report = Chain(run_dir).verify()
    assert (report.ok, report.checked, report.first_bad) == (False, 1, short(ids[1]))
    assert "array" in report.problem and "modified" in report.problem
    with pytest.raises(ChainIntegrityError, match=short(ids[1])):
        Chain(run_dir).load(ids[1])


def test_modified_metadata_is_caught(run):
    run_dir, _, ids, _ = run
    rewrite_record(run_dir, ids[1], lambda r: r["metadata"]["metrics"].update(test_accuracy=0.99))
    report = Chain(run_dir).verify()
    assert (report.ok, report.first_bad) == (False, short(ids[1]))
    assert "metadata" in report.problem
    with pytest.raises(ChainIntegrityError, match="metadata"):
        Chain(run_dir).load(ids[1])


def test_manifest_edited_to_match_a_modified_array_is_caught(run):
    run_dir, _, ids, arrays = run
    entry_index = sorted(arrays[0]).index("b1")
    replacement = np.zeros(128)
    (run_dir / "chain" / ids[0] / f"{entry_index}.bin").write_bytes(replacement.tobytes())
    rewrite_record(
        run_dir,
        ids[0],
        lambda r: r["arrays"][entry_index].update(sha256=hashlib.sha256(replacement.tobytes()).hexdigest()),
    )
    report = Chain(run_dir).verify()
    assert (report.ok, report.checked, report.first_bad) == (False, 0, short(ids[0]))
    assert "array list was modified" in report.problem


def test_signature_by_another_key_is_caught(run):
    run_dir, _, ids, _ = run
    forger = Signer()
    rewrite_record(run_dir, ids[2], lambda r: r.update(signature=forger.sign(signing_message(ids[2])).hex()))
    report = Chain(run_dir).verify()
    assert (report.ok, report.checked, report.first_bad) == (False, 2, short(ids[2]))
    assert "signature" in report.problem


def test_version_signed_by_a_key_other_than_the_runs_is_caught(run):
    run_dir, _, ids, arrays = run
    key_file = run_dir / "chain" / "KEY"
    run_key = key_file.read_text()
    other = Signer()
    # an intruder with another key writes a well-formed, self-consistent version on top of the head
    key_file.write_text(other.public_bytes.hex() + "\n")
    intruder = Chain(run_dir, other).append(arrays[2], metadata_for(4))
    key_file.write_text(run_key)
    report = Chain(run_dir).verify()
    assert (report.ok, report.checked, report.first_bad) == (False, 3, short(intruder))
    assert "key" in report.problem and other.public_bytes.hex()[:16] in report.problem


def test_missing_parent_is_caught(run):
    run_dir, _, ids, _ = run
    shutil.rmtree(run_dir / "chain" / ids[0])
    report = Chain(run_dir).verify()
    assert (report.ok, report.first_bad) == (False, short(ids[1]))
    assert "parent" in report.problem and short(ids[0]) in report.problem and "missing" in report.problem
    with pytest.raises(ChainError, match="missing"):
        Chain(run_dir).versions()


def test_parent_link_rewritten_is_caught(run):
    run_dir, _, ids, _ = run
    rewrite_record(run_dir, ids[2], lambda r: r.update(parent_id=ids[0]))  # skip version 2
    report = Chain(run_dir).verify()
    assert (report.ok, report.first_bad) == (False, short(ids[2]))
    assert "parent link" in report.problem


def test_head_pointing_at_a_missing_version_is_caught(run):
    run_dir, _, ids, _ = run
    ghost = hashlib.sha256(b"no such version").hexdigest()
    (run_dir / "chain" / "HEAD").write_text(ghost + "\n")
    report = Chain(run_dir).verify()
    assert (report.ok, report.first_bad) == (False, short(ghost))
    assert "HEAD" in report.problem and "missing" in report.problem


def test_head_with_garbage_is_caught(run):
    run_dir, _, _, _ = run
    (run_dir / "chain" / "HEAD").write_text("../../etc/passwd\n")
    report = Chain(run_dir).verify()
    assert not report.ok and "HEAD" in report.problem
    with pytest.raises(ChainError, match="HEAD"):
        Chain(run_dir).head()


def test_corrupt_record_json_is_caught(run):
    run_dir, _, ids, _ = run
    record_path(run_dir, ids[1]).write_text("{not json")
    report = Chain(run_dir).verify()
    assert (report.ok, report.first_bad) == (False, short(ids[1]))
    assert "not valid JSON" in report.problem


def test_verify_names_the_oldest_bad_version(run):
    run_dir, _, ids, _ = run
    for version in (ids[2], ids[1]):
        rewrite_record(run_dir, version, lambda r: r["metadata"].update(epoch=99))
    report = Chain(run_dir).verify()
    assert (report.checked, report.first_bad) == (1, short(ids[1]))


# ----- crashes


def test_leftovers_of_a_crashed_append_are_ignored_then_cleaned(run):
    run_dir, signer, ids, arrays = run
    chain_dir = run_dir / "chain"
    half = chain_dir / ".tmp-version-deadbeef"
    half.mkdir()
    (half / "0.bin").write_bytes(b"\x00" * 10)  # crash while writing arrays, before version.json
    (chain_dir / ".tmp-HEAD-cafe").write_text(ids[0][:20])  # crash while writing the new HEAD
    chain = Chain(run_dir)
    assert chain.verify() == VerifyReport(True, 3, None, None)
    assert chain.head() == ids[-1] and [v.version_id for v in chain.versions()] == ids
    new = Chain(run_dir, signer).append(arrays[0], metadata_for(4))
    assert not [p.name for p in chain_dir.iterdir() if p.name.startswith(".tmp-")]
    assert Chain(run_dir).verify() == VerifyReport(True, 4, None, None)
    assert Chain(run_dir).head() == new


def test_crash_after_rename_before_head_keeps_the_old_head(run, tmp_path):
    run_dir, signer, ids, arrays = run
    head_file, log_file = run_dir / "chain" / "HEAD", run_dir / "chain" / "HEADS"
    old_head, old_log = head_file.read_bytes(), log_file.read_bytes()
    new = Chain(run_dir, signer).append(arrays[2], metadata_for(4))
    # the disk as a crash between os.rename and os.replace(HEAD) leaves it (the log line comes after HEAD)
    head_file.write_bytes(old_head)
    log_file.write_bytes(old_log)
    chain = Chain(run_dir)
    assert chain.head() == ids[-1]
    assert chain.verify() == VerifyReport(True, 3, None, None)
    # the restarted coordinator writes the same version again: same id, the stored directory is reused
    assert Chain(run_dir, signer).append(arrays[2], metadata_for(4)) == new
    assert Chain(run_dir).verify() == VerifyReport(True, 4, None, None)


# ----- the command line


def test_cli_verify_exit_codes(run):
    run_dir, signer, ids, _ = run
    from enshuffle.protocol.keys import fingerprint

    fp = fingerprint(signer.public_bytes)
    done = cli("chain", "verify", str(run_dir), "--key", fp)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok: 3 versions verified, signed by coordinator key {fp} (the key given with --key)"
    rewrite_record(run_dir, ids[1], lambda r: r["metadata"].update(epoch=7))
    done = cli("chain", "verify", str(run_dir), "--key", fp)
    assert done.returncode == 1
    assert short(ids[1]) in done.stderr and "metadata" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_log_newest_first(run):
    run_dir, _, ids, _ = run
    done = cli("chain", "log", str(run_dir))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [short(v) for v in reversed(ids)]
    assert f"parent {short(ids[1])}" in lines[0] and "parent -" in lines[-1]
    assert "epoch   3" in lines[0] and "step    300" in lines[0] and "test_acc 0.8300" in lines[0]
    done = cli("chain", "log", str(run_dir), "--json")
    listed = [json.loads(line) for line in done.stdout.splitlines()]  # JSON lines
    assert all(v["type"] == "version" for v in listed)
    assert [v["version_id"] for v in listed] == list(reversed(ids))
    assert listed[-1]["parent_id"] is None and listed[0]["metadata"] == metadata_for(3)


def test_cli_export_writes_exactly_the_weights(run, tmp_path):
    run_dir, _, ids, arrays = run
    out = tmp_path / "head.npz"
    done = cli("chain", "export", str(run_dir), "--npz", str(out))
    assert done.returncode == 0, done.stderr
    with np.load(out, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["b1", "b2", "w1", "w2"]
        for name in npz.files:
            assert npz[name].tobytes() == arrays[2][name].tobytes() and npz[name].dtype == arrays[2][name].dtype
    out = tmp_path / "first"  # no .npz suffix: the file is written under exactly this name
    done = cli("chain", "export", str(run_dir), "--version", ids[0][:10], "--npz", str(out))
    assert done.returncode == 0, done.stderr
    with np.load(out, allow_pickle=False) as npz:
        assert np.array_equal(npz["w1"], arrays[0]["w1"])


def test_cli_export_does_not_overwrite_without_force(run, tmp_path):
    run_dir, _, ids, arrays = run
    out = tmp_path / "keep.npz"
    out.write_bytes(b"the user's own file")
    done = cli("chain", "export", str(run_dir), "--npz", str(out))
    assert done.returncode == 2 and "--force" in done.stderr and str(out) in done.stderr
    assert "Traceback" not in done.stderr and out.read_bytes() == b"the user's own file"
    done = cli("chain", "export", str(run_dir), "--npz", str(out), "--force")
    assert done.returncode == 0, done.stderr
    with np.load(out, allow_pickle=False) as npz:
        assert np.array_equal(npz["w1"], arrays[2]["w1"])


def test_cli_export_refuses_a_tampered_version(run, tmp_path):
    run_dir, _, ids, _ = run
    rewrite_record(run_dir, ids[2], lambda r: r["metadata"].update(epoch=9))
    done = cli("chain", "export", str(run_dir), "--npz", str(tmp_path / "x.npz"))
    assert done.returncode == 1 and short(ids[2]) in done.stderr
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("chain", "verify", "{missing}"),
        ("chain", "log", "{missing}"),
        ("chain", "export", "{missing}", "--npz", "{out}"),
        ("chain", "export", "{run}", "--version", "zzzz", "--npz", "{out}"),
    ],
)
def test_cli_wrong_input_is_one_line_exit_2(run, tmp_path, args):
    run_dir, _, _, _ = run
    values = {"missing": str(tmp_path / "no-such-run"), "out": str(tmp_path / "o.npz"), "run": str(run_dir)}
    done = cli(*(a.format(**values) for a in args))
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "error:" in done.stderr


def test_cli_export_of_a_version_without_weights(tmp_path):
    Chain(tmp_path, Signer()).append({"w1": np.ones(2)}, {})
    done = cli("chain", "export", str(tmp_path), "--npz", str(tmp_path / "o.npz"))
    assert done.returncode == 2 and "b1, w2, b2" in done.stderr


def test_broken_files_are_one_line_errors_not_tracebacks(run, tmp_path):
    run_dir, _, ids, _ = run
    # A version.json nested deeper than the JSON parser goes: verify reports it, log refuses it.
    record_path(run_dir, ids[1]).write_text("[" * 100000)
    out = cli("chain", "verify", str(run_dir))
    assert out.returncode == 1 and "Traceback" not in out.stderr and ids[1] in out.stderr
    out = cli("chain", "log", str(run_dir))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # HEAD that is a directory.
    head = run_dir / "chain" / "HEAD"
    head.unlink()
    head.mkdir()
    out = cli("chain", "log", str(run_dir))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "HEAD" in out.stderr


def test_export_to_a_directory_or_unwritable_path_is_refused(run, tmp_path):
    run_dir, _, _, _ = run
    out = cli("chain", "export", str(run_dir), "--npz", str(tmp_path))
    assert out.returncode == 2 and "is a directory" in out.stderr and "Traceback" not in out.stderr
    out = cli("chain", "export", str(run_dir), "--npz", "/proc/model.npz")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert not list(tmp_path.glob(".tmp*")) and not list(Path("/proc").glob(".tmp-model*"))


# ----- copies of a run, and a missing HEAD, as the command line reports them


def _home_chain(tmp_path: Path, versions: int):
    """A run dir written as a coordinator writes it: signed with the home's key, each head recorded
    in the home. Returns (home, run_dir, identity)."""
    from enshuffle.chain import record_head_in_home
    from enshuffle.protocol.keys import load_or_create_identity

    home = tmp_path / "home"
    identity = load_or_create_identity("coordinator", home)
    run_dir = tmp_path / "run"
    chain = Chain(run_dir, identity)
    rng = np.random.default_rng(5)
    for epoch in range(1, versions + 1):
        chain.append(model_arrays(rng), metadata_for(epoch))
        record_head_in_home(chain, home)
    return home, run_dir, identity


def test_extending_a_copy_of_a_run_leaves_the_original_verifiable(tmp_path):
    from enshuffle.chain import record_head_in_home

    home, run_dir, identity = _home_chain(tmp_path, 3)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    chain = Chain(copy, identity)
    chain.append(model_arrays(np.random.default_rng(6)), metadata_for(4))
    record_head_in_home(chain, home)
    for where in (run_dir, copy):
        done = cli("chain", "verify", str(where), home=home)
        assert done.returncode == 0 and "ok:" in done.stdout, (where, done.stdout + done.stderr)
    # Rolling the original back in place is still caught: tests/test_chain_attacks.py.


def test_chain_log_with_head_deleted_is_an_error_not_an_empty_run(tmp_path):
    home, run_dir, _identity = _home_chain(tmp_path, 3)
    (run_dir / "chain" / "HEAD").unlink()
    done = cli("chain", "log", str(run_dir), home=home)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no model versions" not in done.stderr and "3 version directories" in done.stderr, done.stderr
    assert "chain verify" in done.stderr


def test_verify_names_a_bad_version_once(tmp_path):
    home, run_dir, _identity = _home_chain(tmp_path, 2)
    head = Chain(run_dir).head()
    (run_dir / "chain" / head / "version.json").write_text("{not json")
    done = cli("chain", "verify", str(run_dir), home=home)
    assert done.returncode == 1 and "is not valid JSON" in done.stderr, done.stderr
    assert done.stderr.count(f"version {short(head)}") == 1, done.stderr


def test_a_crash_between_the_first_head_and_its_log_line_leaves_a_resumable_chain(tmp_path):
    """The first append writes HEAD, then creates HEADS: a kill in between leaves one version and
    no head log, which is consistent (HEAD one version ahead of its log) and the next append logs it."""
    from enshuffle.chain import Chain
    from enshuffle.protocol.keys import load_or_create_identity

    signer = load_or_create_identity("coordinator", tmp_path / "keys")
    run_dir = tmp_path / "run"
    arrays = {"w1": np.arange(6, dtype=np.float64).reshape(2, 3)}
    first = Chain(run_dir, signer).append(arrays, metadata_for(1))
    log_file = run_dir / "chain" / "HEADS"
    log_file.unlink()
    assert Chain(run_dir).verify() == VerifyReport(True, 1, None, None)
    second = Chain(run_dir, signer).append(arrays, metadata_for(2))
    assert Chain(run_dir).verify() == VerifyReport(True, 2, None, None)
    assert len(log_file.read_text().splitlines()) == 2 and Chain(run_dir).head() == second != first
    # an emptied (not missing) head log, or a missing one under two versions, is still refused
    log_file.write_text("")
    assert not Chain(run_dir).verify().ok
