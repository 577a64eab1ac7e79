"""The lean coordinator's structural promises, each shown by running the real thing (speed itself is measured
by `enshuffle bench`, never asserted here):

- a mini-batch step is two round trips to the nodes (forward, backward), a full-batch epoch three
  (the test set's forward pass as well);
- the server sends a batch the moment it is submitted, so a node computes while the coordinator
  prepares the next slot's batch;
- freed large blocks stay in the process (enshuffle.memory): allocating and freeing the same
  64 MB again and again does not page-fault it in every time.
"""

from __future__ import annotations

import resource
import threading

import numpy as np

from enshuffle.coordinator.distributed import Batch, DistributedCompute, InProcessExecutor, static_name
from enshuffle.coordinator.ledger import ExposureLedger
from enshuffle.coordinator.server import CoordinatorServer, Listener
from enshuffle.coordinator.state import CoordinatorState
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.model import get_preset
from enshuffle.protocol.keys import Identity
from wire_util import ScriptedNode, wait_until
from presets import small_default


class Recording(InProcessExecutor):
    """The in-process executor with the server's submit/collect interface, recording the calls."""

    def __init__(self, compute):
        super().__init__(compute)
        self.calls: list[str] = []

    def submit(self, batch):
        self.calls.append("submit")
        return self.run([batch])[0]

    def collect(self, handles):
        self.calls.append("collect")
        return list(handles)

    def forget(self, handles):
        self.calls.append("forget")


def test_steps_take_two_round_trips_and_batches_go_out_one_by_one(core_dataset):
    preset = small_default(dtype="float64")
    inputs = prepare(core_dataset, preset, limit=600)
    compute = DistributedCompute(inputs.images, 3, np.random.default_rng(5), Recording, **inputs.source())
    trainer = Trainer(preset, inputs, compute, secret=11)
    trainer.run_step()
    assert compute.round_trips == 2
    # three slots: three batches submitted one by one, then one wait, per round trip
    assert compute.executor.calls == ["submit"] * 3 + ["collect"] + ["submit"] * 3 + ["collect"]
    trainer.run_step()
    assert compute.round_trips == 4

    seed = get_preset("seed")
    seed_inputs = prepare(core_dataset, seed, limit=600)
    full = DistributedCompute(
        seed_inputs.images, 2, np.random.default_rng(6), InProcessExecutor, **seed_inputs.source()
    )
    Trainer(seed, seed_inputs, full, secret=11).run_epoch()
    assert full.round_trips == 3  # the test set's forward pass, then the step's forward and backward


def test_a_submitted_batch_is_sent_before_the_server_is_pumped_again(core_dataset):
    preset = small_default(dtype="float64")
    inputs = prepare(core_dataset, preset, limit=600)
    listener = Listener("tcp://127.0.0.1:*")
    node = ScriptedNode(listener.endpoint, "quick")
    ledger = ExposureLedger()
    compute = DistributedCompute(
        inputs.images,
        1,
        np.random.default_rng(8),
        CoordinatorServer.factory(listener, Identity.generate(), CoordinatorState(), ledger),
        ledger=ledger,
        **inputs.source(),
    )
    server = compute.executor
    try:
        stop = threading.Event()

        def serve():
            while not stop.is_set():
                server.pump(20)

        pumping = threading.Thread(target=serve, daemon=True)
        pumping.start()
        try:
            node.hello()
            wait_until(lambda: server.sessions, 10, "the node to join", idle=lambda: node.pump(20))
        finally:
            stop.set()
            pumping.join()
        # From here one thread: the server is not pumped between submit and the node's receipt.
        rng = np.random.default_rng(9)
        rows = rng.choice(inputs.images["train"].shape[0], 16, replace=False)
        static = compute.static_arrays(0)[static_name("train", 0)]
        b = rng.standard_normal((static.shape[1], 4))
        node.hold_next(1)
        task = server.submit(
            Batch(
                0,
                "matmul",
                {"a_static": static_name("train", 0), "transpose_a": False},
                {"rows": rows, "b": b},
                compute.static_exposure(0),
            )
        )
        wait_until(lambda: node.held, 10, "the batch to arrive", idle=lambda: node.pump(20))
        node.answer(node.held.pop())
        (result,) = server.collect([task])
        np.testing.assert_allclose(result, static[rows] @ b, rtol=1e-12)
    finally:
        node.close()
        server.close("shutdown")


def test_freed_large_blocks_are_reused_without_page_faults():
    """bytearray, not numpy: numpy asks for transparent huge pages on large arrays, which fault
    per 2 MB and would hide the difference from the count (not from the CPU time)."""
    from enshuffle.memory import keep_freed_memory

    assert keep_freed_memory()  # glibc, as on every machine this runs on
    size = 64 << 20
    pages = size // resource.getpagesize()
    marks = b"\1" * len(range(0, size, resource.getpagesize()))

    def touch_every_page():
        block = bytearray(size)
        block[:: resource.getpagesize()] = marks
        del block

    touch_every_page()  # the heap grows to hold it once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        touch_every_page()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Without the setting each round maps the block afresh: 10 x `pages` faults (measured: 10.0 x).
    assert faults < pages, (faults, pages)


def test_a_float32_step_flushes_subnormals_and_gives_the_thread_its_mode_back(core_dataset):
    """The coordinator's float32 steps compute as its nodes do, with subnormals flushed to zero;
    float64 steps (the seed preset, exact against the notebook) keep IEEE gradual underflow, and
    the thread's mode is back to what it was after every step."""
    from enshuffle import fpenv
    from enshuffle.model import LocalCompute

    class Watching(LocalCompute):
        seen: list[bool] = []

        def x_w1(self, which, idx, w1):
            self.seen.append(fpenv.flushing())
            return super().x_w1(which, idx, w1)

    assert not fpenv.flushing()
    for dtype, flushed in (("float32", True), ("float64", False)):
        preset = small_default(dtype=dtype)
        inputs = prepare(core_dataset, preset, limit=300)
        compute = Watching(inputs.images)
        compute.seen = []
        Trainer(preset, inputs, compute, secret=3).run_step()
        assert compute.seen == [flushed]  # x86-64 or aarch64 Linux, as every machine this runs on
        assert not fpenv.flushing()
