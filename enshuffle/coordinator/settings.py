"""The typed settings a coordinator run takes: argparse's Namespace stops at the command layer.

`enshuffle train`, `enshuffle coordinator`, `enshuffle audit` and the tests build a `RunSettings`
(commands.run_settings does it from the command line); `CoordinatorRun` reads nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunSettings:
    """What a coordinator run needs beyond its preset and data (each field is the option's value)."""

    offload: str = "matmul"  # --offload: which products go to nodes (recorded in run.json)
    limit: int | None = None  # --limit: training images used (recorded in run.json)
    disguise: str | None = None  # "resident", "share" or "shuffle" (the audit's control); None: the preset's
    max_exposure: float | None = None  # --max-exposure: a node may hold this share (default one block)
    replicate: bool = False  # --replicate: recompute untrusted keys' results here and compare
    quarantine_after: int | None = None  # --quarantine-after: wrong results before a key is quarantined
    save_weights: str | None = None  # --save-weights FILE.npz: the final weights
    json: bool = False  # --json: JSON lines on stdout instead of human lines
