"""Key store: real key files and permissions, fingerprints, trust on first use, `keys show`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from enshuffle.protocol.keys import (
    FingerprintMismatch,
    Identity,
    KeyStoreError,
    TrustStore,
    enshuffle_home,
    fingerprint,
    key_path,
    load_or_create_identity,
    normalize_fingerprint,
    short_fingerprint,
    verify_signature,
)

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
posix_only = pytest.mark.skipif(os.name != "posix", reason="mode bits are POSIX")


@posix_only
def test_keys_are_created_private_in_a_private_directory(tmp_path):
    home = tmp_path / "home"
    ident = load_or_create_identity("node", home)
    assert ident.path == home / "node_ed25519.pem"
    assert stat.S_IMODE(ident.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert [p.name for p in home.iterdir()] == ["node_ed25519.pem"]  # no temporary left behind


def test_fingerprint_is_stable_across_loads_and_differs_per_role(tmp_path):
    first = load_or_create_identity("coordinator", tmp_path)
    again = load_or_create_identity("coordinator", tmp_path)
    node = load_or_create_identity("node", tmp_path)
    assert first.public_bytes == again.public_bytes and first.fingerprint == again.fingerprint
    assert node.fingerprint != first.fingerprint
    assert first.fingerprint == fingerprint(first.public_bytes)


def test_fingerprint_format():
    fp = fingerprint(bytes(32))
    assert fp.startswith("SHA256:")
    groups = fp[len("SHA256:") :].split("-")
    assert len(groups) == 8 and all(len(g) == 4 for g in groups)
    assert short_fingerprint(fp) == "-".join(groups[:2])
    assert fingerprint(bytes(31) + b"\x01") != fp
    with pytest.raises(ValueError):
        fingerprint(b"short")


def test_pasted_fingerprints_are_normalised_but_prefixes_are_refused():
    fp = Identity.generate().fingerprint
    body = fp[len("SHA256:") :]
    assert normalize_fingerprint(body.lower().replace("-", " ")) == fp
    assert normalize_fingerprint("sha256:" + body.replace("-", "")) == fp
    with pytest.raises(KeyStoreError, match="not a full key fingerprint"):
        normalize_fingerprint(short_fingerprint(fp))


def test_sign_and_verify():
    ident = Identity.generate()
    sig = ident.sign(b"model version 3")
    assert len(sig) == 64
    assert verify_signature(ident.public_bytes, sig, b"model version 3")
    assert not verify_signature(ident.public_bytes, sig, b"model version 4")
    assert not verify_signature(Identity.generate().public_bytes, sig, b"model version 3")
    assert not verify_signature(ident.public_bytes, sig[:10], b"model version 3")


@posix_only
def test_group_readable_key_file_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = load_or_create_identity("node", tmp_path).path
    path.chmod(0o640)
    with pytest.raises(KeyStoreError) as info:
        load_or_create_identity("node", tmp_path)
    assert str(path) in str(info.value) and "chmod 600" in str(info.value)
    path.chmod(0o600)
    load_or_create_identity("node", tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"garbage\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_corrupt_key_file_is_refused(tmp_path, content):
    path = key_path("coordinator", tmp_path)
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyStoreError) as info:
        load_or_create_identity("coordinator", tmp_path)
    assert str(path) in str(info.value) and "move it aside" in str(info.value)
    assert path.read_bytes() == content  # never overwritten


def test_a_key_of_another_type_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = key_path("node", tmp_path)
    path.write_bytes(pem)
    path.chmod(0o600)
    with pytest.raises(KeyStoreError, match="not an Ed25519 key"):
        load_or_create_identity("node", tmp_path)


def test_unknown_role_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError):
        load_or_create_identity("admin", tmp_path)


def test_home_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("ENSHUFFLE_HOME", str(tmp_path / "explicit"))
    assert enshuffle_home() == tmp_path / "explicit"
    monkeypatch.delenv("ENSHUFFLE_HOME")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert enshuffle_home() == tmp_path / "xdg" / "enshuffle"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert enshuffle_home() == tmp_path / "user" / ".config" / "enshuffle"


# --- trust on first use ----------------------------------------------------------------------------

ADDR = "tcp://10.0.0.5:5555"


def test_first_use_is_remembered_and_then_known(tmp_path):
    fp = Identity.generate().fingerprint
    store = TrustStore(tmp_path)
    assert store.check(ADDR, fp, None) == "trusted-on-first-use"
    assert TrustStore(tmp_path).check(ADDR, fp, None) == "known"  # a new object reads the file
    assert json.loads(store.path.read_text())["coordinators"][ADDR]["fingerprint"] == fp
    assert store.check("tcp://10.0.0.6:5555", Identity.generate().fingerprint) == "trusted-on-first-use"


def test_later_mismatch_names_both_fingerprints_the_file_and_the_reset(tmp_path):
    old, new = Identity.generate().fingerprint, Identity.generate().fingerprint
    store = TrustStore(tmp_path)
    store.check(ADDR, old, None)
    with pytest.raises(FingerprintMismatch) as info:
        store.check(ADDR, new, None)
    text = str(info.value)
    assert old in text and new in text and str(store.path) in text and "--coordinator-key" in text
    assert (info.value.expected, info.value.actual) == (old, new)
    assert store.remembered(ADDR) == old  # a mismatch never overwrites the remembered key
    assert store.forget(ADDR) and store.check(ADDR, new) == "trusted-on-first-use"


def test_pinned_key(tmp_path):
    right, wrong = Identity.generate().fingerprint, Identity.generate().fingerprint
    store = TrustStore(tmp_path)
    with pytest.raises(FingerprintMismatch) as info:
        store.check(ADDR, wrong, right)
    assert right in str(info.value) and wrong in str(info.value)
    assert store.remembered(ADDR) is None
    assert store.check(ADDR, right, right.lower()) == "pinned"
    assert store.check(ADDR, right) == "known"


def test_pin_overrides_a_remembered_key(tmp_path):
    old, new = Identity.generate().fingerprint, Identity.generate().fingerprint
    store = TrustStore(tmp_path)
    store.check(ADDR, old)
    assert store.check(ADDR, new, new) == "pinned"
    assert store.remembered(ADDR) == new


def test_damaged_trust_file_is_refused_naming_it(tmp_path):
    store = TrustStore(tmp_path)
    store.path.write_text("{not json")
    with pytest.raises(KeyStoreError) as info:
        store.check(ADDR, Identity.generate().fingerprint)
    assert str(store.path) in str(info.value) and "delete it" in str(info.value)


# --- command line ------------------------------------------------------------------------------------


def _keys_show(home: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENSHUFFLE_HOME": str(home)}
    return subprocess.run(
        [str(PYTHON), "-m", "enshuffle", "keys", "show", *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_show_prints_this_machines_fingerprints(tmp_path):
    first = _keys_show(tmp_path, "--create")
    assert first.returncode == 0, first.stderr
    coordinator = load_or_create_identity("coordinator", tmp_path)
    node = load_or_create_identity("node", tmp_path)
    assert coordinator.fingerprint in first.stdout and node.fingerprint in first.stdout
    assert str(tmp_path) in first.stdout and "created" in first.stdout
    second = _keys_show(tmp_path)
    assert coordinator.fingerprint in second.stdout and "created" not in second.stdout


def test_keys_show_lists_every_key_and_which_one_a_name_uses(tmp_path):
    """Each --name has its own node key: keys show lists them all by name, and with --name says
    the fingerprint that `enshuffle node --name NAME` presents; it creates nothing by itself."""
    empty = _keys_show(tmp_path / "empty")
    assert empty.returncode == 0, empty.stderr
    assert "none yet" in empty.stdout and not (tmp_path / "empty").exists()
    home = tmp_path / "home"
    plain = load_or_create_identity("node", home)
    alice = load_or_create_identity("node", home, name="alice")
    bob = load_or_create_identity("node", home, name="bob")
    listed = _keys_show(home)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    for label, ident in (("(no --name)", plain), ("--name alice", alice), ("--name bob", bob)):
        assert any(label in line and ident.fingerprint in line for line in lines), listed.stdout
    named = _keys_show(home, "--name", "alice")
    uses = [line for line in named.stdout.splitlines() if line.startswith("`enshuffle node --name alice` uses")]
    assert uses and alice.fingerprint in uses[0] and plain.fingerprint not in uses[0], named.stdout
    fresh = _keys_show(home, "--name", "carol")
    assert "has no key yet" in fresh.stdout and not key_path("node", home, "carol").exists(), fresh.stdout


@posix_only
def test_keys_show_reports_a_bad_key_file_in_one_line(tmp_path):
    load_or_create_identity("node", tmp_path).path.chmod(0o644)
    result = _keys_show(tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "node_ed25519.pem" in result.stderr


# --- files the OS will not let us use: one KeyStoreError naming the path, never an OSError ---------


def test_home_that_is_a_file_is_refused_naming_it(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a directory")
    with pytest.raises(KeyStoreError) as info:
        load_or_create_identity("node", home)
    assert str(home) in str(info.value) and "ENSHUFFLE_HOME" in str(info.value)
    with pytest.raises(KeyStoreError) as info:
        TrustStore(home).check(ADDR, Identity.generate().fingerprint)
    assert str(home / "known_coordinators.json") in str(info.value)


@posix_only
def test_dangling_link_at_the_key_path_is_refused_and_left_alone(tmp_path):
    path = key_path("node", tmp_path)
    path.symlink_to(tmp_path / "gone.pem")
    with pytest.raises(KeyStoreError) as info:
        load_or_create_identity("node", tmp_path)
    assert str(path) in str(info.value) and "broken link" in str(info.value)
    assert path.is_symlink() and not (tmp_path / "gone.pem").exists()  # nothing written through it


@posix_only
@pytest.mark.skipif(os.name == "posix" and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file_is_refused_naming_it(tmp_path):
    path = load_or_create_identity("node", tmp_path).path
    path.chmod(0o000)
    try:
        with pytest.raises(KeyStoreError, match="cannot be read") as info:
            load_or_create_identity("node", tmp_path)
        assert str(path) in str(info.value)
    finally:
        path.chmod(0o600)


def test_trust_file_that_is_not_utf8_is_refused_naming_it(tmp_path):
    store = TrustStore(tmp_path)
    store.path.write_bytes(b'{"coordinators": {"\xff": 1}}')
    with pytest.raises(KeyStoreError) as info:
        store.check(ADDR, Identity.generate().fingerprint)
    assert str(store.path) in str(info.value) and "delete it" in str(info.value)


def test_trust_file_that_is_a_directory_is_refused_naming_it(tmp_path):
    store = TrustStore(tmp_path)
    store.path.mkdir()
    with pytest.raises(KeyStoreError) as info:
        store.remembered(ADDR)
    assert str(store.path) in str(info.value) and "move it aside" in str(info.value)


@posix_only
@pytest.mark.skipif(os.name == "posix" and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_trust_directory_is_refused_naming_the_file(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o500)
    try:
        with pytest.raises(KeyStoreError, match="cannot be written") as info:
            TrustStore(home).check(ADDR, Identity.generate().fingerprint)
        assert str(home / "known_coordinators.json") in str(info.value)
    finally:
        home.chmod(0o700)
