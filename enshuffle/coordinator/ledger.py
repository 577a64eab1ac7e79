"""The exposure ledger: per node, for every kind of information, the share it has received and in
what form, the notebook's `bincount(exposures)` kept for a whole run and told honestly.

Every kind is tracked as a mask over the axis a plan splits it along; each node receives whole
rows or columns along that axis, so the mask's mean is the share of elements. Each position also
keeps the weakest *form* it arrived in:

| form             | what the node can read                                                     |
|------------------|----------------------------------------------------------------------------|
| values hidden    | no value: secret dense mixing with per-image noise (enshuffle.coordinator.distributed) |
| positions hidden | the values' mantissas and signs (shuffled, power-of-two scaled): linkable |
| clear            | the values themselves                                                       |

| kind         | axis (size)              | what a node receives (disguise "share", the default)            |
|--------------|--------------------------|-----------------------------------------------------------------|
| images       | pixels (784)             | its pixel block of every image, mixed with noise (hidden)       |
| samples      | one position             | which static rows belong to one step: linkable, not named       |
| labels       | classes (10)             | never                                                           |
| outputs      | classes (10)             | never                                                           |
| w1           | rows = pixels (784)      | w1 rows of its block, secretly mixed (hidden)                   |
| w2           | rows = hidden units (128)| 784-128-10: never; deeper: rows of its block, mixed (hidden)    |
| activations  | hidden units (128)       | 784-128-10: never; deeper: its unit block, noise-mixed (hidden) |
| deltas       | hidden units (128)       | dz1, every unit, shuffled and power-of-two scaled               |

A deeper network adds a kind per layer (`ledger_axes`): w3, ..., wL (rows = the layer's inputs),
activations2, ... and deltas2, ... (hidden layer j's units). The last layer's weights and the
activations that feed it never leave the coordinator; the deltas of hidden layer j >= 2 reach
every node (positions hidden) when layer j is distributed.

Images, w1 and w2 are the same tensor for the whole run (weights change value, not identity), so
their share is cumulative: a node that takes over another's block shows it here. The other kinds
are new every step; their mask is the union of positions seen across steps.
"""

from __future__ import annotations

import textwrap

import threading

import numpy as np

from enshuffle.model import CLASSES, INPUTS, NOTEBOOK_LAYERS


def activation_kind(hidden_layer: int) -> str:
    """The ledger's name for hidden layer j's outputs: activations, activations2, ..."""
    return "activations" if hidden_layer == 1 else f"activations{hidden_layer}"


def delta_kind(hidden_layer: int) -> str:
    """The ledger's name for hidden layer j's deltas dz_j: deltas, deltas2, ..."""
    return "deltas" if hidden_layer == 1 else f"deltas{hidden_layer}"


def ledger_axes(layers: int | tuple[int, ...] = NOTEBOOK_LAYERS) -> dict[str, int]:
    """Each kind's axis length for a network of these layer widths (an int: 784-int-10), in the
    table's order: every layer's weights (rows), then every hidden layer's activations and deltas.
    784-128-10 gives the kinds the ledger has always had."""
    if isinstance(layers, (int, np.integer)):
        layers = (INPUTS, int(layers), CLASSES)
    axes = {"images": INPUTS, "samples": 1, "labels": CLASSES, "outputs": CLASSES}
    axes.update({f"w{l}": layers[l - 1] for l in range(1, len(layers))})
    axes.update({activation_kind(j): layers[j] for j in range(1, len(layers) - 1)})
    axes.update({delta_kind(j): layers[j] for j in range(1, len(layers) - 1)})
    return axes


AXES = ledger_axes()  # the kinds, in table order (axis lengths of the notebook's network)
FORMS = ("values hidden", "positions hidden", "clear")  # weakest last
HIDDEN_VALUES, POSITIONS_HIDDEN, CLEAR = 1, 2, 3  # stored per position; 0 = never received


class ExposureLedger:
    """Thread-safe: the network thread records, presenters read `shares()` / `forms()`."""

    def __init__(self, axes: dict[str, int] | None = None) -> None:
        self.axes = dict(axes or AXES)  # kind -> axis length (ledger_axes of the run's network)
        self._masks: dict[str, dict[str, np.ndarray]] = {}
        # node -> node_shares, kept by `record` for the kinds it touches (a BATCH header announces
        # them after every record: counting every kind's mask again each time is wasted)
        self._shares: dict[str, dict[str, float]] = {}
        self._announced: dict[str, dict[str, float]] = {}  # node -> its shares rounded, for headers
        self._lock = threading.Lock()

    def record(self, node: str, exposure: list[tuple]) -> None:
        """Node `node` received `positions` of each kind, as (kind, positions[, form]); form is
        1 values hidden, 2 positions hidden, 3 clear (default: positions hidden)."""
        with self._lock:
            masks = self._masks.setdefault(node, {})
            shares = self._node_shares(node)
            touched = set()
            for item in exposure:
                kind, positions = item[0], item[1]
                form = item[2] if len(item) > 2 else POSITIONS_HIDDEN
                mask = masks.get(kind)
                if mask is None:
                    mask = masks[kind] = np.zeros(self.axes[kind], dtype=np.uint8)
                    touched.add(kind)
                index = np.asarray(positions, dtype=np.intp)
                held = mask[index]  # a copy; a repeated position gets the same maximum each time
                if held.size and held.min() < form:  # a batch mostly repeats what the node holds
                    np.maximum(held, np.uint8(form), out=held)
                    mask[index] = held
                    touched.add(kind)
            for kind in touched:  # each changed mask counted once, however many items it had
                mask = masks[kind]
                shares[kind] = float(np.count_nonzero(mask) / mask.size)
            if touched:
                self._announced.pop(node, None)

    def _node_shares(self, node: str) -> dict[str, float]:
        """The kept shares of `node` (made from its masks when not kept); call with the lock held."""
        shares = self._shares.get(node)
        if shares is None:
            shares = self._shares[node] = {
                t: float(np.count_nonzero(m) / m.size) for t, m in self._masks.get(node, {}).items() if t in self.axes
            }
        return shares

    def nodes(self) -> list[str]:
        with self._lock:
            return list(self._masks)

    def shares(self) -> dict[str, dict[str, float]]:
        """node -> kind -> share of elements seen (0..1) in any form; kinds never received are 0."""
        with self._lock:
            return {
                node: {t: float(np.count_nonzero(masks[t]) / masks[t].size) if t in masks else 0.0 for t in self.axes}
                for node, masks in self._masks.items()
            }

    def forms(self) -> dict[str, dict[str, str]]:
        """node -> kind -> the weakest form it received (a FORMS entry), for kinds it received."""
        with self._lock:
            return {
                node: {t: FORMS[int(m.max()) - 1] for t, m in masks.items() if t in self.axes and m.max() > 0}
                for node, masks in self._masks.items()
            }

    def node_shares(self, node: str) -> dict[str, float]:
        """One node's shares, only for kinds it has received (what a BATCH header announces)."""
        with self._lock:
            return dict(self._node_shares(node))

    def announced(self, node: str) -> dict[str, float]:
        """`node_shares` rounded to 6 digits: the "exposure" a BATCH or STATIC header announces
        (kept until a record changes a share: the same for most of a run's batches)."""
        with self._lock:
            rounded = self._announced.get(node)
            if rounded is None:
                rounded = self._announced[node] = {t: round(v, 6) for t, v in self._node_shares(node).items()}
            return dict(rounded)

    def positions(self, node: str, kind: str) -> np.ndarray:
        """Indices along the kind's axis that `node` has received (for tests and audits)."""
        with self._lock:
            mask = self._masks.get(node, {}).get(kind)
            return np.flatnonzero(mask) if mask is not None else np.empty(0, dtype=np.int64)

    def would_hold(self, node: str, exposure: list[tuple]) -> dict[str, float]:
        """The shares `node` would have after also receiving `exposure` (the bound's question)."""
        with self._lock:
            current = {k: (m > 0) for k, m in self._masks.get(node, {}).items()}
        for item in exposure:
            mask = current.setdefault(item[0], np.zeros(self.axes[item[0]], dtype=bool))
            mask[np.asarray(item[1], dtype=np.int64)] = True
        return {k: float(m.mean()) for k, m in current.items()}

    def table(self, kinds: tuple[str, ...] | None = None, width: int = 80) -> str:
        """The ledger as text at most `width` columns wide: one row per node, one column per kind
        (percent seen, and a letter for the weakest form: h values hidden, p positions hidden, c
        clear). Kinds no node has seen any of are named on one line instead of as columns of 0%;
        columns that do not fit go into a further table below."""
        shares, forms = self.shares(), self.forms()
        kinds = kinds or tuple(self.axes)
        seen = [t for t in kinds if any(s[t] > 0 for s in shares.values())]
        unseen = [t for t in kinds if t not in seen]
        name_width = max([len("node")] + [len(n) for n in shares])
        letter = {"values hidden": "h", "positions hidden": "p", "clear": "c"}
        cell = {t: max(len(t), len("100.0% h")) + 2 for t in seen}
        groups: list[list[str]] = []
        group: list[str] = []
        used = name_width
        for t in seen:
            if group and used + cell[t] > width:
                groups.append(group)
                group, used = [], name_width
            group.append(t)
            used += cell[t]
        if group or not groups:
            groups.append(group)
        lines = []
        for group in groups:
            head = "node".ljust(name_width) + "".join(f"{t:>{cell[t]}}" for t in group)
            lines += [head, "-" * len(head)]
            for node, s in shares.items():
                cells = []
                for t in group:
                    form = forms.get(node, {}).get(t)
                    cells.append(f"{f'{100 * s[t]:.1f}% ' + (letter[form] if form else ' '):>{cell[t]}}")
                lines.append(node.ljust(name_width) + "".join(cells))
        if unseen:
            lines += textwrap.wrap(f"0% for every node: {', '.join(unseen)}", width)
        lines += textwrap.wrap(
            "forms: h values hidden (secret mixing with noise), p positions hidden (shuffled, "
            "power-of-two scaled: values readable), c clear",
            width,
            subsequent_indent="  ",
        )
        return "\n".join(lines)

    def export(self) -> dict[str, dict[str, str]]:
        """JSON-able form (hex of the per-position form bytes) so a resumed run keeps what nodes have seen."""
        with self._lock:
            return {
                node: {t: "v2:" + m.tobytes().hex() for t, m in masks.items()} for node, masks in self._masks.items()
            }

    def load(self, data: dict[str, dict[str, str]]) -> None:
        with self._lock:
            for node, masks in data.items():
                for kind, text in masks.items():
                    size = self.axes.get(kind)
                    if size is None or not isinstance(text, str):
                        continue
                    if text.startswith("v2:"):
                        values = np.frombuffer(bytes.fromhex(text[3:]), dtype=np.uint8)[:size].copy()
                    else:  # a run written before forms existed: packed bits, form unknown -> positions hidden
                        bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:size]
                        values = bits.astype(np.uint8) * POSITIONS_HIDDEN
                    if values.shape[0] == size:
                        self._masks.setdefault(node, {})[kind] = values
                        self._shares.pop(node, None)
                        self._announced.pop(node, None)


def privacy_notes(preset, bound_raised: bool, disguise: str = "share") -> list[str]:
    """What the table cannot say in a percentage: the same sentences in the console, the
    end-of-run report and the chain metadata."""
    notes = []
    if disguise == "resident-clear":
        notes.append(
            "disguise 'resident-clear' (a control): pixels and w1 reach nodes in the clear; never use it "
            "on private data"
        )
    if disguise == "shuffle":
        notes.append(
            "disguise 'shuffle' (an audit control): pixels and w1 rows reach nodes in the clear up to "
            "order and powers of two; never use it on private data"
        )
    if disguise in ("resident", "resident-clear"):
        notes.append(
            "w1: each node holds its block of w1 once, in its own secret basis (w1[P_s] = M_s V_s), and "
            "updates it itself from the deltas; no weight message follows, so the weight trajectory tells "
            "it nothing beyond its static block, its first weights and the deltas (enshuffle audit plays "
            "the trajectory attacks)"
        )
    if preset.init == "notebook":
        notes.append(
            "the seed preset starts from the notebook's public weights (RandomState(402)): a node can "
            "compute the initial w1 and w2; train with the default preset to keep the model private"
        )
    elif preset.seed is not None:
        notes.append(
            f"initial weights and sample order come from the training seed you chose (--seed "
            f"{preset.seed}), not from the run's secret: keep that number private"
        )
    if disguise in ("resident", "resident-clear"):
        notes.append(
            "deltas: every node sees each step's dz1 with the rows it belongs to, its hidden units "
            "mixed by one secret mixing fixed for the run (its weights live in that basis); rows of one "
            "class still look alike, so it may group its training rows by class without naming the "
            "classes (enshuffle audit measures how well)"
        )
    else:
        notes.append(
            "deltas: every node sees each step's dz1 (rows and units shuffled, scaled by powers of two); "
            "rows of one class look alike, so it may group a batch's rows by class without naming the "
            "classes (enshuffle audit measures how well)"
        )
    notes.append(
        "samples: a node knows which of its static rows a step uses and can follow a row across steps; "
        "it cannot match a row to an image"
    )
    if (
        getattr(preset, "depth", 2) > 2
        and disguise in ("resident", "resident-clear")
        and getattr(preset, "momentum_layers", ())
    ):
        notes.append(
            "hidden layers: each node holds its block of rows of every hidden-to-hidden layer once, in "
            "its own secret basis, and updates it itself; each step it receives its block of the layer's "
            "input units and the layer's deltas, both with every row a fresh secret mixture of 32 of the "
            "batch's rows (no row is one sample's), the units mixed by its basis (input and output units "
            "alike); the last layer stays here"
        )
    elif getattr(preset, "depth", 2) > 2:
        notes.append(
            "hidden layers: for every hidden-to-hidden layer a node receives, each step, its block of the "
            "layer's input units (activations, mixed with fresh secret noise) and the matching rows of the "
            "layer's weights (mixed), and the layer's deltas (every unit, shuffled and scaled by powers of "
            "two, each class's structure moved onto decoy rows as for dz1); the last layer stays here"
        )
    if bound_raised:
        notes.append("the operator raised the exposure bound (--max-exposure): a node may hold more than one block")
    return notes
