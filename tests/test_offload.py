"""--offload: each product shipped only where that pays (enshuffle/coordinator/offload.py).

The decisions follow the cost model and the shapes; whatever is decided, the distributed run
equals the centralized one after every step; an unknown choice is refused; the plan is printed at start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
from enshuffle.coordinator.offload import CostModel, decide, step_plan
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.model import LocalCompute
from presets import small_default

REPO = Path(__file__).resolve().parents[1]
BUILT_IN = CostModel()  # 26 ns per shipped element, 0.09 ns per multiply-add


def test_the_notebooks_network_pays_nowhere_and_a_long_contraction_does():
    """The built-in cost model's arithmetic: a 784-128-10 step never pays to ship; a 4096-wide
    hidden layer of a full batch does (over 1,000 multiply-adds per shipped element)."""
    small = step_plan((784, 128, 10), 128, 2, "auto", BUILT_IN)
    assert [p.name for p in small] == ["x_w1", "dw1"] and not any(p.ship for p in small)
    wide = {p.name: p for p in step_plan((784, 4096, 4096, 10), 60000, 2, "auto", BUILT_IN)}
    assert set(wide) == {"x_w1", "dw1", "a_w2", "dw2", "da2"}
    assert wide["a_w2"].ship and wide["dw2"].ship and wide["da2"].ship
    assert wide["a_w2"].madds / wide["a_w2"].shipped > 1000
    # matmul ships every product that can go, whatever it costs
    assert all(p.ship for p in step_plan((784, 128, 10), 128, 2, "matmul", BUILT_IN))


def test_the_decision_follows_the_cost_model():
    cheap_shipping = CostModel(ship_ns=0.001, madd_ns=1.0)
    dear_shipping = CostModel(ship_ns=1e6, madd_ns=1e-6)
    assert decide("a_w2", 128, 2048, 2048, 2, "auto", cheap_shipping).ship
    assert not decide("a_w2", 128, 2048, 2048, 2, "auto", dear_shipping).ship


def test_an_unknown_offload_is_refused():
    with pytest.raises(ValueError, match="auto, matmul"):
        DistributedCompute({"train": np.zeros((4, 784))}, 1, np.random.default_rng(0), InProcessExecutor, offload="all")


def test_a_cost_model_is_kept_and_a_broken_one_is_ignored(tmp_path):
    path = tmp_path / "cost_model.json"
    CostModel(ship_ns=3.5, madd_ns=0.03).save(path)
    loaded = CostModel.load(path)
    assert (loaded.ship_ns, loaded.madd_ns) == (3.5, 0.03) and "bench" in loaded.source
    path.write_text('{"ship_ns": -1, "madd_ns": "x"}')
    assert CostModel.load(path) == CostModel()
    assert CostModel.load(tmp_path / "missing.json") == CostModel()


class CountingExecutor:
    def __init__(self, compute):
        self.inner = InProcessExecutor(compute)
        self.kinds: set[str] = set()

    def run(self, batches):
        for b in batches:
            self.kinds.update(kind for kind, *_ in b.exposure)
        return self.inner.run(batches)

    def step_done(self):
        self.inner.step_done()


# A model under which, at these sizes, the hidden layer pays and the first layer does not.
MIXED = CostModel(ship_ns=30.0, madd_ns=1.0)  # x_w1 and dw1 pay below about 27, the hidden layer up to 32


@pytest.mark.parametrize("nodes", [1, 2, 3])
@pytest.mark.parametrize("offload,model", [("matmul", BUILT_IN), ("auto", BUILT_IN), ("auto", MIXED)])
def test_a_three_layer_network_equals_the_centralized_run_whatever_is_shipped(core_dataset, nodes, offload, model):
    preset = replace(small_default(dtype="float64", layers=(784, 256, 512, 10)), batch_size=100)
    inputs = prepare(core_dataset, preset, limit=300)
    compute = DistributedCompute(
        inputs.images,
        nodes,
        np.random.default_rng(nodes),
        CountingExecutor,
        **inputs.source(),
        layers=preset.layers,
        offload=offload,
        cost_model=model,
    )
    plan = {p.name: p.ship for p in compute.plan(100)}
    reference = Trainer(preset, inputs, LocalCompute(inputs.images), secret=3)
    distributed = Trainer(preset, inputs, compute, secret=3)
    for step in range(3):
        reference.run_step()
        distributed.run_step()
        for name, want in reference.params.items():
            np.testing.assert_allclose(
                distributed.params[name],
                want,
                rtol=1e-9,
                atol=1e-12,
                err_msg=f"{name} after step {step + 1} ({offload})",
            )
    sent = compute.executor.kinds
    if offload == "matmul":
        assert all(plan.values()) and {"w1", "w2", "activations", "deltas2"} <= sent
    elif model is BUILT_IN:
        # nothing of a training step; the test pass (every test image at once) may pay for x_w1
        assert not any(plan.values()) and sent <= {"w1", "samples"}
    else:
        assert plan == {"x_w1": False, "dw1": False, "a_w2": True, "dw2": True, "da2": True}
        assert "deltas" not in sent and {"w2", "activations", "deltas2"} <= sent  # dw1 stayed here


def test_train_prints_the_plan_and_offers_no_all(core_data_dir, core_cache):
    def train(*args):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "enshuffle",
                "train",
                "--nodes",
                "2",
                "--in-process",
                "--epochs",
                "1",
                "--limit",
                "300",
                "--data",
                str(core_data_dir),
                *args,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "ENSHUFFLE_CACHE": str(core_cache)},
        )

    auto = train()
    assert auto.returncode == 0, auto.stderr
    # the default preset's network (784-2048-10 ReLU) is wide enough for its resident first layer
    # (one product per step, forward and update together) to pay: auto ships it to the nodes
    assert "784-2048-10 relu" in auto.stderr and "offload auto" in auto.stderr, auto.stderr
    assert re.search(r"resident +nodes", auto.stderr) and "nothing pays" not in auto.stderr, auto.stderr
    share = train("--disguise", "share")
    assert share.returncode == 0, share.stderr
    assert "offload auto" in share.stderr and "x_w1" in share.stderr and "dw1" in share.stderr
    refused = train("--offload", "all")  # not a choice: argparse's own error
    assert refused.returncode == 2 and "invalid choice: 'all'" in refused.stderr and "Traceback" not in refused.stderr


def test_the_socket_is_serviced_every_step_even_when_nothing_is_shipped(core_dataset, tmp_path, monkeypatch):
    """With everything kept home a step never waits on the server; the server still services its
    socket at step boundaries (heartbeats, arrivals) whenever KEEPALIVE_S has passed since it last
    did, so its nodes are not left unheard for an epoch, and not more often than that."""
    from enshuffle.coordinator import server as server_module
    from enshuffle.coordinator.ledger import ExposureLedger
    from enshuffle.coordinator.server import CoordinatorServer
    from enshuffle.coordinator.state import CoordinatorState
    from enshuffle.protocol.keys import Identity

    preset = replace(small_default(dtype="float64"), batch_size=100)
    inputs = prepare(core_dataset, preset, limit=300)
    ledger = ExposureLedger()
    compute = DistributedCompute(
        inputs.images,
        2,
        np.random.default_rng(0),
        CoordinatorServer.factory("tcp://127.0.0.1:*", Identity.generate(), CoordinatorState(), ledger),
        ledger=ledger,
        **inputs.source(),
        offload="auto",
        cost_model=BUILT_IN,
    )
    server = compute.executor
    try:
        pumps = []
        pump = server.pump
        server.pump = lambda timeout_ms=100: (pumps.append(timeout_ms), pump(timeout_ms))
        trainer = Trainer(preset, inputs, compute, secret=1)
        monkeypatch.setattr(server_module, "KEEPALIVE_S", 0.0)  # always due: every step boundary pumps
        for _ in range(3):
            trainer.run_step()
        assert pumps == [0, 0, 0] and server.step == 3
        monkeypatch.setattr(server_module, "KEEPALIVE_S", 1e9)  # just pumped: not due again
        trainer.run_step()
        assert pumps == [0, 0, 0] and server.step == 4
    finally:
        server.close("shutdown")
