"""The batch vocabulary (enshuffle/batch.py): what each op's params mean, its result's shape and
dtype, its work, a node's memory for it and its description, from the header's shapes alone."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from enshuffle import batch as vocabulary
from enshuffle.batch import OPS, BatchError, Matmul, Resident, parse
from enshuffle.kernels import ResidentState, compute_batch
from enshuffle.protocol import messages
from enshuffle.protocol.handshake import NodeHandshake
from enshuffle.protocol.keys import Identity
from wire_util import InProcessRun, default_preset, load_inputs


def test_the_vocabulary_is_the_protocols():
    assert OPS == ("matmul", "resident") and messages.OPS is OPS


def test_describe():
    held = {"img": np.zeros((100, 392), np.uint8)}
    arrays = {"b": np.zeros((392, 128)), "rows": np.arange(30)}
    describe = vocabulary.describe
    assert describe("matmul", {"a_static": "img"}, arrays, held) == "matmul (30x392)·(392x128) [img]"
    assert (
        describe("matmul", {"a_static": "img", "transpose_a": True}, arrays, held) == "matmul (392x30)·(392x128) [img]"
    )
    assert (
        describe("matmul", {}, {"a": np.zeros((128, 392)), "b": np.zeros((392, 128))}, {})
        == "matmul (128x392)·(392x128)"
    )
    assert describe("matmul", {"a_static": "missing"}, arrays, held) == "matmul"
    assert describe("sigmoid", {}, {"a": np.zeros((5, 3))}, {}) == "sigmoid"  # not an op: its name only
    resident = {"a_static": "img", "state": "w1.0", "from": 0, "version": 0, "lr": [], "momentum": 0.9}
    assert describe("resident", resident, {"rows": np.arange(30)}, held) == "resident (30x392)·V [w1.0]"
    assert describe("resident", {**resident, "fetch": True}, {}, held) == "resident checkpoint [w1.0]"


def test_a_products_shape_work_and_memory():
    static = np.zeros((500, 40), np.float32)
    held = {"x": static}
    rows, b = np.arange(300), np.zeros((40, 16), np.float32)
    forward = ({"a_static": "x"}, {"rows": rows, "b": b})
    assert vocabulary.result_shape("matmul", *forward, held) == (300, 16)
    assert vocabulary.result_dtype("matmul", *forward, held) == np.float32
    assert vocabulary.work("matmul", *forward, held) == 300 * 40 * 16
    assert vocabulary.memory("matmul", *forward, held) == 300 * 16 * 4 + 300 * 40 * 4  # result, gathered rows
    # transposed, static[rows].T @ d: (40, 300) @ (300, 16), contracting over the 300 rows
    backward = ({"a_static": "x", "transpose_a": True}, {"rows": rows, "b": np.zeros((300, 16), np.float32)})
    assert vocabulary.result_shape("matmul", *backward, held) == (40, 16)
    assert vocabulary.work("matmul", *backward, held) == 40 * 300 * 16
    assert vocabulary.memory("matmul", *backward, held) == 40 * 16 * 4 + 300 * 40 * 4
    plain = ({"transpose_a": True}, {"a": np.zeros((300, 40)), "b": np.zeros((300, 16))})
    assert vocabulary.result_shape("matmul", *plain, {}) == (40, 16)
    assert vocabulary.work("matmul", *plain, {}) == 40 * 300 * 16
    assert vocabulary.memory("matmul", *plain, {}) == 40 * 16 * 8
    for op, params, arrays in (("matmul", *forward), ("matmul", *backward)):
        c = compute_batch(op, params, arrays, held)
        assert c.shape == vocabulary.result_shape(op, params, arrays, held) and c.dtype == np.float32
    # shapes it cannot read count as nothing: the compute refuses them
    assert vocabulary.memory("matmul", {"a_static": "missing"}, {"rows": rows, "b": b}, held) == 0
    assert vocabulary.memory("sigmoid", {}, {"a": np.zeros((5, 3))}, {}) == 0


def test_a_resident_batchs_shape_work_and_memory():
    """The node knows a state as its ResidentState, the coordinator as the [V; buf] it sent:
    both give the same answers."""
    k, h, n, b = 6, 4, 5, 3
    static = np.zeros((20, k), np.float32)
    wire = np.zeros((2 * k, h))
    params = {"a_static": "s", "state": "v", "from": 1, "version": 3, "lr": [0.1, 0.2], "momentum": 0.9}
    arrays = {"rows": np.arange(n), "update_rows": np.zeros((2, b), np.int64), "dz": np.zeros((2 * b, h), np.float32)}
    for held in ({"s": static, "v": wire}, {"s": static, "v": ResidentState(wire, 1)}):
        assert vocabulary.result_shape("resident", params, arrays, held) == (n, h)
        assert vocabulary.result_dtype("resident", params, arrays, held) == np.float32
        assert vocabulary.work("resident", params, arrays, held) == (2 * b + n) * k * h
        assert vocabulary.memory("resident", params, arrays, held) == n * (k * 12 + h * 12) + b * k * 16 + k * h * 8
        fetch = {**params, "fetch": True}
        assert vocabulary.result_shape("resident", fetch, {}, held) == (2 * k, h)
        assert vocabulary.result_dtype("resident", fetch, {}, held) == np.float64
        assert vocabulary.memory("resident", fetch, {}, held) == 2 * k * h * 8
    none = {**params, "from": 3, "lr": []}
    assert vocabulary.work("resident", none, {}, {"s": static, "v": wire}) == 1.0  # at least one


def test_params_are_typed_and_checked():
    assert parse("matmul", {}) == Matmul(a_static=None, transpose_a=False)
    assert parse("matmul", {"a_static": "x", "transpose_a": True}) == Matmul("x", True)
    spec = parse(
        "resident",
        {"a_static": "s", "state": "v", "from": 2, "version": 4, "lr": [1, 0.5], "momentum": 0.9, "fetch": True},
    )
    assert spec == Resident("s", "v", 2, 4, (1.0, 0.5), 0.9, True) and spec.updates == 2
    with pytest.raises(BatchError) as err:
        parse("square", {})
    assert err.value.code == "unknown-op"
    bad = [
        ("matmul", {"a_static": 5}),
        ("resident", {"a_static": "s", "state": "v", "from": 3, "version": 2, "lr": [], "momentum": 0.9}),
        ("resident", {"a_static": "s", "state": "v", "from": 0, "version": 1, "lr": [], "momentum": 0.9}),
        ("resident", {"a_static": "s", "state": "v", "from": 0, "version": 1, "lr": [1e400], "momentum": 0.9}),
        ("resident", {"a_static": "s", "state": None, "from": 0, "version": 0, "lr": [], "momentum": 0.9}),
    ]
    for op, params in bad:
        with pytest.raises(BatchError) as err:
            parse(op, params)
        assert err.value.code == "bad-batch", params


def test_typed_params_stand_for_the_header_params_and_a_batch_parses_once():
    """Every function of the vocabulary takes what `parse` made of a batch's params as well as the
    params themselves, with the same answers; a coordinator's Batch parses its params once, again
    only when they are replaced."""
    from enshuffle.coordinator.distributed import Batch

    static, wire = np.zeros((20, 6), np.float32), np.zeros((12, 4))
    params = {"a_static": "s", "state": "v", "from": 1, "version": 3, "lr": [0.1, 0.2], "momentum": 0.9}
    arrays = {"rows": np.arange(5), "update_rows": np.zeros((2, 3), np.int64), "dz": np.zeros((6, 4), np.float32)}
    held = {"s": static, "v": wire}
    typed = parse("resident", params)
    assert parse("resident", typed) is typed
    for fn in (
        vocabulary.result_shape,
        vocabulary.result_dtype,
        vocabulary.work,
        vocabulary.memory,
        vocabulary.describe,
    ):
        assert fn("resident", typed, arrays, held) == fn("resident", params, arrays, held), fn.__name__
    product = ({"a_static": "s"}, {"rows": np.arange(30), "b": np.zeros((6, 8), np.float32)})
    assert (
        vocabulary.split("matmul", parse("matmul", product[0]), product[1], 1 << 10, 6)[1]
        == (vocabulary.split("matmul", product[0], product[1], 1 << 10, 6)[1])
    )
    with pytest.raises(BatchError) as err:  # typed params of another op
        parse("matmul", typed)
    assert err.value.code == "bad-batch"
    with pytest.raises(BatchError) as err:
        parse("square", typed)
    assert err.value.code == "unknown-op"

    batch = Batch(0, "resident", params, arrays)
    assert batch.spec == typed and batch.spec is batch.spec  # parsed once
    batch.params = {**params, "fetch": True}
    assert batch.spec.fetch and batch.spec is batch.spec  # replaced params: parsed again
    assert Batch(0, "resident", params, arrays) == Batch(0, "resident", params, arrays)  # the cache is not compared


def test_a_node_must_offer_every_op_and_may_offer_more(core_data_dir):
    """HELLO's capabilities.ops (docs/protocol.md section 11): a node that lacks an op is refused
    `bad-hello`; one that lists more (the retired elementwise ops, say) is welcomed."""

    def answer(sock: zmq.Socket) -> messages.Message:
        assert sock.poll(10_000, zmq.POLLIN), "no answer within 10 s"
        return messages.decode(sock.recv_multipart())

    preset = default_preset(epochs=1)
    run = InProcessRun(preset, load_inputs(core_data_dir, preset, 600), shards=1, min_nodes=1).start()
    ctx = zmq.Context()
    try:
        retired = ["sigmoid", "sub", "square", "mul"]
        for ops, want in ((["matmul"], "REFUSE"), (["matmul", *retired, "resident"], "WELCOME")):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(run.endpoint)
            hs = NodeHandshake(Identity.generate(), "x", {"ops": ops, "threads": 1, "credit": 1})
            sock.send_multipart(hs.hi())
            challenge = answer(sock)
            hs.check_challenge(challenge)
            sock.send_multipart(hs.hello(challenge))
            reply = answer(sock)
            assert reply.command == want, reply.header
            if want == "REFUSE":
                assert reply.header["code"] == "bad-hello" and "matmul, resident" in reply.header["text"]
            sock.close(0)
    finally:
        ctx.term()
        run.close()


def test_a_hidden_layers_resident_batch():
    """A state without a static (a hidden layer's): its operands come with the batch."""
    k, h, n, b = 6, 4, 5, 3
    wire = np.zeros((2 * k, h))
    params = {"a_static": None, "state": "v", "from": 1, "version": 3, "lr": [0.1, 0.2], "momentum": 0.9}
    arrays = {
        "a": np.zeros((n, k), np.float32),
        "update_a": np.zeros((2 * b, k), np.float32),
        "dz": np.zeros((2 * b, h), np.float32),
    }
    for held in ({"v": wire}, {"v": ResidentState(wire, 1)}):
        assert vocabulary.result_shape("resident", params, arrays, held) == (n, h)
        assert vocabulary.result_dtype("resident", params, arrays, held) == np.float32
        assert vocabulary.work("resident", params, arrays, held) == (2 * b + n) * k * h
        assert vocabulary.memory("resident", params, arrays, held) == n * (k + h) * 16 + 2 * b * (k + h) * 8 + k * h * 8
        assert vocabulary.describe("resident", params, arrays, held) == "resident (5x6)·V [v]"
        backward = {**params, "backward": True}
        no_a = {name: v for name, v in arrays.items() if name != "a"}
        assert vocabulary.result_shape("resident", backward, no_a, held) == (b, k)
        assert vocabulary.result_dtype("resident", backward, no_a, held) == np.float32
        assert vocabulary.work("resident", backward, no_a, held) == (2 * b + b) * k * h
        assert vocabulary.describe("resident", backward, no_a, held) == "resident backward (6x4)·V^T [v]"
        fetch = {**params, "fetch": True}
        assert vocabulary.result_shape("resident", fetch, no_a, held) == (2 * k, h)
        assert vocabulary.result_dtype("resident", fetch, no_a, held) == np.float64
    state = ResidentState(wire, 1)
    for form, got in ((params, arrays), ({**params, "backward": True}, no_a)):
        c = compute_batch("resident", form, got, {}, None, {"v": ResidentState(wire, 1)})
        assert c.shape == vocabulary.result_shape("resident", form, got, {"v": state}) and c.dtype == np.float32
    with pytest.raises(BatchError):  # a backward carries its own update, of a hidden layer's state
        parse("resident", {**params, "a_static": "s", "backward": True})
