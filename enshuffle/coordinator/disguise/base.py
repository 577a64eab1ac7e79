"""What a disguise hands the distributed compute: one product's parts, and their undoing.

A disguise's product object (`PixelShare.forward`, `HiddenShare.backward`, ...) draws the
product's secrets from the run's secret generator when it is made, then:

- `parts()` yields what each slot receives (a `Part`), drawing each slot's own secrets as it goes,
  so a node computes while the next slot's part is built;
- `meanwhile()` does the coordinator's share of the product (the corrections) while the nodes
  compute;
- `undo(results)` turns the slots' results, in the order of `parts()`, into the product.

`DistributedCompute` decides whether the product ships, sends each part as a matmul batch and
collects the results (distributed.py); the order of the draws is the disguise's alone.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol

import numpy as np

from enshuffle.coordinator.plan import random_exponents


class Part(NamedTuple):
    """One slot's matmul of a disguised product: its params and arrays as the BATCH carries them,
    what the receiving node learns (`exposure`), and the columns of the static operand it names
    (`static_cols`, for sizing chunks; not sent)."""

    shard: int
    params: dict
    arrays: dict[str, np.ndarray]
    exposure: list[tuple]
    static_cols: int = 0


class Product(Protocol):
    def parts(self) -> Iterator[Part]:
        """Each slot's part, in order."""

    def meanwhile(self) -> None:
        """The coordinator's share, while the nodes compute."""

    def undo(self, results: list[np.ndarray]):
        """The product from the parts' results."""


def static_name(which: str, shard: int) -> str:
    """The name of slot `shard`'s static block of image set `which` (STATIC and `a_static`)."""
    return f"{which}.{shard}"


def exponents(size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` secret power-of-two exponents (plan.random_exponents, always drawn)."""
    out = random_exponents(size, rng, True)
    assert out is not None
    return out
