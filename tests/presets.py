"""The small network most tests train.

The default preset's own network (784-2048-10 ReLU) is wide enough for shipping to the nodes to
pay, and 16 times the arithmetic of the notebook's 784-128-10 sigmoid network. Tests whose
subject is not that width (the protocol, the disguises' exactness, the ledger, the chain, the
console...) train the default preset on the notebook's network instead, through these: in
process `small_default(...)` (or `**SMALL_NETWORK`), on the command line `*SMALL_NET`. A few tests keep the default
network end to end (tests/test_cli_train.py, tests/test_offload.py, tests/test_core_layers.py).
"""

from __future__ import annotations

from enshuffle.model import NOTEBOOK_LAYERS, Preset, get_preset

# The same network as keywords (of get_preset, run_audit) and as `enshuffle train|coordinator|
# audit|bench` options.
SMALL_NETWORK = {"layers": NOTEBOOK_LAYERS, "activation": "sigmoid"}
SMALL_NET = ("--hidden", str(NOTEBOOK_LAYERS[1]), "--activation", "sigmoid")


def small_default(name: str = "default", **options) -> Preset:
    """get_preset(name, ...) on the notebook's 784-128-10 sigmoid network unless `options` give
    `layers` or `activation` (a test that gives only `layers` keeps sigmoid hidden units)."""
    return get_preset(name, **{**SMALL_NETWORK, **options})
