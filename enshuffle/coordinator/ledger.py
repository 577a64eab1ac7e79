"""The exposure ledger: per node and per tensor, the share of the tensor's elements the node
has received (its *exposure*), the notebook's `bincount(exposures)` kept for a whole run.

Every tensor is tracked as a mask over the axis a plan splits it along; each node receives
whole rows or columns along that axis, so the mask's mean is the share of elements:

| tensor       | axis (size)                 | what a node receives                               |
|--------------|-----------------------------|----------------------------------------------------|
| images       | pixels (784)                | its pixel block of every training and test image   |
| w1           | rows = pixels (784)         | the rows of w1 for its pixel block                 |
| w2           | rows = hidden units (128)   | the rows of w2 for its hidden block                |
| activations  | hidden units (128)          | z1/a1 columns of its hidden block, every sample    |
| outputs      | classes (10)                | z2/a2 columns (only with --offload all)            |
| gradients    | dz1 units + dz2 classes (138) | backward deltas dz1 (128) and dz2 (10)           |
| labels       | classes (10)                | one-hot label columns (only with --offload all)    |

Images, w1 and w2 are the same tensor for the whole run (weights change value, not identity),
so their share is cumulative: a node that takes over another's block shows it here.
Activations, outputs, gradients and labels are new every step; their mask is the union of the
positions seen across steps, i.e. the share of each step's tensor.
"""

from __future__ import annotations

import threading

import numpy as np

from enshuffle.model import CLASSES, HIDDEN, INPUTS

AXES = {
    "images": INPUTS,
    "w1": INPUTS,
    "w2": HIDDEN,
    "activations": HIDDEN,
    "outputs": CLASSES,
    "gradients": HIDDEN + CLASSES,
    "labels": CLASSES,
}
GRADIENT_CLASS_OFFSET = HIDDEN  # dz2's class c is position HIDDEN + c of "gradients"


class ExposureLedger:
    """Thread-safe: the network thread records, presenters read `shares()`."""

    def __init__(self) -> None:
        self._masks: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def record(self, node: str, exposure: list[tuple[str, np.ndarray]]) -> None:
        """Node `node` received positions `positions` of each `tensor`."""
        with self._lock:
            masks = self._masks.setdefault(node, {})
            for tensor, positions in exposure:
                mask = masks.get(tensor)
                if mask is None:
                    mask = masks[tensor] = np.zeros(AXES[tensor], dtype=bool)
                mask[positions] = True

    def nodes(self) -> list[str]:
        with self._lock:
            return list(self._masks)

    def shares(self) -> dict[str, dict[str, float]]:
        """node -> tensor -> share of elements seen (0..1); tensors never received are 0."""
        with self._lock:
            return {node: {t: float(masks[t].mean()) if t in masks else 0.0 for t in AXES}
                    for node, masks in self._masks.items()}

    def node_shares(self, node: str) -> dict[str, float]:
        """One node's shares, only for tensors it has received (what a BATCH header announces)."""
        with self._lock:
            return {t: float(m.mean()) for t, m in self._masks.get(node, {}).items()}

    def positions(self, node: str, tensor: str) -> np.ndarray:
        """Indices along the tensor's axis that `node` has received (for tests and audits)."""
        with self._lock:
            mask = self._masks.get(node, {}).get(tensor)
            return np.flatnonzero(mask) if mask is not None else np.empty(0, dtype=np.int64)

    def table(self, tensors: tuple[str, ...] | None = None) -> str:
        """The ledger as a text table, one row per node, one column per tensor (percent seen)."""
        shares = self.shares()
        tensors = tensors or tuple(t for t in AXES if any(s.get(t) for s in shares.values())) or tuple(AXES)
        width = max([len("node")] + [len(n) for n in shares])
        head = "node".ljust(width) + "".join(f"{t:>13}" for t in tensors)
        lines = [head, "-" * len(head)]
        for node, s in shares.items():
            lines.append(node.ljust(width) + "".join(f"{100 * s[t]:12.1f}%" for t in tensors))
        return "\n".join(lines)

    def export(self) -> dict[str, dict[str, str]]:
        """JSON-able form (hex of packed bits) so a resumed run keeps what nodes have seen."""
        with self._lock:
            return {node: {t: np.packbits(m).tobytes().hex() for t, m in masks.items()}
                    for node, masks in self._masks.items()}

    def load(self, data: dict[str, dict[str, str]]) -> None:
        with self._lock:
            for node, masks in data.items():
                for tensor, hexbits in masks.items():
                    if tensor in AXES:
                        bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexbits), dtype=np.uint8))
                        self._masks.setdefault(node, {})[tensor] = bits[:AXES[tensor]].astype(bool)
