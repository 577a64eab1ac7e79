"""Which products go to nodes (`--offload`): each one only where shipping it pays.

A product shipped to nodes costs the coordinator what it sends and receives (disguising,
sealing, copying: `ship_ns` per element) plus the disguise's corrections (multiply-adds at
`madd_ns`); kept home it costs its multiply-adds at `madd_ns`. `--offload auto` ships a product
when that is cheaper for the coordinator, from the product's shapes and a `CostModel`; `enshuffle
bench` measures the model on this machine and keeps it (`cost_model.json` in the cache), and
without a measurement built-in figures are used (26 ns per element, 0.09 ns per multiply-add).
`--offload matmul` ships every product that can go (the pixel-wide products and every
hidden-to-hidden layer's), for experiments and tests.

The products of a network 784-h1-...-10 with k slots and a batch of b rows:

| product | shape              | shipped elements                 | coordinator's disguise work (multiply-adds) |
|---------|--------------------|----------------------------------|---------------------------------------------|
| x_w1    | (b,784) @ (784,h1) | 784 h1 + k b h1                  | 784 h1 (r + 1 + 32) + b h1 (r + 1 + k)       |
| dw1     | (784,b) @ (b,h1)   | k b h1 + 784 h1                  | b h1 r + 784 h1 (r + 32) + 30 b (784 + h1)   |
| a_w{l}  | (b,n) @ (n,m)      | b n + n m + k b m                | b n (r + g) + n m (r + g) + b m (r + k)      |
| dw{l}   | (n,b) @ (b,m)      | b n + k b m + n m                | b m r + n m (r + g)                          |
| da{l}   | (b,m) @ (m,n)      | n m + b n                        | b n g                                        |
| resident | x_w1 and dw1, weights on nodes | 2 k b h1 (+ 2 784 h1 a checkpoint) | b 784 (r + 2q) + 4 b h1 r |
| resident{l} | layer l's, weights on nodes | 3 b n + 2 k b m (+ 2 n m / 64) | b n (2 G + 2 g + 6 q) + b m (2 G + 4 q) |

(r, g: the noise rank and mixing block of each disguise, pixel_share.py's for x_w1 and dw1 and
hidden_share.py's for a hidden layer's; 30: the decoys' directions, decoy.py; q: the resident
disguises' probes; G: the rows mixed together in a resident hidden layer's batch,
resident_hidden.py; all in the disguise package.) The last layer's products never go: they carry
the labels.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from enshuffle.coordinator.disguise.decoy import DECOY_ROWS
from enshuffle.coordinator.disguise.hidden_share import MIX_GROUP as HIDDEN_MIX_GROUP
from enshuffle.coordinator.disguise.hidden_share import NOISE_RANK as HIDDEN_NOISE_RANK
from enshuffle.coordinator.disguise.pixel_share import MIX_GROUP as PIXEL_MIX_GROUP
from enshuffle.coordinator.disguise.pixel_share import NOISE_RANK as PIXEL_NOISE_RANK
from enshuffle.coordinator.disguise.resident import CHECKPOINT_STEPS as RESIDENT_CHECKPOINT_STEPS
from enshuffle.coordinator.disguise.resident import MIX_GROUP as RESIDENT_MIX_GROUP
from enshuffle.coordinator.disguise.resident import PROBES as RESIDENT_PROBES
from enshuffle.coordinator.disguise.resident_hidden import ROW_GROUP
from enshuffle.dataset import cache_dir

OFFLOADS = ("auto", "matmul")
COST_MODEL_FILE = "cost_model.json"


@dataclass(frozen=True)
class CostModel:
    """The coordinator's CPU per element it ships, and the centralized CPU per multiply-add."""

    ship_ns: float = 26.0
    madd_ns: float = 0.09
    source: str = "built-in figures; run `enshuffle bench` to measure this machine"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "CostModel":
        """The model kept at `path`, or the default one when there is none or it is unreadable."""
        try:
            data = json.loads(path.read_text())
            ship, madd = float(data["ship_ns"]), float(data["madd_ns"])
        except (OSError, ValueError, KeyError, TypeError):
            return cls()
        if not (math.isfinite(ship) and math.isfinite(madd) and ship > 0 and madd > 0):
            return cls()
        return cls(ship_ns=ship, madd_ns=madd, source=f"measured by enshuffle bench ({path})")


def default_cost_model() -> CostModel:
    """The cost model measured on this machine if `enshuffle bench` kept one, else the built-in one."""
    return CostModel.load(cache_dir() / COST_MODEL_FILE)


def check_offload(offload: str) -> None:
    """ValueError unless `offload` is one of OFFLOADS (a run's record may name anything)."""
    if offload not in OFFLOADS:
        raise ValueError(f"--offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")


@dataclass(frozen=True)
class Product:
    """One product of one step: its arithmetic, what shipping it moves, and the decision."""

    name: str  # x_w1, dw1, a_w2, dw2, da2, ...
    madds: float
    shipped: float  # elements sent to and received from the nodes
    overhead: float  # the coordinator's disguise work, multiply-adds
    ship: bool

    def local_ms(self, model: CostModel) -> float:
        return self.madds * model.madd_ns / 1e6

    def remote_ms(self, model: CostModel) -> float:
        return (self.shipped * model.ship_ns + self.overhead * model.madd_ns) / 1e6


def product_costs(name: str, b: int, n: int, m: int, k: int) -> tuple[float, float, float]:
    """(multiply-adds, shipped elements, disguise multiply-adds) of product `name` (its kind is
    its prefix: x_w1, dw1, a_w, dw, da) with batch b, contraction or input width n, output m."""
    r1, g1, r, g = PIXEL_NOISE_RANK, PIXEL_MIX_GROUP, HIDDEN_NOISE_RANK, HIDDEN_MIX_GROUP
    if name == "resident":  # the resident disguise's first layer: forward and update per step
        return (
            2 * b * n * m,
            2 * k * b * m + 2 * n * m / RESIDENT_CHECKPOINT_STEPS,
            b * n * (r1 + 2 * RESIDENT_PROBES) + 4 * b * m * r1,
        )
    if name == "x_w1":
        return b * n * m, n * m + k * b * m, n * m * (r1 + 1 + g1) + b * m * (r1 + 1 + k)
    if name == "dw1":
        return b * n * m, k * b * m + n * m, b * m * r1 + n * m * (r1 + g1) + DECOY_ROWS * b * (n + m)
    kind = name.rstrip("0123456789")
    if kind == "resident":  # a resident hidden layer: forward, backward and step per step
        q, big, g = RESIDENT_PROBES, ROW_GROUP, RESIDENT_MIX_GROUP
        return (
            3 * b * n * m,
            3 * b * n + 2 * k * b * m + 2 * n * m / RESIDENT_CHECKPOINT_STEPS,
            b * n * (2 * big + 2 * g + 6 * q) + b * m * (2 * big + 4 * q),
        )
    if kind == "a_w":
        return b * n * m, b * n + n * m + k * b * m, b * n * (r + g) + n * m * (r + g) + b * m * (r + k)
    if kind == "dw":
        return b * n * m, b * n + k * b * m + n * m, b * m * r + n * m * (r + g)
    if kind == "da":
        return b * n * m, n * m + b * n, b * n * g
    raise ValueError(f"unknown product {name!r}")


def decide(name: str, b: int, n: int, m: int, k: int, offload: str, model: CostModel) -> Product:
    """The decision for one product call (shapes as in `product_costs`)."""
    madds, shipped, overhead = (float(v) for v in product_costs(name, b, n, m, k))
    product = Product(name, madds, shipped, overhead, ship=True)
    if offload == "auto":
        product = Product(name, madds, shipped, overhead, ship=product.remote_ms(model) < product.local_ms(model))
    return product


def step_plan(
    layers: tuple[int, ...],
    batch: int,
    k: int,
    offload: str,
    model: CostModel,
    distributable: set[int] | None = None,
    resident: bool = False,
    resident_layers: set[int] | None = None,
) -> list[Product]:
    """Every product of one training step of a network with these layer widths: the first layer's
    two, then each hidden-to-hidden layer's three (`distributable`: the layers split over the
    slots; default every hidden-to-hidden layer; `resident_layers`: those whose weights live on
    the nodes, one entry each). The last layer's products are never shipped."""
    if resident:
        out = [decide("resident", batch, layers[0], layers[1], k, offload, model)]
    else:
        out = [
            decide("x_w1", batch, layers[0], layers[1], k, offload, model),
            decide("dw1", batch, layers[0], layers[1], k, offload, model),
        ]
    for layer in range(2, len(layers) - 1):
        if distributable is not None and layer not in distributable:
            continue
        n, m = layers[layer - 1], layers[layer]
        if resident_layers and layer in resident_layers:
            out.append(decide(f"resident{layer}", batch, n, m, k, offload, model))
            continue
        out += [
            decide(f"a_w{layer}", batch, n, m, k, offload, model),
            decide(f"dw{layer}", batch, n, m, k, offload, model),
            decide(f"da{layer}", batch, n, m, k, offload, model),
        ]
    return out


def plan_lines(products: list[Product], model: CostModel, offload: str, batch: int) -> list[str]:
    """The plan as printed at start: which products go out, and what each costs or saves."""
    lines = [
        f"offload {offload}: per step of {batch} rows, cost model {model.ship_ns:g} ns per shipped "
        f"element, {model.madd_ns:g} ns per multiply-add ({model.source})"
    ]
    saved = 0.0
    for p in products:
        local, remote = p.local_ms(model), p.remote_ms(model)
        where = "nodes" if p.ship else "here "
        if p.ship:
            saved += local - remote
        lines.append(
            f"  {p.name:<8} {where}  {p.madds / 1e6:10.1f} M multiply-adds, {p.shipped / 1e6:8.2f} M "
            f"elements to ship: here {local:8.2f} ms, shipped {remote:8.2f} ms"
        )
    shipped = [p.name for p in products if p.ship]
    if not shipped:
        lines.append(
            "  nothing pays to ship at this size: every product is computed here (--offload matmul ships them anyway)"
        )
    elif saved >= 0:
        lines.append(f"  expected coordinator saving per step: {saved:.2f} ms")
    else:
        lines.append(
            f"  shipping costs the coordinator {-saved:.2f} ms per step more than computing here "
            f"(--offload auto would keep what does not pay)"
        )
    lines.append("  the last layer's products stay here: they carry the labels")
    return lines
