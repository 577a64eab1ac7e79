"""`enshuffle audit`: a real run (coordinator here, node processes on loopback, one recording),
the curious node's attacks on the recording, scored against the coordinator's ground truth.

On the "shuffle" control the attacks must recover nearly everything (they have teeth); on the
real disguise the single-message attacks must stay under the privacy targets. Small data (the core test IDX files,
1,000 training images), one epoch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core_data import FASHION_INSTALLED
from enshuffle.audit.runner import run_audit
from enshuffle.audit.scoring import adjusted_rand
from enshuffle.node.daemon import MessageRecorder
from enshuffle.protocol.messages import Message
from presets import SMALL_NETWORK

REPO = Path(__file__).resolve().parents[1]
LIMIT = 1000

pytestmark = pytest.mark.skipif(not FASHION_INSTALLED, reason="the attacks need real images (Fashion-MNIST)")


def _audit(data_dir, disguise, preset="default", epochs=None):
    return run_audit(
        preset_name=preset,
        nodes=3,
        epochs=epochs,
        limit=LIMIT,
        data=str(data_dir),
        disguise=disguise,
        log=lambda line: None,
        ica=False,
        **SMALL_NETWORK,
    )


@pytest.fixture(scope="module")
def shuffle_figures(core_data_dir):
    return _audit(core_data_dir, "shuffle")


@pytest.fixture(scope="module")
def share_figures(core_data_dir):
    return _audit(core_data_dir, "share")


def test_attacks_have_teeth_on_the_shuffle_control(shuffle_figures):
    f = shuffle_figures
    json.dumps(f)  # --json prints exactly this
    assert f["settings"]["messages"] > 2
    assert f["exact_pixels"] >= 0.9
    assert f["positions_statistics"] >= 0.9
    assert f["reid_exact"] >= 0.9
    assert f["labels_named"] >= 0.9
    assert f["labels_grouping_ari"] >= 0.5  # dz1 rows of a batch cluster by class
    assert f["static_scales"] >= 0.9
    assert f["w1_block_corr"] >= 0.9  # its own w1 rows, up to the order of hidden units
    assert not all(f["meets_targets"].values())


def test_the_share_disguise_holds_against_the_single_message_attacks(share_figures):
    """The attacks that look at one message at a time (column multisets, mantissas, moments,
    nearest neighbours, the last w1 operand) get nothing from the share disguise. The weight
    trajectory breaks it (tests/test_audit_trajectory.py): the headline figures include that."""
    f = share_figures
    assert f["exact_pixels_columns"] == 0.0
    assert f["reid_exact"] <= 0.01 and f["reid_nn"] <= 0.01
    assert f["positions_weights"] <= 0.05 and f["positions_statistics"] <= 0.05
    assert f["w1_outside_corr"] is None or abs(f["w1_outside_corr"]) <= 0.1
    assert f["w1_block_corr"] <= f["w1_block_chance"] + 0.1
    assert f["meets_targets"]["w1_outside_corr"]


def test_the_share_disguise_meets_the_label_target_for_the_dz1_attacks(share_figures):
    """dz1 leaves with decoys (each class's mean and principal directions moved to random rows):
    its rows must not group by class, and the dz1 attacks name no label above the target."""
    f = share_figures
    assert f["labels_named_dz1"] <= 0.15
    assert f["labels_grouping_ari"] <= 0.2


def test_seed_preset_public_weights_anchor_positions_and_w1(core_data_dir):
    """The notebook's public initial weights (RandomState(402)): on the shuffle control their
    mantissas give every pixel position, and they rebuild w1 outside the node's block."""
    f = _audit(core_data_dir, "shuffle", preset="seed", epochs=2)
    assert f["positions_weights"] >= 0.9
    assert f["w1_outside_corr"] >= 0.9


def test_recorder_keeps_verified_messages_as_npz_and_stops_at_its_cap(tmp_path):
    arrays = {"rows": np.arange(5, dtype=np.int64), "b": np.ones((5, 3), dtype=np.float32)}
    header = {
        "run_id": "r",
        "batch_id": "b1",
        "seq": 1,
        "step": 0,
        "op": "matmul",
        "params": {"a_static": "train.0", "transpose_a": False},
        "lease_ms": 1000,
    }
    # What the daemon hands the recorder: a BATCH after it was opened and checked (ENS2 seals it).
    msg = Message(command="BATCH", header=header, arrays=arrays, signature=None)
    lines = []
    one = sum(a.nbytes for a in arrays.values()) + len(json.dumps(header, sort_keys=True))
    rec = MessageRecorder(str(tmp_path / "rec"), max_bytes=one * 3 // 2, log=lines.append)
    rec.record(msg)
    rec.record(msg)  # the second would pass the cap: not written, recording stops
    rec.record(msg)
    files = sorted((tmp_path / "rec").iterdir())
    assert [p.name for p in files] == ["00000000-BATCH.npz"]
    assert len(lines) == 1 and "recording stopped" in lines[0]
    with np.load(files[0], allow_pickle=False) as npz:
        assert json.loads(bytes(npz["header"]))["batch_id"] == "b1"
        np.testing.assert_array_equal(npz["arr.rows"], arrays["rows"])
        np.testing.assert_array_equal(npz["arr.b"], arrays["b"])


def test_recorder_refuses_a_directory_holding_a_recording(tmp_path):
    from enshuffle.node.daemon import RecordError

    (tmp_path / "00000000-BATCH.npz").write_bytes(b"")
    with pytest.raises(RecordError, match="already holds a recording"):
        MessageRecorder(str(tmp_path))


def test_adjusted_rand_index():
    a = np.array([0, 0, 1, 1, 2, 2])
    assert adjusted_rand(a, np.array([5, 5, 7, 7, 9, 9])) == pytest.approx(1.0)
    assert adjusted_rand(a, np.array([0, 1, 0, 1, 0, 1])) < 0.0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--nodes", "1"], "--nodes 1"),
        (["--limit", "0"], "--limit"),
        (["--disguise", "mask"], "--disguise"),
        (["--data", "/nonexistent/enshuffle-audit"], "/nonexistent/enshuffle-audit"),
    ],
)
def test_bad_values_are_one_line_errors(args, words, core_cache):
    result = subprocess.run(
        [sys.executable, "-m", "enshuffle", "audit", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr
    assert any(words in line for line in lines), result.stderr


def test_layering_audit_is_top_level_and_headless():
    probe = (
        "import sys, enshuffle.audit.runner, enshuffle.audit.attacks, enshuffle.audit.scoring; "
        "print(any(m == 'textual' or m.startswith('textual.') for m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    below = [
        p
        for p in (REPO / "enshuffle").rglob("*.py")
        if "audit" not in p.parts
        and "commands" not in p.parts
        and p.name != "cli.py"
        and "enshuffle.audit" in p.read_text()
    ]
    assert below == []
